"""The jinaai/jina-embeddings-v3-hf layout, written by transformers and PEFT themselves, serves the
original vectors (fixtures/jina-v3-tiny/golden.json); bad adapter folders are refused by name.

The checkpoint is produced the way the hub repository is: ``JinaEmbeddingsV3Model.save_pretrained``
for the weights (transformers 5 saves them under the original names: ``emb_ln.*``,
``encoder.layers.N.mixer.Wqkv.*``) and one PEFT LoRA adapter per task saved by
``PeftModel.save_pretrained`` into a folder named as the hub names it (``retrieval_query/`` …). The
test pins those libraries' real file format, not our idea of it: transformers itself reloads the
folder and must reproduce the golden vectors before the engine is asked to.
"""

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
COSINE = 0.99999
# Task → adapter folder, as the hub repository (and transformers' integration tests) name them.
HUB_FOLDERS = {
    "retrieval.query": "retrieval_query",
    "retrieval.passage": "retrieval_passage",
    "separation": "separation",
    "classification": "classification",
    "text-matching": "text_matching",
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "word_embeddings", "token_type_embeddings"]


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def write_hf_checkpoint(out: Path) -> Path:
    """The fixture as transformers + PEFT save it: base weights by save_pretrained, one adapter per task."""
    from peft import LoraConfig, get_peft_model
    from transformers import JinaEmbeddingsV3Model

    ckpt = load_checkpoint(FIXTURE)  # the released fixture under transformers' module names
    model = JinaEmbeddingsV3Model(native_config(ckpt.config))  # with its pooler, as AutoModel builds it
    released = load_file(str(FIXTURE / "model.safetensors"))
    pooler = {  # unused for embeddings, but the hub checkpoint carries it (parametrized in the released file)
        "pooler.dense.weight": released["roberta.pooler.dense.parametrizations.weight.original"],
        "pooler.dense.bias": released["roberta.pooler.dense.bias"],
    }
    model.load_state_dict({**ckpt.base, **pooler}, strict=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, out / name)

    lora = LoraConfig(r=4, lora_alpha=1, target_modules=TARGETS)  # the fixture's lora_rank and lora_alpha
    peft_model, copied = None, 0
    for t, task in enumerate(ckpt.tasks):
        adapter = HUB_FOLDERS[task]
        if peft_model is None:
            peft_model = get_peft_model(model, lora, adapter_name=adapter)
        else:
            peft_model.add_adapter(adapter, lora)
        for module_name, module in peft_model.base_model.model.named_modules():
            if adapter in getattr(module, "lora_A", {}):  # Linear: PEFT A (r, in), B (out, r), as ours
                a, b = ckpt.lora[module_name]
                module.lora_A[adapter].weight.data.copy_(a[t])
                module.lora_B[adapter].weight.data.copy_(b[t])
                copied += 1
            elif adapter in getattr(module, "lora_embedding_A", {}):  # ours A (vocab, r), B (r, hidden); PEFT transposed
                a, b = ckpt.lora[module_name]
                module.lora_embedding_A[adapter].data.copy_(a[t].T)
                module.lora_embedding_B[adapter].data.copy_(b[t].T)
                copied += 1
    assert copied == len(ckpt.tasks) * len(ckpt.lora)
    peft_model.save_pretrained(out)  # a named adapter goes into out/<adapter name>/
    return out


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "jina-embeddings-v3-hf")


def golden_case(golden, task, dimensions=None) -> np.ndarray:
    return np.asarray(next(c for c in golden["outputs"] if c["task"] == task and c["dimensions"] == dimensions)["embeddings"])


def test_the_files_are_what_transformers_and_peft_write(hf_checkpoint):
    names = set(load_file(str(hf_checkpoint / "model.safetensors")))
    assert {"emb_ln.weight", "encoder.layers.0.mixer.Wqkv.weight", "encoder.layers.1.norm2.bias", "pooler.dense.weight"} <= names
    assert json.loads((hf_checkpoint / "config.json").read_text())["model_type"] == "jina_embeddings_v3"
    for folder in HUB_FOLDERS.values():
        assert json.loads((hf_checkpoint / folder / "adapter_config.json").read_text())["r"] == 4
        adapter = load_file(str(hf_checkpoint / folder / "adapter_model.safetensors"))
        assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter
        assert "base_model.model.embeddings.word_embeddings.lora_embedding_A" in adapter


def test_transformers_itself_reproduces_the_golden_vectors(hf_checkpoint, golden):
    """Proof that the written folder is right, independent of our loader: transformers + PEFT read it back."""
    from tokenizers import Tokenizer
    from transformers import JinaEmbeddingsV3Model

    tokenizer = Tokenizer.from_file(str(hf_checkpoint / "tokenizer.json"))
    instructions = json.loads((FIXTURE / "config.json").read_text())["task_instructions"]
    model = JinaEmbeddingsV3Model.from_pretrained(hf_checkpoint, dtype=torch.float32).eval()

    def embed(prefix: str) -> np.ndarray:
        with torch.no_grad():
            return np.stack([
                model(input_ids=torch.tensor([tokenizer.encode(prefix + text).ids])).last_hidden_state[0].mean(0).numpy()
                for text in golden["texts"]
            ])

    assert cosines(embed(""), golden_case(golden, None)).min() >= COSINE
    for folder in HUB_FOLDERS.values():
        model.load_adapter(str(hf_checkpoint), adapter_name=folder, adapter_kwargs={"subfolder": folder})
    for task, folder in HUB_FOLDERS.items():
        model.set_adapter(folder)
        assert cosines(embed(instructions[task]), golden_case(golden, task)).min() >= COSINE, task


def test_validation_reports_the_hf_layout_and_every_task(hf_checkpoint):
    info = validate_checkpoint(hf_checkpoint)
    assert info["layout"] == "hf"
    assert info["tasks"] == list(HUB_FOLDERS)
    assert info["files"] == ["model.safetensors"]


def test_engine_serves_every_task_and_size_of_the_golden_vectors(hf_checkpoint, golden):
    engine = Engine.load(hf_checkpoint, Settings.resolve(device="cpu", dtype="float32"))
    checked = 0
    for case in golden["outputs"]:
        if case["task"] is None:
            continue  # no adapter: checked through transformers above
        got = engine.embed(EmbedRequest(texts=golden["texts"], task=case["task"], dimensions=case["dimensions"])).embeddings
        assert cosines(got, case["embeddings"]).min() >= COSINE, (case["task"], case["dimensions"])
        checked += 1
    assert checked == 15


def copy_checkpoint(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(src, out)
    return out


def test_wrongly_named_adapter_folder_is_refused_with_the_accepted_names(hf_checkpoint, tmp_path):
    bad = copy_checkpoint(hf_checkpoint, tmp_path)
    (bad / "text_matching").rename(bad / "textmatching")
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(bad)
    message = str(err.value)
    assert "adapter folder 'textmatching'" in message
    assert "retrieval_query, retrieval_passage, separation, classification, text_matching" in message
    assert "retrieval.query" in message and "text-matching" in message


def test_the_tasks_own_spelling_is_accepted_for_a_folder(hf_checkpoint, tmp_path):
    dotted = copy_checkpoint(hf_checkpoint, tmp_path)
    (dotted / "retrieval_query").rename(dotted / "retrieval.query")
    assert validate_checkpoint(dotted)["tasks"] == list(HUB_FOLDERS)
    (dotted / "retrieval_passage").rename(dotted / "retrieval.query_")  # neither spelling
    with pytest.raises(CheckpointError, match=r"adapter folder 'retrieval.query_'"):
        validate_checkpoint(dotted)


def test_two_folders_for_one_task_are_refused(hf_checkpoint, tmp_path):
    bad = copy_checkpoint(hf_checkpoint, tmp_path)
    shutil.copytree(bad / "separation", bad / "separation_copy")
    (bad / "separation_copy").rename(bad / "retrieval.query")
    with pytest.raises(CheckpointError, match=r"'retrieval.query' and 'retrieval_query' are both task 'retrieval.query'"):
        validate_checkpoint(bad)


def edit_adapter(ckpt: Path, folder: str, edit) -> None:
    path = ckpt / folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_adapter_tensor_missing_or_misshaped_is_named(hf_checkpoint, tmp_path):
    bad = copy_checkpoint(hf_checkpoint, tmp_path)
    edit_adapter(bad, "classification", lambda t: t.pop("base_model.model.layers.1.mlp.fc2.lora_B.weight"))
    with pytest.raises(CheckpointError, match=r"adapter 'classification' .*missing 1 tensor\(s\): layers.1.mlp.fc2.lora_B.weight"):
        validate_checkpoint(bad)
    edit_adapter(bad, "classification", lambda t: t.update({"base_model.model.layers.1.mlp.fc2.lora_B.weight": torch.zeros(64, 8)}))
    with pytest.raises(CheckpointError, match=r"mis-shaped: layers.1.mlp.fc2.lora_B.weight \(64, 8\) \(expected \(64, 4\)\)"):
        validate_checkpoint(bad)


def test_base_weight_missing_is_named_under_transformers_name(hf_checkpoint, tmp_path):
    bad = copy_checkpoint(hf_checkpoint, tmp_path)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors.pop("encoder.layers.1.norm2.weight")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): layers.1.post_mlp_layernorm.weight"):
        validate_checkpoint(bad)


def test_target_module_the_model_lacks_is_refused(hf_checkpoint, tmp_path):
    bad = copy_checkpoint(hf_checkpoint, tmp_path)
    path = bad / "separation" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["target_modules"] = ["Wqkv", "out_proj"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"target_modules 'Wqkv', 'out_proj' match no module of the model; expected some of .*q_proj"):
        validate_checkpoint(bad)


def test_adapters_with_different_scales_are_refused(hf_checkpoint, tmp_path):
    bad = copy_checkpoint(hf_checkpoint, tmp_path)
    path = bad / "separation" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_alpha": 8}))
    with pytest.raises(CheckpointError, match=r"adapters differ in LoRA scale \(.*separation 2.*\)"):
        validate_checkpoint(bad)
