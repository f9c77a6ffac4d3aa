"""The jv3 command line through typer's CliRunner, and the client's import boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
import numpy as np
import pytest
from botocore.stub import ANY, Stubber
from client_support import body, contract
from typer.testing import CliRunner

from jv3 import aws as client_aws
from jv3.cli import app

runner = CliRunner()


def test_importing_the_client_does_not_import_torch_transformers_or_cdk():
    code = (
        "import sys, jv3, jv3.cli, jv3.batch, jv3.local\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'aws_cdk', 'inference'))\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_client_imports_without_langchain_and_says_how_to_get_it():
    code = (
        "import sys\n"
        "sys.modules['langchain_core'] = None  # as if langchain-core were not installed\n"
        "import jv3, jv3.cli, jv3.batch\n"
        "try:\n"
        "    import jv3.langchain\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'jina-v3-sagemaker[langchain]'" in out


def test_all_lists_the_public_surface():
    import jv3

    assert {"EmbeddingClient", "AsyncEmbeddingClient", "BatchJobs", "ClientError", "InvalidArgument", "EndpointError",
            "BadResponse", "PartialFailure", "DeadlineExceeded", "split_lines"} <= set(jv3.__all__)
    assert all(hasattr(jv3, name) for name in jv3.__all__)
    assert issubclass(jv3.ThrottledError, jv3.EndpointError) and issubclass(jv3.EndpointError, jv3.ClientError)


@pytest.mark.parametrize(
    "args", [[], ["embed"], ["batch"], ["batch", "submit"], ["batch", "status"], ["batch", "fetch"],
             ["batch", "rerun"], ["batch", "local"], ["package"], ["serve"]]
)
def test_every_command_has_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.fixture
def stubbed_runtime(aws_env, monkeypatch):
    runtime = boto3.client("sagemaker-runtime", region_name="us-east-1")
    monkeypatch.setattr(client_aws, "runtime_client", lambda **_: runtime)
    with Stubber(runtime) as stubber:
        yield stubber


def respond(stubber, example, times=1):
    for _ in range(times):
        stubber.add_response("invoke_endpoint", {"Body": body(example["response"])},
                             {"EndpointName": "jv3", "Body": ANY, "ContentType": "application/json",
                              "Accept": "application/json"})


def test_embed_prints_json_from_arguments_with_the_endpoint_from_the_environment(stubbed_runtime):
    example = contract("jina-float.json")
    respond(stubbed_runtime, example)
    result = runner.invoke(app, ["embed", "hello", "wörld 世界", "-d", "8", "--task", "retrieval.passage"],
                           env={"JV3_ENDPOINT_NAME": "jv3"})
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(json.loads(result.stdout), example["decoded"], rtol=1e-6)


def test_embed_reads_stdin_and_writes_csv_and_npy(stubbed_runtime, tmp_path):
    example = contract("jina-ubinary.json")
    respond(stubbed_runtime, example, times=2)
    result = runner.invoke(app, ["embed", "-e", "jv3", "--embedding-type", "ubinary", "--format", "csv"],
                           input="hello\nwörld 世界\n")
    assert result.exit_code == 0, result.output
    assert [list(map(int, row.split(","))) for row in result.stdout.splitlines()] == example["decoded"]
    (tmp_path / "texts.txt").write_text("hello\nwörld 世界\n")
    result = runner.invoke(app, ["embed", "-e", "jv3", "--embedding-type", "ubinary", "-f", str(tmp_path / "texts.txt"),
                                 "--format", "npy", "-o", str(tmp_path / "v.npy")])
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "v.npy")
    assert saved.dtype == np.uint8 and saved.tolist() == example["decoded"]


def test_endpoint_errors_are_one_line_and_exit_code_1(stubbed_runtime):
    error = contract("error-unknown-task.json")["response"]
    stubbed_runtime.add_client_error("invoke_endpoint", "ModelError", "x", 424,
                                     modeled_fields={"OriginalStatusCode": 400, "OriginalMessage": json.dumps(error)})
    result = runner.invoke(app, ["embed", "-e", "jv3", "hello"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: invalid_request: {error['error']['message']} (status 400)"]


def test_bad_arguments_are_one_line_errors(aws_env):
    result = runner.invoke(app, ["embed", "hello"], env={"JV3_ENDPOINT_NAME": ""})
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: no endpoint: pass --endpoint NAME (or set JV3_ENDPOINT_NAME) or --endpoint-url URL"
    result = runner.invoke(app, ["embed", "-e", "jv3", "--late-chunking", "x" * 7_000_000])
    assert result.exit_code == 1 and "late chunking sends all 1 chunks" in result.stderr


def test_batch_submit_status_fetch_with_explicit_settings(batch_aws, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"doc {i}\n" for i in range(7)))
    env = {"JV3_MODEL_NAME": "m", "JV3_INPUT_BUCKET": "jv3-in", "JV3_OUTPUT_BUCKET": "jv3-out"}
    result = runner.invoke(app, ["batch", "submit", str(corpus), "--records-per-part", "5", "-d", "4"], env=env)
    assert result.exit_code == 0, result.output
    job = result.stdout.strip()
    assert job.startswith("jv3-") and "staged 7 records in 2 parts" in result.stderr
    status = runner.invoke(app, ["batch", "status", job])
    assert status.exit_code == 0 and status.stdout.strip() == f"{job}: Completed, 0/2 parts"
    # no outputs yet: fetch saves what there is and fails with a hint to re-run
    fetched = runner.invoke(app, ["batch", "fetch", job, "-o", str(tmp_path / "o")])
    assert fetched.exit_code == 1 and f"jv3 batch rerun {job}" in fetched.stderr
    rerun = runner.invoke(app, ["batch", "rerun", job])
    assert rerun.exit_code == 0 and "re-running 2 of 2 parts" in rerun.stderr


def test_batch_submit_without_settings_names_what_is_missing(aws_env, tmp_path):
    (tmp_path / "c.txt").write_text("a\n")
    result = runner.invoke(app, ["batch", "submit", str(tmp_path / "c.txt")], env={"JV3_STACK_NAME": ""})
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: pass --stack, or all of --model-name, --input-bucket, --output-bucket"


def test_batch_rerun_keeps_the_settings_of_the_job_kms_key_included(batch_aws, tmp_path):
    # the bug: rerun rebuilt the settings from a few fields of the job and dropped the outputs' KMS key
    _, sagemaker = batch_aws
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"doc {i}\n" for i in range(4)))
    key = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
    env = {"JV3_MODEL_NAME": "m", "JV3_INPUT_BUCKET": "jv3-in", "JV3_OUTPUT_BUCKET": "jv3-out", "JV3_KMS_KEY_ARN": key}
    submitted = runner.invoke(app, ["batch", "submit", str(corpus), "--records-per-part", "2",
                                    "--instance-type", "ml.g4dn.xlarge", "--instance-count", "2"], env=env)
    assert submitted.exit_code == 0, submitted.output
    rerun = runner.invoke(app, ["batch", "rerun", submitted.stdout.strip()], env={"JV3_KMS_KEY_ARN": ""})
    assert rerun.exit_code == 0, rerun.output
    first, again = (sagemaker.describe_transform_job(TransformJobName=name)
                    for name in (submitted.stdout.strip(), rerun.stdout.strip()))
    assert first["TransformOutput"]["KmsKeyId"] == key
    assert again["TransformOutput"] == first["TransformOutput"]
    for field in ("ModelName", "TransformResources", "MaxConcurrentTransforms", "Environment"):
        assert again[field] == first[field], field
    assert again["TransformInput"]["DataSource"]["S3DataSource"]["S3DataType"] == "ManifestFile"


def test_pip_installs_one_distinctive_namespace(tmp_path):
    """GIVEN the project built as a wheel THEN it holds jv3 (typed) and its metadata, nothing generic
    (no top-level `inference`, `infra`, `model_package` or `client` to clash with other distributions)."""
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(repo)], check=True, capture_output=True, cwd=tmp_path)  # fmt: skip
    (wheel,) = tmp_path.glob("jina_v3_sagemaker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"jv3", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "jv3/py.typed" in names and "jv3/batch/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "jv3 = jv3.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_package_and_serve_outside_a_checkout_say_where_they_run(tmp_path):
    """pip installs the client alone: `jv3 serve` elsewhere explains instead of a ModuleNotFoundError."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "jv3.cli", "serve", "--model-dir", str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1 and "from a checkout of the jina-v3-sagemaker repository" in done.stderr
