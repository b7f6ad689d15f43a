"""The training step of ``ssbsn train`` (ssbsn.train_step): the captured and compiled steps equal
the eager one, the prefetcher yields the loader's batches in order, the device-dependent
defaults, and the speed the command reports."""
import copy
import shutil
from pathlib import Path

import pytest
import torch

from helpers import TINY, noisy_folder
from ssbsn import SSBSN
from ssbsn.errors import UsageError
from ssbsn.train import TrainConfig, read_config, read_log, train
from ssbsn.train_step import EagerGraph, Prefetcher, TrainStep, make_optimizer

CPU = torch.device("cpu")


def _model(seed=0):
    torch.manual_seed(seed)
    return SSBSN(**TINY)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 3, 10, 10, generator=g) for _ in range(n)]


def _run(step, batches, lrs):
    return [float(step(x, lr).detach()) for x, lr in zip(batches, lrs)]


LRS = [1e-3, 1e-3, 5e-4, 5e-4, 1e-4, 1e-4]


def _close(a: torch.nn.Module, b: torch.nn.Module):
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("fused", [False, True])
def test_captured_step_equals_the_eager_step(fused, one_thread):
    """The graph path on the CPU through EagerGraph (the CUDA graph's contract: capture records,
    replay runs with gradients as at capture): warm-up steps eager, then one capture and
    replays through static buffers, the learning rate in a device tensor."""
    batches = _batches(len(LRS))
    eager_m = _model()
    graph_m = copy.deepcopy(eager_m)
    eager = TrainStep(eager_m, make_optimizer(eager_m.parameters(), 1e-3, CPU, fused), CPU)
    graphs = []

    def maker():
        graphs.append(EagerGraph())
        return graphs[-1]
    opt = make_optimizer(graph_m.parameters(), 1e-3, CPU, fused, capturable=True)
    step = TrainStep(graph_m, opt, CPU, capture="graph", warmup=2, graph=maker)
    losses, static = [], []
    for i, (x, lr) in enumerate(zip(batches, LRS)):
        losses.append(float(step(x, lr).detach()))
        assert step.captured == (i >= 2)  # two eager steps, captured at the third
        if step.captured:
            static.append(step.static_x)
            assert torch.equal(step.static_x, x)  # the batch went through the static buffer
            assert float(step.lr_tensor) == pytest.approx(lr)
            assert all(g["lr"] is step.lr_tensor for g in opt.param_groups)
    assert len(graphs) == 1 and all(s is static[0] for s in static)  # one capture, one buffer
    ref = _run(eager, batches, LRS)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    _close(graph_m, eager_m)
    with pytest.raises(ValueError, match="batches of"):
        step(torch.rand(1, 3, 10, 10), 1e-3)


def test_a_step_that_cannot_be_captured_runs_eagerly(one_thread):
    class Refuses(EagerGraph):
        def capture(self, body, reset):
            raise RuntimeError("operation not permitted when stream is capturing")
    batches = _batches(4)
    eager_m = _model()
    graph_m = copy.deepcopy(eager_m)
    eager = TrainStep(eager_m, make_optimizer(eager_m.parameters(), 1e-3, CPU), CPU)
    step = TrainStep(graph_m, make_optimizer(graph_m.parameters(), 1e-3, CPU), CPU,
                     capture="graph", warmup=1, graph=Refuses)
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        losses = _run(step, batches, LRS[:4])
    assert step.capture == "none" and not step.captured
    assert losses == _run(eager, batches, LRS[:4])
    _close(graph_m, eager_m)


def test_graph_capture_needs_cuda():
    m = _model()
    with pytest.raises(ValueError, match="CUDA"):
        TrainStep(m, make_optimizer(m.parameters(), 1e-3, CPU), CPU, capture="graph")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C++ compiler; none is installed")
def test_compiled_step_equals_the_eager_step(one_thread):
    """The CPU rehearsal of the compiled step (torch.compile's default mode here;
    reduce-overhead on CUDA): the same losses and weights as eager within fp32 tolerance."""
    batches = _batches(3)
    eager_m = _model()
    comp_m = copy.deepcopy(eager_m)
    eager = TrainStep(eager_m, make_optimizer(eager_m.parameters(), 1e-3, CPU), CPU)
    comp = TrainStep(comp_m, make_optimizer(comp_m.parameters(), 1e-3, CPU), CPU,
                     capture="compile")
    lrs = LRS[:3]
    torch.testing.assert_close(torch.tensor(_run(comp, batches, lrs)),
                               torch.tensor(_run(eager, batches, lrs)), rtol=1e-4, atol=1e-5)
    for p, q in zip(comp_m.parameters(), eager_m.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("enabled", [True, False])
def test_prefetcher_yields_the_loaders_batches_in_order(enabled):
    data = torch.arange(7 * 3 * 4 * 4, dtype=torch.float32).reshape(7, 3, 4, 4)
    loader = torch.utils.data.DataLoader(data, batch_size=2, drop_last=True)
    got = list(Prefetcher(loader, CPU, channels_last=enabled, enabled=enabled))
    want = list(loader)
    assert len(got) == len(want) == 3
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    if enabled:
        assert all(a.is_contiguous(memory_format=torch.channels_last) for a in got)
    # a consumer that stops early (a time budget spent) takes the loader's first batches
    it = iter(Prefetcher(loader, CPU, enabled=enabled))
    assert torch.equal(next(it), want[0])


def test_step_defaults_depend_on_the_device():
    cuda = TrainConfig()
    cuda.resolve("cuda")
    assert cuda.step_settings() == dict(amp="bf16", channels_last=True, fused_adam=True,
                                        capture="graph", prefetch=True, cudnn_benchmark=True)
    ddp = TrainConfig()
    ddp.resolve("cuda", world=2)
    assert ddp.capture == "none" and ddp.amp == "bf16"
    cpu = TrainConfig()
    cpu.resolve("cpu")
    assert cpu.step_settings() == dict(amp="off", channels_last=False, fused_adam=False,
                                       capture="none", prefetch=False, cudnn_benchmark=False)
    old = TrainConfig()
    old.resolve("cuda", resume=True)  # a run saved before fused_adam existed keeps plain Adam
    assert old.fused_adam is False
    off = TrainConfig(amp="off", channels_last=False, capture="compile", prefetch=False)
    off.resolve("cuda")
    assert (off.amp, off.channels_last, off.capture, off.prefetch) == ("off", False, "compile",
                                                                         False)
    with pytest.raises(ValueError, match="--capture"):
        TrainConfig(capture="cuda-graph").validate()


@pytest.fixture
def images(tmp_path):
    return noisy_folder(tmp_path / "imgs", 4, 24, 26)


def _argv(images, out, *extra):
    return [str(images), "--out", str(out), "--crop", "10", "--batch", "2", "--repeat", "2",
            "--steps", "4", "--log-every", "2", "--no-progress", "--device", "cpu",
            "--channels", "8", "--modules", "2", "--ss-blocks", "1", *extra]


def test_train_reports_its_speed_and_settings(images, tmp_path, capsys, one_thread):
    from ssbsn.cli import main
    out = tmp_path / "run"
    assert main(["train", *_argv(images, out)]) == 0
    printed = capsys.readouterr().out
    assert "steps/s" in printed and "images/s" in printed
    log = read_log(out)
    assert [r["step"] for r in log] == [2, 4]
    assert all(r["steps_per_s"] > 0 and r["img_per_s"] > 0 for r in log)
    assert log[0]["settings"] == dict(amp="off", channels_last=False, fused_adam=False,
                                      capture="none", prefetch=False, cudnn_benchmark=False,
                                      device="cpu", world=1)
    assert "settings" not in log[1]
    saved = read_config(Path(out, "config.yaml"))  # the numbers' settings, resolved
    assert (saved.amp, saved.channels_last, saved.fused_adam) == ("off", False, False)
    assert saved.capture == "auto"  # runtime settings as given: the run resumes anywhere


def test_step_options_of_the_command(images, tmp_path, one_thread):
    from ssbsn.cli import main
    out = tmp_path / "run"
    assert main(["train", *_argv(images, out, "--amp", "bf16", "--channels-last",
                                 "--fused-adam", "--prefetch", "--capture", "none",
                                 "--no-cudnn-benchmark")]) == 0
    saved = read_config(Path(out, "config.yaml"))
    assert (saved.amp, saved.channels_last, saved.fused_adam) == ("bf16", True, True)
    assert read_log(out)[0]["settings"]["prefetch"] is True
    # resumed with the fused Adam's state: the same run goes on
    assert main(["train", "--resume", str(out), "--steps", "6", "--no-progress"]) == 0
    assert [r["step"] for r in read_log(out)] == [2, 4, 6]


def test_graph_capture_refused_without_cuda(images, tmp_path):
    cfg = TrainConfig(data=[str(images)], out=str(tmp_path / "run"), crop=10, batch=2,
                      steps=2, progress=False, device="cpu", capture="graph", **TINY)
    with pytest.raises(UsageError, match="--capture graph needs a CUDA device"):
        train(cfg)
    assert not (tmp_path / "run").exists()
