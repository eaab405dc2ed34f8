"""Perturbation-length grids: the published presets, ranges and explicit lists."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

# Lee & Heimersheim's sensitive-directions grid: 1, 3, ..., 19, 20, 24, ..., 48, 51, 61, ..., 91.
PUBLISHED = [*range(1, 20, 2), *range(20, 49, 4), *range(51, 92, 10)]
PRESETS: dict[str, list[float]] = {
    "published": [float(v) for v in PUBLISHED],
    "0..101": [float(v) for v in range(102)],
    # SAE error / feature extrapolation grid: 1, 11, ..., 201.
    "sae": [float(v) for v in range(1, 202, 10)],
    # Relative interpolation grid: t = 0, 0.01, ..., 1 (101 steps).
    "t101": [round(i / 100, 2) for i in range(101)],
}
MAX_LENGTHS = 1000  # each length costs a forward pass per direction and token batch


def _range(spec: str) -> list[float]:
    """``"start:stop:step"`` -> start, start + step, ... <= stop (at most MAX_LENGTHS values)."""
    try:
        start, stop, step = (float(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(
            f"Length range {spec!r} must be three numbers start:stop:step (e.g. 0:100:5)."
        ) from None
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise ValueError(f"Length range {spec!r} must use finite numbers (e.g. 0:100:5).")
    if step <= 0:
        raise ValueError(f"Length range {spec!r} needs a positive step.")
    n = int((stop - start) / step + 1e-9) + 1
    if n > MAX_LENGTHS:
        raise ValueError(
            f"Length range {spec!r} has {n:,} lengths, more than the cap of {MAX_LENGTHS:,}: use "
            "a larger step or a shorter range."
        )
    return [start + i * step for i in range(n)]


def resolve_lengths(spec: str | Sequence[float], *, scale: float = 1.0) -> list[float]:
    """A preset name, ``"a:b:step"`` range or list of lengths, multiplied by ``scale``.

    ``scale`` is 1 for absolute lengths and the median activation norm for relative ones.
    """
    if isinstance(spec, str):
        if spec in PRESETS:
            values = PRESETS[spec]
        elif spec.count(":") == 2:
            values = _range(spec)
        else:
            raise ValueError(
                f"Unknown length preset {spec!r}; use one of {sorted(PRESETS)}, 'start:stop:step' "
                "or a list of numbers."
            )
    else:
        values = [float(v) for v in spec]
    if not values:
        raise ValueError("The length grid is empty; give at least one length (0 is allowed).")
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(
            f"Lengths must be finite and >= 0; got {bad[:5]}. Use lengths >= 0 (alpha = 0 is the "
            "noise floor; the sign belongs to the direction)."
        )
    if len(values) > MAX_LENGTHS:
        raise ValueError(
            f"The length grid has {len(values):,} lengths, more than the cap of {MAX_LENGTHS:,}: "
            "give fewer."
        )
    repeated = sorted(v for v, k in Counter(values).items() if k > 1)
    if repeated:
        raise ValueError(
            f"Lengths {repeated[:5]} appear more than once; each length is measured once: "
            "remove the repeats."
        )
    return [v * scale for v in values]
