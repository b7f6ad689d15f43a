"""Inference and restoration: from a noisy image and a trained network to the output.

* :mod:`.estimate` — the network's estimate: PD and R3 as one call, and the self-ensemble,
  shifted-PD ensemble and tiling as wrappers around it;
* :mod:`.stats` — the noise statistics the steps share (texture, noise curves);
* the steps after the network, one module each: :mod:`.lowpass`, :mod:`.blend`,
  :mod:`.wiener` (with :mod:`.collaborative`, its filter) and :mod:`.debias`;
* :mod:`.pipeline` — :class:`Pipeline`, which runs the estimate and the steps that an
  :class:`ssbsn.config.InferenceConfig` switches on, in its fields' order.

See docs/restore.md.
"""
from .pipeline import Context, Pipeline, Step, configured_steps

__all__ = ["Context", "Pipeline", "Step", "configured_steps"]
