"""Random jina-embeddings-v3 checkpoints in the released layout, for benchmarks (any size).

The weights are random, so the vectors mean nothing; the shapes, names, dtype and file layout are
those of ``jinaai/jina-embeddings-v3``, so loading and speed are what the real model gets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "jina-v3-tiny"
FULL = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=250002)
MID = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536, vocab_size=250002)
# The full model's width with one of its 24 layers: responses of 1024 floats per text, as in production,
# at a speed a 2-core CPU benchmark of the serving path can afford (bench/serving.py).
WIDE = dict(hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, intermediate_size=4096, vocab_size=250002)


def make_released_checkpoint(out: Path, *, sizes: dict, dtype=torch.bfloat16, device="cpu", seed=0) -> Path:
    """Write config.json, tokenizer files (the tiny fixture's) and model.safetensors to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(sizes, torch_dtype=str(dtype).removeprefix("torch."))
    config["matryoshka_dimensions"] = [32, 64, 128, 256, 512, 768, 1024]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, out / name)
    g = torch.Generator(device=device).manual_seed(seed)
    h, i, v, n_tasks, r = config["hidden_size"], config["intermediate_size"], config["vocab_size"], 5, config["lora_rank"]

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype).cpu()

    tensors = {}

    def linear(name, out_f, in_f):
        tensors[f"{name}.parametrizations.weight.original"] = rand(out_f, in_f)
        tensors[f"{name}.parametrizations.weight.0.lora_A"] = rand(n_tasks, r, in_f)
        tensors[f"{name}.parametrizations.weight.0.lora_B"] = rand(n_tasks, out_f, r)
        tensors[f"{name}.bias"] = rand(out_f)

    for emb, rows in (("word_embeddings", v), ("token_type_embeddings", 1)):
        p = f"roberta.embeddings.{emb}.parametrizations.weight"
        tensors[f"{p}.original"] = rand(rows, h)
        tensors[f"{p}.0.lora_A"] = rand(n_tasks, rows, r)
        tensors[f"{p}.0.lora_B"] = rand(n_tasks, r, h)
    tensors["roberta.emb_ln.weight"] = torch.ones(h, dtype=dtype)
    tensors["roberta.emb_ln.bias"] = torch.zeros(h, dtype=dtype)
    for n in range(config["num_hidden_layers"]):
        p = f"roberta.encoder.layers.{n}"
        linear(f"{p}.mixer.Wqkv", 3 * h, h)
        linear(f"{p}.mixer.out_proj", h, h)
        linear(f"{p}.mlp.fc1", i, h)
        linear(f"{p}.mlp.fc2", h, i)
        for norm in ("norm1", "norm2"):
            tensors[f"{p}.{norm}.weight"] = torch.ones(h, dtype=dtype)
            tensors[f"{p}.{norm}.bias"] = torch.zeros(h, dtype=dtype)
    linear("roberta.pooler.dense", h, h)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
