"""Checkpoints: the authors' layout and ours.

Authors' layout (YoungJooHan/SS-BSN): ``{"model_weight": {"denoiser": state_dict}}`` with keys
such as ``bsn.branch1.body.12.wqk`` and a ``mask`` buffer in each masked conv, possibly behind a
``module.`` prefix (DataParallel). Ours: a safetensors file of ``SSBSN.state_dict()`` with the
constructor's configuration as JSON metadata. Nothing is ever unpickled: ``torch.load`` runs with
``weights_only=True``.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch

from .atomic import atomic_path

CONFIG_KEY = "ssbsn_config"
INFERENCE_KEY = "ssbsn_inference"  # the model's inference settings (SSBSN.inference), JSON


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def _read(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors "
                              f"(weights_only load failed: {first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


def _unwrap(ckpt) -> dict:
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"a checkpoint must be a dict of tensors, got {type(ckpt).__name__}")
    if "model_weight" in ckpt:
        mw = ckpt["model_weight"]
        if not isinstance(mw, dict) or "denoiser" not in mw:
            raise CheckpointError("authors' checkpoint without ['model_weight']['denoiser']")
        ckpt = mw["denoiser"]
    elif "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        ckpt = ckpt["state_dict"]
    bad = [k for k, v in ckpt.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint entries that are not tensors: {', '.join(map(str, bad[:5]))}")
    return ckpt


def official_to_ours(state: dict) -> dict:
    """Map the authors' BSN keys onto ours: strip ``module.``/``bsn.`` prefixes, drop the
    masked convs' ``mask`` buffers, ``X.wqk`` → ``X.attn.wqk``. Returns keys relative to the BSN."""
    out = {}
    for key, value in state.items():
        k = key
        for prefix in ("module.", "bsn.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.endswith(".mask"):
            continue
        k = re.sub(r"(?<!attn)\.wqk$", ".attn.wqk", k)
        out[k] = value
    return out


def infer_config(bsn_state: dict) -> dict:
    """Read base channels, modules, SS-Blocks and input channels off the weights' shapes."""
    try:
        head = bsn_state["head.0.weight"]
        blocks = {int(m.group(1)) for k in bsn_state
                  if (m := re.match(r"branch1\.body\.(\d+)\.conv1\.weight$", k))}
        ss = {int(m.group(1)) for k in bsn_state
              if (m := re.match(r"branch1\.body\.(\d+)\.attn\.wqk$", k))}
    except KeyError as e:
        raise CheckpointError(f"not an SS-BSN state dict: missing {e.args[0]!r}") from None
    return dict(in_channels=head.shape[1], base_channels=head.shape[0],
                num_modules=len(blocks), ss_blocks=len(ss))


def load_bsn_state(model, bsn_state: dict) -> None:
    """Strict load into ``model.bsn`` with one clear error naming wrong keys or shapes."""
    own = model.bsn.state_dict()
    missing = sorted(set(own) - set(bsn_state))
    unexpected = sorted(set(bsn_state) - set(own))
    shapes = [f"{k} {tuple(bsn_state[k].shape)} (model: {tuple(own[k].shape)})"
              for k in own if k in bsn_state and bsn_state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:6])}" + (" …" if len(missing) > 6 else ""))
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:6])}"
                        + (" …" if len(unexpected) > 6 else ""))
    if shapes:
        problems.append(f"wrong shapes: {', '.join(shapes[:4])}")
    if problems:
        raise CheckpointError("checkpoint does not match the model; " + "; ".join(problems))
    model.bsn.load_state_dict({k: v.to(own[k].dtype) for k, v in bsn_state.items()})
    with torch.no_grad():  # the centre tap takes no part; keep it visibly zero
        for b in model.bsn.branches():
            w = b.body[0].weight
            w[:, :, w.shape[-2] // 2, w.shape[-1] // 2] = 0


def from_official(path_or_checkpoint, cls=None, **overrides):
    """SSBSN from the authors' checkpoint layout or a bare state dict (path or dict)."""
    if cls is None:
        from .model import SSBSN as cls
    ckpt = path_or_checkpoint
    if isinstance(ckpt, (str, os.PathLike)):
        ckpt = _read(ckpt)
    state = official_to_ours(_unwrap(ckpt))
    config = {**infer_config(state), **overrides}
    model = cls(**config)
    load_bsn_state(model, state)
    return model


def save_model(model, path) -> None:
    """Atomically write ``model`` (weights + configuration) to a safetensors file."""
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        meta = {CONFIG_KEY: json.dumps(model.config)}
        if getattr(model, "inference", None) is not None:
            meta[INFERENCE_KEY] = json.dumps(model.inference)
        save_file(state, str(tmp), metadata=meta)


def load_model(path, cls=None, **overrides):
    """Load a model written by :func:`save_model`; falls back to :func:`from_official`."""
    if cls is None:
        from .model import SSBSN as cls
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises several types for a bad header
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {e}") from None
        if CONFIG_KEY in meta:
            saved = json.loads(meta[CONFIG_KEY])
            # the attention backend is a runtime choice (same weights): the memory-efficient
            # path unless the caller asks otherwise, whatever the run that wrote the file used
            saved.pop("fused", None)
            if INFERENCE_KEY in meta:
                saved["inference"] = {**json.loads(meta[INFERENCE_KEY]),
                                      **(overrides.pop("inference", None) or {})}
            config = {**saved, **overrides}
            state = {k[len("bsn."):] if k.startswith("bsn.") else k: v
                     for k, v in _read(path).items()}
            model = cls(**config)
            load_bsn_state(model, state)
            return model
    return from_official(path, cls=cls, **overrides)
