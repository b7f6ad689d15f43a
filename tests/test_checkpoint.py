"""Loading the authors' checkpoint layout and our own files."""
import json
import pickle

import pytest
import torch

from benchmarks.authors import authors_state_dict
from ssbsn import SSBSN, CheckpointError


def check_loaded(model, sd):
    b = model.bsn
    assert torch.equal(b.branch1.body[8].attn.wqk, sd["bsn.branch1.body.8.wqk"])
    assert torch.equal(b.branch2.body[7].conv2.weight, sd["bsn.branch2.body.7.conv2.weight"])
    assert torch.equal(b.branch2.body[0].weight, sd["bsn.branch2.body.0.weight"])
    assert torch.equal(b.tail[6].bias, sd["bsn.tail.6.bias"])
    assert model.config["base_channels"] == 8 and model.config["num_modules"] == 3
    assert model.config["ss_blocks"] == 1


def test_authors_checkpoint_file_loads(tmp_path):
    sd = authors_state_dict()
    path = tmp_path / "SSBSN_SIDD.pth"
    torch.save({"epoch": 20, "model_weight": {"denoiser": sd}}, path)
    model = SSBSN.from_official(path)
    check_loaded(model, sd)
    x = torch.rand(1, 3, 20, 20) * 255
    assert torch.isfinite(model.denoise(x, r3=False)).all()


@pytest.mark.parametrize("prefix,strip", [("module.", ""), ("", "bsn.")])
def test_bare_and_prefixed_state_dicts_load(prefix, strip):
    sd = authors_state_dict()
    bare = {prefix + k[len(strip):]: v for k, v in sd.items()}
    check_loaded(SSBSN.from_official(bare), sd)


def test_centre_value_in_a_checkpoint_is_ignored():
    sd = authors_state_dict()
    x = torch.rand(1, 3, 20, 20) * 255
    ref = SSBSN.from_official(sd)(x)
    sd["bsn.branch1.body.0.weight"][:, :, 1, 1] = 5.0
    torch.testing.assert_close(SSBSN.from_official(sd)(x), ref)


def test_wrong_keys_are_named():
    sd = authors_state_dict()
    del sd["bsn.branch2.body.7.conv1.bias"]
    sd["bsn.branch1.body.7.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys: branch2\.body\.7\.conv1\.bias.*"
                                              r"unexpected keys: branch1\.body\.7\.extra"):
        SSBSN.from_official(sd)


def test_wrong_shapes_are_named():
    sd = authors_state_dict()
    with pytest.raises(CheckpointError, match=r"wrong shapes: branch1\.body\.2\.weight"):
        SSBSN.from_official({**sd, "bsn.branch1.body.2.weight": torch.zeros(8, 8, 3, 3)})


def test_non_tensor_and_pickled_payloads_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not tensors: note"):
        SSBSN.from_official({**authors_state_dict(), "note": "hello"})

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model_weight": Payload()}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        SSBSN.from_official(path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        SSBSN.from_official(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        SSBSN.from_official(tmp_path / "missing.pth")


def test_round_trip_of_our_file(tmp_path):
    torch.manual_seed(0)
    model = SSBSN(base_channels=8, num_modules=2, ss_blocks=1, gamma=3, r3_T=2)
    model.save(tmp_path / "m.safetensors")
    again = SSBSN.load(tmp_path / "m.safetensors")
    assert again.config == model.config
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # our own state dict also loads through from_official
    assert torch.equal(SSBSN.from_official(sd, gamma=3).bsn.branch1.body[7].attn.wqk,
                       model.bsn.branch1.body[7].attn.wqk)
    x = torch.rand(1, 3, 16, 16) * 255
    torch.testing.assert_close(again.denoise(x), model.denoise(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporaries


# ------------------------------------------------------------------ metadata validation

def _with_metadata(path, model, text, **extra):
    """Our file layout with ``text`` as the ssbsn_config metadata (and ``extra`` entries)."""
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"ssbsn_config": text, **extra})
    return path


@pytest.mark.parametrize("text,msg", [
    ('{"base_channels": 8, "num_modules": 2, "ss_blocks": 1, "bogus": 3}', "unknown key.*bogus"),
    ('{"base_channels": "8", "num_modules": 2, "ss_blocks": 1}', "base_channels.*integer"),
    ('[8, 2, 1]', "JSON object"),
    ('{"base_channels": 8, "num_modules": 2', "not valid JSON"),
    ('{"base_channels": 8, "num_modules": 2, "ss_blocks": 1, "fused": "yes"}', "fused.*true or false"),
    ('{"base_channels": 8, "num_modules": 2, "ss_blocks": 1, "r3_p": 1.5}', "r3_p"),
    ('{"base_channels": 8, "num_modules": 2, "ss_blocks": 1, "pd_test": 0}', "pd_test"),
    ('{"base_channels": 8, "num_modules": 2, "ss_blocks": 1, "conv_backend": "x"}', "conv_backend"),
    ('{"base_channels": 200000, "num_modules": 2, "ss_blocks": 1}', "base_channels=200000"),
    ('{"base_channels": 16, "num_modules": 2, "ss_blocks": 1}', "base_channels=16.*weights.*=8"),
    ('{"base_channels": 8, "num_modules": 5, "ss_blocks": 1}', "num_modules.*weights.*2"),
    ('{"base_channels": 8, "num_modules": 2, "ss_blocks": 1, "in_channels": 1}', "in_channels"),
])
def test_bad_metadata_is_refused_before_building(tmp_path, monkeypatch, text, msg):
    model = SSBSN(base_channels=8, num_modules=2, ss_blocks=1)
    path = _with_metadata(tmp_path / "m.safetensors", model, text)
    built = []
    orig = SSBSN.__init__

    def spy(self, *a, **kw):
        built.append(kw)
        orig(self, *a, **kw)
    monkeypatch.setattr(SSBSN, "__init__", spy)
    with pytest.raises(CheckpointError, match=msg) as e:
        SSBSN.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert built == []  # refused before any model (or allocation) was made


@pytest.mark.parametrize("text,msg", [
    ('{"r3": true, "tile": 0', "inference settings.*not valid JSON"),
    ('[true]', "inference settings.*JSON object"),
    ('{"r3": "yes"}', "r3 must be true or false"),
    ('{"tile": -1}', "tile must be a non-negative integer"),
    ('{"r3": true, "sharpen": 2}', "unknown inference settings: sharpen"),
])
def test_bad_inference_metadata_is_refused_before_building(tmp_path, monkeypatch, text, msg):
    model = SSBSN(base_channels=8, num_modules=2, ss_blocks=1)
    path = _with_metadata(tmp_path / "m.safetensors", model,
                          json.dumps(model.config.to_dict()),
                          ssbsn_inference=text)
    built = []
    monkeypatch.setattr(SSBSN, "__init__", lambda self, *a, **kw: built.append(kw))
    with pytest.raises(CheckpointError, match=msg) as e:
        SSBSN.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert built == []


def test_non_finite_weights_are_refused(tmp_path):
    model = SSBSN(base_channels=8, num_modules=2, ss_blocks=1)
    with torch.no_grad():
        model.bsn.tail[2].weight[0, 0, 0, 0] = float("nan")
    model.save(tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"non-finite.*tail\.2\.weight"):
        SSBSN.load(tmp_path / "nan.safetensors")
    sd = authors_state_dict()
    sd["bsn.head.0.bias"][1] = float("inf")
    torch.save({"model_weight": {"denoiser": sd}}, tmp_path / "inf.pth")
    with pytest.raises(CheckpointError, match=r"non-finite.*head\.0\.bias") as e:
        SSBSN.from_official(tmp_path / "inf.pth")
    assert "inf.pth" in str(e.value)
