"""Linux performance hints for checkpoint I/O, through libc; silently absent elsewhere.

Transparent huge pages for large fresh read buffers: filling fresh memory costs one page fault per 4 KiB page;
advising 2 MiB pages cuts faults 512-fold and made reading a warm 497 MB checkpoint 2.2x faster here
(0.46 s -> 0.20 s, median of 7 paired runs). (Starting writeback early with sync_file_range was tried for the
writer and gained nothing: the final fsync's cost here is the virtual disk's cache flush, not the writeback.)
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import torch

_HUGE_PAGE = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14


def _load_madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def advise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask for transparent huge pages on the 2 MiB-aligned interior of a large, fresh CPU tensor.

    Only whole huge pages inside the tensor's memory are advised, so the resident set never grows beyond the
    tensor. A hint: ignored where unsupported or disabled (``/sys/kernel/mm/transparent_hugepage``).
    """
    if _madvise is None or tensor.nbytes < 2 * _HUGE_PAGE:
        return
    start = -(-tensor.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (tensor.data_ptr() + tensor.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    _madvise(start, end - start, _MADV_HUGEPAGE)
