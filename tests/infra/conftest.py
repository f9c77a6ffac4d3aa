"""Synthesised stacks shared by the infra tests (jsii synthesis is slow: build each app once per session)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from aws_cdk import App, Stack
from aws_cdk.assertions import Template
from infra_support import FULL_ENV, MANIFEST, tiny_archive

from infra.app import build_app


@dataclass
class Synth:
    app: App
    stacks: list[Stack]

    def template(self, index: int = 0) -> Template:
        return Template.from_stack(self.stacks[index])

    def json(self, index: int = 0) -> dict:
        return self.template(index).to_json()


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> Path:
    return tiny_archive(tmp_path_factory.mktemp("artifact") / "model.tar.gz", MANIFEST)


@pytest.fixture(scope="session")
def default_synth(tmp_path_factory) -> Synth:
    """No settings at all: the byoc runtime on ml.g5.xlarge in us-east-1 with the placeholder artifact."""
    app, stacks = build_app(environ={}, outdir=str(tmp_path_factory.mktemp("default")))
    return Synth(app, stacks)


@pytest.fixture(scope="session")
def default_template(default_synth) -> Template:
    return default_synth.template()


@pytest.fixture(scope="session")
def dlc_synth(tmp_path_factory) -> Synth:
    """The defaults with JV3_RUNTIME=dlc: the pinned GPU DLC image on ml.g5.xlarge."""
    app, stacks = build_app(environ={"JV3_RUNTIME": "dlc"}, outdir=str(tmp_path_factory.mktemp("dlc")))
    return Synth(app, stacks)


@pytest.fixture(scope="session")
def dlc_template(dlc_synth) -> Template:
    return dlc_synth.template()


@pytest.fixture(scope="session")
def full_synth(tmp_path_factory, archive) -> Synth:
    app, stacks = build_app(environ={**FULL_ENV, "JV3_MODEL_ARTIFACT": str(archive)},
                            outdir=str(tmp_path_factory.mktemp("full")))
    return Synth(app, stacks)


@pytest.fixture(scope="session")
def full_template(full_synth) -> Template:
    return full_synth.template(0)


@pytest.fixture(scope="session")
def async_template(full_synth) -> Template:
    return full_synth.template(1)


@pytest.fixture(scope="session")
def gpu_async_template(tmp_path_factory) -> Template:
    """Async on the default GPU type and runtime (byoc), with an existing S3 artifact and no SNS topics."""
    app, stacks = build_app(environ={"JV3_ASYNC": "true", "JV3_ASYNC_NOTIFICATIONS": "false",
                                     "JV3_MODEL_ARTIFACT": "s3://my-models/jina/v3/model.tar.gz"},
                            outdir=str(tmp_path_factory.mktemp("gpu-async")))
    return Template.from_stack(stacks[1])
