"""Fair, bounded, cancellable work for the local/BYOC server's batchers (issue 10, item 2).

A request's handler thread prepares its plans (``Engine.prepare``: validation and tokenisation, off the
batchers) and submits them as one ``Job``. The job is cut into *units* of at most ``quantum`` tokens: a
plan is split between its texts (``Plan.split``), small plans are grouped, and a late-chunking plan is
one unit whatever its size (its chunks are one document; the request's size bounds it). Every batcher
(one per engine) asks the one ``Scheduler`` for its next batch and gets units taken round-robin across
the waiting jobs until the engine's token budget is full: one unit from each job in turn, jobs that
waited longest since they were last served first (a newly arrived job has never been served, so it is
in the very next batch), and oldest first among equals. A large request therefore shares every batch
with the small ones that arrive while it runs instead of holding the engine until it is done; each
unit's results go back to its job, and the pieces of a plan are joined back in their order
(``Plan.join``) when the job's last unit is done.

Gathering: a batcher that finds less work than its budget waits for more until ``JV3_BATCH_WAIT_MS``
after it became free, not after the work arrived. Under load (work waiting when a batch ends) that is
the whole window, so concurrent callers share forward passes; a request that finds the batcher idle
for longer than the window starts at once, since nobody else is arriving to share with it (the window
would only add to its latency: 2 of the ~7 ms a small request spent above ``Engine.embed``,
bench/RESULTS-serving.md). Cancelling: a job carries its deadline (the request's start plus
``JV3_REQUEST_TIMEOUT_S``); when the deadline passes, or the handler gives up on it (its 503, or its
client closed the connection), its units that have not started are dropped, at the latest at the next
batch boundary, so abandoned work costs at most the batch already running.

No torch here: the scheduler sees plans only through ``tokens``, ``split`` and ``join``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque

from .errors import JV3Error, ModelError, RequestTimeout

log = logging.getLogger("jv3.serve")

# A unit is at most this share of the smallest engine budget: a newly arrived job's units and a large
# job's units then fill a batch together to within one unit (7/8 or more of the budget).
UNIT_SHARE = 8


class Unit:
    """Pieces of plans of one job, run together in one batch: ``(plan index, piece index, piece)``."""

    __slots__ = ("job", "parts", "tokens")

    def __init__(self, job: Job):
        self.job = job
        self.parts: list[tuple[int, int, object]] = []
        self.tokens = 0

    @property
    def plans(self) -> list:
        return [piece for _, _, piece in self.parts]


class Job:
    """One request's prepared plans (or their errors), cut into units; ``results`` once ``done`` is set."""

    def __init__(self, plans: list, *, deadline: float, quantum: int):
        self.plans = plans
        self.deadline = deadline
        self.results: list | None = None
        self.done = threading.Event()
        self.abandoned = False  # the handler gave up on it (its deadline, or its client went away)
        self.dropped: str | None = None  # why its remaining units were dropped, if they were
        self.order = 0  # arrival, set by the scheduler
        self.last_served = -1  # the batch that last took one of its units (-1: none yet)
        self._pieces: list[list] = [[] if isinstance(p, JV3Error) else p.split(quantum) for p in plans]
        self._results: list[list] = [[None] * len(pieces) for pieces in self._pieces]
        self.units: deque[Unit] = deque()
        unit = Unit(self)
        for i, pieces in enumerate(self._pieces):
            for k, piece in enumerate(pieces):
                if unit.parts and unit.tokens + piece.tokens > quantum:
                    self.units.append(unit)
                    unit = Unit(self)
                unit.parts.append((i, k, piece))
                unit.tokens += piece.tokens
        if unit.parts:
            self.units.append(unit)
        self.pending = sum(u.tokens for u in self.units)  # tokens of the units not yet taken
        self.running = 0  # units taken and not yet done
        self.closing = False  # its last unit is done: being joined, no longer to be dropped

    def _record(self, unit: Unit, results: list) -> None:
        for (i, k, _), result in zip(unit.parts, results, strict=True):
            self._results[i][k] = result

    def _finish(self) -> None:
        results = []
        for plan, pieces, got in zip(self.plans, self._pieces, self._results, strict=True):
            if isinstance(plan, JV3Error):
                results.append(plan)
                continue
            try:
                results.append(plan.join(pieces, got))
            except Exception as exc:  # noqa: BLE001 - runs on a batcher thread, which must outlive any bug
                log.exception("joining a request's pieces failed")
                results.append(ModelError(f"internal error: {type(exc).__name__}: {exc}"))
        self.results = results
        self.done.set()

    def _fail(self, why: str) -> None:
        self.dropped = why
        error = RequestTimeout(f"the request's remaining work was dropped: {why}")
        self.results = [p if isinstance(p, JV3Error) else error for p in self.plans]
        self.done.set()


class Scheduler:
    """The jobs waiting for the batchers of one server, and the rule that fills each batch."""

    def __init__(self):
        self._cond = threading.Condition()
        self._jobs: list[Job] = []  # jobs with units not yet taken
        self._pending = 0  # their tokens
        self._order = itertools.count()
        self._batches = 0
        self._stopping = False

    def submit(self, job: Job) -> Job:
        with self._cond:
            if not job.units:  # every request failed to prepare: nothing to run
                job._finish()
                return job
            job.order = next(self._order)
            self._jobs.append(job)
            self._pending += job.pending
            self._cond.notify_all()
        return job

    def abandon(self, job: Job) -> None:
        """Nobody waits for ``job`` any more: drop its units that have not started."""
        with self._cond:
            job.abandoned = True
            self._drop(job, "its client is no longer waiting")

    def stop(self) -> None:
        """Let the batchers finish the work already submitted, then end (``next_batch`` returns None)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def waiting(self) -> int:
        """Jobs with units not yet taken (for tests and logs)."""
        with self._cond:
            return len(self._jobs)

    def next_batch(self, max_tokens: int, wait_s: float, *, on_idle=None, idle_s: float = 0.0) -> list[Unit] | None:
        """Block until there is work; while it is under ``max_tokens``, gather until ``wait_s`` after this
        call began (the batcher became free: an idle batcher starts new work at once); then take units
        round-robin (jobs served longest ago first, oldest first among equals) up to ``max_tokens`` (a
        unit larger than that only into an empty batch). None: stop.

        ``on_idle``: called once, without the lock held, if no work came for ``idle_s`` seconds."""
        with self._cond:
            gather_until = time.monotonic() + wait_s
            idle_called = on_idle is None
            while True:
                self._expire()
                if not self._jobs:
                    if self._stopping:
                        return None
                    if idle_called:
                        self._cond.wait()
                    elif not self._cond.wait(idle_s) and not self._jobs and not self._stopping:
                        idle_called = True
                        self._cond.release()  # a submit must not wait for the callback
                        try:
                            on_idle()
                        finally:
                            self._cond.acquire()
                    continue
                while self._pending < max_tokens and not self._stopping:
                    left = gather_until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self._expire()
                batch = self._take(max_tokens)
                if batch:  # empty when another batcher took the work, or it expired, while this one gathered
                    return batch

    def _take(self, max_tokens: int) -> list[Unit]:
        self._batches += 1
        batch, tokens, full = [], 0, set()
        jobs = sorted(self._jobs, key=lambda j: (j.last_served, j.order))
        while True:  # rounds: one unit from each job in turn
            took = False
            for job in jobs:
                if not job.units or id(job) in full:
                    continue
                unit = job.units[0]
                if batch and tokens + unit.tokens > max_tokens:
                    full.add(id(job))  # its next unit waits for the next batch; later jobs' may still fit
                    continue
                job.units.popleft()
                job.pending -= unit.tokens
                self._pending -= unit.tokens
                job.running += 1
                job.last_served = self._batches
                batch.append(unit)
                tokens += unit.tokens
                took = True
            if not took or tokens >= max_tokens:
                break
        self._jobs = [j for j in self._jobs if j.units]
        return batch

    def complete(self, batch: list[Unit], results: list) -> None:
        """The results of ``batch``'s pieces, in order; a job whose last unit this was is finished."""
        finished, at = [], 0
        with self._cond:
            for unit in batch:
                job = unit.job
                job._record(unit, results[at : at + len(unit.parts)])
                at += len(unit.parts)
                job.running -= 1
                if not job.units and not job.running and not job.done.is_set() and not job.closing:
                    job.closing = True
                    finished.append(job)
        for job in finished:  # joining copies every vector: not while the other batchers wait for the lock
            job._finish()

    # ------------------------------------------------------------------------------------ dropping

    def _expire(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._jobs if j.deadline <= now]:
            self._drop(job, "its deadline (JV3_REQUEST_TIMEOUT_S) passed")

    def _drop(self, job: Job, why: str) -> None:
        if job.units:
            self._pending -= job.pending
            job.pending = 0
            job.units.clear()
            self._jobs = [j for j in self._jobs if j is not job]
        if not job.done.is_set() and not job.closing:
            job._fail(why)
