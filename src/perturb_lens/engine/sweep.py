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

Both scopes run one loop (:func:`_sweep_direction`) over a typed :class:`_SweepBatch` (the plan
bound to a clean batch): suffix passes over an (n, m) grid of rows per sequence, each measured by
:func:`_measure_pass`. A scope only says how one pass perturbs and continues
(:func:`_all_positions_pass`: n lengths x T positions; :func:`_single_positions_pass`: n
positions x L lengths).
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


@dataclass(frozen=True, eq=False)
class _SweepBatch:
    """A :class:`SweepPlan` bound to one clean batch: what every suffix pass of both scopes
    shares, built once per :func:`sweep` call (B sequences, T positions, L lengths, width d)."""

    model: LensModel
    clean: CleanRun  # the clean pass; x [B, T, d]
    plan: SweepPlan  # with rows_per_pass resolved (an int)
    read: str  # the downstream hook of l2/cos
    ref: _CleanOut  # clean-pass quantities the output metrics compare against
    next_tokens: Tensor  # [B, T] long: the next token, -1 at the last position
    lengths: Tensor  # [L] float32 (float64 for a float64 model)
    seqs: Tensor  # [B] long: sequence numbers in the whole run (seq_offset + row)
    first: int  # the first perturbed position: T - 1 under last-position, else 0

    @classmethod
    def build(
        cls, model: LensModel, clean: CleanRun, plan: SweepPlan, seq_offset: int
    ) -> _SweepBatch:
        """Resolve ``rows_per_pass`` and the read; the clean reference, next tokens, lengths."""
        b, t, _ = clean.x.shape
        if plan.rows_per_pass is None:
            plan = replace(plan, rows_per_pass=auto_rows_per_pass(model, t))
        nxt = torch.full((b, t), -1, dtype=torch.long, device=clean.tokens.device)
        nxt[:, :-1] = clean.tokens[:, 1:]
        wide = torch.promote_types(clean.x.dtype, torch.float32)  # float64 for a float64 model
        return cls(
            model=model,
            clean=clean,
            plan=plan,
            read=plan.read or model.default_read,
            ref=_CleanOut.build(model, clean, plan.metrics, plan.rows_per_logits),
            next_tokens=nxt,
            lengths=torch.tensor(list(plan.lengths), dtype=wide, device=clean.x.device),
            seqs=torch.arange(b) + seq_offset,
            first=plan.first_position(t),
        )

    @property
    def reads(self) -> list[str]:
        """The downstream hooks a suffix pass returns: the read, if a metric needs it."""
        return [self.read] if self.plan.needs_read else []

    def metrics(
        self, final: Tensor, i: int, sel: Tensor | None, pert_read: Tensor | None
    ) -> dict[str, Tensor]:
        """Metrics [n, m] of sequence i's perturbed rows ``final`` / ``pert_read`` [n, m, d]:
        all positions along m (``sel`` None), or positions ``sel`` [n] along n."""
        clean_read = self.clean.reads.get(self.read)
        if sel is None:
            ref, nxt = self.ref.select(i), self.next_tokens[i]
            clean_read = None if clean_read is None else clean_read[i].unsqueeze(0)
        else:
            ref, nxt = self.ref.select(i, sel), self.next_tokens[i, sel].unsqueeze(1)
            clean_read = None if clean_read is None else clean_read[i, sel].unsqueeze(1)
        f_c, logp_c, lse_c, u_c = ref
        rest, lin = self.ref.rest, self.ref.lin
        out = output_metrics(logp_c, self.model.unembed(final), rest, nxt) if rest else {}
        if lin is not None:
            out["kl"] = kl_linear(lse_c, u_c, f_c, lse_linear(final, *lin), final)
        if pert_read is not None and clean_read is not None:
            out.update(downstream_metrics(clean_read, pert_read, self.plan.metrics))
        return out


@dataclass(frozen=True, eq=False)
class _Pass:
    """One suffix pass on an (n, m) grid of rows per sequence: all-positions passes n lengths
    x m = T positions; single-position passes n positions x m = L lengths."""

    final: Tensor  # [B, n, m, d] final normed hidden state
    read: Tensor | None  # [B, n, m, d] downstream read; None when no metric needs it
    positions: Tensor | None  # [n] perturbed positions (single-position); None: all, along m
    lengths: Tensor  # [n] (all-positions) or [m] (single-position)

    def labels(self, j0: int, j1: int) -> tuple[np.ndarray | Tensor, Tensor]:
        """Position and length of the rows of grid rows ``j0:j1``, flat in row order."""
        m = self.final.shape[2]
        if self.positions is None:
            pos = np.tile(np.arange(m, dtype=np.int16), j1 - j0)
            return pos, self.lengths[j0:j1].repeat_interleave(m)
        pos = self.positions[j0:j1].to(torch.int16).repeat_interleave(m)
        return pos, self.lengths.repeat(j1 - j0)


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` chunks of ``range(n)``, ``size`` at a time."""
    return [(s, min(n, s + size)) for s in range(0, n, size)]


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
    sw = _SweepBatch.build(model, clean, plan, seq_offset)
    rows = _Rows()
    for name, dirs in directions.items():
        if dirs.shape != clean.x.shape:
            raise ValueError(
                f"Directions {name!r} have shape {tuple(dirs.shape)}, expected {(b, t, d)}."
            )
        _sweep_direction(sw, name, dirs.to(clean.x.device, sw.lengths.dtype), rows)
    df = rows.frame()
    norms = {k: v.double().norm(dim=-1).cpu().numpy() for k, v in directions.items()}  # [B, T]
    if any(np.abs(n[:, sw.first :] - 1).max() > 1e-4 for n in norms.values()):
        df["size"] = _perturbation_sizes(df, norms, seq_offset)
    df["direction"] = pd.Categorical(df["direction"], categories=list(directions))
    bad = _nonfinite_rows(df, plan.metrics, t)
    if plan.nonfinite == "record":
        df[NONFINITE] = bad
    elif bad.any():
        raise _nonfinite_error(df, bad, clean.x, plan, seq_offset)
    return df


def _sweep_direction(sw: _SweepBatch, name: str, dirs: Tensor, rows: _Rows) -> None:
    """Every row of one direction ``dirs`` [B, T, d]: suffix passes of about ``rows_per_pass``
    rows over the scope's (n, m) grid, each measured into ``rows``."""
    b, t, _ = sw.clean.x.shape
    if sw.plan.scope == "all-positions":
        n, m, one_pass = len(sw.lengths), t, _all_positions_pass
    else:
        n, m, one_pass = t - sw.first, len(sw.lengths), _single_positions_pass
    for o0, o1 in _spans(n, max(1, sw.plan.rows_per_pass // (b * m))):
        _measure_pass(sw, name, one_pass(sw, dirs, o0, o1), rows)


def _all_positions_pass(sw: _SweepBatch, dirs: Tensor, k0: int, k1: int) -> _Pass:
    """Lengths ``k0:k1`` as k copies of each sequence, every position pushed along its own
    direction at once (``continue_all`` on [B, k, T, d])."""
    a = sw.lengths[k0:k1]  # [k]
    step = a.view(1, -1, 1, 1) * dirs.unsqueeze(1)  # [B, k, T, d]
    x_new = sw.clean.x.unsqueeze(1) + step.to(sw.clean.x.dtype)
    final, reads = sw.model.continue_all(sw.clean, x_new, reads=sw.reads)
    return _Pass(final, reads[sw.read] if sw.plan.needs_read else None, None, a)


def _single_positions_pass(sw: _SweepBatch, dirs: Tensor, p0: int, p1: int) -> _Pass:
    """Perturbed positions ``p0:p1`` (counted from the first), each alone at every length: one
    row per (position, length) attending to its sequence's clean keys (``continue_at``)."""
    b, t, d = sw.clean.x.shape
    n_len = len(sw.lengths)
    pos = torch.arange(sw.first, t, device=sw.clean.x.device)[p0:p1]  # [P]
    n_p = len(pos)
    step = sw.lengths.view(1, 1, -1, 1) * dirs[:, pos].unsqueeze(2)  # [B, P, L, d]
    x_new = sw.clean.x[:, pos].unsqueeze(2) + step.to(sw.clean.x.dtype)
    pos_rows = pos.view(1, -1, 1).expand(b, n_p, n_len).reshape(b, -1)
    final, reads = sw.model.continue_at(
        sw.clean, x_new.reshape(b, n_p * n_len, d), pos_rows, reads=sw.reads
    )
    grid = (b, n_p, n_len, d)
    read = reads[sw.read].view(grid) if sw.plan.needs_read else None
    return _Pass(final.view(grid), read, pos, sw.lengths)


def _measure_pass(sw: _SweepBatch, name: str, out: _Pass, rows: _Rows) -> None:
    """Metrics of a pass's rows, ``rows_per_logits`` rows per unembedding chunk, into ``rows``."""
    b, n, m, _ = out.final.shape
    for i in range(b):
        for j0, j1 in _spans(n, max(1, sw.plan.rows_per_logits // m)):
            sel = None if out.positions is None else out.positions[j0:j1]
            pert_read = None if out.read is None else out.read[i, j0:j1]
            metrics = sw.metrics(out.final[i, j0:j1], i, sel, pert_read)
            pos, length = out.labels(j0, j1)
            size = (j1 - j0) * m
            rows.add(
                seq=np.full(size, int(sw.seqs[i]), dtype=np.int32),
                pos=pos,
                direction=np.full(size, name, dtype=object),
                length=length,
                **metrics,
            )


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
