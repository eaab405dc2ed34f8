"""Loading SAEs: SAELens folders and releases, e2e_sae (Braun et al.) checkpoints (the writer:
:mod:`perturb_lens.saes.format`).

- **SAELens folder**: ``cfg.json`` + ``sae_weights.safetensors``. Both the SAELens >= 6 layout
  (``architecture``, hook and model under ``metadata``) and the older flat one (``hook_name`` or
  ``hook_point``, ``activation_fn_str``, ``activation_fn_kwargs.k``) are read. We save the >= 6
  layout, so ``sae_lens.SAE.load_from_disk`` reads our files; our own keys (the frame) go under
  ``metadata``, which SAELens keeps as it is.
- **SAELens release** ``release:sae_id`` or ``release/sae_id``: through ``sae_lens`` when it is
  installed; else, for the releases of :data:`HUB_RELEASES`, the folder is fetched from the hub
  with ``huggingface_hub`` directly.
- **e2e_sae checkpoint** (a ``.pt`` state dict of ``SAETransformer.saes``, or a folder with
  ``samples_*.pt`` and ``final_config.yaml``): keys ``{hook with '.' -> '-'}.encoder.0.weight``
  [d_sae, d_in], ``.encoder.0.bias``, ``.decoder.weight`` [d_in, d_sae], ``.decoder.bias``. That
  code decodes with the *column-normalised* decoder weight and does not subtract ``b_dec`` from
  the input, so we load ``W_dec = normalize(decoder.weight, dim=0).T`` and
  ``apply_b_dec_to_input = False``.

Frames: an SAE we saved records its frame. For others it is inferred: SAEs trained on
TransformerLens' processed LayerNorm models (GPT-2, Pythia: ``center_writing_weights``) read the
``centered`` frame; RMSNorm models (Llama, Gemma, Qwen, Mistral, SmolLM) only have ``raw``. Pass
``frame=`` to override.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from perturb_lens.common.files import (
    CONFIG_MAX_BYTES,
    JSON_MAX_BYTES,
    UnreadableFileError,
    read_limited,
    regular_file,
    torch_load,
)
from perturb_lens.common.hooks import read_hook
from perturb_lens.common.yaml_files import parse_yaml
from perturb_lens.saes.format import CFG_FILE, WEIGHTS_FILE
from perturb_lens.saes.pack import is_pack_ref, resolve_pack_ref
from perturb_lens.saes.sae import SAE, SAEConfig

_RMSNORM_MODELS = re.compile(r"llama|gemma|qwen|mistral|smollm|phi-3|olmo", re.IGNORECASE)

# Hub locations of the releases the GPT-2 presets use (as SAELens' pretrained_saes.yaml lists
# them), so those presets also run without sae_lens: release -> (repo_id, path template).
HUB_RELEASES: dict[str, tuple[str, str]] = {
    "gpt2-small-res-jb": ("jbloom/GPT2-Small-SAEs-Reformatted", "{hook}"),
    **{
        f"gpt2-small-res_{v}-ajt": (
            f"neuronpedia/gpt2-small__res_{v}-ajt",
            f"{{layer}}-res_{v}-ajt",
        )
        for v in ("scl", "sll", "sce", "sle", "scefr", "slefr")
    },
}


class SAELoadError(ValueError):
    """An SAE reference that cannot be loaded; the message says what was expected."""


def infer_frame(model_name: str) -> str:
    """``raw`` for RMSNorm model families, else ``centered`` (TransformerLens' processed
    LayerNorm models, which SAELens and e2e_sae SAEs are trained on)."""
    return "raw" if _RMSNORM_MODELS.search(model_name or "") else "centered"


# ---- SAELens folder ------------------------------------------------------------------------


def _saelens_cfg_to_ours(raw: dict[str, Any], frame: str | None) -> SAEConfig:
    """Our config from a SAELens cfg.json dict (>= 6 or older flat layout)."""
    meta = dict(raw.get("metadata") or {})
    ours = dict(meta.get("perturb_lens") or {})

    def pick(*keys: str, default: Any = None) -> Any:
        for k in keys:
            for src in (raw, meta):
                if src.get(k) is not None:
                    return src[k]
        return default

    arch = raw.get("architecture")
    act = pick("activation_fn", "activation_fn_str", default="relu")
    k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
    if arch == "topk" or act == "topk":
        activation = "topk"
    elif arch == "jumprelu":
        activation = "jumprelu"
    elif arch in (None, "standard") and act == "relu":
        activation = "relu"
    else:
        raise SAELoadError(
            f"Unsupported SAELens architecture {arch!r} / activation {act!r}; perturb-lens reads "
            "standard (ReLU), topk and jumprelu SAEs."
        )
    norm = raw.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:  # pre-6 boolean form
        norm = "expected_average_only_in" if norm else "none"
    if raw.get("reshape_activations", "none") != "none":
        raise SAELoadError("hook_z SAEs (reshape_activations='hook_z') are not supported.")
    model = str(pick("model_name", default=""))
    meta.pop("perturb_lens", None)
    return SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        activation=activation,
        k=int(k) if activation == "topk" else None,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=norm,
        hook=str(pick("hook_name", "hook_point", default="")),
        frame=frame or ours.get("frame") or infer_frame(model),  # type: ignore[arg-type]
        model=model,
        skip_bos=bool(ours.get("skip_bos", False)),
        metadata={**meta, **{k2: v for k2, v in ours.items() if k2 not in ("frame", "skip_bos")}},
    )


def sae_from_state(
    cfg: SAEConfig, state: dict[str, torch.Tensor], where: str = "the SAE weights"
) -> SAE:
    """Build an SAE (float32, frozen: ``requires_grad`` off) from a config and SAELens-named
    weights; shapes are checked, and NaN or inf values refused (``where`` names their file)."""
    sae = SAE(cfg)
    state = dict(state)
    if cfg.activation == "jumprelu" and "threshold" not in state and "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
    want = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    missing = sorted(set(want) - set(state))
    if missing:
        raise SAELoadError(f"SAE weights lack {missing}; found {sorted(state)}.")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise SAELoadError(
                f"SAE weight {name} has shape {tuple(state[name].shape)}; cfg (d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}) needs {shape}."
            )
    bad = {n: int((~torch.isfinite(state[n])).sum()) for n in want}
    bad = {n: k for n, k in bad.items() if k}
    if bad:
        shown = ", ".join(f"{n} ({k} of {state[n].numel()})" for n, k in bad.items())
        raise SAELoadError(
            f"{where}: NaN or inf values in {shown}: every statistic of this SAE would come out "
            "NaN. The file is damaged or its training diverged: restore it, or retrain the SAE "
            "(with a lower lr if it diverged)."
        )
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(state[name].to(torch.float32))
    return sae.eval().requires_grad_(False)


def load_saelens_folder(folder: str | Path, *, frame: str | None = None) -> SAE:
    """Load a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    folder = Path(folder)
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.exists() or not w_path.exists():
        raise SAELoadError(
            f"{folder} is not a SAELens folder: it needs {CFG_FILE} and {WEIGHTS_FILE}."
        )
    try:
        raw = json.loads(read_limited(cfg_path, JSON_MAX_BYTES, "a SAELens cfg.json"))
    except UnreadableFileError as e:
        raise SAELoadError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise SAELoadError(
            f"{cfg_path} is not valid JSON ({why}): damaged or not a SAELens config; restore it "
            "(e.g. save the SAE again) or point to another SAE folder."
        ) from None
    if not isinstance(raw, dict):
        raise SAELoadError(
            f"{cfg_path} must hold a JSON object (a SAELens cfg.json), not "
            f"{type(raw).__name__}: fix it or point to another SAE folder."
        )
    try:
        cfg = _saelens_cfg_to_ours(raw, frame)
    except SAELoadError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else f"has a bad value ({e})"
        raise SAELoadError(
            f"{cfg_path} {what}: a SAELens cfg.json needs d_in, d_sae and the hook name; fix it "
            "or point to another SAE folder."
        ) from None
    try:
        state = load_file(str(regular_file(w_path, "SAE weights")))
    except (SafetensorError, OSError, ValueError) as e:
        raise SAELoadError(
            f"{w_path} is not a readable safetensors file ({e}): damaged or truncated; restore "
            "it (e.g. save or download the SAE again) or point to another SAE folder."
        ) from None
    if raw.get("finetuning_scaling_factor") and "scaling_factor" in state:
        raise SAELoadError("SAEs with a finetuning scaling factor are not supported.")
    return sae_from_state(cfg, state, str(w_path))


# ---- SAELens releases ----------------------------------------------------------------------


def split_release(ref: str) -> tuple[str, str] | None:
    """``release:sae_id`` or ``release/sae_id`` -> (release, sae_id); None if not that form."""
    if ":" in ref:
        release, _, sae_id = ref.partition(":")
        return (release, sae_id) if release and sae_id else None
    if "/" in ref and not ref.startswith((".", "/", "~")):
        release, _, sae_id = ref.partition("/")
        return (release, sae_id) if release and sae_id else None
    return None


def load_saelens_release(release: str, sae_id: str, *, frame: str | None = None) -> SAE:
    """A pretrained SAE by SAELens release and id (needs sae_lens, or hub access for
    :data:`HUB_RELEASES`)."""
    try:
        from sae_lens import SAE as LensSAE
    except ImportError:
        return _load_release_from_hub(release, sae_id, frame=frame)
    return from_saelens_object(LensSAE.from_pretrained(release, sae_id, device="cpu"), frame=frame)


def is_saelens_sae(obj: Any) -> bool:
    """Whether ``obj`` is a ``sae_lens.SAE`` (checked without importing sae_lens)."""
    return any(
        c.__name__ == "SAE" and c.__module__.startswith("sae_lens") for c in type(obj).__mro__
    )


def from_saelens_object(lens: Any, *, frame: str | None = None) -> SAE:
    """A ``sae_lens.SAE`` object (standard, TopK, JumpReLU) as ours, read as its saved folder
    would be (its ``cfg.to_dict()`` and state dict): no copy to disk."""
    raw = lens.cfg.to_dict()
    raw.setdefault("metadata", {})
    state = {k: v.detach().cpu() for k, v in lens.state_dict().items()}
    return sae_from_state(_saelens_cfg_to_ours(raw, frame), state, "the sae_lens SAE object")


def _load_release_from_hub(release: str, sae_id: str, *, frame: str | None) -> SAE:
    if release not in HUB_RELEASES:
        raise SAELoadError(
            f"Loading SAELens release {release!r} needs sae_lens: pip install sae-lens "
            f"(without it, perturb-lens knows only {sorted(HUB_RELEASES)})."
        )
    hook = read_hook(sae_id)
    if hook is None or hook.kind != "hook_resid_pre":
        raise SAELoadError(f"SAE id {sae_id!r} must look like blocks.<layer>.hook_resid_pre.")
    repo, template = HUB_RELEASES[release]
    path = template.format(hook=sae_id, layer=hook.layer)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, allow_patterns=[f"{path}/*"])
    except Exception as err:  # network, auth, missing repo
        raise SAELoadError(
            f"Could not fetch SAE {release}:{sae_id} (hub {repo}, folder {path}): {err}. "
            "Download the folder elsewhere and pass its local path instead."
        ) from err
    return load_saelens_folder(Path(local) / path, frame=frame)


# ---- e2e_sae checkpoints -------------------------------------------------------------------


def _e2e_checkpoint_file(path: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to read and its training config (if a final_config.yaml is beside it)."""
    if path.is_dir():
        pts = sorted(path.glob("*.pt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
        if not pts:
            raise SAELoadError(f"No .pt checkpoint in {path}.")
        ckpt = pts[-1]
    else:
        ckpt = path
    cfg_file = ckpt.parent / "final_config.yaml"
    config: dict[str, Any] = {}
    if cfg_file.is_file():
        import yaml

        try:
            text = read_limited(cfg_file, CONFIG_MAX_BYTES, "an e2e_sae config").decode()
            config = parse_yaml(text) or {}
        except (yaml.YAMLError, UnicodeDecodeError, UnreadableFileError) as e:
            raise SAELoadError(
                f"{cfg_file} (beside the checkpoint) is not a readable e2e_sae config ({e}): "
                "restore it, or remove it (it only names the model)."
            ) from None
        if not isinstance(config, dict):
            raise SAELoadError(f"{cfg_file} must hold a mapping: restore it, or remove it.")
    return ckpt, config


def load_e2e_checkpoint(
    path: str | Path, *, hook: str | None = None, frame: str | None = None, model: str = ""
) -> SAE:
    """An SAE from an e2e_sae checkpoint (see the module docstring for the layout)."""
    ckpt, config = _e2e_checkpoint_file(Path(path))
    try:
        state = torch_load(ckpt, "torch checkpoint")
    except UnreadableFileError as e:
        raise SAELoadError(
            f"{e}: damaged, or not an e2e_sae state dict; point to another checkpoint."
        ) from None
    if not isinstance(state, dict):
        raise SAELoadError(f"{ckpt} does not hold a state dict.")
    positions = sorted({k.split(".", 1)[0] for k in state if k.endswith(".encoder.0.weight")})
    if not positions:
        raise SAELoadError(
            f"{ckpt} is not an e2e_sae checkpoint: no '<hook>.encoder.0.weight' keys "
            f"(found {sorted(state)[:6]})."
        )
    if hook is None:
        if len(positions) > 1:
            names = [p.replace("-", ".") for p in positions]
            raise SAELoadError(f"{ckpt} holds SAEs at {names}; pick one with hook=.")
        key = positions[0]
    else:
        key = hook.replace(".", "-")
        if key not in positions:
            names = [p.replace("-", ".") for p in positions]
            raise SAELoadError(f"{ckpt} has no SAE at {hook!r}; it has {names}.")
    names = [f"{key}.{n}" for n in ("encoder.0.weight", "encoder.0.bias", "decoder.weight")]
    names.append(f"{key}.decoder.bias")
    lacking = [n for n in names if not isinstance(state.get(n), torch.Tensor)]
    if lacking:
        raise SAELoadError(
            f"{ckpt} is not a complete e2e_sae checkpoint: no tensor {lacking[0]!r}; point to "
            "another checkpoint."
        )
    enc_w = state[f"{key}.encoder.0.weight"].double()  # [d_sae, d_in]
    dec_w = state[f"{key}.decoder.weight"].double()  # [d_in, d_sae]
    dec_w = dec_w / dec_w.norm(dim=0, keepdim=True).clamp_min(1e-12)  # F.normalize(dim=0)
    model = model or str(config.get("tlens_model_name") or "")
    cfg = SAEConfig(
        d_in=int(enc_w.shape[1]),
        d_sae=int(enc_w.shape[0]),
        apply_b_dec_to_input=False,
        hook=key.replace("-", "."),
        frame=frame or infer_frame(model or "gpt2"),  # type: ignore[arg-type]
        model=model,
        metadata={"source": "e2e_sae", "checkpoint": str(ckpt)},
    )
    return sae_from_state(
        cfg,
        {
            "W_enc": enc_w.T,
            "b_enc": state[f"{key}.encoder.0.bias"],
            "W_dec": dec_w.T,
            "b_dec": state[f"{key}.decoder.bias"],
        },
        str(ckpt),
    )


# ---- dispatch ------------------------------------------------------------------------------


def load_sae(
    ref: str | Path | SAE | Any,
    *,
    frame: str | None = None,
    hook: str | None = None,
    model: str = "",
) -> SAE:
    """Load an SAE from any supported reference (an :class:`SAE` is returned as it is; a
    ``sae_lens.SAE`` object is converted in memory).

    ``ref``: a SAELens folder, an e2e_sae ``.pt`` file or checkpoint folder, a SAELens release
    ``release:sae_id`` / ``release/sae_id``, or a packed SAE ``pack:NAME/ID`` /
    ``ARCHIVE.tar.gz[:ID]`` (:mod:`perturb_lens.saes.pack`). ``frame`` overrides the inferred
    frame; ``hook`` picks the SAE of a multi-SAE e2e_sae checkpoint.
    """
    if isinstance(ref, SAE):
        return ref
    if is_saelens_sae(ref):
        return from_saelens_object(ref, frame=frame)
    if not isinstance(ref, str | Path):
        raise SAELoadError(
            f"Cannot load an SAE from a {type(ref).__name__}: give a sae_lens.SAE object, a "
            "SAELens folder, an e2e_sae .pt checkpoint, an SAE pack (pack:NAME/ID or "
            "ARCHIVE.tar.gz:ID), or a SAELens release as release:sae_id."
        )
    if is_pack_ref(str(ref)):
        return load_saelens_folder(resolve_pack_ref(str(ref)), frame=frame)
    path = Path(str(ref)).expanduser()
    if path.is_dir() and (path / CFG_FILE).is_file():
        return load_saelens_folder(path, frame=frame)
    if path.suffix == ".pt" or (path.is_dir() and any(path.glob("*.pt"))):
        if not path.exists():
            raise SAELoadError(f"e2e_sae checkpoint {path} not found.")
        return load_e2e_checkpoint(path, hook=hook, frame=frame, model=model)
    if path.exists():
        raise SAELoadError(
            f"{path} is neither a SAELens folder ({CFG_FILE} + {WEIGHTS_FILE}) nor an e2e_sae "
            "checkpoint (.pt)."
        )
    release = split_release(str(ref))
    if release is None:
        raise SAELoadError(
            f"SAE {str(ref)!r} not found: give a SAELens folder, an e2e_sae .pt checkpoint, or a "
            "SAELens release as release:sae_id (e.g. gpt2-small-res-jb:blocks.6.hook_resid_pre)."
        )
    return load_saelens_release(*release, frame=frame)
