"""The one line rule of the client: a line ends at ``\\n`` (one ``\\r`` before it is dropped), and
nowhere else.

``str.splitlines()`` also splits at a form feed, \\x0b, \\x1c-\\x1e, U+0085, U+2028, U+2029 and a lone
``\\r``; Python's text files split at a lone ``\\r`` too. Texts and ids may hold any of those, and one
extra split shifts every later row against the input (or fails a whole batch part). Every reader of
a text corpus, a JSON Lines file or a JSON Lines response in ``client`` goes through this module,
and JSON written as JSON Lines escapes the characters other readers might split at
(``dumps_line``), as the endpoint does (docs/wire-format.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

# Characters JSON allows raw inside strings that str.splitlines() and JavaScript treat as line breaks.
_JSON_LINE_BREAKS = (("\u2028", "\\u2028"), ("\u2029", "\\u2029"), ("\x85", "\\u0085"))


def split_lines(text: str) -> list[str]:
    """``text`` as lines by the one line rule; a final newline ends the last line, it adds none.

    ``split_lines("a\\u2028b\\r\\nc\\rd\\n")`` is ``["a\\u2028b", "c\\rd"]``; ``split_lines("")`` is ``[]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"split_lines expects a str, got {type(text).__name__}")
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another
    return [_drop_cr(line) for line in lines]


def iter_lines(chunks: Iterable[str]) -> Iterator[str]:
    """Lines by the one line rule from ``chunks`` of text, e.g. a file opened with ``newline="\\n"``
    (iterating such a file yields pieces that end at ``\\n`` only), without reading it all."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        if "\n" not in pending:
            continue
        *complete, pending = pending.split("\n")
        for line in complete:
            yield _drop_cr(line)
    if pending:
        yield _drop_cr(pending)


def decode_lines(raw: bytes, *, what: str = "body") -> list[str]:
    """Lines of UTF-8 bytes by the one line rule; bytes that are not UTF-8 raise ``ValueError``
    naming the offset."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not UTF-8 at byte {exc.start}: {raw[exc.start:exc.start + 8]!r}") from None
    return split_lines(text)


def dumps_line(obj) -> str:
    """``obj`` as compact JSON on one line whatever it holds: UTF-8 characters stay as they are,
    except U+2028, U+2029 and U+0085, which are escaped (still the same JSON value)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for char, escape in _JSON_LINE_BREAKS:
        if char in text:
            text = text.replace(char, escape)
    return text


def _drop_cr(line: str) -> str:
    return line[:-1] if line.endswith("\r") else line


__all__ = ["decode_lines", "dumps_line", "iter_lines", "split_lines"]
