"""The measurement: perturb ``x`` at a hook along per-token directions by each length; measure.

The engine knows nothing of experiments: it gets a clean pass, unit directions per token and a
length grid, and returns one row per (sequence, position, direction, length).

Scopes:

- ``all-positions`` (the published code's choice): every position of a sequence is perturbed at
  once, each along its own direction; many lengths go through one suffix pass as copies.
- ``single-position``: each (sequence, position) is perturbed alone and measured there, so no
  perturbation leaks into another's measurement. Rows attend to the clean keys/values of their
  sequence (``LensModel.continue_at``): one token's compute per row.
- ``last-position``: only the final position (plateau and stable-region experiments).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from perturb_lens.config.schema import NONFINITE_POLICIES, SCOPES
from perturb_lens.engine.softmax import kl_linear, lse_linear, softmax_moment
from perturb_lens.metrics.builtin import (
    NONFINITE,
    at_least_float32,
    downstream_metrics,
    get_metric,
    output_metrics,
)
from perturb_lens.models.base import CleanRun, LensModel


class NonFiniteMetricError(FloatingPointError):
    """A perturbed row's metric is NaN or inf (and the config did not ask to record such rows)."""


@dataclass
class SweepPlan:
    """What to measure: hook, scope, lengths, metrics and chunk sizes."""

    hook: str
    lengths: Sequence[float]
    scope: str = "all-positions"
    metrics: Sequence[str] = ("kl", "l2")
    read: str | None = None  # downstream hook for l2/cos; None = the last resid_post
    rows_per_pass: int | None = None  # token rows per suffix pass; None: auto_rows_per_pass
    rows_per_logits: int = 512  # rows per unembedding chunk ([rows, vocab] float32 temporaries)
    nonfinite: str = "error"  # NaN/inf metrics: refuse the shard, or "record" them (flagged)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"Unknown scope {self.scope!r}; choose from {list(SCOPES)}.")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Unknown nonfinite {self.nonfinite!r}; choose from {list(NONFINITE_POLICIES)}."
            )

    @property
    def needs_read(self) -> bool:
        return any(not get_metric(m).needs_logits for m in self.metrics)

    def first_position(self, seq_len: int) -> int:
        """The first perturbed (and measured) position: the last one under ``last-position``."""
        return seq_len - 1 if self.scope == "last-position" else 0


CPU_ROWS_PER_PASS = 4096  # large enough for near-peak matrix products, small in memory


def rows_for_memory(
    free_bytes: int, bytes_per_row: int, *, fraction: float = 0.5, lo: int = 256, hi: int = 65536
) -> int:
    """Rows per pass that fit ``fraction`` of ``free_bytes``: a multiple of 256 in [lo, hi]."""
    rows = int(free_bytes * fraction) // max(1, bytes_per_row)
    return max(lo, min(hi, rows // 256 * 256))


def auto_rows_per_pass(model: LensModel, seq_len: int, free_bytes: int | None = None) -> int:
    """Rows per suffix pass: 4096 on CPU; on a GPU, from its free memory (``free_bytes``, default
    ``torch.cuda.mem_get_info``) and the float32 activations one row holds in flight (residual,
    norms, q/k/v, MLP hidden state, attention scores over ``seq_len`` keys; doubled for the
    allocator and temporaries)."""
    if free_bytes is None:
        if model.device.type != "cuda":
            return CPU_ROWS_PER_PASS
        free_bytes = torch.cuda.mem_get_info(model.device)[0]
    s = model.spec
    per_row = 2 * 4 * (8 * s.d_model + 3 * s.d_mlp + 3 * s.n_heads * (seq_len + 1))
    return rows_for_memory(free_bytes, per_row)


def clean_pass(
    model: LensModel, tokens: Tensor, plan: SweepPlan, *, seq_offset: int = 0
) -> CleanRun:
    """The clean pass the sweep continues from (keys/values kept for the single-row scopes).

    Non-finite activations raise, naming the sequence (``seq_offset`` + row) and position."""
    reads = [plan.read or model.default_read] if plan.needs_read else []
    clean = model.run_clean(tokens, plan.hook, reads=reads, keep_kv=plan.scope != "all-positions")
    bad = ~torch.isfinite(clean.x).all(-1)
    if bad.any():
        seq, pos = (int(v) for v in bad.nonzero()[0])
        raise FloatingPointError(
            f"Non-finite activation (NaN/inf) at {plan.hook}, sequence {seq_offset + seq}, "
            f"position {pos}: check the model weights (dtype overflow? try dtype=float32) and "
            "the input tokens."
        )
    return clean


@dataclass
class _CleanOut:
    """Clean-pass quantities the output metrics compare against, computed once per batch."""

    final: Tensor  # [B, T, d] float32
    logp: Tensor | None  # [B, T, V] float32 log-probs (metrics that need the full distribution)
    lse: Tensor | None  # [B, T] float64 log-sum-exp (fast KL)
    u: Tensor | None  # [B, T, d] float64, W_U^T p_clean (fast KL)
    rest: list[str]  # output metrics computed from full distributions
    lin: tuple[Tensor, Tensor | None] | None  # (W_U, b_U) when KL goes the fast way

    @classmethod
    def build(
        cls, model: LensModel, clean: CleanRun, metrics: Sequence[str], rows: int
    ) -> _CleanOut:
        """Only what the metrics need: nothing from the unembedding for downstream-only metrics;
        for fast KL, log-sum-exps and ``W_U^T p`` computed blockwise, ``rows`` at a time."""
        lin = model.linear_unembedding() if "kl" in metrics else None
        rest = [m for m in metrics if get_metric(m).needs_logits and not (m == "kl" and lin)]
        logp = torch.log_softmax(model.unembed(clean.final), dim=-1) if rest else None
        lse = u = None
        if lin is not None:
            flat = clean.final.reshape(-1, clean.final.shape[-1])
            parts = [softmax_moment(flat[r0 : r0 + rows], *lin) for r0 in range(0, len(flat), rows)]
            lse = torch.cat([p[0] for p in parts]).reshape(clean.final.shape[:-1])
            u = torch.cat([p[1] for p in parts]).reshape(*clean.final.shape[:-1], -1)
        return cls(at_least_float32(clean.final), logp, lse, u, rest, lin)

    def select(self, i: int, sel: Tensor | None = None) -> list[Tensor | None]:
        """Sequence i (all positions, with a leading broadcast axis) or positions ``sel`` of it
        (with a trailing broadcast axis for the lengths)."""
        out = []
        for v in (self.final, self.logp, self.lse, self.u):
            if v is None:
                out.append(None)
            elif sel is None:
                out.append(v[i].unsqueeze(0))
            else:
                out.append(v[i, sel].unsqueeze(1))
        return out


class _Rows:
    """Column buffers for the output rows."""

    def __init__(self) -> None:
        self.cols: dict[str, list[np.ndarray]] = {}

    def add(self, **cols: Tensor | np.ndarray) -> None:
        for k, v in cols.items():
            arr = v.detach().cpu().numpy() if isinstance(v, Tensor) else v
            self.cols.setdefault(k, []).append(arr.reshape(-1))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({k: np.concatenate(v) for k, v in self.cols.items()})


def sweep(
    model: LensModel,
    clean: CleanRun,
    directions: Mapping[str, Tensor],
    plan: SweepPlan,
    *,
    seq_offset: int = 0,
) -> pd.DataFrame:
    """Rows (seq, pos, direction, length, metrics...) for every direction [B, T, d] and length."""
    b, t, d = clean.x.shape
    if plan.rows_per_pass is None:
        plan = replace(plan, rows_per_pass=auto_rows_per_pass(model, t))
    read = plan.read or model.default_read
    ref = _CleanOut.build(model, clean, plan.metrics, plan.rows_per_logits)
    nxt = torch.full((b, t), -1, dtype=torch.long, device=clean.tokens.device)
    nxt[:, :-1] = clean.tokens[:, 1:]
    wide = torch.promote_types(clean.x.dtype, torch.float32)  # float64 for a float64 model
    alphas = torch.tensor(list(plan.lengths), dtype=wide, device=clean.x.device)
    rows = _Rows()
    seqs = torch.arange(b) + seq_offset
    first = plan.first_position(t)
    for name, dirs in directions.items():
        if dirs.shape != clean.x.shape:
            raise ValueError(
                f"Directions {name!r} have shape {tuple(dirs.shape)}, expected {(b, t, d)}."
            )
        dirs = dirs.to(clean.x.device, wide)
        if plan.scope == "all-positions":
            _all_positions(model, clean, dirs, alphas, plan, read, ref, nxt, rows, seqs, name)
        else:
            _single_positions(
                model, clean, dirs, alphas, plan, read, ref, nxt, rows, seqs, name, first
            )
    df = rows.frame()
    norms = {k: v.double().norm(dim=-1).cpu().numpy() for k, v in directions.items()}  # [B, T]
    if any(np.abs(n[:, first:] - 1).max() > 1e-4 for n in norms.values()):
        df["size"] = _perturbation_sizes(df, norms, seq_offset)
    df["direction"] = pd.Categorical(df["direction"], categories=list(directions))
    bad = _nonfinite_rows(df, plan.metrics, t)
    if plan.nonfinite == "record":
        df[NONFINITE] = bad
    elif bad.any():
        raise _nonfinite_error(df, bad, clean.x, plan, seq_offset)
    return df


def _nonfinite_rows(df: pd.DataFrame, metrics: Sequence[str], seq_len: int) -> np.ndarray:
    """Rows with a NaN/inf metric (``dce`` is NaN by definition at the last position: no next
    token there)."""
    bad = np.zeros(len(df), dtype=bool)
    for m in metrics:
        if m not in df.columns or df[m].dtype.kind != "f":
            continue
        wrong = ~np.isfinite(df[m].to_numpy())
        if m == "dce":
            wrong &= df["pos"].to_numpy() < seq_len - 1
        bad |= wrong
    return bad


def _nonfinite_error(
    df: pd.DataFrame, bad: np.ndarray, x: Tensor, plan: SweepPlan, seq_offset: int
) -> NonFiniteMetricError:
    """The error for the first non-finite row: where, the values, the likely cause, the fix."""
    row = df[bad].iloc[0]
    seq, pos, length = int(row["seq"]), int(row["pos"]), float(row["length"])
    values = ", ".join(
        f"{m}={row[m]}" for m in plan.metrics if m in df.columns and df[m].dtype.kind == "f"
    )
    norm = float(x[seq - seq_offset, pos].double().norm())
    causes = [
        f"the length {length:.4g} is {length / norm:.3g}x the activation norm there ({norm:.4g}): "
        "far beyond it the arithmetic overflows; use shorter lengths"
    ]
    if x.dtype in (torch.float16, torch.bfloat16):
        causes.append(
            f"half precision ({str(x.dtype).removeprefix('torch.')}) overflows far sooner: "
            "use dtype=float32"
        )
    return NonFiniteMetricError(
        f"Non-finite metric (NaN/inf) in {int(bad.sum())} of {len(df)} rows, first at direction "
        f"{row['direction']!r}, length {length:.4g}, sequence {seq}, position {pos} ({values}). "
        f"Likely cause: {'; or '.join(causes)}. Or set nonfinite=record to keep such rows, "
        f"flagged in column {NONFINITE!r} and left out of the summary means."
    )


def _perturbation_sizes(
    df: pd.DataFrame, norms: Mapping[str, np.ndarray], seq_offset: int
) -> np.ndarray:
    """||x' - x|| per row (length x direction norm), for runs with non-unit (scaled) directions."""
    size = np.empty(len(df), dtype=np.float32)
    seq = df["seq"].to_numpy() - seq_offset
    pos = df["pos"].to_numpy().astype(np.int64)
    for name, n in norms.items():
        m = (df["direction"] == name).to_numpy()
        size[m] = df["length"].to_numpy()[m] * n[seq[m], pos[m]]
    return size


def _metrics_block(
    model: LensModel,
    plan: SweepPlan,
    final: Tensor,
    ref: _CleanOut,
    clean_sel: list[Tensor | None],
    nxt: Tensor,
    pert_read: Tensor | None,
    clean_read: Tensor | None,
) -> dict[str, Tensor]:
    """Metrics for final [..., d] against the broadcastable clean selection / reads."""
    f_c, logp_c, lse_c, u_c = clean_sel
    out = output_metrics(logp_c, model.unembed(final), ref.rest, nxt) if ref.rest else {}
    if ref.lin is not None:
        out["kl"] = kl_linear(lse_c, u_c, f_c, lse_linear(final, *ref.lin), final)
    if pert_read is not None and clean_read is not None:
        out.update(downstream_metrics(clean_read, pert_read, plan.metrics))
    return out


def _all_positions(model, clean, dirs, alphas, plan, read, ref, nxt, rows, seqs, name) -> None:
    b, t, _ = clean.x.shape
    n_len = len(alphas)
    k_chunk = max(1, plan.rows_per_pass // (b * t))
    per_logits = max(1, plan.rows_per_logits // t)
    clean_read = clean.reads.get(read)
    for k0 in range(0, n_len, k_chunk):
        a = alphas[k0 : k0 + k_chunk]  # [k]
        step = a.view(1, -1, 1, 1) * dirs.unsqueeze(1)
        x_new = clean.x.unsqueeze(1) + step.to(clean.x.dtype)
        final, reads = model.continue_all(clean, x_new, reads=[read] if plan.needs_read else [])
        k = len(a)
        for i in range(b):
            for j0 in range(0, k, per_logits):
                j1 = min(k, j0 + per_logits)
                pr = reads[read][i, j0:j1] if plan.needs_read else None
                cr = clean_read[i].unsqueeze(0) if clean_read is not None else None
                m = _metrics_block(model, plan, final[i, j0:j1], ref, ref.select(i), nxt[i], pr, cr)
                kk = j1 - j0
                rows.add(
                    seq=np.full(kk * t, int(seqs[i]), dtype=np.int32),
                    pos=np.tile(np.arange(t, dtype=np.int16), kk),
                    direction=np.full(kk * t, name, dtype=object),
                    length=a[j0:j1].repeat_interleave(t),
                    **m,
                )


def _single_positions(
    model, clean, dirs, alphas, plan, read, ref, nxt, rows, seqs, name, first
) -> None:
    b, t, d = clean.x.shape
    n_len = len(alphas)
    positions = torch.arange(first, t, device=clean.x.device)
    p_chunk = max(1, plan.rows_per_pass // (b * n_len))
    per_logits = max(1, plan.rows_per_logits // n_len)
    clean_read = clean.reads.get(read)
    for p0 in range(0, len(positions), p_chunk):
        pos = positions[p0 : p0 + p_chunk]  # [P]
        n_p = len(pos)
        step = alphas.view(1, 1, -1, 1) * dirs[:, pos].unsqueeze(2)  # [B, P, L, d]
        x_new = clean.x[:, pos].unsqueeze(2) + step.to(clean.x.dtype)
        pos_rows = pos.view(1, -1, 1).expand(b, n_p, n_len).reshape(b, -1)
        final, reads = model.continue_at(
            clean,
            x_new.reshape(b, n_p * n_len, d),
            pos_rows,
            reads=[read] if plan.needs_read else [],
        )
        final = final.view(b, n_p, n_len, d)
        for i in range(b):
            for j0 in range(0, n_p, per_logits):
                j1 = min(n_p, j0 + per_logits)
                sel = pos[j0:j1]
                pr = reads[read].view(b, n_p, n_len, d)[i, j0:j1] if plan.needs_read else None
                cr = clean_read[i, sel].unsqueeze(1) if clean_read is not None else None
                m = _metrics_block(
                    model,
                    plan,
                    final[i, j0:j1],
                    ref,
                    ref.select(i, sel),
                    nxt[i, sel].unsqueeze(1),
                    pr,
                    cr,
                )
                kk = j1 - j0
                rows.add(
                    seq=np.full(kk * n_len, int(seqs[i]), dtype=np.int32),
                    pos=sel.to(torch.int16).repeat_interleave(n_len),
                    direction=np.full(kk * n_len, name, dtype=object),
                    length=alphas.repeat(kk),
                    **m,
                )
