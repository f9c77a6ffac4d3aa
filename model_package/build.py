"""Build ``model.tar.gz``: resolve → validate → stage (checkpoint, code/, code/lib) → manifest → tar → rename."""

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
from inference.errors import CheckpointError, SettingsError
from inference.settings import Settings, check_against

CODE_PACKAGE = "jv3_inference"  # the repository's `inference` package, renamed inside code/
REQUIREMENTS = Path(inference.__file__).parent / "requirements.txt"  # the endpoint's pinned dependencies
DEFAULT_PYTHON = "3.12"  # the PyTorch 2.6 inference DLC's Python
DEFAULT_GLIBC = (2, 35)  # the DLC's Ubuntu 22.04
SKIP_NAMES = {".git", ".cache", "__pycache__", ".gitattributes", ".DS_Store"}


def manylinux_platforms(glibc: tuple[int, int] = DEFAULT_GLIBC, arch: str = "x86_64") -> tuple[str, ...]:
    """Every manylinux tag a system with this glibc accepts, newest first (PEP 600 and the legacy aliases).

    pip does not widen a ``--platform`` to older tags by itself, and most wheels the endpoint needs are
    published only as ``manylinux_2_17``/``manylinux2014``: naming one tag finds nothing.
    """
    major, newest = glibc
    tags = [f"manylinux_{major}_{minor}_{arch}" for minor in range(newest, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tuple(tags + [f"{alias}_{arch}" for minor, alias in legacy.items() if minor <= newest])


DEFAULT_PLATFORMS = manylinux_platforms()

SHIM = f'''"""SageMaker's entry module: the toolkit imports ``inference`` from code/ and calls these four functions.

The implementation is the repository's ``inference`` package, copied here as ``{CODE_PACKAGE}``;
its dependencies are installed in code/lib (nothing is pip-installed when the endpoint starts).
"""

import os
import sys

_LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib")
_BUILT_FOR = {{python}}  # the Python the wheels in code/lib were chosen for
if os.path.isdir(_LIB):
    if sys.version_info[:2] != _BUILT_FOR:
        raise RuntimeError(
            "this model.tar.gz was built for Python %d.%d but the container runs %d.%d: rebuild it with "
            "python -m model_package --python-version %d.%d" % (*_BUILT_FOR, *sys.version_info[:2], *sys.version_info[:2])
        )
    if _LIB not in sys.path:
        sys.path.insert(0, _LIB)

from {CODE_PACKAGE}.inference import input_fn, model_fn, output_fn, predict_fn  # noqa: E402

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
        # JV3_* settings exported here must suit this checkpoint too (infra repeats this at synth, from
        # the manifest): a mismatch found now costs nothing, found at start-up it costs a deployment.
        check_against(Settings.resolve(), hidden_size=info["hidden_size"], tasks=info["tasks"])
    except (CheckpointError, SettingsError) as err:
        raise PackageError(f"checkpoint {checkpoint} cannot be served: {err.message}") from None
    requirements = requirements if requirements is not None else pinned_requirements()
    target_python = _python_tuple(python_version)
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
        (code / "inference.py").write_text(SHIM.replace("{python}", repr(target_python)))
        if vendor:
            wheels = install_lib(
                requirements,
                code / "lib",
                cache=wheel_cache,
                find_links=find_links,
                no_index=no_index,
                python_version=python_version,
                platforms=platforms,
            )
        else:  # the toolkit pip-installs code/requirements.txt at start-up: the endpoint needs PyPI
            wheels = []
            (code / "requirements.txt").write_text("\n".join(requirements) + "\n")
        compiled_with = compile_bytecode(code, target_python)
        manifest = _manifest(checkpoint, source, info, requirements, wheels, vendor, python_version, stage)
        manifest["bytecode"] = compiled_with
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _tar(stage, output)
    return output


def _python_tuple(version: str) -> tuple[int, int]:
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        raise PackageError(f"--python-version {version!r} is not MAJOR.MINOR (e.g. {DEFAULT_PYTHON})") from None
    return major, minor


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


def pinned_requirements(path: Path = REQUIREMENTS) -> list[str]:
    """The endpoint's dependencies, ``name==version``, from the one pinned list (inference/requirements.txt)."""
    pins = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            if "==" not in line or line.startswith("-"):
                raise PackageError(f"{path}: {line!r} is not an exact pin (name==version)")
            pins.append(line)
    return pins


def install_lib(
    requirements: list[str],
    dest: Path,
    *,
    cache: str | os.PathLike | None = None,
    find_links: str | os.PathLike | None = None,
    no_index: bool = False,
    python_version: str = DEFAULT_PYTHON,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
) -> list[str]:
    """Install the pinned wheels, built for the DLC's Python and platform, into ``dest`` (code/lib).

    Installed at package time, not pip-installed by the toolkit when the endpoint starts: no network
    at start-up and no seconds spent on pip. The list is the whole closure (``--no-deps``): nothing is
    resolved here, so the archive holds exactly the versions the tests ran. Wheels are downloaded once
    into ``cache`` and found there afterwards, so a second build needs no network.
    """
    cache = Path(cache or os.environ.get("JV3_WHEEL_CACHE") or Path.home() / ".cache" / "jv3" / "wheels")
    cache.mkdir(parents=True, exist_ok=True)
    target = ["--only-binary=:all:", "--no-deps", "--python-version", python_version, "--implementation", "cp"]
    for tag in platforms:
        target += ["--platform", tag]
    sources = ["--find-links", str(cache)] + (["--find-links", str(find_links)] if find_links else [])
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    download = [*pip, "download", *target, *sources, *(["--no-index"] if no_index else []), "--dest", str(cache)]
    _pip(download + list(requirements), "could not download the wheels")
    # from the cache alone: what was just downloaded (or already there) is exactly what gets installed
    install = [*pip, "install", *target, "--no-index", *sources, "--no-compile", "--target", str(dest)]
    _pip(install + list(requirements), "could not install the wheels into code/lib")
    shutil.rmtree(dest / "bin", ignore_errors=True)  # console scripts with this machine's interpreter path
    return sorted(p.name for p in dest.glob("*.dist-info"))


def compile_bytecode(code: Path, target: tuple[int, int]) -> str | None:
    """Byte-compile code/ for the target Python, when one is at hand; return its version, or None.

    Every worker of a new container would otherwise compile transformers and the rest on import
    (seconds of its cold start), and /opt/ml/model may be read-only, so nothing is kept between
    starts. ``checked-hash`` pycs stay valid whatever the archive does to file times.
    """
    wanted = f"{target[0]}.{target[1]}"
    for python in (sys.executable, shutil.which(f"python{wanted}")):
        if not python:
            continue
        probe = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)  # fmt: skip
        if probe.returncode != 0 or probe.stdout.strip() != wanted:
            continue
        done = subprocess.run([python, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "checked-hash",
                               str(code)], capture_output=True, text=True)  # fmt: skip
        if done.returncode == 0:
            return wanted
    return None


def _pip(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if not ln.startswith("WARNING: Location")]
        raise PackageError(
            f"{what} (" + " / ".join(lines[-3:]) + "); pass --find-links DIR with the wheels, "
            "or --no-vendor if the endpoint can reach PyPI"
        )


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
        "vendored": (
            {"path": "code/lib", "python": python_version, "distributions": wheels} if vendored else None
        ),
        "target": {"container": "AWS DLC PyTorch inference (sagemaker-pytorch-inference-toolkit)", "python": python_version},
        "built_with": {
            "python": platform.python_version(),
            **{name: _version(name) for name in ("jina-v3-sagemaker", "torch", "transformers", "numpy")},
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
