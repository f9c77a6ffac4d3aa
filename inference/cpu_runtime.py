"""The CPU engine's process-wide knobs: intra-op threads, libgomp's idle spinning, glibc's malloc.

Measured in bench/cpu_paths.py (issue 10 item 3, issue 11): set once when a CPU engine loads.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

import torch

log = logging.getLogger("jv3.engine")


def cpu_threads() -> int:
    """Intra-op threads for a CPU engine: torch's team as the process has it (every CPU by default,
    ``OMP_NUM_THREADS``, or ``torch.set_num_threads`` before the load, as the local server does when
    several CPU engines share the cores). Measured on 2 shared cores (bench/cpu_paths.py), the full
    team with OpenMP's spinning throttled (``throttle_openmp_spin``) served 1.5–1.8× the requests of
    one thread with the hidden-384 model and 0.9–1.1× with the tiny one, and one thread was 1.7–1.9×
    slower on a quiet machine: so the team is kept, and its spinning is what changes. On a host whose
    other cores are busy all the time, ``OMP_NUM_THREADS=1`` can still be the better choice."""
    return torch.get_num_threads()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


THROTTLE_THREAD = "jv3-openmp-throttle"
_throttle: threading.Thread | None = None
_throttle_release = threading.Event()


def throttle_openmp_spin(threads: int) -> bool:
    """Make libgomp's idle threads sleep after 100 spins instead of 300,000; True if in effect.

    The cause of issue 11's "2–3× slower on the main thread" and of issue 10's collapse under load.
    torch's parallel ops are OpenMP fork/joins, and while a process's OpenMP threads are no more than
    its CPUs, libgomp's idle team members spin about 300,000 times at every join before they sleep
    (``GOMP_SPINCOUNT``). When anything else wants a core (handler threads, the tokenizer, TorchServe's
    frontend, a neighbour) a spinning thread holds it, and the next fork or join waits a scheduler
    slice for a descheduled one, per op. Past the CPU count libgomp spins 100 times instead (its
    documented rule for oversubscription). A second thread's OpenMP pool crosses that line, which is
    why the same ``embed_many`` ran 2–3× faster on a ``threading.Thread`` than on the main thread:
    measured, the main thread alone and a worker thread alone are equally slow, and the main thread
    is as fast as a worker thread while another thread holds an idle pool.

    ``OMP_WAIT_POLICY=passive`` or ``GOMP_SPINCOUNT`` would do this at process start, but torch has
    read them by the time the handler runs (TorchServe imports torch first). So this parks one
    daemon thread holding an idle pool of ``cpus - threads + 2`` OpenMP threads (asleep on a futex:
    no CPU) for the life of the process: every team, on whichever thread, then spins 100 times.

    Skipped when the engine runs one thread (no fork/join), when OpenMP is not GNU libgomp, or when the
    operator set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``. Once per process.
    """
    global _throttle
    if _throttle is not None:
        return True
    if threads <= 1 or os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT"):
        return False
    gomp = _libgomp()
    if gomp is None:
        return False
    try:
        parallel = gomp.GOMP_parallel  # GCC ≥ 4.9: GOMP_parallel(fn, data, num_threads, flags)
        noop = ctypes.cast(ctypes.CDLL(None).free, ctypes.c_void_p)  # free(NULL) does nothing
    except (AttributeError, OSError):
        return False
    parallel.argtypes, parallel.restype = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint), None
    pool = max(2, usable_cpus() - threads + 2)
    ready = threading.Event()

    _throttle_release.clear()

    def park() -> None:
        parallel(noop, None, pool, 0)  # this thread now owns an idle pool of `pool` OpenMP threads
        ready.set()
        _throttle_release.wait()  # for the life of the process (bench/cpu_paths.py releases it to compare)

    _throttle = threading.Thread(target=park, name=THROTTLE_THREAD, daemon=True)
    _throttle.start()
    ready.wait(timeout=10)
    log.info("OpenMP: %d intra-op thread(s) on %d CPUs, idle spinning throttled by a parked pool of %d", threads, usable_cpus(), pool)
    return True


def release_openmp_throttle() -> None:
    """End the parked pool (libgomp spins 300,000 times again): for benchmarks that compare both."""
    global _throttle
    if _throttle is not None:
        _throttle_release.set()
        _throttle.join(timeout=10)
        _throttle = None


def _libgomp():
    """The GNU OpenMP runtime torch loaded (the one in this process's memory map), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)  # already loaded: the same instance torch uses
        except OSError:
            continue
    return None


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
_KEEP_FREED_BYTES = 1 << 30
_allocator_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from the heap and keep what is freed; True if applied.

    A CPU forward pass allocates and frees tensors of tens to hundreds of MB per layer. glibc maps
    every block over 32 MB with ``mmap`` and unmaps it on ``free``, and trims the heap top past a
    threshold, so each batch faults its memory in again page by page: about 0.5 million page faults
    and 1–1.4 s of system time per 256 texts at hidden 384; keeping the memory saved 10–16 % of the
    engine's CPU time and 24–30 % of the padded native model's. ``M_MMAP_MAX=0`` and ``M_TRIM_THRESHOLD=1 GiB`` keep that memory
    in the process for the next batch: resident memory stays at its peak (the largest batch's
    working set) instead of falling back between batches.

    ``M_ARENA_MAX=1`` makes every thread allocate from that one kept heap: the local server's batcher
    thread otherwise gets a secondary arena, which trims by its own rule, and faulted 10× the pages of
    the same engine on a main thread (bench/serving.py: 717k vs 69k minor faults per 1,000 vectors at
    hidden 384; 5–12 % more engine CPU). Python's small objects come from its own allocator, so the
    one arena's lock is taken only for large blocks.

    Applied once per process, on glibc only, and never over the operator's own malloc settings
    (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
    ``MALLOC_ARENA_MAX`` or
    ``GLIBC_TUNABLES`` naming ``glibc.malloc``).
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    own = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
    if not sys.platform.startswith("linux") or any(os.environ.get(k) for k in own) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - musl and others have no such symbol: leave them alone
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _allocator_tuned = all(
        [mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES), mallopt(_M_ARENA_MAX, 1)]
    )
    log.info("glibc malloc: one arena, large blocks from the heap, freed memory kept "
             "(M_ARENA_MAX=1, M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB): %s", _allocator_tuned)  # fmt: skip
    return _allocator_tuned


def return_freed_memory() -> bool:
    """Give the memory ``keep_freed_memory`` kept back to the system (glibc's ``malloc_trim(0)``, which
    also releases free pages inside the heap); True if it ran.

    Kept memory is what makes the next batch fast, so this is for the moments when it is worth less
    than the memory: the local server calls it when its batchers have been idle a while, and at most
    every ``TRIM_INTERVAL_S`` under load, so resident memory follows the work instead of the heap's
    high-water mark (bench/memory_plateau.py). A no-op where the allocator was left alone."""
    if not _allocator_tuned:
        return False
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - glibc has it whenever mallopt was applied
        return False
    return True
