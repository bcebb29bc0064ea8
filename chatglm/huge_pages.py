"""Move a CPU model's large weights into memory backed by transparent huge pages.

A decode step streams every weight once. On 4 KB pages the CPU's hardware prefetcher stops at each
page boundary and every page costs a TLB entry, so a stream of weights reads ~25 % slower than the
same bytes on 2 MB pages (docs/benchmarks.md, quantization run E). Linux gives huge pages to anonymous
memory advised with MADV_HUGEPAGE before it is first touched (the default THP mode, "madvise"), so
the weights are copied, one tensor at a time, into such an arena. Peak memory grows by one tensor.
Where the OS offers no huge pages this changes nothing but the addresses.
"""
from __future__ import annotations

import logging
import mmap
import sys
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 64  # bytes between tensors in the arena: one cache line
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_unavailable_reason() -> str | None:
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return "transparent huge pages are a Linux feature"
    try:
        mode = THP_MODE.read_text()
    except OSError:
        return f"{THP_MODE} is not readable"
    if "[never]" in mode:
        return f"transparent huge pages are disabled ({THP_MODE}: never)"
    return None


def huge_page_arena(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes`, 2 MB aligned, in anonymous memory advised MADV_HUGEPAGE, untouched."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive as long as any view of it
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes]


def move_to_huge_pages(module: nn.Module, min_bytes: int = 1 << 20) -> int:
    """Copy `module`'s CPU parameters and buffers of at least `min_bytes` into one huge-page arena.

    Returns the bytes moved (0 where huge pages are unavailable). Values, dtypes, shapes and
    requires_grad are unchanged; the tensors become contiguous.
    """
    reason = huge_pages_unavailable_reason()
    if reason is not None:
        log.info("weights stay on normal pages: %s", reason)
        return 0
    slots: list[tuple[nn.Module, str, torch.Tensor]] = []
    for owner in module.modules():
        for name, t in [*owner._parameters.items(), *owner._buffers.items()]:
            if (t is not None and t.device.type == "cpu" and not t.is_meta
                    and t.numel() * t.element_size() >= min_bytes):
                slots.append((owner, name, t))
    if not slots:
        return 0
    seen: dict[int, torch.Tensor] = {}  # tied weights move once
    sizes = {id(t): -(-t.numel() * t.element_size() // ALIGN) * ALIGN for _, _, t in slots}
    total = sum(sizes[k] for k in {id(t) for _, _, t in slots})
    arena = huge_page_arena(total)
    offset = 0
    for owner, name, t in slots:
        if id(t) not in seen:
            nbytes = t.numel() * t.element_size()
            dest = arena[offset:offset + nbytes].view(t.dtype).view(t.shape)
            with torch.no_grad():
                dest.copy_(t)
            seen[id(t)] = dest
            offset += sizes[id(t)]
        dest = seen[id(t)]
        if isinstance(t, nn.Parameter):
            t.data = dest  # the Parameter object (and optimizer references) stays
        else:
            owner._buffers[name] = dest
    return offset
