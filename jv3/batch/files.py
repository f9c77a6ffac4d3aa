"""Local files written whole or not at all, and the leftovers of writers that were killed.

``atomic_write`` writes ``.<name>.<pid>@<host>.<random>.tmp`` beside the target and renames it over
the target at the end, so a reader sees the old file or the whole new one. A writer stopped by an
exception or a signal that ``batch local`` turns into one removes its temporary; SIGKILL cannot be
caught, so every ``atomic_write`` first removes the temporaries of the same target whose owner is a
process of this host that is gone (``remove_stale``).
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

STALE_AFTER_S = 3600  # a temporary whose owner cannot be checked (another host, an older name) is stale after this
_OWNER = r"(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)"


def owner() -> str:
    """``pid@host`` for temporary names: the host's short name, reduced to what ``_OWNER`` accepts."""
    host = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname().split(".")[0]) or "localhost"
    return f"{os.getpid()}@{host}"


def atomic_write(path: Path, chunks: Iterable[bytes]) -> Path:
    """Write ``chunks`` to a temporary file beside ``path``, then rename it over ``path``: readers
    see the old file or the whole new one, never half of it. Stale temporaries of ``path`` left by
    killed writers are removed first."""
    path = Path(path)
    remove_stale(path)
    handle = tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.{owner()}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def temporaries(path: Path) -> list[Path]:
    """The temporaries of ``path`` in its folder: ``.<name>.<anything>.tmp``, whoever wrote them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}."
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp"))


def remove_stale(path: Path, *, now: float | None = None) -> list[str]:
    """Remove the temporaries of ``path`` that killed writers left; returns their names.

    One is stale when its owner, named in it, is a process of this host that is gone; one whose owner
    cannot be checked (another host sharing the folder, a name without an owner) when it is older than
    ``STALE_AFTER_S``. A writer still running keeps its temporary."""
    path = Path(path)
    now = time.time() if now is None else now
    this_host = owner().split("@", 1)[1]
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:{_OWNER}\.)?[A-Za-z0-9_]+\.tmp$")
    removed = []
    for entry in temporaries(path):
        match = pattern.match(entry.name)
        if match is None or not entry.is_file() or entry.is_symlink():
            continue
        if match["pid"] and match["host"] == this_host:
            stale = not _alive(int(match["pid"]))
        else:
            try:
                stale = now - entry.lstat().st_mtime > STALE_AFTER_S
            except FileNotFoundError:  # removed meanwhile by its owner
                continue
        if stale:
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:  # a zombie (killed, not yet reaped) answers kill(0) but writes nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
