"""Self-supervised training (the paper's recipe) with exact resume and multi-GPU.

Recipe: L1 between the PD-5 BSN output and the noisy input itself, random crops (120 by
default) with flips and 90° rotations, Adam (lr 1e-4), learning rate ×0.1 at 80 % of the run
(the paper's epoch 16 of 20), batch 4.

A run lives in one folder::

    config.yaml                    the configuration (``ssbsn train --config`` repeats the run)
    log.jsonl                      one JSON line per logged step: step, epoch, loss, lr, steps/s,
                                   img/s (the first of each start: the step's settings)
    ckpt/step_00001000.safetensors model weights + model configuration (``SSBSN.load``)
    ckpt/step_00001000.state.pt    optimizer, step, schedule and RNG state: tensors and plain
                                   containers only, read back with ``torch.load(weights_only=True)``
    model.safetensors              the final weights
    check.json                     did it learn? the trained network's blind-spot loss against
                                   a plain mean of each pixel's PD neighbours (ssbsn.health)

Every file is written to a temporary name and renamed, and the state file of a checkpoint is
written after its weights, so a run killed at any moment leaves complete checkpoints only;
``resume`` picks the newest complete one.

Exact resume: the data order and every crop/flip are pure functions of (seed, epoch, index)
(:mod:`ssbsn.data.patches`), the step fixes the epoch and the position in it, and the
optimizer state is restored; a resumed run follows the same loss trajectory as an
uninterrupted one.

Multi-GPU: launch with ``torchrun --nproc_per_node=N -m ssbsn train ...``; each process trains
on its share of every batch (DistributedDataParallel + DistributedSampler; ``batch`` is per
process). Rank 0 writes logs and checkpoints.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .atomic import atomic_path, write_text_atomic
from .checkpoint import RUN_WEIGHTS, save_model
from .errors import (CheckpointError, ConfigError, DataError, StorageError,  # noqa: F401
                     TrainingDiverged, UsageError)  # (TrainingDiverged: its old home)
from .health import CHECK_KEY
from .model import SSBSN
from .train_config import (LENGTH_KEYS, MODEL_KEYS, NUMERIC_STEP_KEYS,  # noqa: F401
                           RUNTIME_KEYS, TrainConfig)
from .train_step import Prefetcher, build_step, fit_optimizer_state, make_optimizer

log = logging.getLogger("ssbsn")

# ------------------------------------------------------------------ files

def write_config(path, cfg: TrainConfig) -> None:
    import yaml
    write_text_atomic(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def read_config(path) -> TrainConfig:
    import yaml
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of configuration keys")
    try:
        return TrainConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def run_config(given: dict, resume=None, config=None) -> TrainConfig:
    """The configuration of a run from the options ``given`` (TrainConfig keys; ``fused`` is
    the older spelling of ``backend``).

    ``resume``: the run folder to continue: its config.yaml, where only the runtime options and
    the length (steps/epochs) may differ. Otherwise ``config`` (a saved config.yaml) or the
    defaults, then the preset's values (``given["preset"]``), then the options given."""
    from .errors import UserError
    given = dict(given)
    fused = given.pop("fused", None)
    if fused is not None and "backend" in given and \
            given["backend"] != ("fused" if fused else "reference"):
        raise UsageError(f"--{'' if fused else 'no-'}fused (the older spelling of --backend "
                         f"{'fused' if fused else 'reference'}) contradicts --backend "
                         f"{given['backend']}; give one of them")
    if fused is not None and "backend" not in given:
        given["backend"] = "fused" if fused else "reference"
    if resume:
        run = Path(resume)
        cfg = read_config(run / "config.yaml")
        changed = sorted(k for k in given if k not in RUNTIME_KEYS + LENGTH_KEYS
                         and k != "out" and given[k] != getattr(cfg, k))
        if changed:
            raise UserError(f"--resume continues {run} with its saved configuration; these "
                            f"options differ from it: {', '.join(changed)}")
        if "epochs" in given and "steps" not in given:
            given["steps"] = None  # --epochs sets the length when --steps is not given
        for k in RUNTIME_KEYS + LENGTH_KEYS:
            if k in given:
                setattr(cfg, k, given[k])
        cfg.out = str(run)
        return cfg
    cfg = read_config(config) if config else TrainConfig()
    if "preset" in given:
        from .presets import preset_values
        for k, v in preset_values(given["preset"]).items():
            setattr(cfg, k, v)
    for k, v in given.items():
        setattr(cfg, k, v)
    if not cfg.data:
        raise UsageError("no training data: give DATA (a folder, SIDD root, .mat or DND root)")
    _check_given_bounds(cfg, given)
    cfg.data = [str(Path(d).resolve()) for d in cfg.data]  # --resume from anywhere
    return cfg


def _check_given_bounds(cfg: TrainConfig, given: dict) -> None:
    """The bounds between options (crop and PD stride, SS-Blocks and modules) where the command
    line gave one of them: a usage error (exit 2). Where only a saved configuration holds them,
    :meth:`TrainConfig.validate` refuses them as the configuration's error."""
    if {"crop", "pd_train"} & set(given) and (cfg.crop < cfg.pd_train
                                              or cfg.crop % cfg.pd_train):
        raise UsageError(f"--crop {cfg.crop} must be a positive multiple of the training PD "
                         f"stride {cfg.pd_train} (--pd-train)")
    if {"ss_blocks", "num_modules"} & set(given) and cfg.ss_blocks > cfg.num_modules:
        raise UsageError(f"--ss-blocks {cfg.ss_blocks} exceeds --modules {cfg.num_modules}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


CKPT_RE = re.compile(r"^step_(\d{8})\.state\.pt$")


def checkpoint_paths(run_dir, step: int) -> tuple[Path, Path]:
    d = Path(run_dir) / "ckpt"
    return d / f"step_{step:08d}.safetensors", d / f"step_{step:08d}.state.pt"


@contextmanager
def writing(path, run_dir):
    """A file of the run being written: an ``OSError`` inside (a full disk, ...) becomes a
    :class:`StorageError` naming the file and the last good checkpoint, which stays."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        done = list_checkpoints(run_dir)
        kept = (f"the last good checkpoint (step {done[-1]}) is kept in {Path(run_dir) / 'ckpt'}; "
                f"continue with 'ssbsn train --resume {run_dir}'" if done
                else "no checkpoint was written")
        what = ("no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                else f"cannot write ({e.strerror or e})")
        raise StorageError(f"{what} while writing {path}; {kept}", e.errno) from None


def save_checkpoint(run_dir, model: SSBSN, optimizer, state: dict, keep: int = 2) -> Path:
    """Weights (safetensors, :meth:`SSBSN.save`) then training state (``torch.save`` of
    tensors and plain containers), each atomically; older checkpoints beyond ``keep`` are
    removed once the new one is complete. A write that fails (a full disk) leaves the earlier
    checkpoints as they were and raises :class:`StorageError`."""
    step = int(state["step"])
    weights, st = checkpoint_paths(run_dir, step)
    weights.parent.mkdir(parents=True, exist_ok=True)
    from .train_step import optimizer_state_dict
    payload = dict(state, optimizer=optimizer_state_dict(optimizer),
                   torch_rng=torch.get_rng_state())
    if torch.cuda.is_available():
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    try:
        with writing(weights, run_dir):
            model.save(weights)
            _fsync(weights)
        with writing(st, run_dir), atomic_path(st) as tmp:
            torch.save(payload, tmp)
            _fsync(tmp)
    except StorageError:
        if not st.exists():  # weights without their state file are no checkpoint: free them
            weights.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        for p in checkpoint_paths(run_dir, old):
            p.unlink(missing_ok=True)
    return weights


def list_checkpoints(run_dir) -> list[int]:
    """Steps of the checkpoints whose state file (written last) exists, oldest first."""
    d = Path(run_dir) / "ckpt"
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := CKPT_RE.match(p.name)))


def load_latest_checkpoint(run_dir):
    """(model, state) of the newest checkpoint that loads completely, or None."""
    for step in reversed(list_checkpoints(run_dir)):
        weights, st = checkpoint_paths(run_dir, step)
        try:
            state = torch.load(st, map_location="cpu", weights_only=True)
            model = SSBSN.load(weights)
        except Exception:  # an incomplete or damaged checkpoint: try the one before
            continue
        if int(state.get("step", -1)) == step:
            return model, state
    return None


def clean_temporaries(run_dir) -> None:
    """Remove the temporary files a killed run may have left."""
    for p in list(Path(run_dir).glob("*.tmp")) + list(Path(run_dir).glob("ckpt/*.tmp")):
        p.unlink(missing_ok=True)


class RunLock:
    """An exclusive lock on a run folder (an fcntl record lock on its ``.lock`` file) held
    while a run trains, so that a second ``ssbsn train`` into the same folder fails at once
    instead of mixing its logs and checkpoints with the first's. The kernel releases it when
    the process ends, however it ends; the data loader's worker processes do not inherit it."""

    NAME = ".lock"

    def __init__(self, run_dir):
        import fcntl
        run = Path(run_dir)
        path = run / self.NAME
        try:
            run.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"{run}: cannot write the run folder ({e.strerror or e})") from None
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            except OSError:
                holder = ""
            os.close(self._fd)
            who = f" (process {holder})" if holder.isdigit() else ""
            raise ConfigError(f"{run} is in use by another 'ssbsn train'{who}; wait for it to "
                              "finish or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


# ------------------------------------------------------------------ distributed

def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``name`` (auto, cpu, cuda, cuda:N, mps) names, checked to exist here."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        return torch.device("cuda", local_rank)
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {name!r}: unknown device; use auto, cpu, cuda or cuda:N"
                         ) from None
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        raise UsageError(f"--device {name}: no such CUDA device here "
                         f"({torch.cuda.device_count()} visible)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: no MPS device is available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name!r}: unsupported device; use auto, cpu, cuda or cuda:N")
    return device


def check_backend_device(backend: str | None, device: torch.device) -> None:
    """SS-Attention's ``triton`` backend runs on CUDA devices only (or under Triton's CPU
    interpreter, ``TRITON_INTERPRET=1``): refuse it elsewhere before any work."""
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(f"--backend triton needs a CUDA device (this run: {device}); on the "
                         "CPU use --backend fused or sdpa")


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) pairs of one epoch of ``sampler`` (a DistributedSampler), from batch
    ``skip`` on. One DataLoader lives for the whole run (its workers persist); each epoch is
    started with :meth:`start`, and the epoch travels with every index, so a worker's copy of
    the dataset needs no ``set_epoch``."""

    def __init__(self, sampler, batch: int):
        self.sampler, self.batch = sampler, batch
        self.epoch, self.skip = 0, 0

    def start(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip_batches) * self.batch

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        return iter([(self.epoch, i) for i in list(self.sampler)[self.skip:]])

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


# ------------------------------------------------------------------ training

def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Step decay: ``lr`` until ``lr_decay_at``·total steps, then ``lr``·``lr_gamma``; with
    ``warmup``, the first steps ramp up linearly (step 0 gets lr/warmup)."""
    lr = cfg.lr * (cfg.lr_gamma if step >= math.floor(cfg.lr_decay_at * total) else 1.0)
    if step < cfg.warmup:
        lr *= (step + 1) / cfg.warmup
    return lr


def lr_at_progress(cfg: TrainConfig, step: int, progress: float) -> float:
    """The learning rate at ``progress`` (0..1) of the run, in steps or in the time budget:
    the paper's step decay at ``lr_decay_at`` or a cosine to 0; warm-up as :func:`lr_at`."""
    if cfg.lr_schedule == "cosine":
        lr = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    else:
        lr = cfg.lr * (cfg.lr_gamma if progress >= cfg.lr_decay_at else 1.0)
    if step < cfg.warmup:
        lr *= (step + 1) / cfg.warmup
    return lr


class Budget:
    """The ``--minutes`` clock: wall time, or this process's CPU time (all threads)."""

    def __init__(self, cfg: TrainConfig, spent: float = 0.0):
        self.seconds = None if cfg.minutes is None else cfg.minutes * 60.0
        self._now = time.process_time if cfg.budget_clock == "cpu" else time.perf_counter
        self._start = self._now() - spent

    def spent(self) -> float:
        return self._now() - self._start

    def progress(self) -> float:
        return self.spent() / self.seconds if self.seconds else 0.0


def prepare_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    run = Path(cfg.out)
    if not resume:
        # a folder with a config but no checkpoint is a run that failed before its first
        # checkpoint: not a run, so the same command may start it again
        if list_checkpoints(run) or (run / RUN_WEIGHTS).exists():
            raise ValueError(f"{run} already holds a run; continue it with "
                             f"'ssbsn train --resume {run}' or choose another --out")
        try:
            (run / "ckpt").mkdir(parents=True, exist_ok=True)
            probe = run / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"{run}: cannot write the run folder ({e.strerror or e})") from None
        write_config(run / "config.yaml", cfg)
    return run


def _record_extension(run: Path, cfg: TrainConfig, done: int, total: int) -> None:
    """On resume with a new length (``--steps``/``--epochs``): refuse a length the run has
    already passed, and save the new one in config.yaml. The learning-rate schedule follows the
    new total (its drop moves to ``lr_decay_at`` of it)."""
    if total < done:
        raise ValueError(f"{run} has already trained {done} steps; to extend it give --steps "
                         f"larger than {done}")
    saved = read_config(run / "config.yaml")
    if any(getattr(saved, k) != getattr(cfg, k) for k in LENGTH_KEYS):
        for k in LENGTH_KEYS:
            setattr(saved, k, getattr(cfg, k))
        write_config(run / "config.yaml", saved)


def init_output_bias(model: SSBSN, dataset, samples: int = 16) -> None:
    """Set the last layer's bias to the mean pixel value of the first crops (epoch 0), so a
    short run does not spend its first hundreds of steps learning the image mean. The same on
    every process."""
    n = min(samples, len(dataset))
    mean = torch.stack([dataset[i].mean() for i in range(n)]).mean()
    with torch.no_grad():
        model.bsn.tail[-1].bias.fill_(float(mean))


@dataclass
class _Run:
    """A training run in progress: what :func:`_setup` builds and the loop helpers share."""
    cfg: TrainConfig
    run: Path
    device: torch.device
    world: int
    main: bool
    description: str
    dataset: object
    sampler: EpochSampler
    loader: object
    steps_per_epoch: int
    total: int
    save_every: int
    model: SSBSN
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    budget: Budget
    step: object  # ssbsn.train_step.TrainStep
    lock: RunLock | None = None  # rank 0's lock on the run folder
    start: int = 0
    elapsed: float = 0.0
    last_loss: float = float("nan")


class _LossMeter:
    """The loss between two log points, summed on the device (no host sync per step), and the
    first step whose loss was not finite. :meth:`check` syncs: it runs at log and save points."""

    def __init__(self, device):
        self.device = device
        self.reset()
        self.bad_step = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float32, device=device)

    def reset(self) -> None:
        self.sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.n = 0

    def add(self, loss: torch.Tensor, step: int) -> None:
        """``loss`` of ``step`` (1-based), summed in float64 as Python floats were."""
        loss = loss.detach()
        self.sum += loss.double()
        self.n += 1
        first = (self.bad_step == 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_value = torch.where(first, loss.float(), self.bad_value)

    def check(self, r: _Run) -> None:
        """Stop the run (:class:`TrainingDiverged`) if a loss since the start was not finite."""
        bad = int(self.bad_step)
        if bad:
            _diverged(r.run, r.cfg, bad, f"the loss is {float(self.bad_value)}")

    def mean(self) -> float:
        return float(self.sum) / self.n


def _setup(cfg: TrainConfig, resume: bool, source) -> _Run:
    """Check the configuration and the data, lock and prepare the run folder, build (or
    restore) the model and optimizer and the run's one DataLoader. The lock is released if
    anything after it fails; otherwise the run holds it (``_Run.lock``)."""
    held: list[RunLock] = []
    try:
        return _build_run(cfg, resume, source, held)
    except BaseException:
        for lock in held:
            lock.release()
        raise


def _build_run(cfg: TrainConfig, resume: bool, source, held: list) -> _Run:
    from .data import PatchDataset, open_training_source

    cfg.validate()
    rank, world, local_rank = dist_info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device != "cpu" and torch.cuda.is_available()
                                else "gloo")
    device = pick_device(cfg.device, local_rank)
    check_backend_device(cfg.backend, device)
    # the settings that change the numbers are resolved before config.yaml is written (it
    # records them); the runtime ones after it (it keeps them as given)
    cfg.resolve(device.type, world, resume, keys=NUMERIC_STEP_KEYS)
    check_capture(cfg.capture, device, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    main = rank == 0

    # data: opened and checked before the run folder exists, so bad input leaves nothing
    # behind that would block the retry
    if source is None:
        if not cfg.data:
            raise ValueError("no training data given")
        source, description = open_training_source(cfg.data, cfg.data_kind)
    else:
        description = f"{len(source)} in-memory images"
    dataset = PatchDataset(source, cfg.crop, cfg.in_channels, cfg.augment, cfg.repeat, cfg.seed)
    check_noise(source, cfg.pd_train, cfg.crop, cfg.in_channels, description)
    dist_sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                       shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(dist_sampler) // cfg.batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} crops per epoch are fewer than one batch of "
                         f"{cfg.batch}×{world}; use --repeat to draw more crops per image")
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    if cfg.minutes is not None and cfg.steps is None:
        total = 10 ** 12  # until the time budget is spent

    run = Path(cfg.out)
    if main:
        held.append(RunLock(run))  # before the folder is looked at: one run at a time
        prepare_run_dir(cfg, resume)
        clean_temporaries(run)
    if world > 1:
        dist.barrier()
    cfg = dataclasses.replace(cfg)  # the run's copy, its runtime settings resolved too
    cfg.resolve(device.type, world, resume)

    torch.manual_seed(cfg.seed)
    model = SSBSN(**cfg.model_kwargs())
    state = _resume(run, cfg, model, total, main) if resume else None
    if state is None and not resume and cfg.init_bias:
        init_output_bias(model, dataset)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    capturable = cfg.capture == "graph"
    optimizer = make_optimizer(model.parameters(), cfg.lr, device, fused=cfg.fused_adam,
                               capturable=capturable)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        fit_optimizer_state(optimizer, cfg.fused_adam, capturable)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = EpochSampler(dist_sampler, cfg.batch)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch, sampler=sampler, drop_last=True,
        num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
        pin_memory=device.type == "cuda")
    batches = Prefetcher(loader, device, cfg.channels_last, enabled=cfg.prefetch)
    r = _Run(cfg=cfg, run=run, device=device, world=world, main=main, description=description,
             dataset=dataset, sampler=sampler, loader=batches, steps_per_epoch=steps_per_epoch,
             total=total, save_every=cfg.save_every or steps_per_epoch, model=model, net=net,
             optimizer=optimizer, budget=None,
             step=build_step(net, optimizer, device, cfg.step_settings()),
             lock=held[0] if held else None)
    spent = 0.0
    if state is not None:
        r.start, r.elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
        spent = float(state.get("budget_spent", r.elapsed))
        r.last_loss = float(state.get("loss", float("nan")))
    r.budget = Budget(cfg, spent)
    return r


def check_noise(source, stride: int, crop: int, channels: int, description: str,
                crops: int = 16) -> None:
    """Refuse data a blind-spot network cannot learn from: where each of the first ``crops``
    images, on crops as large as the health check's (:func:`ssbsn.health.check_size`), equals
    pixel for pixel the mean of its 8 neighbours at the PD ``stride`` (flat or saturated
    images), the data hold no noise to learn, and training could only end in a failed check."""
    from .data import PatchDataset
    from .health import check_size, neighbour_mean
    size = check_size(source, stride, crop)
    if size <= 2 * stride:
        return  # no interior to compare: nothing to say
    dataset = PatchDataset(source, size, channels, augment=False, repeat=1, seed=0)
    s = stride
    for i in range(min(crops, len(dataset))):
        x = dataset[i][None].double()
        if (x[..., s:-s, s:-s] - neighbour_mean(x, s)).abs().max() > 1e-6:
            return
    raise DataError(f"the training images ({description}) hold no noise: every pixel equals the "
                    f"mean of its neighbours at PD stride {s} (flat or saturated images); "
                    "SS-BSN learns from the noise of real noisy photos")


def _resume(run: Path, cfg: TrainConfig, model: SSBSN, total: int, main: bool) -> dict | None:
    """Load the newest complete checkpoint into ``model`` and restore the RNG state; its
    training state (step, optimizer, ...) or None when the run has no checkpoint yet."""
    found, saved = load_latest_checkpoint(run), list_checkpoints(run)
    if found is None:
        if saved:  # never start again from step 0 in place of a run the user asked to continue
            raise CheckpointError(
                f"{run / 'ckpt'}: none of the run's checkpoints (steps "
                f"{', '.join(map(str, saved))}) loads: damaged or incomplete; nothing was "
                f"changed (to train this configuration from step 0, move {run / 'ckpt'} away)")
        return None
    loaded, state = found
    skipped = [s for s in saved if s > int(state["step"])]
    if skipped and main:
        log.warning("%s: the checkpoint(s) of step %s do not load (damaged or incomplete); "
                    "continuing from step %d", run / "ckpt", ", ".join(map(str, skipped)),
                    int(state["step"]))
    model.load_state_dict(loaded.state_dict())
    if main:
        _record_extension(run, cfg, int(state["step"]), total)
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def _learning_rate(r: _Run, step: int) -> float | None:
    """The learning rate of ``step``, or None when the time budget is spent."""
    cfg = r.cfg
    if r.budget.seconds is not None:
        progress = r.budget.progress()
        if r.world > 1:  # every process stops at the same step: rank 0's clock
            t = torch.tensor([progress], dtype=torch.float64, device=r.device)
            dist.broadcast(t, 0)
            progress = float(t.item())
        if progress >= 1.0:
            return None
        return lr_at_progress(cfg, step, max(progress, step / r.total))
    if cfg.lr_schedule != "step":
        return lr_at_progress(cfg, step, step / r.total)
    return lr_at(cfg, step, r.total)


def _train_step(r: _Run, x: torch.Tensor, lr: float) -> torch.Tensor:
    """One optimizer step on the batch ``x``; the loss, still on the device."""
    return r.step(x, lr)


def check_capture(capture: str, device: torch.device, world: int) -> None:
    """A CUDA graph of the step needs a CUDA device and one process (under DDP the step stays
    eager or is compiled): refuse it elsewhere before any work."""
    if capture == "graph" and device.type != "cuda":
        raise UsageError(f"--capture graph needs a CUDA device (this run: {device}); use "
                         "--capture compile or none")
    if capture == "graph" and world > 1:
        raise UsageError("--capture graph runs in one process; under torchrun use --capture "
                         "compile or none")


def _save(r: _Run, meter: _LossMeter, step: int, epoch: int, total: int, t_start: float) -> None:
    """A checkpoint, after checking that no loss and no weight has become NaN or Inf."""
    meter.check(r)
    _check_weights(r.run, r.cfg, r.model, step)
    save_checkpoint(r.run, r.model, r.optimizer, dict(
        step=step, epoch=epoch, total_steps=total, elapsed=time.perf_counter() - t_start,
        loss=r.last_loss, budget_spent=r.budget.spent()), keep=r.cfg.keep)


def train(cfg: TrainConfig, resume: bool = False, source=None) -> dict:
    """Train (or continue, with ``resume``) the run described by ``cfg``.

    ``source`` (optional) replaces ``cfg.data`` with an in-memory image source. Returns a
    summary: steps, final loss, run folder, path of the final weights.
    """
    r = _setup(cfg, resume, source)
    try:
        return _train(r)
    finally:
        if r.lock is not None:
            r.lock.release()


def _train(r: _Run) -> dict:
    cfg = r.cfg
    log_path = r.run / "log.jsonl"
    if r.main:
        _truncate_log(log_path, r.start)

    from tqdm import tqdm
    settings = dict(cfg.step_settings(), device=str(r.device), world=r.world)
    bar = tqdm(total=None if r.total == 10 ** 12 else r.total, initial=r.start, unit="step",
               dynamic_ncols=True, disable=not (r.main and cfg.progress), desc="train")
    until = (f"{cfg.minutes:g} {cfg.budget_clock} minutes" if r.total == 10 ** 12
             else f"{r.total} steps")
    if r.main and cfg.progress:
        bar.write(f"ssbsn train: {r.description}; {r.steps_per_epoch} steps/epoch, {until}, "
                  f"batch {cfg.batch}×{r.world}, crop {cfg.crop}, device {r.device}; "
                  f"{_describe_step(settings)}")

    step, meter = r.start, _LossMeter(r.device)
    t_log, imgs_since, steps_since = time.perf_counter(), 0, 0
    t_loop = t_log
    t_start = time.perf_counter() - r.elapsed
    cpu_start = time.process_time()
    r.net.train()
    while step < r.total:
        epoch, offset = divmod(step, r.steps_per_epoch)
        r.sampler.start(epoch, offset)
        for x in r.loader:
            lr = _learning_rate(r, step)
            if lr is None:
                r.total = step  # the time budget is spent
                break
            meter.add(_train_step(r, x, lr), step + 1)
            step += 1
            imgs_since += x.shape[0] * r.world
            steps_since += 1

            if step % cfg.log_every == 0 or step == r.total:
                meter.check(r)
                mean = _all_mean(meter.mean(), r.world, r.device)
                now = time.perf_counter()
                rate = imgs_since / max(now - t_log, 1e-9)
                step_rate = steps_since / max(now - t_log, 1e-9)
                r.last_loss = mean
                if r.main:
                    record = dict(step=step, epoch=epoch, loss=mean,
                                  lr=float(r.optimizer.param_groups[0]["lr"]),
                                  steps_per_s=round(step_rate, 3), img_per_s=round(rate, 3),
                                  elapsed=round(now - t_start, 3))
                    if settings is not None:  # the first line of each start: how it ran
                        record["settings"], settings = settings, None
                    with writing(log_path, r.run):
                        _append_log(log_path, record)
                bar.set_postfix(loss=f"{mean:.3f}", steps_s=f"{step_rate:.2f}",
                                img_s=f"{rate:.1f}")
                meter.reset()
                t_log, imgs_since, steps_since = now, 0, 0
            bar.update(1)
            if r.main and (step % r.save_every == 0 or step == r.total):
                _save(r, meter, step, epoch, r.total, t_start)
            if step >= r.total:
                break
    meter.check(r)
    if r.main and r.budget.seconds is not None and step > 0 and step % r.save_every:
        _save(r, meter, step, step // r.steps_per_epoch, step, t_start)
    bar.close()
    final = r.run / RUN_WEIGHTS
    seconds, cpu_seconds = time.perf_counter() - t_start, time.process_time() - cpu_start
    loop_seconds = max(time.perf_counter() - t_loop, 1e-9)  # this process's steps
    steps_per_s = (step - r.start) / loop_seconds
    check = None
    if r.main:
        _check_weights(r.run, cfg, r.model, step)
        check = _health_check(r)  # before the save: the weights file records its result
        with writing(final, r.run):
            save_model(r.model, final, metadata=None if check is None else
                       {CHECK_KEY: json.dumps(check)})
    if r.world > 1:
        dist.barrier()
    return dict(steps=step, loss=r.last_loss, run=str(r.run), weights=str(final),
                seconds=seconds, cpu_seconds=cpu_seconds, budget_spent=r.budget.spent(),
                steps_per_s=steps_per_s, images_per_s=steps_per_s * cfg.batch * r.world,
                check=check)


def _describe_step(settings: dict) -> str:
    """The step's settings in a few words, for the start line."""
    return ", ".join([f"amp {settings['amp']}",
                      "channels_last" if settings["channels_last"] else "NCHW",
                      "fused Adam" if settings["fused_adam"] else "Adam",
                      f"capture {settings['capture']}",
                      "prefetch" if settings["prefetch"] else "no prefetch"])


def _health_check(r: _Run) -> dict | None:
    """:func:`ssbsn.health.check_training` on the trained model, written to check.json (None
    where the crop has no interior at the training PD stride)."""
    from .health import check_training
    cfg = r.cfg
    if cfg.crop <= 2 * cfg.pd_train:
        return None
    check = check_training(r.model, r.dataset.source, cfg.pd_train, cfg.crop, cfg.in_channels,
                           cfg.seed, batch=cfg.batch, device=r.device).to_dict()
    with writing(r.run / "check.json", r.run):
        write_text_atomic(r.run / "check.json", json.dumps(check, indent=2) + "\n")
    return check


def _diverged(run: Path, cfg: TrainConfig, step: int, what: str):
    done = list_checkpoints(run)
    kept = (f"the last good checkpoint (step {done[-1]}) is kept in {run / 'ckpt'}" if done
            else "no checkpoint was written")
    raise TrainingDiverged(f"training diverged at step {step} ({what}); {kept}; start again "
                           f"with a lower --lr (this run: {cfg.lr:g})")


def _check_weights(run: Path, cfg: TrainConfig, model, step: int) -> None:
    """Never save weights holding NaN or Inf (a step can blow them up with a finite loss), or
    magnitudes that no model loads (:data:`ssbsn.checkpoint.MAX_WEIGHT`)."""
    from .checkpoint import MAX_WEIGHT
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            _diverged(run, cfg, step, f"non-finite weights in {name}")
        if p.numel() and float(p.detach().abs().max()) > MAX_WEIGHT:
            _diverged(run, cfg, step, f"weights beyond {MAX_WEIGHT:g} in {name}")


def _all_mean(value: float, world: int, device) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world


def _append_log(path: Path, record: dict) -> None:
    # strict JSON: a non-finite number is written as null, never as a bare NaN
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in record.items()}
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to ``step`` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a line cut short by a kill
    write_text_atomic(path, "".join(k + "\n" for k in keep))


def read_log(run_dir) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
