"""The C heap of a process that segments: freed buffers kept for the next batch.

glibc's malloc returns the top of its heap to the kernel whenever more than its trim
threshold is free there, and serves allocations over its mmap threshold with fresh mappings;
both thresholds start at 128 KiB and adapt. Between two forwards of a replica the CRF, labels
and statistics free and allocate buffers of other sizes, the thresholds move, the forward's
activations (megabytes each) go back to the kernel, and the next forward faults its pages in
again: at one thread, a 480 x 360 frame's forward of DeepLabV3-MobileNetV3 took 22 ms after
the other steps against 18 ms alone, with 7,600 page faults against 2,600 (measured:
BENCHMARKS.md). Fixed thresholds keep freed memory in the heap up to `KEEP_FREE_BYTES` at its
top, and serve only buffers over `MMAP_BYTES` (glibc's largest setting, and larger than any
frame's activations) from mappings that go back at once, so a raster block's large buffers
never stay behind.
"""

from __future__ import annotations

import ctypes

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_BYTES = 32 * 2**20
KEEP_FREE_BYTES = 512 * 2**20


def keep_freed_memory() -> bool:
    """Fix this process's malloc thresholds as the module says; whether it could (glibc only:
    other C libraries' allocators are left as they are)."""
    libc = ctypes.CDLL(None)  # the C library the process runs on, whichever it is
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    # mallopt returns 1 on success; the mmap threshold first, since setting either one
    # turns off glibc's adapting of both
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES))
