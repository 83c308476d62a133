import os

import pytest
import torch

# Triton's interpreter on a machine without CUDA: set for the whole session, before any test module
# is imported, because triton.jit reads TRITON_INTERPRET when a kernel is decorated (a module
# imported earlier without it, e.g. through benchmarks/gpu.py, would define compiled kernels that
# then cannot run on CPU tensors).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
