"""Does the local endpoint's memory level off? The same load, round after round, and its RSS after each.

    python -m bench.memory_plateau                      → bench/RESULTS-memory.md
    python -m bench.memory_plateau --rounds 6 --no-write

The soak (bench/soak.py) saw the server's RSS rise for ten minutes under a random mix, which cannot
tell a leak from memory kept on purpose: the engine asks glibc to keep freed memory
(``keep_freed_memory``: no ``mmap`` for large blocks, no trimming under 1 GiB), so resident memory
follows the heap's high-water mark, which a random mix keeps raising as rarer, larger
coincidences of requests arrive. Here every round sends the very same requests, from the same
clients in the same order (the soak's pool from a fixed seed: its medium requests, some small ones
and its four near-limit requests at the caps), and the server's RSS is read once the round is over
and the server idle. A leak grows the same amount every round; kept memory reaches its level within
a few rounds and stays. The verdict compares the growth over the second half of the rounds with
the first round's. (Since the server hands kept memory back once its batchers have been idle for
``IDLE_TRIM_S``, RSS is read ``--settle-s`` after a round, past that: the peak column still shows
the kept heap at work.)

The same rounds then run against a second server whose malloc is left at glibc's behaviour
(``MALLOC_TOP_PAD_`` set to its default, 128 KiB: an operator's malloc setting, so the engine's
``keep_freed_memory`` stands aside): freed memory is returned there, so its RSS after a round is
what the process still holds. Growth in both is a leak; growth only in the first is kept memory.

Last (``--python-heap``), the same rounds against the server run in this process, under
``tracemalloc``: the Python objects still allocated after each round (after a garbage collection),
which a leak of requests, jobs, answers or connections would make grow. Native memory (torch,
tokenizers, glibc) is not traced there: the two servers above show it.

The server runs as users start it (``python -m inference.serve``, JV3_DEVICE=cpu, JV3_DTYPE=float32),
on the tiny fixture by default (the serving path is what allocates per request; the soak's reasons).
"""

from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.checkpoints import FIXTURE
from bench.sections import replace_section
from bench.serving import LocalServer, handle_stop_signals, machine
from bench.soak import build_pool
from inference.protocol import Limits
from inference.settings import Settings

OUT_MD = Path(__file__).resolve().parent / "RESULTS-memory.md"
HEADING = "## Memory: the same load, round after round (bench/memory_plateau.py)"
CLIENT_TIMEOUT_S = 300


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, VmHWM of the server, in KiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon", "VmHWM")}


def round_plan(seed: int, clients: int, small: int) -> list[list]:
    """The requests of one round, dealt to ``clients`` lists (the same every round)."""
    settings = Settings.resolve(device="cpu", dtype="float32")
    hidden = 64  # the tiny fixture's; only the dimensions drawn depend on it
    pool = build_pool(seed, Limits.of(settings), settings, hidden)
    specs = pool["near_limit"] + pool["medium"] + pool["small"][:small]
    plan: list[list] = [[] for _ in range(clients)]
    for i, spec in enumerate(specs):
        plan[i % clients].append(spec)
    return plan


def run_round(port: int, plan: list[list]) -> tuple[int, list[str]]:
    """Every client's requests, the clients at once; (answers 200, anything else)."""
    ok, problems, lock = [0], [], threading.Lock()

    def client(specs: list) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
        try:
            for spec in specs:
                conn.request("POST", spec.path, spec.body, {"Content-Type": spec.content_type, "Accept": "*/*"})
                response = conn.getresponse()
                response.read()
                with lock:
                    if response.status == spec.expect:
                        ok[0] += 1
                    else:
                        problems.append(f"{spec.name}: {response.status}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(specs,), daemon=True) for specs in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ok[0], problems


# glibc's own default for M_TOP_PAD: naming it is an operator's malloc setting, which keep_freed_memory respects
GLIBC_DEFAULTS = {"MALLOC_TOP_PAD_": "131072"}
VARIANTS = {"engine default (freed memory kept)": {}, "glibc's behaviour (freed memory returned)": GLIBC_DEFAULTS}


def measure(args) -> dict:
    plan = round_plan(args.seed, args.clients, args.small)
    results = {name: measure_variant(args, plan, env, name) for name, env in VARIANTS.items()}
    if args.python_heap:
        results["python_heap"] = python_heap(args, plan)
    return results


def python_heap(args, plan: list[list]) -> list[dict]:
    """The rounds against an in-process server, traced by tracemalloc: Python bytes held after each round."""
    import gc
    import tracemalloc

    from inference.engine import Engine
    from inference.serve import EndpointServer

    settings = Settings.resolve(device="cpu", dtype="float32")
    server = EndpointServer(("127.0.0.1", 0), [Engine.load(args.model_dir, settings=settings)], settings)
    threading.Thread(target=server.serve_forever, name="plateau-server", daemon=True).start()
    rounds = []
    tracemalloc.start()
    try:
        for r in range(args.rounds):
            ok, problems = run_round(server.server_address[1], plan)
            time.sleep(args.settle_s)
            gc.collect()
            held, peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            rounds.append({"round": r + 1, "ok": ok, "problems": problems, "held": held, "peak": peak})
            print(f"[python heap, round {r + 1}/{args.rounds}] {held / 2**20:.2f} MiB held, {peak / 2**20:.0f} MiB "
                  f"at the round's peak", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        tracemalloc.stop()
        server.shutdown()
        server.server_close()
    return rounds


def measure_variant(args, plan: list[list], env: dict, name: str) -> dict:
    rounds = []
    with tempfile.TemporaryDirectory(prefix="jv3-plateau-") as tmp:
        with LocalServer(Path(args.model_dir), Path(tmp) / "server.log", env=env) as server:
            ready = status_kib(server.pid)
            for r in range(args.rounds):
                started = time.perf_counter()
                ok, problems = run_round(server.port, plan)
                wall = time.perf_counter() - started
                time.sleep(args.settle_s)  # idle: nothing in flight holds memory when RSS is read
                kib = status_kib(server.pid)
                rounds.append({"round": r + 1, "wall_s": wall, "ok": ok, "problems": problems, **kib})
                print(f"[{name}, round {r + 1}/{args.rounds}] {wall:.1f} s, {ok} answered as expected, "
                      f"{len(problems)} not; RSS {kib['VmRSS'] / 1024:.0f} MiB", file=sys.stderr, flush=True)  # fmt: skip
    requests = sum(len(specs) for specs in plan)
    return {"ready": ready, "rounds": rounds, "requests_per_round": requests, "clients": args.clients}


def verdict(result: dict, key: str = "VmRSS") -> tuple[str, float, float]:
    """(verdict, MiB gained in round 1, MiB per round over the second half) of ``key`` (RSS or peak RSS)."""
    rss = [r[key] / 1024 for r in result["rounds"]]
    first = rss[0] - result["ready"][key] / 1024
    tail = rss[len(rss) // 2 - 1 :]
    slope = float(np.polyfit(np.arange(len(tail)), tail, 1)[0]) if len(tail) > 1 else 0.0
    level = "levels off" if slope <= max(0.02 * first, 1.0) else "keeps growing"
    return level, first, slope


def report(results: dict, info: dict, args) -> str:
    some = next(iter(results.values()))
    lines = [
        HEADING, "",
        f"Run {info['date']}. Machine: {info['cpu']}, {info['usable_cores']} usable cores, shared with other jobs; "
        f"Python {info['python']}, torch {info['torch']}. Checkpoint: `{Path(args.model_dir).name}`. Each round: the same "
        f"{some['requests_per_round']} requests from {some['clients']} clients at once (the soak's pool, seed "
        f"{args.seed}: its 4 near-limit requests at the caps, its medium requests, {args.small} small ones); RSS read "
        f"{args.settle_s:g} s after the round, the server idle. Two servers, one after the other: the engine's default "
        f"malloc settings, and glibc's behaviour (`MALLOC_TOP_PAD_={GLIBC_DEFAULTS['MALLOC_TOP_PAD_']}`, its default "
        "value, which makes the engine leave malloc alone).", "",
    ]  # fmt: skip
    heap = results.pop("python_heap", None)
    for name, result in results.items():
        lines += [
            f"**{name}**", "",
            "| round | wall s | answered as expected | other answers | RSS MiB | of it anonymous MiB | peak RSS MiB |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| ready | – | – | – | {result['ready']['VmRSS'] / 1024:.0f} | {result['ready']['RssAnon'] / 1024:.0f} | "
            f"{result['ready']['VmHWM'] / 1024:.0f} |",
        ]  # fmt: skip
        for r in result["rounds"]:
            lines.append(f"| {r['round']} | {r['wall_s']:.1f} | {r['ok']} | {len(r['problems'])} | {r['VmRSS'] / 1024:.0f} | "
                         f"{r['RssAnon'] / 1024:.0f} | {r['VmHWM'] / 1024:.0f} |")  # fmt: skip
        level, first, slope = verdict(result)
        peak_level, peak_first, peak_slope = verdict(result, "VmHWM")
        problems = sorted({p for r in result["rounds"] for p in r["problems"]})
        lines += [
            "",
            f"RSS after a round **{level}**: the first round added {first:.0f} MiB; over the second half of the rounds it "
            f"moved {slope:+.1f} MiB a round. Peak RSS {peak_level} ({peak_first:+.0f} MiB in the first round, "
            f"{peak_slope:+.1f} MiB a round over the second half). "
            + (f"Unexpected answers: {'; '.join(problems[:5])}." if problems else "Every answer was the expected one."),
            "",
        ]  # fmt: skip
    if heap:
        lines += [
            "**Python objects held after each round** (the same rounds against a server in the bench's own process, "
            "traced by `tracemalloc`, after a garbage collection; its clients share that process's GIL, so its "
            "timeouts, if any, are the bench's):", "",
            "| round | answered as expected | other answers | Python MiB held after the round | Python MiB at the round's peak |",
            "|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for r in heap:
            lines.append(f"| {r['round']} | {r['ok']} | {len(r['problems'])} | {r['held'] / 2**20:.2f} | {r['peak'] / 2**20:.0f} |")
        lines.append("")
    lines += [
        "'Levels off': a least-squares slope over the second half of the rounds under 2 % of the first round's gain "
        "or 1 MiB.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="rounds of the same load (default 12)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in a round (default 16)")
    parser.add_argument("--small", type=int, default=64, help="small requests in a round besides the medium and near-limit ones")
    parser.add_argument("--seed", type=int, default=1, help="the soak pool's seed")
    parser.add_argument("--settle-s", type=float, default=4.0,
                        help="idle seconds before RSS is read (default 4: past the server's IDLE_TRIM_S, 2 s)")
    parser.add_argument("--model-dir", default=str(FIXTURE), help="checkpoint (default: the tiny fixture)")
    parser.add_argument("--python-heap", action="store_true", help="also trace the Python heap of an in-process server")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 to tell a level from a trend, got {args.rounds}")
    handle_stop_signals()
    info = machine() | {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    section = report(measure(args), info, args)
    print(section)
    if not args.no_write:
        replace_section(OUT_MD, section, (HEADING,))
        print(f"wrote {OUT_MD}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
