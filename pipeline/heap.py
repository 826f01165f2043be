"""The C heap of a process that segments: freed buffers kept for the next batch.

glibc's malloc serves allocations over its mmap threshold with fresh mappings, returned to the
kernel when freed, and returns the top of its main heap to the kernel whenever more than its
trim threshold is free there. Both start at 128 KiB and only rise, as mapped buffers larger
than the threshold are freed (up to 32 MiB; the trim threshold follows at twice the mmap
threshold). A replica's forward frees dozens of buffers of a few megabytes at once, far more
than twice the largest, so after each batch its activations went back to the kernel and the
next forward faulted them in again: at one thread, a 480 x 360 frame's forward of
DeepLabV3-MobileNetV3 took 22 ms after the CRF, labels and statistics, and 17 to 18 ms with
the thresholds fixed as here, with 7,600 page faults against 4,200 (BENCHMARKS.md).

Fixed here: buffers up to `MMAP_BYTES` come from the heap, and up to `KEEP_FREE_BYTES` freed
at the main heap's top stay there. Buffers over `MMAP_BYTES` are still mapped and go back at
once when freed. What stays is bounded by the largest batch's working set: the main heap
keeps at most `KEEP_FREE_BYTES` free, and the arenas of other threads (GDAL's, OpenMP's) keep
their own high-water marks, since a trim threshold over their 64 MiB heaps keeps glibc from
trimming them in part.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# the ceiling of glibc's own adapting: larger buffers are mapped, as by default
MMAP_BYTES = 32 * 2**20
# above the buffers one batch of the light model frees at once (64 MiB was enough, 32 MiB
# was not, measured), with room for larger models and inputs
KEEP_FREE_BYTES = 512 * 2**20


def keep_freed_memory() -> bool:
    """Fix this process's malloc thresholds as the module says; whether it could. glibc on
    Linux only: other C libraries' allocators are left as they are (with another allocator
    preloaded, such as tcmalloc, its own `mallopt` decides what the call does)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library the process runs on, whichever it is
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # musl, whose mallopt does nothing
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # setting either threshold stops glibc's adapting of both, freezing the other where it
    # stands (128 KiB at start): the mmap threshold first, so it is fixed at MMAP_BYTES
    return mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES) == 1
