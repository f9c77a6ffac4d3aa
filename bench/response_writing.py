"""Response writing: the stdlib writer it replaced against orjson from numpy, and what else could write floats.

    python -m bench.response_writing [--runs 9]     → a section of bench/RESULTS-serving.md

The old writer is what ``write_response`` did before commit b8d2610: ``json.dumps`` of ``tolist()``
rows, one base64 call per row (reimplemented here, so that the baseline stays fixed as the code moves
on). Both write the same ``Invocation`` of 1,000 × 1024 unit vectors (float32), alternating old and
new in one process, and the median of ``--runs`` is reported. The new bytes are checked to read back
to the very float32 values.

Then the floor: the bare matrix written by every float formatter that is importable, in the same
process (orjson always; msgspec, yyjson, polars and pyarrow where installed: run it with an
interpreter that has them to compare, e.g. ``PYTHONPATH=. /other/venv/bin/python -m bench.response_writing``),
beside orjson writing as many int8 values (the cost of everything but formatting the floats).
"""

from __future__ import annotations

import argparse
import base64
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import orjson

from bench.sections import replace_section
from inference import protocol
from inference.request import EmbedRequest, EmbedResult

OUT = Path(__file__).resolve().parent / "RESULTS-serving.md"
HEADING = "## Response writing: json.dumps of lists (before b8d2610) vs orjson from numpy (bench/response_writing.py)"
OLD_HEADINGS = ("## Response writing: json.dumps of lists (HEAD) vs orjson from numpy (bench/response_writing.py)",)
N, D = 1000, 1024
GOAL_MS = 20.0
OLD_SOURCE = "the stdlib writer of before b8d2610 (`json.dumps` of `tolist()` rows, one base64 call per row)"


def _old_rows(matrix: np.ndarray, encoding: str) -> list:
    if encoding == "base64":
        return [base64.b64encode(r.astype("<f4").tobytes()).decode("ascii") for r in matrix]
    return matrix.tolist()


def old_writer(invocation, accept, *, model, default_task):
    if accept == protocol.JSONLINES:  # one json.dumps per record line
        lines = []
        for index, (record_id, result) in enumerate(zip(invocation.meta["ids"], invocation.results, strict=True)):
            row = _old_rows(np.asarray(result.embeddings, dtype=np.float32), result.encoding)[0]
            record = {"id": record_id, "index": index, "embedding": row, "tokens": result.total_tokens}
            lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")))
        return ("\n".join(lines) + "\n").encode(), protocol.JSONLINES
    result, request = invocation.results[0], invocation.requests[0]
    matrix = np.asarray(result.embeddings, dtype=np.float32)
    rows = _old_rows(matrix, result.encoding)
    data = [{"index": i, "embedding": row} for i, row in enumerate(rows)]
    body = {"data": data, "usage": {"total_tokens": result.total_tokens}, "model": model,
            "parameters": {"task": request.task or default_task, "dimensions": matrix.shape[1],
                           "embedding_type": result.encoding, "late_chunking": request.late_chunking}}  # fmt: skip
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(), "application/json"


def invocation(vectors: np.ndarray, encoding: str, records: bool) -> tuple[protocol.Invocation, str]:
    """A Jina request of N texts, or N JSON Lines records, completed with ``vectors``."""
    if records:
        requests = [EmbedRequest(texts=[f"text {i}"], ids=[f"r{i}"], encoding=encoding) for i in range(N)]
        inv = protocol.Invocation("jsonlines", list(requests), meta={"ids": [f"r{i}" for i in range(N)]})
        inv.complete([EmbedResult(vectors[i : i + 1], [3], encoding) for i in range(N)])
        return inv, protocol.JSONLINES
    inv = protocol.Invocation("jina", [EmbedRequest(texts=[f"text {i}" for i in range(N)], encoding=encoding)])
    inv.complete([EmbedResult(vectors, [3] * N, encoding)])
    return inv, protocol.JSON


def check(out: bytes, vectors: np.ndarray, encoding: str, records: bool) -> None:
    items = [json.loads(line) for line in out.splitlines()] if records else json.loads(out)["data"]
    rows = [item["embedding"] for item in items]
    if encoding == "base64":
        rows = [np.frombuffer(base64.b64decode(r), "<f4") for r in rows]
    np.testing.assert_array_equal(np.array(rows).astype(np.float32), vectors)


def measure(runs: int) -> tuple[list[tuple], str]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, D)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    old, source = old_writer, OLD_SOURCE
    rows = []
    for label, encoding, records in [("Jina JSON, float", "float", False), ("Jina JSON, base64", "base64", False),
                                     ("JSON Lines records, float", "float", True)]:  # fmt: skip
        inv, accept = invocation(vectors, encoding, records)
        times = {"old": [], "new": []}
        sizes = {}
        for _ in range(runs):  # alternate, so both see the same machine load
            for name, write in (("old", old), ("new", protocol.write_response)):
                started = time.perf_counter()
                out, _ = write(inv, accept, model="jina-embeddings-v3", default_task="text-matching")
                times[name].append(time.perf_counter() - started)
                sizes[name] = len(out)
                if name == "new":
                    check(out, vectors, encoding, records)
        rows.append((label, statistics.median(times["old"]) * 1e3, statistics.median(times["new"]) * 1e3,
                     min(times["new"]) * 1e3, sizes["old"], sizes["new"]))  # fmt: skip
    return rows, source, compare_formatters(vectors, runs)


def _optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def formatters(vectors: np.ndarray) -> list[tuple[str, str, object]]:
    """(name, what its output is, a call writing ``vectors``) for each importable formatter. Only orjson's
    numpy path writes float32's shortest form as JSON; the others are there to show what they would cost."""
    numpy_opt = orjson.OPT_SERIALIZE_NUMPY
    as_int8 = (vectors * 127).astype(np.int8)
    as_f64 = vectors.astype(np.float64)
    out = [
        ("orjson, float32 matrix (what ships)", "JSON, float32 shortest", lambda: orjson.dumps(vectors, option=numpy_opt)),
        ("orjson, int8 matrix of the same shape", "JSON integers: all but the float formatting", lambda: orjson.dumps(as_int8, option=numpy_opt)),
        ("orjson, float64 matrix", "JSON, float64 shortest (longer)", lambda: orjson.dumps(as_f64, option=numpy_opt)),
        ("`tolist()` alone", "Python floats", vectors.tolist),
        ("orjson, `tolist()` then dumps", "JSON, float64 shortest (longer)", lambda: orjson.dumps(vectors.tolist())),
    ]  # fmt: skip
    if msgspec := _optional("msgspec"):
        out.append(("msgspec, `tolist()` then encode", "JSON, float64 shortest (longer)", lambda: msgspec.json.encode(vectors.tolist())))
    if yyjson := _optional("yyjson"):
        out.append(("yyjson, `tolist()` then dumps", "JSON, float64 shortest (longer)", lambda: yyjson.dumps(vectors.tolist())))
    if polars := _optional("polars"):
        series = polars.Series(vectors.ravel())
        out.append(("polars, cast to String", "strings, no JSON yet", lambda: series.cast(polars.String)))
    if (pyarrow := _optional("pyarrow")) and _optional("pyarrow.compute"):
        flat = pyarrow.array(vectors.ravel())
        out.append(("pyarrow, cast to string", "strings, no JSON yet", lambda: pyarrow.compute.cast(flat, pyarrow.string())))
    return out


def versions() -> str:
    found = []
    for name in ["numpy", "orjson", "msgspec", "yyjson", "polars", "pyarrow"]:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def compare_formatters(vectors: np.ndarray, runs: int) -> list[tuple[str, str, float]]:
    """Median ms of each formatter on the bare matrix, alternating them so that all see the same load."""
    calls = formatters(vectors)
    times: dict[str, list[float]] = {name: [] for name, _, _ in calls}
    for run in range(runs):
        shift = run % len(calls)  # each formatter goes first in turn: no order effect (cache, heap) favours one
        for name, _, call in calls[shift:] + calls[:shift]:
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return [(name, kind, statistics.median(times[name]) * 1e3) for name, kind, _ in calls]


def report(rows: list[tuple], source: str, floor: list[tuple[str, str, float]], runs: int) -> str:
    lines = [
        HEADING, "",
        f"{N:,} × {D} unit vectors (float32), written by `write_response`; old: {source}; new: this tree. "
        f"Alternating old/new in one process, median of {runs} runs each. Machine: a shared "
        f"{os.cpu_count()}-core box ({platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"{versions()}); other jobs may run beside it, so absolute times vary between runs; the ratio is the finding.",
        "",
        "| response | old ms | new ms (median) | new ms (best) | speed-up | old bytes | new bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for label, old_ms, new_ms, best_ms, old_bytes, new_bytes in rows:
        lines.append(f"| {label} | {old_ms:.0f} | {new_ms:.1f} | {best_ms:.1f} | {old_ms / new_ms:.0f}× | {old_bytes:,} | {new_bytes:,} |")
    float_ms, old_bytes, new_bytes = rows[0][2], rows[0][4], rows[0][5]
    verdict = "met" if float_ms <= GOAL_MS else "not met on this box"
    lines += [
        "",
        f"Goal ≤ {GOAL_MS:.0f} ms per 1,000 × 1024 floats: {verdict} ({float_ms:.1f} ms median). Float responses are "
        f"{1 - new_bytes / old_bytes:.0%} smaller: float32's shortest form replaces the float64 repr of each "
        "value (`0.1` instead of `0.10000000149011612`). base64 is mostly the base64 encoding itself.",
        "",
        f"**The floor: the bare {N:,} × {D} matrix, no writer around it** (median of {runs}, alternating, same process):",
        "",
        "| formatter | output | ms | ns a value |",
        "|---|---|---:|---:|",
    ]  # fmt: skip
    for name, kind, ms in floor:
        lines.append(f"| {name} | {kind} | {ms:.1f} | {ms * 1e6 / (N * D):.0f} |")
    ships = floor[0][2]
    faster = [f"{name} ({ms:.1f} ms; {kind})" for name, kind, ms in floor[2:] if ms < ships and "JSON" in kind]
    lines += [
        "",
        f"orjson's float32 path alone takes {ships:.1f} ms (the writer {float_ms:.1f} ms), and {ships - floor[1][2]:.1f} ms "
        f"of it is formatting the floats (the int8 matrix of the same shape takes {floor[1][2]:.1f} ms): the goal asks "
        f"for under {GOAL_MS * 1e6 / (N * D):.0f} ns a value in all. "
        + (f"Faster here, but not float32's shortest form: {'; '.join(faster)}. " if faster
           else "No other formatter here is faster. ")
        + "orjson holds the GIL, so threads do not divide the work.",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="runs of each writer (median reported)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    rows, source, floor = measure(args.runs)
    section = report(rows, source, floor, args.runs)
    print(section)
    if not args.no_write:
        replace_section(OUT, section, (HEADING, *OLD_HEADINGS))
        print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
