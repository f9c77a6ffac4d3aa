"""jv3/, infra/ and inference/ share no code (they meet over HTTP and environment variables), so the
few names and limits each must know are written in each room once; here they are held equal."""

from __future__ import annotations

from inference import settings
from infra import config
from jv3 import wire


def test_task_and_encoding_names_agree():
    assert wire.TASKS == settings.TASKS == config.TASKS
    assert config.ENCODINGS == settings.ENCODINGS


def test_request_limits_nest():
    """The client splits below SageMaker's 6 MB; the server accepts at least that; TorchServe more still."""
    server = settings.Settings.resolve().max_request_bytes
    torchserve = int(config.DeploySettings.resolve({}, {"JV3_RUNTIME": "dlc"}).container_environment()["TS_MAX_REQUEST_SIZE"])
    assert wire.MAX_REQUEST_BYTES <= 6_000_000 <= server <= torchserve
