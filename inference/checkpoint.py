"""Checkpoint loading: the two published layouts of jina-embeddings-v3 mapped onto transformers' names.

Layouts
- ``released`` (``jinaai/jina-embeddings-v3``, the original ``XLMRobertaLoRA`` code): one
  ``model.safetensors`` whose Linear and Embedding weights are torch parametrizations, each with the
  base weight (``...parametrizations.weight.original``) and the five task adapters stacked along a
  first axis (``...weight.0.lora_A`` (T, r, in) and ``lora_B`` (T, out, r); the embeddings store A
  and B the other way round: A (T, vocab, r), B (T, r, hidden)). Stored in bf16 (fp32 in fixtures).
- ``native`` (``jinaai/jina-embeddings-v3-hf``): transformers' own ``JinaEmbeddingsV3Model`` names
  and one PEFT LoRA adapter directory per task (``adapters/<task>/adapter_config.json`` +
  ``adapter_model.safetensors``, or ``<task>/…`` beside the weights).

Both load into one ``Checkpoint``: the base weights under native names and, per module, the task
adapters stacked as (A, B) so that ``delta[t] = scale · B[t] @ A[t]`` for Linear weights and
``scale · A[t] @ B[t]`` for embeddings. transformers' ``from_pretrained`` is not used: on the
released layout it "succeeds" with every weight randomly initialised, so we map names ourselves
from one table and refuse any missing, unexpected or mis-shaped tensor by name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError

# Released → native renames, applied in order to the name with its "roberta." prefix removed.
# (vLLM's hf_to_vllm_mapper is the model: one declarative table, names streamed through it.)
RELEASED_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^emb_ln\.", "embeddings.LayerNorm."),
    (r"^encoder\.layers\.(\d+)\.mixer\.out_proj\.", r"layers.\1.self_attn.o_proj."),
    (r"^encoder\.layers\.(\d+)\.mixer\.Wqkv\.", r"layers.\1.self_attn.qkv_proj."),  # split below
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"layers.\1.mlp."),
    (r"^encoder\.layers\.(\d+)\.norm1\.", r"layers.\1.post_attention_layernorm."),
    (r"^encoder\.layers\.(\d+)\.norm2\.", r"layers.\1.post_mlp_layernorm."),
    (r"^embeddings\.", "embeddings."),
    (r"^pooler\.", "pooler."),
)
PARAMETRIZED = re.compile(r"^(?P<module>.+)\.parametrizations\.weight\.(?P<part>original|0\.lora_A|0\.lora_B)$")
EMBEDDINGS = ("embeddings.word_embeddings", "embeddings.token_type_embeddings")
QKV = ("q_proj", "k_proj", "v_proj")
# The pooler (CLS → dense → tanh) is in the released file but jina-embeddings-v3 mean-pools: not served.
UNSERVED = ("pooler.",)


@dataclass
class Checkpoint:
    config: dict  # the checkpoint's config.json
    layout: str  # "released" | "native"
    tasks: tuple[str, ...]  # adapter order along the stacked axis
    scale: float  # lora_alpha / lora_rank
    base: dict[str, torch.Tensor]  # native name → tensor (everything the model needs)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module → (A, B)
    instructions: dict[str, str] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])


def native_config(config: dict, *, attn_implementation: str = "sdpa"):
    """The transformers ``JinaEmbeddingsV3Config`` for a checkpoint's config.json (either layout)."""
    from transformers import JinaEmbeddingsV3Config

    theta = config.get("rotary_emb_base") or (config.get("rope_parameters") or {}).get("rope_theta") or 20000.0
    native = JinaEmbeddingsV3Config(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        hidden_act=config.get("hidden_act", "gelu"),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=config.get("max_position_embeddings", 8194),
        type_vocab_size=config.get("type_vocab_size", 1),
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        pad_token_id=config.get("pad_token_id", 1),
        bos_token_id=config.get("bos_token_id", 0),
        eos_token_id=config.get("eos_token_id", 2),
        rope_parameters={"rope_type": "default", "rope_theta": float(theta)},
    )
    native._attn_implementation = attn_implementation
    return native


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every base tensor the native model needs, with its shape (the pooler excluded)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": (config["vocab_size"], h),
        "embeddings.token_type_embeddings.weight": (config.get("type_vocab_size", 1), h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for n in range(config["num_hidden_layers"]):
        p = f"layers.{n}."
        for proj in (*QKV, "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (h, h)
            shapes[f"{p}self_attn.{proj}.bias"] = (h,)
        shapes[f"{p}mlp.fc1.weight"], shapes[f"{p}mlp.fc1.bias"] = (i, h), (i,)
        shapes[f"{p}mlp.fc2.weight"], shapes[f"{p}mlp.fc2.bias"] = (h, i), (h,)
        for norm in ("post_attention_layernorm", "post_mlp_layernorm"):
            shapes[f"{p}{norm}.weight"], shapes[f"{p}{norm}.bias"] = (h,), (h,)
    return shapes


# ---------------------------------------------------------------------------------------------
# Reading


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; is it a jina-embeddings-v3 checkpoint directory?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size") if k not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    return config


def weight_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = [model_dir / "model.safetensors"]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"weights not found: {', '.join(absent)} (only safetensors checkpoints are served)")
    return files


def _headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """name → (shape, dtype, file), from the safetensors headers alone (no tensor is read)."""
    out = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    out[name] = (tuple(sl.get_shape()), sl.get_dtype(), path)
        except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt header
            raise CheckpointError(f"cannot read {path}: {exc}") from None
    return out


def detect_layout(names) -> str:
    if any(".parametrizations.weight." in n for n in names):
        return "released"
    return "native"


def _rename_released(name: str) -> str:
    name = name.removeprefix("roberta.")
    for pattern, repl in RELEASED_RENAMES:
        new, count = re.subn(pattern, repl, name)
        if count:
            return new
    return name


def _classify_released(name: str) -> tuple[str, str | tuple[str, str]]:
    """A released tensor name → ("lora", (module, "lora_A"|"lora_B")) or ("base", native weight name)."""
    native = _rename_released(name)
    m = PARAMETRIZED.match(native)
    if m and m["part"] != "original":
        return "lora", (m["module"], m["part"].removeprefix("0."))
    return "base", (m["module"] + ".weight" if m else native)


def _strip_native_prefix(name: str) -> str:
    for prefix in ("roberta.", "model.", "base_model.model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def adapter_dirs(model_dir: Path) -> dict[str, Path]:
    """Task name → PEFT adapter directory, for the native layout."""
    found = {}
    for root in (Path(model_dir) / "adapters", Path(model_dir)):
        if root.is_dir():
            for cfg in sorted(root.glob("*/adapter_config.json")):
                found.setdefault(cfg.parent.name, cfg.parent)
    return found


# ---------------------------------------------------------------------------------------------
# Validation (headers only) and loading


def validate_checkpoint(model_dir) -> dict:
    """Check config, tokenizer and weight names/shapes without reading a tensor; raise CheckpointError."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{model_dir} has no tokenizer.json (the fast tokenizer file is required)")
    files = weight_files(model_dir)
    headers = _headers(files)
    layout = detect_layout(headers)
    if layout == "released":
        tasks = tuple(config.get("lora_adaptations") or ())
        shapes, lora_shapes = _released_shapes(headers)
    else:
        adapters = adapter_dirs(model_dir)
        tasks = tuple(adapters)
        shapes = {_strip_native_prefix(n): s for n, (s, _, _) in headers.items()}
        lora_shapes = {}
    _check_base(shapes, config)
    if layout == "released":
        _check_released_lora(lora_shapes, config, len(tasks))
    dtypes = sorted({d for _, d, _ in headers.values()})
    return {
        "layout": layout,
        "hidden_size": config["hidden_size"],
        "num_layers": config["num_hidden_layers"],
        "tasks": list(tasks),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "files": [p.name for p in files],
        "tensors": len(headers),
    }


def _released_shapes(headers):
    """Split released names into base shapes (native names, Wqkv split) and LoRA shapes."""
    shapes, lora = {}, {}
    for name, (shape, _, _) in headers.items():
        kind, native = _classify_released(name)
        if kind == "lora":
            lora[native] = shape
            continue
        if ".qkv_proj." in native:
            third = (shape[0] // 3, *shape[1:])
            for proj in QKV:
                shapes[native.replace("qkv_proj", proj)] = third
        else:
            shapes[native] = shape
    return shapes, lora


def _check_base(shapes: dict, config: dict) -> None:
    expected = expected_shapes(config)
    served = {n: s for n, s in shapes.items() if not n.startswith(UNSERVED)}
    missing = sorted(set(expected) - set(served))
    unexpected = sorted(set(served) - set(expected))
    wrong = sorted(f"{n} {tuple(served[n])} (expected {expected[n]})" for n in set(expected) & set(served) if tuple(served[n]) != expected[n])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_names(unexpected)}")
    if wrong:
        problems.append(f"mis-shaped: {_names(wrong)}")
    if problems:
        raise CheckpointError("checkpoint does not match its config.json: " + "; ".join(problems))


def _check_released_lora(lora_shapes: dict, config: dict, n_tasks: int) -> None:
    modules = sorted({m for m, _ in lora_shapes})
    for module in modules:
        a, b = lora_shapes.get((module, "lora_A")), lora_shapes.get((module, "lora_B"))
        if a is None or b is None:
            raise CheckpointError(f"adapter of {module} has lora_{'A' if a is None else 'B'} missing")
        if a[0] != n_tasks or b[0] != n_tasks:
            raise CheckpointError(
                f"adapter of {module} holds {a[0]} tasks but config.json lora_adaptations names {n_tasks}"
            )
        r = config.get("lora_rank", 4)
        inner_a = a[2] if module in EMBEDDINGS else a[1]
        inner_b = b[1] if module in EMBEDDINGS else b[2]
        if inner_a != r or inner_b != r:
            raise CheckpointError(f"adapter of {module} has rank {inner_a}/{inner_b}, config.json says lora_rank {r}")


def _names(names, limit=8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _iter_tensors(files: list[Path], device: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_checkpoint(model_dir, *, device: str = "cpu") -> Checkpoint:
    """Read a checkpoint of either layout into a ``Checkpoint`` (validated first, headers only)."""
    model_dir = Path(model_dir)
    info = validate_checkpoint(model_dir)
    config = read_config(model_dir)
    files = weight_files(model_dir)
    if info["layout"] == "released":
        ckpt = _load_released(config, files, device)
    else:
        ckpt = _load_native(model_dir, config, files, device)
    ckpt.instructions = {t: (config.get("task_instructions") or {}).get(t, "") for t in ckpt.tasks}
    return ckpt


def _load_released(config: dict, files: list[Path], device: str) -> Checkpoint:
    tasks = tuple(config.get("lora_adaptations") or ())
    scale = float(config.get("lora_alpha", 1)) / float(config.get("lora_rank", 4))
    base, parts = {}, {}
    for name, tensor in _iter_tensors(files, device):
        kind, native = _classify_released(name)
        if (native[0] if kind == "lora" else native).startswith(UNSERVED):
            continue
        if kind == "lora":
            parts[native] = tensor
        else:
            base[native] = tensor
    # Linear: A (T, r, in), B (T, out, r), delta = B @ A; embeddings: A (T, vocab, r), B (T, r, hidden), delta = A @ B
    lora = {module: (parts[(module, "lora_A")], parts[(module, "lora_B")]) for module in sorted({m for m, _ in parts})}
    # One fused QKV projection in the released file; transformers' attention has q/k/v Linears.
    for key in [k for k in base if ".qkv_proj." in k]:
        for proj, chunk in zip(QKV, base.pop(key).chunk(3, dim=0), strict=True):
            base[key.replace("qkv_proj", proj)] = chunk
    for module in [m for m in lora if m.endswith(".qkv_proj")]:
        a, b = lora.pop(module)
        for proj, b_chunk in zip(QKV, b.chunk(3, dim=1), strict=True):
            lora[module.replace("qkv_proj", proj)] = (a, b_chunk)
    return Checkpoint(config=config, layout="released", tasks=tasks, scale=scale, base=base, lora=lora)


def _load_native(model_dir: Path, config: dict, files: list[Path], device: str) -> Checkpoint:
    base = {}
    for name, tensor in _iter_tensors(files, device):
        native = _strip_native_prefix(name)
        if not native.startswith(UNSERVED):
            base[native] = tensor
    adapters = adapter_dirs(model_dir)
    tasks = tuple(adapters)
    per_task: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    scales = set()
    for task, folder in adapters.items():
        adapter_cfg = json.loads((folder / "adapter_config.json").read_text())
        r, alpha = adapter_cfg.get("r", 8), adapter_cfg.get("lora_alpha", 8)
        scales.add(alpha / (r**0.5) if adapter_cfg.get("use_rslora") else alpha / r)
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"adapter {task!r} in {folder} has no adapter_model.safetensors")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in _iter_tensors([weights], device):
            m = re.match(r"^(?:base_model\.model\.)?(?:roberta\.|model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$", name)
            if not m:
                raise CheckpointError(f"adapter {task!r}: unexpected tensor {name}")
            pairs.setdefault(m["module"], {})[m["part"]] = tensor
        for module, p in pairs.items():
            if "lora_embedding_A" in p:  # PEFT: A (r, vocab), B (hidden, r) → ours: A (vocab, r), B (r, hidden)
                per_task.setdefault(module, []).append((p["lora_embedding_A"].T, p["lora_embedding_B"].T))
            else:
                per_task.setdefault(module, []).append((p["lora_A"], p["lora_B"]))
    if len(scales) > 1:
        raise CheckpointError(f"adapters use different LoRA scales {sorted(scales)}; expected one")
    lora = {}
    for module, pairs in per_task.items():
        if len(pairs) != len(tasks):
            raise CheckpointError(f"module {module} has adapters for {len(pairs)} of {len(tasks)} tasks")
        lora[module] = (torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]))
    unknown = sorted(m for m in lora if m + ".weight" not in base)
    if unknown:
        raise CheckpointError(f"adapters target modules the model lacks: {_names(unknown)}")
    return Checkpoint(config=config, layout="native", tasks=tasks, scale=scales.pop() if scales else 0.0, base=base, lora=lora)
