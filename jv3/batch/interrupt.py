"""Signals that end a rehearsal with its cleanup: SIGTERM, SIGINT and SIGHUP raise ``Interrupted``.

Python's default SIGTERM ends the process at once: the local endpoint it started (the model in
memory, a port) would outlive it and the output's temporary would stay. While ``interruptible()``
is active they raise ``Interrupted`` where the run is, so every ``with`` on the way out runs: the
temporary is removed (``files.atomic_write``) and the endpoint's process group is stopped
(``jv3.local.LocalEndpoint``). SIGKILL cannot be caught: there the endpoint dies of its parent-death
signal and the next run removes the temporary (``files.remove_stale``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class Interrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP during a run, raised where the run is.

    A BaseException, so that no ``except Exception`` on the way turns it into another error, and
    every ``with`` and ``except BaseException`` on the way out removes what it made."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """While active, the signals of ``SIGNALS`` raise ``Interrupted``. A second signal is ignored so
    that it cannot cut the cleanup short; a signal already ignored (nohup) stays ignored; handlers
    can only be set in the main thread, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for sig, old in previous.items():
        if old is not signal.SIG_IGN:
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
