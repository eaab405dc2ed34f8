"""What the e2e objectives train on: whole-sequence activations at the hook and, computed from
them, the clean final hidden states and downstream activations (each cached in chunks, written
atomically, so an interrupted caching step resumes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from perturb_lens.common.files import load_json
from perturb_lens.models.base import CleanRun, LensModel
from perturb_lens.saes.cache import atomic_save


def cache_activations(
    model: LensModel,
    tokens: Tensor,
    hooks: dict[str, Path],
    *,
    batch_seqs: int,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Activations [N, T, d] (float32) at each hook, cached in chunks under ``hooks[hook]``; all
    hooks come from one pass per chunk (to the last hook)."""
    from perturb_lens.data.text import token_source_hash

    for hook, folder in hooks.items():
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"hook": hook, "tokens": token_source_hash(tokens), "source": model.source}
        meta_file = folder / "meta.json"
        if meta_file.is_file() and load_json(meta_file, "an activation cache's meta.json") != meta:
            raise ValueError(f"{folder} caches other activations ({meta_file}); use another --out.")
        meta_file.write_text(json.dumps(meta))
    order = sorted(hooks, key=model.parse_hook)
    parts: dict[str, list[Tensor]] = {h: [] for h in order}
    starts = range(0, tokens.shape[0], batch_seqs)
    for i, s0 in enumerate(tqdm(starts, desc="Caching activations", disable=not progress)):
        paths = {h: hooks[h] / f"x_{i:05d}.safetensors" for h in order}
        missing = [h for h in order if not paths[h].is_file()]
        if missing:
            tok = tokens[s0 : s0 + batch_seqs]
            if len(missing) == 1:
                got = {missing[0]: model.run_to_hook(tok, missing[0])}
            else:
                clean = model.run_clean(tok, missing[0], reads=missing[1:])
                got = {missing[0]: clean.x, **clean.reads}
            for h in missing:
                atomic_save({"x": got[h].float().cpu()}, paths[h])
        for h in order:
            parts[h].append(load_file(str(paths[h]))["x"])
    return {h: torch.cat(v) for h, v in parts.items()}


def cache_clean_outputs(
    model: LensModel,
    tokens: Tensor,
    x: Tensor,
    hook: str,
    reads: list[str],
    folder: Path,
    *,
    batch_seqs: int,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Clean final hidden states and downstream ``reads`` [n, T, d], computed from the cached
    ``x`` (cached under ``folder``, keyed by the number of sequences and the reads)."""
    tag = f"clean{x.shape[0]}" + "".join("_" + r.replace(".", "-") for r in reads)
    out: dict[str, list[Tensor]] = {}
    starts = range(0, x.shape[0], batch_seqs)
    for i, s0 in enumerate(tqdm(starts, desc="Clean outputs", disable=not progress)):
        path = folder / f"{tag}_{i:05d}.safetensors"
        if not path.is_file():
            clean = clean_from_x(model, tokens[s0 : s0 + batch_seqs], x[s0 : s0 + batch_seqs], hook)
            final, got = model.continue_all(clean, clean.x.unsqueeze(1), reads=reads)
            part = {"final": final[:, 0].float().cpu()}
            part.update({r: got[r][:, 0].float().cpu() for r in reads})
            atomic_save(part, path)
        for k, v in load_file(str(path)).items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def clean_from_x(model: LensModel, tokens: Tensor, x: Tensor, hook: str) -> CleanRun:
    """A CleanRun to continue from cached ``x`` (resid hooks need no other state)."""
    h = model.parse_hook(hook)
    if h.kind not in ("hook_resid_pre", "hook_resid_post"):
        return model.run_clean(tokens.to(model.device), h)
    x = x.to(model.device, model.dtype)
    return CleanRun(tokens=tokens.to(model.device), hook=h, x=x, final=x)


def default_ds_hooks(hook: str, n_layers: int, every: int = 4) -> list[str]:
    """resid_post of every ``every``-th layer from the hook's layer on, and the last layer."""
    layer = int(hook.split(".")[1])
    layers = sorted({*range(layer + every - 1, n_layers, every), n_layers - 1})
    return [f"blocks.{lay}.hook_resid_post" for lay in layers if lay >= layer]
