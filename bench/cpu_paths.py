"""The engine's CPU paths, each measured as a ratio against its baseline in the same process.

    python -m bench.cpu_paths                 → bench/cpu-paths.json and its section in bench/RESULTS.md
    python -m bench.cpu_paths --quick         # a smoke run (fewer repeats, smaller workloads)

Random checkpoint (bench/checkpoints.py): hidden 384, 6 layers, the tiny fixture's tokenizer, float32.
Every comparison alternates its cases A/B/A/B… in one process and reports medians, because the
machine these figures come from is shared (2 cores, other people's test suites running).
"Throttled" is the engine's OpenMP setting (``throttle_openmp_spin``: idle OpenMP threads spin 100
times, not 300,000); "spin 300k" is libgomp's default, i.e. the engine before this change.

1. **main thread vs worker thread** (issue 11): the same ``embed_many`` on the main thread and on a
   fresh ``threading.Thread``, with libgomp's default spinning and with the engine's throttle;
2. **attention**, op level: every way tried to batch the per-text SDPA calls (runs of equal-length
   texts as views, length buckets padded with a mask, one padded call, a block-diagonal mask over the
   packed row, nested jagged tensors) against one call per text; then engine level: ``runs`` (the
   engine's) vs ``per_text`` (the old path) over whole passes at 64×128, 16×512, 4×2048 (half the
   texts L/2, five tasks), 2,048 tiny texts and 256 texts of 10–60 tokens;
3. **thread settings**: one thread vs two (spin 300k) vs two throttled, on the quiet machine and with
   a busy process taking a core; and the local server (``python -m inference.serve``, fresh process
   per setting) under 32 concurrent clients for 20 s, as issue 10 measured it;
4. **allocator**: glibc defaults vs ``keep_freed_memory`` (needs fresh processes: alternating
   child processes, each timing the engine and the padded native model);
5. **vs the original implementation**: the engine as loaded on 256 mixed-length texts vs the native
   padded model (bench/engine_speed.py's baseline) at torch's default threads, plus the engine with
   ``JV3_DTYPE=bfloat16``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.checkpoints import MID, make_released_checkpoint
from bench.engine_speed import native_padded, workload
from inference import cpu_runtime
from inference.engine import Engine, Sequence
from inference.model import equal_length_runs, per_text_attention, runs_attention
from inference.request import EmbedRequest
from inference.settings import TASKS, Settings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "cpu-paths.json"
TINY = ROOT / "fixtures" / "jina-v3-tiny"
VOCAB = 277  # the fixture tokenizer's, so that real texts tokenise
WORDS = ("the quick brown fox jumps over lazy dog rabbit white follow sigue al conejo blanco "
         "embedding search passage query retrieval model vector").split()  # fmt: skip


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(8, 48))) for _ in range(n)]


def lengths_workload(lengths: list[int], seed: int = 0) -> list[Sequence]:
    rng = np.random.default_rng(seed)
    return [Sequence(TASKS[i % len(TASKS)], [0, *rng.integers(5, VOCAB, n - 2).tolist(), 2], np.full(n, i, dtype=np.int64))
            for i, n in enumerate(lengths)]  # fmt: skip


def measure(fn) -> dict:
    """Wall and CPU seconds of one call (CPU: this process, all threads)."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": wall, "cpu": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, "sys": r1.ru_stime - r0.ru_stime,
            "faults": r1.ru_minflt - r0.ru_minflt}  # fmt: skip


def alternate(cases: dict, reps: int, *, warm: int = 1) -> dict:
    """Run every case in turn, ``reps`` rounds (after ``warm`` untimed ones); medians per case."""
    for _ in range(warm):
        for fn in cases.values():
            fn()
    runs: dict[str, list] = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            runs[k].append(measure(fn))
    return {k: {m: statistics.median(r[m] for r in v) for m in v[0]} | {"walls": [r["wall"] for r in v]} for k, v in runs.items()}


def on_fresh_thread(fn):
    def run():
        errors = []
        t = threading.Thread(target=lambda: _guard(fn, errors))
        t.start()
        t.join()
        if errors:
            raise errors[0]

    return run


def _guard(fn, errors):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
        errors.append(exc)


def spin_300k(engine: Engine, fn):
    """Run ``fn`` with libgomp's default spinning: the engine's throttle released for the call."""

    def run():
        cpu_runtime.release_openmp_throttle()
        try:
            fn()
        finally:
            cpu_runtime.throttle_openmp_spin(engine.threads)

    return run


def with_threads(engine: Engine, n: int, fn):
    def run():
        saved = engine.threads
        engine.threads = n  # the engine sets it on the calling thread in each call; native_padded does not
        torch.set_num_threads(n)
        try:
            fn()
        finally:
            engine.threads = saved
            torch.set_num_threads(saved)

    return run


def with_attention(engine: Engine, mode: str, fn):
    def run():
        saved = engine.model.attention
        engine.model.attention = mode
        try:
            fn()
        finally:
            engine.model.attention = saved

    return run


def busy(fn, processes: int = 1):
    """Run ``fn`` while ``processes`` busy-looping processes each take a core."""

    def run():
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
        time.sleep(0.2)
        try:
            fn()
        finally:
            for p in procs:
                p.kill()
                p.wait()

    return run


def run_engine(engine: Engine, seqs: list[Sequence]):
    return lambda: engine._run(seqs, len(seqs))


# ---------------------------------------------------------------------------------------------
# 1. main thread vs worker thread


def main_vs_thread(engine: Engine, reps: int, n_texts: int) -> dict:
    tasks = ("retrieval.query", "retrieval.passage", "text-matching", "classification")
    requests = [EmbedRequest(texts=texts(32, i), task=tasks[i % 4]) for i in range(max(1, n_texts // 32))]

    def call():
        engine.embed_many(requests)

    n = engine.threads
    base = {f"spin 300k, {n} threads: main thread": spin_300k(engine, call),
            f"spin 300k, {n} threads: fresh worker thread": spin_300k(engine, on_fresh_thread(call)),
            f"throttled, {n} threads: main thread": call,
            f"throttled, {n} threads: fresh worker thread": on_fresh_thread(call)}  # fmt: skip
    out = {"texts": len(requests) * 32, "cases": {}, "ratios": {}}
    for load, cases in (("quiet", base), ("one core busy", {k: busy(f) for k, f in base.items()})):
        res = alternate(cases, reps)
        w = [v["wall"] for v in res.values()]
        out["cases"] |= {f"{k} ({load})": v for k, v in res.items()}
        out["ratios"] |= {f"{load}, spin 300k: main ÷ worker thread (time)": w[0] / w[1],
                          f"{load}, throttled: main ÷ worker thread (time)": w[2] / w[3],
                          f"{load}, main thread: spin 300k ÷ throttled (speed-up of the fix)": w[0] / w[2]}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# 2. attention


def _bounds(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).tolist()


def _gather_plan(lengths, groups):
    """Per group of texts: token indices padded to the group's longest, key mask, rows to keep."""
    lengths = np.asarray(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    plan = []
    for g in groups:
        g = np.asarray(g)
        width = int(lengths[g].max())
        valid = np.arange(width)[None, :] < lengths[g][:, None]
        idx = np.where(valid, starts[g][:, None] + np.arange(width)[None, :], starts[g][:, None])
        same = bool(valid.all())
        flat = torch.from_numpy(idx.reshape(-1))
        keep = None if same else torch.from_numpy(np.flatnonzero(valid.reshape(-1)))
        plan.append((flat, len(g), width, None if same else torch.from_numpy(valid)[:, None, None, :], keep,
                     flat if same else flat[keep]))  # fmt: skip
    return plan


def _gathered(q, k, v, plan):
    heads, dim = q.shape[1], q.shape[3]
    qt, kt, vt = (t[0].transpose(0, 1) for t in (q, k, v))  # (tokens, heads, d)
    out = q.new_empty(q.shape[2], heads, dim)
    for flat, n, width, mask, keep, dest in plan:
        g = [t.index_select(0, flat).view(n, width, heads, dim).transpose(1, 2) for t in (qt, kt, vt)]
        o = F.scaled_dot_product_attention(*g, attn_mask=mask).transpose(1, 2).reshape(n * width, heads, dim)
        out.index_copy_(0, dest, o if keep is None else o.index_select(0, keep))
    return out[None]


def _buckets(lengths, slack=1.25):
    """Longest first; a text joins the bucket while padded work (n·L²) stays within ``slack`` of the real."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    groups, cur, width, real = [], [], 0, 0
    for i in order:
        n = int(lengths[i])
        if cur and (len(cur) + 1) * width * width > slack * (real + n * n):
            groups.append(cur)
            cur, real = [], 0
        if not cur:
            width = n
        cur.append(int(i))
        real += n * n
    return groups + [cur]


logging.getLogger("torch.nested._internal.sdpa").setLevel(logging.ERROR)  # its "no backend" explanation, once per shape


def _attention_methods(lengths: list[int], heads: int, dim: int) -> tuple[dict, dict, int]:
    """Every attention method over one packed row of ``lengths`` (one layer's q/k/v, random)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, sum(lengths), 3, heads, dim, generator=g)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # the model's layout
    bounds, runs = _bounds(lengths), equal_length_runs(lengths)
    buckets = _gather_plan(lengths, _buckets(lengths))
    one = _gather_plan(lengths, [list(range(len(lengths)))])
    methods = {
        "per_text": lambda: per_text_attention(q, k, v, bounds),
        "runs (views, no mask)": lambda: runs_attention(q, k, v, runs),
        "length buckets, padded + mask": lambda: _gathered(q, k, v, buckets),
        "one padded call + mask": lambda: _gathered(q, k, v, one),
    }
    if sum(lengths) <= 9000:
        seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        mask = seg[:, None] == seg[None, :]
        methods["block-diagonal mask, one call"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    notes = {"runs": len(runs), "buckets": len(buckets)}
    try:
        nested = [torch.nested.nested_tensor([t[0, :, s:e] for s, e in zip(bounds[:-1], bounds[1:], strict=True)], layout=torch.jagged)
                  for t in (q, k, v)]  # fmt: skip
        F.scaled_dot_product_attention(*nested)
        notes["nested jagged"] = "ran (not timed)"
    except RuntimeError as exc:
        notes["nested jagged"] = f"not available on CPU ({str(exc).splitlines()[0][:80].rstrip('.')})"
    return methods, notes, len(runs)


def attention_ops(reps: int, shapes: dict[str, list[int]], heads: int = 6, dim: int = 64) -> dict:
    """One layer's attention, every method on the same q/k/v, at the engine's threads (throttled)."""
    out = {}
    for name, lengths in shapes.items():
        methods, notes, _ = _attention_methods(sorted(lengths, reverse=True), heads, dim)  # as the engine packs one task
        ref = methods["per_text"]()
        row = {"texts": len(lengths), "tokens": sum(lengths)} | notes
        row["max_abs_diff"] = {m: float((fn() - ref).abs().max()) for m, fn in methods.items()}
        res = alternate(methods, reps)
        base = res["per_text"]["wall"]
        row["ms"] = {m: r["wall"] * 1e3 for m, r in res.items()}
        row["speedup_vs_per_text"] = {m: base / r["wall"] for m, r in res.items()}
        out[name] = row
        print("attention op", name, json.dumps(row["speedup_vs_per_text"]), flush=True)
    return out


def attention_engine(engine: Engine, reps: int, shapes: dict[str, list[int]]) -> dict:
    out = {}
    for name, lengths in shapes.items():
        seqs = lengths_workload(lengths)
        row = {"texts": len(lengths), "tokens": sum(lengths)}
        for label, n in (("1 thread", 1), (f"{engine.threads} threads, throttled", engine.threads)):
            cases = {"per_text": with_threads(engine, n, with_attention(engine, "per_text", run_engine(engine, seqs))),
                     "runs": with_threads(engine, n, with_attention(engine, "runs", run_engine(engine, seqs)))}  # fmt: skip
            res = alternate(cases, reps)
            row[label] = {"per_text_s": res["per_text"]["wall"], "runs_s": res["runs"]["wall"],
                          "speedup": res["per_text"]["wall"] / res["runs"]["wall"]}  # fmt: skip
        out[name] = row
        print("attention engine", name, json.dumps(row), flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# 3. thread settings


def thread_settings(engine: Engine, reps: int, shapes: dict[str, list[int]]) -> dict:
    out = {}
    n = engine.threads
    for name, lengths in shapes.items():
        seqs = lengths_workload(lengths)
        base = {"1 thread": with_threads(engine, 1, run_engine(engine, seqs)),
                f"{n} threads, spin 300k": spin_300k(engine, run_engine(engine, seqs)),
                f"{n} threads, throttled": run_engine(engine, seqs)}  # fmt: skip
        row = {"tokens": sum(lengths)}
        for load, cases in (("quiet", base), ("one core busy", {k: busy(f) for k, f in base.items()})):
            res = alternate(cases, reps)
            one = res["1 thread"]["wall"]
            row[load] = {k: {"s": r["wall"], "cpu_s": r["cpu"], "speed_vs_1_thread": one / r["wall"]} for k, r in res.items()}
        out[name] = row
        print("threads", name, json.dumps(row), flush=True)
    return out


def served(ckpt: Path, *, clients: int, seconds: float, rounds: int) -> dict:
    """The local server, fresh per setting, under ``clients`` concurrent 4-text requests for ``seconds``."""
    settings = {"1 thread (OMP_NUM_THREADS=1)": {"OMP_NUM_THREADS": "1"},
                "all CPUs, spin 300k (GOMP_SPINCOUNT=300000: the old engine)": {"GOMP_SPINCOUNT": "300000"},
                "all CPUs, throttled (engine default)": {}}  # fmt: skip
    runs: dict[str, list] = {k: [] for k in settings}
    for _ in range(rounds):
        for label, extra in settings.items():
            runs[label].append(_serve_and_load(ckpt, extra, clients, seconds))
            print("served", ckpt.name, label, runs[label][-1], flush=True)
    return {k: {"requests": statistics.median(r["ok"] for r in v), "errors": sum(r["errors"] for r in v), "rounds": [r["ok"] for r in v]}
            for k, v in runs.items()}  # fmt: skip


def _serve_and_load(ckpt: Path, extra: dict, clients: int, seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update({"JV3_DEVICE": "cpu", "JV3_DTYPE": "float32", **extra})
    server = subprocess.Popen([sys.executable, "-m", "inference.serve", "--model-dir", str(ckpt), "--port", "0"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)  # fmt: skip
    try:
        port = int(server.stdout.readline().rsplit(":", 1)[1])
        for _ in range(600):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/ping")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        stop = time.time() + seconds
        ok, errors = [0] * clients, [0] * clients

        def client(i: int) -> None:
            conn, k = http.client.HTTPConnection("127.0.0.1", port, timeout=120), 0
            while time.time() < stop:
                body = json.dumps({"data": texts(4, i * 100_000 + k), "parameters": {"task": "text-matching"}})
                k += 1
                try:
                    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    response.read()
                    if response.status != 200:
                        errors[i] += 1
                    elif time.time() < stop:
                        ok[i] += 1
                except (OSError, http.client.HTTPException):
                    errors[i] += 1
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

        pool = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return {"ok": sum(ok), "errors": sum(errors)}
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# 4. allocator


def allocator(ckpt: Path, rounds: int, quick: bool) -> dict:
    """Alternate fresh child processes: glibc defaults vs the engine's allocator setting."""
    runs: dict[str, list] = {"glibc default": [], "keep_freed_memory": []}
    for _ in range(rounds):
        for mode in runs:
            cmd = [sys.executable, "-m", "bench.cpu_paths", "--allocator-child", mode, "--ckpt", str(ckpt)] + (["--quick"] if quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if not line:
                raise RuntimeError(proc.stderr[-3000:])
            runs[mode].append(json.loads(line[-1]))
            print("allocator", mode, line[-1], flush=True)
    summary = {}
    for mode, rs in runs.items():
        summary[mode] = {f"{who}_{m}": statistics.median(r[who][m] for r in rs) for who in ("engine", "native") for m in ("wall", "cpu", "sys", "faults")}
        summary[mode]["maxrss_mb"] = statistics.median(r["maxrss_mb"] for r in rs)
    d, t = summary["glibc default"], summary["keep_freed_memory"]
    summary["ratios"] = {"engine CPU s, default ÷ kept": d["engine_cpu"] / t["engine_cpu"],
                         "engine wall, default ÷ kept": d["engine_wall"] / t["engine_wall"],
                         "native CPU s, default ÷ kept": d["native_cpu"] / t["native_cpu"]}  # fmt: skip
    summary["runs"] = runs
    summary["texts"] = 64 if quick else 256
    return summary


def allocator_child(mode: str, ckpt: Path, quick: bool) -> None:
    if mode == "glibc default":
        cpu_runtime._allocator_tuned = False  # as if already decided: leave glibc alone
    engine = Engine.load(ckpt, Settings.resolve(device="cpu", dtype="float32"))
    seqs = workload(64 if quick else 256, 128, VOCAB, mixed_lengths=True, tasks=TASKS)
    res = alternate({"engine": run_engine(engine, seqs), "native": native_padded(engine, seqs, "text-matching", mask=True)}, 2 if quick else 3)
    print(json.dumps({k: {m: v[m] for m in ("wall", "cpu", "sys", "faults")} for k, v in res.items()}
                     | {"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tuned": cpu_runtime._allocator_tuned}))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 5. versus the original implementation


def versus_original(engine: Engine, ckpt: Path, reps: int, n: int) -> dict:
    seqs = workload(n, 128, VOCAB, mixed_lengths=True, tasks=TASKS)
    real = sum(len(s.ids) for s in seqs)
    engine16 = Engine.load(ckpt, Settings.resolve(device="cpu", dtype="bfloat16"))
    native = native_padded(engine, seqs, "text-matching", mask=True)
    cases = {
        f"native padded, {engine.threads} threads, spin 300k (as shipped)": spin_300k(engine, native),
        f"native padded, {engine.threads} threads, throttled": native,
        "native padded, 1 thread": with_threads(engine, 1, native),
        "engine float32 (as loaded)": run_engine(engine, seqs),
        "engine bfloat16 (JV3_DTYPE=bfloat16)": run_engine(engine16, seqs),
    }
    res = alternate(cases, reps)
    w = {k: v["wall"] for k, v in res.items()}
    keys = list(w)
    best_native = min(w[k] for k in keys[:3])
    a, _ = engine._run(seqs, len(seqs))
    b, _ = engine16._run(seqs, len(seqs))
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {
        "texts": n, "real_tokens": real, "cases": res,
        "tokens_per_s": {k: real / t for k, t in w.items()},
        "ratios": {
            "engine float32 ÷ native as shipped": w[keys[0]] / w[keys[3]],
            "engine float32 ÷ the fastest native setting": best_native / w[keys[3]],
            "engine bfloat16 ÷ native as shipped": w[keys[0]] / w[keys[4]],
            "engine bfloat16 ÷ the fastest native setting": best_native / w[keys[4]],
        },
        "bf16_vs_fp32_min_cosine": float(cos.min()),
    }  # fmt: skip


def cpu_flags() -> list[str]:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer repeats, smaller workloads")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--no-report", action="store_true", help="do not rewrite bench/RESULTS.md")
    ap.add_argument("--allocator-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.allocator_child:
        return allocator_child(args.allocator_child, Path(args.ckpt), args.quick)
    reps = 2 if args.quick else 3
    shapes = {"64x128": [128 if i % 2 == 0 else 64 for i in range(64)],
              "16x512": [512 if i % 2 == 0 else 256 for i in range(16)],
              "4x2048": [2048 if i % 2 == 0 else 1024 for i in range(4)],
              "2048 tiny (3-5 tokens)": [3 + i % 3 for i in range(2048)],
              "256 x 10-60 tokens": np.random.default_rng(0).integers(10, 61, 256).tolist()}  # fmt: skip
    if args.quick:
        shapes = {"16x128": shapes["64x128"][:16], "4x512": shapes["16x512"][:4], "512 tiny (3-5 tokens)": shapes["2048 tiny (3-5 tokens)"][:512]}
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({', '.join(cpu_flags())}), shared with other work while measured",
        "torch": torch.__version__, "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": os.getloadavg(),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_released_checkpoint(Path(tmp) / "mid", sizes=MID | {"vocab_size": VOCAB}, dtype=torch.float32)
        engine = Engine.load(ckpt, Settings.resolve(device="cpu", dtype="float32"))
        report["engine"] = {"threads": engine.threads, "openmp_throttled": cpu_runtime._throttle is not None,
                            "allocator_tuned": cpu_runtime._allocator_tuned}  # fmt: skip
        report["main_vs_thread"] = main_vs_thread(engine, reps + 1, 32 if args.quick else 64)
        print("main vs thread", json.dumps(report["main_vs_thread"]["ratios"]), flush=True)
        report["attention_ops"] = attention_ops(reps + 2, shapes)
        report["attention"] = attention_engine(engine, reps, shapes)
        threads_shapes = {k: v for k, v in shapes.items() if k in ("64x128", "2048 tiny (3-5 tokens)", "16x128", "512 tiny (3-5 tokens)")}
        report["threads"] = thread_settings(engine, reps, threads_shapes)
        seconds, rounds = (5, 1) if args.quick else (20, 2)
        report["served"] = {"clients": 32, "seconds": seconds, "request": "4 texts of 8-48 words, float JSON"}
        for label, path in (("hidden 384, 6 layers", ckpt), ("tiny fixture (hidden 64, 2 layers)", TINY)):
            report["served"][label] = served(path, clients=32, seconds=seconds, rounds=rounds)
        report["versus_original"] = versus_original(engine, ckpt, reps, 64 if args.quick else 256)
        print("versus original", json.dumps(report["versus_original"]["ratios"]), flush=True)
        report["allocator"] = allocator(ckpt, 1 if args.quick else 2, args.quick)
        print("allocator", json.dumps(report["allocator"]["ratios"]), flush=True)
    report["loadavg_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\n".join(section(report)))
    if not args.no_report and Path(args.out) == OUT:
        from bench import report as results

        results.main()
    return report


def section(r: dict) -> list[str]:
    """The "CPU paths" section of bench/RESULTS.md."""
    e = r["engine"]
    lines = [
        f"Machine: {r['machine']}; torch {r['torch']}; random hidden-384, 6-layer checkpoint, float32 unless said; "
        f"load average {r['loadavg_start'][0]:.1f} at the start, {r['loadavg_end'][0]:.1f} at the end. "
        "**Other work was running on the same 2 cores**, so absolute times are noisy and vary between sections; every "
        "figure is a ratio against its baseline measured alternately in the same process (the allocator and the server: "
        f"alternating fresh processes), medians. Engine as loaded: {e['threads']} intra-op threads, OpenMP spinning "
        f"throttled: {e['openmp_throttled']}, allocator tuned: {e['allocator_tuned']}. \"Spin 300k\" is libgomp's "
        "default (the engine before this change), \"throttled\" the engine's `throttle_openmp_spin`.",
        "",
        f"**Main thread vs worker thread** ({r['main_vs_thread']['texts']} texts of 8–48 words in one `embed_many`):",
        "",
        "| case | median s |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v['wall']:.2f} |" for k, v in r["main_vs_thread"]["cases"].items()]
    lines += [""] + [f"- {k}: **{v:.2f}×**" for k, v in r["main_vs_thread"]["ratios"].items()]

    ops = r["attention_ops"]
    methods = list(next(iter(ops.values()))["speedup_vs_per_text"])
    lines += ["", "**Attention, one layer (6 heads × 64), every method vs one SDPA call per text** (speed-up; >1 is faster; "
              f"at the engine's threads, throttled). Largest difference from per-text over all shapes: "
              f"{max(max(row['max_abs_diff'].values()) for row in ops.values()):.1e}. Nested jagged tensors: "
              f"{next(iter(ops.values()))['nested jagged'].rstrip('.')}.", "",
              "| workload | calls: runs / buckets | " + " | ".join(methods[1:]) + " |",
              "|---|---:|" + "---:|" * (len(methods) - 1)]  # fmt: skip
    for name, row in ops.items():
        cells = [f"{row['speedup_vs_per_text'].get(m, float('nan')):.2f}×" if m in row["speedup_vs_per_text"] else "–" for m in methods[1:]]
        lines.append(f"| {name} | {row['runs']} / {row['buckets']} | " + " | ".join(cells) + " |")
    labels = [k for k in next(iter(r["attention"].values())) if k not in ("texts", "tokens")]
    lines += ["", "**Attention in whole engine passes: `runs` (the engine's) vs `per_text` (the old path)**, five tasks mixed "
              "(speed-up = per-text time ÷ runs time):", "",
              "| workload | tokens | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]  # fmt: skip
    for name, row in r["attention"].items():
        lines.append(f"| {name} | {row['tokens']} | " + " | ".join(f"{row[lab]['speedup']:.2f}×" for lab in labels) + " |")

    settings = list(next(iter(r["threads"].values()))["quiet"])
    lines += ["", "**Thread settings, whole engine passes** (speed vs one thread; >1 is faster; \"one core busy\": a "
              "busy-looping process beside the engine):", "",
              "| workload | load | " + " | ".join(settings) + " |", "|---|---|" + "---:|" * len(settings)]  # fmt: skip
    for name, row in r["threads"].items():
        for load in ("quiet", "one core busy"):
            lines.append(f"| {name} | {load} | " + " | ".join(f"{row[load][s]['speed_vs_1_thread']:.2f}×" for s in settings) + " |")
    s = r["served"]
    lines += ["", f"**The local server under {s['clients']} concurrent clients for {s['seconds']} s** ({s['request']}; "
              "`python -m inference.serve`, a fresh process per setting, alternated; requests answered 200, median of rounds):", "",
              "| checkpoint | setting | requests | rounds | errors |", "|---|---|---:|---|---:|"]  # fmt: skip
    for label in (k for k in s if isinstance(s[k], dict)):
        for setting, v in s[label].items():
            lines.append(f"| {label} | {setting} | {v['requests']:.0f} | {v['rounds']} | {v['errors']} |")

    a = r["allocator"]
    lines += ["", f"**Allocator: glibc defaults vs `keep_freed_memory`** ({a.get('texts', 256)} texts, half 128 and half 64 "
              "tokens; fresh processes alternated, each timing the engine and the native padded model):", "",
              "| | engine wall s | engine CPU s | engine sys s | engine page faults | native CPU s | native page faults | peak RSS MB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for mode in ("glibc default", "keep_freed_memory"):
        m = a[mode]
        lines.append(f"| {mode} | {m['engine_wall']:.2f} | {m['engine_cpu']:.2f} | {m['engine_sys']:.2f} | {m['engine_faults']:,.0f} | "
                     f"{m['native_cpu']:.2f} | {m['native_faults']:,.0f} | {m['maxrss_mb']:.0f} |")  # fmt: skip
    lines += [""] + [f"- {k}: **{v:.2f}×**" for k, v in a["ratios"].items()]
    v = r["versus_original"]
    lines += ["", f"**Versus the original implementation** ({v['texts']} texts, half 128 and half 64 tokens, five tasks; the "
              "baseline is bench/engine_speed.py's native padded model, one task, one padded batch, in the same process, "
              "so it shares the allocator setting; \"as shipped\" = torch's default threads and libgomp's default spinning):",
              "", "| case | real tokens/s |", "|---|---:|"]  # fmt: skip
    lines += [f"| {k} | {t:,.0f} |" for k, t in v["tokens_per_s"].items()]
    lines += [""] + [f"- {k}: **{x:.2f}×**" for k, x in v["ratios"].items()]
    lines += ["", f"bfloat16 vs float32 engine on these texts: min cosine {v['bf16_vs_fp32_min_cosine']:.6f} (random weights); "
              "on the tiny fixture bfloat16 gives min cosine 0.99974 against the golden vectors, under the 0.99999 the "
              "float32 path must meet, so it stays an opt-in (`JV3_DTYPE=bfloat16`), not the CPU default."]  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
