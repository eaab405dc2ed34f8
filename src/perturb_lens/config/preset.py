"""The presets that ship inside the package: one YAML file per experiment design.

A preset names an experiment and its published settings (hook depth, scope, lengths relative to
the median norm, directions, metrics, a sample size that runs offline on a laptop CPU); the model
comes from ``model=``, and the layer is a depth (``blocks.middle.hook_resid_pre``, see
:mod:`perturb_lens.common.hook_depths`) resolved against it. ``perturb-lens run NAME`` runs one;
a config file may start from one with ``preset: NAME`` and set its own keys on top.

Each file is an ordinary experiment config plus a one-line ``description``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perturb_lens.common.yaml_files import parse_yaml

PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESET_KEY = "preset"
DESCRIPTION_KEY = "description"


class UnknownPresetError(ValueError):
    """A preset name that the package does not ship; the message lists the ones it does."""


@dataclass(frozen=True)
class PresetInfo:
    """A shipped preset: its name, the experiment it runs, its one-line description, its file."""

    name: str
    experiment: str
    description: str
    path: Path


def preset_names() -> list[str]:
    """The names of the shipped presets, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The file of preset ``name``; UnknownPresetError (with close names) if there is none."""
    names = preset_names()
    if name in names:
        return PRESET_DIR / f"{name}.yaml"
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise UnknownPresetError(
        f"{name!r} is neither a config file nor a preset.{hint} Presets: {', '.join(names)} "
        "(`perturb-lens presets` describes them); a config file needs its path, ending in "
        ".yaml, .yml or .toml."
    )


def is_preset_name(source: str | Path) -> bool:
    """Whether ``source`` reads as a preset name rather than a path (no folder, no suffix)."""
    text = str(source)
    return bool(text) and "/" not in text and "\\" not in text and not Path(text).suffix


def list_presets() -> list[PresetInfo]:
    """Every shipped preset with its experiment and description."""
    out = []
    for name in preset_names():
        path = PRESET_DIR / f"{name}.yaml"
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
        out.append(
            PresetInfo(
                name=name,
                experiment=str(data.get("experiment", "sensitive-directions")),
                description=" ".join(str(data.get(DESCRIPTION_KEY, "")).split()),
                path=path,
            )
        )
    return out


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s keys set on it: mappings merged key by key (recursively), any
    other value (a list, a number, null) replacing the base's."""
    out = dict(base)
    for key, value in top.items():
        old = out.get(key)
        both = isinstance(old, Mapping) and isinstance(value, Mapping)
        out[key] = merge(old, value) if both else value
    return out
