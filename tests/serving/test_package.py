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
from model_package.build import install_lib
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
import transformers
print(json.dumps({"worst_cosine": worst, "module": inference.__file__, "transformers": transformers.__file__}))
"""


THIS_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
DLC_PROVIDES = {"torch", "numpy"}  # what the PyTorch DLC ships, left out of code/lib


def _package(out: Path, *extra: str) -> Path:
    """The documented command, as a user types it (plus ``extra``)."""
    done = subprocess.run(
        [sys.executable, "-m", "model_package", "--checkpoint", str(TINY), "--output", str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _unpack(archive: Path, root: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """``python -m model_package --checkpoint fixtures/jina-v3-tiny --output model.tar.gz``: defaults, real wheels."""
    return _package(tmp_path_factory.mktemp("pkg") / "model.tar.gz")


@pytest.fixture(scope="module")
def unpacked(archive, tmp_path_factory) -> Path:
    return _unpack(archive, tmp_path_factory.mktemp("unpacked"))


def test_archive_layout_and_manifest(archive, unpacked):
    assert [p.name for p in archive.parent.iterdir()] == ["model.tar.gz"]  # no temp file or stage left
    for name in ("config.json", "tokenizer.json", "model.safetensors", "code/inference.py",
                 "code/jv3_inference/engine.py", "code/jv3_inference/protocol.py",
                 "code/jv3_inference/sagemaker_service.py", "code/lib/transformers/__init__.py",
                 "code/lib/tokenizers/__init__.py", "code/lib/safetensors/__init__.py"):  # fmt: skip
        assert (unpacked / name).is_file(), name
    # nothing for the toolkit to pip-install at start-up (no network, no seconds spent), no stray scripts
    assert not (unpacked / "code/requirements.txt").exists() and not (unpacked / "code/lib/bin").exists()
    manifest = json.loads((unpacked / "manifest.json").read_text())
    assert manifest["checkpoint"]["layout"] == "released" and manifest["checkpoint"]["hidden_size"] == 64
    assert manifest["built_with"]["transformers"] and manifest["entry_point"] == "code/inference.py"
    assert manifest["vendored"]["path"] == "code/lib" and manifest["vendored"]["python"] == "3.12"
    if manifest["bytecode"] == "3.12":  # a Python 3.12 was at hand: code/lib ships its bytecode
        assert list((unpacked / "code/lib/transformers").glob("__pycache__/__init__.cpython-312.pyc"))
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((unpacked / rel).read_bytes()).hexdigest() == entry["sha256"], rel
    on_disk = {p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*") if p.is_file()}
    assert on_disk - set(manifest["files"]) == {"manifest.json"}


def _distributions(lib: Path) -> dict[str, tuple[str, list[str]]]:
    """name → (version, Requires-Dist lines) of every distribution installed in ``lib``."""
    from email.parser import Parser

    from packaging.utils import canonicalize_name

    found = {}
    for info in lib.glob("*.dist-info"):
        meta = Parser().parsestr((info / "METADATA").read_text())
        found[canonicalize_name(meta["Name"])] = (meta["Version"], meta.get_all("Requires-Dist") or [])
    return found


def test_lib_holds_exactly_the_pins_and_their_whole_closure(unpacked):
    """code/lib is the pinned list, no more and no less, and nothing in it needs what is neither there
    nor in the DLC (markers evaluated for the DLC: CPython 3.12 on x86_64 Linux)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from model_package.build import pinned_requirements

    lib = _distributions(unpacked / "code/lib")
    pins = {canonicalize_name(r.split("==")[0]): r.split("==")[1] for r in pinned_requirements()}
    assert {name: version for name, (version, _) in lib.items()} == pins
    dlc = {"python_version": "3.12", "python_full_version": "3.12.8", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip
    unmet = []
    for name, (_, requires) in lib.items():
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(dlc):
                continue
            dep = canonicalize_name(req.name)
            if dep in DLC_PROVIDES:
                continue
            if dep not in lib or not req.specifier.contains(lib[dep][0], prereleases=True):
                unmet.append(f"{name} needs {line}")
    assert unmet == []


def test_one_list_of_pins(unpacked):
    """inference/requirements.txt is the one list: pyproject's engine extra, the Dockerfile and make setup agree."""
    import tomllib

    from model_package.build import pinned_requirements

    pins = set(pinned_requirements())
    engine = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["engine"]
    exact = {r for r in engine if "==" in r}
    assert exact and exact <= pins, exact - pins
    assert any(r.startswith("torch>=2.6") for r in engine)  # the DLC's torch is the oldest the engine runs on
    assert "inference/requirements.txt" in (REPO / "Dockerfile").read_text()
    assert "-c inference/requirements.txt" in (REPO / "Makefile").read_text()
    from importlib.metadata import version

    for pin in exact:  # and the suite runs exactly them
        name, wanted = pin.split("==")
        assert version(name) == wanted, f"the test environment has {name} {version(name)}, the pin says {wanted}"


def test_every_manylinux_tag_of_the_dlc_is_accepted():
    from model_package.build import DEFAULT_PLATFORMS, manylinux_platforms

    assert DEFAULT_PLATFORMS == manylinux_platforms((2, 35))
    for tag in ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                "manylinux2010_x86_64", "manylinux1_x86_64"):  # fmt: skip
        assert tag in DEFAULT_PLATFORMS
    assert "manylinux_2_36_x86_64" not in DEFAULT_PLATFORMS


def test_code_folder_alone_serves_golden_vectors(tmp_path):
    """GIVEN an archive built for this machine's Python WHEN python imports `inference` with only code/
    on sys.path (as the SageMaker toolkit does) THEN transformers comes from code/lib and the four
    functions reproduce the reference vectors."""
    unpacked = _unpack(_package(tmp_path / "m.tar.gz", "--python-version", THIS_PYTHON), tmp_path / "un")
    script = tmp_path / "check.py"
    script.write_text(CODE_ONLY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JV3_DEVICE": "cpu", "JV3_DTYPE": "float32"}
    done = subprocess.run([sys.executable, "-I", str(script), str(unpacked), str(TINY / "golden.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["module"] == str(unpacked / "code" / "inference.py")
    assert result["transformers"].startswith(str(unpacked / "code" / "lib"))
    assert json.loads((unpacked / "manifest.json").read_text())["bytecode"] == THIS_PYTHON
    assert list((unpacked / "code/lib/transformers/__pycache__").glob("*.pyc"))
    assert result["worst_cosine"] >= 0.99999


def test_archive_for_another_python_says_so(unpacked, tmp_path):
    """code/lib holds CPython 3.12 wheels: on any other Python the entry module refuses by name."""
    if THIS_PYTHON == "3.12":
        pytest.skip("this machine runs the DLC's Python")
    done = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); import inference",
                           str(unpacked / "code")], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1
    assert f"built for Python 3.12 but the container runs {THIS_PYTHON}" in done.stderr
    assert f"--python-version {THIS_PYTHON}" in done.stderr


def test_no_vendor_writes_the_pins_for_pip(tmp_path):
    root = _unpack(_package(tmp_path / "m.tar.gz", "--no-vendor"), tmp_path / "un")
    from model_package.build import pinned_requirements

    assert (root / "code/requirements.txt").read_text().splitlines() == pinned_requirements()
    assert not (root / "code/lib").exists()
    assert json.loads((root / "manifest.json").read_text())["vendored"] is None


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


def test_vendoring_offline_from_local_wheels_then_from_the_cache(tmp_path):
    """--find-links/--no-index vendor with no network; the cache alone serves the next build."""
    house = tmp_path / "house"
    _tiny_wheel(house)
    names = install_lib(["jv3tinydep==0.1"], tmp_path / "lib", cache=tmp_path / "cache", find_links=house, no_index=True)
    assert names == ["jv3tinydep-0.1.dist-info"] and (tmp_path / "lib" / "jv3tinydep.py").exists()
    assert (tmp_path / "cache" / "jv3tinydep-0.1-py3-none-any.whl").exists()
    assert install_lib(["jv3tinydep==0.1"], tmp_path / "lib2", cache=tmp_path / "cache", no_index=True) == names


def test_vendoring_failure_is_one_clear_error(tmp_path):
    with pytest.raises(PackageError, match="could not download the wheels.*--no-vendor"):
        install_lib(["jv3-no-such-package==9"], tmp_path / "w", cache=tmp_path / "c", no_index=True)


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
