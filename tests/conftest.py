import pytest
import torch

import dfs_kernels

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_aten = pytest.mark.skipif(
    "aten" not in dfs_kernels.available_backends("cpu"),
    reason=f"aten backend unavailable: {dfs_kernels.unavailable_reason('aten', 'cpu')}",
)
