"""python -m model_package: the archive, its code/ alone, vendoring, manifest, upload, Hub refusal."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from model_package import PackageError, build_package
from model_package.build import vendor_wheels
from model_package.upload import upload

from .conftest import REPO, TINY

# Runs with ONLY code/ on sys.path (python -I: no cwd, no PYTHONPATH, no user site; site-packages stay).
CODE_ONLY = r"""
import json, sys
import numpy as np
model_dir = sys.argv[1]
sys.path.insert(0, model_dir + "/code")
assert not any(p and "/work/main" in p and "site-packages" not in p and not p.startswith(model_dir) for p in sys.path), sys.path
import inference
assert inference.__file__.startswith(model_dir), inference.__file__
model = inference.model_fn(model_dir)
golden = json.load(open(sys.argv[2]))
worst = 1.0
for case in golden["outputs"]:
    if case["task"] is None:
        continue  # no-adapter vectors: not something the endpoint serves
    params = {"task": case["task"]} | ({"dimensions": case["dimensions"]} if case["dimensions"] else {})
    body = json.dumps({"data": golden["texts"], "parameters": params})
    out, ctype = inference.output_fn(inference.predict_fn(inference.input_fn(body, "application/json"), model), "application/json")
    got = np.array([d["embedding"] for d in json.loads(out)["data"]])
    ref = np.array(case["embeddings"])
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    worst = min(worst, float(cos.min()))
print(json.dumps({"worst_cosine": worst, "module": inference.__file__}))
"""


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "model.tar.gz"
    done = subprocess.run(
        [sys.executable, "-m", "model_package", "--checkpoint", str(TINY), "--output", str(out), "--no-vendor"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def unpacked(archive, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


def test_archive_layout_and_manifest(archive, unpacked):
    assert [p.name for p in archive.parent.iterdir()] == ["model.tar.gz"]  # no temp file or stage left
    for name in ("config.json", "tokenizer.json", "model.safetensors", "code/inference.py",
                 "code/jv3_inference/engine.py", "code/jv3_inference/protocol.py", "code/requirements.txt"):  # fmt: skip
        assert (unpacked / name).is_file(), name
    manifest = json.loads((unpacked / "manifest.json").read_text())
    assert manifest["checkpoint"]["layout"] == "released" and manifest["checkpoint"]["hidden_size"] == 64
    assert manifest["built_with"]["transformers"] and manifest["entry_point"] == "code/inference.py"
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((unpacked / rel).read_bytes()).hexdigest() == entry["sha256"], rel
    on_disk = {p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*") if p.is_file()}
    assert on_disk - set(manifest["files"]) == {"manifest.json"}
    assert (unpacked / "code/requirements.txt").read_text().splitlines()[0].startswith("transformers==")


def test_code_folder_alone_serves_golden_vectors(unpacked, tmp_path):
    """GIVEN the unpacked archive WHEN python imports `inference` with only code/ on sys.path (as the
    SageMaker toolkit does) THEN the four functions reproduce the reference vectors."""
    script = tmp_path / "check.py"
    script.write_text(CODE_ONLY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JV3_DEVICE": "cpu", "JV3_DTYPE": "float32"}
    done = subprocess.run([sys.executable, "-I", str(script), str(unpacked), str(TINY / "golden.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["module"] == str(unpacked / "code" / "inference.py")
    assert result["worst_cosine"] >= 0.99999


def _tiny_wheel(folder: Path, name="jv3tinydep", version="0.1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as whl:
        for arc, text in files.items():
            whl.writestr(arc, text)
        whl.writestr(f"{info}/RECORD", "".join(f"{arc},,\n" for arc in files) + f"{info}/RECORD,,\n")
    return path


def test_vendoring_offline_from_local_wheels(tmp_path):
    """Vendoring resolves for the DLC's Python/platform, keeps a cache, and code/requirements.txt installs with --no-index."""
    house = tmp_path / "house"
    _tiny_wheel(house)
    names = vendor_wheels(["jv3tinydep==0.1"], tmp_path / "wheels", cache=tmp_path / "cache", find_links=house, no_index=True)
    assert names == ["jv3tinydep-0.1-py3-none-any.whl"] and (tmp_path / "cache" / names[0]).exists()
    # second time from the cache alone
    assert vendor_wheels(["jv3tinydep==0.1"], tmp_path / "w2", cache=tmp_path / "cache", no_index=True) == names

    out = build_package(TINY, tmp_path / "m.tar.gz", requirements=["jv3tinydep==0.1"], wheel_cache=tmp_path / "cache", no_index=True)
    root = tmp_path / "un"
    with tarfile.open(out) as tar:
        tar.extractall(root, filter="data")
    assert (root / "code/requirements.txt").read_text().splitlines() == ["--no-index", "--find-links ./wheels", "jv3tinydep==0.1"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["vendored_wheels"] == names and "code/wheels/" + names[0] in manifest["files"]
    # what the toolkit runs at start-up: pip install -r code/requirements.txt, from another cwd
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--target",
                           str(target), "-r", str(root / "code/requirements.txt")], cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (target / "jv3tinydep.py").exists()


def test_vendoring_failure_is_one_clear_error(tmp_path):
    with pytest.raises(PackageError, match="could not vendor wheels.*--no-vendor"):
        vendor_wheels(["jv3-no-such-package==9"], tmp_path / "w", cache=tmp_path / "c", no_index=True)


def test_invalid_checkpoint_is_refused_before_anything_is_written(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((TINY / name).read_bytes())
    with pytest.raises(PackageError, match="tokenizer.json"):
        build_package(broken, tmp_path / "out" / "model.tar.gz", vendor=False)
    assert not (tmp_path / "out" / "model.tar.gz").exists()


def test_hub_id_offline_is_a_clear_refusal(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "model_package", "--checkpoint", "jinaai/jina-embeddings-v3",
                           "--output", str(tmp_path / "m.tar.gz"), "--no-vendor"], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1
    assert "HF_HUB_OFFLINE is set" in done.stderr and "--checkpoint DIR" in done.stderr
    assert not (tmp_path / "m.tar.gz").exists()


def test_upload_multipart_with_checksums(archive, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    big = tmp_path / "big.tar.gz"
    big.write_bytes(archive.read_bytes() * 12)  # > 2 parts of 5 MiB... with the tiny archive about 10 MB
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="jv3-models")
        assert upload(big, "s3://jv3-models/jv3/model.tar.gz", s3=s3, part_size=5 * 1024 * 1024) == "s3://jv3-models/jv3/model.tar.gz"
        stored = s3.get_object(Bucket="jv3-models", Key="jv3/model.tar.gz")
        assert stored["Body"].read() == big.read_bytes()
        assert stored["ETag"].strip('"').endswith(f"-{-(-big.stat().st_size // (5 * 1024 * 1024))}")

        real_head = s3.head_object
        monkeypatch.setattr(s3, "head_object", lambda **kw: {**real_head(**kw), "ETag": '"0-1"'})
        with pytest.raises(PackageError, match="ETag"):
            upload(big, "s3://jv3-models/jv3/again.tar.gz", s3=s3, part_size=5 * 1024 * 1024)
    with pytest.raises(PackageError, match="expected s3://bucket/key"):
        upload(big, "jv3-models/model.tar.gz")


def test_quickstart_make_run(tmp_path):
    """`make run`: package, serve the unpacked archive, embed through boto3 with every task, stop."""
    done = subprocess.run([sys.executable, "-m", "model_package.quickstart", "--checkpoint", str(TINY)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for task in ("retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"):
        assert f"task={task}" in done.stdout
    assert "ModelError (400)" in done.stdout and "RANDOM weights" in done.stdout and "endpoint stopped" in done.stdout
