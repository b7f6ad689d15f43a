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
import logging
import os
import pickle
import re
import struct
from pathlib import Path

import torch

from .atomic import atomic_path
from .config import (LEGACY_KEYS, RUNTIME_FIELDS, InferenceConfig, check_inference,
                     check_model_value, model_field_names)
from .errors import CheckpointError, ConfigError

CONFIG_KEY = "ssbsn_config"
INFERENCE_KEY = "ssbsn_inference"  # the model's inference settings (SSBSN.inference), JSON
# No trained SS-BSN holds a weight near this magnitude (its output bias, the largest, is a pixel
# value); beyond it the network's activations overflow float32 and the output is garbage.
MAX_WEIGHT = 1e6
# The paper's architecture: what a file without stored configuration must have to be loaded with
# the paper's settings (PD strides, grid factor, attention scope, inference).
PAPER_SHAPES = dict(base_channels=128, num_modules=9, ss_blocks=3)

log = logging.getLogger("ssbsn")

# the first bytes of files that are sometimes given where a checkpoint is expected
_OTHER_FORMATS = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                  (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
                  (b"GIF8", "a GIF image"), (b"\x1f\x8b", "a gzip archive"),
                  (b"\x89HDF", "an HDF5 (.mat/.h5) file"), (b"MATLAB", "a MATLAB file"),
                  (b"%PDF", "a PDF document"))


# The final weights' name inside a run folder of ``ssbsn train``.
RUN_WEIGHTS = "model.safetensors"


def weights_file(path) -> Path:
    """The checkpoint file that ``path`` names: the file itself, or a run folder's final
    weights (:data:`RUN_WEIGHTS`). A folder without them is refused with one line."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / RUN_WEIGHTS).is_file():
        return path / RUN_WEIGHTS
    raise CheckpointError(f"{path} is a folder without {RUN_WEIGHTS}: give a checkpoint file "
                          f"(a run folder of 'ssbsn train' holds {RUN_WEIGHTS} once training "
                          "has finished)")


def file_format(path) -> str:
    """What ``path`` holds, from its first bytes (never from its name): ``"safetensors"`` (an
    8-byte little-endian header length, then a JSON object) or ``"torch"`` (a zip archive, as
    ``torch.save`` writes, or a pickle stream, its older format). Anything else is refused with
    one line saying what the file looks like."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty, not a checkpoint")
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 2 <= n <= size - 8:
            return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            raise CheckpointError(f"{path}: this is {what}, not a checkpoint (a .safetensors "
                                  "file from 'ssbsn train' or the authors' .pth)")
    raise CheckpointError(f"cannot read checkpoint {path}: neither a safetensors file nor a "
                          "PyTorch file (torch.save)")


def _unpickling_reason(e: Exception) -> str:
    """What a ``weights_only`` load refused, without torch's advice to load with
    ``weights_only=False`` (which would run code from the file)."""
    text = str(e)
    m = re.search(r"(Unsupported global: GLOBAL [^\s]+|Unsupported operand \d+|"
                  r"Unsupported class [^\s]+)", text)
    return m.group(1) if m else "objects other than tensors"


def _read(path) -> dict:
    path = Path(path)
    if file_format(path) == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: "
                                  f"{_first_line(e)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors "
                              f"({_unpickling_reason(e)}); nothing in it was run") from None
    except (RuntimeError, EOFError, OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
        if len(head.shape) != 4:
            raise CheckpointError(f"not an SS-BSN state dict: head.0.weight has shape "
                                  f"{tuple(head.shape)}, not that of a 1×1 convolution")
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
    dict). The architecture is read off the weights' shapes; the rest of the configuration is
    the paper's unless ``overrides`` say otherwise (a logged warning names what was inferred
    when the shapes are not the paper's)."""
    ckpt, where = path_or_checkpoint, "checkpoint"
    if isinstance(ckpt, (str, os.PathLike)):
        ckpt, where = _read(ckpt), str(ckpt)
    authors = isinstance(ckpt, dict) and "model_weight" in ckpt
    state = official_to_ours(_unwrap(ckpt))
    if not state:
        raise CheckpointError(f"{where}: holds no weights (an empty checkpoint)")
    check_weights(state, where)
    try:
        inferred = validate_config(infer_config(state), where)
    except CheckpointError as e:
        raise CheckpointError(e if str(e).startswith(str(where)) else f"{where}: {e}") from None
    if authors and inferred["ss_blocks"] == 0:
        raise CheckpointError(f"{where}: the authors' checkpoint holds no SS-Attention weights "
                              "(no wqk in any block): a damaged or different model; SS-BSN has "
                              "SS-Blocks")
    config = {**inferred, **overrides}
    model = cls(**config)
    load_bsn_state(model, state)
    if any(inferred[k] != v for k, v in PAPER_SHAPES.items()):
        log.warning("%s: no stored model configuration; inferred from the weights' shapes: %s; "
                    "the other settings are the paper's%s", where,
                    ", ".join(f"{k}={v}" for k, v in inferred.items()),
                    f" except {', '.join(sorted(overrides))}" if overrides else "")
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
    """The inference settings stored with the weights: a JSON object of the stored fields of
    :class:`ssbsn.config.InferenceConfig`, checked by :func:`ssbsn.config.check_inference`
    (with the defaults of the keys it leaves out, as the model will run them)."""
    try:
        settings = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{where}: the inference settings ({INFERENCE_KEY}) are not valid "
                              f"JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: the inference settings ({INFERENCE_KEY}) are nested too "
                              "deeply to be settings") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{where}: the inference settings ({INFERENCE_KEY}) must be a JSON "
                              f"object, got {type(settings).__name__}")
    try:
        check_inference({**InferenceConfig().stored(), **settings}, stored=True)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return settings


def check_finite(state: dict, where) -> None:
    """Refuse weights holding NaN or Inf (a diverged run): they would only produce garbage."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{where}: non-finite weights (NaN or Inf) in {key}; the run "
                                  "that wrote it diverged — use an earlier checkpoint")


def check_weights(state: dict, where) -> None:
    """Refuse what no working model holds, naming the tensor: weights that are not floating
    point (an integer tensor would be silently rounded), NaN or Inf (:func:`check_finite`),
    and magnitudes beyond :data:`MAX_WEIGHT`."""
    for key, value in state.items():
        if not value.is_floating_point():
            raise CheckpointError(f"{where}: {key} holds {str(value.dtype).replace('torch.', '')} "
                                  "values; weights must be floating point (float32, float16, "
                                  "bfloat16 or float64)")
    check_finite(state, where)
    for key, value in state.items():
        if value.numel() and float(value.abs().max()) > MAX_WEIGHT:
            raise CheckpointError(f"{where}: {key} holds weights of magnitude "
                                  f"{float(value.abs().max()):.3g}, beyond any working model's "
                                  f"(at most {MAX_WEIGHT:g}): a damaged file")


def load_model(path, cls, **overrides):
    """Load a ``cls`` (SSBSN) written by :func:`save_model`; falls back to
    :func:`from_official`.

    The file's format is read from its first bytes, not its name. The configuration stored
    with the weights is validated (known keys, types, ranges) and checked against the weights'
    shapes, read from the file header, before anything is built; a safetensors file without it
    loads only when its weights have the paper's architecture (with a warning). Weights that
    are not floating point, hold NaN or Inf or absurd magnitudes are refused
    (:func:`check_weights`). ``path`` may be a run folder (:func:`weights_file`)."""
    path = weights_file(path)
    if file_format(path) == "safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        except Exception as e:  # safetensors raises several types for a bad header
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
                                  ) from None
        if CONFIG_KEY not in meta:
            _refuse_unless_paper(path, shapes)
            model = from_official(path, cls=cls, **overrides)
            log.warning("%s: no model configuration (%s metadata); the weights have the paper's "
                        "architecture, so the paper's settings are used", path, CONFIG_KEY)
            return model
        else:
            try:
                stored = json.loads(meta[CONFIG_KEY])
            except ValueError as e:
                raise CheckpointError(f"{path}: the model configuration ({CONFIG_KEY}) is not "
                                      f"valid JSON ({e})") from None
            except RecursionError:
                raise CheckpointError(f"{path}: the model configuration ({CONFIG_KEY}) is nested "
                                      "too deeply to be a model configuration") from None
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
            _conv_fallback(config, overrides, path)
            state = {k[len("bsn."):] if k.startswith("bsn.") else k: v
                     for k, v in _read(path).items()}
            check_weights(state, path)
            model = cls(**config)
            load_bsn_state(model, state)
            return model
    return from_official(path, cls=cls, **overrides)


def _refuse_unless_paper(path, shapes: dict) -> None:
    """A safetensors file without :data:`CONFIG_KEY` (e.g. re-saved with plain
    ``safetensors.torch.save_file``): its PD strides, attention scope and inference settings
    are unknown. Only the paper's architecture implies them (the paper's settings); any other
    is refused."""
    bsn = {(k[len("bsn."):] if k.startswith("bsn.") else k): _Shape(v) for k, v in shapes.items()}
    if len(bsn.get("head.0.weight", _Shape(())).shape) != 4:
        raise CheckpointError(f"{path}: not an SS-BSN checkpoint (no bsn.head.0.weight)")
    found = infer_config(bsn)
    if any(found[k] != v for k, v in PAPER_SHAPES.items()):
        raise CheckpointError(
            f"{path}: no model configuration ({CONFIG_KEY} metadata), and the weights "
            f"({', '.join(f'{k}={v}' for k, v in found.items())}) are not the paper's "
            "architecture, so its PD strides, attention scope and inference settings are "
            "unknown; use the file 'ssbsn train' wrote, or SSBSN.from_official(path, ...) "
            "with the configuration in Python")


def _conv_fallback(config: dict, overrides: dict, path) -> None:
    """A model stored with ``conv_backend="cuda"`` where the CUDA extension cannot run: the
    same weights through torch's convolutions (identical keys and shapes), with a warning."""
    if config.get("conv_backend") != "cuda" or "conv_backend" in overrides:
        return
    from .nn._cuda_ext import conv_backend_info
    info = conv_backend_info()
    if info.startswith("torch"):
        config["conv_backend"] = "torch"
        log.warning("%s: stored with conv_backend 'cuda', which cannot run here (%s); using "
                    "torch convolutions with the same weights", path, info[len("torch ("):-1])
