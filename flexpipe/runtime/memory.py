"""Process-level memory settings of the actor processes FlexPipe spawns."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("flexpipe.memory")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (glibc's malloc.h)
_kept = False   # keep_freed_memory() changed this process's thresholds


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc's malloc reuse freed blocks instead of handing them back to the kernel at once.

    torch's CPU allocator takes every tensor from malloc.  By default glibc serves blocks above a
    moving threshold (128 KiB to 32 MiB) with a fresh mmap and unmaps them when freed, and trims the
    heap's free top past twice that: a stage step that allocates and frees megabytes of activations and
    gathered KV then pays a page fault per 4 KiB touched, every step (README, FP-3: a third of a
    decode step's time on the benchmark's model).  Fixed thresholds keep blocks up to `mmap_threshold` on
    the heap and let up to `trim_threshold` of free heap stay mapped (memory a stage reuses next step).
    Returns False where the C library is not glibc (nothing changed).  Called in the processes
    FlexPipe spawns, never in a process that embeds the runtime (its allocator is its owner's).
    The heap kept this way goes back to the kernel with `release_freed_memory()` (a stage calls it
    once it has been idle for a while).
    """
    global _kept
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not ok:
        log.warning("mallopt refused the thresholds (%d, %d): malloc keeps its defaults", mmap_threshold,
                    trim_threshold)
    _kept = _kept or ok
    return ok


def release_freed_memory() -> bool:
    """Give the free heap that keep_freed_memory() lets malloc keep back to the kernel (glibc's
    malloc_trim(0): the free top of each arena, and free pages inside it). True if it ran; a no-op
    (False) in a process whose thresholds were not changed, where malloc trims by itself."""
    trim = getattr(_libc(), "malloc_trim", None) if _kept else None
    if trim is None:
        return False
    trim(0)
    return True
