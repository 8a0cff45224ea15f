"""Linux performance hints for checkpoint I/O, through libc; silently absent elsewhere.

Transparent huge pages for large fresh read buffers: filling fresh memory costs one page fault per 4 KiB page;
advising 2 MiB pages cuts faults 512-fold and made reading a warm 497 MB checkpoint 2.2x faster here
(0.46 s -> 0.20 s, median of 7 paired runs). (Starting writeback early with sync_file_range was tried for the
writer and gained nothing: the final fsync's cost here is the virtual disk's cache flush, not the writeback.)

Dropping a file's written pages from the page cache as it is written (``POSIX_FADV_DONTNEED`` every few dozen MiB):
each call starts writeback of what is dirty and frees what is already clean, so the next writes reuse those pages
instead of claiming fresh memory for the whole file. Writing a 417 MiB checkpoint went from 0.78 s + a 0.19 s
fsync to 0.25 s + 0.02 s here (3 paired runs); the cost is that a folder just written is read back from disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
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
_fadvise = getattr(os, "posix_fadvise", None)  # absent on macOS and Windows
DROP_EVERY = 32 * 1024 * 1024
"""Bytes written to one file between two :func:`drop_written_pages` calls."""


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


def drop_written_pages(fd: int) -> None:
    """Start writeback of ``fd``'s dirty pages and drop its clean ones from the page cache (a hint; data stay safe).

    Dirty pages are never dropped, only queued for writeback, so nothing written is lost; a later ``fsync`` still
    makes the file durable. Silently does nothing where ``posix_fadvise`` is missing or refuses the file.
    """
    if _fadvise is None:
        return
    with contextlib.suppress(OSError):  # e.g. a pipe or a filesystem without the hint: it only ever costs speed
        _fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
