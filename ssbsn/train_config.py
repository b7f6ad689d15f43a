"""The configuration of a training run, :class:`TrainConfig` (saved as a run's config.yaml).

It imports nothing heavy (no PyTorch), so the command line can show ``ssbsn train --help``
with its defaults quickly; :mod:`ssbsn.train` runs it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .config import ModelConfig, RUNTIME_FIELDS, model_field_names
from .errors import ConfigError

# bounds of the run's numbers, shared by validate() and the command line's checks
MAX_MINUTES = 525600.0  # a year: a time budget beyond it is a typo
MAX_WORKERS = 256
MAX_SEED = 2 ** 32 - 1  # every seed (training, R3) is one 32-bit value

MODEL_KEYS = model_field_names()  # the model's fields: ssbsn.config.ModelConfig
RUNTIME_KEYS = ("device", "workers", "progress", "capture", "prefetch",
                "cudnn_benchmark") + RUNTIME_FIELDS  # may change on resume
LENGTH_KEYS = ("steps", "epochs")  # may grow on resume: extends a finished or stopped run
AMP_CHOICES = ("auto", "off", "bf16")
CAPTURE_CHOICES = ("auto", "none", "compile", "graph")
# the settings of the step that depend on the device ("auto" / None: chosen by resolve())
STEP_KEYS = ("amp", "channels_last", "fused_adam", "capture", "prefetch", "cudnn_benchmark")
# those that change the numbers: config.yaml records their resolved values (the rest are runtime
# keys, saved as given, so that a run resumes or repeats on another device)
NUMERIC_STEP_KEYS = ("amp", "channels_last", "fused_adam")


@dataclass
class TrainConfig(ModelConfig):
    """Everything that defines a training run (saved as config.yaml): the model's fields
    (:class:`ssbsn.config.ModelConfig`, with their defaults, the paper's) and these."""
    data: list = field(default_factory=list)
    data_kind: str = "auto"
    out: str = "runs/ssbsn"
    fused: bool | None = None  # older spelling of backend (True: "fused", False: "reference")
    # optimisation
    crop: int = 120
    batch: int = 4
    epochs: int = 20
    steps: int | None = None  # overrides epochs
    lr: float = 1e-4
    lr_decay_at: float = 0.8  # fraction of the run
    lr_gamma: float = 0.1
    warmup: int = 0  # steps of linear learning-rate warm-up (the authors' code has it, off)
    repeat: int = 1  # crops per image per epoch
    augment: bool = True
    seed: int = 0
    init_bias: bool = False  # start the output bias at the data's mean (short runs)
    lr_schedule: str = "step"  # "step" (the paper's) or "cosine" (to 0 at the end of the run)
    minutes: float | None = None  # time budget: train until spent (schedule laid over it)
    budget_clock: str = "wall"  # "wall" or "cpu" (this process's CPU time; robust to load)
    preset: str = "paper"  # the preset the run started from (ssbsn.presets), for the record
    inference: dict | None = None  # inference settings the trained model carries
    # runtime; the step's settings default to "auto"/None: the fast step on CUDA (bf16,
    # channels_last, fused Adam, captured step, prefetch, cuDNN autotuner), fp32 eager on the CPU
    amp: str = "auto"  # "auto", "off" or "bf16"
    channels_last: bool | None = None
    fused_adam: bool | None = None  # torch.optim.Adam(fused=True)
    capture: str = "auto"  # "auto", "none", "compile" (torch.compile) or "graph" (CUDA graph)
    prefetch: bool | None = None  # copy the next batch to the device ahead, on a side stream
    cudnn_benchmark: bool | None = None  # torch.backends.cudnn.benchmark
    device: str = "auto"
    workers: int = 0
    save_every: int | None = None  # steps; default: every epoch
    log_every: int = 10
    keep: int = 2  # checkpoints kept
    progress: bool = True

    def __post_init__(self):
        if self.fused is not None:  # an older configuration: fold it into backend
            self.backend = "fused" if self.fused else "reference"
            self.fused = None

    def resolve(self, device_type: str, world: int = 1, resume: bool = False,
                keys=STEP_KEYS) -> None:
        """Replace every "auto"/None setting of the step (:data:`STEP_KEYS`) by its value on
        ``device_type`` ("cuda", "cpu", "mps") with ``world`` processes. On CUDA: bf16 autocast,
        channels_last, fused Adam, cuDNN's autotuner, batches prefetched to the GPU and the
        whole step captured in a CUDA graph (one process; under DDP the step stays eager);
        elsewhere: fp32, NCHW, the plain Adam, eager, no prefetch. ``resume``: a run saved
        before ``fused_adam`` existed trained with the plain Adam and keeps it. ``keys``: resolve
        only these."""
        cuda = device_type == "cuda"
        before = {k: getattr(self, k) for k in STEP_KEYS if k not in keys}
        if self.amp == "auto":
            self.amp = "bf16" if cuda else "off"
        if self.channels_last is None:
            self.channels_last = cuda
        if self.fused_adam is None:
            self.fused_adam = cuda and not resume
        if self.capture == "auto":
            self.capture = "graph" if cuda and world == 1 else "none"
        if self.prefetch is None:
            self.prefetch = cuda
        if self.cudnn_benchmark is None:
            self.cudnn_benchmark = cuda
        for k, v in before.items():
            setattr(self, k, v)

    def step_settings(self) -> dict:
        """The step's settings (:data:`STEP_KEYS`) as they stand."""
        return {k: getattr(self, k) for k in STEP_KEYS}

    def model_config(self) -> ModelConfig:
        """The model part of the configuration."""
        return ModelConfig.of(self)

    def model_kwargs(self) -> dict:
        """Keywords for :class:`ssbsn.SSBSN`: the model's fields and its inference settings."""
        kw = self.model_config().to_dict()
        if self.inference is not None:
            kw["inference"] = dict(self.inference)
        return kw

    def validate(self) -> None:
        from .config import check_model_fields
        check_model_fields(self)
        if self.ss_blocks > self.num_modules:
            raise ConfigError(f"--ss-blocks {self.ss_blocks} exceeds --modules {self.num_modules}")
        if self.crop < self.pd_train or self.crop % self.pd_train:
            raise ConfigError(f"--crop {self.crop} must be a positive multiple of the training PD "
                             f"stride {self.pd_train}")
        for name in ("batch", "epochs", "repeat", "log_every", "keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise ConfigError("--steps must be at least 1")
        if self.warmup < 0:
            raise ConfigError("--warmup must not be negative")
        if self.save_every is not None and self.save_every < 1:
            raise ConfigError("--save-every must be at least 1")
        if self.amp not in AMP_CHOICES:
            raise ConfigError(f"--amp must be 'auto', 'off' or 'bf16', got {self.amp!r}")
        if self.capture not in CAPTURE_CHOICES:
            raise ConfigError(f"--capture must be one of {', '.join(CAPTURE_CHOICES)}, got "
                              f"{self.capture!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):  # one too large diverges: caught
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.lr_gamma) and self.lr_gamma > 0):
            raise ConfigError(f"lr_gamma must be a positive number, got {self.lr_gamma}")
        if not 0.0 < self.lr_decay_at <= 1.0:
            raise ConfigError("--lr-decay-at must lie in (0, 1]")
        if self.lr_schedule not in ("step", "cosine"):
            raise ConfigError(f"--lr-schedule must be 'step' or 'cosine', got {self.lr_schedule!r}")
        if self.minutes is not None and not 0 < self.minutes <= MAX_MINUTES:
            raise ConfigError(f"--minutes must be a number above 0 and at most {MAX_MINUTES:g} "
                              f"(a year), got {self.minutes}")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"--workers must lie in 0..{MAX_WORKERS}, got {self.workers}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must lie in 0..{MAX_SEED}, got {self.seed}")
        if self.budget_clock not in ("wall", "cpu"):
            raise ConfigError(f"--budget-clock must be 'wall' or 'cpu', got {self.budget_clock!r}")
        if self.inference is not None:
            from .config import InferenceConfig, check_inference
            if not isinstance(self.inference, dict):
                raise ConfigError(f"inference must be a mapping of inference settings, got "
                                  f"{type(self.inference).__name__}")
            check_inference({**InferenceConfig().stored(), **self.inference}, stored=True)

    def to_dict(self, stored: bool = False) -> dict:
        d = dataclasses.asdict(self)
        d["data"] = [str(p) for p in self.data]
        d.pop("fused")  # folded into backend
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        d = dict(d)
        for f in dataclasses.fields(cls):  # the annotation's type (a string here)
            if str(f.type) == "float" and isinstance(d.get(f.name), str):
                try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                    d[f.name] = float(d[f.name])
                except ValueError:
                    pass
            if f.name in d and not _has_type(d[f.name], str(f.type)):
                raise ConfigError(f"configuration key {f.name}: {d[f.name]!r} is not "
                                 f"{_TYPE_WORDS.get(str(f.type), f.type)}")
        return cls(**d)


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false",
               "bool | None": "true, false or null",
               "str": "a string", "list": "a list", "int | None": "an integer or null"}


def _has_type(value, annotation: str) -> bool:
    if value is None:
        return annotation.endswith("| None")
    kind = annotation.split(" |")[0]
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return {"int": isinstance(value, int), "float": isinstance(value, (int, float)),
            "str": isinstance(value, str), "list": isinstance(value, list)}.get(kind, True)
