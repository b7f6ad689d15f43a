"""One pipeline from the noisy image to the output: the network's estimate
(:mod:`ssbsn.restore.estimate`), then the restoration steps that the settings switch on, in
the order of the fields of :class:`ssbsn.config.InferenceConfig`.

A step is a class with a ``stage`` and a call ``step(ctx, image, value) -> image``
(:class:`Step`): ``value`` is its setting's (true, or the lowpass's σ), ``ctx`` the
:class:`Context` (the noisy image, the model, the settings and the network's estimates).
Steps of the stage ``"estimate"`` transform every network estimate (the lowpass), those of
``"output"`` the result so far. The field that switches a step on names it in its metadata
(``step="module:Class"``), so a new step is one module and one field (docs/restore.md).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Protocol

import torch

from ..config import (InferenceConfig, check_pd_for_image, check_tiles_for_image,
                      inference_fields)
from .estimate import network_estimate


class Step(Protocol):
    """A restoration step."""
    stage: str  # "estimate" or "output"

    def __call__(self, ctx: "Context", image: torch.Tensor, value) -> torch.Tensor: ...


_STEPS: dict[str, Step] = {}


def load_step(path: str) -> Step:
    """The step ``"module:Class"`` (one instance per path)."""
    if path not in _STEPS:
        module, _, name = path.partition(":")
        step = getattr(importlib.import_module(module), name)()
        if getattr(step, "stage", None) not in ("estimate", "output"):
            raise TypeError(f"the step {path} must have stage 'estimate' or 'output'")
        _STEPS[path] = step
    return _STEPS[path]


def configured_steps(config) -> list[tuple[str, Step, object]]:
    """(field name, step, value) of every step ``config`` switches on, in field order."""
    out = []
    for f in inference_fields(type(config)):
        path, value = f.metadata.get("step"), getattr(config, f.name)
        if path and value:
            out.append((f.name, load_step(path), value))
    return out


@dataclasses.dataclass
class Context:
    """What a step may read: the noisy image (B, C, H, W), the model, the call's settings
    (their ``pd`` resolved) and the network's estimates, each made once."""
    model: object
    noisy: torch.Tensor
    config: InferenceConfig
    steps: list
    _estimates: dict = dataclasses.field(default_factory=dict)

    def estimate_at(self, stride: int, latin: bool = False) -> torch.Tensor:
        """The network's estimate at PD ``stride``, through the steps of the stage
        "estimate". ``latin``: where the shifted-PD ensemble is on, its Latin-square subset
        of ``stride`` shifts is enough (a reference's texture, not an output); the full
        estimate serves where it has been made."""
        key = (stride, bool(latin and self.config.shifts))
        if (stride, False) in self._estimates:
            return self._estimates[(stride, False)]
        if key not in self._estimates:
            H, W = self.noisy.shape[-2:]
            check_pd_for_image(stride, self.model.pd_pad, H, W)
            check_tiles_for_image(self.config.tile, self.config.overlap, H, W, stride)
            y = network_estimate(self.model, self.noisy, stride, self.config, latin=key[1])
            for _, step, value in self.steps:
                if step.stage == "estimate":
                    y = step(self, y, value)
            self._estimates[key] = y
        return self._estimates[key]

    @property
    def estimate(self) -> torch.Tensor:
        """The network's estimate at the inference PD stride."""
        return self.estimate_at(self.config.pd)


class Pipeline:
    """The inference of ``model`` (an :class:`ssbsn.SSBSN`): ``pipeline(x, **settings)``.
    Settings left at None take the model's own (``model.inference``; the PD stride
    ``model.pd_test``). ``config_cls``: the settings' declaration (an
    :class:`ssbsn.config.InferenceConfig` or a subclass that declares more steps)."""

    def __init__(self, model, config_cls=InferenceConfig):
        self.model = model
        self.config_cls = config_cls

    def settings(self, **given) -> InferenceConfig:
        """The settings of one call, checked (:func:`ssbsn.config.check_inference`)."""
        c = self.config_cls.resolve(self.model.inference, **given)
        return c if c.pd is not None else dataclasses.replace(c, pd=self.model.pd_test)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, **given) -> torch.Tensor:
        m = self.model
        m.check_input(x)
        config = self.settings(**given)
        ctx = Context(m, x, config, configured_steps(config))
        out = ctx.estimate
        for _, step, value in ctx.steps:
            if step.stage == "output":
                out = step(ctx, out, value)
        return out
