"""Experiment configuration: pydantic models, YAML/TOML files, ``key=value`` overrides.

The hash of the validated configuration is the run id: the same config and seed give the same
results, and a run directory refuses to resume under a different config.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from perturb_lens.common.files import CONFIG_MAX_BYTES, UnreadableFileError, read_limited
from perturb_lens.common.hook_depths import check_hook_depth, depth_part, resolve_hook
from perturb_lens.common.hooks import HOOK_KINDS, read_hook
from perturb_lens.common.names import MAX_LENGTH, is_plain_name
from perturb_lens.common.registry import registry
from perturb_lens.common.yaml_files import MAX_DEPTH, DuplicateKeyError, TooDeepError, parse_yaml
from perturb_lens.config.lengths import resolve_lengths
from perturb_lens.config.options import DTYPE_NAMES, FRAMES, PRECISIONS
from perturb_lens.config.preset import (
    DESCRIPTION_KEY,
    PRESET_KEY,
    UnknownPresetError,
    is_preset_name,
    merge,
    preset_path,
)
from perturb_lens.metrics.builtin import check_metrics

Scope = Literal["all-positions", "single-position", "last-position"]
SCOPES: tuple[str, ...] = get_args(Scope)
Nonfinite = Literal["error", "record"]  # a NaN/inf metric: stop the run, or flag its row
NONFINITE_POLICIES: tuple[str, ...] = get_args(Nonfinite)

BASELINES = (
    "isotropic",
    "isotropic-difference",
    "cov-random-difference",
    "cov-random-mixture",
    "real-difference",
    "real-mixture",
)
SAE_LABEL = "SAE(x)"  # the label of SAE(x) itself (same-cosine rows, an SAE suite's reference)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change."""


SEED_MAX = 2**63 - 1  # seeds torch generators, which take 64-bit integers


def check_run_name(name: str) -> str:
    """A run name is one plain folder name: the run goes to ``runs/NAME-HASH``."""
    if not is_plain_name(name):
        raise ValueError(
            f"name {name!r} must be a plain folder name of at most {MAX_LENGTH} characters (no "
            "'/', '\\', ':' or control characters, not starting with '.'): the run is written to "
            "runs/NAME-HASH. To write it elsewhere, keep a plain name and pass --out DIR."
        )
    return name


def check_device(device: str | None) -> str | None:
    """A torch device string this machine has (None: CUDA if available, else the CPU)."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(
            f"device {device!r} is not a torch device: use cpu, cuda, cuda:N or mps, or leave it "
            "unset (CUDA when available, else the CPU)."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(
            f"device {device!r} is not available ({why}): set device=cpu, or leave device unset "
            "to use CUDA only when it is available."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r} is not available: this machine has "
            f"{torch.cuda.device_count()} GPU(s) (cuda:0 ...); pick one of them or set device=cpu."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available here: set device=cpu.")
    return device


def _hook_position(name: str | None) -> tuple[int, int] | None:
    """(layer, kind index) of a well-formed hook name: its place in the forward pass."""
    hook = read_hook(name)
    return None if hook is None else (hook.layer, hook.kind_index)


def check_read_after_hook(hook: str, read: str | None) -> None:
    """The downstream read (l2/cos) must sit at or after the perturbed hook."""
    if read is None or depth_part(hook) is not None or depth_part(read) is not None:
        return  # a layer depth: checked once resolved for the model (resolve_depths)
    h, r = _hook_position(hook), _hook_position(read)
    if r is None:
        raise ValueError(
            f"read {read!r} is not a hook name: use blocks.LAYER.KIND with KIND one of "
            f"{', '.join(HOOK_KINDS)}, or leave read unset (the last layer's hook_resid_post)."
        )
    if h is None:  # a name the model lacks is refused when the model is loaded
        return
    if r < h:
        raise ValueError(
            f"read {read!r} comes before hook {hook!r} in the forward pass, so the perturbation "
            f"cannot reach it: set read to a hook at or after {hook!r} (e.g. "
            f"blocks.{h[0]}.hook_resid_post), or leave read unset (the last layer's "
            "hook_resid_post)."
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _experiment(name: str) -> Any:
    """The registered experiment ``name`` (an ``ExperimentInfo``), looked up by kind: the
    experiments are a later stage, registered at the first lookup; the error lists them."""
    entry = registry("experiment").find(name)
    if entry is None:
        raise ValueError(
            f"Unknown experiment {name!r}; choose from {', '.join(registry('experiment').names())} "
            "(or register yours with perturb_lens.register_experiment)."
        )
    return entry


class DataConfig(_Strict):
    """Where the tokens come from and how they are chunked (BOS first in every row)."""

    source: str = Field(
        "default", description="file/folder, builtin:lee, HF dataset id, or default"
    )
    split: str = "train"
    text_field: str = "text"
    seq_len: int = Field(128, ge=2)
    n_seqs: int = Field(16000, ge=1)


class StatsConfig(_Strict):
    """Activation statistics for the cov-random and real directions: fitted on their own sample,
    rows of ``data.seq_len`` tokens (BOS excluded from the fit) from ``source``. From the run's
    own source, the measured rows are the sample's first rows and the rest is read beyond them."""

    source: str | None = Field(
        None, description="text the statistics are fitted on (as data.source); None = data.source"
    )
    n_tokens: int | None = Field(
        None,
        ge=2,
        description="non-BOS samples to fit on, rounded up to whole rows; None = at least "
        "20 x d_model, and at least the measured tokens",
    )
    n_seqs: int | None = Field(
        None, ge=1, description="the fit's size in rows instead of n_tokens (not both)"
    )
    jitter: float = Field(0.01, ge=0, description="added to the covariance diagonal (published)")
    pool_size: int = Field(65536, ge=2, description="real activations kept for real-* directions")
    batch_seqs: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _one_size(self) -> StatsConfig:
        if self.n_tokens is not None and self.n_seqs is not None:
            raise ValueError(
                f"stats.n_tokens={self.n_tokens} and stats.n_seqs={self.n_seqs} both size the "
                "statistics sample: set only one (n_tokens counts non-BOS samples)"
            )
        return self


class DirectionConfig(BaseModel):
    """A direction generator by name, with its options (e.g. ``sigma`` for isotropic-difference)."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def generator_options(self) -> dict[str, Any]:
        """The options the generator itself takes (without ``label`` and ``scale``)."""
        return {k: v for k, v in self.options.items() if k not in ("label", "scale")}

    @property
    def scale(self) -> str:
        """``unit`` (default), ``raw`` (the generator's own vector) or a registered scale."""
        return str(self.options.get("scale", "unit"))

    @property
    def label(self) -> str:
        return str(self.options.get("label", self.name))


def _names_to_configs(v: Any) -> Any:
    """``[name, {name: ..., ...}]`` -> a list of direction configs' inputs."""
    return [{"name": d} if isinstance(d, str) else d for d in v] if isinstance(v, list) else v


DirectionList = Annotated[list[DirectionConfig], BeforeValidator(_names_to_configs)]
"""A list of directions, each a name or a mapping with ``name`` and options."""


class ExperimentConfig(BaseModel):
    """A sweep: model, hook, data, directions, lengths, scope, metrics, and the experiments'
    options sections (``plateaus``, ``stable_regions``, ...: extra keys, each validated by its
    registered experiment's own model)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field("experiment", description="the run goes to runs/NAME-HASH (no '/')")
    experiment: str = Field(
        "sensitive-directions", description="a registered experiment (experiments.registry)"
    )
    model: str = "smollm2-135m"
    sae: str | None = Field(
        None, description="SAE at the hook: SAELens folder, release:sae_id, or e2e_sae checkpoint"
    )
    frame: Literal[FRAMES] | None = None
    dtype: Literal[DTYPE_NAMES] = "float32"
    device: str | None = None
    precision: Literal[PRECISIONS] = Field(
        "auto", description="block matmuls (native models); auto = tf32 on CUDA, else float32"
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per shard, the same on every executor (float32 results depend "
        "on it); None = torch's default on the driver, recorded in the manifest",
    )
    hook: str = "blocks.6.hook_resid_pre"
    read: str | None = Field(None, description="downstream hook for l2/cos; None = last resid_post")
    scope: Scope = "all-positions"
    lengths: str | list[float] = "published"
    relative_lengths: bool = Field(False, description="multiply lengths by the median norm at hook")
    metrics: list[str] = Field(default_factory=lambda: ["kl", "l2"])
    directions: DirectionList = Field(
        default_factory=lambda: [DirectionConfig(name=n) for n in BASELINES]
    )
    data: DataConfig = Field(default_factory=DataConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    seed: int = Field(0, ge=0, le=SEED_MAX, description="0 .. 2**63 - 1")
    shard_seqs: int = Field(8, ge=1, description="sequences per result shard (unit of resume)")
    shard_by_direction: bool = Field(
        False, description="one shard per batch x direction (finer resume and parallelism)"
    )
    rows_per_pass: int | None = Field(
        None, ge=1, description="token rows per suffix pass; None = 4096 on CPU, from GPU memory"
    )
    rows_per_logits: int = Field(512, ge=1)
    nonfinite: Nonfinite = Field(
        "error", description="NaN/inf metrics: refuse the shard, or record them (flagged, unmeaned)"
    )
    include_bos: bool = Field(True, description="BOS position in summary means (published: yes)")
    drop_last_position: bool = Field(True, description="all-positions summary drops the last pos")
    results: Literal["rows", "aggregate"] = Field(
        "rows",
        description="rows: one row per token x direction x length; aggregate: per-shard "
        "mergeable statistics (results.aggregate), megabytes instead of gigabytes at scale",
    )

    @field_validator("experiment")
    @classmethod
    def _check_experiment(cls, v: str) -> str:
        _experiment(v)  # unknown: the error lists the registered ones
        return v

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return check_run_name(v)

    @field_validator("hook", "read")
    @classmethod
    def _check_depth(cls, v: str | None, info: ValidationInfo) -> str | None:
        return check_hook_depth(v, info.field_name or "hook")

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str | None) -> str | None:
        return check_device(v)

    @field_validator("metrics")
    @classmethod
    def _check_metrics(cls, v: list[str]) -> list[str]:
        return check_metrics(v)

    @field_validator("lengths")
    @classmethod
    def _check_lengths(cls, v: str | list[float]) -> str | list[float]:
        resolve_lengths(v)
        return v

    @field_validator("directions")
    @classmethod
    def _check_directions(cls, v: list[DirectionConfig]) -> list[DirectionConfig]:
        if not v:
            raise ValueError("no directions given")
        labels = [d.label for d in v]
        if len(set(labels)) != len(labels):
            raise ValueError(f"direction labels must be unique; got {labels} (set 'label')")
        return v

    @model_validator(mode="after")
    def _check_scope(self) -> ExperimentConfig:
        check_read_after_hook(self.hook, self.read)
        info = _experiment(self.experiment)
        if self.results == "aggregate" and info.curve_stats:
            raise ValueError(
                f"experiment {self.experiment!r} compares per-curve statistics, which need every "
                "token's curve: use results: rows"
            )
        if self.results == "aggregate" and len(resolve_lengths(self.lengths)) == 1:
            raise ValueError(
                "a one-length run (SAE substitution) plots every row's perturbation size against "
                "its KL: use results: rows"
            )
        if info.scope is not None and self.scope != info.scope:
            raise ValueError(f"experiment {self.experiment!r} needs scope: {info.scope}")
        if self.shard_by_direction and not info.shard_by_direction:
            raise ValueError(
                f"shard_by_direction is not supported by experiment {self.experiment!r}; "
                "set it to false"
            )
        return self

    @model_validator(mode="after")
    def _experiment_sections(self) -> ExperimentConfig:
        """Every registered experiment's options section, validated by its own model (defaults
        where absent; all of them, so that a config's hash does not depend on which experiment
        it runs); any other key is refused."""
        given = dict(self.__pydantic_extra__ or {})
        sections = {
            e.section: e.resolved().options for e in registry("experiment").values() if e.section
        }
        unknown = [k for k in given if k not in sections]
        if unknown:
            keys = ", ".join(sorted([*type(self).model_fields, *sections]))
            message = f"unknown key {unknown[0]!r}; valid keys here: {keys}"
            raise PydanticCustomError("unknown_key", _literal(message))
        out: dict[str, BaseModel] = {}
        for key, options in sections.items():
            try:
                out[key] = options.model_validate(given.get(key, {}))
            except ValidationError as err:
                message = "\n  ".join(explain_lines(err, options, prefix=f"{key}."))
                raise PydanticCustomError("config_section", _literal(message)) from None
        self.__pydantic_extra__ = out
        return self


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at a (possibly nested) location of a config model."""
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of models (saes.0.k): its model's keys
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if get_origin(ann) is list:
            ann = get_args(ann)[0]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return sorted(model.model_fields)


def _literal(message: str) -> str:
    """``message`` as a PydanticCustomError template (braces escaped)."""
    return message.replace("{", "{{").replace("}", "}}")


def explain_lines(err: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per error: the dotted key and what is wrong (unknown keys: the valid ones)."""
    lines = []
    for e in err.errors():
        where = prefix + ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            keys = ", ".join(_valid_keys(model, e["loc"]))
            lines.append(f"unknown key {where!r}; valid keys here: {keys}")
        elif e["type"] in ("unknown_key", "config_section"):
            lines.append(e["msg"])
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            if e["type"] == "string_type" and not isinstance(e.get("input"), dict | list):
                msg += f" (YAML read {e.get('input')!r} as a non-string: quote it)"
            lines.append(f"{where}: {msg}" if where else msg)
    return lines


def explain(
    err: ValidationError, model: type[BaseModel], title: str = "Invalid configuration"
) -> str:
    """``title:`` and one indented line per error of ``err`` (:func:`explain_lines`)."""
    return f"{title}:\n  " + "\n  ".join(explain_lines(err, model))


def validate_config(data: dict[str, Any]) -> ExperimentConfig:
    """Validate a plain dict; errors name the bad key and the valid ones."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(explain(err, ExperimentConfig)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) file into a dict.

    Refused, saying why: a path that is not a regular file (a pipe could block forever), a file
    over :data:`~perturb_lens.common.files.CONFIG_MAX_BYTES`, text that is not UTF-8, a key given
    twice in one mapping (YAML would keep the last silently; TOML refuses it too) and runaway
    nesting."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Config file {path} not found.")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"Config {path} must end in .yaml, .yml or .toml.")
    try:
        text = read_limited(path, CONFIG_MAX_BYTES, "a config file").decode("utf-8")
    except UnreadableFileError as err:
        raise ConfigError(str(err)) from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"Config {path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as "
            "UTF-8, or check that it is the config file you meant."
        ) from None
    kind = "TOML" if path.suffix == ".toml" else "YAML"
    try:
        data = tomllib.loads(text) if kind == "TOML" else parse_yaml(text)
    except DuplicateKeyError as err:
        first, second = err.lines
        raise ConfigError(
            f"Config {path}: key {err.key!r} is given twice in one section (lines {first} and "
            f"{second}); YAML would silently keep only the second. Merge the two into one "
            f"{err.key!r} entry."
        ) from None
    except (RecursionError, TooDeepError) as err:  # tomllib has no depth option: it recurses
        deep = f"{MAX_DEPTH} levels (line {err.line})" if isinstance(err, TooDeepError) else ""
        raise ConfigError(
            f"Malformed config {path}: its values nest deeper than {deep or 'Python can parse'}, "
            "where a config needs a few levels: check that it is the config file you meant."
        ) from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(
            f"Malformed config {path}: {err}\nFix the {kind} syntax at the line shown (an "
            "unclosed bracket or quote, a bad indent, a tab, a key given twice?)."
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config {path} must hold a mapping of keys to values at the top.")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML: numbers, lists, null...)."""
    out = parse_yaml(yaml.safe_dump(data)) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Override {item!r} must look like key=value (e.g. data.n_seqs=64).")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {item!r}: {p!r} is not a section.")
        try:
            node[parts[-1]] = parse_yaml(raw)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"Override {item!r}: the value is not valid YAML ({err}); quote it, e.g. "
                f"{key}='\"...\"', or fix the brackets of a list ({key}=[a,b])."
            ) from None
    return out


def read_config_source(source: str | Path) -> dict[str, Any]:
    """A config file's keys, or a shipped preset's by name (a name has no folder and no suffix).
    A ``preset: NAME`` key starts from that preset and sets the file's other keys on top
    (mappings merged key by key); a top-level ``description`` is dropped (not a setting)."""
    try:
        data = read_config_file(preset_path(str(source)) if is_preset_name(source) else source)
        if PRESET_KEY in data:
            name = data.pop(PRESET_KEY)
            if not (isinstance(name, str) and is_preset_name(name)):
                raise ConfigError(
                    f"Config {source}: preset must be the name of a shipped preset (see "
                    f"`perturb-lens presets`), not {name!r}."
                )
            data = merge(read_config_file(preset_path(name)), data)
    except UnknownPresetError as err:
        raise ConfigError(str(err)) from None
    data.pop(DESCRIPTION_KEY, None)
    return data


def resolve_depths(cfg: ExperimentConfig, n_layers: int) -> ExperimentConfig:
    """``cfg`` with the depths of its hook and read (``blocks.middle...``, ``blocks.25%...``)
    replaced by the layer indices they name in an ``n_layers`` model (unchanged without any)."""
    hook = resolve_hook(cfg.hook, n_layers)
    read = resolve_hook(cfg.read, n_layers) if cfg.read is not None else None
    if (hook, read) == (cfg.hook, cfg.read):
        return cfg
    return validate_config({**cfg.model_dump(mode="json"), "hook": hook, "read": read})


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Read, override and validate a config file or a shipped preset by name (no path: the
    defaults). A hook given as a depth stays so until the model is known (:func:`resolve_depths`;
    the runner resolves it)."""
    data = read_config_source(path) if path is not None else {}
    if "saes" in data:  # the SAE commands' files: say which command reads them
        command = "sae run" if "base" in data else "sae train"
        raise ConfigError(
            f"{path} is an SAE {'suite' if 'base' in data else 'training'} config: "
            f"run it with `perturb-lens {command} {path}`."
        )
    return validate_config(apply_overrides(data, overrides or []))
