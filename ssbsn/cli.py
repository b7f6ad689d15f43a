"""The ``ssbsn`` command: train, denoise, eval, attention-map, demo, submit, prep.

Every command reports a problem as one line on stderr (``ssbsn: error: ...``): exit status 2
for a command line that cannot be parsed, 1 for everything else; ``--debug`` (before the
command) shows the traceback instead. PyTorch is imported only by the commands that need it,
so ``ssbsn --help`` is quick.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import write_text_atomic

EXIT_ERROR = 1
EXIT_USAGE = 2


class CLIError(ValueError):
    """A problem with what the user asked for."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``ssbsn: error: ...`` and exit status 2."""

    def error(self, message):
        hint = f" (see '{self.prog} --help')"
        self.exit(EXIT_USAGE, f"ssbsn: error: {message}{hint}\n")


# ================================================================== shared helpers

def _device(name: str):
    from .train import pick_device
    return pick_device(name)


def load_model(weights, device: str = "auto", backend: str = "fused"):
    """An SSBSN from our safetensors file or the authors' checkpoint, on ``device``, in eval
    mode. ``backend``: "fused" (memory-efficient SS-Attention: SDPA on CPU, Triton on CUDA) or
    "reference" (the N×N matrix; slow and memory-hungry at full resolution)."""
    from .model import SSBSN
    model = SSBSN.load(weights, backend=backend)
    return model.to(_device(device)).eval()


def _network_passes(model, shape, r3: bool | None, self_ensemble: bool | None, tile: int | None,
                    shifts: bool | None = None, pd: int | None = None) -> int:
    """How many times ``model.denoise`` runs the BSN on an (H, W) image: per tile, one pass
    plus one per R3 round, for each of the 8 flips/rotations with self-ensemble and each of
    the PD stride's s² shifts with the shifted-PD ensemble. None: the model's own setting."""
    from .inference import tile_starts
    s = model.inference
    r3 = s["r3"] if r3 is None else r3
    self_ensemble = s["self_ensemble"] if self_ensemble is None else self_ensemble
    shifts = s["shifts"] if shifts is None else shifts
    tile = s["tile"] if tile is None else tile
    b = model.pd_test if pd is None else pd
    windows = 1
    if tile:
        t = -(-tile // b) * b  # as inference.tiled rounds it
        windows = len(tile_starts(shape[0], t)) * len(tile_starts(shape[1], t))
    return (windows * (8 if self_ensemble else 1) * (b * b if shifts else 1)
            * (1 + model.r3_T if r3 else 1))


@contextmanager
def network_progress(model, total: int, desc: str, progress: bool | None):
    """A tqdm bar on stderr (with ETA) that advances with every pass through ``model.bsn``
    (a forward hook: the library itself prints nothing). ``progress``: True shows it, False
    hides it, None shows it on a terminal once the work takes more than a second."""
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="pass", leave=False, dynamic_ncols=True,
               disable=None if progress is None else not progress,
               delay=1.0 if progress is None else 0.0)

    def tick(*_):  # a forward hook that returns None leaves the output alone
        bar.update(1)
    handle = model.bsn.register_forward_hook(tick)
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()


def denoise_array(model, img: np.ndarray, r3: bool | None = None,
                  self_ensemble: bool | None = None, tile: int | None = None,
                  overlap: int | None = None, seed: int = 0, shifts: bool | None = None,
                  pd: int | None = None, lowpass: float | None = None,
                  progress: bool | None = False, desc: str = "denoise") -> np.ndarray:
    """Denoise one (H, W, C) float image in 0..255 (C = 1 or 3) → float (H, W, C). Options
    left at None take the model's own inference settings (``model.inference``, ``pd_test``).

    A grey image given to a 3-channel model is replicated to 3 channels and the result
    averaged back to one; an RGB image cannot go through a 1-channel model. ``progress``:
    see :func:`network_progress` (per tile and R3 round).
    """
    import torch
    c = img.shape[-1]
    m = model.in_channels
    if c == m:
        x = img
    elif c == 1 and m == 3:
        x = np.repeat(img, 3, axis=-1)
    else:
        raise CLIError(f"the model takes {m}-channel images; this image has {c} channels")
    dev = next(model.parameters()).device
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))[None]
    total = _network_passes(model, img.shape, r3, self_ensemble, tile, shifts, pd)
    with network_progress(model, total, desc, progress):
        y = model.denoise(t.to(dev), r3=r3, self_ensemble=self_ensemble, tile=tile,
                          overlap=overlap, seed=seed, shifts=shifts, pd=pd,
                          lowpass=lowpass)[0].float().cpu().numpy().transpose(1, 2, 0)
    if c == 1 and m == 3:
        y = y.mean(axis=-1, keepdims=True)
    if not np.isfinite(y).all():
        raise CLIError("the model's output holds NaN or Inf (its weights do not work on this "
                       "image); nothing is written for it")
    return y


def _check_writable_dir(path: Path) -> None:
    """Create ``path`` if needed and make sure files can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ssbsn-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(f"{path}: output folder is not writable ({e.strerror or e})") from None


def _add_inference_options(p: argparse.ArgumentParser, weights_required: bool = True) -> None:
    g = p.add_argument_group("model and inference")
    g.add_argument("--weights", "-w", required=weights_required, metavar="CKPT",
                   help="checkpoint: ours (.safetensors from 'ssbsn train') or the authors' "
                        "(.pth)")
    g.add_argument("--r3", dest="r3", action=argparse.BooleanOptionalAction, default=None,
                   help="R3 (random-replacing refinement, T=8, p=0.16); default: the model's "
                        "setting (on for the paper's models)")
    g.add_argument("--self-ensemble", action=argparse.BooleanOptionalAction, default=None,
                   help="average the 8 flips/rotations (8× slower, about +0.7 dB); default: "
                        "the model's setting")
    g.add_argument("--shifts", action=argparse.BooleanOptionalAction, default=None,
                   help="average over the PD stride² pixel shifts (no PD checkerboard; "
                        "stride² slower); default: the model's setting")
    g.add_argument("--pd-test", dest="pd_test", type=int, default=None, metavar="N",
                   help="PD stride at inference (default: the model's)")
    g.add_argument("--lowpass", type=float, default=None, metavar="SIGMA",
                   help="keep the noisy image's low frequencies (Gaussian σ in pixels; removes "
                        "brightness drift); 0 = off; default: the model's setting (off for "
                        "the paper's)")
    g.add_argument("--tile", type=int, default=None, metavar="N",
                   help="process in N×N tiles to bound memory; 0 = whole image (default: the "
                        "model's setting, whole image for the paper's)")
    g.add_argument("--overlap", type=int, default=None, metavar="N",
                   help="context pixels around each tile (default: the model's, 64)")
    g.add_argument("--seed", type=int, default=0, help="seed of R3's random replacement")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    g.add_argument("--backend", choices=("fused", "reference"), default="fused",
                   help="SS-Attention implementation: fused (memory-efficient, default) or "
                        "reference (materialises the attention matrix)")
    _add_progress_option(p)


def _add_progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars with ETA on stderr, per image and per tile/R3 round "
                        "(default: on a terminal, for work over a second)")


def _bars_off(args) -> bool | None:
    """tqdm's ``disable`` for the per-file bars: --progress on, --no-progress off, else on a
    terminal only."""
    return None if args.progress is None else not args.progress


def _infer_kwargs(args) -> dict:
    """Inference options as given; None = the model's own setting."""
    if args.tile is not None and args.tile < 0:
        raise CLIError("--tile must not be negative (0 = the whole image)")
    if args.overlap is not None and args.overlap < 0:
        raise CLIError("--overlap must not be negative")
    if args.pd_test is not None and args.pd_test < 1:
        raise CLIError("--pd-test must be at least 1")
    if args.lowpass is not None and not args.lowpass >= 0:
        raise CLIError("--lowpass must not be negative")
    return dict(r3=args.r3, self_ensemble=args.self_ensemble, tile=args.tile,
                overlap=args.overlap, seed=args.seed, shifts=args.shifts, pd=args.pd_test,
                lowpass=args.lowpass)


# ================================================================== train

def _train_parser(sub, full: bool = True) -> None:
    S = argparse.SUPPRESS
    p = sub.add_parser(
        "train", help="self-supervised training on noisy images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train SS-BSN on noisy images alone (L1 between the PD-5 blind-spot output "
                    "and the noisy input).\n\nDATA: a folder of noisy images (searched "
                    "recursively), a SIDD Medium sRGB root (its NOISY images), a SIDD block "
                    ".mat file (e.g. BenchmarkNoisyBlocksSrgb.mat) or a DND root (info.mat + "
                    "images_srgb/).\nThe run folder (--out) receives config.yaml, log.jsonl, "
                    "ckpt/ and model.safetensors.\nMulti-GPU: torchrun --nproc_per_node=N -m "
                    "ssbsn train DATA ... (--batch is per process).",
        epilog="examples:\n  ssbsn train SIDD_Medium_Srgb --out runs/sidd\n"
               "  ssbsn train photos/ --out runs/mine --steps 20000 --amp bf16\n"
               "  ssbsn train --resume runs/sidd          # continue a stopped run\n"
               "  ssbsn train --config runs/sidd/config.yaml --out runs/again  # repeat it")
    if not full:  # its options need the training module (and PyTorch): only for 'train'
        return
    from .train import TrainConfig
    d = TrainConfig()
    p.add_argument("data", nargs="*", default=S, metavar="DATA", help="training data (see above)")
    p.add_argument("--kind", dest="data_kind", default=S,
                   choices=("auto", "folder", "sidd-medium", "sidd-mat", "dnd"),
                   help="how to read DATA (default: detect)")
    p.add_argument("--out", "-o", default=S, help=f"run folder (default {d.out})")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="continue the run in this folder from its newest complete checkpoint "
                        "(configuration from RUN/config.yaml)")
    p.add_argument("--config", metavar="YAML", default=None,
                   help="start from a saved configuration; options given here override it")
    p.add_argument("--preset", choices=("paper", "quick"), default=S,
                   help="paper (default): the paper's recipe, for GPUs and large data; quick: "
                        "the best quality for a handful of photos within --minutes (default "
                        "8) on a CPU. Options given here override the preset's values")
    p.add_argument("--minutes", type=float, default=S, metavar="M",
                   help="train until M minutes are spent, with the learning-rate schedule laid "
                        "over them (any preset; quick: 8)")
    p.add_argument("--budget-clock", dest="budget_clock", choices=("wall", "cpu"), default=S,
                   help="what --minutes counts: wall time (default) or this process's CPU "
                        "time (robust to a busy machine)")
    g = p.add_argument_group("model")
    g.add_argument("--channels", dest="base_channels", type=int, default=S, metavar="N",
                   help=f"base channels (default {d.base_channels})")
    g.add_argument("--modules", dest="num_modules", type=int, default=S, metavar="N",
                   help=f"modules per branch (default {d.num_modules})")
    g.add_argument("--ss-blocks", dest="ss_blocks", type=int, default=S, metavar="N",
                   help=f"how many of them are SS-Blocks (default {d.ss_blocks})")
    g.add_argument("--in-channels", dest="in_channels", type=int, choices=(1, 3), default=S,
                   help="1 for grey images (default 3)")
    g.add_argument("--pd-train", dest="pd_train", type=int, default=S, metavar="N",
                   help=f"PD stride in training (default {d.pd_train})")
    g.add_argument("--pd-test", dest="pd_test", type=int, default=S, metavar="N",
                   help=f"PD stride at inference (default {d.pd_test})")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=S,
                   help="memory-efficient SS-Attention (Triton on CUDA, SDPA on CPU; default on; "
                        "--no-fused: the N×N reference)")
    g.add_argument("--group-stats", dest="group_stats", action=argparse.BooleanOptionalAction,
                   default=S, help="per-group LayerNorm statistics (exact blind spot; "
                                   "default off, as the paper)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--crop", type=int, default=S, metavar="N",
                   help=f"training crop, a multiple of the PD stride (default {d.crop})")
    g.add_argument("--batch", type=int, default=S, metavar="N", help=f"batch per process (default {d.batch})")
    g.add_argument("--epochs", type=int, default=S, metavar="N", help=f"epochs (default {d.epochs})")
    g.add_argument("--steps", type=int, default=S, metavar="N", help="total steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=S, metavar="X", help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--lr-decay-at", dest="lr_decay_at", type=float, default=S, metavar="X",
                   help=f"fraction of the run after which lr ×{d.lr_gamma} (default "
                        f"{d.lr_decay_at}, the paper's epoch 16 of 20)")
    g.add_argument("--lr-schedule", dest="lr_schedule", choices=("step", "cosine"), default=S,
                   help="step: ×gamma at --lr-decay-at (the paper's); cosine: to 0 at the end")
    g.add_argument("--warmup", type=int, default=S, metavar="N",
                   help="steps of linear learning-rate warm-up (default 0)")
    g.add_argument("--repeat", type=int, default=S, metavar="N",
                   help="random crops per image per epoch (default 1)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=S,
                   help="random flips and 90° rotations (default on)")
    g.add_argument("--seed", type=int, default=S, metavar="N", help="seed of init, data order and crops")
    g.add_argument("--init-bias", dest="init_bias", action=argparse.BooleanOptionalAction,
                   default=S, help="start the output bias at the data's mean pixel value "
                                   "(helps short runs; default off, as the paper)")
    g = p.add_argument_group("runtime")
    g.add_argument("--amp", choices=("off", "bf16"), default=S,
                   help="bf16 autocast (default off)")
    g.add_argument("--channels-last", dest="channels_last",
                   action=argparse.BooleanOptionalAction, default=S,
                   help="channels_last memory format (default off)")
    g.add_argument("--device", default=S, metavar="DEV", help="auto, cpu or cuda (default auto)")
    g.add_argument("--workers", type=int, default=S, metavar="N", help="data loader workers (default 0)")
    g.add_argument("--save-every", dest="save_every", type=int, default=S, metavar="N",
                   help="checkpoint every N steps (default: every epoch)")
    g.add_argument("--log-every", dest="log_every", type=int, default=S, metavar="N",
                   help=f"log every N steps (default {d.log_every})")
    g.add_argument("--keep", type=int, default=S, metavar="N",
                   help=f"checkpoints kept (default {d.keep})")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=S,
                   help="progress bar (default on)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .train import LENGTH_KEYS, RUNTIME_KEYS, TrainConfig, read_config, train
    given = {k: v for k, v in vars(args).items()
             if k in {f for f in TrainConfig.__dataclass_fields__}}
    if args.resume:
        run = Path(args.resume)
        cfg = read_config(run / "config.yaml")
        changed = sorted(k for k in given if k not in RUNTIME_KEYS + LENGTH_KEYS
                         and k != "out" and given[k] != getattr(cfg, k))
        if changed:
            raise CLIError(f"--resume continues {run} with its saved configuration; these "
                           f"options differ from it: {', '.join(changed)}")
        if "epochs" in given and "steps" not in given:
            given["steps"] = None  # --epochs sets the length when --steps is not given
        for k in RUNTIME_KEYS + LENGTH_KEYS:
            if k in given:
                setattr(cfg, k, given[k])
        cfg.out = str(run)
        summary = train(cfg, resume=True)
    else:
        cfg = read_config(args.config) if args.config else TrainConfig()
        if "preset" in given:
            from .presets import preset_values
            for k, v in preset_values(given["preset"]).items():
                setattr(cfg, k, v)
        for k, v in given.items():
            setattr(cfg, k, v)
        if not cfg.data:
            raise CLIError("no training data: give DATA (a folder, SIDD root, .mat or DND root)")
        cfg.data = [str(Path(d).resolve()) for d in cfg.data]  # --resume from anywhere
        summary = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained {summary['steps']} steps, final loss {summary['loss']:.4f}; "
              f"weights: {summary['weights']}")
    return 0


# ================================================================== denoise

def _denoise_parser(sub) -> None:
    p = sub.add_parser(
        "denoise", help="denoise image files or folders",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Denoise PNG/JPEG/TIFF images (8- or 16-bit, grey or RGB; alpha is kept). "
                    "Each output has the input's format and bit depth. A grey image through a "
                    "3-channel model is replicated to RGB and the result averaged back to grey.\n"
                    "OUT is a file when one image goes to a name with an image suffix, "
                    "otherwise a folder (created) that receives the inputs' names (a folder "
                    "input keeps its sub-folders). Existing files are never replaced without "
                    "--overwrite.",
        epilog="examples:\n  ssbsn denoise noisy.png -o clean.png --weights runs/x/model.safetensors\n"
               "  ssbsn denoise photos/ -o denoised/ -w SSBSN_SIDD.pth --tile 512 --self-ensemble")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file or folder")
    p.add_argument("--overwrite", action="store_true",
                   help="allow replacing existing files, inputs included")
    _add_inference_options(p)
    p.set_defaults(func=cmd_denoise)


def _plan_outputs(inputs: list[str], output: str) -> list[tuple[Path, Path]]:
    from .data import list_images
    from .imageio import is_image_file
    pairs = []
    for item in inputs:
        p = Path(item)
        files = list_images(p, recursive=True)
        for f in files:
            rel = f.relative_to(p) if p.is_dir() else Path(f.name)
            pairs.append((f, rel))
    out = Path(output)
    if len(pairs) == 1 and not Path(inputs[0]).is_dir() and is_image_file(out) \
            and not out.is_dir():
        return [(pairs[0][0], out)]
    plan = [(src, out / rel) for src, rel in pairs]
    seen = {}
    for src, dst in plan:
        key = dst.resolve()
        if key in seen:
            raise CLIError(f"{src} and {seen[key]} would both be written to {dst}")
        seen[key] = src
    return plan


def cmd_denoise(args) -> int:
    from tqdm import tqdm

    from .imageio import (check_size, from_model_range, icc_profile, read_image, split_alpha,
                          to_model_range, write_image)
    kwargs = _infer_kwargs(args)
    plan = _plan_outputs(args.inputs, args.output)
    # everything that can fail is checked before anything is written
    for src, dst in plan:
        if dst.exists() and not args.overwrite:
            what = "is an input" if dst.resolve() == src.resolve() else "exists"
            raise CLIError(f"{dst} {what}; use --overwrite to replace it")
    model = load_model(args.weights, args.device, args.backend)
    for src, _ in plan:
        colour = split_alpha(read_image(src))[0]
        check_size(colour, src)
        c = colour.shape[-1]
        if c != model.in_channels and not (c == 1 and model.in_channels == 3):
            raise CLIError(f"{src}: {c}-channel image, but the model takes "
                           f"{model.in_channels}-channel images")
    for folder in sorted({dst.parent for _, dst in plan}):
        _check_writable_dir(folder)
    for src, dst in tqdm(plan, desc="denoise", unit="img",
                         disable=True if len(plan) < 2 else _bars_off(args)):
        img = read_image(src)
        colour, alpha = split_alpha(img)
        y = denoise_array(model, to_model_range(colour), progress=args.progress,
                          desc=src.name, **kwargs)
        out = from_model_range(y, colour.dtype)
        if alpha is not None:
            out = np.concatenate([out, alpha], axis=-1)
        write_image(dst, out, icc_profile=icc_profile(src))  # upright, same colour profile
        print(f"{src} -> {dst}")
    return 0


# ================================================================== eval

def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="PSNR/SSIM on a paired dataset",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PSNR and SSIM of the denoised images against clean references, with "
                    "scikit-image's conventions: the output is rounded to 8 bits (floor(x+0.5), "
                    "clipped to 0..255), then peak_signal_noise_ratio(clean, out, data_range=255) "
                    "and structural_similarity(clean, out, channel_axis=-1, data_range=255) "
                    "(7×7 uniform window), averaged over images. The noisy input's scores are "
                    "reported beside them.\n\nNOISY [CLEAN]: two folders paired by file name; "
                    "one folder holding noisy/ and clean/; ValidationNoisyBlocksSrgb.mat "
                    "(ValidationGtBlocksSrgb.mat beside it unless CLEAN is given) or the "
                    "folder holding both; or a SIDD Medium root.",
        epilog="examples:\n  ssbsn eval SIDD/ValidationNoisyBlocksSrgb.mat -w model.safetensors "
               "--json val.json\n  ssbsn eval pairs/noisy pairs/clean -w model.safetensors")
    p.add_argument("noisy", metavar="NOISY")
    p.add_argument("clean", nargs="?", metavar="CLEAN")
    p.add_argument("--json", metavar="FILE", help="write the report (settings, per-image scores, "
                                                  "means) as JSON")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N images only")
    p.add_argument("--save-dir", metavar="DIR", help="also write the denoised images (PNG)")
    _add_inference_options(p)
    p.set_defaults(func=cmd_eval)


def _sidd_clean_file(noisy: Path, clean: str | None) -> Path:
    """CLEAN if given, else the SIDD clean-block file beside the noisy one."""
    if clean:
        return Path(clean)
    for name in (noisy.name.replace("Noisy", "Gt"), "ValidationGtBlocksSrgb.mat"):
        c = noisy.with_name(name)
        if c != noisy and c.is_file():
            return c
    raise CLIError(f"{noisy}: no clean blocks to compare with (no ValidationGtBlocksSrgb.mat "
                   "beside it); give CLEAN, the .mat file of the clean blocks")


def open_pairs(noisy: str, clean: str | None):
    """(names, loader) for a paired dataset; ``loader(i)`` → (noisy, clean) uint8/16 arrays."""
    from .data import load_sidd_blocks, paired_images
    from .data.sidd import SIDD_GT_KEYS, SIDD_NOISY_KEYS
    from .data.sidd import is_sidd_medium, scan_sidd_medium
    from .imageio import read_image, split_alpha
    n = Path(noisy)
    if n.is_dir() and (n / "ValidationNoisyBlocksSrgb.mat").is_file() and clean is None:
        n = n / "ValidationNoisyBlocksSrgb.mat"
    if n.suffix.lower() == ".mat":
        nb = load_sidd_blocks(n, (n.stem,) + SIDD_NOISY_KEYS)
        cb = load_sidd_blocks(_sidd_clean_file(n, clean), (Path(clean).stem,) + SIDD_GT_KEYS
                              if clean else SIDD_GT_KEYS)
        if nb.shape != cb.shape:
            raise CLIError(f"noisy blocks {nb.shape} and clean blocks {cb.shape} differ in shape")
        names = [f"{i:02d}_{k:02d}" for i in range(nb.shape[0]) for k in range(nb.shape[1])]
        m = nb.shape[1]
        return names, lambda i: (nb[i // m, i % m], cb[i // m, i % m])
    if n.is_dir() and clean is None and (n / "noisy").is_dir() and (n / "clean").is_dir():
        pairs = paired_images(n / "noisy", n / "clean")
    elif n.is_dir() and clean is None and is_sidd_medium(n):
        pairs = scan_sidd_medium(n)
    elif n.is_dir() and clean is not None:
        pairs = paired_images(n, Path(clean))
    else:
        raise CLIError(f"{noisy}: not a paired dataset (give NOISY and CLEAN folders, a folder "
                       "with noisy/ and clean/, a SIDD validation .mat or a SIDD Medium root)")

    def load(i):
        a = split_alpha(read_image(pairs[i][0]))[0]
        b = split_alpha(read_image(pairs[i][1]))[0]
        if a.shape != b.shape:
            raise CLIError(f"{pairs[i][0]} and {pairs[i][1]} differ in shape: {a.shape} vs {b.shape}")
        return a, b
    return [str(p[0]) for p in pairs], load


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from .imageio import check_size, to_model_range, write_image
    from .metrics import psnr, quantize, ssim
    kwargs = _infer_kwargs(args)
    names, load = open_pairs(args.noisy, args.clean)
    if args.limit is not None:
        if args.limit < 1:
            raise CLIError("--limit must be at least 1")
        names = names[:args.limit]
    if args.save_dir:
        _check_writable_dir(Path(args.save_dir))
    if args.json:
        _check_writable_dir(Path(args.json).resolve().parent)
    model = load_model(args.weights, args.device, args.backend)
    rows = []
    t0 = time.perf_counter()
    print(f"{'image':<40} {'PSNR in':>8} {'PSNR out':>9} {'SSIM in':>8} {'SSIM out':>9}")
    for i in tqdm(range(len(names)), desc="eval", unit="img", leave=False,
                  disable=_bars_off(args)):
        noisy, clean = load(i)
        check_size(noisy, names[i])
        x, ref = to_model_range(noisy), to_model_range(clean)
        out = quantize(denoise_array(model, x, progress=args.progress,
                                     desc=Path(names[i]).name, **kwargs))
        row = dict(image=names[i], psnr_noisy=psnr(x, ref), psnr=psnr(out, ref),
                   ssim_noisy=ssim(x, ref), ssim=ssim(out, ref))
        rows.append(row)
        tqdm.write(f"{Path(names[i]).name[-40:]:<40} {row['psnr_noisy']:8.2f} {row['psnr']:9.2f} "
                   f"{row['ssim_noisy']:8.4f} {row['ssim']:9.4f}")
        if args.save_dir:
            write_image(Path(args.save_dir) / f"{i:04d}_{Path(names[i]).stem}.png", out)
    mean = {k: float(np.mean([r[k] for r in rows]))
            for k in ("psnr_noisy", "psnr", "ssim_noisy", "ssim")}
    print(f"{'mean over ' + str(len(rows)) + ' images':<40} {mean['psnr_noisy']:8.2f} "
          f"{mean['psnr']:9.2f} {mean['ssim_noisy']:8.4f} {mean['ssim']:9.4f}")
    if args.json:
        report = dict(weights=str(args.weights), data=[args.noisy, args.clean], **kwargs,
                      metric_conventions="skimage peak_signal_noise_ratio(data_range=255), "
                                         "structural_similarity(channel_axis=-1, "
                                         "data_range=255); output rounded to uint8",
                      seconds=time.perf_counter() - t0, mean=mean, images=rows)
        _write_text_atomic(Path(args.json), json.dumps(report, indent=2))
    return 0


def _write_text_atomic(path: Path, text: str) -> None:
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise CLIError(f"{path}: cannot write ({e.strerror or e})") from None


# ================================================================== submit

def _submit_parser(sub) -> None:
    p = sub.add_parser(
        "submit", help="benchmark submission files (SIDD, DND)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Denoise a benchmark and write its submission.\n"
                    "  sidd: INPUT = BenchmarkNoisyBlocksSrgb.mat; OUT = SubmitSrgb.mat "
                    "(DenoisedBlocksSrgb, 40×32 cells of uint8 blocks, TimeMPSrgb, "
                    "OptionalData).\n"
                    "  dnd:  INPUT = the DND folder (info.mat, images_srgb/); OUT = a new folder "
                    "of 0001.mat … 0050.mat (Idenoised: 20 float32 crops in 0..1, israw, "
                    "eval_version), as the DND kit's bundle_submissions_srgb writes them.",
        epilog="examples:\n  ssbsn submit sidd SIDD/BenchmarkNoisyBlocksSrgb.mat -o SubmitSrgb.mat -w m.safetensors\n"
               "  ssbsn submit dnd dnd_2017/ -o dnd_bundled/ -w m.safetensors")
    p.add_argument("benchmark", choices=("sidd", "dnd"))
    p.add_argument("input", metavar="INPUT")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")
    _add_inference_options(p)
    p.set_defaults(func=cmd_submit)


def cmd_submit(args) -> int:
    from tqdm import tqdm

    from .data import DNDBoxes, load_sidd_blocks, write_dnd_bundle, write_sidd_submission
    from .metrics import quantize
    kwargs = _infer_kwargs(args)
    out = Path(args.output)
    if args.benchmark == "sidd":
        if out.exists() and not args.overwrite:
            raise CLIError(f"{out} exists; use --overwrite to replace it")
        _check_writable_dir(out.resolve().parent)
        blocks = load_sidd_blocks(args.input)
        model = load_model(args.weights, args.device, args.backend)
        result = np.empty_like(blocks)
        t0 = time.perf_counter()
        n, m = blocks.shape[:2]
        for i in tqdm(range(n * m), desc="SIDD", unit="block", disable=_bars_off(args)):
            result[i // m, i % m] = quantize(
                denoise_array(model, blocks[i // m, i % m].astype(np.float32), **kwargs))
        mp = n * m * blocks.shape[2] * blocks.shape[3] / 1e6
        write_sidd_submission(out, result, time_mp=(time.perf_counter() - t0) / mp)
        print(f"wrote {out} ({n}×{m} blocks)")
        return 0
    dnd = DNDBoxes(args.input)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"{out} exists and is not an empty folder")
    _check_writable_dir(out.resolve().parent)
    model = load_model(args.weights, args.device, args.backend)
    results: dict[int, list] = {}
    for idx in tqdm(range(len(dnd)), desc="DND", unit="box", disable=_bars_off(args)):
        i, _, _, _ = dnd.entries[idx]
        y = denoise_array(model, dnd.load(idx) * np.float32(255.0), **kwargs)
        results.setdefault(i, []).append(quantize(y).astype(np.float32) / 255.0)
    files = write_dnd_bundle(out, results)
    print(f"wrote {len(files)} files to {out}")
    return 0


# ================================================================== attention map

def _attention_parser(sub) -> None:
    p = sub.add_parser(
        "attention-map", help="where SS-Attention looks for one pixel (paper Fig. 1/7)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="For the pixel (Y, X) of IMAGE, draw the attention weights that each "
                    "SS-Block gives to the pixels of its grid group (pixels sharing the row and "
                    "column phase of the PD-2 map), mapped back to image coordinates; the "
                    "brightest markers are the pixels it weighs most.",
        epilog="example:\n  ssbsn attention-map photo.png --pixel 120 200 -w m.safetensors "
               "-o attn.png")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--pixel", nargs=2, type=int, required=True, metavar=("Y", "X"))
    p.add_argument("-o", "--output", default="attention.png", help="PNG (default attention.png)")
    p.add_argument("--top", type=int, default=16, help="outline the K heaviest pixels (16)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--weights", "-w", required=True, metavar="CKPT")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_attention)


def cmd_attention(args) -> int:
    from .attention_map import attention_maps, plot_attention
    from .imageio import check_size, read_image, split_alpha, to_model_range
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise CLIError(f"{out}: the attention map is written as PNG (use a .png name)")
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; use --overwrite to replace it")
    _check_writable_dir(out.resolve().parent)
    img = split_alpha(read_image(args.image))[0]
    check_size(img, args.image)
    y, x = args.pixel
    if not (0 <= y < img.shape[0] and 0 <= x < img.shape[1]):
        raise CLIError(f"--pixel {y} {x} lies outside the {img.shape[0]}×{img.shape[1]} image")
    model = load_model(args.weights, args.device, "fused")
    x255 = to_model_range(img)
    if x255.shape[-1] == 1 and model.in_channels == 3:
        x255 = np.repeat(x255, 3, axis=-1)
    maps = attention_maps(model, x255, (y, x))
    plot_attention(x255, (y, x), maps, out, top=args.top)
    print(f"wrote {out} ({len(maps)} SS-Blocks)")
    return 0


# ================================================================== demo, prep

def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="train and denoise on built-in photos with synthetic camera noise",
        description="No data needed: takes photos shipped with scikit-image, adds realistic "
                    "camera noise (raw shot/read noise through a demosaicking camera pipeline), "
                    "trains a small SS-BSN on the noisy photos alone, denoises them and prints "
                    "the PSNR gain. Writes noisy/denoised/clean PNGs and the model to OUT.")
    p.add_argument("-o", "--output", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps instead of the time budget")
    p.add_argument("--minutes", type=float, default=None,
                   help="training time budget in minutes (default 4; the quick preset)")
    p.add_argument("--quick", action="store_true", help="a few seconds, for tests (no gain "
                                                        "expected)")
    p.add_argument("--r3", action="store_true",
                   help="denoise with R3 as 'ssbsn denoise' does (9× slower; it pays off only "
                        "for a well-trained model, not after the demo's short training)")
    p.add_argument("--seed", type=int, default=0, help="seed of cameras, noise, init and crops")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in OUT")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.output, steps=args.steps, minutes=args.minutes, quick=args.quick,
             seed=args.seed, device=args.device, r3=True if args.r3 else None,
             threads=args.threads,
             overwrite=args.overwrite)
    return 0


def _prep_parser(sub) -> None:
    p = sub.add_parser(
        "prep", help="cut large training images into tiles (faster data loading)",
        description="Cut every image of INPUT (files, folders, or a SIDD Medium root: its "
                    "NOISY images) into SIZE×SIZE tiles overlapping by OVERLAP pixels, as PNG "
                    "files in OUT (as the authors prepare SIDD: 512, overlap 128).")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--overlap", type=int, default=128)
    _add_progress_option(p)
    p.set_defaults(func=cmd_prep)


def _tile_starts(n: int, size: int, step: int) -> list[int]:
    starts = list(range(0, max(n - size, 0) + 1, step))
    if starts[-1] + size < n:
        starts.append(n - size)
    return starts


def cmd_prep(args) -> int:
    from tqdm import tqdm

    from .data import list_images, scan_sidd_medium
    from .data.sidd import is_sidd_medium
    from .imageio import icc_profile, read_image, split_alpha, write_image
    if args.size < 8 or not 0 <= args.overlap < args.size:
        raise CLIError("--size must be ≥ 8 and 0 ≤ --overlap < --size")
    if len(args.inputs) == 1 and Path(args.inputs[0]).is_dir() and is_sidd_medium(args.inputs[0]):
        files = [n for n, _ in scan_sidd_medium(args.inputs[0])]
    else:
        files = list_images(args.inputs, recursive=True)
    out = Path(args.output)
    _check_writable_dir(out)
    count = 0
    for f in tqdm(files, desc="prep", unit="img", disable=_bars_off(args)):
        img = split_alpha(read_image(f))[0]
        h, w = img.shape[:2]
        if min(h, w) < args.size:
            raise CLIError(f"{f}: {h}×{w} is smaller than --size {args.size}")
        step = args.size - args.overlap
        suffix = ".tif" if img.dtype != np.uint8 else ".png"
        icc = icc_profile(f)
        for y in _tile_starts(h, args.size, step):
            for x in _tile_starts(w, args.size, step):
                write_image(out / f"{f.stem}_{y:05d}_{x:05d}{suffix}",
                            img[y:y + args.size, x:x + args.size], icc_profile=icc)
                count += 1
    print(f"wrote {count} tiles to {out}")
    return 0


# ================================================================== entry point

def build_parser(argv=None) -> argparse.ArgumentParser:
    """The ``ssbsn`` parser. Given ``argv``, the train options (which import PyTorch) are
    built only when ``argv`` names the train command."""
    p = _Parser(
        prog="ssbsn",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="SS-BSN: self-supervised denoising of real camera noise, trained on noisy "
                    "images alone (Han & Yu, IJCAI-23).",
        epilog="start with:  ssbsn demo        (about 5 minutes on a laptop CPU)\n"
               "then:        ssbsn train DATA --out runs/mine\n"
               "             ssbsn denoise photo.png -o clean.png -w runs/mine/model.safetensors\n"
               "'ssbsn COMMAND --help' explains each command.")
    p.add_argument("--version", action="version", version=f"ssbsn {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for PyTorch (default: one per core)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _demo_parser(sub)
    _train_parser(sub, full=argv is None or "train" in argv)
    _denoise_parser(sub)
    _eval_parser(sub)
    _attention_parser(sub)
    _submit_parser(sub)
    _prep_parser(sub)
    return p


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the cause
        lines = [ln for ln in text.splitlines() if ln.strip()]
        text = lines[-1].split(": ", 1)[-1] if lines else text
    return text.splitlines()[0] if text else type(e).__name__


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "not enough memory" in text
                                            or "can't allocate memory" in text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise CLIError("--threads must be at least 1")
            import torch
            torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ssbsn: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if args.debug:
            raise
        if _out_of_memory(e):
            print("ssbsn: error: out of memory: try --tile N (e.g. --tile 256) to denoise in "
                  f"tiles, or a smaller --batch/--crop to train ({_one_line(e)})", file=sys.stderr)
        else:
            print(f"ssbsn: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError, KeyError) as e:  # CLIError, CheckpointError, ImageError, ...
        if args.debug:
            raise
        print(f"ssbsn: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: still one line; --debug shows where
        if args.debug:
            raise
        print(f"ssbsn: error: internal error ({type(e).__name__}: {_one_line(e)}); run "
              "'ssbsn --debug ...' for the traceback and please report it", file=sys.stderr)
        return EXIT_ERROR
