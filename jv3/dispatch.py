"""Send the requests of one ``embed`` call and keep every answer that came back.

``dispatch`` runs ``send(start, stop)`` for each ``[start, stop)`` range of texts on a bounded thread
pool and returns what succeeded and what failed, instead of stopping at the first error:

* a range that fails (after ``send``'s own retries) is recorded with its error; the others go on;
* a range that times out (``EndpointTimeout``) is not sent again as it was: it is split in halves,
  down to one text, and the halves are sent next (a one-text range that times out fails);
* an error that concerns the whole call rather than its texts (unknown endpoint, no credentials,
  a refused parameter) stops sending: what is not sent yet fails with that error;
* ``max_timeouts_in_a_row`` timeouts with no success in between mean the endpoint is not answering:
  the remaining ranges fail with an ``EndpointTimeout`` saying so;
* with a ``deadline`` (seconds), the call returns when it passes: ranges still pending fail with
  ``DeadlineExceeded``, and requests in flight are abandoned (their threads end at their own
  read timeout, sending nothing more).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from .errors import (
    ClientError,
    DeadlineExceeded,
    EndpointError,
    EndpointNotFound,
    EndpointTimeout,
    InvalidRequestError,
)

# Fields of a 400 that name a parameter of the call, not one of its texts: every request would fail.
CALL_FIELDS = frozenset(
    {"task", "dimensions", "embedding_type", "normalized", "late_chunking", "truncate", "parameters"}
)
# Runtime error codes that every request of the call would meet.
CALL_ERROR_TYPES = frozenset(
    {"AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException"}
)


class Abandoned(Exception):
    """Raised inside ``send`` when the call has stopped (deadline, or an error of the whole call)."""


@dataclass
class Dispatched:
    """``done``: ``(start, stop, rows)`` of each range answered; ``failed``: ``(start, stop, error)``."""

    done: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    failed: list[tuple[int, int, BaseException]] = field(default_factory=list)


def concerns_the_call(exc: BaseException) -> bool:
    """True for errors that every request of the call would meet, whatever its texts."""
    if isinstance(exc, EndpointNotFound) or not isinstance(exc, EndpointError):
        return True
    if isinstance(exc, InvalidRequestError):
        return exc.field in CALL_FIELDS or exc.error_type in CALL_ERROR_TYPES
    return False


def dispatch(
    send: Callable[[int, int, threading.Event, float | None], np.ndarray],
    ranges: Sequence[tuple[int, int]],
    *,
    workers: int,
    split_timeouts: bool = True,
    max_timeouts_in_a_row: int = 24,
    deadline: float | None = None,
    on_done: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Dispatched:
    """Run ``send(start, stop, stopped, deadline_at)`` for every range; see the module doc.

    ``send`` gets the event that is set when the call stops (it should raise ``Abandoned`` rather
    than start another attempt) and the ``clock()`` time of the deadline (None without one).
    """
    result = Dispatched()
    deadline_at = None if deadline is None else clock() + deadline
    stopped = threading.Event()
    workers = max(1, workers)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="jv3-embed")
    pending: dict[Future, tuple[int, int]] = {}
    # ranges not sent yet; only ``workers`` are handed to the pool at a time, so that nothing more
    # starts once the call has stopped, and the halves of a split go first
    waiting: deque[tuple[int, int]] = deque(ranges)

    def fill() -> None:
        while waiting and len(pending) < workers:
            start, stop = waiting.popleft()
            pending[pool.submit(send, start, stop, stopped, deadline_at)] = (start, stop)

    def give_up(error: BaseException) -> None:
        stopped.set()
        for future, (start, stop) in pending.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                keep(start, stop, future.result())  # answered just now: nothing is thrown away
            else:
                future.cancel()
                result.failed.append((start, stop, error))
        pending.clear()
        result.failed.extend((start, stop, error) for start, stop in waiting)
        waiting.clear()

    def keep(start: int, stop: int, rows: np.ndarray) -> None:
        result.done.append((start, stop, rows))
        if on_done is not None:
            on_done(stop - start)

    def past_deadline() -> DeadlineExceeded:
        texts = sum(stop - start for start, stop in [*pending.values(), *waiting])
        return DeadlineExceeded(
            f"no answer for {texts} texts within the deadline of {deadline:g} s; their requests were abandoned"
        )

    timeouts_in_a_row = 0
    try:
        fill()
        while pending:
            left = None if deadline_at is None else max(deadline_at - clock(), 0.0)
            finished, _ = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            if not finished:
                give_up(past_deadline())
                break
            stop_with: BaseException | None = None
            for future in finished:
                start, stop = pending.pop(future)
                try:
                    rows = future.result()
                except EndpointTimeout as exc:
                    timeouts_in_a_row += 1
                    if timeouts_in_a_row >= max_timeouts_in_a_row:
                        stop_with = stop_with or EndpointTimeout(
                            f"{timeouts_in_a_row} requests in a row timed out with no answer in between; the "
                            f"endpoint is not answering, so the rest was not sent (last: {exc})",
                            status=exc.status,
                            error_type=exc.error_type,
                        )
                        result.failed.append((start, stop, stop_with))
                    elif split_timeouts and stop - start > 1:
                        middle = (start + stop) // 2
                        waiting.extendleft([(middle, stop), (start, middle)])
                    else:
                        result.failed.append((start, stop, exc))
                except Abandoned:
                    continue  # raised only once the call has stopped; its range is already failed
                except ClientError as exc:
                    result.failed.append((start, stop, exc))
                    if concerns_the_call(exc):
                        stop_with = stop_with or exc
                else:
                    timeouts_in_a_row = 0
                    keep(start, stop, rows)
            if stop_with is not None:
                give_up(stop_with)
            elif deadline_at is not None and clock() >= deadline_at and (pending or waiting):
                give_up(past_deadline())
            fill()
    finally:
        if pending:  # an unexpected error is leaving: send nothing more
            stopped.set()
        # requests still in flight after give_up are abandoned, not waited for
        pool.shutdown(wait=not stopped.is_set(), cancel_futures=True)
    return result
