"""The allocator tuning the timings need."""
from __future__ import annotations

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters
_MMAP_THRESHOLD_MAX = 32 << 20                     # glibc's ceiling on 64-bit


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the
    system: no trimming of the heap, no mmap below 32 MB. Process-wide; True if applied.

    At batch 1 a network allocates and frees a few activation-sized tensors per block; with
    glibc's defaults those frees can shrink the heap and the next allocation faults its
    pages back in, which made batch-1 timings swing from run to run (docs/benchmarks.md).
    Both settings are needed: the trim threshold alone freezes glibc's adaptive mmap
    threshold at 128 KB. The CLI and the app call this before timing anything.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):        # not glibc: nothing to tune
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))) and \
        bool(mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_MMAP_THRESHOLD_MAX)))
