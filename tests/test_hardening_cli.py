"""Hardening of model files and the command line (issue #34): what a checkpoint must establish
before it is used, one clear line and the right exit status for every mistake, and what
training does when the disk fills or the data hold no noise."""
import errno
import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import torch
from safetensors.torch import load_file, save_file

from ssbsn import SSBSN, CheckpointError
from ssbsn.cli import main
from ssbsn.images import write_image

from benchmarks.hardening_probe import full_disk_on_save  # noqa: E402
from helpers import TINY, noisy_folder, save_tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "x.png"
    write_image(path, np.random.default_rng(0).integers(0, 256, (16, 18, 3)).astype(np.uint8))
    return path


def _run(argv, capsys):
    """(exit status, stdout, stderr) of ``ssbsn argv``; argparse's refusals exit too."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> None:
    assert err.startswith("ssbsn: error: ") and err.count("\n") == 1, err
    assert "internal error" not in err and "Traceback" not in err, err


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ model files: configuration

def test_safetensors_without_configuration_is_refused_unless_the_papers(tmp_path, weights):
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(weights), str(plain))  # re-saved: the metadata is gone
    with pytest.raises(CheckpointError, match="no model configuration.*not the paper's") as e:
        SSBSN.load(plain)
    assert str(plain) in str(e.value) and "base_channels=8" in str(e.value)


def test_safetensors_with_the_papers_shapes_loads_with_a_warning(tmp_path, caplog):
    torch.manual_seed(1)
    paper = SSBSN()
    path = tmp_path / "paper.safetensors"
    save_file({k: v.contiguous() for k, v in paper.state_dict().items()}, str(path))
    with caplog.at_level(logging.WARNING, logger="ssbsn"):
        loaded = SSBSN.load(path)
    assert loaded.config == SSBSN().config  # the paper's, every field
    assert _same_state(loaded.state_dict(), paper.state_dict())
    assert any("paper's settings" in r.getMessage() for r in caplog.records)


def test_authors_layout_of_another_size_says_what_was_inferred(tmp_path, caplog):
    from benchmarks.authors import authors_state_dict
    path = tmp_path / "small.pth"
    torch.save({"model_weight": {"denoiser": authors_state_dict()}}, path)
    with caplog.at_level(logging.WARNING, logger="ssbsn"):
        model = SSBSN.load(path)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "inferred from the weights' shapes" in lines[0]
    assert "base_channels=8" in lines[0] and "num_modules=3" in lines[0]
    assert model.config.base_channels == 8 and model.config.num_modules == 3


def test_authors_checkpoint_without_any_wqk_is_refused(tmp_path):
    from benchmarks.authors import authors_state_dict
    sd = {k: v for k, v in authors_state_dict().items() if not k.endswith(".wqk")}
    torch.save({"model_weight": {"denoiser": sd}}, tmp_path / "nowqk.pth")
    with pytest.raises(CheckpointError, match="no SS-Attention weights"):
        SSBSN.load(tmp_path / "nowqk.pth")


def test_authors_head_with_zero_channels_is_refused(tmp_path):
    from benchmarks.authors import authors_state_dict
    sd = authors_state_dict()
    sd["bsn.head.0.weight"], sd["bsn.head.0.bias"] = torch.zeros(0, 3, 1, 1), torch.zeros(0)
    torch.save({"model_weight": {"denoiser": sd}}, tmp_path / "zero.pth")
    with pytest.raises(CheckpointError, match="base_channels=0") as e:
        SSBSN.load(tmp_path / "zero.pth")
    assert "zero.pth" in str(e.value)


# ------------------------------------------------------------------ model files: format, content

def test_format_is_read_from_the_content_not_the_name(tmp_path, weights, image):
    want = load_file(weights)
    for name in ("upper.SAFETENSORS", "model.bin", "model.pth"):
        (tmp_path / name).write_bytes(weights.read_bytes())
        assert _same_state(SSBSN.load(tmp_path / name).state_dict(), want)
    (tmp_path / "photo.pth").write_bytes(image.read_bytes())
    with pytest.raises(CheckpointError, match="is a PNG image, not a checkpoint"):
        SSBSN.load(tmp_path / "photo.pth")


def test_pickled_objects_are_refused_without_torchs_advice(tmp_path, capsys, image):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model_weight": Payload()}, protocol=2))
    code, out, err = _run(["denoise", str(image), "-o", str(tmp_path / "o.png"), "-w", str(path)],
                          capsys)
    assert code == 1 and "refusing to load" in err and "unpickled!" not in out, err
    assert "weights_only" not in err and "will likely succeed" not in err
    _one_error_line(err)


@pytest.mark.parametrize("case,msg", [("empty_file", "the file is empty"),
                                      ("empty_dict", "holds no weights")])
def test_empty_checkpoints(tmp_path, case, msg):
    path = tmp_path / "m.pth"
    if case == "empty_file":
        path.write_bytes(b"")
    else:
        torch.save({}, path)
    with pytest.raises(CheckpointError, match=msg) as e:
        SSBSN.load(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("change,msg", [
    (lambda v: v * 1e30, r"magnitude .* beyond"),
    (lambda v: v.to(torch.int32), r"holds int32 values; weights must be floating point"),
])
def test_absurd_or_integer_weights_are_refused_naming_the_tensor(tmp_path, weights, change, msg):
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    state = load_file(weights)
    state["bsn.tail.2.weight"] = change(state["bsn.tail.2.weight"])
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=msg) as e:
        SSBSN.load(path)
    assert "tail.2.weight" in str(e.value)


@pytest.mark.parametrize("key", ["ssbsn_config", "ssbsn_inference"])
def test_deeply_nested_metadata_is_one_clear_error(tmp_path, weights, key):
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    meta[key] = "[" * 100000 + "]" * 100000
    path = tmp_path / "nested.safetensors"
    save_file(load_file(weights), str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="nested too deeply") as e:
        SSBSN.load(path)
    assert "\n" not in str(e.value)


def test_cuda_conv_backend_falls_back_to_torch_with_the_same_weights(tmp_path, weights, caplog,
                                                                     monkeypatch):
    from safetensors import safe_open

    import ssbsn.nn._cuda_ext as ext
    monkeypatch.setattr(ext, "conv_backend_info", lambda: "torch (no CUDA here)")
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["ssbsn_config"])
    config["conv_backend"] = "cuda"
    path = tmp_path / "cuda.safetensors"
    save_file(load_file(weights), str(path), metadata={**meta, "ssbsn_config": json.dumps(config)})
    with caplog.at_level(logging.WARNING, logger="ssbsn"):
        model = SSBSN.load(path).eval()
    assert model.config.conv_backend == "torch"
    assert any("conv_backend 'cuda'" in r.getMessage() and "no CUDA here" in r.getMessage()
               for r in caplog.records)
    reference = SSBSN.load(weights).eval()  # the same weights stored with the torch backend
    x = torch.rand(1, 3, 16, 16) * 255
    with torch.no_grad():
        torch.testing.assert_close(model.denoise(x, r3=False), reference.denoise(x, r3=False),
                                   rtol=0, atol=0)


# ------------------------------------------------------------------ command line: usage errors

def _train_argv(data, out, *extra):
    return ["train", str(data), "--out", str(out), "--crop", "10", "--steps", "2", "--batch", "2",
            "--no-progress", "--channels", "8", "--modules", "2", "--ss-blocks", "1", *extra]


@pytest.mark.parametrize("extra,names", [
    (["--steps", "0"], "--steps"), (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--minutes", "inf"], "--minutes"), (["--minutes", "1e300"], "--minutes"),
    (["--lr-decay-at", "inf"], "--lr-decay-at"), (["--r3-p", "nan"], "--r3-p"),
    (["--workers", "-1"], "--workers"), (["--seed", str(2 ** 70)], "--seed"),
    (["--device", "tpu"], "--device"), (["--channels", "7"], "--channels"),
    (["--fused", "--backend", "reference"], "--backend"), (["--threads", "0"], "--threads"),
    (["--crop", "12"], "--crop 12 must be a positive multiple of the training PD stride 5"),
    (["--pd-train", "3"], "--crop 10 must be a positive multiple of the training PD stride 3"),
    (["--ss-blocks", "3"], "--ss-blocks 3 exceeds --modules 2"),
])
def test_train_usage_errors_exit_2_and_leave_no_run_folder(tmp_path, capsys, extra, names):
    data = noisy_folder(tmp_path / "imgs", 2, 24, 26)
    out = tmp_path / "run"
    code, _, err = _run(_train_argv(data, out, *extra), capsys)
    assert code == 2, err
    _one_error_line(err)
    assert names in err and "Overflow" not in err and "unrecognized" not in err
    assert not out.exists()


def test_contradicting_values_of_a_saved_configuration_are_its_error(tmp_path, capsys):
    """The same bound held by a config.yaml alone is the configuration's error (exit 1)."""
    from ssbsn.train import TrainConfig, write_config
    data = noisy_folder(tmp_path / "imgs", 2, 24, 26)
    write_config(tmp_path / "config.yaml", TrainConfig(data=[str(data)], crop=12, **TINY))
    code, _, err = _run(["train", "--config", str(tmp_path / "config.yaml"), "--out",
                         str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 1 and "--crop 12 must be a positive multiple" in err, err
    _one_error_line(err)


@pytest.mark.parametrize("size,overlap,msg", [
    ("0", "0", "--size must be at least 8, got 0"),
    ("16", "16", "--overlap must lie in 0..15 (below --size 16), got 16"),
])
def test_prep_tile_size_out_of_range_is_a_usage_error(tmp_path, capsys, image, size, overlap,
                                                      msg):
    code, _, err = _run(["prep", str(image), "-o", str(tmp_path / "t"), "--size", size,
                         "--overlap", overlap], capsys)
    assert code == 2 and msg in err, err
    _one_error_line(err)
    assert not (tmp_path / "t").exists()


def test_train_without_data_is_a_usage_error(tmp_path, capsys):
    code, _, err = _run(["train", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "no training data" in err
    _one_error_line(err)


@pytest.mark.parametrize("extra,names", [
    (["--tile", "-1"], "--tile"), (["--seed", str(2 ** 70)], "--seed"),
    (["--lowpass", "nan"], "--lowpass"), (["--device", "tpu"], "--device"),
    (["--threads", "0"], "--threads"), (["--overlap", "-3"], "--overlap"),
])
def test_denoise_usage_errors_exit_2(tmp_path, capsys, weights, image, extra, names):
    code, _, err = _run(["denoise", str(image), "-o", str(tmp_path / "o.png"), "-w", str(weights),
                         *extra], capsys)
    assert code == 2 and names in err and "unrecognized" not in err, err
    _one_error_line(err)
    assert "negative" not in err or "nan" not in extra  # nan is not "negative"
    assert not (tmp_path / "o.png").exists()


def test_eval_limit_0_and_attention_top_negative_exit_2(tmp_path, capsys, weights, image):
    code, _, err = _run(["eval", str(tmp_path), "-w", str(weights), "--limit", "0"], capsys)
    assert code == 2 and "--limit" in err
    _one_error_line(err)
    code, _, err = _run(["attention-map", str(image), "--pixel", "3", "3", "-w", str(weights),
                         "-o", str(tmp_path / "a.png"), "--top", "-5"], capsys)
    assert code == 2 and "--top" in err
    _one_error_line(err)
    assert not (tmp_path / "a.png").exists()


def test_triton_backend_on_the_cpu_is_refused(tmp_path, capsys, weights, image, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = _run(["denoise", str(image), "-o", str(tmp_path / "o.png"), "-w", str(weights),
                         "--backend", "triton", "--device", "cpu"], capsys)
    assert code == 2 and "--backend triton needs a CUDA device" in err, err
    _one_error_line(err)
    data = noisy_folder(tmp_path / "imgs", 2, 24, 26)
    code, _, err = _run(_train_argv(data, tmp_path / "run", "--backend", "triton",
                                    "--device", "cpu"), capsys)
    assert code == 2 and "--backend triton" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,hint", [
    (["denosie"], "did you mean 'denoise'?"),
    (["atention-map"], "did you mean 'attention-map'?"),
    (["denoise", "a.png", "-o", "b.png", "-w", "m", "--overwirte"],
     "did you mean '--overwrite' for '--overwirte'?"),
    (["train", "d", "--stpes", "3"], "did you mean '--steps' for '--stpes'?"),
    (["denoise", "a.png", "--overwirte"], "did you mean '--overwrite' for '--overwirte'?"),
    (["demo", "--thraeds", "2"], "did you mean '--threads' for '--thraeds'?"),
    (["--thraeds=2", "demo"], "did you mean '--threads' for '--thraeds=2'?"),
])
def test_unknown_commands_and_options_get_a_suggestion(capsys, argv, hint):
    code, _, err = _run(argv, capsys)
    assert code == 2 and hint in err, err
    _one_error_line(err)


def test_global_options_after_the_command(tmp_path, capsys, weights, image):
    code, _, err = _run(["denoise", str(image), "-o", str(tmp_path / "o.png"), "-w", str(weights),
                         "--no-r3", "--threads", "1"], capsys)
    assert code == 0, err
    assert (tmp_path / "o.png").exists()
    with pytest.raises(CheckpointError):  # --debug after the command: the exception itself
        main(["denoise", str(image), "-o", str(tmp_path / "p.png"), "-w",
              str(tmp_path / "missing.pth"), "--debug"])


def test_train_help_does_not_import_torch():
    code = ("import sys\nfrom ssbsn.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--minutes" in r.stdout and r.stdout.strip().endswith("NO-TORCH")


# ------------------------------------------------------------------ command line: one clear line

def test_eval_json_has_null_for_an_infinite_psnr(tmp_path, capsys, weights):
    rng = np.random.default_rng(0)
    for sub in ("noisy", "clean"):
        (tmp_path / "pairs" / sub).mkdir(parents=True)
    img = rng.integers(0, 256, (16, 18, 3)).astype(np.uint8)
    for sub in ("noisy", "clean"):  # identical: the noisy input's PSNR is +inf
        write_image(tmp_path / "pairs" / sub / "0.png", img)
    report = tmp_path / "r.json"
    code, _, err = _run(["eval", str(tmp_path / "pairs"), "-w", str(weights), "--no-r3",
                         "--json", str(report)], capsys)
    assert code == 0, err

    def refuse(name):
        raise AssertionError(f"not JSON: {name}")
    r = json.loads(report.read_text(), parse_constant=refuse)
    assert r["images"][0]["psnr_noisy"] is None and r["mean"]["psnr_noisy"] is None
    assert math.isfinite(r["images"][0]["psnr"])


def test_attention_map_of_a_model_without_ss_blocks(tmp_path, capsys, image):
    w = tmp_path / "noss.safetensors"
    SSBSN(base_channels=8, num_modules=2, ss_blocks=0).save(w)
    code, _, err = _run(["attention-map", str(image), "--pixel", "3", "3", "-w", str(w), "-o",
                         str(tmp_path / "a.png")], capsys)
    assert code == 1 and "no SS-Blocks" in err and str(w) in err, err
    _one_error_line(err)
    assert not (tmp_path / "a.png").exists()


def test_submit_sidd_with_zero_blocks(tmp_path, capsys, weights):
    mat = tmp_path / "BenchmarkNoisyBlocksSrgb.mat"
    scipy.io.savemat(mat, {"BenchmarkNoisyBlocksSrgb": np.zeros((2, 0, 8, 8, 3), np.uint8)})
    out = tmp_path / "SubmitSrgb.mat"
    code, _, err = _run(["submit", "sidd", str(mat), "-o", str(out), "-w", str(weights)], capsys)
    assert code == 1 and "holds no blocks" in err, err
    _one_error_line(err)
    assert not out.exists()


def test_submit_sidd_takes_the_benchmark_blocks_only(tmp_path, capsys, weights):
    """The validation set's noisy or clean blocks are refused with one line naming them (they
    were denoised into a submission); the benchmark's blocks load under any file name, and a
    file whose variable is its own stem still does."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (1, 2, 16, 16, 3)).astype(np.uint8)
    out = tmp_path / "SubmitSrgb.mat"
    for name, var in (("val.mat", "ValidationNoisyBlocksSrgb"),
                      ("ValidationNoisyBlocksSrgb.mat", "ValidationNoisyBlocksSrgb"),
                      ("ValidationGtBlocksSrgb.mat", "ValidationGtBlocksSrgb")):
        scipy.io.savemat(tmp_path / name, {var: blocks})
        code, _, err = _run(["submit", "sidd", str(tmp_path / name), "-o", str(out), "-w",
                             str(weights)], capsys)
        assert code == 1 and f"SIDD's {var}, not the benchmark's" in err, err
        _one_error_line(err)
        assert not out.exists()
    for name, var in (("renamed.mat", "BenchmarkNoisyBlocksSrgb"), ("mine.mat", "mine")):
        scipy.io.savemat(tmp_path / name, {var: blocks})
        code, _, err = _run(["submit", "sidd", str(tmp_path / name), "-o", str(out), "-w",
                             str(weights), "--overwrite"], capsys)
        assert code == 0, err
        assert scipy.io.loadmat(out)["DenoisedBlocksSrgb"].shape == (1, 2)


# ------------------------------------------------------------------ training: disk, data

def _cfg(data, out, **kw):
    from ssbsn.train import TrainConfig
    return TrainConfig(data=[str(data)], out=str(out), crop=10, batch=2, repeat=2, lr=1e-3,
                       log_every=1, save_every=1, progress=False, seed=3, **TINY, **kw)


def test_disk_full_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import ssbsn.train as T
    data = noisy_folder(tmp_path / "imgs", 2, 24, 26)
    cfg = _cfg(data, tmp_path / "run", steps=4)
    real_save = torch.save
    # the second checkpoint's state file meets a full disk
    monkeypatch.setattr(T.torch, "save", full_disk_on_save(real_save))
    with pytest.raises(T.StorageError) as e:
        T.train(cfg)
    state = T.checkpoint_paths(cfg.out, 2)[1]
    msg = str(e.value)
    assert msg.startswith(f"no space left on device while writing {state}"), msg
    assert "step 1" in msg and "--resume" in msg and e.value.errno == errno.ENOSPC
    assert T.list_checkpoints(cfg.out) == [1]
    ckpt = sorted(p.name for p in (tmp_path / "run" / "ckpt").iterdir())
    assert ckpt == ["step_00000001.safetensors", "step_00000001.state.pt"]  # nothing half-made
    monkeypatch.setattr(T.torch, "save", real_save)
    code, _, err = _run(["train", "--resume", cfg.out, "--no-progress"], capsys)
    assert code == 0, err
    assert T.list_checkpoints(cfg.out)[-1] == 4


def test_disk_full_through_the_command_is_one_line(tmp_path, monkeypatch, capsys):
    import ssbsn.train as T
    data = noisy_folder(tmp_path / "imgs", 2, 24, 26)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(T.torch, "save", full)
    code, _, err = _run(_train_argv(data, tmp_path / "run", "--save-every", "1"), capsys)
    assert code == 1 and "no space left on device while writing" in err, err
    _one_error_line(err)


def test_training_data_without_noise_is_refused_before_the_run(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, value in enumerate((40, 200)):
        write_image(flat / f"{i}.png", np.full((24, 26, 3), value, np.uint8))
    out = tmp_path / "run"
    code, _, err = _run(_train_argv(flat, out), capsys)
    assert code == 1 and "hold no noise" in err, err
    _one_error_line(err)
    assert "inf" not in err and "--seed" not in err
    assert not out.exists()


@pytest.mark.parametrize("key,value,msg", [
    ("minutes", math.inf, "--minutes must be a number above 0"),
    ("minutes", math.nan, "--minutes must be a number"), ("workers", -1, "--workers must lie in 0..256"),
    ("seed", 2 ** 70, "--seed must lie in 0.."),
])
def test_saved_configuration_out_of_range_is_refused(tmp_path, capsys, key, value, msg):
    from ssbsn.train import TrainConfig, write_config
    data = noisy_folder(tmp_path / "imgs", 2, 24, 26)
    cfg = TrainConfig(data=[str(data)], crop=10, batch=2, **TINY)
    setattr(cfg, key, value)
    write_config(tmp_path / "config.yaml", cfg)
    out = tmp_path / "run"
    code, _, err = _run(["train", "--config", str(tmp_path / "config.yaml"), "--out", str(out),
                         "--no-progress"], capsys)
    assert code == 1 and msg in err, err
    _one_error_line(err)
    assert not out.exists()


def test_unknown_devices_are_refused_by_the_api():
    from ssbsn.errors import UsageError
    from ssbsn.train import pick_device
    for name in ("tpu", "cuda:99" if torch.cuda.is_available() else "cuda:0", "gpu"):
        with pytest.raises(UsageError, match="--device"):
            pick_device(name)
    assert pick_device("cpu") == torch.device("cpu")


def test_attention_window_out_of_range_is_a_usage_error(tmp_path, capsys, weights, image):
    code, _, err = _run(["denoise", str(image), "-o", str(tmp_path / "o.png"), "-w", str(weights),
                         "--attention-window", "-3"], capsys)
    assert code == 2 and "--attention-window must lie in 0..65536" in err, err
    _one_error_line(err)
