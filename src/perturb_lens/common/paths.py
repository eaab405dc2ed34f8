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


def file_mode() -> int:
    """The permissions a new file gets from the umask (0o644 under umask 022), for files made
    by ``tempfile.mkstemp`` (always 0o600) and then moved into place."""
    try:  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way to read it is to set it
    os.umask(mask)
    return 0o666 & ~mask
