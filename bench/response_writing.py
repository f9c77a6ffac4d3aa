"""Response writing: the old writer (``json.dumps`` of lists) against the new (orjson from numpy).

    python -m bench.response_writing [--runs 9]     → a section of bench/RESULTS-serving.md

The old writer is ``inference/protocol.py`` and ``inference/encodings.py`` as committed at ``HEAD``
(``git show``), loaded as modules beside the new ones; without git it is a reimplementation of what it
did (``json.dumps`` of ``tolist()``, one base64 call per row). Both write the same ``Invocation`` of
1,000 × 1024 unit vectors (float32), alternating old and new in one process, and the median of
``--runs`` is reported. The new bytes are checked to read back to the very float32 values.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson

from inference import protocol
from inference.request import EmbedRequest, EmbedResult

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "RESULTS-serving.md"
HEADING = "## Response writing: json.dumps of lists (HEAD) vs orjson from numpy (bench/response_writing.py)"
N, D = 1000, 1024
GOAL_MS = 20.0


def head_module(name: str, path: str):
    """``path`` as committed at HEAD, loaded as ``inference.<name>`` (its relative imports resolve to
    today's errors, request and settings, which this change does not touch)."""
    source = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader(f"inference.{name}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "inference"
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"HEAD:{path}", "exec"), module.__dict__)  # noqa: S102 - our own file at HEAD
    return module


def old_writer():
    """``write_response`` of HEAD, with HEAD's ``encode_matrix``; or a reimplementation without git."""
    try:
        old_encodings = head_module("_head_encodings", "inference/encodings.py")
        old_protocol = head_module("_head_protocol", "inference/protocol.py")
    except (OSError, subprocess.CalledProcessError):
        return _reimplemented_writer, "reimplementation (json.dumps of tolist())"
    old_protocol.encode_matrix = old_encodings.encode_matrix
    return old_protocol.write_response, "HEAD's inference/protocol.py (git show)"


def _reimplemented_writer(invocation, accept, *, model, default_task):
    result, request = invocation.results[0], invocation.requests[0]
    matrix = np.asarray(result.embeddings, dtype=np.float32)
    if result.encoding == "base64":
        rows = [base64.b64encode(r.astype("<f4").tobytes()).decode("ascii") for r in matrix]
    else:
        rows = matrix.tolist()
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
    old, source = old_writer()
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
    return rows, source, floor_ms(vectors, runs)


def floor_ms(vectors: np.ndarray, runs: int) -> float:
    """orjson writing the bare matrix: the cost of formatting the numbers alone, no writer around it."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        orjson.dumps(vectors, option=orjson.OPT_SERIALIZE_NUMPY)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def report(rows: list[tuple], source: str, floor: float, runs: int) -> str:
    lines = [
        HEADING, "",
        f"{N:,} × {D} unit vectors (float32), written by `write_response`; old: {source}; new: this tree. "
        f"Alternating old/new in one process, median of {runs} runs each. Machine: a shared "
        f"{os.cpu_count()}-core box ({platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}, orjson {orjson.__version__}); other jobs run beside it, so absolute times vary "
        "between runs; the ratio is the finding.", "",
        "| response | old ms | new ms (median) | new ms (best) | speed-up | old bytes | new bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for label, old_ms, new_ms, best_ms, old_bytes, new_bytes in rows:
        lines.append(f"| {label} | {old_ms:.0f} | {new_ms:.1f} | {best_ms:.1f} | {old_ms / new_ms:.0f}× | {old_bytes:,} | {new_bytes:,} |")
    float_ms, old_bytes, new_bytes = rows[0][2], rows[0][4], rows[0][5]
    verdict = "met" if float_ms <= GOAL_MS else "not met on this box"
    lines += [
        "",
        f"Goal ≤ {GOAL_MS:.0f} ms per 1,000 × 1024 floats: {verdict} ({float_ms:.1f} ms median). "
        f"`orjson.dumps` of the bare matrix, with no writer around it, takes {floor:.1f} ms here "
        f"({floor * 1e6 / (N * D):.0f} ns a value): formatting each float32 in its shortest form is nearly all "
        "of the cost, and orjson holds the GIL, so threads do not help. Float responses are "
        f"{1 - new_bytes / old_bytes:.0%} smaller: float32's shortest form replaces the float64 repr of each "
        "value (`0.1` instead of `0.10000000149011612`). base64 is mostly the base64 encoding itself.",
        "",
    ]
    return "\n".join(lines)


def write_section(section: str) -> None:
    """Replace this benchmark's section of RESULTS-serving.md (or append it), keeping everything else."""
    text = OUT.read_text() if OUT.exists() else ""
    if HEADING in text:
        before, after = text.split(HEADING, 1)
        rest = after.find("\n## ")
        text = before + section + (after[rest + 1 :] if rest >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    OUT.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="runs of each writer (median reported)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    rows, source, floor = measure(args.runs)
    section = report(rows, source, floor, args.runs)
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
