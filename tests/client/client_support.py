"""Helpers shared by the client tests (a module of its own: tests/ has no packages)."""


from __future__ import annotations

import io
import json
from pathlib import Path

from botocore.response import StreamingBody

REPO = Path(__file__).resolve().parents[2]
CONTRACT = REPO / "tests" / "contract"
TINY = REPO / "fixtures" / "jina-v3-tiny"


def contract(name: str) -> dict:
    return json.loads((CONTRACT / name).read_text())


def body(obj) -> StreamingBody:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return StreamingBody(io.BytesIO(raw), len(raw))


