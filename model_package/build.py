"""Build ``model.tar.gz``: resolve → validate → stage (checkpoint, code/, wheels) → manifest → tar → rename."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

import inference
from inference.checkpoint import validate_checkpoint
from inference.errors import CheckpointError

CODE_PACKAGE = "jv3_inference"  # the repository's `inference` package, renamed inside code/
DEFAULT_PYTHON = "3.12"  # the PyTorch 2.6 inference DLC's Python
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64",)  # pip also accepts older manylinux tags under it
# What the PyTorch DLC lacks (it ships torch and numpy); pinned to the versions this repo tests with.
VENDORED = ("transformers", "tokenizers", "safetensors", "huggingface_hub")
SKIP_NAMES = {".git", ".cache", "__pycache__", ".gitattributes", ".DS_Store"}

SHIM = f'''"""SageMaker's entry module: the toolkit imports ``inference`` from code/ and calls these four functions.

The implementation is the repository's ``inference`` package, copied here as ``{CODE_PACKAGE}``.
"""

from {CODE_PACKAGE}.inference import input_fn, model_fn, output_fn, predict_fn

__all__ = ["model_fn", "input_fn", "predict_fn", "output_fn"]
'''


class PackageError(Exception):
    """A package that cannot be built; the message says why and what to do."""


def build_package(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike = "model.tar.gz",
    *,
    vendor: bool = True,
    wheel_cache: str | os.PathLike | None = None,
    find_links: str | os.PathLike | None = None,
    no_index: bool = False,
    python_version: str = DEFAULT_PYTHON,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
    requirements: list[str] | None = None,
    revision: str | None = None,
) -> Path:
    """Write the archive atomically (a temp file beside ``output``, then a rename); return its path."""
    output = Path(output).resolve()
    source = resolve_checkpoint(checkpoint, revision=revision)
    try:
        info = validate_checkpoint(source)
    except CheckpointError as err:
        raise PackageError(f"checkpoint {checkpoint} cannot be served: {err.message}") from None
    requirements = requirements if requirements is not None else pinned_requirements()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".jv3-stage-", dir=output.parent) as stage_name:
        stage = Path(stage_name)
        _copy_checkpoint(source, stage)
        code = stage / "code"
        shutil.copytree(
            Path(inference.__file__).parent,
            code / CODE_PACKAGE,
            ignore=lambda d, names: [n for n in names if n in SKIP_NAMES or not n.endswith(".py")],
        )
        (code / "inference.py").write_text(SHIM)
        lines = list(requirements)
        if vendor:
            wheels = vendor_wheels(
                requirements,
                code / "wheels",
                cache=wheel_cache,
                find_links=find_links,
                no_index=no_index,
                python_version=python_version,
                platforms=platforms,
            )
            lines = ["--no-index", "--find-links ./wheels", *requirements]
        else:
            wheels = []
        (code / "requirements.txt").write_text("\n".join(lines) + "\n")
        manifest = _manifest(checkpoint, source, info, requirements, wheels, vendor, python_version, stage)
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _tar(stage, output)
    return output


def resolve_checkpoint(checkpoint: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local directory as is; a Hub id (``org/name``) downloaded with ``huggingface_hub``."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path
    text = str(checkpoint)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise PackageError(f"checkpoint {text!r} is not a directory (nor a Hugging Face Hub id like jinaai/jina-embeddings-v3)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PackageError(f"{text!r} looks like a Hub id but huggingface_hub is not installed") from None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated, no network: one clear line
        hint = (
            "HF_HUB_OFFLINE is set, so nothing is downloaded"
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            else "no network or no access"
        )
        raise PackageError(
            f"cannot download {text!r} from the Hugging Face Hub ({hint}: {type(exc).__name__}). "
            f"Download it where there is network (huggingface-cli download {text} --local-dir DIR) "
            f"and pass --checkpoint DIR"
        ) from None


def pinned_requirements() -> list[str]:
    """``name==version`` of each vendored dependency, as installed here (what the tests ran with)."""
    pins = []
    for name in VENDORED:
        try:
            pins.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            raise PackageError(f"{name} is not installed here, so its version cannot be pinned") from None
    return pins


def vendor_wheels(
    requirements: list[str],
    dest: Path,
    *,
    cache: str | os.PathLike | None = None,
    find_links: str | os.PathLike | None = None,
    no_index: bool = False,
    python_version: str = DEFAULT_PYTHON,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
) -> list[str]:
    """``pip download`` the requirements and their dependencies (binary wheels for the DLC) into ``dest``.

    Wheels are kept in ``cache`` (and looked up there first), so a second build needs no network.
    """
    cache = Path(cache or os.environ.get("JV3_WHEEL_CACHE") or Path.home() / ".cache" / "jv3" / "wheels")
    cache.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
           "--only-binary=:all:", "--python-version", python_version, "--dest", str(dest),
           "--find-links", str(cache)]  # fmt: skip
    for tag in platforms:
        cmd += ["--platform", tag]
    if find_links:
        cmd += ["--find-links", str(find_links)]
    if no_index:
        cmd.append("--no-index")
    cmd += list(requirements)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise PackageError(
            "could not vendor wheels (" + " / ".join(tail) + "); pass --find-links DIR with the wheels, "
            "or --no-vendor if the endpoint can reach PyPI"
        )
    names = sorted(p.name for p in dest.glob("*.whl"))
    for name in names:
        if not (cache / name).exists():
            shutil.copy2(dest / name, cache / name)
    return names


def _copy_checkpoint(source: Path, stage: Path) -> None:
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part in SKIP_NAMES or part.startswith(".") for part in rel.parts) or rel.parts[0] == "code":
            continue
        target = stage / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path.resolve(), target)  # resolve: Hub snapshots are symlinks into blobs/


def _manifest(checkpoint, source, info, requirements, wheels, vendored, python_version, stage: Path) -> dict:
    files = {}
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        rel = path.relative_to(stage).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return {
        "format": 1,
        "model": "jina-embeddings-v3",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "checkpoint": {"source": str(checkpoint), **{k: v for k, v in info.items() if k != "files"}},
        "entry_point": "code/inference.py",
        "code_package": CODE_PACKAGE,
        "requirements": requirements,
        "vendored_wheels": wheels if vendored else None,
        "target": {"container": "AWS DLC PyTorch inference (sagemaker-pytorch-inference-toolkit)", "python": python_version},
        "built_with": {
            "python": platform.python_version(),
            **{name: _version(name) for name in ("jina-v3-sagemaker", "torch", *VENDORED, "numpy")},
        },
        "files": files,
    }


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _tar(stage: Path, output: Path) -> None:
    """gzip level 1: weights barely compress, and level 9 would take minutes on a 1 GB checkpoint."""
    paths = sorted(p for p in stage.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in paths)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        with (
            tarfile.open(tmp, "w:gz", compresslevel=1) as tar,
            tqdm(total=total, unit="B", unit_scale=True, desc=output.name, disable=None if total > 64 << 20 else True) as bar,
        ):
            for path in paths:
                info = tar.gettarinfo(str(path), arcname=path.relative_to(stage).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with open(path, "rb") as f:
                    tar.addfile(info, _Progress(f, bar))
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Progress:
    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def read(self, n=-1):
        block = self.f.read(n)
        self.bar.update(len(block))
        return block
