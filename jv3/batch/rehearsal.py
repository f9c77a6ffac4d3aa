"""A transform job rehearsed on this machine: ``run_local`` starts ``python -m inference.serve`` with
the job's environment and ``transform_file`` sends the corpus in MultiRecord payloads the way
SageMaker splits them (SplitType Line), writing one ``<input-name>.out`` atomically.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import BatchJobError
from ..lines import decode_lines
from .files import atomic_write
from .jobs import CONTAINER_MAX_PAYLOAD_MB
from .manifest import JSONLINES, MiB, job_environment
from .staging import corpus_lines


def multirecord_payloads(lines: Iterable[bytes], max_payload_bytes: int) -> Iterator[list[bytes]]:
    """Group lines into mini-batches as SageMaker's MultiRecord + SplitType Line does: as many whole
    records (each with its newline) as fit in ``MaxPayloadInMB``; a record that alone exceeds it
    fails the job."""
    batch: list[bytes] = []
    size = 0
    for position, line in enumerate(lines):
        record = len(line) + 1
        if record > max_payload_bytes:
            raise BatchJobError(
                f"record {position} is {record:,} bytes, over MaxPayloadInMB ({max_payload_bytes / MiB:g} MB); "
                "SageMaker would fail the job"
            )
        if batch and size + record > max_payload_bytes:
            yield batch
            batch, size = [], 0
        batch.append(line)
        size += record
    if batch:
        yield batch


@dataclass
class LocalRunSummary:
    output: Path
    records: int
    errors: int
    requests: int
    seconds: float

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")

    def cost_per_million(self, price_per_hour: float, records_per_second: float | None = None) -> float:
        """Dollars per million documents on an instance costing ``price_per_hour`` that embeds
        ``records_per_second`` (default: the rate measured here)."""
        rate = records_per_second or self.records_per_second
        return price_per_hour / 3600.0 / rate * 1e6

    def lines(self, price_per_hour: float, records_per_second: float | None = None) -> list[str]:
        rate = records_per_second or self.records_per_second
        return [
            f"output:   {self.output}",
            f"records:  {self.records:,} ({self.errors:,} errors) in {self.requests:,} requests",
            f"time:     {self.seconds:.2f} s ({self.records_per_second:,.1f} records/s)",
            f"cost:     ${self.cost_per_million(price_per_hour, rate):,.2f} per million documents at "
            f"${price_per_hour:g}/h and {rate:,.1f} records/s",
        ]


def post_records(url: str, lines: Sequence[bytes], *, timeout: float = 600.0) -> list[str]:
    """POST one MultiRecord payload to ``/invocations``; returns exactly one output line per record."""
    body = b"\n".join(lines) + b"\n"
    request = urllib.request.Request(
        f"{url}/invocations",
        data=body,
        method="POST",
        headers={"Content-Type": JSONLINES, "Accept": JSONLINES},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:500]
        raise BatchJobError(f"the endpoint refused a {len(body):,}-byte mini-batch with {exc.code}: {detail}") from exc
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise BatchJobError(f"cannot reach the endpoint at {url}: {exc}") from exc
    out = _response_lines(raw)
    if len(out) != len(lines):
        raise BatchJobError(f"the endpoint answered {len(lines)} records with {len(out)} lines")
    return out


def _response_lines(raw: bytes) -> list[str]:
    try:
        return decode_lines(raw, what="the endpoint's JSON Lines response")
    except ValueError as exc:
        raise BatchJobError(str(exc)) from None


def transform_file(
    url: str,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    max_payload_mb: float = CONTAINER_MAX_PAYLOAD_MB,
    max_concurrent: int = 1,
    fmt: str | None = None,
    progress: bool = True,
) -> LocalRunSummary:
    """Send a corpus to a running endpoint the way a transform job would; write ``<name>.out``."""
    input_path = Path(input_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / f"{input_path.name}.out"
    lines = [line.encode("utf-8") for line in corpus_lines(input_path, fmt=fmt)]
    payloads = multirecord_payloads(lines, int(max_payload_mb * MiB))
    counts = {"records": 0, "errors": 0, "requests": 0}
    started = time.perf_counter()

    def answers() -> Iterator[bytes]:
        with ThreadPoolExecutor(max(1, max_concurrent), thread_name_prefix="jv3-batch") as pool, tqdm(
            total=len(lines), unit="record", desc=input_path.name, disable=not progress, file=sys.stderr
        ) as bar:
            pending: deque[Future] = deque()
            for payload in payloads:
                pending.append(pool.submit(post_records, url, payload))
                if len(pending) >= 2 * max(1, max_concurrent):
                    yield from _drain(pending.popleft(), counts, bar)
            while pending:
                yield from _drain(pending.popleft(), counts, bar)

    atomic_write(output, answers())
    return LocalRunSummary(output, counts["records"], counts["errors"], counts["requests"], time.perf_counter() - started)


def _drain(future: Future, counts: dict, bar) -> Iterator[bytes]:
    out = future.result()
    counts["requests"] += 1
    counts["records"] += len(out)
    counts["errors"] += sum(_is_error(line) for line in out)
    bar.update(len(out))
    for line in out:
        yield line.encode("utf-8") + b"\n"


def _is_error(line: str) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return True
    return not isinstance(record, dict) or "error" in record or "embedding" not in record


def run_local(
    model_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    task: str | None = None,
    dimensions: int | None = None,
    embedding_type: str = "float",
    max_payload_mb: float = CONTAINER_MAX_PAYLOAD_MB,
    max_concurrent: int = 1,
    fmt: str | None = None,
    progress: bool = True,
    port: int | None = None,
    cwd: str | os.PathLike | None = None,
) -> LocalRunSummary:
    """Start the local endpoint with the job's environment, transform the file, stop the endpoint."""
    from ..local import LocalEndpoint

    env = job_environment(task=task, dimensions=dimensions, embedding_type=embedding_type)
    with LocalEndpoint(model_dir, port=port, env=env, cwd=cwd) as endpoint:
        return transform_file(
            endpoint.url,
            input_path,
            output_dir,
            max_payload_mb=max_payload_mb,
            max_concurrent=max_concurrent,
            fmt=fmt,
            progress=progress,
        )
