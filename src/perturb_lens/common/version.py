"""The package version, read from the installed package's metadata (pyproject.toml's ``version``
is the one place it is set); the manifest and reports record it."""

from __future__ import annotations

import importlib.metadata

DISTRIBUTION = "perturb-lens"


def installed_version() -> str:
    """The installed distribution's version; ``0+unknown`` for a source tree that was never
    installed (``pip install -e .`` records it)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = installed_version()
