"""The Python façade: what the ``ssbsn`` command, the demo and users call.

    >>> from ssbsn import Denoiser, evaluate
    >>> d = Denoiser.from_weights("runs/mine/model.safetensors", device="auto", backend="fused")
    >>> clean = d.denoise_image(noisy)                 # uint8/uint16/float image in, same out
    >>> d.denoise_files(["photos/"], "denoised/")      # files and folders, atomic writes
    >>> report = evaluate(d, "SIDD/ValidationNoisyBlocksSrgb.mat")   # rows + means

Inference options (the fields of :class:`ssbsn.config.InferenceConfig`: ``r3``,
``self_ensemble``, ``shifts``, ``tile``, ``overlap``, ``pd``, ``seed``, ``lowpass``, ``blend``,
``wiener``, ``debias``) left at None take the model's own settings (``model.inference``,
``pd_test``); a :class:`Denoiser` runs them through its :class:`ssbsn.restore.Pipeline`.
Problems with the inputs raise the errors of :mod:`ssbsn.errors`; progress lines go to the
``ssbsn`` logger (:mod:`logging`), and bars (tqdm, stderr) appear only when asked for.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .atomic import check_writable_dir
from .errors import UserError

log = logging.getLogger("ssbsn")


# denoise_files keeps the images it decodes while checking the inputs, up to this many bytes,
# so that they are not decoded again (the rest are read a second time when their turn comes)
KEEP_DECODED_BYTES = 1 << 30


def inference_options(model=None) -> tuple[str, ...]:
    """The inference options (the fields of :class:`ssbsn.config.InferenceConfig`: r3,
    self_ensemble, shifts, tile, overlap, pd, seed, lowpass, ...). ``model``: unused, kept
    for older callers."""
    from .config import inference_field_names
    return inference_field_names()


def load_model(weights, device: str = "auto", backend: str | None = None,
               deterministic: bool | None = None, attention_window: int | None = None):
    """An SSBSN from our safetensors file (or the run folder of ``ssbsn train`` holding it) or
    the authors' checkpoint, on ``device``, in eval mode. ``backend``: SS-Attention's
    (:data:`ssbsn.config.BACKENDS`; default "fused", the memory-efficient path; "reference"
    materialises the N×N matrix). ``attention_window``: SS-Attention's scope in pixels (0:
    whole-map groups; None: the model's own)."""
    from .model import SSBSN
    from .train import pick_device
    runtime = {k: v for k, v in dict(backend=backend, deterministic=deterministic,
                                     attention_window=attention_window).items()
               if v is not None}
    model = SSBSN.load(weights, **runtime)
    return model.to(pick_device(device)).eval()


def network_passes(model, shape, r3: bool | None = None, self_ensemble: bool | None = None,
                   tile: int | None = None, shifts: bool | None = None,
                   pd: int | None = None, blend: bool | None = None,
                   overlap: int | None = None) -> int:
    """How many times the pipeline runs the BSN on an (H, W) image: per tile, one pass
    plus one per R3 round, for each of the 8 flips/rotations with self-ensemble and each of
    the PD stride's s² shifts with the shifted-PD ensemble; the blend adds its second estimate
    at the training stride when that differs (with the ensemble, that stride's s shifts of a
    Latin square; :func:`pass_costs` lists them). None: the model's own setting."""
    return len(pass_costs(model, shape, r3=r3, self_ensemble=self_ensemble, tile=tile,
                          shifts=shifts, pd=pd, blend=blend, overlap=overlap))


# The time per image pixel of one network pass, about PASS_US[0] + PASS_US[1] × its
# multiply-adds per pixel (its convolution weights), and of each step after the network, in
# microseconds on a two-core CPU with both threads: what lets a progress bar that counts
# passes count those steps as passes too, and weigh each unit of work by its cost for the ETA
# (:class:`PassEta`). The pass's form was fitted on 16- to 48-channel models and its constant
# set to the quick model's pass on the CPU inference path (strips of rows, fused convolution +
# ReLU, channels_last); the steps against that pass, both from the quick preset's full
# inference at 1024² to 4000×3000 on a machine that runs nothing else
# (benchmarks/results/inference_scaling/, timing_strips.md: network / Wiener / the rest).
PASS_US = (0.77, 0.021e-3)
STEP_US = dict(wiener=3.1, blend=0.95, debias=0.62, lowpass=0.075)


def pass_cost(model) -> float:
    """Estimated microseconds per pixel of one network pass of ``model`` (see :data:`PASS_US`)."""
    weights = sum(p.numel() for p in model.bsn.parameters() if p.dim() == 4)
    return PASS_US[0] + PASS_US[1] * weights


def _window_sides(n: int, tile: int, overlap: int) -> list[int]:
    """The sides of the windows that :func:`ssbsn.restore.estimate.tiled` cuts along one axis
    of ``n`` pixels (``tile`` and ``overlap`` already rounded; one window of n when untiled)."""
    if not tile:
        return [n]
    from .restore.estimate import tile_starts
    return [min(s + tile + overlap, n) - max(s - overlap, 0) for s in tile_starts(n, tile)]


def _window_area(shape, tile: int, overlap: int, b: int) -> float:
    """The mean area of the windows that :func:`ssbsn.restore.estimate.tiled` cuts from an
    (H, W) image (the whole image when ``tile`` is 0)."""
    H, W = shape[:2]
    if not tile:
        return float(H * W)
    up = lambda n: -(-n // b) * b  # noqa: E731  (as restore.estimate.tiled rounds them)
    hs, ws = _window_sides(H, up(tile), up(overlap)), _window_sides(W, up(tile), up(overlap))
    return sum(hs) * sum(ws) / (len(hs) * len(ws))


def pass_costs(model, shape, r3: bool | None = None, self_ensemble: bool | None = None,
               tile: int | None = None, shifts: bool | None = None, pd: int | None = None,
               blend: bool | None = None, overlap: int | None = None) -> list[float]:
    """The estimated cost in microseconds of each network pass on an (H, W) image, in the
    order the pipeline makes them (:func:`network_passes` of them): the estimate at the
    inference stride, then the blend's at the training stride; per tile window, its
    self-ensemble, shifts and R3 rounds. A pass costs :func:`pass_cost` per pixel of the
    window it sees (rounded up to the PD stride). None: the model's own setting."""
    s = model.inference_settings(r3=r3, self_ensemble=self_ensemble, tile=tile, shifts=shifts,
                                 pd=pd, blend=blend, overlap=overlap)
    per_pixel = pass_cost(model)
    from .restore.estimate import shift_offsets
    # the blend's reference at the training stride takes the Latin square of the shifts
    strides = [(s["pd"], False)] + ([(model.pd_train, True)]
                                    if s["blend"] and model.pd_train != s["pd"] else [])
    costs = []
    for b, latin in strides:
        up = lambda n: -(-n // b) * b  # noqa: E731  (as restore.estimate.tiled rounds them)
        t, o = (up(s["tile"]), up(s["overlap"])) if s["tile"] else (0, 0)
        inner = ((8 if s["self_ensemble"] else 1)
                 * (len(shift_offsets(b, latin)) if s["shifts"] else 1)
                 * (1 + model.r3_T if s["r3"] else 1))
        for h in _window_sides(shape[0], t, o):
            for w in _window_sides(shape[1], t, o):
                costs += [per_pixel * up(h) * up(w)] * inner
    return costs


def after_network_us(model, shape, tile: int | None = None, overlap: int | None = None,
                     pd: int | None = None, lowpass: float | None = None,
                     blend: bool | None = None, wiener: bool | None = None,
                     debias: bool | None = None) -> float:
    """The estimated time in microseconds of the steps after the network (lowpass per
    estimate, blend, Wiener, debias) on an (H, W) image (:data:`STEP_US`). None: the model's
    own setting."""
    s = model.inference_settings(tile=tile, overlap=overlap, pd=pd, lowpass=lowpass,
                                 blend=blend, wiener=wiener, debias=debias)
    estimates = 2 if s["blend"] and model.pd_train != s["pd"] else 1
    cost = ((STEP_US["lowpass"] * estimates if s["lowpass"] > 0 else 0)
            + STEP_US["blend"] * s["blend"] + STEP_US["wiener"] * s["wiener"]
            + STEP_US["debias"] * s["debias"])
    return cost * shape[0] * shape[1]


def after_network_work(model, shape, tile: int | None = None, overlap: int | None = None,
                       pd: int | None = None, lowpass: float | None = None,
                       blend: bool | None = None, wiener: bool | None = None,
                       debias: bool | None = None) -> int:
    """The work of the steps after the network (lowpass per estimate, blend, Wiener, debias)
    on an (H, W) image, in network passes (of the mean tile window when tiled; see
    :data:`STEP_US`), so that a progress bar that counts passes can count them too. None:
    the model's own setting."""
    cost = after_network_us(model, shape, tile=tile, overlap=overlap, pd=pd, lowpass=lowpass,
                            blend=blend, wiener=wiener, debias=debias)
    if not cost:
        return 0
    s = model.inference_settings(tile=tile, overlap=overlap, pd=pd)
    per_pass = pass_cost(model) * _window_area(shape, s["tile"], s["overlap"], s["pd"])
    return max(1, round(cost / per_pass))


class PassEta:
    """The remaining time of a run of network passes and the steps after them, from the
    estimated cost of each (``costs``: one per pass, in order, and ``after`` for the steps;
    any unit, e.g. :func:`pass_costs` and :func:`after_network_us`) and the time measured.

    The first pass's time does not predict the others' (set-up on first use: oneDNN's
    primitives, fresh memory faulted in; from as fast as a later pass to half as slow again,
    benchmarks/results/eta/), so the rate is the time since the first pass ended over the
    cost done since, and there is no estimate before the second pass ends (unless the first
    is the only one: then its own rate). Every pass, and the steps after the network (one
    update when they end), is weighed by its cost, so tiles of different sizes, the blend's
    passes at another stride and the steps after the network each count for what they take.
    ``clock``: the time in seconds (a fake one in tests)."""

    def __init__(self, costs, after: float = 0.0, clock=time.perf_counter):
        self.clock = clock
        self.cum = [0.0]
        for c in costs:
            self.cum.append(self.cum[-1] + float(c))
        self.total = self.cum[-1] + float(after)
        self.start = clock()
        self.ends: list[float] = []  # when each pass ended

    def tick(self) -> None:
        """One network pass done (now)."""
        self.ends.append(self.clock())

    def seconds_left(self, now: float | None = None) -> float | None:
        """The estimated remaining time; None while there is no trustworthy estimate."""
        now = self.clock() if now is None else now
        passes = len(self.cum) - 1
        done = min(len(self.ends), passes)
        if done == 0 or self.total <= 0 or (done == 1 and passes > 1):
            return None
        if done == 1 or self.cum[done] <= self.cum[1]:  # the only pass: its own rate
            rate = (self.ends[0] - self.start) / (self.cum[1] or 1.0)
        else:
            rate = (self.ends[done - 1] - self.ends[0]) / (self.cum[done] - self.cum[1])
        return max(0.0, rate * (self.total - self.cum[done]) - (now - self.ends[done - 1]))


def _eta_bar(tqdm_cls):
    """A tqdm subclass whose remaining time is its ``eta``'s (:class:`PassEta`) when it has
    one: tqdm shows (total − n) / rate, so the rate it is given is the one that makes that the
    estimate (and shows "?" while it has none)."""
    class EtaBar(tqdm_cls):
        eta = None

        @property
        def format_dict(self):
            d = super().format_dict
            if self.eta is not None and self.total and self.n < self.total:
                left = self.eta.seconds_left()
                d["rate"] = 0 if left is None else (self.total - self.n) / max(left, 1e-3)
            return d
    return EtaBar


@contextmanager
def network_progress(model, total: int, desc: str, progress: bool | None, eta=None):
    """A tqdm bar on stderr (with ETA) that advances with every pass through ``model.bsn``
    (a forward hook); ``total`` may include other work (:func:`after_network_work`) that the
    caller adds with ``bar.update``. ``progress``: True shows it, False hides it, None shows
    it on a terminal once the work takes more than a second. ``eta``: a :class:`PassEta`
    whose estimate the bar shows (None: tqdm's, from the mean rate since the start)."""
    from tqdm import tqdm
    # smoothing=0: without ``eta``, the ETA from the mean rate since the start, not from the
    # last few passes (tile windows differ in size)
    bar = _eta_bar(tqdm)(total=total, desc=desc, unit="pass", leave=False, dynamic_ncols=True,
                         smoothing=0, disable=None if progress is None else not progress,
                         delay=1.0 if progress is None else 0.0)
    bar.eta = eta

    def tick(*_):  # a forward hook that returns None leaves the output alone
        if eta is not None:
            eta.tick()
        bar.update(1)
    handle = model.bsn.register_forward_hook(tick)
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()


def _not_an_array(what: str, img) -> UserError:
    kind = type(img).__module__.split(".")[0] + "." + type(img).__name__ \
        if type(img).__module__ != "builtins" else type(img).__name__
    hint = " (use tensor.cpu().numpy())" if kind.startswith("torch.") else ""
    return UserError(f"{what} takes a numpy array, got {kind}{hint}")


def check_model_array(img) -> np.ndarray:
    """Refuse (:class:`UserError`, naming the problem) what :func:`denoise_array` cannot take:
    anything but a real-valued (H, W, C) numpy array with C = 1 or 3, at least
    :data:`ssbsn.images.MIN_SIDE` pixels a side, finite samples in 0..255."""
    from .images import MIN_SIDE
    if not isinstance(img, np.ndarray):
        raise _not_an_array("denoise_array", img)
    if img.dtype == bool or img.dtype.kind not in "uif":
        raise UserError(f"denoise_array: unsupported sample type {img.dtype} (expected float "
                        "samples in 0..255)")
    if img.ndim != 3:
        raise UserError(f"denoise_array: expected an (H, W, C) array, got shape {img.shape}")
    if img.shape[-1] not in (1, 3):
        chw = " (a (C, H, W) array? transpose it to (H, W, C))" \
            if img.shape[0] in (1, 3) else ""
        raise UserError(f"denoise_array: an (H, W, C) array needs C = 1 (grey) or 3 (RGB), "
                        f"got shape {img.shape}{chw}")
    if img.size == 0:
        raise UserError(f"denoise_array: empty image (shape {img.shape})")
    if min(img.shape[:2]) < MIN_SIDE:
        raise UserError(f"denoise_array: {img.shape[0]}×{img.shape[1]} image is too small (at "
                        f"least {MIN_SIDE}×{MIN_SIDE} pixels)")
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        raise UserError("denoise_array: the image holds NaN or Inf samples")
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 255.0:
        raise UserError(f"denoise_array: samples outside 0..255 (min {lo:g}, max {hi:g}); the "
                        "model works on values in 0..255")
    return img


def check_image_array(image) -> np.ndarray:
    """Refuse (:class:`UserError`) what :meth:`Denoiser.denoise_image` cannot take, as
    :func:`ssbsn.images.read_image` refuses a file: anything but an (H, W) or (H, W, C) numpy
    array of uint8, uint16 or float in 0..1 (C = 1 or 3, optionally with alpha)."""
    from .images import validate_samples
    if not isinstance(image, np.ndarray):
        raise _not_an_array("denoise_image", image)
    if image.dtype == bool:
        raise UserError("denoise_image: boolean array; give uint8 (0..255), uint16 or float "
                        "(0..1) samples")
    if image.ndim not in (2, 3):
        raise UserError(f"denoise_image: expected an (H, W) or (H, W, C) array, got shape "
                        f"{image.shape}")
    if image.ndim == 3 and image.shape[-1] not in (1, 2, 3, 4):
        chw = " (a (C, H, W) array? transpose it to (H, W, C))" \
            if image.shape[0] in (1, 2, 3, 4) else ""
        raise UserError(f"denoise_image: {image.shape[-1]} channels in an array of shape "
                        f"{image.shape}; expected 1 (grey) or 3 (RGB), optionally with alpha"
                        f"{chw}")
    validate_samples(image, "denoise_image")
    return image


def _refuse_constant_output(img: np.ndarray, y: np.ndarray) -> None:
    """A non-constant image whose result is one value everywhere (after clipping to 0..255)
    was not denoised: a model that failed its training (all-black outputs)."""
    flat = np.clip(y, 0.0, 255.0)
    if img.max() > img.min() and flat.max() == flat.min():
        raise UserError(f"the model's output is the constant {float(flat.flat[0]):g} for a "
                        "non-constant image: this model does not denoise (its training "
                        "failed?); nothing is written for it")


def denoise_array(model, img: np.ndarray, progress: bool | None = False,
                  desc: str = "denoise", pipeline=None, **options) -> np.ndarray:
    """Denoise one (H, W, C) float image in 0..255 (C = 1 or 3) → float (H, W, C).

    ``options`` are the inference settings (:func:`inference_options`: r3, self_ensemble,
    shifts, tile, overlap, pd, seed, ...); None takes the model's own setting.
    ``pipeline``: the :class:`ssbsn.restore.Pipeline` to run (None: the model's). A grey image
    given to a 3-channel model is replicated to 3 channels and the result averaged back to
    one; an RGB image cannot go through a 1-channel model. ``progress``: see
    :func:`network_progress` (per tile and R3 round).
    """
    import torch

    from .restore import Pipeline
    check_model_array(img)
    pipeline = Pipeline(model) if pipeline is None else pipeline
    c = img.shape[-1]
    m = model.in_channels
    if c == m:
        x = img
    elif c == 1 and m == 3:
        x = np.repeat(img, 3, axis=-1)
    else:
        raise UserError(f"the model takes {m}-channel images; this image has {c} channels")
    dev = next(model.parameters()).device
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))[None]
    net = {k: options.get(k) for k in ("r3", "self_ensemble", "tile", "shifts", "pd", "blend",
                                       "overlap")}
    steps = {k: options.get(k) for k in ("tile", "overlap", "pd", "lowpass", "blend", "wiener",
                                         "debias")}
    passes = network_passes(model, img.shape, **net)
    after = after_network_work(model, img.shape, **steps)
    eta = PassEta(pass_costs(model, img.shape, **net), after_network_us(model, img.shape,
                                                                         **steps))
    with network_progress(model, passes + after, desc, progress, eta=eta) as bar:
        y = pipeline(t.to(dev), **options)[0].float().cpu().numpy().transpose(1, 2, 0)
        bar.update(after)  # the steps after the network, done
    if c == 1 and m == 3:
        y = y.mean(axis=-1, keepdims=True)
    if not np.isfinite(y).all():
        raise UserError("the model's output holds NaN or Inf (its weights do not work on this "
                        "image); nothing is written for it")
    _refuse_constant_output(img, y)
    return y


def plan_outputs(inputs, output) -> list[tuple[Path, Path]]:
    """(source, destination) for every image of ``inputs`` (files and folders). ``output`` is
    a file when one image file goes to a name with a suffix (an image suffix; another is
    refused), otherwise a folder that receives the inputs' names (a folder input keeps its
    sub-folders); an existing folder or a name ending in / is always a folder. Several images
    or a folder given to a name with an image suffix are refused. An output folder inside a
    folder input is not read as input: its files are outputs (of this run or of an earlier
    one)."""
    from .data import list_images
    from .images import IMAGE_SUFFIXES, is_image_file
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    out = Path(output)
    pairs = []
    for item in inputs:
        p = Path(item)
        inside = p.is_dir() and out.resolve() != p.resolve() \
            and out.resolve().is_relative_to(p.resolve())
        found = [f for f in list_images(p, recursive=True)
                 if not (inside and f.resolve().is_relative_to(out.resolve()))]
        if not found:
            raise UserError(f"{p}: no images found in this folder outside the output folder "
                            f"{out}")
        pairs += [(f, f.relative_to(p) if p.is_dir() else Path(f.name)) for f in found]
    folder = out.is_dir() or str(output).endswith(("/", os.sep))
    one_file = len(pairs) == 1 and not Path(inputs[0]).is_dir()
    if not folder and one_file and out.suffix:
        if not is_image_file(out):
            raise UserError(f"{out}: cannot write {out.suffix!r} images (use one of "
                            f"{', '.join(IMAGE_SUFFIXES)}); end the name with / for a folder")
        return [(pairs[0][0], out)]
    if not folder and is_image_file(out):
        what = f"{len(pairs)} images" if len(pairs) > 1 else f"the folder {inputs[0]}"
        raise UserError(f"{out} names one image file, but {what} would go to it; give a "
                        f"folder as the output (e.g. {out.with_suffix('')})")
    plan = [(src, out / rel) for src, rel in pairs]
    seen = {}
    for src, dst in plan:
        key = dst.resolve()
        if key in seen:
            raise UserError(f"{src} and {seen[key]} would both be written to {dst}")
        seen[key] = src
    return plan


class Denoiser:
    """A trained SS-BSN ready to denoise arrays and files.

    ``Denoiser(model)`` wraps an :class:`ssbsn.SSBSN`; :meth:`from_weights` loads one. Options
    given to the constructor (``r3=False``, ``tile=512``, ...) become this denoiser's defaults;
    options given to a call override them; None leaves the model's own setting. The
    denoiser owns the inference: ``self.pipeline``, an :class:`ssbsn.restore.Pipeline` of the
    model (the network's estimate and the restoration steps).
    """

    def __init__(self, model, **options):
        from .restore import Pipeline
        self.model = model.eval()
        self.pipeline = Pipeline(self.model)
        self.options = self._check(options)

    @classmethod
    def from_weights(cls, path, device: str = "auto", backend: str | None = None,
                     deterministic: bool | None = None, attention_window: int | None = None,
                     **options) -> "Denoiser":
        """Load our safetensors file (or its run folder) or the authors' checkpoint (see
        :func:`load_model`). A model whose training check failed
        (:func:`ssbsn.health.stored_check`) loads with a warning on the ``ssbsn`` logger."""
        from .health import failed_check_line, stored_check
        check = stored_check(path)
        if check is not None and not check["ok"]:
            log.warning("%s", failed_check_line(path, check))
        return cls(load_model(path, device, backend, deterministic, attention_window),
                   **options)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _check(self, options: dict) -> dict:
        unknown = sorted(set(options) - set(inference_options()))
        if unknown:
            raise TypeError(f"unknown inference option(s): {', '.join(unknown)}")
        from .config import check_inference
        given = {k: v for k, v in options.items() if v is not None}
        return check_inference(given, self.pipeline.config_cls, partial=True)

    def _options(self, options: dict) -> dict:
        return {**self.options, **self._check(options)}

    def denoise_array(self, img: np.ndarray, progress: bool | None = False,
                      desc: str = "denoise", **options) -> np.ndarray:
        """(H, W, C) float in 0..255 → float (H, W, C) in 0..255 (:func:`denoise_array`)."""
        check_model_array(img)
        return denoise_array(self.model, img, progress=progress, desc=desc,
                             pipeline=self.pipeline, **self._options(options))

    def denoise_image(self, image: np.ndarray, progress: bool | None = False,
                      desc: str = "denoise", **options) -> np.ndarray:
        """Denoise an image as read (:func:`ssbsn.images.read_image`): (H, W) or (H, W, C)
        uint8, uint16 or float in 0..1, C = 1 or 3 optionally followed by alpha (kept as is).
        Returns the same shape and sample type."""
        from .images import check_size, from_model_range, split_alpha, to_model_range
        check_image_array(image)
        grey2d = image.ndim == 2
        img = image[..., None] if grey2d else image
        colour, alpha = split_alpha(img)
        check_size(colour)
        y = self.denoise_array(to_model_range(colour), progress=progress, desc=desc,
                               **options)
        out = from_model_range(y, colour.dtype)
        if alpha is not None:
            out = np.concatenate([out, alpha], axis=-1)
        return out[..., 0] if grey2d else out

    def denoise_files(self, inputs, output, overwrite: bool = False,
                      progress: bool | None = False, skip_existing: bool = False,
                      **options) -> list[tuple[Path, Path]]:
        """Denoise image files and folders into ``output`` (see :func:`plan_outputs`); each
        output has its input's format, bit depth, alpha and ICC profile. Everything that can
        fail is checked before anything is written; existing files are replaced only with
        ``overwrite``, or kept (and their inputs skipped) with ``skip_existing``: outputs are
        written atomically, so one that exists is complete, and a batch that was stopped
        continues where it stopped. Returns the (source, destination) pairs written."""
        from tqdm import tqdm

        from .images import (check_size, check_writable_as, icc_profile, read_image,
                             split_alpha, write_image)
        if overwrite and skip_existing:
            raise UserError("--overwrite and --skip-existing exclude each other")
        plan = plan_outputs(inputs, output)
        todo = []
        for src, dst in plan:
            if dst.exists():
                if dst.resolve() == src.resolve():
                    if not overwrite:
                        raise UserError(f"{dst} is an input; use --overwrite to replace it")
                elif skip_existing:
                    log.info("%s exists: skipped", dst)
                    continue
                elif not overwrite:
                    raise UserError(f"{dst} exists; use --overwrite to replace it, or "
                                    "--skip-existing to keep it and denoise only the images "
                                    "whose outputs are missing")
            todo.append((src, dst))
        m = self.model.in_channels
        decoded, budget = {}, KEEP_DECODED_BYTES  # decoded once while they fit the budget
        for src, dst in todo:
            img = read_image(src)
            colour = split_alpha(img)[0]
            check_size(colour, src)
            c = colour.shape[-1]
            if c != m and not (c == 1 and m == 3):
                raise UserError(f"{src}: {c}-channel image, but the model takes "
                                f"{m}-channel images")
            try:  # the output keeps the input's sample type and channels
                check_writable_as(dst, img.dtype, img.shape[-1])
            except UserError as e:
                raise UserError(f"{e} (the input {src} holds {img.dtype} samples)") from None
            if img.nbytes <= budget:
                decoded[src], budget = img, budget - img.nbytes
        for folder in sorted({dst.parent for _, dst in todo}):
            check_writable_dir(folder)
        bars = None if progress is None else not progress
        for src, dst in tqdm(todo, desc="denoise", unit="img",
                             disable=True if len(todo) < 2 else bars):
            img = decoded.pop(src) if src in decoded else read_image(src)
            out = self.denoise_image(img, progress=progress, desc=src.name, **options)
            write_image(dst, out, icc_profile=icc_profile(src))  # upright, same profile
            log.info("%s -> %s", src, dst)
        return todo

    def submit_sidd(self, blocks_file, output, overwrite: bool = False,
                    progress: bool | None = False, **options) -> Path:
        """Denoise SIDD's BenchmarkNoisyBlocksSrgb.mat and write the submission file
        (``SubmitSrgb.mat``: DenoisedBlocksSrgb, TimeMPSrgb, OptionalData)."""
        from tqdm import tqdm

        from .data import load_sidd_blocks, write_sidd_submission
        from .data.sidd import SIDD_BENCHMARK_KEY, SIDD_GT_KEYS, SIDD_NOISY_KEYS
        from .metrics import quantize
        out = Path(output)
        if out.exists() and not overwrite:
            raise UserError(f"{out} exists; use --overwrite to replace it")
        check_writable_dir(out.resolve().parent)
        # the benchmark's blocks, by their variable (or a file's own stem), never the
        # validation set's noisy or clean blocks
        stem = Path(blocks_file).stem
        keys = (SIDD_BENCHMARK_KEY,) + (() if stem in SIDD_NOISY_KEYS + SIDD_GT_KEYS else (stem,))
        blocks = load_sidd_blocks(blocks_file, key=keys)
        result = np.empty_like(blocks)
        t0 = time.perf_counter()
        n, m = blocks.shape[:2]
        for i in tqdm(range(n * m), desc="SIDD", unit="block",
                      disable=None if progress is None else not progress):
            result[i // m, i % m] = quantize(
                self.denoise_array(blocks[i // m, i % m].astype(np.float32), **options))
        mp = n * m * blocks.shape[2] * blocks.shape[3] / 1e6
        write_sidd_submission(out, result, time_mp=(time.perf_counter() - t0) / mp)
        log.info("wrote %s (%d×%d blocks)", out, n, m)
        return out

    def submit_dnd(self, dnd_root, output, progress: bool | None = False,
                   overwrite: bool = False, **options) -> list[Path]:
        """Denoise DND's sRGB crops and write the bundled submission (a new folder of
        0001.mat … 0050.mat, as the DND kit's bundle_submissions_srgb writes them). An
        existing folder that is not empty is replaced (whole, once the new one is complete)
        only with ``overwrite``."""
        from tqdm import tqdm

        from .data import DNDBoxes, write_dnd_bundle
        from .data.dnd import check_bundle_target
        from .metrics import quantize
        dnd = DNDBoxes(dnd_root)
        out = Path(output)
        check_bundle_target(out, overwrite)
        check_writable_dir(out.resolve().parent)
        results: dict[int, list] = {}
        for idx in tqdm(range(len(dnd)), desc="DND", unit="box",
                        disable=None if progress is None else not progress):
            i = dnd.entries[idx][0]
            y = self.denoise_array(dnd.load(idx) * np.float32(255.0), **options)
            results.setdefault(i, []).append(quantize(y).astype(np.float32) / 255.0)
        files = write_dnd_bundle(out, results, overwrite=overwrite)
        log.info("wrote %d files to %s", len(files), out)
        return files


METRIC_CONVENTIONS = ("skimage peak_signal_noise_ratio(data_range=255), "
                      "structural_similarity(channel_axis=-1, data_range=255); output rounded "
                      "to uint8")


def evaluate(denoiser, noisy, clean=None, limit: int | None = None,
             save_dir=None, progress: bool | None = False, on_row=None,
             overwrite: bool = False, **options) -> dict:
    """PSNR and SSIM of the denoised images against clean references (scikit-image's
    conventions, output rounded to 8 bits), with the noisy input's scores beside them.

    ``denoiser``: a :class:`Denoiser` (or a checkpoint path, loaded with
    :meth:`Denoiser.from_weights`). ``noisy``/``clean``: see
    :func:`ssbsn.data.pairs.open_pairs`. ``save_dir``: also write the
    denoised images (PNG; files there are replaced only with ``overwrite``, checked before
    any work). ``on_row(row)`` is called after each image. Returns
    ``{"images": [row, ...], "mean": {...}, "seconds": ...}``; a row holds image, psnr_noisy,
    psnr, ssim_noisy, ssim."""
    from tqdm import tqdm

    from .data.pairs import open_pairs
    from .images import check_size, to_model_range, write_image
    from .metrics import psnr, quantize, ssim
    if not isinstance(denoiser, Denoiser):
        denoiser = Denoiser.from_weights(denoiser)
    names, load = open_pairs(noisy, clean)
    if limit is not None:
        if limit < 1:
            raise UserError("--limit must be at least 1")
        names = names[:limit]
    saved = [Path(save_dir) / f"{i:04d}_{Path(n).stem}.png" for i, n in enumerate(names)] \
        if save_dir else []
    if not overwrite:
        for path in saved:
            if path.exists():
                raise UserError(f"{path} exists; use --overwrite to replace it")
    if save_dir:
        check_writable_dir(Path(save_dir))
    rows = []
    t0 = time.perf_counter()
    for i in tqdm(range(len(names)), desc="eval", unit="img", leave=False,
                  disable=None if progress is None else not progress):
        x_in, ref_in = load(i)
        check_size(x_in, names[i])
        x, ref = to_model_range(x_in), to_model_range(ref_in)
        out = quantize(denoiser.denoise_array(x, progress=progress, desc=Path(names[i]).name,
                                              **options))
        row = dict(image=names[i], psnr_noisy=psnr(x, ref), psnr=psnr(out, ref),
                   ssim_noisy=ssim(x, ref), ssim=ssim(out, ref))
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if save_dir:
            write_image(saved[i], out)
    mean = {k: float(np.mean([r[k] for r in rows]))
            for k in ("psnr_noisy", "psnr", "ssim_noisy", "ssim")}
    return dict(images=rows, mean=mean, seconds=time.perf_counter() - t0)
