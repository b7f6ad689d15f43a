"""Checkpoints: the authors' layout and ours.

Authors' layout (YoungJooHan/SS-BSN): ``{"model_weight": {"denoiser": state_dict}}`` with keys
such as ``bsn.branch1.body.12.wqk`` and a ``mask`` buffer in each masked conv, possibly behind a
``module.`` prefix (DataParallel). Ours: a safetensors file of ``SSBSN.state_dict()`` with the
model configuration (:class:`ssbsn.config.ModelConfig`, without the runtime choices) as JSON
metadata. Nothing is ever unpickled: ``torch.load`` runs with ``weights_only=True``.

This module reads and writes files; it does not import the model (the model imports it):
the loaders take the class to build as ``cls``.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch

from .atomic import atomic_path
from .config import LEGACY_KEYS, RUNTIME_FIELDS, check_model_value, model_field_names
from .errors import CheckpointError, ConfigError

CONFIG_KEY = "ssbsn_config"
INFERENCE_KEY = "ssbsn_inference"  # the model's inference settings (SSBSN.inference), JSON


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


def from_official(path_or_checkpoint, cls, **overrides):
    """A ``cls`` (SSBSN) from the authors' checkpoint layout or a bare state dict (path or
    dict)."""
    ckpt, where = path_or_checkpoint, "checkpoint"
    if isinstance(ckpt, (str, os.PathLike)):
        ckpt, where = _read(ckpt), str(ckpt)
    state = official_to_ours(_unwrap(ckpt))
    check_finite(state, where)
    config = {**infer_config(state), **overrides}
    model = cls(**config)
    load_bsn_state(model, state)
    return model


def save_model(model, path, metadata: dict | None = None) -> None:
    """Atomically write ``model`` (weights + configuration) to a safetensors file; ``metadata``
    (str → str) is stored beside them."""
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        meta = {**(metadata or {}), CONFIG_KEY: json.dumps(model.config.to_dict(stored=True))}
        if getattr(model, "inference", None) is not None:
            meta[INFERENCE_KEY] = json.dumps(model.inference)
        save_file(state, str(tmp), metadata=meta)


def validate_config(config, where) -> dict:
    """Check a model configuration read from a file: a JSON object of known constructor
    arguments with the right types and ranges (the schema is :class:`ssbsn.config.ModelConfig`'s
    field declarations). Raises :class:`CheckpointError` naming ``where``."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: the model configuration ({CONFIG_KEY}) must be a JSON "
                              f"object, got {type(config).__name__}")
    unknown = sorted(set(config) - set(model_field_names()) - set(LEGACY_KEYS))
    if unknown:
        raise CheckpointError(f"{where}: unknown key(s) in the model configuration: "
                              f"{', '.join(map(str, unknown))}")
    for key, value in config.items():
        try:
            check_model_value(key, value)
        except ConfigError as e:
            raise CheckpointError(f"{where}: model configuration {e}") from None
    if config.get("ss_blocks", 3) > config.get("num_modules", 9):
        raise CheckpointError(f"{where}: model configuration ss_blocks={config.get('ss_blocks')} "
                              f"exceeds num_modules={config.get('num_modules', 9)}")
    return config


def _check_against_shapes(config: dict, shapes: dict, where) -> None:
    """The configuration must describe the weights: compare with what their shapes say
    (keys it leaves out are filled in from the shapes)."""
    bsn = {k[len("bsn."):] if k.startswith("bsn.") else k: v for k, v in shapes.items()}
    if "head.0.weight" not in bsn or len(bsn["head.0.weight"]) != 4:
        raise CheckpointError(f"{where}: not an SS-BSN checkpoint (no bsn.head.0.weight)")
    found = infer_config({k: _Shape(v) for k, v in bsn.items()})
    for key, value in found.items():
        claimed = config.setdefault(key, value)  # a key left out: what the weights say
        if claimed != value:
            raise CheckpointError(f"{where}: model configuration says {key}={claimed} but the "
                                  f"weights have {key}={value}")


class _Shape:
    """Stands for a tensor where only ``.shape`` is needed (shapes from a file header)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _read_inference(text: str, where) -> dict:
    """The inference settings stored with the weights (JSON object of known settings)."""
    from .inference import INFERENCE_DEFAULTS, check_inference_settings
    try:
        settings = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{where}: the inference settings ({INFERENCE_KEY}) are not valid "
                              f"JSON ({e})") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{where}: the inference settings ({INFERENCE_KEY}) must be a JSON "
                              f"object, got {type(settings).__name__}")
    try:
        check_inference_settings({**INFERENCE_DEFAULTS, **settings})
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return settings


def check_finite(state: dict, where) -> None:
    """Refuse weights holding NaN or Inf (a diverged run): they would only produce garbage."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{where}: non-finite weights (NaN or Inf) in {key}; the run "
                                  "that wrote it diverged — use an earlier checkpoint")


def load_model(path, cls, **overrides):
    """Load a ``cls`` (SSBSN) written by :func:`save_model`; falls back to
    :func:`from_official`.

    The configuration stored with the weights is validated (known keys, types, ranges) and
    checked against the weights' shapes, read from the file header, before anything is built;
    weights holding NaN or Inf are refused."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        except Exception as e:  # safetensors raises several types for a bad header
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
                                  ) from None
        if CONFIG_KEY in meta:
            try:
                stored = json.loads(meta[CONFIG_KEY])
            except ValueError as e:
                raise CheckpointError(f"{path}: the model configuration ({CONFIG_KEY}) is not "
                                      f"valid JSON ({e})") from None
            saved = dict(validate_config(stored, path))
            # the attention backend is a runtime choice (same weights): the memory-efficient
            # path unless the caller asks otherwise, whatever the run that wrote the file used
            for key in RUNTIME_FIELDS + tuple(LEGACY_KEYS):
                saved.pop(key, None)
            if INFERENCE_KEY in meta:
                saved["inference"] = {**_read_inference(meta[INFERENCE_KEY], path),
                                      **(overrides.pop("inference", None) or {})}
            config = {**saved, **overrides}
            _check_against_shapes(config, shapes, path)
            state = {k[len("bsn."):] if k.startswith("bsn.") else k: v
                     for k, v in _read(path).items()}
            check_finite(state, path)
            model = cls(**config)
            load_bsn_state(model, state)
            return model
    return from_official(path, cls=cls, **overrides)
