"""Experiment configuration: the pydantic models (:mod:`.schema`), the allowed values of its
options (:mod:`.options`) and lengths (:mod:`.lengths`). ``load_config`` reads a YAML/TOML file."""

from perturb_lens.config.schema import (
    BASELINES,
    NONFINITE_POLICIES,
    SAE_LABEL,
    SCOPES,
    ConfigError,
    DataConfig,
    DirectionConfig,
    ExperimentConfig,
    StatsConfig,
    apply_overrides,
    explain,
    load_config,
    read_config_file,
    validate_config,
)

__all__ = [
    "BASELINES",
    "NONFINITE_POLICIES",
    "SAE_LABEL",
    "SCOPES",
    "ConfigError",
    "DataConfig",
    "DirectionConfig",
    "ExperimentConfig",
    "StatsConfig",
    "apply_overrides",
    "explain",
    "load_config",
    "read_config_file",
    "validate_config",
]
