"""Test setup: pick how this process runs Triton before anything imports it.

Triton decides interpreted-or-compiled for the whole process at import time. Without a
CUDA GPU ``sparse24.backends.use_interpreter_if_no_gpu()`` sets ``TRITON_INTERPRET=1`` here,
first, so the kernel tests run the real kernel source in Triton's CPU interpreter; with a
GPU the kernels are compiled. An explicit ``TRITON_INTERPRET`` in the environment always wins.

JAX would reserve 75% of the GPU at its first use; torch and JAX share the GPU in these
tests (and several pytest-xdist workers share it too), so JAX allocates on demand here
unless the environment says otherwise.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# pytest-xdist (``-n auto`` in pyproject.toml): one worker per core. Each worker's torch (and
# the processes its tests start) then takes its share of the cores instead of all of them;
# oversubscribed threads made the suite slower in parallel than in series on 2 cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

from sparse24.backends import kernels_interpreted, use_interpreter_if_no_gpu  # noqa: E402

use_interpreter_if_no_gpu()

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def kernel_backend():
    """(backend, device) that runs the Triton kernel in this process."""
    if kernels_interpreted():
        return "interpret", "cpu"
    if torch.cuda.is_available():
        return "triton", "cuda"
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1: the Triton kernel cannot run in this process")


@pytest.fixture(scope="session")
def jax_backend(kernel_backend):
    """The backend that runs the Triton kernel for JAX in this process."""
    return "interpret" if kernel_backend[0] == "interpret" else "triton"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason, unless compiled kernels and a GPU exist."""
    if not kernels_interpreted() and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU with compiled Triton kernels (this process interprets or has no GPU)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
