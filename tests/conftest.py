"""Test configuration. Triton's interpreter must be selected before anything imports triton,
so that the fused kernels run on CPU tensors in CI."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    cuda = torch.cuda.is_available()
    return [f"torch {torch.__version__}, CUDA device: {torch.cuda.get_device_name() if cuda else 'none'}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"]
