"""Activations for SAE training, cached on disk in chunks and streamed back shuffled.

The cache is computed through the model's prefix only (:meth:`LensModel.run_to_hook`: no later
layers, no logits). Each chunk is one safetensors file ``chunk_<i>.safetensors`` holding, for
``batch_seqs`` token rows:

- ``x`` [n, d]: the training tokens, in the cache's dtype (``float32``, or ``bfloat16`` at half
  the disk; training upcasts to float32);
- ``bos`` [n_bos, d] and ``outlier`` [n_out, d] (float32): the tokens kept out of training, the
  BOS position (an outlier of ~25,000 norm against ~160 at SmolLM2's layer 15) and tokens whose
  norm exceeds ``outlier_factor`` times the median non-BOS norm of their chunk (the chunk's own
  median keeps the rule stateless, so an interrupted cache resumes chunk by chunk).

``meta.json`` records the hook, model source, token hash and settings (a cache of other tokens is
refused) and, once every chunk is written, the per-chunk token counts. A shuffled pass reads the
chunks in a seeded random order, ``buffer_chunks`` at a time, permutes the tokens of each buffer
and cuts the concatenated order into batches: every token is visited exactly once per pass, RAM
holds a few chunks, and the token count is bounded by disk only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Protocol

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm.auto import tqdm

from perturb_lens.common.files import load_json
from perturb_lens.common.writes import atomic_write, atomic_write_json
from perturb_lens.models.base import LensModel

CacheDtype = Literal["float32", "bfloat16"]
FLAGGED = ("bos", "outlier")  # token groups kept out of training, evaluated apart


def atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    """Write ``tensors`` as one safetensors file, all or nothing."""
    data = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
    atomic_write(path, lambda f: f.write(data))


class ActivationSource(Protocol):
    """Training tokens an SAE streams: a count and seeded shuffled passes over them."""

    @property
    def n_tokens(self) -> int: ...

    def batches(self, size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
        """Batches [<= size, d] (float32) of one shuffled pass, from batch ``start`` on."""
        ...

    def sample(self, n: int, seed: int) -> Tensor:
        """About ``n`` tokens [m, d] drawn without replacement (init and resampling)."""
        ...


def split_flagged(x: Tensor, *, skip_bos: bool, outlier_factor: float | None) -> dict[str, Tensor]:
    """Split activations [B, T, d] into ``x`` (training tokens), ``bos`` and ``outlier`` [n, d]."""
    first = 1 if skip_bos else 0
    body = x[:, first:].reshape(-1, x.shape[-1])
    norms = body.float().norm(dim=-1)
    out = torch.zeros_like(norms, dtype=torch.bool)
    if outlier_factor is not None and norms.numel():
        out = norms > outlier_factor * norms.median()
    bos = x[:, :first].reshape(-1, x.shape[-1])
    return {"x": body[~out], "bos": bos.float(), "outlier": body[out].float()}


class MemoryActivations:
    """An in-memory :class:`ActivationSource` over tokens [N, d] (one buffer, fully permuted)."""

    def __init__(self, x: Tensor) -> None:
        self.x = x.float()

    @property
    def n_tokens(self) -> int:
        return self.x.shape[0]

    def batches(self, size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
        perm = torch.randperm(self.n_tokens, generator=torch.Generator().manual_seed(seed))
        for i in range(start * size, self.n_tokens, size):
            yield self.x[perm[i : i + size]]

    def sample(self, n: int, seed: int) -> Tensor:
        perm = torch.randperm(self.n_tokens, generator=torch.Generator().manual_seed(seed))
        return self.x[perm[:n]]


class ActivationCache:
    """A chunked on-disk activation cache at one hook (see the module docstring)."""

    def __init__(self, folder: str | Path, *, buffer_chunks: int = 8) -> None:
        self.folder = Path(folder)
        meta_file = self.folder / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{self.folder} is not an activation cache (no meta.json); build it with "
                "ActivationCache.build."
            )
        self.meta = load_json(meta_file, "an activation cache's meta.json")
        if "counts" not in self.meta:
            raise ValueError(f"{self.folder} is an unfinished cache; build it again to resume.")
        self.counts: list[int] = self.meta["counts"]
        self.buffer_chunks = max(1, buffer_chunks)

    @classmethod
    def build(
        cls,
        model: LensModel,
        tokens: Tensor,
        hook: str,
        folder: str | Path,
        *,
        batch_seqs: int = 64,
        dtype: CacheDtype = "float32",
        skip_bos: bool = True,
        outlier_factor: float | None = 10.0,
        progress: bool = True,
        buffer_chunks: int = 8,
    ) -> ActivationCache:
        """Cache ``tokens`` [N, T] at ``hook`` (resuming the chunks already written)."""
        from perturb_lens.data.text import token_source_hash

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        spec = {
            "hook": hook,
            "source": model.source,
            "tokens": token_source_hash(tokens),
            "batch_seqs": batch_seqs,
            "dtype": dtype,
            "skip_bos": skip_bos,
            "outlier_factor": outlier_factor,
        }
        meta_file = folder / "meta.json"
        if meta_file.is_file():
            old = load_json(meta_file, "an activation cache's meta.json")
            if {k: old.get(k) for k in spec} != spec:
                raise ValueError(
                    f"{folder} caches other activations or settings ({meta_file}); remove it or "
                    "use another --out."
                )
            if "counts" in old:
                return cls(folder, buffer_chunks=buffer_chunks)
        atomic_write_json(meta_file, spec)
        store = torch.float32 if dtype == "float32" else torch.bfloat16
        counts: list[int] = []
        flagged = {g: 0 for g in FLAGGED}
        starts = range(0, tokens.shape[0], batch_seqs)
        for i, s0 in enumerate(tqdm(starts, desc=f"Caching {hook}", disable=not progress)):
            path = folder / f"chunk_{i:05d}.safetensors"
            if not path.is_file():
                x = model.run_to_hook(tokens[s0 : s0 + batch_seqs].to(model.device), hook)
                parts = split_flagged(
                    x.float().cpu(), skip_bos=skip_bos, outlier_factor=outlier_factor
                )
                parts["x"] = parts["x"].to(store)
                atomic_save(parts, path)
            parts = load_file(str(path))
            counts.append(parts["x"].shape[0])
            for g in FLAGGED:
                flagged[g] += parts[g].shape[0]
        atomic_write_json(meta_file, {**spec, "counts": counts, "flagged": flagged})
        return cls(folder, buffer_chunks=buffer_chunks)

    @property
    def n_tokens(self) -> int:
        return sum(self.counts)

    def chunk(self, i: int) -> dict[str, Tensor]:
        """Chunk ``i``: ``x`` (float32) and the flagged groups."""
        parts = load_file(str(self.folder / f"chunk_{i:05d}.safetensors"))
        parts["x"] = parts["x"].float()
        return parts

    def flagged(self, group: str) -> Tensor:
        """All tokens of a flagged group (``bos`` or ``outlier``) [n, d] (few: kept in RAM)."""
        return torch.cat([self.chunk(i)[group] for i in range(len(self.counts))])

    def passes(self, seed: int) -> list[list[int]]:
        """The chunk groups of a pass: a seeded permutation cut into buffers."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.counts), generator=g).tolist()
        b = self.buffer_chunks
        return [order[i : i + b] for i in range(0, len(order), b)]

    def _buffers(self, seed: int, skip: int) -> Iterator[Tensor]:
        """The permuted tokens of each buffer, from token ``skip`` of the pass on (whole buffers
        before it are not read)."""
        for j, group in enumerate(self.passes(seed)):
            n = sum(self.counts[i] for i in group)
            if skip >= n:
                skip -= n
                continue
            x = torch.cat([self.chunk(i)["x"] for i in group])
            g = torch.Generator().manual_seed((seed + 7919 * (j + 1)) % 2**63)
            yield x[torch.randperm(n, generator=g)[skip:]]
            skip = 0

    def batches(self, size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
        carry: Tensor | None = None
        for buf in self._buffers(seed, start * size):
            if carry is not None:
                buf = torch.cat([carry, buf])
            n_full = buf.shape[0] // size * size
            for i in range(0, n_full, size):
                yield buf[i : i + size]
            carry = buf[n_full:]
        if carry is not None and carry.shape[0]:
            yield carry

    def sample(self, n: int, seed: int) -> Tensor:
        out, have = [], 0
        for buf in self._buffers(seed, 0):
            out.append(buf[: n - have])
            have += out[-1].shape[0]
            if have >= n:
                break
        return torch.cat(out)
