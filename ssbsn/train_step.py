"""The training step of ``ssbsn train``: one optimizer step on one batch, eager or captured, and
the prefetcher that brings the batches to the device.

:func:`build_step` makes it from the resolved settings of a run
(:meth:`ssbsn.train_config.TrainConfig.resolve`); ``benchmarks/gpu_check.py`` times the same
object. The step:

* ``capture="none"``: eager (autocast, L1 loss, backward, optimizer step).
* ``capture="graph"``: after ``warmup`` eager steps (on a side stream: cuDNN's autotuner and
  the allocator settle there), forward, backward and the optimizer step are captured once in a
  CUDA graph over static buffers (the batch, the learning rate as a device tensor, the loss),
  then every step copies its batch into the static input and replays the graph. The optimizer
  is made ``capturable``; gradients are None when the graph is captured, so each replay writes
  them afresh (no zeroing inside the graph).
* ``capture="compile"``: forward and loss under :func:`torch.compile` (``mode=
  "reduce-overhead"``, CUDA graphs of the compiled forward and backward, on CUDA; the default
  mode on the CPU), backward and the optimizer step outside it.

Every mode computes the same step: the same losses within float tolerance (the tests compare
them on the CPU, the CUDA graph through :class:`EagerGraph`, a stand-in with the graph's
contract).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

CAPTURE_WARMUP = 3  # eager steps before the capture (cuDNN autotuning, lazy initialisation)


def make_optimizer(params, lr: float, device: torch.device, fused: bool = False,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """Adam (betas 0.9, 0.999) as ``ssbsn train`` uses it: the plain one, or ``fused`` (one
    kernel for all parameters), ``capturable`` on CUDA (its state on the device, so that a CUDA
    graph can hold the step)."""
    kw = {}
    if fused:
        kw["fused"] = True
    if capturable and device.type == "cuda":
        kw["capturable"] = True
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), **kw)


def fit_optimizer_state(optimizer: torch.optim.Optimizer, fused: bool, capturable: bool) -> None:
    """After ``load_state_dict``: a checkpoint's groups carry the flags of the run that saved it
    (``fused``, ``capturable``, maybe a tensor learning rate); put back this run's, and the step
    counters where this Adam keeps them (on the parameter's device when fused or capturable,
    on the CPU otherwise)."""
    for group in optimizer.param_groups:
        group["fused"] = fused or None
        group["capturable"] = bool(capturable and group["params"]
                                   and group["params"][0].device.type == "cuda")
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if "step" in st and isinstance(st["step"], torch.Tensor):
                on_device = fused or group["capturable"]
                st["step"] = st["step"].to(device=p.device if on_device else "cpu",
                                           dtype=torch.float32)


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with plain float learning rates (a captured step keeps its
    learning rate in a device tensor), so that every checkpoint has the same form."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
    return state


class CudaGraph:
    """A CUDA graph: :meth:`capture` records ``body`` (nothing runs), :meth:`replay` runs it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, body, reset) -> None:
        reset()
        with torch.cuda.graph(self.graph):
            body()

    def replay(self) -> None:
        self.graph.replay()


class EagerGraph:
    """The contract of :class:`CudaGraph` on any device: :meth:`capture` records ``body``
    without running it, :meth:`replay` runs it in the state the capture saw (``reset``:
    gradients None). Lets the CPU test the captured step's buffers and warm-up."""

    def capture(self, body, reset) -> None:
        self.body, self.reset = body, reset

    def replay(self) -> None:
        self.reset()
        self.body()


class TrainStep:
    """One optimizer step of ``net`` on a batch: ``step(x, lr)`` returns the loss (a device
    tensor; read it before the next step, which may overwrite it).

    ``amp``: bf16 autocast; ``channels_last``: the batch in that memory format (the model
    should be too); ``capture``: "none", "graph" or "compile"; ``warmup``: eager steps before
    a graph is captured; ``graph``: the graph's maker (default :class:`CudaGraph`)."""

    def __init__(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp: bool = False, channels_last: bool = False,
                 capture: str = "none", warmup: int = CAPTURE_WARMUP, graph=None):
        if capture not in ("none", "graph", "compile"):
            raise ValueError(f"capture must be 'none', 'graph' or 'compile', got {capture!r}")
        if capture == "graph" and graph is None and device.type != "cuda":
            raise ValueError(f"capture 'graph' needs a CUDA device (this step: {device})")
        self.net, self.optimizer, self.device = net, optimizer, device
        self.amp, self.channels_last, self.capture = amp, channels_last, capture
        self.warmup = max(int(warmup), 0)
        self.steps = 0  # steps taken by this object (eager and replayed)
        self._graph_maker = graph or (lambda: CudaGraph(device))
        self.graph = None
        self.static_x = self.static_loss = self.lr_tensor = None
        self._compiled = None
        if capture == "compile":
            mode = "reduce-overhead" if device.type == "cuda" else None
            self._compiled = torch.compile(self._loss, mode=mode)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _autocast_ctx(self):
        if self.capture == "graph":  # a graph's autocast must not cache casts across captures
            return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                                  cache_enabled=False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast_ctx():
            y = self.net(x)
        return F.l1_loss(y.float(), x)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _set_lr(self, lr: float) -> None:
        if self.lr_tensor is not None:
            self.lr_tensor.fill_(lr)
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        loss = (self._compiled or self._loss)(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def __call__(self, x: torch.Tensor, lr: float) -> torch.Tensor:
        self._set_lr(lr)
        x = self._prepare(x)
        self.steps += 1
        if self.capture == "compile":
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            return self._eager(x).detach()
        if self.capture == "none":
            return self._eager(x)
        if self.graph is None and self.steps <= self.warmup:
            return self._side_stream(self._eager, x)
        if self.graph is None:
            try:
                self._capture(x, lr)
            except Exception as e:  # noqa: BLE001 (an op of the step that a graph cannot hold)
                return self._give_up_capture(e, x, lr)
        elif x.shape != self.static_x.shape:
            raise ValueError(f"a captured step takes batches of {tuple(self.static_x.shape)}, "
                             f"got {tuple(x.shape)}")
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_loss

    def _give_up_capture(self, error: Exception, x: torch.Tensor, lr: float) -> torch.Tensor:
        """The step could not be captured: warn, and take this and every later step eagerly
        (the same computation)."""
        import warnings
        warnings.warn(f"the training step could not be captured in a CUDA graph "
                      f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); it runs "
                      "eagerly (--capture none)", RuntimeWarning, stacklevel=3)
        self.capture, self.graph, self.lr_tensor = "none", None, None
        self.static_x = self.static_loss = None
        self._set_lr(lr)
        return self._eager(x)

    def _side_stream(self, fn, *args):
        """``fn(*args)`` on a side stream on CUDA (the warm-up before a capture), else as is."""
        if self.device.type != "cuda":
            return fn(*args)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = fn(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self, x: torch.Tensor, lr: float) -> None:
        """Static buffers for the batch and the learning rate, then the graph of the step."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.static_x = torch.empty_like(x, memory_format=fmt)
        self.static_x.copy_(x)
        self.lr_tensor = torch.tensor(float(lr), dtype=torch.float32, device=self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_tensor

        def body():
            self.static_loss = self._loss(self.static_x)
            self.static_loss.backward()
            self.optimizer.step()

        self.graph = self._graph_maker()
        self._side_stream(self.graph.capture, body,
                          lambda: self.optimizer.zero_grad(set_to_none=True))


def build_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
               settings: dict, warmup: int = CAPTURE_WARMUP) -> TrainStep:
    """The step of ``ssbsn train`` from a run's resolved settings
    (:meth:`ssbsn.train_config.TrainConfig.step_settings`); turns cuDNN's autotuner on or off
    as they say."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(settings["cudnn_benchmark"])
    return TrainStep(net, optimizer, device, amp=settings["amp"] == "bf16",
                     channels_last=bool(settings["channels_last"]), capture=settings["capture"],
                     warmup=warmup)


class Prefetcher:
    """The batches of ``loader``, in its order, each moved to ``device`` (and to channels_last)
    one batch ahead of its use: on CUDA the copy of the next batch runs on a side stream
    (from pinned memory, non-blocking) while the current step computes. ``enabled=False``: a
    plain pass-through that moves each batch when it is asked for. Either way it yields
    exactly the loader's batches, so a run's data (and its exact resume) does not depend on it."""

    def __init__(self, loader, device: torch.device, channels_last: bool = False,
                 enabled: bool = True):
        self.loader, self.device = loader, device
        self.channels_last, self.enabled = channels_last, enabled

    def __len__(self) -> int:
        return len(self.loader)

    def _move(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __iter__(self):
        if not self.enabled:
            yield from self.loader
            return
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        it = iter(self.loader)

        def fetch():
            try:
                x = next(it)
            except StopIteration:
                return None
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                return self._move(x)

        nxt = fetch()
        while nxt is not None:
            cur = nxt
            if cuda:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(stream)
                cur.record_stream(current)  # its memory stays until the step has used it
            nxt = fetch()
            yield cur
