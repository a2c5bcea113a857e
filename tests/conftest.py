"""Shared test fixtures: the devices the ops are tested on, and the native references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cifarnet


def _devices() -> list[str]:
    devices = ["cpu"]
    if cifarnet.build_info()["cuda"] and torch.cuda.is_available():
        devices.append("cuda")
    return devices


DEVICES = _devices()

# F.batch_norm's messages for an eps it refuses, which the ops give too: torch 2.14 allows eps = 0
# in evaluation (pytorch/pytorch#175508; from 2.12, as the ops take it), 2.10 and 2.11 want eps
# positive in both modes.
if torch.torch_version.TorchVersion(torch.__version__) >= "2.12":
    TRAINING_EPS_MESSAGE, EVALUATION_EPS_MESSAGE = "eps must be positive during training", "eps must be non-negative"
else:
    TRAINING_EPS_MESSAGE = EVALUATION_EPS_MESSAGE = "eps must be positive"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    NB: OpenMP threads spin-wait when the machine's two cores are busy with other work, which
    slows small runs several-fold; one thread keeps them fast and their timing stable.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Decode caches and default data folders go to the test's own folder (for modules that
    run the commands: ``pytestmark = pytest.mark.usefixtures("isolated_cache", ...)``)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="module")
def restore_threads():
    """The module's torch thread count back afterwards: in-process runs with ``--threads``
    set torch's global one."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def float32_means_float32():
    """Deliberately no TF32 in the tests: they bound float32 results against float64 by
    float32's rounding, while cuDNN runs float32 convolutions in TF32 (a 10-bit mantissa) by
    default, natively and in our ops alike. (No effect on the CPU; the benchmarks keep torch's
    defaults, the same for both sides.)"""
    # NB: the flags() context manager, not assignment: once torch.testing._internal is imported
    # (the OpInfo samples), assigning cudnn flags raises ("disable_global_flags").
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False):
        yield


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def native_conv2d_relu_max_pool2d(
    input, weight, bias=None, stride=1, padding=0, pool_size=2, pool_stride=None, ceil_mode=False, pool_padding=0
):
    """The composition of native ops that cifarnet.ops.conv2d_relu_max_pool2d replaces."""
    conv = F.conv2d(input, weight, bias, stride, padding)
    return F.max_pool2d(F.relu(conv), pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)


def peak_cpu_allocation(fn) -> int:
    """Peak bytes that torch's CPU allocator holds while ``fn()`` runs, above what it held before.

    NB: torch has no public CPU allocator statistics; the profiler's allocation events (their
    sizes, in time order) are read through its private event tree.
    tests/test_torch_internals.py checks this against a known allocation.
    """
    from torch._C._profiler import _ExtraFields_Allocation

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        fn()
    allocations = []
    nodes = list(profile.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if isinstance(node.extra_fields, _ExtraFields_Allocation):
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        nodes.extend(node.children)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


def recorded_op_calls():
    """A context manager whose ``.calls`` lists the ops that reach the backend kernels while it
    is active, in order (``"cifarnet._batch_norm_forward.default"``), autograd's included.

    NB: torch has no public hook below autograd for this; TorchDispatchMode is private.
    tests/test_torch_internals.py checks it against a known op.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(str(func))
            return func(*args, **(kwargs or {}))

    return OpCalls()
