"""A transform job rehearsed on this machine: ``run_local`` starts ``python -m inference.serve`` with
the job's environment and ``transform_file`` sends the corpus in MultiRecord payloads the way
SageMaker splits them (SplitType Line), writing one ``<input-name>.out`` atomically.

Nothing is lost on the way (issue 10, "batch without loss"): every record is checked before the
endpoint even starts (``screening``: a record over the mini-batch limit refuses the run, or with
``skip_oversized`` gets an error record; a blank line gets an error record and is never sent);
mini-batches are capped by records as well as bytes and split when the endpoint cannot answer one in
time (``minibatches``); the output has one line per input line, ids kept, in order, error records in
place, and appears whole or not at all. SIGTERM, SIGINT and SIGHUP stop the endpoint and remove the
temporary output (``interrupt``); a SIGKILL ends the endpoint by its parent-death signal
(``jv3.local``) and the next run removes the temporary (``files.remove_stale``).
"""

from __future__ import annotations

import json
import os
import socket
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
from .interrupt import interruptible
from .jobs import CONTAINER_MAX_PAYLOAD_MB
from .manifest import JSONLINES, MiB, job_environment
from .minibatches import (
    DEFAULT_MAX_RECORDS,
    DEFAULT_REQUEST_TIMEOUT_S,
    SPLIT_STATUSES,
    Overloaded,
    Pacing,
    answer,
    plan,
)
from .screening import Limit, Withheld, record_limit, screen, server_max_request_bytes
from .staging import corpus_records


def multirecord_payloads(
    lines: Iterable[bytes], max_payload_bytes: int, max_records: int | None = None
) -> Iterator[list[bytes]]:
    """Group lines into mini-batches as SageMaker's MultiRecord + SplitType Line does: as many whole
    records (each with its newline) as fit in ``MaxPayloadInMB`` (and, given, ``max_records`` at
    most); a record that alone exceeds it fails the job."""
    batch: list[bytes] = []
    size = 0
    for position, line in enumerate(lines):
        record = len(line) + 1
        if record > max_payload_bytes:
            raise BatchJobError(
                f"record {position} is {record:,} bytes, over MaxPayloadInMB ({max_payload_bytes / MiB:g} MB); "
                "SageMaker would fail the job"
            )
        if batch and (size + record > max_payload_bytes or (max_records is not None and len(batch) >= max_records)):
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
    splits: int = 0  # mini-batches split and sent again after a 503/507/413 or no answer in time

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
        split = f" ({self.splits:,} mini-batches split after the endpoint could not answer them)" if self.splits else ""
        return [
            f"output:   {self.output}",
            f"records:  {self.records:,} ({self.errors:,} errors) in {self.requests:,} requests{split}",
            f"time:     {self.seconds:.2f} s ({self.records_per_second:,.1f} records/s)",
            f"cost:     ${self.cost_per_million(price_per_hour, rate):,.2f} per million documents at "
            f"${price_per_hour:g}/h and {rate:,.1f} records/s",
        ]


def post_records(url: str, lines: Sequence[bytes], *, timeout: float = 600.0) -> list[str]:
    """POST one MultiRecord payload to ``/invocations``; returns exactly one output line per record.
    Raises ``Overloaded`` when a smaller payload may succeed (503, 507, 413, no answer in ``timeout``
    seconds), ``BatchJobError`` otherwise."""
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
        message = f"the endpoint refused a {len(body):,}-byte mini-batch of {len(lines):,} records with {exc.code}: {detail}"
        if exc.code in SPLIT_STATUSES:
            raise Overloaded(message, status=exc.code, error_type=_error_type(detail)) from exc
        raise BatchJobError(message) from exc
    except TimeoutError as exc:
        raise Overloaded(f"no answer within {timeout:g} s", status=None) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            raise Overloaded(f"no answer within {timeout:g} s", status=None) from exc
        raise BatchJobError(f"cannot reach the endpoint at {url}: {exc}") from exc
    except ConnectionError as exc:
        raise BatchJobError(f"cannot reach the endpoint at {url}: {exc}") from exc
    out = _response_lines(raw)
    if len(out) != len(lines):
        raise BatchJobError(f"the endpoint answered {len(lines)} records with {len(out)} lines")
    return out


def _error_type(detail: str) -> str | None:
    try:
        error = json.loads(detail).get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("type") if isinstance(error, dict) else None


def _response_lines(raw: bytes) -> list[str]:
    try:
        return decode_lines(raw, what="the endpoint's JSON Lines response")
    except ValueError as exc:
        raise BatchJobError(str(exc)) from None


@dataclass
class LocalCorpus:
    """A corpus read and checked (``screening``) before any record is sent."""

    path: Path
    lines: list[bytes]  # one JSON Lines record per input line (CSV: per row), without the newline
    withheld: dict[int, Withheld]  # records answered by the client: blank lines, skipped oversized ones
    limit: Limit  # the largest record, and so the largest mini-batch


def read_corpus(
    input_path: str | os.PathLike,
    *,
    max_payload_mb: float = CONTAINER_MAX_PAYLOAD_MB,
    server_max_bytes: int | None = None,
    skip_oversized: bool = False,
    fmt: str | None = None,
) -> LocalCorpus:
    """Read every record and check it against the mini-batch limit: ``MaxPayloadInMB`` and the local
    server's ``JV3_MAX_REQUEST_BYTES`` (``server_max_bytes``, default from this environment, which the
    server inherits). A record over it raises ``OversizedRecord`` naming its line and size, unless
    ``skip_oversized``."""
    path = Path(input_path)
    records = list(corpus_records(path, fmt=fmt))
    limit = record_limit(max_payload_mb, server_max_request_bytes() if server_max_bytes is None else server_max_bytes)
    withheld = screen(records, limit=limit, skip_oversized=skip_oversized, source=path.name)
    lines = [record.encode("utf-8") for _, record in records]
    return LocalCorpus(path, lines, withheld, limit)


def request_timeout_s() -> float:
    """The local server's ``JV3_REQUEST_TIMEOUT_S`` (it inherits this environment)."""
    try:
        return float(os.environ.get("JV3_REQUEST_TIMEOUT_S") or DEFAULT_REQUEST_TIMEOUT_S)
    except ValueError:
        return DEFAULT_REQUEST_TIMEOUT_S


def transform_file(
    url: str,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    max_payload_mb: float = CONTAINER_MAX_PAYLOAD_MB,
    max_records: int = DEFAULT_MAX_RECORDS,
    max_concurrent: int = 1,
    fmt: str | None = None,
    progress: bool = True,
    skip_oversized: bool = False,
    corpus: LocalCorpus | None = None,
    timeout_s: float | None = None,
) -> LocalRunSummary:
    """Send a corpus to a running endpoint the way a transform job would; write ``<name>.out``.

    Mini-batches hold at most ``max_payload_mb`` MiB and ``max_records`` records, fewer after one
    was split (``minibatches``). ``timeout_s`` is the endpoint's request timeout (default: this
    environment's ``JV3_REQUEST_TIMEOUT_S``, or 60 s). ``corpus`` is the corpus already read by
    ``read_corpus`` (else it is read and checked here, before anything is sent)."""
    corpus = corpus or read_corpus(input_path, max_payload_mb=max_payload_mb, skip_oversized=skip_oversized, fmt=fmt)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / f"{corpus.path.name}.out"
    pacing = Pacing(max_records, request_timeout_s() if timeout_s is None else timeout_s)
    concurrency = max(1, max_concurrent)
    counts = {"records": 0, "errors": 0}
    started = time.perf_counter()

    def answers() -> Iterator[bytes]:
        pool = ThreadPoolExecutor(concurrency, thread_name_prefix="jv3-batch")
        pending: deque[Future] = deque()
        finished = False
        try:
            with tqdm(
                total=len(corpus.lines), unit="record", desc=corpus.path.name, disable=not progress, file=sys.stderr
            ) as bar:
                notify = (lambda message: tqdm.write(message, file=sys.stderr)) if progress else None
                max_bytes = min(int(max_payload_mb * MiB), corpus.limit.bytes)
                for batch in plan(corpus.lines, corpus.withheld, max_bytes, pacing):
                    pending.append(pool.submit(answer, url, batch, pacing, post=post_records, notify=notify))
                    if len(pending) >= 2 * concurrency:
                        yield from _drain(pending.popleft(), counts, bar)
                while pending:
                    yield from _drain(pending.popleft(), counts, bar)
            finished = True
        finally:
            # on an error or a signal, do not wait for requests in flight: the endpoint is stopped next
            pool.shutdown(wait=finished, cancel_futures=True)

    atomic_write(output, answers())
    seconds = time.perf_counter() - started
    return LocalRunSummary(output, counts["records"], counts["errors"], pacing.requests, seconds, pacing.splits)


def _drain(future: Future, counts: dict, bar) -> Iterator[bytes]:
    out = future.result()
    counts["records"] += len(out)
    counts["errors"] += sum(_is_error(line) for line in out)
    bar.update(len(out))
    for line in out:
        yield line.encode("utf-8") + b"\n"


def _is_error(line: str) -> bool:
    if '"error"' not in line and '"embedding"' in line:  # no need to parse megabytes of vectors
        return False
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
    max_records: int = DEFAULT_MAX_RECORDS,
    max_concurrent: int = 1,
    fmt: str | None = None,
    progress: bool = True,
    skip_oversized: bool = False,
    port: int | None = None,
    cwd: str | os.PathLike | None = None,
) -> LocalRunSummary:
    """Check the corpus, start the local endpoint with the job's environment, transform the file,
    stop the endpoint. A record over the mini-batch limit raises ``OversizedRecord`` before the
    endpoint starts (unless ``skip_oversized``). SIGTERM, SIGINT and SIGHUP raise ``Interrupted``
    after the endpoint is stopped and the temporary output removed."""
    from ..local import LocalEndpoint

    env = job_environment(task=task, dimensions=dimensions, embedding_type=embedding_type)
    corpus = read_corpus(input_path, max_payload_mb=max_payload_mb, skip_oversized=skip_oversized, fmt=fmt)
    with interruptible(), LocalEndpoint(model_dir, port=port, env=env, cwd=cwd) as endpoint:
        return transform_file(
            endpoint.url,
            input_path,
            output_dir,
            max_payload_mb=max_payload_mb,
            max_records=max_records,
            max_concurrent=max_concurrent,
            progress=progress,
            corpus=corpus,
        )
