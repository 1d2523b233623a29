"""Output buffers on 2 MiB pages: a plain tensor to its users, huge pages to the kernel where THP allows."""

import re
from pathlib import Path

import pytest
import torch

from hf_ptq_plugin.backends.huge_pages import HUGE_PAGE, empty_on_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def anon_huge_bytes(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from /proc/self/smaps."""
    text = Path("/proc/self/smaps").read_text()
    for header, body in re.findall(r"^([0-9a-f]+-[0-9a-f]+) .*\n((?:[A-Z][^\n]*\n)+)", text, re.M):
        start, end = (int(part, 16) for part in header.split("-"))
        if start <= address < end:
            return int(re.search(r"AnonHugePages:\s+(\d+) kB", body).group(1)) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("shape, dtype", [((3, 5), torch.uint8), ((4096, 1024), torch.float8_e4m3fn),
                                          ((1024, 2048), torch.int8)])
def test_the_buffer_is_an_ordinary_tensor(shape, dtype):
    buffer = empty_on_huge_pages(*shape, dtype=dtype)
    assert buffer.shape == shape and buffer.dtype == dtype and buffer.device.type == "cpu"
    assert buffer.is_contiguous()
    buffer.view(torch.uint8).fill_(7)
    assert int(buffer.view(torch.uint8).sum()) == 7 * buffer.numel() * buffer.element_size()


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_a_large_buffer_is_backed_by_huge_pages_once_written():
    buffer = empty_on_huge_pages(16 * HUGE_PAGE, dtype=torch.uint8)
    plain = torch.empty(16 * HUGE_PAGE, dtype=torch.uint8)
    buffer.fill_(1)
    plain.fill_(1)
    first_whole_page = lambda t: -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # noqa: E731 (the advised mapping)
    assert anon_huge_bytes(first_whole_page(buffer)) >= 8 * HUGE_PAGE  # most of its 15-16 whole pages
    if "[madvise]" in THP.read_text():  # without the advice: 4 KiB pages, so the test can fail
        assert anon_huge_bytes(first_whole_page(plain)) == 0
