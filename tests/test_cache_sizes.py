"""The cache sizes the CPU kernels size their tiles by: read from sysfs, defaults, override."""

from __future__ import annotations

import pytest
import torch

import cifarnet
from cifarnet.ops import conv2d_relu_max_pool2d
from conftest import native_conv2d_relu_max_pool2d

KiB, MiB = 2**10, 2**20


def write_sysfs(root, entries):
    """A cpu0/cache-like folder: entries of (level, type, size) as index0, index1, ..."""
    for index, (level, kind, size) in enumerate(entries):
        folder = root / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    return str(root)


@pytest.fixture
def cache_sizes():
    """Sets the cache sizes the kernels use; restores this machine's."""
    yield cifarnet._C._set_cache_sizes
    cifarnet._C._set_cache_sizes()


def test_this_machines_sizes_are_sane():
    sizes = cifarnet._C._cache_sizes()
    assert sizes["source"] in ("sysfs", "default"), sizes
    assert 4 * KiB <= sizes["l1d_bytes"] <= 4 * MiB, sizes
    assert sizes["l1d_bytes"] <= sizes["l2_bytes"] <= 1024 * MiB, sizes
    assert sizes["llc_bytes"] == 0 or sizes["llc_bytes"] >= sizes["l2_bytes"], sizes


def test_sysfs_sizes_are_parsed(tmp_path):
    # An Intel Xeon's cpu0 (L1i listed too, which must not count as the L1 data cache).
    root = write_sysfs(tmp_path, [(1, "Data", "48K"), (1, "Instruction", "64K"), (2, "Unified", "2048K"), (3, "Unified", "491520K")])
    assert cifarnet._C._read_cache_sizes(root) == {"l1d_bytes": 48 * KiB, "l2_bytes": 2 * MiB, "llc_bytes": 480 * MiB, "source": "sysfs"}


def test_absent_sysfs_falls_back_to_defaults(tmp_path):
    sizes = cifarnet._C._read_cache_sizes(str(tmp_path / "missing"))
    assert sizes == {"l1d_bytes": 32 * KiB, "l2_bytes": 512 * KiB, "llc_bytes": 0, "source": "default"}
    # A level sysfs leaves out takes its default alone.
    partial = cifarnet._C._read_cache_sizes(write_sysfs(tmp_path, [(1, "Data", "64K")]))
    assert (partial["l1d_bytes"], partial["l2_bytes"], partial["source"]) == (64 * KiB, 512 * KiB, "sysfs")


def test_override_is_used_and_restored(cache_sizes):
    machine = cifarnet._C._cache_sizes()
    cache_sizes(l1d_bytes=16 * KiB, l2_bytes=256 * KiB, llc_bytes=0)
    assert cifarnet._C._cache_sizes() == {"l1d_bytes": 16 * KiB, "l2_bytes": 256 * KiB, "llc_bytes": 0, "source": "override"}
    assert cifarnet._C._streaming_store_threshold_bytes() == 0  # unknown last level: never stream
    cache_sizes(l1d_bytes=16 * KiB, l2_bytes=256 * KiB, llc_bytes=12345)
    assert cifarnet._C._streaming_store_threshold_bytes() == 12345  # batch norm streams above it
    with pytest.raises(RuntimeError, match="cache sizes must be positive.*L1d -1"):
        cache_sizes(l1d_bytes=-1, l2_bytes=256 * KiB, llc_bytes=0)
    with pytest.raises(RuntimeError, match="give all three"):
        cache_sizes(l1d_bytes=16 * KiB)
    cache_sizes()
    assert cifarnet._C._cache_sizes() == machine


@pytest.mark.parametrize(
    "l1d_bytes, l2_bytes",
    [(32 * KiB, 512 * KiB), (4 * KiB, 4 * KiB), (1 * MiB, 1024 * MiB)],
    ids=["defaults", "tiny: one-sample tiles", "huge: one tile"],
)
def test_kernels_match_native_whatever_the_caches(cache_sizes, l1d_bytes, l2_bytes):
    # The kernels' tiles and blocks are sized from the caches: any sizes give the same results.
    cache_sizes(l1d_bytes=l1d_bytes, l2_bytes=l2_bytes, llc_bytes=0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, 12, 12, generator=generator)
    w = torch.randn(40, 6, 3, 3, generator=generator)
    ours = [t.clone().requires_grad_() for t in (x, w)]
    native = [t.clone().requires_grad_() for t in (x, w)]
    out = conv2d_relu_max_pool2d(*ours, None, padding=1)
    ref = native_conv2d_relu_max_pool2d(*native, None, padding=1)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, generator=generator)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip(ours, native):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
