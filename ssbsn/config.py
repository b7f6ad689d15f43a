"""The model configuration, declared once: :class:`ModelConfig`.

Each field says its default, its help text, its command-line flag and the values it may take
(in the field's metadata). From that one declaration come:

* :class:`ssbsn.SSBSN` — the constructor takes a ``ModelConfig`` or the same fields as
  keywords; ``model.config`` is the ``ModelConfig``;
* training — :class:`ssbsn.train.TrainConfig` extends ``ModelConfig`` (its model fields are
  these, in config.yaml under the same names);
* the command line — :func:`add_model_options` builds the ``ssbsn train`` model options and
  the ``--backend`` option of the inference commands;
* checkpoints — :func:`check_model_value` is the schema :mod:`ssbsn.checkpoint` validates a
  stored configuration with.

SS-Attention's backends (one vocabulary for :func:`ssbsn.ss_attention`, ``SSAttention``,
``SSBSN``, training and the CLI), :data:`BACKENDS`:

* ``"fused"`` (default): memory-efficient — the Triton kernels on CUDA, SDPA on CPU;
* ``"reference"``: plain PyTorch with every group's N×N matrix (the oracle; memory grows as N²);
* ``"sdpa"``: ``scaled_dot_product_attention`` with the reference's numerics;
* ``"triton"``: the fused Triton kernels, nothing else.

``fused=True/False`` is the older spelling of ``backend="fused"/"reference"``; the
constructors and stored configurations still accept it.

This module imports nothing heavy (no PyTorch), so ``ssbsn --help`` stays quick.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import ConfigError

BACKENDS = ("fused", "reference", "sdpa", "triton")
CONV_BACKENDS = ("torch", "cuda")
PD_LAYOUTS = ("mosaic", "batch")
# runtime choices: the same weights run with any value, so checkpoints do not store them
RUNTIME_FIELDS = ("backend", "deterministic")


def _opt(help: str, flag: str | None, check=None, expected: str = "", **extra) -> dict:
    """Field metadata: help text, command-line flag (None: no option), the allowed values
    (``check(value) -> bool``, described by ``expected``) and argparse extras."""
    return dict(help=help, flag=flag, check=check, expected=expected, argparse=extra)


@dataclass
class ModelConfig:
    """SS-BSN's configuration; the defaults are the paper's (6,410,947 parameters)."""
    in_channels: int = field(default=3, metadata=_opt(
        "input channels: 1 for grey images, 3 for RGB", "--in-channels",
        lambda v: 1 <= v <= 4, "1..4", choices=(1, 3)))
    base_channels: int = field(default=128, metadata=_opt(
        "base channels C (even)", "--channels",
        lambda v: 2 <= v <= 4096 and v % 2 == 0, "an even number 2..4096", metavar="N"))
    num_modules: int = field(default=9, metadata=_opt(
        "modules per branch", "--modules", lambda v: 1 <= v <= 256, "1..256", metavar="N"))
    ss_blocks: int = field(default=3, metadata=_opt(
        "how many of the modules (the last ones) are SS-Blocks", "--ss-blocks",
        lambda v: 0 <= v <= 256, "0..num_modules", metavar="N"))
    gamma: int = field(default=2, metadata=_opt(
        "SS-Attention grid factor: grid g = gamma × dilation", "--gamma",
        lambda v: 1 <= v <= 64, "1..64", metavar="N"))
    pd_train: int = field(default=5, metadata=_opt(
        "PD stride in training", "--pd-train", lambda v: 1 <= v <= 64, "1..64", metavar="N"))
    pd_test: int = field(default=2, metadata=_opt(
        "PD stride at inference", "--pd-test", lambda v: 1 <= v <= 64, "1..64", metavar="N"))
    pd_pad: int = field(default=2, metadata=_opt(
        "padding of each PD sub-image", "--pd-pad", lambda v: 0 <= v <= 64, "0..64",
        metavar="N"))
    pd_layout: str = field(default="mosaic", metadata=_opt(
        "how the PD sub-images meet the network: mosaic (tiled into one map, the authors') or "
        "batch (each its own image: no convolution or attention reaches across sub-images)",
        "--pd-layout", lambda v: v in PD_LAYOUTS, "'mosaic' or 'batch'", choices=PD_LAYOUTS))
    r3_T: int = field(default=8, metadata=_opt(
        "R3 rounds", "--r3-rounds", lambda v: 1 <= v <= 1000, "1..1000", metavar="T"))
    r3_p: float = field(default=0.16, metadata=_opt(
        "R3 replacement probability", "--r3-p", lambda v: 0.0 <= v <= 1.0, "0..1",
        metavar="P"))
    attention_window: int = field(default=0, metadata=_opt(
        "SS-Attention's scope: groups are one grid phase inside windows of N pixels of the "
        "map the attention sees (rounded up to whole grid cells), so the cost grows linearly "
        "with the image area; 0 = the whole map (the paper's)", "--attention-window",
        lambda v: 0 <= v <= 65536, "0..65536", metavar="N"))
    group_stats: bool = field(default=False, metadata=_opt(
        "SS-Attention LayerNorm statistics per attention group (exact blind spot; the paper: "
        "per image)", "--group-stats"))
    conv_backend: str = field(default="torch", metadata=_opt(
        "blind-spot convolutions: torch (F.conv2d) or cuda (the extension in csrc/)",
        "--conv-backend", lambda v: v in CONV_BACKENDS, "'torch' or 'cuda'",
        choices=CONV_BACKENDS))
    backend: str = field(default="fused", metadata=_opt(
        "SS-Attention implementation: fused (memory-efficient: Triton on CUDA, SDPA on CPU), "
        "reference (the N×N matrix), sdpa or triton", "--backend",
        lambda v: v in BACKENDS, " or ".join(map(repr, BACKENDS)), choices=BACKENDS))
    deterministic: bool = field(default=False, metadata=_opt(
        "bitwise-repeatable SS-Attention gradients from the Triton kernels", "--deterministic"))

    # ------------------------------------------------------------------ mapping access
    def __getitem__(self, key: str):
        """``config["base_channels"]``; ``config["fused"]`` is the old name's view of backend."""
        if key == "fused":
            return self.backend != "reference"
        if key not in model_field_names():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return model_field_names()

    def to_dict(self, stored: bool = False) -> dict:
        """The fields as a dict; ``stored``: only those a checkpoint keeps (no runtime
        choices)."""
        return {k: getattr(self, k) for k in model_field_names()
                if not (stored and k in RUNTIME_FIELDS)}

    @classmethod
    def of(cls, obj) -> "ModelConfig":
        """The model fields of ``obj`` (e.g. a :class:`ssbsn.train.TrainConfig`)."""
        return cls(**{k: getattr(obj, k) for k in model_field_names()})

    @classmethod
    def from_kwargs(cls, fused: bool | None = None, **kwargs) -> "ModelConfig":
        """The configuration from keywords; ``fused`` (the older spelling) sets ``backend``
        unless ``backend`` is given too."""
        unknown = sorted(set(kwargs) - set(model_field_names()))
        if unknown:
            raise TypeError(f"unknown model configuration keyword(s): {', '.join(unknown)}")
        if fused is not None and kwargs.get("backend") is None:
            kwargs["backend"] = "fused" if fused else "reference"
        if kwargs.get("backend", "fused") is None:
            kwargs.pop("backend")
        return cls(**kwargs)


def model_field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ModelConfig))


def model_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(ModelConfig)


_TYPES = {
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v), "a number"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
}
_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
LEGACY_KEYS = {"fused": bool}  # older files and configurations: fused=true → backend "fused"


def check_model_value(key: str, value) -> None:
    """Check one stored configuration value against the field's declaration (type, then
    range). Raises :class:`ConfigError` ("key=value must be ..." / "... out of range")."""
    if key in LEGACY_KEYS:
        kind, meta = LEGACY_KEYS[key], {}
    else:
        f = {f.name: f for f in model_fields()}.get(key)
        if f is None:
            raise ConfigError(f"unknown key {key!r}")
        kind, meta = _FIELD_TYPES[str(f.type)], f.metadata
    is_type, type_name = _TYPES[kind]
    if not is_type(value):
        raise ConfigError(f"{key}={value!r} must be {type_name}")
    check = meta.get("check")
    if check is not None and not check(value):
        raise ConfigError(f"{key}={value!r} out of range (expected {meta['expected']})")


def add_model_options(parser, names=None, default=None, prefix_help: str = "") -> None:
    """Add the command-line options of the ModelConfig fields ``names`` (default: every field
    with a flag) to ``parser`` (an argparse parser or group). ``default``: the options' default
    (e.g. ``argparse.SUPPRESS``: only what is given is set); the help says the field's own."""
    import argparse
    for f in model_fields():
        meta = f.metadata
        if meta["flag"] is None or (names is not None and f.name not in names):
            continue
        kw = dict(meta["argparse"])
        if str(f.type) == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _FIELD_TYPES[str(f.type)]
        parser.add_argument(meta["flag"], dest=f.name, default=default,
                            help=f"{prefix_help}{option_help(f)}", **kw)


def option_help(f: dataclasses.Field) -> str:
    """A field's help text with its default (on/off for switches)."""
    shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
    return f"{f.metadata['help']} (default {shown})"
