"""SS-BSN: self-supervised blind-spot denoising with nonlocal self-similarity.

    >>> from ssbsn import SSBSN, SSAttention
    >>> model = SSBSN()                       # the paper's configuration
    >>> loss = (model(noisy) - noisy).abs().mean()   # self-supervised training forward
    >>> clean = model.denoise(noisy)          # PD-2 + R3 inference
    >>> from ssbsn import Denoiser            # the façade: files, images, evaluation
    >>> Denoiser.from_weights("model.safetensors").denoise_files(["photos/"], "out/")

The names below are imported on first use, so that ``ssbsn --help`` does not load PyTorch.
"""
import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["BSN", "CheckpointError", "ConfigError", "DataError", "Denoiser", "ImageError",
           "InferenceConfig", "ModelConfig", "SSAttention", "SSBSN", "SSBSNError",
           "TrainingDiverged", "UserError", "evaluate", "load_model", "ss_attention"]

_WHERE = {"BSN": ".nn", "SSAttention": ".attention", "SSBSN": ".model",
          "ss_attention": ".attention", "ModelConfig": ".config", "InferenceConfig": ".config",
          "Denoiser": ".api",
          "evaluate": ".api", "load_model": ".api",
          **{name: ".errors" for name in ("CheckpointError", "ConfigError", "DataError",
                                          "ImageError", "SSBSNError", "TrainingDiverged",
                                          "UserError")}}


if TYPE_CHECKING:  # what type checkers and IDEs see of the lazy names below
    from .api import Denoiser, evaluate, load_model
    from .attention import SSAttention, ss_attention
    from .config import InferenceConfig, ModelConfig
    from .errors import (CheckpointError, ConfigError, DataError, ImageError, SSBSNError,
                         TrainingDiverged, UserError)
    from .model import SSBSN
    from .nn import BSN


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ssbsn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
