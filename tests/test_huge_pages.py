"""Loaded weights on 2 MB pages: what a load allocates is collapsed into huge pages where
the kernel can, and nothing changes (but the speed) where it cannot."""

import mmap
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from edgegen.runtime import huge_pages
from edgegen.runtime.huge_pages import collapsed

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_kb_in(array: np.ndarray) -> int:
    """AnonHugePages of the mappings that hold `array`'s memory."""
    start = array.ctypes.data
    end = start + array.nbytes
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            low, high = int(span[1], 16), int(span[2], 16)
            inside = low < end and start < high
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


def _thp_available() -> bool:
    return THP.exists() and "[never]" not in THP.read_text()


def _fresh(nbytes: int, value: int) -> np.ndarray:
    """`nbytes` newly mapped and touched, as a load leaves its weights: a mapping of its
    own (numpy's memory can come from what the process freed before, which is not new)."""
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(memory, dtype=np.uint8)
    array.fill(value)
    return array


@pytest.mark.skipif(not _thp_available(), reason="no transparent huge pages on this kernel")
def test_memory_mapped_in_the_block_moves_to_huge_pages():
    with collapsed() as pages:
        weights = _fresh(48 << 20, 1)
    if "EINVAL" in pages.refused:
        pytest.skip("this kernel has no MADV_COLLAPSE (Linux 6.1+)")
    assert 32 << 20 <= pages.moved <= 48 << 20, pages.refused
    assert _huge_kb_in(weights) >= 32 << 10
    assert weights.sum() == weights.size  # the same bytes, now on other pages


def test_in_the_background_the_block_does_not_wait(monkeypatch):
    """A backend's load returns before the collapse ends; `done` says when it has."""
    started, release = threading.Event(), threading.Event()

    def slow(start, end, result):
        started.set()
        release.wait(30)
        result.moved += end - start

    monkeypatch.setattr(huge_pages, "_collapse", slow)
    with collapsed(background=True) as pages:
        weights = _fresh(8 << 20, 1)
    assert started.wait(30) and not pages.done.is_set()
    release.set()
    assert pages.done.wait(30) and pages.moved >= 6 << 20 and weights.sum() == weights.size


def test_a_loaded_backend_finishes_its_collapse(trained_bundles):
    from edgegen.runtime.backends import OnnxRunner

    _, bundle = trained_bundles["gpt"]
    runner = OnnxRunner(bundle / "model.onnx", ["input_ids"])
    assert runner.huge_pages.done.wait(60)


def test_a_grown_mapping_has_only_its_new_end_collapsed(monkeypatch):
    """The heap that grew by a model's weights: its old part (the embedding
    application's own memory) is left as it was."""
    heap, mib = 0x5000_0000, 1 << 20
    snapshots = iter(
        [{(heap, heap + 64 * mib)}, {(heap, heap + 512 * mib), (0x7F00_0000, 0x7F10_0000)}]
    )
    monkeypatch.setattr(huge_pages, "_anonymous_regions", lambda: next(snapshots))
    monkeypatch.setattr(huge_pages, "_wanted", lambda: True)
    asked = []
    monkeypatch.setattr(huge_pages, "_collapse", lambda start, end, _: asked.append((start, end)))
    with collapsed():
        pass
    assert asked == [(heap + 64 * mib, heap + 512 * mib), (0x7F00_0000, 0x7F10_0000)]


def test_only_the_address_ranges_mapped_in_the_block_count_as_new():
    assert huge_pages._without({(0, 100)}, {(10, 20), (50, 60)}) == [(0, 10), (20, 50), (60, 100)]
    assert huge_pages._without({(0, 100), (200, 300)}, {(0, 40)}) == [(40, 100), (200, 300)]
    assert huge_pages._without({(0, 100)}, {(0, 100)}) == []


def test_turned_off_or_without_proc_nothing_is_asked(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(huge_pages, "_collapse", lambda start, end, _: asked.append(start))
    with collapsed():
        kept = _fresh(8 << 20, 1)
    assert asked and kept.sum() == kept.size  # the block's new mapping, as a control

    asked.clear()
    monkeypatch.setenv(huge_pages.ENV, "0")
    with collapsed() as pages:
        weights = _fresh(8 << 20, 1)
    assert not asked and pages.moved == 0 and weights.sum() == weights.size

    monkeypatch.delenv(huge_pages.ENV)
    monkeypatch.setattr(huge_pages, "MAPS", str(tmp_path / "no-such-maps"))
    with collapsed() as pages:
        kept = _fresh(8 << 20, 1)
    assert not asked and pages.moved == 0 and kept.sum() == kept.size


def test_a_kernel_that_refuses_leaves_the_memory_as_it_was(monkeypatch):
    monkeypatch.setattr(huge_pages, "_madvise", lambda: lambda start, size, advice: -1)
    with collapsed() as pages:
        weights = _fresh(8 << 20, 7)
    assert pages.moved == 0 and pages.refused and int(weights.max()) == 7
