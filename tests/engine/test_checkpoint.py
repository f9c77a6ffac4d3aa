"""Checkpoint layouts: the released file and transformers' native layout with PEFT adapters load to the
same vectors; a checkpoint with a missing, unexpected or mis-shaped tensor is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.checkpoint import load_checkpoint, native_config, validate_checkpoint
from inference.engine import Engine
from inference.errors import CheckpointError
from inference.request import EmbedRequest
from inference.settings import Settings

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "jina-v3-tiny"
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


def write_native_checkpoint(out: Path) -> Path:
    """The fixture re-saved the way jina-embeddings-v3-hf is laid out: native names + one PEFT adapter per task,
    written by PEFT itself (so the test pins PEFT's real file format, not our idea of it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import JinaEmbeddingsV3Model

    ckpt = load_checkpoint(FIXTURE)
    out.mkdir()
    config = native_config(ckpt.config)
    config.save_pretrained(out)  # config.json with model_type jina_embeddings_v3 and no task_instructions
    save_file({k: v.contiguous() for k, v in ckpt.base.items()}, str(out / "model.safetensors"))
    shutil.copy(FIXTURE / "tokenizer.json", out / "tokenizer.json")
    for t, task in enumerate(ckpt.tasks):
        model = JinaEmbeddingsV3Model(config, add_pooling_layer=False)
        lora = LoraConfig(r=4, lora_alpha=1, target_modules=[*LINEARS, "word_embeddings", "token_type_embeddings"])
        peft_model = get_peft_model(model, lora)
        for name, module in peft_model.base_model.model.named_modules():
            native = name
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                a, b = ckpt.lora[native]
                module.lora_A["default"].weight.data.copy_(a[t])
                module.lora_B["default"].weight.data.copy_(b[t])
            elif hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
                a, b = ckpt.lora[native]  # ours: A (vocab, r), B (r, hidden); PEFT: A (r, vocab), B (hidden, r)
                module.lora_embedding_A["default"].data.copy_(a[t].T)
                module.lora_embedding_B["default"].data.copy_(b[t].T)
        peft_model.save_pretrained(out / "adapters" / task)
    return out


def test_native_layout_with_peft_adapters_matches_the_released_one(tmp_path, golden):
    native = write_native_checkpoint(tmp_path / "native")
    info = validate_checkpoint(native)
    assert info["layout"] == "native" and len(info["tasks"]) == 5
    engine = Engine.load(native, Settings.resolve(device="cpu"))
    for case in golden["outputs"]:
        if case["task"] in ("retrieval.query", "classification") and case["dimensions"] in (None, 8):
            got = engine.embed(EmbedRequest(texts=golden["texts"], task=case["task"], dimensions=case["dimensions"])).embeddings
            ref = np.asarray(case["embeddings"])
            assert (got * ref).sum(1).min() >= 0.99999, case["task"]


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
