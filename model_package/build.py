"""Build ``model.tar.gz``: resolve → select → validate → stage (checkpoint, code/, code/lib) → manifest → tar → rename.

Only the files the endpoint reads are packed (an allow-list, plus ``--include``), no symlink leads
out of the checkpoint, and the checkpoint is validated in full before anything is copied: the
archive goes to S3 and a bad one fails only when an endpoint starts, minutes and money later.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

import inference
from inference.checkpoint import adapter_dirs, validate_checkpoint, weight_files
from inference.errors import CheckpointError, SettingsError
from inference.settings import Settings, check_against

CODE_PACKAGE = "jv3_inference"  # the repository's `inference` package, renamed inside code/
REQUIREMENTS = Path(inference.__file__).parent / "requirements.txt"  # the endpoint's pinned dependencies
DEFAULT_PYTHON = "3.12"  # the PyTorch 2.6 inference DLC's Python
DEFAULT_GLIBC = (2, 35)  # the DLC's Ubuntu 22.04
SKIP_NAMES = {".git", ".cache", "__pycache__", ".gitattributes", ".DS_Store"}

# What the endpoint reads besides the weights (inference/checkpoint.py, inference/engine.py): config.json
# and tokenizer.json. The other tokenizer files are not read but belong with tokenizer.json (a client
# can rebuild the tokenizer from the archive). Everything else (optimizer.pt, onnx/, README.md) stays out
# unless --include names it: an archive is downloaded by every instance at every start.
ALLOWED_NAMES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")  # fmt: skip
INDEX = "model.safetensors.index.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RESERVED = ("code", "manifest.json")  # written by the packager: a checkpoint's own would be overwritten

# Temp names carry their owner (pid@host), so that the next run in the folder can tell a killed
# build's leftovers from a build still running: STAGE_PREFIX + owner + "-" + random for the staging
# folder, "." + archive name + "." + owner + "." + random + ".tmp" for the archive being written.
STAGE_PREFIX = ".jv3-stage-"
STALE_AFTER_S = 3600  # a leftover whose owner cannot be checked (another host, an older name) is stale after this
_OWNER = r"(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)"
STAGE_NAME = re.compile(rf"^{re.escape(STAGE_PREFIX)}(?:{_OWNER}-)?[a-z0-9_]+$")
TMP_NAME = re.compile(rf"^\..+\.{_OWNER}\.[a-z0-9_]+\.tmp$")
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


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


class Interrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP during a build, raised where the build is.

    A BaseException, so that no ``except Exception`` on the way turns it into another error, and every
    ``with`` and ``except BaseException`` on the way out removes what it made (the staging folder, the
    .tmp archive): without it, a killed build leaves a copy of the checkpoint beside the output."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@dataclass
class Selection:
    """What goes into the archive: archive path → the file's real path (symlinks resolved and checked)."""

    files: dict[str, Path]
    left_out: list[str] = field(default_factory=list)  # checkpoint files not packed, relative paths


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
    include: Iterable[str] = (),
    notify: Callable[[str], None] | None = None,
) -> Path:
    """Write the archive atomically (a temp file beside ``output``, then a rename); return its path.

    ``include``: globs over paths in the checkpoint, packed besides the files the endpoint reads.
    ``notify``: called with one line per thing worth telling (files left out, leftovers removed)."""
    say = notify or (lambda line: None)
    output = Path(output).resolve()
    include = list(include)
    with _interruptible():
        source = resolve_checkpoint(checkpoint, revision=revision)
        try:
            selection = select_files(source, include)  # before validation reads a file through a link
            info = validate_checkpoint(source, thorough=True)
            # JV3_* settings exported here must suit this checkpoint too (infra repeats this at synth, from
            # the manifest): a mismatch found now costs nothing, found at start-up it costs a deployment.
            check_against(Settings.resolve(), hidden_size=info["hidden_size"], tasks=info["tasks"])
        except (CheckpointError, SettingsError) as err:
            raise PackageError(f"checkpoint {checkpoint} cannot be served: {err.message}") from None
        requirements = requirements if requirements is not None else pinned_requirements()
        target_python = _python_tuple(python_version)
        output.parent.mkdir(parents=True, exist_ok=True)
        removed = remove_stale(output.parent, output.name)
        if removed:
            say(f"removed {len(removed)} leftover(s) of killed builds in {output.parent}: {', '.join(removed)}")
        if selection.left_out:
            say(f"left out {len(selection.left_out)} file(s) the endpoint does not read: {_names(selection.left_out)} "
                "(listed in manifest.json; --include GLOB packs one)")  # fmt: skip
        with _staging(output.parent) as stage:
            _copy_selection(selection, stage)
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
            manifest["include"] = include
            manifest["left_out"] = selection.left_out
            (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            _tar(stage, output)
    return output


@contextlib.contextmanager
def _interruptible():
    """While the build runs, SIGTERM/SIGINT/SIGHUP raise ``Interrupted`` so the cleanup on the way out runs.

    The default SIGTERM action ends the process at once and leaves the staging copy (the checkpoint's
    size) and the partial .tmp behind. A second signal is ignored, so it cannot cut that cleanup
    short; a signal already ignored (nohup) stays ignored. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for sig, old in previous.items():
        if old is not signal.SIG_IGN:
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _staging(parent: Path):
    """A fresh staging folder in ``parent``, removed on the way out however the build ends."""
    stage = None
    try:
        with _signals_held():  # a signal between mkdtemp and `stage = ...` would leave the folder behind
            stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{_owner()}-", dir=parent))
        yield stage
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGTERM/SIGINT/SIGHUP while a temp path is created and recorded: a signal then arrives
    when the block ends, by which time the cleanup knows the path (``_interruptible`` turns it into
    ``Interrupted`` there). Only the main thread's handlers run Python code, so elsewhere nothing is held."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _owner() -> str:
    """``pid@host`` for temp names: the host short name, reduced to what the name patterns accept."""
    host = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname().split(".")[0]) or "localhost"
    return f"{os.getpid()}@{host}"


def remove_stale(folder: Path, output_name: str, *, now: float | None = None) -> list[str]:
    """Remove the staging folders and .tmp archives that killed builds (SIGKILL, a crash) left in ``folder``.

    A leftover is stale when its owner, named in it, is a process of this host that is gone; one whose
    owner cannot be checked (another host sharing the folder, a name from before owners were recorded)
    when it is older than STALE_AFTER_S. A build still running keeps its files. Returns the names removed."""
    now = time.time() if now is None else now
    this_host = _owner().split("@", 1)[1]
    removed = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        match = STAGE_NAME.match(name) if entry.is_dir() and not entry.is_symlink() else TMP_NAME.match(name)
        legacy = name.startswith(f".{output_name}.") and name.endswith(".tmp") and entry.is_file()
        if not (match or legacy):
            continue
        pid = int(match["pid"]) if match and match["pid"] else None
        if pid is not None and match["host"] == this_host:
            stale = not _alive(pid)
        else:
            try:
                stale = now - entry.lstat().st_mtime > STALE_AFTER_S
            except FileNotFoundError:  # removed meanwhile by its owner
                continue
        if stale:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


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


def select_files(source: Path, include: Iterable[str] = ()) -> Selection:
    """The checkpoint files to pack: the allow-list and ``include``'s matches, each a regular file inside
    the checkpoint (or its Hub cache folder). Nothing is read here but the weight index, after its check.

    Raises PackageError naming a symlink that leads out, or an --include that matches nothing."""
    roots = allowed_roots(source)
    wanted = [name for name in (*ALLOWED_NAMES, INDEX) if os.path.lexists(source / name)]
    for rel in wanted:  # checked before weight_files reads the index or validation reads the rest
        _real_file(source, rel, roots)
    if "config.json" in wanted:  # without it there is nothing to select: validation says so
        wanted += [_relative(source, path) for path in weight_files(source)]
        wanted += [f"{folder.name}/{name}" for folder in adapter_dirs(source).values() for name in ADAPTER_FILES
                   if os.path.lexists(folder / name)]  # fmt: skip
    present = sorted(_walk(source))
    extra = _included(present, list(include))
    files = {rel: _real_file(source, rel, roots) for rel in dict.fromkeys([*wanted, *extra])}
    packed = {prefix for rel in files for prefix in _prefixes(rel)}  # a linked adapter folder is packed, not left out
    return Selection(files=files, left_out=[rel for rel in present if rel not in packed])


def allowed_roots(source: Path) -> tuple[Path, ...]:
    """Where a symlink in the checkpoint may lead: the checkpoint itself and, for a Hugging Face Hub cache
    snapshot (``models--org--name/snapshots/REV``, whose files link to ``../../blobs/``), the repo's cache folder."""
    real = source.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real, real.parent.parent
    return (real,)


def _real_file(source: Path, rel: str, roots: tuple[Path, ...]) -> Path:
    """The real path of ``source/rel``, refused when a symlink on the way leads out of ``roots`` (one to
    /proc/self/environ would pack the packager's AWS keys into an archive bound for S3) or when it is
    no regular file (a FIFO or a device would hang or fill the archive)."""
    path = source / rel
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in roots):
        how = "is a symlink to" if path.is_symlink() else "leads to"
        raise PackageError(
            f"{rel} in {source} {how} {real}, outside the checkpoint"
            + (" and its Hub cache folder" if len(roots) > 1 else "")
            + "; copy the file into the checkpoint or remove the link"
        )
    if not real.is_file():
        kind = "missing" if not real.exists() else "not a regular file"
        raise PackageError(f"{rel} in {source} is {kind} ({real}); expected a file")
    return real


def _relative(source: Path, path: Path) -> str:
    """A path under ``source`` as an archive name; one that climbs out (``../`` or an absolute path in
    an index) comes back as ``../…`` so that _real_file refuses it by name."""
    return Path(os.path.relpath(os.path.normpath(path), os.path.normpath(source))).as_posix()


def _walk(source: Path):
    """Every file under ``source`` as a relative posix path; hidden entries (``.git``, ``.cache``)
    are neither walked nor packed, and linked folders are not walked (a link is listed as itself)."""
    for folder, dirs, names in os.walk(source):
        base = Path(folder)
        keep = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_NAMES)
        dirs[:] = [d for d in keep if not (base / d).is_symlink()]
        for name in sorted([*names, *(d for d in keep if (base / d).is_symlink())]):
            if not name.startswith(".") and name not in SKIP_NAMES:
                yield (base / name).relative_to(source).as_posix()


def _included(present: list[str], include: list[str]) -> list[str]:
    """The files each --include glob matches (by path, or by a folder it is in: ``onnx`` packs onnx/)."""
    chosen = []
    for pattern in include:
        hits = [rel for rel in present if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in _prefixes(rel))]
        if not hits:
            raise PackageError(
                f"--include {pattern!r} matches no file of the checkpoint; its files are {_names(present)} "
                "(globs match paths relative to the checkpoint; hidden files are never packed)"
            )
        reserved = [rel for rel in hits if rel.split("/")[0] in RESERVED]
        if reserved:
            raise PackageError(
                f"--include {pattern!r} matches {_names(reserved)}: code/ and manifest.json are written by the "
                "packager and cannot come from the checkpoint"
            )
        chosen += hits
    return chosen


def _prefixes(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[: n + 1]) for n in range(len(parts))]


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _copy_selection(selection: Selection, stage: Path) -> None:
    for rel, real in selection.files.items():
        target = stage / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, target)  # the real path checked in select_files: Hub snapshots link into blobs/


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
    tmp = None
    try:
        with _signals_held():  # a signal between mkstemp and `tmp = ...` would leave a .tmp behind
            fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.{_owner()}.", suffix=".tmp", dir=output.parent)
            os.close(fd)
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
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


class _Progress:
    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def read(self, n=-1):
        block = self.f.read(n)
        self.bar.update(len(block))
        return block
