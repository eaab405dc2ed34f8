"""Colours, markers and the matplotlib style shared by every figure (colour-blind safe).

Colours come from the Okabe-Ito palette (safe for the common colour-vision deficiencies), then
Paul Tol's "muted" scheme for further names. A direction keeps its colour and marker in every
figure and report: known names have fixed ones, other names are mapped by a hash of the name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import matplotlib

OKABE_ITO = {
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "bluish green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish purple": "#CC79A7",
    "black": "#000000",
}
TOL_MUTED = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255")

# Ordered colours for runs or other unnamed series (yellow last: weak on white).
SERIES_COLORS = (
    *(OKABE_ITO[k] for k in ("blue", "vermillion", "bluish green", "orange", "reddish purple")),
    OKABE_ITO["sky blue"],
    OKABE_ITO["black"],
    *TOL_MUTED,
)

DIRECTION_COLORS = {
    "isotropic": OKABE_ITO["sky blue"],
    "isotropic-difference": OKABE_ITO["blue"],
    "cov-random-mixture": OKABE_ITO["orange"],
    "cov-random-difference": OKABE_ITO["vermillion"],
    "real-mixture": OKABE_ITO["bluish green"],
    "real-difference": OKABE_ITO["reddish purple"],
    "ablation": OKABE_ITO["black"],
    "sae-error": TOL_MUTED[0],
    "sae-feature": TOL_MUTED[4],
    "sae": TOL_MUTED[0],
    "SAE(x)": TOL_MUTED[0],
    "synthetic": TOL_MUTED[7],
    "real": OKABE_ITO["bluish green"],  # interpolation targets (synthetic activations, plateaus)
    "cov-random": OKABE_ITO["orange"],
}
DIRECTION_MARKERS = {
    "isotropic": "o",
    "isotropic-difference": "s",
    "cov-random-mixture": "^",
    "cov-random-difference": "v",
    "real-mixture": "D",
    "real-difference": "P",
    "ablation": "X",
}
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "savefig.bbox": "standard",  # constrained layout already fits the labels
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.8,
    "lines.markersize": 4,
    "svg.fonttype": "none",  # text stays text in SVG: small, selectable, searchable
}


def _hash_index(name: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % n


def color_for(name: str) -> str:
    """The colour of a direction (or any series) name: fixed for known names, else hashed."""
    if name in DIRECTION_COLORS:
        return DIRECTION_COLORS[name]
    base = name.split(":")[0].split("@")[0]  # labelled variants share their direction's colour
    if base in DIRECTION_COLORS:
        return DIRECTION_COLORS[base]
    return TOL_MUTED[_hash_index(name, len(TOL_MUTED))]


def marker_for(name: str) -> str:
    """The marker of a direction name: fixed for known names, else hashed."""
    return DIRECTION_MARKERS.get(name) or _MARKERS[_hash_index(name, len(_MARKERS))]


@contextmanager
def style() -> Iterator[None]:
    """Context in which figures get the package style (rcParams restored afterwards).

    Figures are built as ``matplotlib.figure.Figure`` objects, not through pyplot, so no GUI
    backend is needed (headless machines, CI) and a notebook's backend is left alone.
    """
    with matplotlib.rc_context(STYLE):
        yield
