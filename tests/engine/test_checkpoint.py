"""The released checkpoint layout: a checkpoint with a missing, unexpected or mis-shaped tensor is refused
by name; bf16 loads; tasks can be limited. (The jina-embeddings-v3-hf layout, as transformers and PEFT
write it, is tested in test_hf_layout.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.checkpoint import validate_checkpoint
from inference.engine import Engine
from inference.errors import CheckpointError
from inference.request import EmbedRequest
from inference.settings import Settings

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "jina-v3-tiny"


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
