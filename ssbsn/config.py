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

    def __post_init__(self):
        """Every field against its declaration (type, range) and ss_blocks ≤ num_modules:
        a :class:`ConfigError` (a ValueError) naming the field, whoever builds the config.
        ``attention_window=None`` is taken as 0 (the whole map), as SSAttention's window."""
        if self.attention_window is None:
            self.attention_window = 0
        check_model_fields(self)
        if self.ss_blocks > self.num_modules:
            raise ConfigError(f"model configuration ss_blocks={self.ss_blocks} exceeds "
                              f"num_modules={self.num_modules}")

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


def check_model_fields(obj) -> None:
    """Check every model field of ``obj`` (a ModelConfig, a TrainConfig) with
    :func:`check_model_value`: a :class:`ConfigError` "model configuration key=value ..."."""
    for key in model_field_names():
        try:
            check_model_value(key, getattr(obj, key))
        except ConfigError as e:
            raise ConfigError(f"model configuration {e}") from None


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


# ======================================================================== inference

def _is_tile(v) -> bool:
    return v == 0 or 8 <= v <= 65536


def _finite_in(lo: float, hi: float):
    return lambda v: math.isfinite(v) and lo <= v <= hi


def _inf(help: str, flag: str, check=None, expected: str = "", *, stored: bool = True,
         step: str | None = None, stage: str = "output", **extra) -> dict:
    """Field metadata of an inference setting: those of :func:`_opt`, and

    * ``stored``: whether a checkpoint keeps it (``ssbsn_inference``; the others are choices
      of one call: the PD stride, which defaults to the model's ``pd_test``, and R3's seed);
    * ``step``: ``"module:Class"`` of the restoration step that the setting switches on
      (:mod:`ssbsn.restore`; None: a setting of the network's estimate). A false or zero
      value leaves the step out; any other is handed to it;
    * ``stage``: ``"estimate"``: the step transforms every network estimate (the lowpass);
      ``"output"``: it refines the result, in the order of the fields."""
    return dict(_opt(help, flag, check, expected, **extra), stored=stored, step=step,
                stage=stage)


@dataclass
class InferenceConfig:
    """How a model denoises: the network's estimate (R3, ensembles, tiles, PD stride) and the
    restoration steps after it, declared once.

    The paper's inference is the default. A trained model carries its own values of the
    ``stored`` fields in its checkpoint (the JSON object under ``ssbsn_inference``); a
    command's flags and a call's keywords override them. From these declarations come the
    command-line options (:func:`add_inference_options`), the checkpoint schema and the one
    validation of every source (:func:`check_inference`), the presets' settings
    (:meth:`stored`) and the steps :class:`ssbsn.restore.Pipeline` runs, in field order
    (docs/restore.md: a new step is one module plus one field here)."""
    r3: bool = field(default=True, metadata=_inf(
        "R3 (random-replacing refinement: T rounds, probability p)", "--r3"))
    self_ensemble: bool = field(default=False, metadata=_inf(
        "average the 8 flips/rotations (8× slower, about +0.7 dB)", "--self-ensemble"))
    shifts: bool = field(default=False, metadata=_inf(
        "average over the PD stride² pixel shifts (no PD checkerboard; stride² slower)",
        "--shifts"))
    tile: int = field(default=0, metadata=_inf(
        "process in N×N tiles to bound memory; 0 = the whole image", "--tile",
        _is_tile, "a non-negative integer: 0 (the whole image) or 8..65536", metavar="N"))
    overlap: int = field(default=64, metadata=_inf(
        "context pixels around each tile", "--overlap", lambda v: 0 <= v <= 4096,
        "a non-negative integer 0..4096", metavar="N"))
    pd: int | None = field(default=None, metadata=_inf(
        "PD stride at inference; default: the model's pd_test", "--pd-test",
        lambda v: 1 <= v <= 64, "an integer 1..64 (smaller where the image is small)",
        stored=False, metavar="N"))
    seed: int = field(default=0, metadata=_inf(
        "seed of R3's random replacement", "--seed", lambda v: 0 <= v < 2 ** 32,
        "an integer 0..4294967295", stored=False, metavar="N"))
    lowpass: float = field(default=0.0, metadata=_inf(
        "keep the noisy image's low frequencies (Gaussian σ in pixels; removes brightness "
        "drift); 0 = off", "--lowpass", _finite_in(0.0, 128.0), "a number 0..128 (0 = off)",
        step="ssbsn.restore.lowpass:Lowpass", stage="estimate", metavar="SIGMA"))
    blend: bool = field(default=False, metadata=_inf(
        "combine the result with the noisy pixel, weighted by noise and error variances "
        "fitted on each image (keeps fine detail where the noise is weak)", "--blend",
        step="ssbsn.restore.blend:Blend"))
    wiener: bool = field(default=False, metadata=_inf(
        "refine with a collaborative Wiener filter (BM3D's second stage, this project's own), "
        "the result so far as its pilot", "--wiener", step="ssbsn.restore.wiener:Wiener"))
    debias: bool = field(default=False, metadata=_inf(
        "remove the brightness shift that a camera's tone curve and clipping give the noise's "
        "mean (sRGB camera photos)", "--debias", step="ssbsn.restore.debias:Debias"))

    def stored(self) -> dict:
        """The values a checkpoint keeps (``ssbsn_inference``), in field order."""
        return {f.name: getattr(self, f.name) for f in inference_fields(type(self))
                if f.metadata["stored"]}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def stored_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in inference_fields(cls) if f.metadata["stored"])

    @classmethod
    def resolve(cls, own: dict, **given) -> "InferenceConfig":
        """The settings of one call: each keyword left at None takes ``own`` (a model's stored
        settings, see :meth:`stored`), then the field's default; all checked once
        (:func:`check_inference`)."""
        values = {f.name: f.default for f in inference_fields(cls)}
        values.update(own)
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(**check_inference(values, cls))


def inference_fields(cls=InferenceConfig) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


def inference_field_names(cls=InferenceConfig) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _inference_kind(f: dataclasses.Field):
    """The field's value type (bool, int, float or str; ``int | None`` is int), whether the
    annotation is a string or a type."""
    if isinstance(f.type, type):
        return f.type
    return _FIELD_TYPES[str(f.type).split(" |")[0]]


def check_inference_value(f: dataclasses.Field, value):
    """One setting checked against its declaration (type, finiteness, range); returns it
    normalised (an integer lowpass as a float). Raises :class:`ConfigError` ("inference
    setting KEY must be EXPECTED, got VALUE")."""
    if value is None and f.default is None:
        return None
    kind = _inference_kind(f)
    is_type, type_name = _TYPES[kind]
    check = f.metadata["check"]
    if not is_type(value) or (check is not None and not check(value)):
        raise ConfigError(f"inference setting {f.name} must be "
                          f"{f.metadata['expected'] or type_name}, got {value!r}")
    return float(value) if kind is float else value


def check_inference(values: dict, cls=InferenceConfig, partial: bool = False,
                    stored: bool = False) -> dict:
    """The one validation of inference settings, whatever their source (a checkpoint's
    metadata, a preset, a training configuration, a command's flags, a call's keywords):
    known keys, each value's type and range, and the bounds between them. ``partial``: the
    keys given need not be all; ``stored``: only the settings a model keeps
    (:meth:`InferenceConfig.stored`) are known. Returns the values normalised; raises
    :class:`ConfigError` naming the key and the allowed range (a ``ValueError``)."""
    fields = {f.name: f for f in inference_fields(cls) if f.metadata["stored"] or not stored}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown inference settings: {', '.join(map(str, unknown))}")
    if not partial:
        missing = [k for k in fields if k not in values]
        if missing:
            raise ConfigError(f"missing inference settings: {', '.join(missing)}")
    out = dict(values)
    if out.get("tile", 0) is None:  # None has always meant the whole image
        out["tile"] = 0
    for k in out:
        out[k] = check_inference_value(fields[k], out[k])
    return out


def pd_area(pd: int, pad: int, height: int, width: int) -> int:
    """Pixels the network sees for one pass over a height×width image at PD stride ``pd`` with
    ``pad`` pixels of padding around each of the pd² sub-images."""
    return pd * pd * (-(-height // pd) + 2 * pad) * (-(-width // pd) + 2 * pad)


def check_pd_for_image(pd: int, pad: int, height: int, width: int) -> None:
    """Refuse a PD stride (with the model's PD pad) that would make one network pass see more
    than 4× the image's area plus 64² pixels: a stride near the image's size, or a large pad,
    turns the image into many tiny, mostly padded sub-images (minutes for a small image)."""
    limit = 4 * height * width + 4096
    if pd_area(pd, pad, height, width) > limit:
        fits = [b for b in range(1, 65) if pd_area(b, pad, height, width) <= limit]
        pads = [q for q in range(pad) if pd_area(pd, q, height, width) <= limit]
        allowed = " or ".join(
            ([f"PD stride 1..{max(fits)}"] if fits else [])
            + ([f"pd_pad 0..{max(pads)} at this stride"] if pads else []))
        raise ConfigError(
            f"inference setting pd={pd} with the model's pd_pad={pad} is too large for a "
            f"{height}×{width} image: the network would see "
            f"{pd_area(pd, pad, height, width)} pixels, over 4× the image plus 4096 "
            f"(allowed here: {allowed})")


def _covered(size: int, tile: int, overlap: int) -> int:
    """Total length of the windows :func:`ssbsn.restore.estimate.tiled` cuts along one side."""
    return sum(min(y0 + tile + overlap, size) - max(y0 - overlap, 0)
               for y0 in range(0, size, tile))


def tiled_area(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> int:
    """Pixels of all the windows that tiling a height×width image processes (tile and overlap
    rounded up to multiples of ``multiple``, as :func:`ssbsn.restore.estimate.tiled` does)."""
    up = lambda n: -(-n // multiple) * multiple  # noqa: E731
    t, o = up(tile), up(overlap)
    return _covered(height, t, o) * _covered(width, t, o)


TILED_AREA_LIMIT = 16  # tiles may make the network see at most 16× the image's area


def check_tiles_for_image(tile: int, overlap: int, height: int, width: int,
                          multiple: int = 1) -> None:
    """Refuse tiles so small against their overlap that the windows would cover the image
    more than :data:`TILED_AREA_LIMIT` times (each window is a tile plus its context)."""
    limit = TILED_AREA_LIMIT * height * width
    if not tile or tiled_area(height, width, tile, overlap, multiple) <= limit:
        return
    fits = next((t for t in range(tile + 1, max(height, width) + 1)
                 if tiled_area(height, width, t, overlap, multiple) <= limit),
                max(height, width))
    raise ConfigError(
        f"inference setting tile={tile} with overlap={overlap} would process the {height}×"
        f"{width} image {tiled_area(height, width, tile, overlap, multiple) / (height * width):.0f}"
        f" times over (at most {TILED_AREA_LIMIT}); allowed here: tile 0 or at least {fits}, "
        f"or a smaller overlap")


def add_inference_options(parser, cls=InferenceConfig) -> None:
    """The command-line options of every inference field of ``cls`` (those with a flag):
    switches as ``--X/--no-X``, values checked when parsed (a bad one is a usage error).
    Each option's default is None (the model's own setting), except those a checkpoint does
    not keep, whose default is the field's."""
    import argparse
    for f in inference_fields(cls):
        meta = f.metadata
        if meta["flag"] is None:
            continue
        kw = dict(meta["argparse"])
        kind = _inference_kind(f)
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _option_type(f, kind)
        if meta["stored"]:
            shown = ("on" if f.default else "off") if kind is bool else f.default
            default, tail = None, f"default: the model's setting ({shown} for the paper's)"
        else:
            default = f.default
            tail = "" if f.default is None else f"default {f.default}"
        help = meta["help"] + (f"; {tail}" if tail else "")
        parser.add_argument(meta["flag"], dest=f.name, default=default, help=help, **kw)


def _option_type(f: dataclasses.Field, kind):
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_TYPES[kind][1]}") from None
        try:
            return check_inference_value(f, value)
        except ConfigError:
            raise argparse.ArgumentTypeError(
                f"{text} is out of range (allowed: {f.metadata['expected']})") from None
    parse.__name__ = kind.__name__
    return parse
