import os

import pytest
import torch

# Without a GPU, the Triton kernels are tested under the Triton interpreter, which @triton.jit selects
# when a kernel is defined: set it before dfs_kernels' Triton backend is first imported (dfs_kernels
# imports it lazily, so before any test runs is early enough). torch itself does not import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dfs_kernels  # noqa: E402

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
