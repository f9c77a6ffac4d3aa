"""The released checkpoint layout: a checkpoint with a missing, unexpected or mis-shaped tensor is refused
by name; bf16 loads; tasks can be limited. (The jina-embeddings-v3-hf layout, as transformers and PEFT
write it, is tested in test_hf_layout.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.checkpoint import nonfinite, validate_checkpoint
from inference.engine import Engine
from inference.errors import CheckpointError
from inference.request import EmbedRequest
from inference.settings import Settings

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "fixtures" / "jina-v3-tiny"


def copy_fixture(tmp_path: Path, edit) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, out)
    tensors = load_file(str(out / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_missing_tensor_is_named(tmp_path):
    bad = copy_fixture(tmp_path, lambda t: t.pop("roberta.encoder.layers.1.norm2.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): layers.1.post_mlp_layernorm.weight"):
        Engine.load(bad, Settings.resolve(device="cpu"))


def test_unexpected_tensor_is_named(tmp_path):
    bad = copy_fixture(tmp_path, lambda t: t.update({"roberta.encoder.layers.0.mixer.rotary.inv_freq": torch.zeros(8)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): encoder.layers.0.mixer.rotary.inv_freq"):
        validate_checkpoint(bad)


def test_misshaped_tensor_is_named(tmp_path):
    bad = copy_fixture(tmp_path, lambda t: t.update({"roberta.encoder.layers.0.mlp.fc1.bias": torch.zeros(255)}))
    with pytest.raises(CheckpointError, match=r"mis-shaped: layers.0.mlp.fc1.bias \(255,\) \(expected \(256,\)\)"):
        validate_checkpoint(bad)


def test_adapter_with_missing_half_is_named(tmp_path):
    bad = copy_fixture(tmp_path, lambda t: t.pop("roberta.encoder.layers.0.mlp.fc2.parametrizations.weight.0.lora_B"))
    with pytest.raises(CheckpointError, match="adapter of layers.0.mlp.fc2 has lora_B missing"):
        validate_checkpoint(bad)


def test_bfloat16_checkpoint_loads(tmp_path):
    bf16 = copy_fixture(tmp_path, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    assert validate_checkpoint(bf16)["dtype"] == "BF16"
    vec = Engine.load(bf16, Settings.resolve(device="cpu")).embed(EmbedRequest(texts=["Berlin"])).embeddings
    ref = Engine.load(FIXTURE, Settings.resolve(device="cpu")).embed(EmbedRequest(texts=["Berlin"])).embeddings
    assert float((vec * ref).sum()) > 0.999


def test_directory_without_config_or_weights(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        validate_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(json.loads((FIXTURE / "config.json").read_text())))
    shutil.copy(FIXTURE / "tokenizer.json", tmp_path)
    with pytest.raises(CheckpointError, match="weights not found"):
        validate_checkpoint(tmp_path)


def test_tasks_can_be_limited_and_unknown_ones_refused():
    engine = Engine.load(FIXTURE, Settings.resolve(device="cpu", tasks="retrieval.query,retrieval.passage", default_task="retrieval.query"))
    assert engine.tasks == ("retrieval.query", "retrieval.passage")
    from inference.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="task 'separation' is not loaded on this endpoint"):
        engine.embed(EmbedRequest(texts=["a"], task="separation"))


# --- weights checked finite at every load ----------------------------------------------------------

ADAPTER_TENSOR = "roberta.encoder.layers.0.mlp.fc1.parametrizations.weight.0.lora_A"  # (tasks, r, in)
BASE_TENSOR = "roberta.encoder.layers.1.mlp.fc2.parametrizations.weight.original"


def poison(tensors: dict) -> None:
    """One NaN in a task adapter, one infinity in a base weight."""
    tensors[ADAPTER_TENSOR][2, 1, 5] = float("nan")
    tensors[BASE_TENSOR][3, 7] = float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_that_are_not_finite_fail_the_load_naming_file_and_tensor(tmp_path, dtype):
    """GIVEN a checkpoint whose header and shapes are right but which holds a NaN and an infinity
    WHEN the engine loads it THEN it refuses, naming the file and each tensor, instead of serving NaN."""
    bad = copy_fixture(tmp_path, lambda t: (t.update({k: v.to(dtype) for k, v in t.items()}), poison(t)))
    validate_checkpoint(bad)  # headers only: nothing to see there
    with pytest.raises(CheckpointError) as caught:
        Engine.load(bad, Settings.resolve(device="cpu"))
    message = caught.value.message
    assert message.startswith("2 tensor(s) are not finite: ")
    assert f"{bad / 'model.safetensors'}: tensor {ADAPTER_TENSOR} holds 1 NaN and 0 infinite value(s) of 1280" in message
    assert f"{bad / 'model.safetensors'}: tensor {BASE_TENSOR} holds 0 NaN and 1 infinite value(s) of 16384" in message
    assert message.endswith("expected finite weights (a diverged run or a broken conversion): re-export the checkpoint")


def test_a_peft_adapter_that_is_not_finite_is_named_by_its_folder(tmp_path):
    from test_hf_layout import write_hf_checkpoint  # the fixture as transformers + PEFT save it

    ckpt = write_hf_checkpoint(tmp_path / "hf")
    path = ckpt / "separation" / "adapter_model.safetensors"  # every adapter file has this name
    tensors = load_file(str(path))
    tensors["base_model.model.layers.0.mlp.fc1.lora_B.weight"][3, 1] = float("-inf")
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=rf"1 tensor\(s\) are not finite: {path}: tensor "
                       r"base_model.model.layers.0.mlp.fc1.lora_B.weight holds 0 NaN and 1 infinite"):  # fmt: skip
        Engine.load(ckpt, Settings.resolve(device="cpu"))


def test_the_check_is_one_sum_and_a_finite_tensor_whose_sum_overflows_is_served():
    assert nonfinite(torch.zeros(3, dtype=torch.int64)) is None  # only floating-point tensors
    assert nonfinite(torch.full((1000,), 3e36, dtype=torch.bfloat16)) is None  # the sum overflows; no value does
    assert nonfinite(torch.full((10,), 60000.0, dtype=torch.float16)) is None  # past float16's 65504
    both = torch.zeros(4, 4)
    both[0, 0], both[1, 1], both[2, 2] = float("inf"), float("-inf"), float("nan")  # inf - inf: the sum is NaN
    assert nonfinite(both) == (1, 2)
    if hasattr(torch, "float8_e4m3fn"):  # no sum kernel of its own
        assert nonfinite(torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)) == (1, 0)


def test_the_byoc_server_exits_1_naming_the_tensor(tmp_path):
    """The same refusal where SageMaker sees it: the server never reports healthy, and its log says why."""
    bad = copy_fixture(tmp_path, poison)
    done = subprocess.run([sys.executable, "-m", "inference.serve", "--model-dir", str(bad), "--port", "0"],
                          cwd=REPO, env={**os.environ, "JV3_DEVICE": "cpu"}, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"tensor {ADAPTER_TENSOR} holds 1 NaN" in done.stderr and f"tensor {BASE_TENSOR} holds 0 NaN" in done.stderr
