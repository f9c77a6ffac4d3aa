"""cdk-nag (AwsSolutions, NIST 800-53 R5) on a separate App, cfn-lint on every template, `make synth` for real.

Both runtimes: ``byoc`` (the default, with the async stack) and ``dlc`` (the full settings).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cdk_nag import AwsSolutionsChecks, NIST80053R5Checks
from infra_support import FULL_ENV

from infra.app import build_app

REPO = Path(__file__).resolve().parents[2]
CFN_LINT = Path(sys.executable).with_name("cfn-lint")


@pytest.fixture(scope="module", params=["byoc", "dlc-full"])
def nag_app(request, tmp_path_factory, archive):
    environ = {"JV3_ASYNC": "true"} if request.param == "byoc" else {**FULL_ENV, "JV3_MODEL_ARTIFACT": str(archive)}
    app, stacks = build_app(environ=environ, outdir=str(tmp_path_factory.mktemp(f"nag-{request.param}")))
    return app, stacks


@pytest.mark.parametrize("pack", [AwsSolutionsChecks, NIST80053R5Checks], ids=["AwsSolutions", "NIST80053R5"])
def test_cdk_nag_finds_nothing_unacknowledged(nag_app, pack):
    app, stacks = nag_app
    report = pack(app, verbose=True).validate_scope(app)
    findings = [(v.rule_name, [r.construct_path for r in v.violating_resources]) for v in report.violations]
    assert report.success, findings
    assert len(stacks) == 2


def test_cdk_nag_does_flag_an_unhardened_bucket():
    """The packs really run: a bare bucket on its own App is reported."""
    from aws_cdk import App, Stack
    from aws_cdk import aws_s3 as s3

    app = App()
    s3.Bucket(Stack(app, "Bare"), "Bucket")
    report = AwsSolutionsChecks(app).validate_scope(app)
    assert not report.success
    assert "AwsSolutions-S1" in {v.rule_name for v in report.violations}


def test_acknowledgements_are_specific(nag_app):
    """Each wildcard acknowledgement names one exact finding, never a whole rule."""
    app, _ = nag_app
    from aws_cdk import Validations

    acknowledged = []
    for construct in app.node.find_all():
        for entry in construct.node.metadata:
            if entry.type == Validations.ACKNOWLEDGED_RULES_METADATA_KEY:
                acknowledged.extend(entry.data)
    iam5 = [rule for rule in acknowledged if "AwsSolutions-IAM5" in rule]
    assert iam5 and all("[Resource::" in rule for rule in iam5), iam5
    assert not any(rule.endswith("AwsSolutions-IAM5") for rule in acknowledged)


FAKE_DOCKER = """#!/bin/sh
echo "$@" >> "{log}"
exit 1
"""


@pytest.fixture(scope="module")
def synthesised_out(tmp_path_factory, archive) -> Path:
    """`make synth`'s command from infra/, with nag plugins on, as a fresh clone would run it.

    The default runtime (byoc) with a ``docker`` that only records its calls, first on PATH and named
    by CDK_DOCKER (the variable CDK uses to find Docker): synthesis must not call it.
    """
    out = tmp_path_factory.mktemp("make-synth")
    bin_dir = tmp_path_factory.mktemp("fake-docker")
    log = bin_dir / "calls.log"
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER.format(log=log))
    docker.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JV3_", "CDK_"))}
    env.update({"CDK_OUTDIR": str(out), "JV3_ASYNC": "true", "JV3_MODEL_ARTIFACT": str(archive),
                "CDK_DOCKER": str(docker), "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"})
    result = subprocess.run([sys.executable, "app.py"], cwd=REPO / "infra", env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not log.exists(), "synthesis ran docker: " + log.read_text()
    return out


def test_synth_writes_every_stack(synthesised_out):
    names = sorted(p.name for p in synthesised_out.glob("*.template.json"))
    assert names == ["Jv3Embeddings.template.json", "Jv3EmbeddingsAsync.template.json"]
    assert list(synthesised_out.glob("asset.*.tar.gz")), "the local archive is staged as a file asset"


def test_byoc_synth_stages_the_image_context_without_docker(synthesised_out):
    """The image is built at deploy (cdk-assets); synthesis only copies its build context into cdk.out."""
    for stack in ("Jv3Embeddings", "Jv3EmbeddingsAsync"):
        manifest = json.loads((synthesised_out / f"{stack}.assets.json").read_text())
        (image,) = manifest["dockerImages"].values()
        assert image["source"]["platform"] == "linux/amd64"
        assert (synthesised_out / image["source"]["directory"] / "Dockerfile").is_file()


def test_cfn_lint_reports_no_errors(synthesised_out, tmp_path):
    templates = sorted(str(p) for p in synthesised_out.glob("*.template.json"))
    result = subprocess.run([str(CFN_LINT), "--format", "parseable", *templates],
                            capture_output=True, text=True, timeout=240)
    errors = [line for line in result.stdout.splitlines() if ":E" in line]
    assert not errors, "\n".join(errors)
    assert result.returncode in (0, 4, 8, 12), result.stdout + result.stderr  # 4 warnings, 8 informational


def test_cfn_lint_on_the_gpu_templates_of_both_runtimes_and_the_dlc_full_stacks(
        default_synth, dlc_synth, full_synth, tmp_path):
    paths = []
    for name, synth, index in [("byoc-default", default_synth, 0), ("dlc-default", dlc_synth, 0),
                               ("dlc-full", full_synth, 0), ("dlc-full-async", full_synth, 1)]:
        path = tmp_path / f"{name}.template.json"
        path.write_text(json.dumps(synth.json(index)))
        paths.append(str(path))
    result = subprocess.run([str(CFN_LINT), "--format", "parseable", *paths],
                            capture_output=True, text=True, timeout=240)
    assert not [line for line in result.stdout.splitlines() if ":E" in line], result.stdout


def test_bad_setting_exits_1_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JV3_", "CDK_"))}
    env.update({"CDK_OUTDIR": str(tmp_path), "JV3_INSTANCE_TYPE": "ml.x9.large"})
    result = subprocess.run([sys.executable, "app.py"], cwd=REPO / "infra", env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [lines[0]] and "unknown instance family 'x9'" in lines[0]
