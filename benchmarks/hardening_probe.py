"""The probe of issue #34 ("Hardening 2"): every case the issue lists, run again and judged.

Each command-line case runs ``python -m ssbsn ...`` in a subprocess of its own, in a fresh
folder under a temporary directory, with a time limit (``--timeout``, default 60 s); each API
case calls :class:`ssbsn.Denoiser` in this process (under an alarm of the same limit). One tiny
model (8 channels, 2 modules, 1 SS-Block; random weights scaled so that its outputs vary) is
built once and reused; images are small (48×64).

Verdicts: ``ok`` (the expected exit status and behaviour; a refusal is one ``ssbsn: error:``
line on stderr naming the problem), or a failure:

* ``silent-wrong-output``: exit 0 (or no exception) where the input had to be refused, or an
  output that is not what the input should give;
* ``overwrite``: an existing file was replaced (or removed) without ``--overwrite``;
* ``hang``: the time limit ran out;
* ``internal-error``: a traceback or "internal error" for a user's mistake;
* ``wrong-exit-code``: refused, but with another exit status than the documented one (2 for a
  bad command line, 1 for bad input, output or checkpoint);
* ``unclear-message``: refused with the right status, but not one line, or a line that does
  not name the problem;
* ``left-files``: refused, but files were written before the refusal.

    python -m benchmarks.hardening_probe                      # benchmarks/results/hardening/probe.md
    python -m benchmarks.hardening_probe --only lock,pd_test  # the cases whose name holds a word
    python -m benchmarks.hardening_probe --out report.md --timeout 90

Exit status 0 when every case is ok, 1 otherwise. About 5 minutes on 2 shared CPU cores.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import errno
import hashlib
import io
import json
import os
import pickle
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "hardening" / "probe.md"
TINY = dict(base_channels=8, num_modules=2, ss_blocks=1)
H, W = 48, 64  # the probe's image size

OK = "ok"


# ====================================================================== running and judging

@dataclasses.dataclass
class Run:
    """What a command did: exit status (None: killed at the time limit), stdout, stderr."""
    code: int | None
    out: str
    err: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.code is None


@dataclasses.dataclass
class Outcome:
    verdict: str
    got: str


@dataclasses.dataclass
class Case:
    section: str
    name: str
    expected: str
    fn: object
    outcome: Outcome | None = None
    seconds: float = 0.0


CASES: list[Case] = []


def case(section: str, name: str, expected: str):
    def register(fn):
        CASES.append(Case(section, name, expected, fn))
        return fn
    return register


class Probe:
    """Shared state: the temporary root, the model, the image, the time limit."""

    def __init__(self, root: Path, timeout: float):
        self.root = root
        self.timeout = timeout
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT)] + ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else []))
        self.env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        self.env.pop("COLUMNS", None)
        self.model = root / "model.safetensors"
        self.image = root / "x.png"
        self._n = 0

    def dir(self, name: str) -> Path:
        self._n += 1
        d = self.root / f"{self._n:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        d.mkdir()
        return d

    def cli(self, *argv, cwd: Path | None = None, timeout: float | None = None) -> Run:
        """``python -m ssbsn argv`` in ``cwd``; None as the code when killed at the limit."""
        cmd = [sys.executable, "-m", "ssbsn", *map(str, argv)]
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd or self.root, env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout or self.timeout)
            code = p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            code = None
        return Run(code, out, err, time.perf_counter() - t0)


def _first_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ssbsn: error:")]
    return (errors or lines or [""])[-1]


def _got(r: Run, extra: str = "") -> str:
    if r.timed_out:
        return f"killed after {r.seconds:.0f} s"
    line = _first_error(r.err)
    text = f"exit {r.code}" + (f": {line}" if line else "")
    return (text[:230] + "…" if len(text) > 231 else text) + (f"; {extra}" if extra else "")


def digest(*paths) -> dict:
    """Content hashes of every file under ``paths`` (files or folders), by path; a run
    folder's ``.lock`` (the process id of the last 'ssbsn train' that tried it) is left out."""
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()
                                               and q.name != ".lock") if p.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _internal(text: str) -> bool:
    return "Traceback" in text or "internal error" in text


def refused(r: Run, code: int, *words: str, keep: dict | None = None, absent=()) -> Outcome:
    """Judge a command that must be refused with exit status ``code`` and one error line
    holding every one of ``words`` (case-insensitive); ``keep``: a :func:`digest` of files
    that must stay as they were; ``absent``: paths that must not exist afterwards."""
    got = _got(r)
    if r.timed_out:
        return Outcome("hang", got)
    if _internal(r.err):
        return Outcome("internal-error", got)
    if keep is not None and digest(*keep) != keep:
        return Outcome("overwrite", got + "; existing files changed")
    left = [str(Path(p).name) for p in absent if Path(p).exists()]
    if r.code == 0:
        return Outcome("silent-wrong-output" if left or keep is not None else "wrong-exit-code",
                       got + (f"; wrote {', '.join(left)}" if left else ""))
    if r.code != code:
        return Outcome("wrong-exit-code", got)
    if left:
        return Outcome("left-files", got + f"; left {', '.join(left)}")
    lines = [ln for ln in r.err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ssbsn: error: ")]
    others = [ln for ln in lines if not ln.startswith(("ssbsn: error: ", "ssbsn: warning: "))]
    if len(errors) != 1 or others:
        return Outcome("unclear-message", got + f"; {len(lines)} lines on stderr")
    missing = [w for w in words if w.lower() not in errors[0].lower()]
    if missing:
        return Outcome("unclear-message", got + f"; does not say {' / '.join(missing)}")
    return Outcome(OK, got)


def accepted(r: Run, check=None, warn: str | None = None) -> Outcome:
    """Judge a command that must succeed (exit 0); ``check()`` returns what is wrong with its
    output (None: nothing); ``warn``: words a ``ssbsn: warning:`` line must hold."""
    got = _got(r)
    if r.timed_out:
        return Outcome("hang", got)
    if _internal(r.err):
        return Outcome("internal-error", got)
    if r.code != 0:
        return Outcome("wrong-exit-code", got)
    if warn is not None:
        warnings = [ln for ln in r.err.splitlines() if ln.startswith("ssbsn: warning:")]
        if not any(warn.lower() in ln.lower() for ln in warnings):
            return Outcome("unclear-message", got + f"; no warning saying {warn!r}")
        if any(ln.startswith("ssbsn: warning: warning:") for ln in warnings):
            return Outcome("unclear-message", got + "; 'warning: warning:'")
        got += f"; {warnings[0][:150]}"
    problem = check() if check is not None else None
    if problem:
        return Outcome("silent-wrong-output", got + f"; {problem}")
    return Outcome(OK, got)


class _Alarm(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def ring(*_):
        raise _Alarm()
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def api_refuses(probe: Probe, call, *words: str) -> Outcome:
    """Judge an API call that must raise :class:`ssbsn.errors.UserError` naming the problem."""
    from ssbsn.errors import UserError
    try:
        with time_limit(probe.timeout):
            result = call()
    except _Alarm:
        return Outcome("hang", f"no answer in {probe.timeout:.0f} s")
    except UserError as e:
        msg = str(e)
        got = f"{type(e).__name__}: {msg[:200]}"
        if "\n" in msg:
            return Outcome("unclear-message", got + "; more than one line")
        missing = [w for w in words if w.lower() not in msg.lower()]
        if missing:
            return Outcome("unclear-message", got + f"; does not say {' / '.join(missing)}")
        return Outcome(OK, got)
    except Exception as e:  # noqa: BLE001 - anything else is not the project's error
        return Outcome("internal-error", f"{type(e).__name__}: {str(e)[:200]}")
    shape = getattr(result, "shape", None)
    return Outcome("silent-wrong-output", f"returned {type(result).__name__} {shape or ''}")


# ====================================================================== inputs

def _rng(seed=0):
    return np.random.default_rng(seed)


def noisy_image(seed=0, shape=(H, W, 3), dtype=np.uint8) -> np.ndarray:
    """A smooth gradient with noise: non-constant, so the model's output varies."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    base = 60 + 100 * (yy / shape[0])[..., None] + 40 * (xx / shape[1])[..., None] \
        * np.array([1.0, 0.5, 0.2])[: (shape[2] if len(shape) == 3 else 1)]
    img = np.clip(base + _rng(seed).normal(0, 20, base.shape), 0, 255)
    if len(shape) == 2:
        img = img[..., 0]
    if dtype == np.uint16:
        return (img * 257).astype(np.uint16)
    if np.dtype(dtype).kind == "f":
        return (img / 255).astype(dtype)
    return img.astype(dtype)


def write(path, arr) -> Path:
    from ssbsn.images import write_image
    write_image(path, arr)
    return Path(path)


def noisy_folder(folder: Path, count=2, h=24, w=26) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        base = _rng(i).integers(40, 200, (1, 1, 3))
        img = np.clip(base + _rng(10 + i).normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        write(folder / f"{i}.png", img)
    return folder


def train_args(data, out, *extra) -> list:
    return ["train", data, "--out", out, "--crop", "10", "--steps", "2", "--batch", "2",
            "--no-progress", "--channels", "8", "--modules", "2", "--ss-blocks", "1", *extra]


def train_refused(p: "Probe", name: str, option: str, *extra):
    """``ssbsn train`` on a small noisy folder with ``extra`` options: a usage error (exit 2)
    that names ``option``, and no run folder made."""
    d = p.dir(name)
    r = p.cli(*train_args(noisy_folder(d / "imgs"), d / "run", *extra))
    return refused(r, 2, option, absent=[d / "run"])


def full_disk_on_save(real_save, on_call: int = 2):
    """A stand-in for ``torch.save`` whose ``on_call``-th call meets a full disk: it leaves a
    partial file and raises ENOSPC; the other calls save as ``real_save`` does."""
    calls = []

    def save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == on_call:
            with open(f, "wb") as h:
                h.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)
    return save


@contextlib.contextmanager
def recorded_bars():
    """``ssbsn.api.network_progress`` recorded for the block: the list it yields gets the bar
    when the bar opens, then (n, total) of the first bar each time a bar closes."""
    import ssbsn.api as api
    bars, original = [], api.network_progress

    def recording(*a, **k):
        cm = original(*a, **k)

        class Wrap:
            def __enter__(self):
                bars.append(cm.__enter__())
                return bars[-1]

            def __exit__(self, *e):
                bars.append((bars[0].n, bars[0].total))
                return cm.__exit__(*e)
        return Wrap()
    api.network_progress = recording
    try:
        yield bars
    finally:
        api.network_progress = original


def tiny_model(path: Path, **inference) -> Path:
    """The probe's model: :data:`TINY` with seed 0, its last convolution scaled so that its
    outputs lie around mid-grey and vary; without R3 unless ``inference`` says."""
    import torch

    from ssbsn import SSBSN
    torch.manual_seed(0)
    model = SSBSN(**TINY, inference=dict(dict(r3=False), **inference))
    with torch.no_grad():
        model.bsn.tail[-1].bias.fill_(120.0)
        model.bsn.tail[-1].weight.mul_(200.0)
    model.save(path)
    return path


def edit_model(src: Path, dst: Path, config=None, inference=None, meta=None,
               state=None, drop_meta: bool = False) -> Path:
    """A copy of the safetensors file ``src`` at ``dst`` with its stored configuration or
    inference settings updated (dicts merged), metadata keys set (``meta``) or the weights
    changed (``state(dict) -> dict``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(src), "pt") as f:
        md = dict(f.metadata() or {})
    weights = load_file(str(src))
    if config:
        md["ssbsn_config"] = json.dumps({**json.loads(md["ssbsn_config"]), **config})
    if inference:
        md["ssbsn_inference"] = json.dumps({**json.loads(md["ssbsn_inference"]), **inference})
    md.update(meta or {})
    if state is not None:
        weights = state(weights)
    save_file(weights, str(dst), metadata=None if drop_meta else md)
    return dst


def failed_check_model(probe: Probe, dst: Path) -> Path:
    """The probe's model carrying a failed training check in its metadata, as 'ssbsn train'
    stores one (ssbsn.health.CHECK_KEY)."""
    from ssbsn.health import CHECK_KEY
    check = dict(network=[30.0] * 3, neighbours=[20.0] * 3, stride=3, crops=4, size=48,
                 ratio=[1.5] * 3, ok=False, message="warning: training failed: ...")
    return edit_model(probe.model, dst, meta={CHECK_KEY: json.dumps(check)})


def authors_state(base=8, modules=3, ss=1, in_ch=3, seed=0) -> dict:
    """A state dict in the authors' layout, its weights at a tenth of a normal's scale."""
    from benchmarks.authors import authors_state_dict
    return authors_state_dict(base, modules, ss, in_ch, seed, scale=0.1)


def save_authors(path: Path, sd: dict) -> Path:
    import torch
    torch.save({"model_weight": {"denoiser": sd}}, path)
    return path


def cmyk_jpeg(path: Path, seed=3) -> np.ndarray:
    """A CMYK JPEG; returns Pillow's own RGB conversion of it (the oracle)."""
    from PIL import Image
    Image.fromarray(noisy_image(seed)).convert("CMYK").save(path, quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        return np.asarray(im.convert("RGB"))


def png_bomb(path: Path, w=30000, h=30000) -> Path:
    """A PNG whose header claims w×h grey pixels and holds almost none."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0,
                                                                      0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * (w + 1) * 4)) + chunk(b"IEND", b""))
    return path


def tiff_bomb(path: Path, h=100000, w=100000) -> Path:
    """A TIFF whose header claims h×w RGB pixels; the file is cut after its header."""
    import tifffile
    tifffile.imwrite(path, shape=(h, w, 3), dtype="uint8", photometric="rgb")
    with open(path, "r+b") as f:
        f.truncate(4096)
    return path


def make_dnd(root: Path, n_boxes=2, box=16, scale=1.0) -> Path:
    """A one-image DND folder: images_srgb/0001.mat (InoisySRGB stored transposed, float in
    0..``scale``) and info.mat with its boxes."""
    import h5py
    (root / "images_srgb").mkdir(parents=True)
    img = (noisy_image(0, (40, 44, 3)).astype(np.float32) / 255) * scale
    with h5py.File(root / "images_srgb" / "0001.mat", "w") as f:
        f["InoisySRGB"] = img.T
    boxes = np.array([[1 + 3 * k, 2 + 5 * k, box + 3 * k, 1 + 5 * k + box] for k in range(n_boxes)],
                     dtype=np.float64)
    with h5py.File(root / "info.mat", "w") as f:
        refs_group = f.create_group("#refs#")
        refs_group["b0"] = boxes.T
        refs = np.empty((1, 1), dtype=h5py.ref_dtype)
        refs[0, 0] = refs_group["b0"].ref
        f.create_group("info").create_dataset("boundingboxes", data=refs, dtype=h5py.ref_dtype)
    return root


def pairs(root: Path, identical: bool = False) -> Path:
    for sub in ("noisy", "clean"):
        (root / sub).mkdir(parents=True)
    clean = noisy_image(5)
    write(root / "clean" / "a.png", clean)
    write(root / "noisy" / "a.png", clean if identical else noisy_image(6))
    return root


def read(path) -> np.ndarray:
    from ssbsn.images import read_image
    return read_image(path)


def _not_denoised(path: Path, shape, dtype=np.uint8) -> str | None:
    """What is wrong with the output image at ``path`` (None: a plausible denoised image of the
    input's shape and type)."""
    if not path.is_file():
        return f"no output at {path.name}"
    out = read(path)
    if out.shape != tuple(shape) or out.dtype != np.dtype(dtype):
        return f"output {out.dtype} {out.shape}, expected {np.dtype(dtype)} {tuple(shape)}"
    if out.min() == out.max():
        return f"output constant {out.flat[0]}"
    return None


# ====================================================================== 1. silent wrong output

S1, S2, S3, S4, S5, S6 = ("1 wrong output", "2 data safety", "3 no hang", "4 one clear line",
                          "5 messages and exits", "6 progress")


@case(S1, "cmyk_jpeg_denoise", "exit 0; 3-channel output = denoise of Pillow's RGB conversion")
def _(p: Probe):
    from ssbsn import Denoiser
    d = p.dir("cmyk")
    rgb = cmyk_jpeg(d / "c.jpg")
    r = p.cli("denoise", d / "c.jpg", "-o", d / "o.png", "-w", p.model)

    def check():
        bad = _not_denoised(d / "o.png", rgb.shape)
        if bad:
            return bad
        want = Denoiser.from_weights(p.model, device="cpu").denoise_image(rgb)
        diff = np.abs(read(d / "o.png").astype(int) - want.astype(int)).max()
        return None if diff <= 1 else f"differs from the RGB conversion's by {diff} levels"
    return accepted(r, check)


@case(S1, "cmyk_jpeg_train", "exit 0; trains on the RGB conversion (or refused, one line)")
def _(p: Probe):
    d = p.dir("cmyk_train")
    (d / "imgs").mkdir()
    for i in range(2):
        cmyk_jpeg(d / "imgs" / f"{i}.jpg", seed=i)
    r = p.cli(*train_args(d / "imgs", d / "run"))
    if r.code == 1:
        return refused(r, 1, "CMYK")
    return accepted(r, lambda: None if (d / "run" / "model.safetensors").is_file()
                    else "no model.safetensors")


@case(S1, "palette_png_denoise", "exit 0; 3-channel output (Pillow's RGB)")
def _(p: Probe):
    from PIL import Image
    d = p.dir("palette")
    Image.fromarray(noisy_image(1)).convert("P").save(d / "p.png")
    r = p.cli("denoise", d / "p.png", "-o", d / "o.png", "-w", p.model)
    return accepted(r, lambda: _not_denoised(d / "o.png", (H, W, 3)))


@case(S1, "grey16_png_denoise", "exit 0; 16-bit grey PNG back as 16-bit grey")
def _(p: Probe):
    d = p.dir("grey16")
    write(d / "g.png", noisy_image(2, (H, W), np.uint16))
    r = p.cli("denoise", d / "g.png", "-o", d / "o.png", "-w", p.model)
    return accepted(r, lambda: _not_denoised(d / "o.png", (H, W, 1), np.uint16))


@case(S1, "safetensors_without_config", "exit 1: no model configuration (not the paper's)")
def _(p: Probe):
    d = p.dir("plain_st")
    w = edit_model(p.model, d / "plain.safetensors", drop_meta=True)
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "configuration", str(w.name), absent=[d / "o.png"])


@case(S1, "submit_dnd_0_255", "exit 1: noisy crops outside 0..1, naming the file; no OUT")
def _(p: Probe):
    d = p.dir("dnd255")
    make_dnd(d / "dnd", scale=255.0)
    r = p.cli("submit", "dnd", d / "dnd", "-o", d / "bundle", "-w", p.model)
    return refused(r, 1, "0..1", "0001.mat", absent=[d / "bundle"])


@case(S1, "failed_check_refused", "exit 1 naming the model and --force; no output")
def _(p: Probe):
    d = p.dir("failed")
    w = failed_check_model(p, d / "failed.safetensors")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "training check", "--force", w.name, absent=[d / "o.png"])


@case(S1, "failed_check_renamed_SAFETENSORS", "exit 1 (the check travels with the file)")
def _(p: Probe):
    d = p.dir("failed_upper")
    w = failed_check_model(p, d / "failed.SAFETENSORS")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "training check", "--force", absent=[d / "o.png"])


@case(S1, "failed_check_renamed_bin", "exit 1 (the check travels with the file)")
def _(p: Probe):
    d = p.dir("failed_bin")
    w = failed_check_model(p, d / "model.bin")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "training check", "--force", absent=[d / "o.png"])


@case(S1, "failed_check_force", "exit 0 with a warning; the output written")
def _(p: Probe):
    d = p.dir("failed_force")
    w = failed_check_model(p, d / "failed.safetensors")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w, "--force")
    return accepted(r, lambda: _not_denoised(d / "o.png", (H, W, 3)), warn="training check")


@case(S1, "failed_check_eval_warns", "eval: exit 0 with a warning that the check failed")
def _(p: Probe):
    d = p.dir("failed_eval")
    w = failed_check_model(p, d / "failed.safetensors")
    r = p.cli("eval", pairs(d / "pairs"), "-w", w)
    return accepted(r, warn="training check")


@case(S1, "constant_output", "exit 1: constant output of a non-constant image; no output")
def _(p: Probe):
    import torch

    from ssbsn import SSBSN
    d = p.dir("black")
    torch.manual_seed(0)
    model = SSBSN(**TINY, inference=dict(r3=False))
    with torch.no_grad():
        model.bsn.tail[-1].bias.fill_(-1e4)
        model.bsn.tail[-1].weight.zero_()
    model.save(d / "black.safetensors")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", d / "black.safetensors")
    return refused(r, 1, "constant", absent=[d / "o.png"])


def _denoiser(p: Probe):
    from ssbsn import Denoiser
    if not hasattr(p, "_den"):
        p._den = Denoiser.from_weights(p.model, device="cpu")
    return p._den


for _name, _arr, _words in [
    ("float32_0_255", lambda: noisy_image(0).astype(np.float32), ("0..1",)),
    ("float64_0_255", lambda: noisy_image(0).astype(np.float64), ("0..1",)),
    ("int32", lambda: noisy_image(0).astype(np.int32), ("int32",)),
    ("int8", lambda: (noisy_image(0) // 2).astype(np.int8), ("int8",)),
    ("int64", lambda: noisy_image(0).astype(np.int64), ("int64",)),
    ("uint32", lambda: noisy_image(0).astype(np.uint32), ("uint32",)),
    ("negative_float", lambda: noisy_image(0, dtype=np.float32) - 0.5, ("0..1",)),
    ("bool", lambda: noisy_image(0) > 128, ("bool",)),
    ("nan_float", lambda: np.full((H, W, 3), np.nan, np.float32), ("NaN",)),
    ("list", lambda: noisy_image(0).tolist(), ("numpy array", "list")),
    ("chw", lambda: noisy_image(0).transpose(2, 0, 1).copy(), ("shape",)),
]:
    @case(S1, f"api_denoise_image_{_name}", "UserError naming the problem")
    def _(p: Probe, _arr=_arr, _words=_words):
        return api_refuses(p, lambda: _denoiser(p).denoise_image(_arr()), *_words)


def _tensor():
    import torch
    return torch.zeros(H, W, 3)


for _name, _arr, _words in [
    ("nan", lambda: np.full((H, W, 3), np.nan, np.float32), ("NaN",)),
    ("inf", lambda: np.full((H, W, 3), np.inf, np.float32), ("Inf",)),
    ("1e30", lambda: np.full((H, W, 3), 1e30, np.float32), ("0..255",)),
    ("negative", lambda: np.full((H, W, 3), -1.0, np.float32), ("0..255",)),
    ("empty", lambda: np.zeros((0, 0, 3), np.float32), ("empty",)),
    ("4d", lambda: np.zeros((1, H, W, 3), np.float32), ("(H, W, C)",)),
    ("chw", lambda: np.zeros((3, H, W), np.float32), ("(C, H, W)",)),
    ("2d", lambda: np.zeros((H, W), np.float32), ("(H, W, C)",)),
    ("list", lambda: np.zeros((H, W, 3)).tolist(), ("numpy array", "list")),
    ("tensor", _tensor, ("numpy array", "Tensor")),
    ("complex", lambda: np.zeros((H, W, 3), np.complex64), ("complex64",)),
    ("bool", lambda: np.zeros((H, W, 3), bool), ("bool",)),
]:
    @case(S1, f"api_denoise_array_{_name}", "UserError naming the problem")
    def _(p: Probe, _arr=_arr, _words=_words):
        return api_refuses(p, lambda: _denoiser(p).denoise_array(_arr()), *_words)


@case(S1, "api_denoise_image_valid_types",
      "uint8/uint16/float16/float64/grey/alpha: same type back")
def _(p: Probe):
    den = _denoiser(p)
    bad = []
    for img in (noisy_image(0), noisy_image(0, (H, W), np.uint16),
                noisy_image(0, dtype=np.float16), noisy_image(0, dtype=np.float64),
                np.concatenate([noisy_image(0), np.full((H, W, 1), 200, np.uint8)], -1)):
        try:
            out = den.denoise_image(img)
        except Exception as e:  # noqa: BLE001
            return Outcome("internal-error" if not isinstance(e, ValueError)
                           else "wrong-exit-code", f"{img.dtype} {img.shape}: {e}")
        if out.dtype != img.dtype or out.shape != img.shape:
            bad.append(f"{img.dtype}{img.shape} -> {out.dtype}{out.shape}")
    return Outcome("silent-wrong-output", "; ".join(bad)) if bad else \
        Outcome(OK, "every type and shape returned as given")


for _dtype in ("float16", "float64"):
    @case(S1, f"{_dtype}_tiff_roundtrip", f"exit 0; {_dtype} TIFF written back as {_dtype}")
    def _(p: Probe, _dtype=_dtype):
        import tifffile
        d = p.dir(f"tiff_{_dtype}")
        tifffile.imwrite(d / "f.tif", noisy_image(0, dtype=np.dtype(_dtype)), photometric="rgb")
        r = p.cli("denoise", d / "f.tif", "-o", d / "o.tif", "-w", p.model)

        def check():
            if not (d / "o.tif").is_file():
                return "no output"
            with tifffile.TiffFile(d / "o.tif") as t:
                a = t.asarray()
            if a.dtype != np.dtype(_dtype):
                return f"written as {a.dtype}"
            if not (np.isfinite(a).all() and 0 <= a.min() and a.max() <= 1):
                return f"values {a.min()}..{a.max()} outside 0..1"
            return None
        return accepted(r, check)


@case(S1, "float_tiff_above_1", "exit 1: float TIFF outside 0..1 refused, naming the file")
def _(p: Probe):
    import tifffile
    d = p.dir("tiff_255")
    tifffile.imwrite(d / "f.tif", noisy_image(0).astype(np.float32), photometric="rgb")
    r = p.cli("denoise", d / "f.tif", "-o", d / "o.tif", "-w", p.model)
    return refused(r, 1, "f.tif", "0..1", absent=[d / "o.tif"])


# ====================================================================== 2. data safety

@case(S2, "train_lock", "second 'train --out RUN' while one runs: exit 1, one line")
def _(p: Probe):
    import fcntl
    d = p.dir("lock")
    data = noisy_folder(d / "imgs")
    run = d / "run"
    cmd = [sys.executable, "-m", "ssbsn", *map(str, train_args(data, run))]
    cmd[cmd.index("--steps") + 1] = "1000000"
    first = subprocess.Popen(cmd, cwd=d, env=p.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.time()
        held = False
        while time.time() - t0 < p.timeout and first.poll() is None and not held:
            time.sleep(0.2)
            if (run / ".lock").exists():
                fd = os.open(run / ".lock", os.O_RDWR)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.lockf(fd, fcntl.LOCK_UN)
                except OSError:
                    held = True
                finally:
                    os.close(fd)
        if not held:
            return Outcome("hang" if first.poll() is None else "wrong-exit-code",
                           "the first training never held its run folder's lock")
        time.sleep(1.0)
        before = digest(run / "config.yaml")
        r = p.cli(*train_args(data, run))
        out = refused(r, 1, "in use", keep=before)
        if out.verdict == OK and first.poll() is not None:
            return Outcome("silent-wrong-output", out.got + "; the first training stopped")
        return out
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()


@case(S2, "train_into_a_finished_run", "exit 1 (use --resume); the run's files unchanged")
def _(p: Probe):
    d = p.dir("finished")
    data = noisy_folder(d / "imgs")
    first = p.cli(*train_args(data, d / "run"))
    if first.code != 0:
        return Outcome("wrong-exit-code", "the first training: " + _got(first))
    before = digest(d / "run")
    r = p.cli(*train_args(data, d / "run"))
    return refused(r, 1, "--resume", keep=before)


@case(S2, "eval_json_exists", "exit 1 naming --overwrite; the file unchanged")
def _(p: Probe):
    d = p.dir("eval_json")
    (d / "r.json").write_text("precious")
    r = p.cli("eval", pairs(d / "pairs"), "-w", p.model, "--json", d / "r.json")
    return refused(r, 1, "--overwrite", keep=digest(d / "r.json"))


@case(S2, "eval_save_dir_exists", "exit 1 naming the file and --overwrite; unchanged")
def _(p: Probe):
    d = p.dir("eval_save")
    (d / "saved").mkdir()
    (d / "saved" / "0000_a.png").write_bytes(b"precious")
    keep = digest(d / "saved")
    r = p.cli("eval", pairs(d / "pairs"), "-w", p.model, "--save-dir", d / "saved")
    return refused(r, 1, "0000_a.png", "--overwrite", keep=keep)


@case(S2, "eval_json_overwrite", "with --overwrite: exit 0, the report replaced")
def _(p: Probe):
    d = p.dir("eval_json_ow")
    (d / "r.json").write_text("precious")
    r = p.cli("eval", pairs(d / "pairs"), "-w", p.model, "--json", d / "r.json", "--overwrite")
    return accepted(r, lambda: None if (d / "r.json").read_text() != "precious"
                    else "not replaced")


@case(S2, "prep_existing_tiles", "exit 1 naming --overwrite; tiles unchanged")
def _(p: Probe):
    d = p.dir("prep_exist")
    (d / "in").mkdir()
    write(d / "in" / "p.png", noisy_image(1, (20, 20, 3)))
    args = ["prep", d / "in", "-o", d / "t", "--size", "16", "--overlap", "8"]
    first = p.cli(*args)
    if first.code != 0:
        return Outcome("wrong-exit-code", "the first prep: " + _got(first))
    (d / "t" / "p_00000_00000.png").write_bytes(b"precious")
    keep = digest(d / "t")
    return refused(p.cli(*args), 1, "--overwrite", keep=keep)


@case(S2, "prep_same_name_inputs", "exit 1 (same file name); nothing written")
def _(p: Probe):
    d = p.dir("prep_same")
    for sub, seed in (("x", 1), ("y", 2)):
        (d / sub).mkdir()
        write(d / sub / "p.png", noisy_image(seed, (20, 20, 3)))
    r = p.cli("prep", d / "x", d / "y", "-o", d / "t", "--size", "16", "--overlap", "8")
    return refused(r, 1, "same file name", absent=[d / "t"])


@case(S2, "prep_truncated_second_input", "exit 1 naming it; no tile of the first left")
def _(p: Probe):
    d = p.dir("prep_trunc")
    (d / "x").mkdir()
    (d / "y").mkdir()
    write(d / "x" / "p.png", noisy_image(1, (20, 20, 3)))
    q = write(d / "y" / "q.png", noisy_image(2, (24, 24, 3)))
    q.write_bytes(q.read_bytes()[:100])
    r = p.cli("prep", d / "x", d / "y", "-o", d / "t", "--size", "16", "--overlap", "8")
    tiles = list((d / "t").rglob("*")) if (d / "t").exists() else []
    out = refused(r, 1, "q.png")
    if out.verdict == OK and tiles:
        return Outcome("left-files", out.got + f"; {len(tiles)} files left in OUT")
    return out


@case(S2, "prep_out_inside_input", "rerun with --overwrite: the same tiles, none cut from a tile")
def _(p: Probe):
    d = p.dir("prep_inside")
    (d / "photos").mkdir()
    write(d / "photos" / "p.png", noisy_image(1, (20, 20, 3)))
    args = ["prep", d / "photos", "-o", d / "photos" / "tiles", "--size", "16", "--overlap", "8"]
    first = p.cli(*args)
    if first.code != 0:
        return Outcome("wrong-exit-code", "the first prep: " + _got(first))
    tiles = digest(d / "photos" / "tiles")
    r = p.cli(*args, "--overwrite")
    return accepted(r, lambda: None if digest(d / "photos" / "tiles").keys() == tiles.keys()
                    else f"{len(digest(d / 'photos' / 'tiles'))} tiles, first run "
                         f"{len(tiles)}")


def _batch(d: Path) -> Path:
    (d / "in").mkdir()
    for i in range(3):
        write(d / "in" / f"{i}.png", noisy_image(i))
    return d / "in"


@case(S2, "denoise_batch_exists", "exit 1 naming --overwrite and --skip-existing; unchanged")
def _(p: Probe):
    d = p.dir("batch_exists")
    inp = _batch(d)
    (d / "out").mkdir()
    (d / "out" / "1.png").write_bytes(b"precious")
    keep = digest(d / "out")
    r = p.cli("denoise", inp, "-o", d / "out", "-w", p.model)
    return refused(r, 1, "exists", "--overwrite", "--skip-existing", keep=keep,
                   absent=[d / "out" / "0.png", d / "out" / "2.png"])


@case(S2, "denoise_skip_existing", "exit 0: the missing outputs written, the existing one kept")
def _(p: Probe):
    d = p.dir("batch_skip")
    inp = _batch(d)
    (d / "out").mkdir()
    (d / "out" / "1.png").write_bytes(b"kept as it is")
    r = p.cli("denoise", inp, "-o", d / "out", "-w", p.model, "--skip-existing")

    def check():
        if (d / "out" / "1.png").read_bytes() != b"kept as it is":
            return "the existing output was replaced"
        return _not_denoised(d / "out" / "0.png", (H, W, 3)) or \
            _not_denoised(d / "out" / "2.png", (H, W, 3))
    return accepted(r, check)


@case(S2, "denoise_output_exists", "exit 1 naming --overwrite; the file unchanged")
def _(p: Probe):
    d = p.dir("out_exists")
    (d / "o.png").write_bytes(b"precious")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", p.model)
    return refused(r, 1, "--overwrite", keep=digest(d / "o.png"))


@case(S2, "denoise_output_is_input", "exit 1 (OUT is an input); the input unchanged")
def _(p: Probe):
    d = p.dir("out_is_in")
    x = write(d / "x.png", noisy_image(0))
    r = p.cli("denoise", x, "-o", x, "-w", p.model)
    return refused(r, 1, "input", keep=digest(x))


@case(S2, "denoise_out_inside_input_folder", "rerun --skip-existing: outputs never denoised again")
def _(p: Probe):
    d = p.dir("den_inside")
    inp = _batch(d)
    first = p.cli("denoise", inp, "-o", inp / "den", "-w", p.model)
    if first.code != 0:
        return Outcome("wrong-exit-code", "the first denoise: " + _got(first))
    r = p.cli("denoise", inp, "-o", inp / "den", "-w", p.model, "--skip-existing")

    def check():
        nested = sorted(str(q.relative_to(inp)) for q in (inp / "den").rglob("*.png")
                        if q.parent != inp / "den")
        return f"denoised its own outputs: {', '.join(nested)}" if nested else None
    return accepted(r, check)


@case(S2, "submit_dnd_exists", "exit 1 naming --overwrite; the bundle unchanged")
def _(p: Probe):
    d = p.dir("dnd_exists")
    make_dnd(d / "dnd")
    (d / "bundle").mkdir()
    (d / "bundle" / "0001.mat").write_bytes(b"old")
    keep = digest(d / "bundle")
    r = p.cli("submit", "dnd", d / "dnd", "-o", d / "bundle", "-w", p.model)
    return refused(r, 1, "--overwrite", keep=keep)


@case(S2, "submit_dnd_overwrite", "with --overwrite: exit 0, the bundle replaced")
def _(p: Probe):
    import scipy.io
    d = p.dir("dnd_overwrite")
    make_dnd(d / "dnd")
    (d / "bundle").mkdir()
    (d / "bundle" / "0001.mat").write_bytes(b"old")
    r = p.cli("submit", "dnd", d / "dnd", "-o", d / "bundle", "-w", p.model, "--overwrite")

    def check():
        try:
            cells = scipy.io.loadmat(d / "bundle" / "0001.mat")["Idenoised"].reshape(-1)
        except Exception as e:  # noqa: BLE001
            return f"0001.mat not a bundle file ({type(e).__name__})"
        return None if len(cells) == 2 else f"{len(cells)} crops, expected 2"
    return accepted(r, check)


@case(S2, "submit_sidd_exists", "exit 1 naming --overwrite; the file unchanged")
def _(p: Probe):
    import scipy.io
    d = p.dir("sidd_exists")
    mat = d / "BenchmarkNoisyBlocksSrgb.mat"
    scipy.io.savemat(mat, {"BenchmarkNoisyBlocksSrgb": np.stack([np.stack(
        [noisy_image(i, (24, 24, 3)) for i in range(2)])])})
    (d / "SubmitSrgb.mat").write_bytes(b"old")
    keep = digest(d / "SubmitSrgb.mat")
    r = p.cli("submit", "sidd", mat, "-o", d / "SubmitSrgb.mat", "-w", p.model)
    return refused(r, 1, "--overwrite", keep=keep)


@case(S2, "attention_map_exists", "exit 1 naming --overwrite; the file unchanged")
def _(p: Probe):
    d = p.dir("attn_exists")
    (d / "a.png").write_bytes(b"precious")
    r = p.cli("attention-map", p.image, "--pixel", "10", "10", "-w", p.model, "-o", d / "a.png")
    return refused(r, 1, "--overwrite", keep=digest(d / "a.png"))


@case(S2, "demo_into_an_earlier_demo", "exit 1 naming --overwrite; the folder unchanged")
def _(p: Probe):
    d = p.dir("demo_exists")
    (d / "demo_out").mkdir()
    (d / "demo_out" / "report.json").write_text("precious")
    keep = digest(d / "demo_out")
    r = p.cli("demo", "--quick", "-o", d / "demo_out")
    return refused(r, 1, "--overwrite", keep=keep)


# ====================================================================== 3. no hang

@case(S3, "metadata_pd_test_64", "exit 1 naming pd and the allowed range, at once")
def _(p: Probe):
    d = p.dir("pd64")
    w = edit_model(p.model, d / "m.safetensors", config=dict(pd_test=64))
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "pd", "allowed", absent=[d / "o.png"])


@case(S3, "metadata_pd_pad_64", "exit 1 naming pd_pad and the allowed range, at once")
def _(p: Probe):
    d = p.dir("pad64")
    w = edit_model(p.model, d / "m.safetensors", config=dict(pd_pad=64))
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "pd_pad", "allowed", absent=[d / "o.png"])


@case(S3, "option_pd_test_64", "exit 1 or 2 naming the PD stride and the allowed range")
def _(p: Probe):
    d = p.dir("pd64_opt")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", p.model, "--pd-test", "64")
    return refused(r, r.code if r.code in (1, 2) else 1, "pd", "allowed",
                   absent=[d / "o.png"])


@case(S3, "metadata_tile_1", "exit 1 naming tile and its range (the model file named)")
def _(p: Probe):
    d = p.dir("tile1")
    w = edit_model(p.model, d / "m.safetensors", inference=dict(tile=1))
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "tile", "8..65536", "m.safetensors", absent=[d / "o.png"])


@case(S3, "option_tile_1", "exit 2 naming --tile and its range")
def _(p: Probe):
    d = p.dir("tile1_opt")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", p.model, "--tile", "1")
    return refused(r, 2, "--tile", "8..65536", absent=[d / "o.png"])


@case(S3, "option_tile_8_overlap_4096", "exit 1 or 2 (too many windows), or done in time")
def _(p: Probe):
    d = p.dir("tile8_overlap")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", p.model, "--tile", "8",
              "--overlap", "4096")
    if r.code == 0:
        return accepted(r, lambda: _not_denoised(d / "o.png", (H, W, 3)))
    return refused(r, r.code if r.code in (1, 2) else 1, "tile")


@case(S3, "metadata_overlap_4096_tile_8", "done in time, or exit 1 naming tile/overlap")
def _(p: Probe):
    d = p.dir("overlap_meta")
    w = edit_model(p.model, d / "m.safetensors", inference=dict(tile=8, overlap=4096))
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    if r.code == 0:
        return accepted(r, lambda: _not_denoised(d / "o.png", (H, W, 3)))
    return refused(r, 1, "tile")


@case(S3, "metadata_r3_rounds_1000", "done in time (1001 passes), or refused with the key")
def _(p: Probe):
    d = p.dir("r3_1000")
    w = edit_model(p.model, d / "m.safetensors", config=dict(r3_T=1000),
                   inference=dict(r3=True))
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    if r.code == 0:
        return accepted(r, lambda: _not_denoised(d / "o.png", (H, W, 3)))
    return refused(r, 1, "r3")


@case(S3, "metadata_attention_window_1", "done in time, or refused with the key")
def _(p: Probe):
    d = p.dir("window1")
    w = edit_model(p.model, d / "m.safetensors", config=dict(attention_window=1))
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    if r.code == 0:
        return accepted(r, lambda: _not_denoised(d / "o.png", (H, W, 3)))
    return refused(r, 1, "attention_window")


@case(S3, "train_minutes_inf", "exit 2 naming --minutes and its range; no run folder")
def _(p: Probe):
    return train_refused(p, "minutes_inf", "--minutes", "--minutes", "inf")


@case(S3, "train_minutes_1e300", "exit 2 naming --minutes and its range; no run folder")
def _(p: Probe):
    return train_refused(p, "minutes_big", "--minutes", "--minutes", "1e300")


# ====================================================================== 4. one clear line

@case(S4, "empty_pth", "exit 1: the file is empty")
def _(p: Probe):
    d = p.dir("empty_pth")
    (d / "m.pth").write_bytes(b"")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", d / "m.pth")
    return refused(r, 1, "empty", "m.pth", absent=[d / "o.png"])


@case(S4, "empty_dict_pth", "exit 1: holds no weights")
def _(p: Probe):
    import torch
    d = p.dir("empty_dict")
    torch.save({}, d / "m.pth")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", d / "m.pth")
    return refused(r, 1, "no weights", absent=[d / "o.png"])


@case(S4, "authors_head_0_channels", "exit 1 naming the file and base_channels=0")
def _(p: Probe):
    import torch
    d = p.dir("head0")
    sd = authors_state()
    sd["bsn.head.0.weight"], sd["bsn.head.0.bias"] = torch.zeros(0, 3, 1, 1), torch.zeros(0)
    w = save_authors(d / "zero.pth", sd)
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "zero.pth", "base_channels", absent=[d / "o.png"])


@case(S4, "weights_times_1e30", "exit 1 naming the tensor")
def _(p: Probe):
    d = p.dir("huge")
    w = edit_model(p.model, d / "m.safetensors",
                   state=lambda s: {**s, "bsn.tail.2.weight": s["bsn.tail.2.weight"] * 1e30})
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "tail.2.weight", absent=[d / "o.png"])


@case(S4, "weights_nan", "exit 1 naming NaN/Inf")
def _(p: Probe):
    d = p.dir("nanw")

    def poison(s):
        t = s["bsn.tail.2.weight"].clone()
        t.view(-1)[0] = float("nan")
        return {**s, "bsn.tail.2.weight": t}
    w = edit_model(p.model, d / "m.safetensors", state=poison)
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "NaN", absent=[d / "o.png"])


for _key in ("ssbsn_config", "ssbsn_inference"):
    @case(S4, f"nested_json_{_key}", "exit 1: metadata nested too deeply, one line")
    def _(p: Probe, _key=_key):
        d = p.dir(f"nested_{_key}")
        w = edit_model(p.model, d / "m.safetensors", meta={_key: "[" * 100000 + "]" * 100000})
        r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
        return refused(r, 1, "nested", absent=[d / "o.png"])


@case(S4, "metadata_not_json", "exit 1 naming the key")
def _(p: Probe):
    d = p.dir("not_json")
    w = edit_model(p.model, d / "m.safetensors", meta={"ssbsn_inference": "{r3: yes"})
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "ssbsn_inference", absent=[d / "o.png"])


@case(S4, "metadata_lowpass_1e308", "exit 1 naming lowpass and its range")
def _(p: Probe):
    d = p.dir("lowpass_meta")
    w = edit_model(p.model, d / "m.safetensors", inference=dict(lowpass=1e308))
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "lowpass", "0..128", absent=[d / "o.png"])


@case(S4, "metadata_conv_backend_cuda", "exit 0 with a warning (torch's convolutions), "
                                        "the same output as the torch backend's")
def _(p: Probe):
    import torch
    d = p.dir("conv_cuda")
    if torch.cuda.is_available():
        return Outcome(OK, "skipped: CUDA is present")
    w = edit_model(p.model, d / "m.safetensors", config=dict(conv_backend="cuda"))
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    ref = p.cli("denoise", p.image, "-o", d / "ref.png", "-w", p.model)

    def check():
        if ref.code != 0:
            return "the reference run failed"
        diff = np.abs(read(d / "o.png").astype(int) - read(d / "ref.png").astype(int)).max()
        return None if diff == 0 else f"differs from the torch backend's by {diff}"
    return accepted(r, check, warn="conv_backend")


for _value in ("inf", "1e308"):
    @case(S4, f"option_lowpass_{_value}", "exit 2 naming --lowpass and its range")
    def _(p: Probe, _value=_value):
        d = p.dir(f"lowpass_{_value}")
        r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", p.model, "--lowpass", _value)
        return refused(r, 2, "--lowpass", "0..128", absent=[d / "o.png"])


@case(S4, "denoise_device_tpu", "exit 2 naming --device")
def _(p: Probe):
    d = p.dir("tpu")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", p.model, "--device", "tpu")
    return refused(r, 2, "--device", absent=[d / "o.png"])


@case(S4, "train_device_tpu", "exit 2 naming --device; no run folder")
def _(p: Probe):
    return train_refused(p, "tpu_train", "--device", "--device", "tpu")


@case(S4, "attention_map_device_tpu", "exit 2 naming --device")
def _(p: Probe):
    d = p.dir("tpu_attn")
    r = p.cli("attention-map", p.image, "--pixel", "3", "3", "-w", p.model, "-o", d / "a.png",
              "--device", "tpu")
    return refused(r, 2, "--device", absent=[d / "a.png"])


@case(S4, "denoise_backend_triton_cpu", "exit 2: --backend triton needs CUDA")
def _(p: Probe):
    import torch
    d = p.dir("triton")
    if torch.cuda.is_available():
        return Outcome(OK, "skipped: CUDA is present")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", p.model, "--backend", "triton")
    return refused(r, 2, "--backend triton", "CUDA", absent=[d / "o.png"])


@case(S4, "train_backend_triton_cpu", "exit 2: --backend triton needs CUDA; no run folder")
def _(p: Probe):
    import torch
    if torch.cuda.is_available():
        return Outcome(OK, "skipped: CUDA is present")
    return train_refused(p, "triton_train", "--backend triton", "--backend", "triton")


@case(S4, "train_workers_-1", "exit 2 naming --workers; no run folder")
def _(p: Probe):
    return train_refused(p, "workers", "--workers", "--workers", "-1")


@case(S4, "attention_map_without_ss_blocks", "exit 1 naming the model: no SS-Blocks")
def _(p: Probe):
    from ssbsn import SSBSN
    d = p.dir("noss")
    SSBSN(base_channels=8, num_modules=2, ss_blocks=0).save(d / "noss.safetensors")
    r = p.cli("attention-map", p.image, "--pixel", "3", "3", "-w", d / "noss.safetensors",
              "-o", d / "a.png")
    return refused(r, 1, "no SS-Blocks", "noss.safetensors", absent=[d / "a.png"])


@case(S4, "attention_map_pixel_outside", "exit 1 or 2 naming --pixel and the image's size")
def _(p: Probe):
    d = p.dir("attn_pixel")
    r = p.cli("attention-map", p.image, "--pixel", "500", "3", "-w", p.model, "-o", d / "a.png")
    return refused(r, r.code if r.code in (1, 2) else 1, "pixel", absent=[d / "a.png"])


@case(S4, "submit_sidd_zero_blocks", "exit 1: holds no blocks; no OUT")
def _(p: Probe):
    import scipy.io
    d = p.dir("sidd0")
    mat = d / "BenchmarkNoisyBlocksSrgb.mat"
    scipy.io.savemat(mat, {"BenchmarkNoisyBlocksSrgb": np.zeros((2, 0, 8, 8, 3), np.uint8)})
    r = p.cli("submit", "sidd", mat, "-o", d / "SubmitSrgb.mat", "-w", p.model)
    return refused(r, 1, "no blocks", absent=[d / "SubmitSrgb.mat"])


@case(S4, "disk_full_while_saving", "exit 1: no space left (in-process ENOSPC); the last "
                                    "good checkpoint kept")
def _(p: Probe):
    import torch

    import ssbsn.train as T
    from ssbsn.cli import main
    d = p.dir("enospc")
    data = noisy_folder(d / "imgs")
    real = T.torch.save
    err = io.StringIO()
    T.torch.save = full_disk_on_save(real)  # the second checkpoint's state file
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                time_limit(p.timeout):
            code = main([str(a) for a in train_args(data, d / "run", "--save-every", "1")]
                        + ["--steps", "4"])
    except _Alarm:
        return Outcome("hang", f"no answer in {p.timeout:.0f} s")
    except SystemExit as e:
        code = e.code
    except Exception as e:  # noqa: BLE001
        return Outcome("internal-error", f"{type(e).__name__}: {e}")
    finally:
        T.torch.save = real
        torch.set_num_threads(1)
    r = Run(code, "", err.getvalue(), 0.0)
    out = refused(r, 1, "no space left on device", "--resume")
    if out.verdict == OK and T.list_checkpoints(str(d / "run")) != [1]:
        return Outcome("silent-wrong-output",
                       out.got + f"; checkpoints {T.list_checkpoints(str(d / 'run'))}")
    return out


@case(S4, "tiff_header_100000x100000", "exit 1: too large, before decoding")
def _(p: Probe):
    d = p.dir("tiff_bomb")
    b = tiff_bomb(d / "bomb.tif")
    r = p.cli("denoise", b, "-o", d / "o.tif", "-w", p.model)
    return refused(r, 1, "too large", "bomb.tif", absent=[d / "o.tif"])


@case(S4, "png_bomb", "exit 1: too large, before decoding")
def _(p: Probe):
    d = p.dir("png_bomb")
    b = png_bomb(d / "bomb.png")
    r = p.cli("denoise", b, "-o", d / "o.png", "-w", p.model)
    return refused(r, 1, "too large", "bomb.png", absent=[d / "o.png"])


@case(S4, "png_bomb_in_training_data", "exit 1: too large, naming it; no run folder")
def _(p: Probe):
    d = p.dir("png_bomb_train")
    data = noisy_folder(d / "imgs")
    png_bomb(data / "bomb.png")
    r = p.cli(*train_args(data, d / "run"))
    return refused(r, 1, "too large", "bomb.png", absent=[d / "run"])


@case(S4, "truncated_png", "exit 1 naming the file; no output")
def _(p: Probe):
    d = p.dir("trunc")
    x = write(d / "x.png", noisy_image(0))
    x.write_bytes(x.read_bytes()[:200])
    r = p.cli("denoise", x, "-o", d / "o.png", "-w", p.model)
    return refused(r, 1, "x.png", absent=[d / "o.png"])


@case(S4, "text_file_named_png", "exit 1 naming the file; no output")
def _(p: Probe):
    d = p.dir("text_png")
    (d / "x.png").write_text("not an image")
    r = p.cli("denoise", d / "x.png", "-o", d / "o.png", "-w", p.model)
    return refused(r, 1, "x.png", absent=[d / "o.png"])


@case(S4, "weights_missing", "exit 1: checkpoint not found")
def _(p: Probe):
    d = p.dir("missing")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", d / "nothing.safetensors")
    return refused(r, 1, "nothing.safetensors", absent=[d / "o.png"])


@case(S4, "weights_is_a_folder", "exit 1 naming it")
def _(p: Probe):
    d = p.dir("wdir")
    (d / "w.safetensors").mkdir()
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", d / "w.safetensors")
    return refused(r, 1, "w.safetensors", absent=[d / "o.png"])


@case(S4, "eval_size_mismatch", "exit 1 naming the pair and both sizes")
def _(p: Probe):
    d = p.dir("eval_mismatch")
    pairs(d / "pairs")
    write(d / "pairs" / "clean" / "a.png", noisy_image(5, (40, 64, 3)))
    r = p.cli("eval", d / "pairs", "-w", p.model)
    return refused(r, 1, "a.png")


@case(S4, "eval_no_pairs", "exit 1: no pairs found")
def _(p: Probe):
    d = p.dir("eval_empty")
    (d / "noisy").mkdir()
    (d / "clean").mkdir()
    r = p.cli("eval", d, "-w", p.model)
    return refused(r, 1)


@case(S4, "denoise_empty_folder", "exit 1: no images in it")
def _(p: Probe):
    d = p.dir("empty_in")
    (d / "in").mkdir()
    r = p.cli("denoise", d / "in", "-o", d / "out", "-w", p.model)
    return refused(r, 1, "in", absent=[d / "out"])


@case(S4, "denoise_rgb_into_grey_model", "exit 1 naming the channels")
def _(p: Probe):
    from ssbsn import SSBSN
    d = p.dir("grey_model")
    SSBSN(**TINY, in_channels=1, inference=dict(r3=False)).save(d / "g.safetensors")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", d / "g.safetensors")
    return refused(r, 1, "channel", absent=[d / "o.png"])


@case(S4, "image_too_small", "exit 1 naming the size")
def _(p: Probe):
    d = p.dir("small")
    x = write(d / "x.png", noisy_image(0, (3, 5, 3)))
    r = p.cli("denoise", x, "-o", d / "o.png", "-w", p.model)
    return refused(r, 1, "x.png", absent=[d / "o.png"])


@case(S4, "config_yaml_wrong_type", "exit 1 naming the key; no run folder")
def _(p: Probe):
    d = p.dir("yaml")
    data = noisy_folder(d / "imgs")
    (d / "c.yaml").write_text(f"data: [{json.dumps(str(data))}]\ncrop: abc\n")
    r = p.cli("train", "--config", d / "c.yaml", "--out", d / "run", "--no-progress")
    return refused(r, 1, "crop", absent=[d / "run"])


@case(S4, "resume_missing_run", "exit 1 naming the folder")
def _(p: Probe):
    d = p.dir("resume_missing")
    r = p.cli("train", "--resume", d / "nothing", "--no-progress")
    return refused(r, 1, "nothing", absent=[d / "nothing"])


# ====================================================================== 5. messages, exits

for _name, _extra, _opt in [("steps_0", ["--steps", "0"], "--steps"),
                            ("lr_0", ["--lr", "0"], "--lr"),
                            ("lr_nan", ["--lr", "nan"], "--lr"),
                            ("seed_2**70", ["--seed", str(2 ** 70)], "--seed"),
                            ("fused_backend_reference", ["--fused", "--backend", "reference"],
                             "--backend"),
                            ("threads_0", ["--threads", "0"], "--threads"),
                            ("channels_7", ["--channels", "7"], "--channels"),
                            ("crop_not_multiple_of_pd", ["--crop", "12"], "--crop"),
                            ("ss_blocks_over_modules", ["--ss-blocks", "3"], "--ss-blocks"),
                            ("minutes_0", ["--minutes", "0"], "--minutes"),
                            ("r3_p_nan", ["--r3-p", "nan"], "--r3-p")]:
    @case(S5, f"train_{_name}", f"exit 2 naming {_opt}; no run folder")
    def _(p: Probe, _name=_name, _extra=_extra, _opt=_opt):
        return train_refused(p, f"train_{_name}", _opt, *_extra)


@case(S5, "train_without_data", "exit 2: no training data")
def _(p: Probe):
    d = p.dir("nodata")
    r = p.cli("train", "--out", d / "run")
    return refused(r, 2, "data", absent=[d / "run"])


for _name, _extra, _opt in [("tile_-1", ["--tile", "-1"], "--tile"),
                            ("seed_2**70", ["--seed", str(2 ** 70)], "--seed"),
                            ("lowpass_nan", ["--lowpass", "nan"], "--lowpass"),
                            ("threads_0", ["--threads", "0"], "--threads"),
                            ("overlap_-3", ["--overlap", "-3"], "--overlap"),
                            ("pd_test_0", ["--pd-test", "0"], "--pd-test"),
                            ("attention_window_-3", ["--attention-window", "-3"],
                             "--attention-window")]:
    @case(S5, f"denoise_{_name}", f"exit 2 naming {_opt}; no output")
    def _(p: Probe, _name=_name, _extra=_extra, _opt=_opt):
        d = p.dir(f"denoise_{_name}")
        r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", p.model, *_extra)
        return refused(r, 2, _opt, absent=[d / "o.png"])


@case(S5, "global_threads_0", "exit 2 naming --threads (before the command)")
def _(p: Probe):
    d = p.dir("gthreads")
    r = p.cli("--threads", "0", "denoise", p.image, "-o", d / "o.png", "-w", p.model)
    return refused(r, 2, "--threads", absent=[d / "o.png"])


@case(S5, "eval_limit_0", "exit 2 naming --limit")
def _(p: Probe):
    d = p.dir("limit0")
    r = p.cli("eval", pairs(d / "pairs"), "-w", p.model, "--limit", "0")
    return refused(r, 2, "--limit")


@case(S5, "attention_map_top_-5", "exit 2 naming --top; no output")
def _(p: Probe):
    d = p.dir("top")
    r = p.cli("attention-map", p.image, "--pixel", "3", "3", "-w", p.model, "-o", d / "a.png",
              "--top", "-5")
    return refused(r, 2, "--top", absent=[d / "a.png"])


@case(S5, "prep_size_0", "exit 2 naming --size; no OUT")
def _(p: Probe):
    d = p.dir("prep0")
    (d / "in").mkdir()
    write(d / "in" / "p.png", noisy_image(1, (20, 20, 3)))
    r = p.cli("prep", d / "in", "-o", d / "t", "--size", "0")
    return refused(r, 2, "--size", absent=[d / "t"])


@case(S5, "prep_overlap_not_below_size", "exit 2 naming --overlap; no OUT")
def _(p: Probe):
    d = p.dir("prep_overlap")
    (d / "in").mkdir()
    write(d / "in" / "p.png", noisy_image(1, (20, 20, 3)))
    r = p.cli("prep", d / "in", "-o", d / "t", "--size", "16", "--overlap", "16")
    return refused(r, 2, "--overlap", absent=[d / "t"])


@case(S5, "denoise_without_weights", "exit 2 naming --weights")
def _(p: Probe):
    d = p.dir("now")
    r = p.cli("denoise", p.image, "-o", d / "o.png")
    return refused(r, 2, "--weights", absent=[d / "o.png"])


@case(S5, "skip_existing_with_overwrite", "exit 2: the two options exclude each other")
def _(p: Probe):
    d = p.dir("skip_ow")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", p.model, "--skip-existing",
              "--overwrite")
    return refused(r, 2, "--overwrite", absent=[d / "o.png"])


for _name in ("upper.SAFETENSORS", "model.bin", "model.pth"):
    @case(S5, f"weights_named_{_name}", "exit 0: the format read from the content")
    def _(p: Probe, _name=_name):
        d = p.dir(f"named_{_name}")
        shutil.copy(p.model, d / _name)
        r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", d / _name)
        return accepted(r, lambda: _not_denoised(d / "o.png", (H, W, 3)))


@case(S5, "png_renamed_pth", "exit 1: 'is a PNG image', no weights_only advice")
def _(p: Probe):
    d = p.dir("png_pth")
    shutil.copy(p.image, d / "photo.pth")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", d / "photo.pth")
    out = refused(r, 1, "PNG image", absent=[d / "o.png"])
    if out.verdict == OK and "weights_only" in r.err:
        return Outcome("unclear-message", out.got + "; relays weights_only advice")
    return out


@case(S5, "pickled_object_pth", "exit 1: refusing to load, nothing unpickled, no weights_only")
def _(p: Probe):
    d = p.dir("pickle")

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))
    (d / "evil.pth").write_bytes(pickle.dumps({"model_weight": Payload()}, protocol=2))
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", d / "evil.pth")
    out = refused(r, 1, "evil.pth", absent=[d / "o.png"])
    if out.verdict == OK and ("weights_only" in r.err or "unpickled!" in r.out):
        return Outcome("unclear-message", out.got + "; weights_only advice or code ran")
    return out


@case(S5, "authors_without_wqk", "exit 1: no SS-Attention weights")
def _(p: Probe):
    d = p.dir("nowqk")
    sd = {k: v for k, v in authors_state().items() if not k.endswith(".wqk")}
    w = save_authors(d / "nowqk.pth", sd)
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "SS-Attention", absent=[d / "o.png"])


@case(S5, "authors_other_size", "exit 0 with a warning saying what was inferred")
def _(p: Probe):
    d = p.dir("authors_small")
    w = save_authors(d / "small.pth", authors_state())
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w, "--no-r3")
    return accepted(r, lambda: None if (d / "o.png").is_file() else "no output",
                    warn="inferred")


@case(S5, "int32_weights", "exit 1: int32 values, weights must be floating point")
def _(p: Probe):
    import torch
    d = p.dir("int32w")
    w = edit_model(p.model, d / "m.safetensors",
                   state=lambda s: {**s, "bsn.tail.2.weight": s["bsn.tail.2.weight"]
                                    .to(torch.int32)})
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", w)
    return refused(r, 1, "int32", "tail.2.weight", absent=[d / "o.png"])


@case(S5, "constant_training_images", "exit 1: the data holds no noise; no run folder")
def _(p: Probe):
    d = p.dir("flat")
    (d / "flat").mkdir()
    for i, v in enumerate((40, 200)):
        write(d / "flat" / f"{i}.png", np.full((24, 26, 3), v, np.uint8))
    r = p.cli(*train_args(d / "flat", d / "run"))
    return refused(r, 1, "no noise", absent=[d / "run"])


@case(S5, "eval_json_no_infinity", "exit 0; the JSON strict (null for an infinite PSNR)")
def _(p: Probe):
    d = p.dir("eval_inf")
    r = p.cli("eval", pairs(d / "pairs", identical=True), "-w", p.model, "--json", d / "r.json")

    def check():
        def refuse(name):
            raise ValueError(name)
        try:
            rep = json.loads((d / "r.json").read_text(), parse_constant=refuse)
        except (OSError, ValueError) as e:
            return f"not strict JSON ({e})"
        return None if rep["images"][0]["psnr_noisy"] is None else "psnr_noisy not null"
    return accepted(r, check)


for _name, _dtype, _shape, _out in [("uint16_rgb_to_png", np.uint16, (H, W, 3), "o.png"),
                                    ("uint16_grey_to_jpg", np.uint16, (H, W), "o.jpg"),
                                    ("float32_to_png", np.float32, (H, W, 3), "o.png")]:
    @case(S5, f"{_name}_refused_first", "exit 1 naming OUT, before any work; nothing written")
    def _(p: Probe, _name=_name, _dtype=_dtype, _shape=_shape, _out=_out):
        import tifffile
        d = p.dir(_name)
        tifffile.imwrite(d / "in.tif", noisy_image(0, _shape, _dtype),
                         photometric="rgb" if len(_shape) == 3 else None)
        r = p.cli("denoise", d / "in.tif", "-o", d / _out, "-w", p.model)
        out = refused(r, 1, _out, absent=[d / _out])
        leftovers = sorted(q.name for q in d.iterdir() if q.name != "in.tif")
        if out.verdict == OK and leftovers:
            return Outcome("left-files", out.got + f"; left {leftovers}")
        return out


for _argv, _hint in [(["denosie"], "did you mean 'denoise'"),
                     (["atention-map"], "did you mean 'attention-map'"),
                     (["denoise", "a.png", "-o", "b.png", "-w", "m", "--overwirte"],
                      "did you mean '--overwrite'"),
                     (["train", "d", "--stpes", "3"], "did you mean '--steps'"),
                     (["--thraeds=2", "demo"], "did you mean '--threads'")]:
    @case(S5, f"did_you_mean_{_argv[-1] if _argv[0] != '--thraeds=2' else 'thraeds'}",
          f"exit 2 with \"{_hint}\"")
    def _(p: Probe, _argv=_argv, _hint=_hint):
        return refused(p.cli(*_argv, cwd=p.dir("dym")), 2, _hint)


@case(S5, "help_global_options", "'ssbsn --help' says where --threads/--debug go")
def _(p: Probe):
    r = p.cli("--help")
    text = r.out.replace("\n", " ")
    said = re.search(r"--debug and --threads go before", text) and "--threads" in text
    return Outcome(OK if r.code == 0 and said else "unclear-message",
                   "says '--debug and --threads go before or after it'" if said else
                   "does not say where --threads/--debug go")


for _cmd in ("train", "denoise"):
    @case(S5, f"{_cmd}_help_fast", "< 1 s (best of 3), torch not imported")
    def _(p: Probe, _cmd=_cmd):
        code = ("import sys\nfrom ssbsn.cli import main\n"
                f"try:\n    main(['{_cmd}', '--help'])\nexcept SystemExit:\n    pass\n"
                "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
        times, last = [], None
        for _ in range(3):
            t0 = time.perf_counter()
            last = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=p.timeout, env=p.env, cwd=p.root)
            times.append(time.perf_counter() - t0)
        got = f"{min(times):.2f} s, {last.stdout.strip().splitlines()[-1]}"
        if last.returncode != 0 or "--help" not in last.stdout:
            return Outcome("internal-error", got)
        if last.stdout.strip().endswith("NO-TORCH") and min(times) < 1.0:
            return Outcome(OK, got)
        return Outcome("hang", got)


# ====================================================================== 6. progress

@case(S6, "bar_counts_every_pass_api", "bar total = network passes + steps after; ends at total")
def _(p: Probe):
    import torch

    import ssbsn.api as api
    from ssbsn import SSBSN
    torch.manual_seed(0)
    model = SSBSN(**TINY, pd_train=3, pd_test=2, pd_pad=0, r3_T=2,
                  inference=dict(r3=True, shifts=True, blend=True, lowpass=8.0, wiener=False,
                                 debias=True)).eval()
    calls = []
    handle = model.bsn.register_forward_hook(lambda m, i, o: calls.append(1))
    img = noisy_image(0).astype(np.float32)
    try:
        with recorded_bars() as bars, torch.no_grad(), \
                contextlib.redirect_stderr(io.StringIO()):  # the bar's lines
            api.denoise_array(model, img, progress=True, tile=24, overlap=8)
    finally:
        handle.remove()
    after = api.after_network_work(model, img.shape, tile=24, overlap=8)
    n, total = bars[-1]
    got = f"{len(calls)} network passes, {after} steps after; bar {n}/{total}"
    return Outcome(OK if total == len(calls) + after and n == total else
                   "silent-wrong-output", got)


@case(S6, "bar_counts_every_pass_cli", "denoise --progress --self-ensemble: the bar's total "
                                       "is the passes the model makes plus the steps after")
def _(p: Probe):
    import ssbsn.api as api
    d = p.dir("bar_cli")
    r = p.cli("denoise", p.image, "-o", d / "o.png", "-w", p.model, "--progress",
              "--self-ensemble", "--lowpass", "4")
    if r.code != 0:
        return accepted(r)
    counts = [tuple(map(int, c)) for c in re.findall(r"(\d+)/(\d+) \[", r.err)]
    if not counts:
        return Outcome("unclear-message", _got(r, "no bar on stderr"))
    model = _denoiser(p).model
    want = api.network_passes(model, (H, W, 3), self_ensemble=True) + \
        api.after_network_work(model, (H, W, 3), lowpass=4.0)
    totals = sorted({t for _, t in counts})
    seen = max(n for n, _ in counts)
    got = f"exit 0; bar totals {totals}, counted up to {seen}; expected total {want}"
    return Outcome(OK if totals == [want] and seen <= want else "silent-wrong-output", got)


# ====================================================================== the run, the report

def machine() -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
    return dict(cpu=f"{cpu}, {os.cpu_count()} cores", python=platform.python_version(),
                torch=torch.__version__, commit=commit or "unknown",
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report(cases: list[Case], info: dict, seconds: float, timeout: float) -> str:
    counts = {}
    for c in cases:
        counts[c.outcome.verdict] = counts.get(c.outcome.verdict, 0) + 1
    failed = len(cases) - counts.get(OK, 0)
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()) if k != OK)
    lines = [
        "# Hardening probe (issue #34)", "",
        f"`python -m benchmarks.hardening_probe`: {len(cases)} cases, {counts.get(OK, 0)} ok, "
        f"{failed} failed" + (f" ({kinds})" if failed else "") + f"; {seconds:.0f} s.", "",
        f"Machine: CPU {info['cpu']}; Python {info['python']}, torch {info['torch']}; "
        f"{info['date']}; commit {info['commit']}. Each command-line case runs "
        f"`python -m ssbsn` in a subprocess of its own (limit {timeout:.0f} s, one thread); "
        "the API cases call `ssbsn.Denoiser` in the probe's process. One tiny model (8 "
        f"channels, 2 modules, 1 SS-Block, random weights), {H}×{W} images; `$TMP` is the "
        "probe's temporary folder.", "",
        "Verdicts: ok; silent-wrong-output (exit 0 or no exception where the input had to be "
        "refused, or a wrong output), overwrite (an existing file changed without "
        "--overwrite), hang (the limit ran out), internal-error (a traceback or 'internal "
        "error'), wrong-exit-code (2 for a bad command line, 1 for bad input), "
        "unclear-message (not one line naming the problem), left-files (files written before "
        "a refusal).", "",
        "| # | section | case | expected | got | verdict |", "|---|---|---|---|---|---|"]
    for i, c in enumerate(cases, 1):
        v = c.outcome.verdict
        lines.append(f"| {i} | {c.section} | {c.name} | {_cell(c.expected)} | "
                     f"{_cell(c.outcome.got)} | {'ok' if v == OK else '**' + v + '**'} |")
    lines += ["", "Not a hang by design: R3's rounds in a model's metadata may be 1..1000 (the range "
              "of `r3_T`); 1000 rounds are 1001 network passes (metadata_r3_rounds_1000, about "
              "10 s at 48×64 here), and with `--self-ensemble` 8008, past the 60 s limit at "
              "this size: work in proportion to the settings, which the progress bar counts "
              "and times (its ETA), not a stall."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help="the report (markdown)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    ap.add_argument("--only", default="", help="comma-separated words: run the cases whose "
                                               "name holds one of them")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    import logging
    logging.getLogger("ssbsn").setLevel(logging.ERROR)  # the API cases' warnings
    words = [w for w in args.only.split(",") if w]
    cases = [c for c in CASES if not words or any(w in c.name for w in words)]
    root = Path(tempfile.mkdtemp(prefix="ssbsn_probe_"))
    probe = Probe(root, args.timeout)
    t_all = time.perf_counter()
    try:
        tiny_model(probe.model)
        write(probe.image, noisy_image(0))
        width = max(len(c.name) for c in cases)
        for i, c in enumerate(cases, 1):
            t0 = time.perf_counter()
            try:
                c.outcome = c.fn(probe)
            except Exception as e:  # noqa: BLE001 - a broken case is reported, not fatal
                c.outcome = Outcome("internal-error", f"the probe's case raised "
                                                      f"{type(e).__name__}: {e}")
            c.seconds = time.perf_counter() - t0
            c.outcome.got = c.outcome.got.replace(str(root), "$TMP")  # no machine's paths
            print(f"{i:3d} {c.name:<{width}} {c.outcome.verdict:<20} {c.seconds:5.1f} s  "
                  f"{c.outcome.got[:110]}", flush=True)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.perf_counter() - t_all
    text = report(cases, machine(), seconds, args.timeout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    failed = [c for c in cases if c.outcome.verdict != OK]
    print(f"\n{len(cases)} cases, {len(cases) - len(failed)} ok, {len(failed)} failed; "
          f"{seconds:.0f} s; report: {args.out}")
    for c in failed:
        print(f"  FAIL {c.name}: {c.outcome.verdict}: {c.outcome.got}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
