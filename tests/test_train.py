"""Training: exact resume after SIGKILL, DDP equals single-process, schedule, checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY, noisy_folder
from ssbsn import SSBSN
from ssbsn.images import write_image
from ssbsn.train import (TrainConfig, checkpoint_paths, list_checkpoints, lr_at, read_config,
                         read_log, train)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def images(tmp_path):
    return noisy_folder(tmp_path / "imgs", 4, 24, 26)


def _cfg(images, out, **kw):
    d = dict(data=[str(images)], out=str(out), crop=10, batch=2, repeat=2, lr=1e-3,
             log_every=1, save_every=3, progress=False, seed=3, **TINY)
    d.update(kw)
    return TrainConfig(**d)


def _cli_args(cfg: TrainConfig):
    return [*cfg.data, "--out", cfg.out, "--channels", str(cfg.base_channels),
            "--modules", str(cfg.num_modules), "--ss-blocks", str(cfg.ss_blocks),
            "--crop", str(cfg.crop), "--batch", str(cfg.batch), "--repeat", str(cfg.repeat),
            "--lr", str(cfg.lr), "--steps", str(cfg.steps), "--log-every", str(cfg.log_every),
            "--save-every", str(cfg.save_every), "--seed", str(cfg.seed), "--no-progress",
            "--device", "cpu"]


def _weights(path):
    return SSBSN.load(path).state_dict()


def test_lr_schedule_steps_down_at_80_percent():
    cfg = TrainConfig(lr=1e-4)
    lrs = [lr_at(cfg, s, 20) for s in range(20)]
    assert lrs[:16] == [1e-4] * 16
    assert lrs[16:] == pytest.approx([1e-5] * 4)
    warm = TrainConfig(lr=1e-2, warmup=4)
    assert [lr_at(warm, s, 10) for s in range(10)] == pytest.approx(
        [2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2, 1e-2, 1e-2, 1e-3, 1e-3])


def test_killed_run_resumes_on_the_same_trajectory(images, tmp_path, one_thread):
    steps = 150
    ref = _cfg(images, tmp_path / "ref", steps=steps)
    train(ref)
    ref_log = read_log(ref.out)
    assert [r["step"] for r in ref_log] == list(range(1, steps + 1))
    assert ref_log[-1]["lr"] == pytest.approx(1e-4)  # decayed ×0.1 at step 120

    run = _cfg(images, tmp_path / "killed", steps=steps)
    proc = subprocess.Popen([sys.executable, "-m", "ssbsn", "train", *_cli_args(run)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(s >= 24 for s in list_checkpoints(run.out)):
            break
        time.sleep(0.01)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert still_running, "the run finished before it could be killed: " + proc.stderr.read().decode()
    done = list_checkpoints(run.out)
    assert done and max(done) < steps
    # nothing under a final name is damaged: every checkpoint file loads
    for f in sorted(Path(run.out, "ckpt").iterdir()):
        if f.name.endswith(".safetensors"):
            SSBSN.load(f)
        elif f.name.endswith(".state.pt"):
            torch.load(f, weights_only=True)
    # resume from inside an epoch (4 steps each here): if the newest checkpoint closes an
    # epoch, drop it, as if the kill had come just before it was written
    mid = max(s for s in done if s % 4)
    for s in done:
        if s > mid:
            for f in checkpoint_paths(run.out, s):
                f.unlink()
    killed_at = mid

    from ssbsn.cli import main
    assert main(["train", "--resume", run.out, "--no-progress"]) == 0
    log = read_log(run.out)
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in log], [r["loss"] for r in ref_log],
                               rtol=1e-5, atol=1e-5)
    a, b = _weights(Path(ref.out, "model.safetensors")), _weights(Path(run.out, "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not list(Path(run.out).rglob("*.tmp"))
    assert killed_at < steps


def test_checkpoint_files_are_safe_to_load(images, tmp_path, one_thread):
    cfg = _cfg(images, tmp_path / "run", steps=7, keep=2)
    summary = train(cfg)
    assert summary["steps"] == 7
    assert list_checkpoints(cfg.out) == [6, 7]  # every 3 steps and at the end, keep 2
    w, st = checkpoint_paths(cfg.out, 7)
    state = torch.load(st, weights_only=True)  # tensors and plain containers only
    assert state["step"] == 7 and state["total_steps"] == 7
    assert set(state["optimizer"]["state"]) == set(range(len(list(SSBSN(**TINY).parameters()))))
    torch.testing.assert_close(SSBSN.load(w).state_dict(), _weights(Path(cfg.out, "model.safetensors")))
    saved = read_config(Path(cfg.out, "config.yaml"))
    assert saved == cfg
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg)


def test_repeat_from_saved_config_gives_identical_run(images, tmp_path, one_thread):
    from ssbsn.cli import main
    first = _cfg(images, tmp_path / "a", steps=5)
    train(first)
    assert main(["train", "--config", str(tmp_path / "a" / "config.yaml"),
                 "--out", str(tmp_path / "b")]) == 0
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]


def test_persistent_workers_draw_the_crops_of_each_epoch(images, tmp_path, one_thread):
    """One DataLoader with persistent workers for the whole run: over three epochs, and resumed
    mid-epoch, the same crops (so the same losses and weights) as loading in this process."""
    base = _cfg(images, tmp_path / "w0", steps=12, save_every=5, lr_decay_at=1.0)
    train(base)
    two = _cfg(images, tmp_path / "w2", steps=7, save_every=5, lr_decay_at=1.0, workers=2)
    train(two)
    two.steps = 12
    train(two, resume=True)  # continues from step 7 (epoch 1, batch 3)
    assert [r["loss"] for r in read_log(base.out)] == [r["loss"] for r in read_log(two.out)]
    a, b = _weights(Path(base.out, "model.safetensors")), _weights(Path(two.out, "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_equal_one_process_with_double_batch(images, tmp_path, one_thread):
    single = _cfg(images, tmp_path / "single", steps=6, batch=4, lr=3e-3)
    train(single)
    ddp = _cfg(images, tmp_path / "ddp", steps=6, batch=2, lr=3e-3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ssbsn", "train", *_cli_args(ddp)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose([x["loss"] for x in read_log(ddp.out)],
                               [x["loss"] for x in read_log(single.out)], rtol=1e-5)
    a = _weights(Path(single.out, "model.safetensors"))
    b = _weights(Path(ddp.out, "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert a["bsn.head.0.weight"].ne(SSBSN(**TINY).state_dict()["bsn.head.0.weight"]).any()


def test_amp_bf16_channels_last_and_fused_train(images, tmp_path, one_thread):
    cfg = _cfg(images, tmp_path / "amp", steps=3, amp="bf16", channels_last=True, fused=True)
    s = train(cfg)
    assert np.isfinite(s["loss"])
    assert SSBSN.load(s["weights"]).config["fused"] is True


def test_training_lowers_the_self_supervised_loss(tmp_path, one_thread):
    # smooth images + white noise: the blind-spot loss can drop well below its start
    d = tmp_path / "smooth"
    d.mkdir()
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:30, 0:30]
    for i in range(4):
        clean = 128 + 60 * np.sin(xx / (4 + i) + i)[..., None] * np.ones(3)
        write_image(d / f"{i}.png", np.clip(clean + rng.normal(0, 10, clean.shape), 0, 255).astype(np.uint8))
    cfg = TrainConfig(data=[str(d)], out=str(tmp_path / "run"), crop=20, batch=4, repeat=4,
                      lr=3e-3, steps=60, log_every=10, progress=False, **TINY)
    train(cfg)
    losses = [r["loss"] for r in read_log(cfg.out)]
    assert losses[-1] < 0.6 * losses[0], losses


def test_config_validation(images, tmp_path):
    with pytest.raises(ValueError, match="multiple of the training PD"):
        train(_cfg(images, tmp_path / "x", crop=12))
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(_cfg(images, tmp_path / "y", batch=64, repeat=1, steps=2))
    with pytest.raises(ValueError, match="unknown configuration keys: bogus"):
        TrainConfig.from_dict({"bogus": 1})
    (tmp_path / "c.yaml").write_text(json.dumps({"crop": 10, "batch": 2}))
    assert read_config(tmp_path / "c.yaml").crop == 10


# ------------------------------------------------------------------ failed runs, retries, extension

def _train_cli(capsys, argv):
    from ssbsn.cli import main
    try:
        code = main(["train", *argv])
    except SystemExit as e:  # a command line that argparse refuses (usage error)
        code = e.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case", ["big_crop", "empty_folder", "one_pixel", "kind_dnd", "lr",
                                  "lr_nan", "missing"])
def test_bad_training_input_leaves_no_run_folder(images, tmp_path, capsys, case):
    data, extra = str(images), []
    if case == "big_crop":
        extra = ["--crop", "60"]
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        data = str(tmp_path / "empty")
    elif case == "one_pixel":
        (tmp_path / "tiny").mkdir()
        write_image(tmp_path / "tiny" / "a.png", np.zeros((1, 1, 3), np.uint8))
        data = str(tmp_path / "tiny")
    elif case == "kind_dnd":
        extra = ["--kind", "dnd"]
    elif case == "lr":
        extra = ["--lr", "-1"]
    elif case == "lr_nan":
        extra = ["--lr", "nan"]
    elif case == "missing":
        data = str(tmp_path / "nothing_here")
    out = tmp_path / "run"
    argv = [data, "--out", str(out), "--crop", "10", "--steps", "2", "--batch", "2",
            "--no-progress", "--device", "cpu", "--channels", "8", "--modules", "2",
            "--ss-blocks", "1", *extra]
    code, err = _train_cli(capsys, argv)
    usage = case in ("lr", "lr_nan")  # an option out of its range: a usage error, exit 2
    assert code == (2 if usage else 1) and err.startswith("ssbsn: error: ") \
        and err.count("\n") == 1, err
    assert not out.exists()  # nothing to block the retry


def test_failed_run_does_not_block_its_retry(images, tmp_path, capsys, one_thread):
    bad = images / "4.png"
    write_image(bad, np.random.default_rng(5).integers(0, 256, (24, 26, 3)).astype(np.uint8))
    good = bad.read_bytes()
    bad.write_bytes(good[:len(good) // 2])  # the header reads, the pixels do not: fails in training
    out = tmp_path / "run"
    argv = [str(images), "--out", str(out), "--crop", "10", "--steps", "3", "--batch", "5",
            "--no-progress", "--device", "cpu", "--channels", "8", "--modules", "2",
            "--ss-blocks", "1", "--seed", "1", "--log-every", "1"]
    code, err = _train_cli(capsys, argv)
    assert code == 1 and "4.png" in err and err.count("\n") == 1, err
    assert list_checkpoints(out) == []
    bad.write_bytes(good)
    code, err = _train_cli(capsys, argv)  # the same command again: not "already holds a run"
    assert code == 0, err
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    code, err = _train_cli(capsys, argv)  # now it is a run
    assert code == 1 and "--resume" in err


def test_finished_run_can_be_extended(images, tmp_path, capsys, one_thread):
    cfg = _cfg(images, tmp_path / "run", steps=4, save_every=2)
    train(cfg)
    code, err = _train_cli(capsys, ["--resume", cfg.out, "--steps", "7", "--no-progress"])
    assert code == 0, err
    assert [r["step"] for r in read_log(cfg.out)] == list(range(1, 8))
    assert max(list_checkpoints(cfg.out)) == 7
    assert read_config(Path(cfg.out, "config.yaml")).steps == 7
    code, err = _train_cli(capsys, ["--resume", cfg.out, "--steps", "5", "--no-progress"])
    assert code == 1 and "7 steps" in err, err
    code, err = _train_cli(capsys, ["--resume", cfg.out, "--lr", "0.5", "--no-progress"])
    assert code == 1 and "lr" in err


def test_resume_past_damaged_checkpoints_says_so_and_never_restarts_in_place(
        images, tmp_path, capsys, one_thread):
    """A damaged newest checkpoint: the run continues from the one before, with one warning,
    on the trajectory of a run never interrupted. Every checkpoint damaged: one error line and
    the run folder untouched (it used to start again from step 0 over the finished run)."""
    ref = _cfg(images, tmp_path / "ref", steps=9)
    train(ref)
    cfg = _cfg(images, tmp_path / "run", steps=6)
    train(cfg)
    assert list_checkpoints(cfg.out) == [3, 6]
    for f in checkpoint_paths(cfg.out, 6):
        f.write_bytes(f.read_bytes()[:100])
    code, err = _train_cli(capsys, ["--resume", cfg.out, "--steps", "9", "--no-progress"])
    assert code == 0, err
    assert err.splitlines() == [f"ssbsn: warning: {Path(cfg.out, 'ckpt')}: the checkpoint(s) of "
                                "step 6 do not load (damaged or incomplete); continuing from "
                                "step 3"], err
    a, b = _weights(Path(ref.out, "model.safetensors")), _weights(Path(cfg.out, "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in read_log(cfg.out)] == list(range(1, 10))

    for step in list_checkpoints(cfg.out):
        for f in checkpoint_paths(cfg.out, step):
            f.write_bytes(b"")
    before = {p: p.read_bytes() for p in Path(cfg.out).rglob("*") if p.is_file()}
    code, err = _train_cli(capsys, ["--resume", cfg.out, "--steps", "12", "--no-progress"])
    assert code == 1 and err.startswith("ssbsn: error: ") and err.count("\n") == 1, err
    assert "none of the run's checkpoints" in err and "nothing was changed" in err
    assert {p: p.read_bytes() for p in Path(cfg.out).rglob("*") if p.is_file()} == before


def _strict_json(line):
    def refuse(name):
        raise ValueError(f"bare {name} in log.jsonl")
    return json.loads(line, parse_constant=refuse)


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(images, tmp_path,
                                                                      monkeypatch, one_thread):
    import ssbsn.train as T
    from ssbsn.checkpoint import CheckpointError
    # a sane learning rate for 3 steps, then one that blows the weights up
    monkeypatch.setattr(T, "lr_at", lambda cfg, step, total: 1e-3 if step < 3 else 1e30)
    cfg = _cfg(images, tmp_path / "run", steps=20, save_every=1, keep=2)
    with pytest.raises(T.TrainingDiverged, match=r"diverged at step \d+.*--lr") as e:
        train(cfg)
    assert "\n" not in str(e.value)
    import re
    at = int(re.search(r"step (\d+)", str(e.value)).group(1))
    kept = list_checkpoints(cfg.out)
    assert 3 <= max(kept) < at < 20
    assert f"step {max(kept)}" in str(e.value)  # names the checkpoint it kept
    for s in kept:  # every checkpoint left behind is good
        w, _ = checkpoint_paths(cfg.out, s)
        assert all(torch.isfinite(v).all() for v in SSBSN.load(w).state_dict().values())
    assert not Path(cfg.out, "model.safetensors").exists()
    lines = Path(cfg.out, "log.jsonl").read_text().splitlines()
    assert all(np.isfinite(_strict_json(x)["loss"]) for x in lines)


def test_divergence_through_the_command(images, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    code, err = _train_cli(capsys, [str(images), "--out", str(out), "--crop", "10", "--steps",
                                    "6", "--batch", "2", "--lr", "1e6", "--no-progress",
                                    "--device", "cpu", "--channels", "8", "--modules", "2",
                                    "--ss-blocks", "1", "--log-every", "1"])
    assert code == 1 and err.startswith("ssbsn: error: training diverged"), err
    assert err.count("\n") == 1
    for line in Path(out, "log.jsonl").read_text().splitlines():
        _strict_json(line)
    assert not Path(out, "model.safetensors").exists()


@pytest.mark.parametrize("text,msg", [("crop: abc\n", "crop"), ("lr: [1]\n", "lr"),
                                      ("augment: 3\n", "augment"), ("data: x.png\n", "data")])
def test_saved_config_with_wrong_types_is_one_clear_error(tmp_path, text, msg):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=msg) as e:
        read_config(tmp_path / "c.yaml")
    assert "c.yaml" in str(e.value)
    (tmp_path / "c.yaml").write_text("lr: 1e-4\n")  # YAML 1.1 reads this as a string
    assert read_config(tmp_path / "c.yaml").lr == 1e-4
