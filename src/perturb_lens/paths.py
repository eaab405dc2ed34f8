"""Where perturb-lens caches things (converted models, token batches, activation statistics)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$PERTURB_LENS_CACHE`` if set, else the platform's user cache dir for perturb-lens."""
    env = os.environ.get("PERTURB_LENS_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("perturb-lens"))
