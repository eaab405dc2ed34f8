"""The "SAE of each model" section of ``REPLICATION.md`` across models: the held-out quality of
the one TopK SAE each model's SAE claims use, read from its ``eval.json`` and ``cfg.json`` (as
``perturb-lens sae train`` writes them) and set against the targets it was trained to meet."""

from __future__ import annotations

import json
from pathlib import Path

from perturb_lens.replication.layout import MIDDLE_SAE

MIN_EV = 0.85
"""Held-out explained variance the middle-layer SAE should reach (on the trained-token group)."""
MAX_L0 = 64
MAX_DEAD = 0.01
"""Largest fraction of latents that never fire on the held-out tokens."""


def sae_folder(model_folder: Path) -> Path:
    """Where a model's middle-layer SAE sits in its runs folder."""
    return Path(MIDDLE_SAE.format(root=model_folder))


def _num(x: float | None, spec: str) -> str:
    return "undefined" if x is None else format(x, spec)


def _misses(ev: float | None, l0: float | None, dead: float) -> list[str]:
    out = []
    if ev is None or ev < MIN_EV:
        out.append(f"EV {_num(ev, '.3f')} < {MIN_EV}")
    if l0 is None or l0 > MAX_L0:
        out.append(f"L0 {_num(l0, 'g')} > {MAX_L0}")
    if dead >= MAX_DEAD:
        out.append(f"dead {dead:.1%} >= {MAX_DEAD:.0%}")
    return out


def sae_line(model: str, model_folder: Path) -> str:
    """One bullet: the SAE's kind, hook and training tokens, its held-out EV, L0, dead fraction
    and CE increase with their token counts, and whether it meets the targets (what it missed)."""
    folder = sae_folder(model_folder)
    if not (folder / "eval.json").is_file():
        return f"- **{model}**: no SAE at `{folder}` (its SAE claims are not run)."
    held = json.loads((folder / "eval.json").read_text())
    cfg = json.loads((folder / "cfg.json").read_text())
    meta = cfg.get("metadata", {})
    tok, ce = held["tokens"], held.get("ce") or {}
    ev, l0, dead = tok.get("explained_variance"), tok.get("l0"), float(held["dead_fraction"])
    misses = _misses(ev, l0, dead)
    trained = (
        f"{meta.get('kind', '?')} k = {meta.get('k', '?')}, "
        f"{cfg.get('d_sae', 0):,} latents, {int(meta.get('tokens', 0)):,} token-steps, "
        f"{meta.get('epochs', 0):g} passes"
    )
    ce_text = (
        f"CE increase {ce['ce_increase']:.3f} nat ({ce['n']:,} tokens)" if ce else "CE not measured"
    )
    verdict = "meets the targets" if not misses else "misses the targets: " + "; ".join(misses)
    return (
        f"- **{model}**: `{folder}` at `{meta.get('hook_name', '?')}` ({trained}); held-out "
        f"EV {_num(ev, '.3f')} ({tok['n']:,} tokens), L0 {_num(l0, 'g')}, dead {dead:.2%}, "
        f"{ce_text}: {verdict}."
    )


def sae_section(folders: dict[str, Path]) -> list[str]:
    """The section's markdown lines, one bullet per model."""
    head = (
        f"Targets: held-out explained variance >= {MIN_EV} at L0 <= {MAX_L0}, fewer than "
        f"{MAX_DEAD:.0%} dead latents (never firing on the held-out tokens). Held-out: WebText "
        "valid, text not trained on; BOS and outlier-norm tokens apart (not in EV). The dead "
        "fraction depends on the held-out size: a latent that fires once in 50,000 tokens "
        "looks dead on 16,000."
    )
    return ["", "## The SAE of each model", "", head, ""] + [
        sae_line(m, f) for m, f in folders.items()
    ]
