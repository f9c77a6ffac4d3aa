from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.engine import Engine
from inference.settings import Settings

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "jina-v3-tiny"


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads((FIXTURE / "golden.json").read_text())


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine.load(FIXTURE, Settings.resolve(device="cpu", dtype="float32"))
