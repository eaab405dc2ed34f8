"""Activation statistics at a hook: mean, covariance, Cholesky factor and norm quantiles.

The cov-random directions draw from ``N(mean, cov + jitter * I)`` fitted on the real (non-BOS)
activations of the dataset; the published code used ``torch.cov`` (denominator ``N - 1``) plus
0.01 on the diagonal, and so do we. Moments are accumulated in float64 with Chan's parallel
update (per-chunk mean and centered scatter), so a large common mean (GPT-2's residual stream has
norm ~100) costs no precision, and batches can come in any size.

    stats = fit_stats(batches, hook="blocks.6.hook_resid_pre", frame="centered")
    s = sample_gaussian(stats, 1000, torch.Generator().manual_seed(0))  # [1000, d] float32
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm.auto import tqdm

from perturb_lens.common.files import regular_file
from perturb_lens.common.writes import atomic_write
from perturb_lens.statistics.fit_size import (  # noqa: F401  (re-exported: the fit-size API lives there)
    DEFAULT_FIT_PER_DIM,
    MIN_FIT_PER_DIM,
    STATS_FORMAT,
    fit_size,
    fit_size_warning,
)

if TYPE_CHECKING:
    from perturb_lens.models.base import LensModel

NORM_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
DEFAULT_JITTER = 0.01  # the published choice: 0.01 added to the covariance diagonal
_FORMAT = STATS_FORMAT
_FORMAT_VERSION = 1


class StatsFileError(ValueError):
    """A statistics file that cannot be read: damaged, truncated, or not one."""


@dataclass(eq=False)
class ActivationStats:
    """Moments of real activations at ``hook`` in ``frame`` (all tensors float64, on CPU).

    ``chol`` is the lower Cholesky factor of ``cov + jitter * I``: the Gaussian that the cov-random
    directions sample from. ``norm_quantiles`` maps q -> quantile of the per-token L2 norms (exact
    up to ``StatsAccumulator.max_norms`` tokens, from a uniform sample beyond); ``mean_norm`` is
    exact.
    """

    mean: Tensor  # [d]
    cov: Tensor  # [d, d], denominator n_tokens - 1
    chol: Tensor  # [d, d], lower, chol @ chol.T == cov + jitter * I
    norm_quantiles: dict[float, float]
    mean_norm: float
    n_tokens: int
    hook: str = ""
    frame: str = ""
    jitter: float = DEFAULT_JITTER

    @property
    def d_model(self) -> int:
        return int(self.mean.shape[0])

    @property
    def median_norm(self) -> float:
        """Median per-token L2 norm (the published isotropic-difference sigma: 121 at GPT-2 L6)."""
        return self.norm_quantiles[0.5]

    @classmethod
    def from_moments(
        cls,
        mean: Tensor,
        cov: Tensor,
        *,
        norm_quantiles: dict[float, float],
        mean_norm: float,
        n_tokens: int,
        hook: str = "",
        frame: str = "",
        jitter: float = DEFAULT_JITTER,
    ) -> ActivationStats:
        """Build stats from a mean [d] and covariance [d, d]; computes the Cholesky factor."""
        mean = mean.detach().to("cpu", torch.float64)
        cov = cov.detach().to("cpu", torch.float64)
        d = mean.shape[0]
        if cov.shape != (d, d):
            raise ValueError(
                f"cov has shape {tuple(cov.shape)}, expected ({d}, {d}) for mean [{d}]"
            )
        cov = (cov + cov.T) / 2
        chol, info = torch.linalg.cholesky_ex(cov + jitter * torch.eye(d, dtype=torch.float64))
        if int(info) != 0:
            raise ValueError(
                f"cov + {jitter} * I is not positive definite (the centered frame alone makes the "
                "covariance rank d - 1): use jitter > 0 (published: 0.01) or more tokens."
            )
        return cls(
            mean=mean,
            cov=cov,
            chol=chol,
            norm_quantiles={float(q): float(v) for q, v in norm_quantiles.items()},
            mean_norm=float(mean_norm),
            n_tokens=int(n_tokens),
            hook=hook,
            frame=frame,
            jitter=float(jitter),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to a safetensors file (metadata as JSON), atomically: a reader never sees half."""
        path = Path(path)
        meta = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "hook": self.hook,
            "frame": self.frame,
            "jitter": self.jitter,
            "n_tokens": self.n_tokens,
            "mean_norm": self.mean_norm,
            "norm_quantiles": [[q, v] for q, v in sorted(self.norm_quantiles.items())],
        }
        tensors = {
            name: getattr(self, name).detach().to("cpu").contiguous()
            for name in ("mean", "cov", "chol")
        }

        data = save_safetensors(tensors, metadata={_FORMAT: json.dumps(meta)})
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(data))  # a full disk says so and changes nothing
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ActivationStats:
        """Read a file written by :meth:`save`; a damaged or foreign file raises
        :class:`StatsFileError` naming it."""
        try:
            return cls._load(path)
        except (StatsFileError, FileNotFoundError):
            raise
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise StatsFileError(
                f"{path} is not a readable activation-stats file ({type(e).__name__}: {e}): "
                "damaged or truncated; delete it to fit the statistics again."
            ) from e

    @classmethod
    def _load(cls, path: str | os.PathLike[str]) -> ActivationStats:
        with safe_open(str(regular_file(path, "an activation-stats file")), framework="pt") as f:
            raw = (f.metadata() or {}).get(_FORMAT)
            if raw is None:
                raise StatsFileError(
                    f"{path} is not an activation-stats file (no '{_FORMAT}' metadata)"
                )
            meta = json.loads(raw)
            if meta.get("version") != _FORMAT_VERSION:
                raise StatsFileError(
                    f"{path} has activation-stats format version {meta.get('version')}; this "
                    f"perturb-lens reads version {_FORMAT_VERSION}: refit the statistics."
                )
            t = {name: f.get_tensor(name) for name in ("mean", "cov", "chol")}
        d = t["mean"].shape[0] if t["mean"].ndim == 1 else -1
        if d < 1 or any(t[k].shape != (d, d) for k in ("cov", "chol")):
            raise StatsFileError(
                f"{path} holds tensors of inconsistent shapes "
                f"({ {k: tuple(v.shape) for k, v in t.items()} }): damaged; delete it to refit."
            )
        return cls(
            **t,
            norm_quantiles={float(q): float(v) for q, v in meta["norm_quantiles"]},
            mean_norm=float(meta["mean_norm"]),
            n_tokens=int(meta["n_tokens"]),
            hook=meta["hook"],
            frame=meta["frame"],
            jitter=float(meta["jitter"]),
        )


class StatsAccumulator:
    """Streaming float64 mean/covariance (Chan's parallel merge) and per-token norms.

    ``max_norms`` norms are kept exactly (the published 16,000 x 127 tokens fit); beyond that a
    uniform random sample of that size (bottom-k of random keys, seeded by ``seed``) gives the
    quantiles. Moments accumulate on the first batch's device when it is CUDA, else on CPU.
    """

    def __init__(
        self, d_model: int, *, max_norms: int = 1 << 22, seed: int = 0, chunk_rows: int = 1 << 16
    ) -> None:
        self.d_model = int(d_model)
        self.max_norms = int(max_norms)
        self.chunk_rows = int(chunk_rows)
        self.n = 0
        self.mean: Tensor | None = None  # [d] float64
        self.m2: Tensor | None = None  # [d, d] float64, centered scatter sum (x - mean)(x - mean)^T
        self.norm_sum = 0.0
        self._norms: list[Tensor] = []  # CPU float64 chunks
        self._keys: list[Tensor] | None = None  # random keys once sampling (n > max_norms)
        self._n_kept = 0
        self._key_gen = torch.Generator().manual_seed(seed)
        self._batches = 0
        self._sequences = 0

    def update(self, acts: Tensor, exclude_first_position: bool = True) -> None:
        """Add activations [B, T, d] (sequences) or [N, d] (tokens).

        ``exclude_first_position`` drops position 0 of every sequence (BOS) for [B, T, d] input;
        [N, d] input is taken as the tokens to use. Raises ValueError naming the (sequence,
        position) of the first NaN/inf.
        """
        if acts.ndim not in (2, 3) or acts.shape[-1] != self.d_model:
            raise ValueError(
                f"update() takes activations [B, T, {self.d_model}] or [N, {self.d_model}]; "
                f"got shape {tuple(acts.shape)}"
            )
        self._check_finite(acts)
        self._batches += 1
        self._sequences += acts.shape[0]
        if acts.ndim == 3 and exclude_first_position:
            acts = acts[:, 1:]
        x = acts.detach().reshape(-1, self.d_model)
        if x.shape[0] == 0:
            return
        if self.mean is None:
            device = x.device if x.device.type == "cuda" else torch.device("cpu")
            self.mean = torch.zeros(self.d_model, dtype=torch.float64, device=device)
            self.m2 = torch.zeros(self.d_model, self.d_model, dtype=torch.float64, device=device)
        for start in range(0, x.shape[0], self.chunk_rows):
            self._merge(x[start : start + self.chunk_rows].to(self.mean.device, torch.float64))

    def _check_finite(self, acts: Tensor) -> None:
        bad = ~torch.isfinite(acts)
        if not bool(bad.any()):
            return
        first = [int(i) for i in bad.nonzero()[0]]
        value = float(acts[tuple(first)])
        kind = "NaN" if value != value else "inf"
        overall = self._sequences + first[0]
        where = (
            f"sequence {first[0]} (sequence {overall} overall), position {first[1]}"
            if acts.ndim == 3
            else f"row {first[0]} (row {overall} overall)"
        )
        raise ValueError(
            f"Non-finite activation ({kind}) at {where}, coordinate {first[-1]}, of batch "
            f"{self._batches} (0-based); {int(bad.sum())} non-finite values in this batch. Check "
            "the model's dtype (fp16 overflow) and the input tokens."
        )

    def _merge(self, xb: Tensor) -> None:
        """Chan et al.: combine (n, mean, M2) with a chunk's own mean and centered scatter."""
        assert self.mean is not None and self.m2 is not None
        nb = xb.shape[0]
        mb = xb.mean(0)
        xc = xb - mb
        delta = mb - self.mean
        n = self.n + nb
        self.m2 += xc.T @ xc + torch.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n
        norms = xb.norm(dim=1).cpu()
        self.norm_sum += float(norms.sum())
        self._add_norms(norms)

    def _add_norms(self, norms: Tensor) -> None:
        self._norms.append(norms)
        self._n_kept += norms.shape[0]
        if self._keys is None and self._n_kept > self.max_norms:  # switch to sampling
            self._keys = [self._random_keys(len(c)) for c in self._norms]
        elif self._keys is not None:
            self._keys.append(self._random_keys(len(norms)))
        if self._keys is not None and self._n_kept > 2 * self.max_norms:
            self._shrink()

    def _random_keys(self, n: int) -> Tensor:
        return torch.rand(n, generator=self._key_gen, dtype=torch.float64)

    def _shrink(self) -> None:
        """Keep the max_norms norms with the smallest keys: a uniform sample without replacement."""
        assert self._keys is not None
        keys, norms = torch.cat(self._keys), torch.cat(self._norms)
        keep = torch.topk(keys, self.max_norms, largest=False).indices
        self._keys, self._norms, self._n_kept = [keys[keep]], [norms[keep]], self.max_norms

    def finalize(
        self, hook: str = "", frame: str = "", jitter: float = DEFAULT_JITTER
    ) -> ActivationStats:
        """Covariance with denominator N - 1 (torch.cov's default, as published)."""
        if self.n == 0 or self.mean is None or self.m2 is None:
            raise ValueError(
                "No activations were accumulated: call update() with activations first (with "
                "exclude_first_position=True, sequences of length 1 contribute nothing)."
            )
        if self.n < 2:
            raise ValueError("A covariance needs at least 2 tokens; only 1 was accumulated.")
        if self._keys is not None and self._n_kept > self.max_norms:
            self._shrink()
        norms = torch.cat(self._norms).numpy()
        qs = np.quantile(norms, NORM_QUANTILES)
        return ActivationStats.from_moments(
            self.mean,
            self.m2 / (self.n - 1),
            norm_quantiles=dict(zip(NORM_QUANTILES, (float(v) for v in qs), strict=True)),
            mean_norm=self.norm_sum / self.n,
            n_tokens=self.n,
            hook=hook,
            frame=frame,
            jitter=jitter,
        )


def fit_stats(
    batches: Iterable[Tensor],
    *,
    hook: str = "",
    frame: str = "",
    exclude_first_position: bool = True,
    jitter: float = DEFAULT_JITTER,
    seed: int = 0,
    pool: PoolSampler | None = None,
) -> ActivationStats:
    """Fit :class:`ActivationStats` on activation batches ([B, T, d] or [N, d] each); ``pool``
    also keeps its sample of the rows used (``seed``: of the norm sample, for huge datasets)."""
    acc: StatsAccumulator | None = None
    for acts in batches:
        if acc is None:
            acc = StatsAccumulator(acts.shape[-1], seed=seed)
        take_batch(acc, pool, acts, exclude_first_position)
    if acc is None:
        raise ValueError("fit_stats got no batches: pass at least one activation tensor.")
    return acc.finalize(hook=hook, frame=frame, jitter=jitter)


def take_batch(
    acc: StatsAccumulator, pool: PoolSampler | None, acts: Tensor, exclude_first_position: bool
) -> None:
    """One batch of activations into a fit: the accumulator, and the pool's sample of its rows."""
    acc.update(acts, exclude_first_position=exclude_first_position)
    if pool is not None:
        rows = acts[:, 1:] if acts.ndim == 3 and exclude_first_position else acts
        pool.take(rows.reshape(-1, acts.shape[-1]))


class PoolSampler:
    """A seeded uniform sample, without replacement, of ``size`` of ``n_rows`` activation rows,
    taken as the rows stream past in order (the real-activation pool of a run)."""

    def __init__(self, n_rows: int, size: int, generator: torch.Generator) -> None:
        self.chosen = torch.randperm(n_rows, generator=generator)[: min(size, n_rows)].sort().values
        self.seen = 0
        self.parts: list[Tensor] = []

    def take(self, rows: Tensor) -> None:
        """Keep the chosen ones among the next ``rows`` [m, d] (float32, on CPU)."""
        lo, hi = self.seen, self.seen + rows.shape[0]
        idx = self.chosen[(self.chosen >= lo) & (self.chosen < hi)] - lo
        self.parts.append(rows[idx.to(rows.device)].float().cpu())
        self.seen = hi

    def sample(self) -> Tensor:
        """The pool [size, d] (float32), in stream order."""
        return torch.cat(self.parts)


def hook_activations(
    model: LensModel, tokens: Tensor, hook: str, batch_seqs: int, *, progress: bool = True
) -> Iterator[Tensor]:
    """Activations [b, T, d] at ``hook`` of the token rows, ``batch_seqs`` rows at a time."""
    for s0 in tqdm(
        range(0, tokens.shape[0], batch_seqs), desc="Activation statistics", disable=not progress
    ):
        yield model.run_to_hook(tokens[s0 : s0 + batch_seqs].to(model.device), hook)


def sample_gaussian(stats: ActivationStats, n: int, generator: torch.Generator) -> Tensor:
    """``n`` samples [n, d] float32 from ``N(mean, cov + jitter * I)``, drawn in float64 on the
    generator's device."""
    device = generator.device
    z = torch.randn(n, stats.d_model, generator=generator, dtype=torch.float64, device=device)
    return (stats.mean.to(device) + z @ stats.chol.to(device).T).float()
