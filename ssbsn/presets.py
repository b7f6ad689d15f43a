"""Training presets: named sets of :class:`ssbsn.train.TrainConfig` values.

* ``paper`` (the default): the paper's recipe, unchanged (128 channels, 9 modules, 3 SS-Blocks,
  PD 5, crop 120, batch 4, Adam 1e-4 ×0.1 at 80 %, 20 epochs) — for GPUs and large data.
* ``quick``: a handful of photos on a CPU within minutes (default 8). Its SS-Attention scope
  is bounded to 42-pixel windows (``attention_window``): its training crops' scope, so that
  a photo of any size denoises in time linear in its area
  (``benchmarks/results/inference_scaling/``). Chosen by measurement on
  the demo's photos with synthetic camera noise; see docs/quality.md for
  what each choice is worth. The model it trains carries inference settings that suit it.

Options given on the command line override a preset's values. ``--minutes`` works with every
preset: training runs until the time budget is spent, with the learning-rate schedule laid
over the budget instead of a step count.
"""
from __future__ import annotations

from .config import InferenceConfig

PAPER: dict = {}  # TrainConfig's defaults are the paper's recipe

QUICK: dict = dict(
    base_channels=16, num_modules=2, ss_blocks=1, pd_train=3, pd_test=2, pd_pad=0, crop=42,
    attention_window=42,
    batch=4,
    repeat=16, lr=3e-3, lr_schedule="cosine", warmup=20, init_bias=True, minutes=8.0,
    inference=InferenceConfig(r3=False, shifts=True, lowpass=8.0, blend=True, wiener=True,
                              debias=True).stored(),
)

PRESETS = {"paper": PAPER, "quick": QUICK}


def preset_values(name: str) -> dict:
    """The TrainConfig values of preset ``name`` (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}
