"""The ``ssbsn`` command: train, denoise, eval, attention-map, demo, submit, prep.

Every command reports a problem as one line on stderr (``ssbsn: error: ...``): exit status 2
for a command line that cannot be served as written (unknown commands or options, with a
"did you mean", values out of their range, options that contradict each other, missing
arguments), 1 for everything else; ``--debug`` shows the traceback instead. ``--debug`` and
``--threads`` go before or after the command. Warnings are ``ssbsn: warning: ...`` lines on
stderr. PyTorch is imported only when a command runs, so every ``--help`` is quick.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path


from . import __version__
from .atomic import check_writable_dir, write_text_atomic
from .config import add_inference_options, add_model_options, inference_field_names
from .errors import SSBSNError, UsageError, UserError

EXIT_ERROR = 1
EXIT_USAGE = 2


CLIError = UserError  # the older name of a user error


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``ssbsn: error: ...`` and exit status 2, with a "did you
    mean" for a mistyped command, choice or option."""

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        hint = f" (see '{self.prog} --help')"
        self.exit(EXIT_USAGE, f"ssbsn: error: {message}{self._did_you_mean(message)}{hint}\n")

    def _did_you_mean(self, message: str) -> str:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            close = difflib.get_close_matches(m.group(1), re.findall(r"'([^']*)'", m.group(2)),
                                              n=1, cutoff=0.6)
            return f"; did you mean '{close[0]}'?" if close else ""
        known = [o for a in self._actions for o in a.option_strings]
        subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        argv = getattr(self, "_argv", [])
        command = next((t for t in argv if subs and t in subs[0].choices), None)
        if command is not None:
            known += [o for a in subs[0].choices[command]._actions for o in a.option_strings]
        m = re.match(r"unrecognized arguments: (.*)", message)
        words = m.group(1).split() if m else argv  # another error may hide a mistyped option
        hints = []
        for word in words:
            name = word.split("=")[0]
            if not name.startswith("-") or re.fullmatch(r"-\.?\d.*", name) or \
                    any(o.startswith(name) for o in known):  # argparse takes prefixes
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            if close:
                hints.append(f"'{close[0]}' for '{word}'")
        return f"; did you mean {', '.join(hints)}?" if hints else ""


# ================================================================== value checks
# Every number and name on the command line is checked as it is parsed (argparse ``type=``):
# a value out of its range is a usage error (exit 2) naming the option and the range.

def _whole(lo: int, hi: int | None = None):
    """A whole number in lo..hi (hi None: no upper bound)."""
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(
                f"must lie in {lo}..{hi}, got {value}" if hi is not None
                else f"must be at least {lo}, got {value}")
        return value
    return whole_number


def _number(lo: float, hi: float | None = None, above: bool = False):
    """A finite number from ``lo`` (excluded with ``above``) to ``hi`` (None: no bound)."""
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low = f"above {lo:g}" if above else f"at least {lo:g}"
        want = f"a number {low}" + (f" and at most {hi:g}" if hi is not None else "")
        if not (math.isfinite(value) and (value > lo if above else value >= lo)
                and (hi is None or value <= hi)):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value
    return number


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda or "
                                         "cuda:N (or mps on a Mac)")
    return text


def _value_checks() -> dict:
    """The check of each option that takes a value, by its name (the same in every command)."""
    from .train_config import MAX_MINUTES, MAX_SEED, MAX_WORKERS
    at_least_1 = _whole(1)
    return {
        "--threads": _whole(1, 4096), "--seed": _whole(0, MAX_SEED), "--device": _device,
        "--steps": at_least_1, "--epochs": at_least_1, "--batch": at_least_1,
        "--crop": at_least_1, "--repeat": at_least_1, "--log-every": at_least_1,
        "--save-every": at_least_1, "--keep": at_least_1, "--warmup": _whole(0),
        "--workers": _whole(0, MAX_WORKERS), "--lr": _number(0, above=True),
        "--lr-decay-at": _number(0, 1, above=True),
        "--minutes": _number(0, MAX_MINUTES, above=True),
        "--limit": at_least_1, "--top": _whole(0), "--overlap": _whole(0),
        "--pd-test": _whole(1, 64),
    }  # (the inference options of denoise, eval and submit check themselves: InferenceConfig)


def _model_field_check(f):
    """A :class:`ssbsn.config.ModelConfig` field's own range as an argparse type."""
    kind, check, expected = f.type, f.metadata["check"], f.metadata["expected"]
    convert = {"int": _whole(-2 ** 63), "float": _number(-math.inf)}[str(kind)]

    def value(text: str):
        v = convert(text)
        if not check(v):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return v
    return value


def _apply_value_checks(parser: argparse.ArgumentParser, checks: dict,
                        model: bool = False) -> None:
    """Give every option of ``parser`` that takes a number or a device its check (an option
    declared with a check of its own keeps it); ``model``: the model's options (``ssbsn
    train``) their fields' ranges."""
    from .config import model_fields
    fields = {f.name: f for f in model_fields() if model and f.metadata["check"] is not None
              and str(f.type) in ("int", "float")}
    for action in parser._actions:
        if type(action) is not argparse._StoreAction or not action.option_strings \
                or action.type not in (int, float, None):
            continue
        name = next((o for o in action.option_strings if o in checks), None)
        if name is not None:
            action.type = checks[name]
        elif action.dest in fields and action.type in (int, float) and action.choices is None:
            action.type = _model_field_check(fields[action.dest])


def _add_global_options(p: argparse.ArgumentParser) -> None:
    """``--debug`` and ``--threads`` after the command as well as before it."""
    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks of errors")
    g.add_argument("--threads", type=int, metavar="N", default=argparse.SUPPRESS,
                   help="CPU threads for PyTorch (default: one per core)")


# ================================================================== shared helpers

DEVICE_HELP = "auto (CUDA if present), cpu or cuda"
WEIGHTS_HELP = ("checkpoint: ours (.safetensors from 'ssbsn train', or its run folder) or the "
                "authors' (.pth)")


def _add_inference_options(p: argparse.ArgumentParser, weights_required: bool = True) -> None:
    g = p.add_argument_group("model and inference")
    g.add_argument("--weights", "-w", required=weights_required, metavar="CKPT",
                   help=WEIGHTS_HELP)
    # the inference settings (ssbsn.config.InferenceConfig): R3, ensembles, tiles, PD stride,
    # seed and the steps after the network (docs/restore.md)
    add_inference_options(g)
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--attention-window", type=int, default=None, metavar="N",
                   help="bound SS-Attention's scope to windows of N pixels of the map it sees "
                        "(time linear in the image area); 0 = the whole map (the paper's); "
                        "default: the model's own (42 for the quick preset)")
    add_model_options(g, names=("backend",))
    _add_progress_option(p)


def _add_progress_option(p: argparse.ArgumentParser,
                         what: str = "per image and per tile/R3 round") -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=f"progress bars with ETA on stderr, {what} (default: on a terminal, "
                        "for work over a second)")


def _denoiser(args):
    from .api import Denoiser
    from .train import check_backend_device, pick_device
    if args.attention_window is not None and not 0 <= args.attention_window <= 65536:
        raise UsageError(f"--attention-window must lie in 0..65536 (0 = the whole map), "
                         f"got {args.attention_window}")
    check_backend_device(args.backend, pick_device(args.device))
    return Denoiser.from_weights(args.weights, args.device, args.backend,
                                 attention_window=args.attention_window)


def _infer_kwargs(args) -> dict:
    """Inference options as given (each checked when parsed); None = the model's own
    setting."""
    return {name: getattr(args, name) for name in inference_field_names()}


# ================================================================== train

def _train_parser(sub) -> None:
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
    from .train_config import TrainConfig  # no PyTorch: 'train --help' stays quick
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
    add_model_options(g, default=S)
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=S,
                   help="older spelling of --backend fused (--no-fused: --backend reference)")
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
    g = p.add_argument_group("runtime (the step's settings default to the fast step on CUDA "
                             "and fp32 eager on the CPU)")
    g.add_argument("--amp", choices=("auto", "off", "bf16"), default=S,
                   help="bf16 autocast (default auto: bf16 on CUDA, off on the CPU)")
    g.add_argument("--channels-last", dest="channels_last",
                   action=argparse.BooleanOptionalAction, default=S,
                   help="channels_last memory format (default: on CUDA)")
    g.add_argument("--fused-adam", dest="fused_adam", action=argparse.BooleanOptionalAction,
                   default=S, help="Adam's fused implementation (default: on CUDA)")
    g.add_argument("--capture", choices=("auto", "none", "compile", "graph"), default=S,
                   help="capture the step: graph (a CUDA graph of forward, backward and Adam "
                        "after 3 eager steps), compile (torch.compile; reduce-overhead on CUDA) "
                        "or none (eager); default auto: graph on one GPU, none under torchrun "
                        "and on the CPU")
    g.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=S,
                   help="copy the next batch to the GPU on a side stream while the step runs "
                        "(default: on CUDA)")
    g.add_argument("--cudnn-benchmark", dest="cudnn_benchmark",
                   action=argparse.BooleanOptionalAction, default=S,
                   help="cuDNN's autotuner (default: on CUDA)")
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
    from .train import run_config, train
    from .train_config import TrainConfig
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    cfg = run_config(given, resume=args.resume, config=args.config)
    summary = train(cfg, resume=bool(args.resume))
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained {summary['steps']} steps, final loss {summary['loss']:.4f}; "
              f"{summary['steps_per_s']:.2f} steps/s, {summary['images_per_s']:.1f} images/s; "
              f"weights: {summary['weights']}")
        check = summary.get("check")
        if check and check["ok"]:
            print(check["message"])
        elif check:  # "warning: training failed: ...", as every warning is written
            print(f"ssbsn: {check['message']}", file=sys.stderr)
    return 0


# ================================================================== denoise

def _denoise_parser(sub) -> None:
    p = sub.add_parser(
        "denoise", help="denoise image files or folders",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Denoise PNG/JPEG/TIFF images (8- or 16-bit, grey or RGB; alpha is kept). "
                    "Each output has the input's format and bit depth. A grey image through a "
                    "3-channel model is replicated to RGB and the result averaged back to grey.\n"
                    "OUT is a file when one image file goes to a name with an image suffix, "
                    "otherwise a folder (created; a name ending in / is always one) that "
                    "receives the inputs' names (a folder input keeps its sub-folders). "
                    "Existing files are never replaced without --overwrite.",
        epilog="examples:\n  ssbsn denoise noisy.png -o clean.png --weights runs/x/model.safetensors\n"
               "  ssbsn denoise photos/ -o denoised/ -w SSBSN_SIDD.pth --tile 512 --self-ensemble")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file or folder")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--overwrite", action="store_true",
                      help="allow replacing existing files, inputs included")
    keep.add_argument("--skip-existing", action="store_true",
                      help="keep the outputs that exist and denoise only the inputs whose "
                           "outputs are missing (outputs are written whole or not at all, so "
                           "this continues a batch that was stopped)")
    p.add_argument("--force", action="store_true",
                   help="denoise even with a model whose training check failed (its outputs "
                        "are not denoised images)")
    _add_inference_options(p)
    p.set_defaults(func=cmd_denoise)


def _check_trained(args, force: bool = False) -> None:
    """Refuse a model whose training check failed, unless ``force`` (then a warning)."""
    from .health import failed_check_line, stored_check
    check = stored_check(args.weights)
    if check is not None and not check["ok"] and not force:
        raise UserError(f"{failed_check_line(args.weights, check)}, or pass --force to use "
                        "it anyway")


def cmd_denoise(args) -> int:
    kwargs = _infer_kwargs(args)
    _check_trained(args, args.force)
    _denoiser(args).denoise_files(args.inputs, args.output, overwrite=args.overwrite,
                                  skip_existing=args.skip_existing, progress=args.progress,
                                  **kwargs)
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
    p.add_argument("noisy", metavar="NOISY", help="the noisy images or blocks (see above)")
    p.add_argument("clean", nargs="?", metavar="CLEAN",
                   help="their clean counterparts, where NOISY does not hold them")
    p.add_argument("--json", metavar="FILE", help="write the report (settings, per-image scores, "
                                                  "means) as JSON")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N images only")
    p.add_argument("--save-dir", metavar="DIR", help="also write the denoised images (PNG)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow replacing an existing --json file and images in --save-dir")
    _add_inference_options(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from .api import METRIC_CONVENTIONS, evaluate
    kwargs = _infer_kwargs(args)
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.json:
        if Path(args.json).exists() and not args.overwrite:
            raise UserError(f"{args.json} exists; use --overwrite to replace it")
        check_writable_dir(Path(args.json).resolve().parent)
    denoiser = _denoiser(args)

    shown = []

    def show(row):  # one line per image, above the progress bar
        if not shown:
            shown.append(row)
            tqdm.write(f"{'image':<40} {'PSNR in':>8} {'PSNR out':>9} {'SSIM in':>8} "
                       f"{'SSIM out':>9}")
        tqdm.write(f"{Path(row['image']).name[-40:]:<40} {row['psnr_noisy']:8.2f} "
                   f"{row['psnr']:9.2f} {row['ssim_noisy']:8.4f} {row['ssim']:9.4f}")
    result = evaluate(denoiser, args.noisy, args.clean, limit=args.limit,
                      save_dir=args.save_dir, progress=args.progress, on_row=show,
                      overwrite=args.overwrite, **kwargs)
    rows, mean = result["images"], result["mean"]
    print(f"{'mean over ' + str(len(rows)) + ' images':<40} {mean['psnr_noisy']:8.2f} "
          f"{mean['psnr']:9.2f} {mean['ssim_noisy']:8.4f} {mean['ssim']:9.4f}")
    if args.json:
        report = dict(weights=str(args.weights), data=[args.noisy, args.clean], **kwargs,
                      metric_conventions=METRIC_CONVENTIONS, seconds=result["seconds"],
                      mean=mean, images=rows)
        _write_text_atomic(Path(args.json), json.dumps(_strict_json(report), indent=2,
                                                       allow_nan=False))
    return 0


def _strict_json(value):
    """``value`` with every NaN or infinite number as None (JSON has neither: a PSNR of
    identical images, +inf, becomes null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _write_text_atomic(path: Path, text: str) -> None:
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None


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
    p.add_argument("benchmark", choices=("sidd", "dnd"), help="which benchmark (see above)")
    p.add_argument("input", metavar="INPUT", help="its noisy data (see above)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="the submission file (sidd) or folder (dnd)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (sidd: the file; dnd: the folder, replaced "
                        "whole once the new bundle is complete)")
    _add_inference_options(p)
    p.set_defaults(func=cmd_submit)


def cmd_submit(args) -> int:
    kwargs = _infer_kwargs(args)
    out = Path(args.output)
    if args.benchmark == "sidd":
        if out.exists() and not args.overwrite:
            raise UserError(f"{out} exists; use --overwrite to replace it")
        _denoiser(args).submit_sidd(args.input, out, overwrite=args.overwrite,
                                    progress=args.progress, **kwargs)
        return 0
    from .data import DNDBoxes
    from .data.dnd import check_bundle_target
    DNDBoxes(args.input).load(0)  # the input (layout, value range) before the model is loaded
    check_bundle_target(out, args.overwrite)
    _denoiser(args).submit_dnd(args.input, out, progress=args.progress,
                               overwrite=args.overwrite, **kwargs)
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
    p.add_argument("image", metavar="IMAGE", help="the image (PNG/JPEG/TIFF)")
    p.add_argument("--pixel", nargs=2, type=int, required=True, metavar=("Y", "X"),
                   help="the query pixel: row Y, column X (from 0 at the top left)")
    p.add_argument("-o", "--output", default="attention.png", help="PNG (default attention.png)")
    p.add_argument("--top", type=int, default=16, metavar="K",
                   help="outline the K heaviest pixels (16; 0: none)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing OUT")
    p.add_argument("--weights", "-w", required=True, metavar="CKPT",
                   help=WEIGHTS_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_attention)


def cmd_attention(args) -> int:
    from .api import load_model
    from .attention_map import attention_map_of_file, ss_blocks_of
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: the attention map is written as PNG (use a .png name)")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; use --overwrite to replace it")
    check_writable_dir(out.resolve().parent)
    model = load_model(args.weights, args.device, "fused")
    if not ss_blocks_of(model):
        raise UserError(f"{args.weights}: the model has no SS-Blocks (ss_blocks=0), so there is "
                        "no attention to draw")
    maps = attention_map_of_file(model, args.image, tuple(args.pixel), out, top=args.top)
    print(f"wrote {out} ({len(maps)} SS-Blocks)")
    for m in maps:
        print(f"  d={m['dilation']} block {m['block']} (grid {m['grid']}): {len(m['weights'])} "
              f"pixels, heaviest weight {m['peak']:.2f}x uniform, entropy {m['entropy']:.3f} of "
              f"uniform's, padding {m['pad_share']:.1%} of the weight")
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
    steps, minutes = _demo_budget()
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {steps}; fewer if --minutes runs out first)"
                   if steps else "training steps instead of the time budget")
    p.add_argument("--minutes", type=float, default=None,
                   help=f"training time budget in minutes (default {minutes:g}; the quick "
                        "preset)" if isinstance(minutes, (int, float)) else
                        "training time budget in minutes")
    p.add_argument("--quick", action="store_true", help="a few seconds, for tests (no gain "
                                                        "expected)")
    p.add_argument("--r3", action="store_true",
                   help="denoise with R3 as 'ssbsn denoise' does (9× slower; it pays off only "
                        "for a well-trained model, not after the demo's short training)")
    p.add_argument("--seed", type=int, default=0, help="seed of cameras, noise, init and crops")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in OUT")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="the training's progress bar on stderr (default on; off with --quick)")
    p.set_defaults(func=cmd_demo)


def _demo_budget():
    """The demo's default step count and time budget, as the demo sets them."""
    from . import demo
    d = getattr(demo, "DEMO", {})
    return d.get("steps"), d.get("minutes", "the demo's")


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.output, steps=args.steps, minutes=args.minutes, quick=args.quick,
             seed=args.seed, device=args.device, r3=True if args.r3 else None,
             threads=args.threads, overwrite=args.overwrite, progress=args.progress)
    return 0


def _prep_parser(sub) -> None:
    p = sub.add_parser(
        "prep", help="cut large training images into tiles (faster data loading)",
        description="Cut every image of INPUT (files, folders, or a SIDD Medium root: its "
                    "NOISY images) into SIZE×SIZE tiles overlapping by OVERLAP pixels, as PNG "
                    "files in OUT (as the authors prepare SIDD: 512, overlap 128).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files and/or folders, or a SIDD Medium root")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="folder that receives the tiles (created)")
    p.add_argument("--size", type=int, default=512, metavar="N",
                   help="tile side in pixels (default 512)")
    p.add_argument("--overlap", type=int, default=None, metavar="N",
                   help="pixels neighbouring tiles share (default a quarter of --size: 128 "
                        "for 512, the authors')")
    p.add_argument("--overwrite", action="store_true", help="allow replacing existing tiles")
    _add_progress_option(p, "over the images")
    p.set_defaults(func=cmd_prep)


def cmd_prep(args) -> int:
    from .data.tiles import check_tile_size, plan_tiles, prep_inputs, write_tiles
    if args.overlap is None:
        args.overlap = args.size // 4
    check_tile_size(args.size, args.overlap)
    out = Path(args.output)
    files = prep_inputs(args.inputs, exclude=out)
    plan_tiles(files, out, args.size, args.overlap, overwrite=args.overwrite)  # before mkdir
    check_writable_dir(out)
    count = write_tiles(files, out, args.size, args.overlap, progress=args.progress,
                        overwrite=args.overwrite)
    print(f"wrote {count} tiles to {out}")
    return 0


# ================================================================== entry point

def build_parser(argv=None) -> argparse.ArgumentParser:
    """The ``ssbsn`` parser (``argv`` is not needed: building it imports no PyTorch)."""
    p = _Parser(
        prog="ssbsn",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="SS-BSN: self-supervised denoising of real camera noise, trained on noisy "
                    "images alone (Han & Yu, IJCAI-23).",
        epilog="start with:  ssbsn demo        (about 5 minutes on a laptop CPU)\n"
               "then:        ssbsn train DATA --out runs/mine\n"
               "             ssbsn denoise photo.png -o clean.png -w runs/mine/model.safetensors\n"
               "'ssbsn COMMAND --help' explains each command; --debug and --threads go "
               "before or after it.")
    p.add_argument("--version", action="version", version=f"ssbsn {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for PyTorch (default: one per core)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _demo_parser(sub)
    _train_parser(sub)
    _denoise_parser(sub)
    _eval_parser(sub)
    _attention_parser(sub)
    _submit_parser(sub)
    _prep_parser(sub)
    checks = _value_checks()
    _apply_value_checks(p, checks)
    for name, command in sub.choices.items():
        _add_global_options(command)
        _apply_value_checks(command, checks, model=name == "train")
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
    try:
        import torch
        if isinstance(e, torch.OutOfMemoryError):
            return True
    except ImportError:
        pass
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "not enough memory" in text
                                            or "can't allocate memory" in text)


def _raised_here(e: BaseException) -> bool:
    """Whether ``e`` was raised by this package's own code (a deliberate input check), not by
    a library it calls."""
    import traceback
    frames = traceback.extract_tb(e.__traceback__)
    package = str(Path(__file__).resolve().parent)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(package)


class _StdoutHandler(logging.Handler):
    """The library's lines (``ssbsn`` logger): INFO on the current stdout as plain lines,
    warnings on stderr as ``ssbsn: warning: ...``."""

    def emit(self, record):
        try:
            if record.levelno >= logging.WARNING:
                print(f"ssbsn: warning: {self.format(record)}", file=sys.stderr)
            else:
                print(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


def _configure_logging(debug: bool) -> None:
    logger = logging.getLogger("ssbsn")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        logger.addHandler(_StdoutHandler())
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


@contextlib.contextmanager
def _one_line_warnings(debug: bool):
    """Python warnings (the package's own and its libraries', e.g. torch's DataLoader) as one
    ``ssbsn: warning: ...`` line each, their first line, each text once per command; with
    ``--debug`` Python's own format, with the file and line."""
    if debug:
        yield
        return
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip()
        text = text.splitlines()[0] if text else category.__name__
        if text not in seen:
            seen.add(text)
            print(f"ssbsn: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv=None) -> int:
    """Run the ``ssbsn`` command. The project's own errors (:mod:`ssbsn.errors`: bad options,
    images, data, checkpoints, configurations, a diverged run), invalid values and file errors
    are one line ``ssbsn: error: ...``; running out of memory says so with advice; anything
    else is a bug, reported as an internal error (``--debug`` shows its traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    _configure_logging(args.debug)
    from .allocator import use_huge_pages
    use_huge_pages()  # before torch: full-resolution feature maps without 4 KiB page faults
    try:
        with _one_line_warnings(args.debug):
            if args.threads is not None:
                import torch
                torch.set_num_threads(args.threads)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ssbsn: interrupted", file=sys.stderr)
        return 130
    except (SSBSNError, OSError) as e:  # the project's own errors; files that cannot be used
        if args.debug:
            raise
        print(f"ssbsn: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UsageError) else EXIT_ERROR
    except Exception as e:
        if args.debug:
            raise
        if _out_of_memory(e):
            print("ssbsn: error: out of memory: try --tile N (e.g. --tile 256) to denoise in "
                  f"tiles, or a smaller --batch/--crop to train ({_one_line(e)})", file=sys.stderr)
        elif isinstance(e, ValueError) and _raised_here(e):  # an input check of the package
            print(f"ssbsn: error: {_one_line(e)}", file=sys.stderr)
        else:  # a bug: still one line; --debug shows where
            print(f"ssbsn: error: internal error ({type(e).__name__}: {_one_line(e)}); run "
                  "'ssbsn --debug ...' for the traceback and please report it", file=sys.stderr)
        return EXIT_ERROR
