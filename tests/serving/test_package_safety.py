"""python -m model_package packs only what the endpoint reads, follows no symlink out of the checkpoint,
refuses a checkpoint that would fail at start-up before copying anything, and leaves no temp file
behind when it is stopped (issue 10, item 7 "Safe packaging").

Every build here uses --no-vendor: vendoring is tested in test_package.py.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.checkpoint import expected_shapes
from model_package import PackageError, build_package
from model_package.build import STALE_AFTER_S, _owner, remove_stale

from .conftest import REPO, TINY

SERVED = {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "manifest.json"}


def copy_tiny(tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(TINY, tmp_path / name))


def package(ckpt: Path, out: Path, *extra: str, env: dict | None = None, wait: bool = True):
    """The documented command, as a user types it; ``wait=False`` returns the running process."""
    cmd = [sys.executable, "-m", "model_package", "--checkpoint", str(ckpt), "--output", str(out), "--no-vendor", *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def checkpoint_files(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        return {name for name in tar.getnames() if not name.startswith("code/")}


def manifest(archive: Path) -> dict:
    with tarfile.open(archive) as tar:
        return json.load(tar.extractfile("manifest.json"))


def edit_config(ckpt: Path, **changes) -> Path:
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | changes))
    return ckpt


# ---------------------------------------------------------------------------------------------
# 1. An allow-list, --include for anything else


def test_only_the_files_the_endpoint_reads_are_packed(tmp_path):
    """GIVEN a checkpoint folder holding an optimizer state, an ONNX export, notes and the fixture's
    README.md and golden.json WHEN it is packaged THEN the archive holds config, tokenizer and weights
    only, and the rest is named in one line of output and in manifest.json."""
    ckpt = copy_tiny(tmp_path)
    (ckpt / "optimizer.pt").write_bytes(b"\0" * 4096)
    (ckpt / "onnx").mkdir()
    (ckpt / "onnx" / "model.onnx").write_bytes(b"onnx")
    (ckpt / "notes.txt").write_text("training notes")
    done = package(ckpt, tmp_path / "out" / "m.tar.gz")
    assert done.returncode == 0, done.stderr[-3000:]
    left_out = ["README.md", "golden.json", "notes.txt", "onnx/model.onnx", "optimizer.pt"]
    assert checkpoint_files(tmp_path / "out" / "m.tar.gz") == SERVED
    assert manifest(tmp_path / "out" / "m.tar.gz")["left_out"] == left_out
    lines = [line for line in done.stdout.splitlines() if line.startswith("left out")]
    assert lines == [f"left out 5 file(s) the endpoint does not read: {', '.join(left_out)} "
                     "(listed in manifest.json; --include GLOB packs one)"]  # fmt: skip


def test_include_packs_more_and_a_glob_that_matches_nothing_is_refused(tmp_path):
    ckpt = copy_tiny(tmp_path)
    (ckpt / "onnx").mkdir()
    (ckpt / "onnx" / "model.onnx").write_bytes(b"onnx")
    (ckpt / "code").mkdir()
    (ckpt / "code" / "inference.py").write_text("raise SystemExit")  # would replace the packager's entry module
    archive = build_package(ckpt, tmp_path / "m.tar.gz", vendor=False, include=["onnx", "*.md"])
    assert checkpoint_files(archive) == SERVED | {"onnx/model.onnx", "README.md"}
    assert manifest(archive)["left_out"] == ["code/inference.py", "golden.json"]
    assert manifest(archive)["include"] == ["onnx", "*.md"]
    with pytest.raises(PackageError, match=r"--include '\*\.bin' matches no file of the checkpoint; its files are README.md, "):
        build_package(ckpt, tmp_path / "m2.tar.gz", vendor=False, include=["*.bin"])
    with pytest.raises(PackageError, match=r"--include 'code/\*' matches code/inference.py: code/ and manifest.json are written by the packager"):
        build_package(ckpt, tmp_path / "m3.tar.gz", vendor=False, include=["code/*"])


def write_hf_layout(out: Path) -> Path:
    """The -hf layout's files (transformers' weights, one PEFT folder per task), with shapes right and
    values random: what packaging reads, without the 20 s of writing it through transformers and PEFT."""
    out.mkdir()
    config = json.loads((TINY / "config.json").read_text())
    for key in ("lora_adaptations", "lora_rank", "lora_alpha", "rotary_emb_base"):
        config.pop(key)
    (out / "config.json").write_text(json.dumps(config | {"rope_parameters": {"rope_theta": 20000.0}}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, out / name)
    save_file({name: torch.randn(shape) for name, shape in expected_shapes(config).items()}, str(out / "model.safetensors"))
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    for folder in ("retrieval_query", "retrieval_passage", "separation", "classification", "text_matching"):
        (out / folder).mkdir()
        (out / folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 1, "target_modules": ["fc1"]}))
        tensors = {}
        for n in range(layers):
            tensors[f"base_model.model.layers.{n}.mlp.fc1.lora_A.weight"] = torch.randn(4, h)
            tensors[f"base_model.model.layers.{n}.mlp.fc1.lora_B.weight"] = torch.randn(i, 4)
        save_file(tensors, str(out / folder / "adapter_model.safetensors"))
        (out / folder / "README.md").write_text("PEFT model card")
    return out


def test_hf_layout_packs_its_adapter_folders_and_sharded_weights_their_index(tmp_path):
    ckpt = write_hf_layout(tmp_path / "hf")
    (ckpt / "checkpoint-500").mkdir()
    (ckpt / "checkpoint-500" / "optimizer.pt").write_bytes(b"\0" * 1024)
    # the base weights in two shards and their index, as save_pretrained writes a large model
    tensors = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(ckpt / shard))
    index = {"metadata": {}, "weight_map": {n: shard for shard, part in shards.items() for n in part}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))

    archive = build_package(ckpt, tmp_path / "m.tar.gz", vendor=False)
    adapters = {f"{folder}/{name}" for folder in ("retrieval_query", "retrieval_passage", "separation", "classification",
                "text_matching") for name in ("adapter_config.json", "adapter_model.safetensors")}  # fmt: skip
    assert checkpoint_files(archive) == (SERVED - {"model.safetensors"}) | set(shards) | {"model.safetensors.index.json"} | adapters
    assert manifest(archive)["checkpoint"]["layout"] == "hf"
    assert "checkpoint-500/optimizer.pt" in manifest(archive)["left_out"]
    assert "retrieval_query/README.md" in manifest(archive)["left_out"]


# ---------------------------------------------------------------------------------------------
# 2. Symlinks followed only inside the checkpoint or its Hub cache folder


def test_a_symlink_out_of_the_checkpoint_is_refused_by_name_with_its_target(tmp_path):
    ckpt = copy_tiny(tmp_path)
    (ckpt / "tokenizer_config.json").unlink()
    (ckpt / "tokenizer_config.json").symlink_to("/proc/self/environ")
    with pytest.raises(PackageError, match=r"tokenizer_config.json in .* is a symlink to /proc/\d+/environ, outside the checkpoint"):
        build_package(ckpt, tmp_path / "out" / "m.tar.gz", vendor=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_packagers_environment_never_reaches_the_archive(tmp_path):
    """A link to /proc/self/environ packed the packager's AWS keys into an archive bound for S3."""
    ckpt = copy_tiny(tmp_path)
    (ckpt / "environ").symlink_to("/proc/self/environ")
    env = os.environ | {"AWS_SECRET_ACCESS_KEY": "jv3-sentinel-secret"}
    done = package(ckpt, tmp_path / "m.tar.gz", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert b"jv3-sentinel-secret" not in gzip.decompress((tmp_path / "m.tar.gz").read_bytes())
    assert "environ" in manifest(tmp_path / "m.tar.gz")["left_out"]  # not read, so harmless: left out
    done = package(ckpt, tmp_path / "m2.tar.gz", "--include", "environ", env=env)
    assert done.returncode == 1
    assert "environ in" in done.stderr and "is a symlink to /proc/" in done.stderr and "outside the checkpoint" in done.stderr
    assert "jv3-sentinel-secret" not in done.stderr + done.stdout and not (tmp_path / "m2.tar.gz").exists()


def hub_snapshot(tmp_path: Path, outside: Path | None = None) -> Path:
    """A Hugging Face Hub cache entry: snapshots/REV/<file> → ../../blobs/<hash>, as huggingface_hub lays it out."""
    repo = tmp_path / "hub" / "models--jinaai--jina-v3-tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for n, name in enumerate(("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")):
        blob = repo / "blobs" / f"blob{n:02d}"
        shutil.copy(TINY / name, blob)
        (snapshot / name).symlink_to(Path("../../blobs") / blob.name)
    if outside is not None:
        (snapshot / "tokenizer_config.json").unlink()
        (snapshot / "tokenizer_config.json").symlink_to(outside)
    return snapshot


def test_hub_cache_snapshot_links_into_its_blobs_are_followed_and_no_further(tmp_path):
    archive = build_package(hub_snapshot(tmp_path), tmp_path / "m.tar.gz", vendor=False)
    assert checkpoint_files(archive) == SERVED
    with tarfile.open(archive) as tar:  # the blob's bytes, not a link
        assert tar.getmember("config.json").isfile()
        assert tar.extractfile("config.json").read() == (TINY / "config.json").read_bytes()
    secret = tmp_path / "elsewhere" / "credentials"
    secret.parent.mkdir()
    secret.write_text("[default]\naws_secret_access_key = x\n")
    shutil.rmtree(tmp_path / "hub")
    with pytest.raises(PackageError, match=r"tokenizer_config.json in .* is a symlink to .*/elsewhere/credentials, outside the checkpoint and its Hub cache folder"):
        build_package(hub_snapshot(tmp_path, outside=secret), tmp_path / "m2.tar.gz", vendor=False)


def test_a_symlink_inside_the_checkpoint_is_followed(tmp_path):
    ckpt = copy_tiny(tmp_path)
    (ckpt / "weights").mkdir()
    (ckpt / "model.safetensors").rename(ckpt / "weights" / "model.safetensors")
    (ckpt / "model.safetensors").symlink_to("weights/model.safetensors")
    archive = build_package(ckpt, tmp_path / "m.tar.gz", vendor=False)
    assert checkpoint_files(archive) == SERVED  # weights/ itself is not read by the endpoint: left out
    assert manifest(archive)["left_out"] == ["README.md", "golden.json", "weights/model.safetensors"]


# ---------------------------------------------------------------------------------------------
# 3. Full validation before anything is copied


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 64.0}, r"hidden_size 64.0 is not a positive integer \(write 64\); expected a whole number such as 1024"),
        ({"num_attention_heads": 5}, r"num_attention_heads 5 does not divide hidden_size 64; expected one of 1, 2, 4, 8, 16, 32, 64"),
        ({"num_attention_heads": 0}, r"num_attention_heads 0 is not a positive integer"),
        ({"num_hidden_layers": "2"}, r'num_hidden_layers "2" is not a positive integer; expected a whole number such as 24'),
        ({"lora_rank": "4"}, r'lora_rank "4" is not a positive integer; expected a whole number such as 4'),
        ({"rotary_emb_base": "abc"}, r'rotary_emb_base "abc" is not a positive number; expected a number such as 20000.0'),
        ({"task_instructions": ["x"]}, r'task_instructions \["x"\]; expected an object of task name to the instruction'),
        ({"task_instructions": {"retrieval.query": 1}}, r'task_instructions \{"retrieval.query": 1\}; expected an object'),
        ({"eos_token_id": 300}, r"eos_token_id 300; expected an integer from 0 to vocab_size - 1 \(276\)"),
        ({"vocab_size": True}, r"vocab_size true is not a positive integer"),
    ],
)
def test_a_config_that_would_fail_at_start_up_is_refused_naming_field_and_value(tmp_path, changes, message):
    ckpt = edit_config(copy_tiny(tmp_path), **changes)
    with pytest.raises(PackageError, match=rf"^checkpoint .* cannot be served: .*config.json: {message}"):
        build_package(ckpt, tmp_path / "out" / "m.tar.gz", vendor=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"tokenizer.json is not valid JSON: "),
        ('{"version": "1.0", "vocab": ["a"]}', r"tokenizer.json is JSON but not a tokenizer \(.+\); expected the fast tokenizer file"),
    ],
)
def test_a_tokenizer_that_does_not_load_is_refused(tmp_path, content, message):
    ckpt = copy_tiny(tmp_path)
    (ckpt / "tokenizer.json").write_text(content)
    with pytest.raises(PackageError, match=message):
        build_package(ckpt, tmp_path / "out" / "m.tar.gz", vendor=False)
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_with_more_ids_than_embeddings_is_refused(tmp_path):
    ckpt = edit_config(copy_tiny(tmp_path), vocab_size=200, pad_token_id=1)
    tensors = load_file(str(ckpt / "model.safetensors"))  # shapes that match the smaller vocabulary
    for name, tensor in list(tensors.items()):
        if "word_embeddings" in name:
            cut = tensor[:, :200] if name.endswith("lora_A") else tensor[:200] if "lora" not in name else tensor
            tensors[name] = cut.contiguous()
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(PackageError, match=r"tokenizer.json has 277 tokens but config.json vocab_size is 200"):
        build_package(ckpt, tmp_path / "m.tar.gz", vendor=False)


@pytest.mark.parametrize("how", ["one value", "all values"])
def test_non_finite_weights_are_refused_naming_the_first_tensor(tmp_path, how):
    ckpt = copy_tiny(tmp_path)
    tensors = load_file(str(ckpt / "model.safetensors"))
    if how == "one value":
        tensors["roberta.encoder.layers.1.mlp.fc2.bias"][7] = float("inf")
        message = r"model.safetensors: tensor roberta.encoder.layers.1.mlp.fc2.bias holds 0 NaN and 1 infinite value\(s\) of 64"
    else:
        tensors = {name: torch.full_like(t, float("nan")) for name, t in tensors.items()}
        message = r"model.safetensors: tensor roberta.emb_ln.bias holds 64 NaN and 0 infinite value\(s\) of 64"  # the first in the file
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(PackageError, match=message):
        build_package(ckpt, tmp_path / "out" / "m.tar.gz", vendor=False)
    assert not (tmp_path / "out").exists()


def test_non_finite_adapter_weights_are_refused(tmp_path):
    ckpt = write_hf_layout(tmp_path / "hf")
    path = ckpt / "separation" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.layers.0.mlp.fc1.lora_B.weight"][3, 1] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(PackageError, match=r"adapter_model.safetensors: tensor base_model.model.layers.0.mlp.fc1.lora_B.weight holds 1 NaN"):
        build_package(ckpt, tmp_path / "m.tar.gz", vendor=False)


PEAK_MEMORY = r"""
import sys, threading, time
from pathlib import Path
import torch
from inference.checkpoint import check_finite

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

torch.isfinite(torch.zeros(4)).all()  # torch's own first-use allocations, before the baseline
base, peak, done = anon_mb(), [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.0005)
sampler = threading.Thread(target=sample)
sampler.start()
check_finite([Path(sys.argv[1])])
done.set()
sampler.join()
print(peak[0] - base)
"""


def test_the_finiteness_check_streams_instead_of_loading_the_checkpoint(tmp_path):
    """The check reads one tensor at a time, in blocks: its memory is a few tens of MB, not the file's size
    (a 1.1 GB checkpoint must not need twice that). Measured as the growth of the process's anonymous
    memory (mapped file pages are the page cache's, not the process's)."""
    path = tmp_path / "big.safetensors"
    save_file({"big": torch.zeros(64 << 20), "small": torch.zeros(16 << 20)}, str(path))  # 256 + 64 MB of float32
    done = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    grew_mb = float(done.stdout.strip().splitlines()[-1])
    assert grew_mb < 96, f"the check grew the process by {grew_mb:.0f} MB for a 320 MB file"


# ---------------------------------------------------------------------------------------------
# 4. No debris: stopped builds clean up, killed builds' leftovers are removed by the next run


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint plus 160 MB of incompressible bytes packed with --include: a build of a few seconds."""
    ckpt = copy_tiny(tmp_path_factory.mktemp("slow"))
    with open(ckpt / "blob.bin", "wb") as f:
        for _ in range(40):
            f.write(os.urandom(4 << 20))
    return ckpt


def debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".jv3-stage-") or p.name.endswith(".tmp"))


def start_and_wait_for(ckpt: Path, out: Path, phase: str) -> subprocess.Popen:
    """Start a build and return once it is in ``phase``: "stage" (copying) or "tmp" (writing the archive)."""
    process = package(ckpt, out, "--include", "blob.bin", wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.parent.is_dir() and any((p.name.endswith(".tmp") if phase == "tmp" else p.name.startswith(".jv3-stage-"))
                                       for p in out.parent.iterdir()):  # fmt: skip
            return process
        time.sleep(0.005)
    process.kill()
    raise AssertionError(f"the build never reached {phase}: {process.communicate()[1][-2000:]}")


@pytest.mark.parametrize("phase", ["stage", "tmp"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_build_removes_its_temp_files(slow_checkpoint, tmp_path, phase, signum):
    """GIVEN a build copying the checkpoint ("stage") or writing the archive ("tmp") WHEN it gets SIGTERM or
    SIGINT THEN it exits non-zero saying so, and neither the staging copy nor the partial archive remains."""
    out = tmp_path / "out" / "m.tar.gz"
    process = start_and_wait_for(slow_checkpoint, out, phase)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert f"error: interrupted by {name}; nothing was written to {out} and no temp file was left" in stderr
    assert "Traceback" not in stderr
    assert list(out.parent.iterdir()) == []


def test_a_killed_builds_leftovers_are_removed_by_the_next_run(slow_checkpoint, tmp_path):
    """SIGKILL cannot be caught: the staging copy and the .tmp stay, and the next build in the folder removes
    them, knowing from the pid in their names that their owner is gone."""
    out = tmp_path / "out" / "m.tar.gz"
    process = start_and_wait_for(slow_checkpoint, out, "tmp")
    process.kill()
    process.communicate(timeout=60)
    left = debris(out.parent)
    assert len(left) == 2 and f".jv3-stage-{process.pid}@" in left[0] and f".m.tar.gz.{process.pid}@" in left[1], left
    done = package(copy_tiny(tmp_path), out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"removed 2 leftover(s) of killed builds in {out.parent}: {', '.join(left)}" in done.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.tar.gz"]


def test_leftovers_of_running_builds_and_strangers_files_stay(tmp_path):
    """Only a dead owner's files, or unowned ones older than STALE_AFTER_S, are removed."""
    host = _owner().split("@")[1]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    old = time.time() - STALE_AFTER_S - 60
    names = {
        f".jv3-stage-{dead_pid}@{host}-abc123de": True,  # its owner is gone
        f".m.tar.gz.{dead_pid}@{host}.x1y2z3_4.tmp": True,
        f".jv3-stage-{os.getpid()}@{host}-abc123df": False,  # a build of this very process, still running
        f".jv3-stage-{dead_pid}@otherhost-abc123dg": False,  # another host's, recent: its pid means nothing here
        f".m.tar.gz.{dead_pid}@otherhost.abcdefgh.tmp": "old",  # another host's, an hour old
        ".jv3-stage-k2j3h4g5": "old",  # from before owners were recorded
        ".jv3-stage-k2j3h4g6": False,
        ".m.tar.gz.qwertyui.tmp": "old",
        ".notes.tmp": False,  # not ours
        "model.tar.gz": False,
    }
    for name, verdict in names.items():
        path = tmp_path / name
        path.mkdir() if name.startswith(".jv3-stage-") else path.write_bytes(b"x")
        if verdict == "old":
            os.utime(path, (old, old))
    removed = remove_stale(tmp_path, "m.tar.gz")
    assert removed == sorted(name for name, verdict in names.items() if verdict)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name, verdict in names.items() if not verdict)
