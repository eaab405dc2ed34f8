"""Direction generators, one registration call each: the baselines of Lee & Heimersheim
(:mod:`.base`), SAE features and errors (:mod:`.sae`) and synthetic-activation targets
(:mod:`.synthetic`)."""

from perturb_lens.directions.base import (
    DirectionContext,
    DirectionInfo,
    get_direction,
    list_directions,
    list_scales,
    make_directions,
    register_direction,
    register_scale,
)

__all__ = [
    "DirectionContext",
    "DirectionInfo",
    "get_direction",
    "list_directions",
    "list_scales",
    "make_directions",
    "register_direction",
    "register_scale",
]
