"""The CPU paths: attention over runs of equal-length texts, OpenMP throttle, threads, allocator, any calling thread.

Correctness only; the speed of each path is measured in bench/cpu_paths.py, never here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from inference import cpu_runtime
from inference.cpu_runtime import (
    cpu_threads,
    keep_freed_memory,
    release_openmp_throttle,
    throttle_openmp_spin,
)
from inference.model import equal_length_runs, per_text_attention, runs_attention
from inference.request import EmbedRequest

LENGTHS = {
    "mixed runs": [7, 7, 7, 5, 5, 9, 1, 1, 2, 7],
    "all equal": [4] * 9,
    "all different": [9, 8, 7, 6, 5, 4, 3, 2, 1],
    "one text": [13],
    "many tiny": [3] * 40 + [2] * 30 + [1] * 30,
    "long and short": [300, 300, 150, 150, 2],
}


def _qkv(lengths, *, heads=4, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, sum(lengths), 3, heads, head_dim, generator=g)
    # The layout the model hands over: (1, heads, tokens, head_dim) views of (1, tokens, heads, head_dim).
    return tuple(x[:, :, i].transpose(1, 2) for i in range(3))


def _bounds(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).tolist()


def test_equal_length_runs_cover_the_row_in_order():
    runs = equal_length_runs([7, 7, 7, 5, 5, 9, 1, 1, 2, 7])
    assert runs == [(0, 21, 3, 7), (21, 31, 2, 5), (31, 40, 1, 9), (40, 42, 2, 1), (42, 44, 1, 2), (44, 51, 1, 7)]
    assert equal_length_runs([4] * 9) == [(0, 36, 9, 4)]
    assert equal_length_runs([]) == []


@pytest.mark.parametrize("case", sorted(LENGTHS))
def test_runs_attention_equals_per_text_attention(case):
    lengths = LENGTHS[case]
    q, k, v = _qkv(lengths)
    ours = runs_attention(q, k, v, equal_length_runs(lengths), scaling=0.25)
    ref = per_text_attention(q, k, v, _bounds(lengths), scaling=0.25)
    assert ours.shape == ref.shape == (1, sum(lengths), 4, 16)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def _forward(engine, ids, lengths, tasks, attention):
    previous = engine.model.attention
    engine.model.attention = attention
    try:
        return engine.model.forward_packed(torch.tensor(ids), lengths, tasks)
    finally:
        engine.model.attention = previous


def test_packed_forward_with_runs_equals_per_text(engine, golden):
    """Whole model, mixed tasks, runs that cross task segments: the grouped path equals the reference."""
    encodings = engine.tokenizer.encode_batch(golden["texts"][:5] + ["a b c", "d e f", "g h i", "x"])
    seqs = sorted((e.ids for e in encodings), key=len, reverse=True)
    tasks = ["retrieval.query"] * 3 + ["text-matching"] * (len(seqs) - 3)  # texts of one task adjacent
    lengths = [len(s) for s in seqs]
    assert len(equal_length_runs(lengths)) < len(lengths)  # some texts do share a call
    ids = [i for s in seqs for i in s]
    ours = _forward(engine, ids, lengths, tasks, "runs")
    ref = _forward(engine, ids, lengths, tasks, "per_text")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_main_thread_and_worker_thread_give_the_same_vectors_and_threads(engine, golden):
    requests = [EmbedRequest(texts=golden["texts"], task="text-matching"), EmbedRequest(texts=["a", "b c", "d e f"], task="classification")]
    on_main = engine.embed_many(requests)
    box: dict = {}

    def work():
        torch.set_num_threads(max(2, engine.threads or 1) + 1)  # a thread whose OpenMP team is not the engine's
        box["results"] = engine.embed_many(requests)
        box["threads"] = torch.get_num_threads()

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    torch.set_num_threads(engine.threads)
    for a, b in zip(on_main, box["results"], strict=True):
        np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=0, atol=1e-6)
    assert box["threads"] == engine.threads  # the engine set its own team on the calling thread


def test_cpu_engine_keeps_torchs_team(engine, monkeypatch):
    assert engine.threads is not None and engine.threads >= 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # OMP_NUM_THREADS, or set before the load
    assert cpu_threads() == 3


def _throttle_threads():
    return [t for t in threading.enumerate() if t.name == cpu_runtime.THROTTLE_THREAD]


def test_openmp_spin_is_throttled_once_for_a_multithreaded_cpu_engine(engine):
    if engine.threads <= 1 or cpu_runtime._libgomp() is None or os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT"):
        pytest.skip("no OpenMP fork/join to throttle here")
    assert cpu_runtime._throttle is not None and cpu_runtime._throttle.is_alive()
    assert len(_throttle_threads()) == 1
    assert throttle_openmp_spin(engine.threads) is True  # already in effect: no second pool
    assert len(_throttle_threads()) == 1


def test_vectors_do_not_depend_on_the_openmp_throttle(engine, golden):
    request = [EmbedRequest(texts=golden["texts"], task="retrieval.passage")]
    throttled = engine.embed_many(request)[0].embeddings
    release_openmp_throttle()
    try:
        assert not _throttle_threads() or not any(t.is_alive() for t in _throttle_threads())
        spinning = engine.embed_many(request)[0].embeddings
    finally:
        throttle_openmp_spin(engine.threads)
    np.testing.assert_allclose(throttled, spinning, rtol=0, atol=1e-6)


def test_throttle_is_skipped_when_the_operator_chose_or_one_thread(monkeypatch):
    monkeypatch.setattr(cpu_runtime, "_throttle", None)
    assert throttle_openmp_spin(1) is False
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    assert throttle_openmp_spin(2) is False
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert throttle_openmp_spin(2) is False
    assert cpu_runtime._throttle is None


def test_allocator_is_left_alone_when_the_operator_tuned_it(monkeypatch):
    monkeypatch.setattr(cpu_runtime, "_allocator_tuned", None)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert keep_freed_memory() is False
    monkeypatch.setattr(cpu_runtime, "_allocator_tuned", None)
    monkeypatch.delenv("MALLOC_MMAP_MAX_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert keep_freed_memory() is False


def test_allocator_setting_is_applied_once_and_large_blocks_still_work(engine):
    if sys.platform.startswith("linux"):
        assert cpu_runtime._allocator_tuned in (True, False)  # decided once, at the first CPU load
    first = keep_freed_memory()
    assert keep_freed_memory() is first
    for _ in range(3):  # blocks far over glibc's 32 MB mmap limit, allocated and freed repeatedly
        big = torch.ones(96 << 20, dtype=torch.uint8)
        assert int(big[-1]) == 1
        del big


KEPT_THEN_RETURNED = """
import numpy as np
from inference.cpu_runtime import keep_freed_memory, return_freed_memory

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

assert keep_freed_memory() is True
before = rss_mib()
block = np.ones(256 << 20, dtype=np.uint8)  # 256 MiB from the heap (no mmap under keep_freed_memory)
del block
kept = rss_mib()
assert return_freed_memory() is True
print(before, kept, rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_stays_resident_until_it_is_returned():
    """GIVEN the engine's allocator setting (freed memory kept, for the next batch's speed)
    WHEN 256 MiB is allocated and freed, and then ``return_freed_memory`` runs
    THEN the freed memory stayed resident until then, and left with it (the idle server's trim)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", KEPT_THEN_RETURNED], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, kept, returned = map(float, out.stdout.split())
    assert kept - before > 200, f"the freed block was not kept: RSS {before:.0f} -> {kept:.0f} MiB"
    assert kept - returned > 200, f"the kept block was not returned: RSS {kept:.0f} -> {returned:.0f} MiB"


def test_returning_memory_is_a_no_op_where_the_allocator_was_left_alone(monkeypatch):
    monkeypatch.setattr(cpu_runtime, "_allocator_tuned", False)
    assert cpu_runtime.return_freed_memory() is False
