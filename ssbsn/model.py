"""SSBSN: the blind-spot network wrapped in AP-BSN's asymmetric PD and R3 refinement."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import from_official, load_model, save_model
from .config import InferenceConfig, ModelConfig, check_inference
from .nn import BSN
from .pd import pd_down, pd_down_batch, pd_up, pd_up_batch


class SSBSN(nn.Module):
    """SS-BSN (Han & Yu, IJCAI-23). Defaults are the paper's configuration.

    ``model(x)`` is the training forward (PD ``pd_train`` → BSN → inverse PD); the loss is L1
    against x itself. Pixel values are floats in 0..255. Inference (PD ``pd_test``, R3,
    ensembles, tiles and the restoration steps) is :class:`ssbsn.restore.Pipeline`'s;
    ``model.denoise(x)`` calls it.

    ``model.inference`` holds the inference settings the pipeline uses when not told
    otherwise (the stored fields of :class:`ssbsn.config.InferenceConfig`, a dict; the test
    PD stride is ``pd_test``). They travel with the weights (:meth:`save`), so a trained model
    carries the settings that suit it. SS-Attention runs on the memory-efficient path by default
    (SDPA on CPU, Triton on CUDA); ``backend="reference"`` (or ``fused=False``) selects the
    N×N reference. The weights are the same either way.

    The configuration is a :class:`ssbsn.config.ModelConfig` (``SSBSN(config)``) or its fields
    as keywords (``SSBSN(base_channels=64, backend="reference", deterministic=True)``);
    ``model.config`` is the ModelConfig. ``fused=True/False`` is the older spelling of
    ``backend="fused"/"reference"``.
    """

    def __init__(self, config: ModelConfig | None = None, *, inference: dict | None = None,
                 fused: bool | None = None, **fields):
        super().__init__()
        if config is None:
            config = ModelConfig.from_kwargs(fused=fused, **fields)
        elif fields or fused is not None:
            raise TypeError("give SSBSN a ModelConfig or keyword fields, not both")
        elif not isinstance(config, ModelConfig):
            raise TypeError(f"SSBSN's first argument is a ModelConfig, got {type(config).__name__}")
        c = config  # validated when it was built (ModelConfig.__post_init__)
        self.config = config
        self.in_channels = c.in_channels
        self.pd_train, self.pd_test, self.pd_pad = c.pd_train, c.pd_test, c.pd_pad
        self.pd_layout = c.pd_layout
        self.r3_T, self.r3_p = c.r3_T, c.r3_p
        self.bsn = BSN(c.in_channels, c.in_channels, c.base_channels, c.num_modules,
                       c.ss_blocks, c.gamma, backend=c.backend, group_stats=c.group_stats,
                       conv_backend=c.conv_backend, deterministic=c.deterministic,
                       window=c.attention_window or None)
        self.inference = check_inference({**InferenceConfig().stored(), **(inference or {})},
                                         stored=True)

    def set_attention_window(self, window: int | None) -> None:
        """SS-Attention's scope in pixels of the map it sees (0 or None: whole-map groups);
        ``config.attention_window`` follows, so :meth:`save` stores it."""
        self.bsn.set_attention_window(window or None)
        self.config = dataclasses.replace(self.config, attention_window=window or 0)

    # ------------------------------------------------------------------ training forward
    def forward(self, x: torch.Tensor, pd: int | None = None) -> torch.Tensor:
        """PD with stride ``pd`` (default ``pd_train``) → BSN → inverse PD."""
        self.check_input(x)
        f = self.pd_train if pd is None else pd
        p = self.pd_pad
        if f > 1 and self.pd_layout == "batch":
            return pd_up_batch(self.bsn(pd_down_batch(x, f, p)), f, p)
        if f > 1:
            return pd_up(self.bsn(pd_down(x, f, p)), f, p)
        y = self.bsn(F.pad(x, (p, p, p, p)))
        return y[..., p:y.shape[-2] - p, p:y.shape[-1] - p]

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError unless ``x`` is a floating-point (B, in_channels, H, W) tensor."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected a (B, {self.in_channels}, H, W) tensor, "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point tensor (pixel values in 0..255), got "
                             f"{x.dtype}: convert it with x.float()")

    # ------------------------------------------------------------------ inference
    def receptive_radius(self) -> int:
        """How far (in image pixels) the output of :meth:`denoise` can see, ignoring the
        SS-Attention and LayerNorm (which are global within their grid groups/image)."""
        r_bsn = max(b.dilation - 1 + 2 * b.dilation * (len(b.body) - 8) for b in self.bsn.branches())
        r_pd = self.pd_test * (r_bsn + 1) + self.pd_test
        return r_pd + r_bsn + self.pd_pad

    def inference_settings(self, pd: int | None = None, **given) -> dict:
        """The settings :meth:`denoise` runs with: each option left at None takes the model's
        own (``self.inference``; the PD stride ``pd_test``), all checked."""
        from .restore import Pipeline
        return Pipeline(self).settings(pd=pd, **given).to_dict()

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, r3: bool | None = None, self_ensemble: bool | None = None,
                tile: int | None = None, overlap: int | None = None, seed: int = 0,
                shifts: bool | None = None, pd: int | None = None,
                lowpass: float | None = None, blend: bool | None = None,
                wiener: bool | None = None, debias: bool | None = None) -> torch.Tensor:
        """Denoise x (B, C, H, W) of any size: :class:`ssbsn.restore.Pipeline` with these
        settings (:class:`ssbsn.config.InferenceConfig` declares each; docs/restore.md). Every
        option left at None takes the model's own setting from ``self.inference``.

        Args:
            r3: random-replacing refinement (T rounds, probability p).
            self_ensemble: average over the 8 flips/rotations.
            shifts: shifted-PD ensemble: average the result over the ``pd_test``² pixel shifts
                of the image (every pixel takes each PD phase once), which removes PD's
                checkerboard; ``pd_test``² times slower.
            tile: process in tiles of this size (memory stays bounded), each with ``overlap``
                pixels of context per side; 0 = the whole image at once. For a model without
                SS-Blocks, exact wherever the overlap covers the receptive field
                (:meth:`receptive_radius`), except within that radius of the image border,
                where PD's sub-images see each other's far edges. SS-Attention and the
                image-wide LayerNorm make the paper model depend slightly on the tile size.
            pd: PD stride at inference (default ``pd_test``).
            lowpass: σ (pixels) of :func:`ssbsn.restore.lowpass.restore_low_frequencies`: keep
                the noisy image's frequencies below about 1/σ (brightness, colour) and the
                network's above; 0 = off (the paper).
            blend: combine the result with the noisy pixel under noise and error variances
                fitted on the image (:func:`ssbsn.restore.blend.noisy_pixel_blend`): restores
                the fine detail the blind spot loses where the noise is weak; the error
                variance is keyed on the texture of a second estimate at the training PD
                stride ``pd_train`` (one more network pass); off for the paper.
            wiener: refine with a collaborative Wiener filter (BM3D's second stage, this
                project's own), the (blended) result as its pilot, in a variance-stabilised
                domain with the noise spectrum measured on the image
                (:func:`ssbsn.restore.wiener.collaborative_refinement`); off for the paper.
            debias: remove the brightness shift that the camera's tone curve and clipping
                put into the mean of the noise, which a network trained on noisy targets
                learns (:func:`ssbsn.restore.debias.tone_curve_debias`; sRGB camera photos
                only); off for the paper.
            seed: seed of R3's random replacement (a pure function of pixel position).
        """
        from .restore import Pipeline
        return Pipeline(self)(x, r3=r3, self_ensemble=self_ensemble, tile=tile,
                              overlap=overlap, seed=seed, shifts=shifts, pd=pd,
                              lowpass=lowpass, blend=blend, wiener=wiener, debias=debias)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_official(cls, path_or_checkpoint, **overrides) -> "SSBSN":
        """Build the model from the authors' checkpoint (or a bare state dict); see
        :func:`ssbsn.checkpoint.from_official`."""
        return from_official(path_or_checkpoint, cls=cls, **overrides)

    def save(self, path) -> None:
        """Write weights and configuration to a safetensors file."""
        save_model(self, path)

    @classmethod
    def load(cls, path, **overrides) -> "SSBSN":
        """Load a model written by :meth:`save` (or an authors' checkpoint)."""
        return load_model(path, cls=cls, **overrides)
