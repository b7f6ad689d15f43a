"""Test configuration. Without a GPU, Triton's interpreter must be selected before anything
imports triton, so that the fused kernels run on CPU tensors (CI). With a GPU the kernels run
for real. (``import torch`` does not import triton.)"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def exact_reference():
    """No TF32 anywhere (cuDNN convolutions and matmuls) for the test: references and
    comparisons in full fp32/fp64."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def one_thread():
    """torch on one thread for the test (see helpers.torch_threads)."""
    from helpers import torch_threads
    with torch_threads(1):
        yield


def pytest_report_header(config):
    cuda = torch.cuda.is_available()
    return [f"torch {torch.__version__}, CUDA device: {torch.cuda.get_device_name() if cuda else 'none'}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"]
