"""pipeline.heap: a replica's heap keeps the buffers a batch frees for the next.

Each case runs in a fresh interpreter, since malloc's settings are the whole process's. The
pattern is a replica's between two batches: the many buffers of one step all freed, then as
many again. glibc's default returns them to the kernel (its trim threshold adapts to twice
the largest buffer, far less than their sum), so every cycle faults their pages in again.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")

CYCLES = """
import ctypes, resource
libc = ctypes.CDLL(None)
# no transparent huge pages (PR_SET_THP_DISABLE): where they are "always" on, a 2 MiB page
# serves 512 small ones with one fault, and the counts below would not tell reuse apart
libc.prctl(41, 1, 0, 0, 0)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
MB = 2**20

def cycle():
    buffers = [libc.malloc(MB) for _ in range(24)]
    for address in buffers:
        ctypes.memset(address, 1, MB)  # touched, as a tensor's buffer is
    for address in buffers:
        libc.free(address)

libc.free(libc.malloc(MB))  # glibc adapts its thresholds to the first freed mapping
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(setup: str) -> int:
    """Minor page faults of five cycles of 24 MB of 1 MB buffers, after `setup` ran."""
    code = textwrap.dedent(setup) + CYCLES
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                            env=_plain_malloc_env())
    return int(result.stdout.split()[-1])


def _plain_malloc_env() -> dict[str, str]:
    """This environment without malloc's own settings, which would change the control's."""
    return {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}


def test_the_default_heap_faults_freed_buffers_in_again():
    # the control: the pattern shows the cost the module is about (24 MB is 6,144 pages a cycle)
    assert page_faults("") > 5 * 4000


def test_kept_freed_memory_is_reused_without_faults():
    faults = page_faults("""
        from pipeline.heap import keep_freed_memory
        assert keep_freed_memory()
    """)
    assert faults < 500


def test_a_replica_sets_up_its_heap_with_its_threads():
    faults = page_faults("""
        from pipeline.runtime.spec import WorkerSpec
        from pipeline.runtime.worker import set_up_process
        spec = WorkerSpec(model="lraspp_mobilenet_v3_large", weights=None, num_classes=3, crf=False, batch_size=1,
                          storage_options={}, threads=1)
        assert str(set_up_process(spec, [], False)) == "cpu"
    """)
    assert faults < 500


def test_buffers_over_the_mapping_threshold_still_go_back_at_once():
    # buffers over the threshold (a large raster block's float pixels) must not stay in the heap
    code = textwrap.dedent("""
        import ctypes, resource
        from pipeline.heap import MMAP_BYTES, keep_freed_memory
        assert keep_freed_memory()
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize()

        before = rss()
        address = libc.malloc(2 * MMAP_BYTES)
        ctypes.memset(address, 1, 2 * MMAP_BYTES)
        during = rss()
        libc.free(address)
        print(during - before, rss() - before)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                            env=_plain_malloc_env())
    grown, left = map(int, result.stdout.split())
    assert grown >= 60 * 2**20
    assert left < 4 * 2**20
