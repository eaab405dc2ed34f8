"""Loss recovered against L0, reached two ways (the replication thread's question: "If you removed
the high-frequency features to achieve some L0 norm X, how much does loss recovered change? If you
increased the l1 penalty to achieve L0 norm X, how does the loss recovered change?").

- ``masked``: one SAE with its most frequent latents zeroed after the activation, step by step
  (frequency = share of the counted positions of ``tokens`` where ``f > 0``; steps chosen so that
  L0 reaches a grid of values). Masking ``n`` latents lowers L0 by exactly their frequencies, so
  L0 is non-increasing along the steps, and masking every latent that fires gives L0 = 0.
- ``family``: SAEs trained at other L1 coefficients / k (e.g. one ``perturb-lens sae train``
  output), each as it is.

Every row is an :class:`~perturb_lens.saes.quality.SAEStats` of the same tokens, computed in one
:func:`~perturb_lens.saes.quality.sae_stats` call (the clean passes and the mean are shared).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from perturb_lens.models.base import LensModel
from perturb_lens.saes.quality import counted_activations, sae_stats
from perturb_lens.saes.sae import SAE

TABLE_FILE = "l0_sweep"  # <out>/l0_sweep.csv and .parquet
COLUMNS = (
    "way",
    "sae",
    "setting",
    "n_masked",
    "l0",
    "loss_recovered_zero",
    "loss_recovered_zero_low",
    "loss_recovered_zero_high",
    "loss_recovered_mean",
    "loss_recovered_mean_low",
    "loss_recovered_mean_high",
    "kl",
    "ce_increase",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "ce_mean",
    "explained_variance",
    "n_tokens",
    "n_seqs",
    "hook",
    "mean_source",
)


class MaskedSAE(SAE):
    """``sae`` (weights shared) with the latents where ``keep`` is False zeroed after the
    activation, so they neither count in L0 nor reach the decoder."""

    def __init__(self, sae: SAE, keep: Tensor) -> None:
        super().__init__(sae.cfg, dtype=sae.W_enc.dtype)
        for name, p in sae.named_parameters():
            setattr(self, name, p)
        self.alive = sae.alive
        self.keep = keep.to(sae.W_enc.device, sae.W_enc.dtype)

    def activation(self, h: Tensor) -> Tensor:
        return super().activation(h) * self.keep


def latent_counts(sae: SAE, model: LensModel, tokens: Tensor, **options: Any) -> tuple[Tensor, int]:
    """``(counts, n)``: per latent, the number of the ``n`` counted positions of ``tokens`` where
    it fires (``f > 0``, int64 [d_sae]); ``options``: :func:`counted_activations`'."""
    counts, n = torch.zeros(sae.d_sae, dtype=torch.long), 0
    with torch.no_grad():
        for x in counted_activations(model, tokens, sae.hook, desc="Latent frequencies", **options):
            counts += (sae.encode(x) > 0).sum((0, 1)).cpu()
            n += x.shape[0] * x.shape[1]
    return counts, n


def frequency_order(counts: Tensor) -> Tensor:
    """Latent indices, most frequent first (ties: lower index first)."""
    return torch.sort(counts, descending=True, stable=True).indices


def mask_steps(counts: Tensor, n: int, l0_grid: Sequence[float]) -> list[int]:
    """For each target L0, the fewest most-frequent latents to mask so that L0 <= target
    (L0 after masking ``j`` of them: ``(sum(counts) - top-j counts) / n``); sorted, unique, 0
    first."""
    bad = [v for v in l0_grid if not v >= 0]
    if bad:
        raise ValueError(f"L0 targets must be >= 0; got {bad}")
    cum = torch.cat([torch.zeros(1, dtype=torch.long), counts[frequency_order(counts)].cumsum(0)])
    remaining = (int(counts.sum()) - cum).double() / n  # [d_sae + 1]: L0 after masking j
    steps = {0}
    for target in l0_grid:
        steps.add(int((remaining > target).sum()))  # remaining is non-increasing in j
    return sorted(steps)


def default_grid(l0: float, n_steps: int) -> list[float]:
    """``n_steps + 1`` evenly spaced L0 targets from ``l0`` down to 0."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1; got {n_steps}")
    return [l0 * j / n_steps for j in range(n_steps, -1, -1)]


def setting_of(sae: SAE) -> str:
    """The sparsity setting an SAE was trained at (``k=..`` or ``l1=..``), if recorded."""
    if sae.cfg.activation == "topk":
        return f"k={sae.cfg.k}"
    l1 = sae.cfg.metadata.get("l1")
    return f"l1={l1:g}" if isinstance(l1, int | float) and l1 > 0 else ""


def l0_sweep(
    sae: SAE,
    model: LensModel,
    tokens: Tensor,
    *,
    name: str = "sae",
    family: Mapping[str, SAE] | None = None,
    l0_grid: Sequence[float] | None = None,
    n_steps: int = 8,
    include_bos: bool = False,
    batch_seqs: int = 8,
    mean: Tensor | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """The table of loss recovered (zero and mean ablation), KL and CE increase against L0 for
    ``sae`` masked step by step (way ``masked``) and for each ``family`` SAE (way ``family``).

    ``l0_grid``: the L0 targets of the masking steps (default: ``n_steps + 1`` evenly spaced from
    the SAE's L0 down to 0); ``mean``: the fitted mean for mean ablation (default: the data's)."""
    family = dict(family or {})
    d = model.spec.d_model
    sae.check_compatible(sae.hook, d, model.frame)
    others = {k: s.hook for k, s in family.items() if s.hook != sae.hook}
    if others:
        raise ValueError(
            f"Family SAEs {others} read other hooks than {sae.hook!r}: loss recovered against L0 "
            "compares SAEs of one hook; give a family trained at the same hook."
        )
    counts, n = latent_counts(
        sae, model, tokens, include_bos=include_bos, batch_seqs=2 * batch_seqs, progress=progress
    )
    grid = default_grid(float(counts.sum()) / n, n_steps) if l0_grid is None else l0_grid
    order = frequency_order(counts)
    variants: dict[str, SAE] = {}
    for j in mask_steps(counts, n, grid):
        keep = torch.ones(sae.d_sae, dtype=torch.bool)
        keep[order[:j]] = False
        variants[f"masked:{j}"] = MaskedSAE(sae, keep)
    variants |= {f"family:{k}": s for k, s in family.items()}
    means = {} if mean is None else {sae.hook: mean}
    stats = sae_stats(
        variants, model, tokens, batch_seqs=batch_seqs, include_bos=include_bos, means=means,
        progress=progress,
    )  # fmt: skip
    rows = []
    for st in stats:
        way, key = st.name.split(":", 1)
        masked = way == "masked"
        row = st.to_dict()
        row |= {"way": way, "sae": name if masked else key, "n_masked": int(key) if masked else 0}
        row["setting"] = f"{key} masked" if masked else setting_of(family[key])
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    fam = df["way"] == "family"
    return pd.concat([df[~fam], df[fam].sort_values("l0", ascending=False)], ignore_index=True)


def family_refs(refs: Sequence[str]) -> dict[str, str]:
    """Name -> SAE reference for the family arguments: an SAE reference as it is (named after
    its folder), a folder of SAE folders (a ``perturb-lens sae train`` output: each one), or an SAE
    suite config (its labels and ``sae`` entries)."""
    from perturb_lens.saes.format import CFG_FILE
    from perturb_lens.workflows.sae_suite import is_suite_file, load_suite_config

    out: dict[str, str] = {}
    for ref in refs:
        path = Path(ref)
        if path.is_file() and path.suffix in (".yaml", ".yml", ".toml") and is_suite_file(path):
            out |= {s.label: s.sae for s in load_suite_config(path).saes}
        elif path.is_dir() and not (path / CFG_FILE).is_file():
            subs = sorted(p for p in path.iterdir() if (p / CFG_FILE).is_file())
            if not subs:
                raise ValueError(
                    f"{path} holds no SAE folder (none with {CFG_FILE}): give SAE folders, a "
                    "`perturb-lens sae train` output folder, or an SAE suite config."
                )
            out |= {p.name: str(p) for p in subs}
        else:
            out[path.name if path.exists() else ref] = ref
    return out
