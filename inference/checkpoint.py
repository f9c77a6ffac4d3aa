"""Checkpoint loading: the two published layouts of jina-embeddings-v3 mapped onto transformers' names.

Layouts
- ``released`` (``jinaai/jina-embeddings-v3``, the original ``XLMRobertaLoRA`` code): one
  ``model.safetensors`` whose Linear and Embedding weights are torch parametrizations, each with the
  base weight (``...parametrizations.weight.original``) and the five task adapters stacked along a
  first axis (``...weight.0.lora_A`` (T, r, in) and ``lora_B`` (T, out, r); the embeddings store A
  and B the other way round: A (T, vocab, r), B (T, r, hidden)). Stored in bf16 (fp32 in fixtures).
- ``hf`` (``jinaai/jina-embeddings-v3-hf``): what transformers' ``JinaEmbeddingsV3Model.save_pretrained``
  and PEFT's ``save_pretrained`` write. ``model.safetensors`` (or shards and their index) holds plain
  weights under the *original* module names, because transformers 5 reverts its load-time renames
  when it saves: ``emb_ln.weight``, ``encoder.layers.0.mixer.Wqkv.weight`` (3·H × H, fused),
  ``encoder.layers.0.norm1.bias``, ``pooler.dense.weight`` (no ``roberta.`` prefix, no
  parametrizations). Beside it, one PEFT LoRA folder per task, named as the hub repository names
  them (``retrieval_query/``, ``retrieval_passage/``, ``separation/``, ``classification/``,
  ``text_matching/``: a PEFT adapter name cannot hold a dot), each with ``adapter_config.json``
  (``r``, ``lora_alpha``, ``target_modules``) and ``adapter_model.safetensors`` under transformers'
  in-memory names (``base_model.model.layers.0.self_attn.q_proj.lora_A.weight`` (r, in),
  ``...lora_B.weight`` (out, r), ``base_model.model.embeddings.word_embeddings.lora_embedding_A``
  (r, vocab) and ``...lora_embedding_B`` (hidden, r)).

Both load into one ``Checkpoint``: the base weights under transformers' names and, per module, the
task adapters stacked as (A, B) so that ``delta[t] = scale · B[t] @ A[t]`` for Linear weights and
``scale · A[t] @ B[t]`` for embeddings. transformers' ``from_pretrained`` is not used: on the
released layout it "succeeds" with every weight randomly initialised, so we map names ourselves
from one table and refuse any missing, unexpected or mis-shaped tensor by name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .settings import TASKS

# Original → transformers renames, applied in order to a name with its prefix removed. The released
# file and what transformers 5 saves share the original names (transformers' own conversion_mapping
# for jina_embeddings_v3 is this table); names already in transformers' form match no row and pass.
# (vLLM's hf_to_vllm_mapper is the model: one declarative table, names streamed through it.)
RENAMES: tuple[tuple[str, str], ...] = (
    (r"^emb_ln\.", "embeddings.LayerNorm."),
    (r"^encoder\.layers\.(\d+)\.mixer\.out_proj\.", r"layers.\1.self_attn.o_proj."),
    (r"^encoder\.layers\.(\d+)\.mixer\.Wqkv\.", r"layers.\1.self_attn.qkv_proj."),  # split below
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"layers.\1.mlp."),
    (r"^encoder\.layers\.(\d+)\.norm1\.", r"layers.\1.post_attention_layernorm."),
    (r"^encoder\.layers\.(\d+)\.norm2\.", r"layers.\1.post_mlp_layernorm."),
    (r"^embeddings\.", "embeddings."),
    (r"^pooler\.", "pooler."),
)
# "base_model.model." in front of every tensor PEFT saves; "roberta." in the released file (and in
# what transformers saves for a model with a head). Stripped in this order.
PREFIXES = ("base_model.model.", "roberta.")
PARAMETRIZED = re.compile(r"^(?P<module>.+)\.parametrizations\.weight\.(?P<part>original|0\.lora_A|0\.lora_B)$")
# PEFT's tensor names: a Linear's adapter is two Linears, an Embedding's two bare parameters.
PEFT_LORA = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
EMBEDDINGS = ("embeddings.word_embeddings", "embeddings.token_type_embeddings")
QKV = ("q_proj", "k_proj", "v_proj")
# The pooler (CLS → dense → tanh) is in both layouts but jina-embeddings-v3 mean-pools: not served.
UNSERVED = ("pooler.",)

# Adapter folder → task. The hub repository spells the tasks with underscores (PEFT adapter names
# cannot hold a dot); the tasks' own spelling is accepted too.
ADAPTER_FOLDERS: dict[str, str] = {
    "retrieval_query": "retrieval.query",
    "retrieval_passage": "retrieval.passage",
    "separation": "separation",
    "classification": "classification",
    "text_matching": "text-matching",
    **{task: task for task in TASKS},
}


@dataclass
class Checkpoint:
    config: dict  # the checkpoint's config.json
    layout: str  # "released" | "hf"
    tasks: tuple[str, ...]  # adapter order along the stacked axis
    scale: float  # lora_alpha / lora_rank
    base: dict[str, torch.Tensor]  # transformers name → tensor (everything the model needs)
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
    """Every base tensor the transformers model needs, with its shape (the pooler excluded)."""
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


def lora_modules(config: dict) -> dict[str, tuple[int, int]]:
    """Every module a LoRA adapter can target (the Linears and Embeddings) → its weight's shape."""
    return {n.removesuffix(".weight"): s for n, s in expected_shapes(config).items() if n.endswith(".weight") and len(s) == 2}


# ---------------------------------------------------------------------------------------------
# Reading


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; is it a jina-embeddings-v3 checkpoint directory?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {_json_type(config)}; expected an object of model settings")
    missing = [k for k in SIZES if k not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    _check_config(config, path)
    return config


# The sizes the model is built from. JSON keeps 64.0 and "64" apart from 64, and 64.0 == 64 would pass
# every shape comparison here only to fail inside transformers when the endpoint starts: whole numbers only.
SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
OPTIONAL_SIZES = ("type_vocab_size", "max_position_embeddings", "lora_rank")
# jina-embeddings-v3's own values, shown in messages as what a right value looks like
EXAMPLES = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
            "vocab_size": 250002, "type_vocab_size": 1, "max_position_embeddings": 8194, "lora_rank": 4,
            "rotary_emb_base": 20000.0, "rope_parameters.rope_theta": 20000.0, "layer_norm_eps": 1e-05}  # fmt: skip
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _check_config(config: dict, path: Path) -> None:
    """Types and ranges of every field the engine reads, each refused by name with its value."""
    for key in SIZES:
        _positive_int(config, key, path)
    # A key that is present must be right: the loader reads config.get(key, default), and null is no default.
    for key in OPTIONAL_SIZES:
        if key in config:
            _positive_int(config, key, path)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if hidden % heads:
        divisors = ", ".join(str(d) for d in range(1, hidden + 1) if hidden % d == 0)
        raise CheckpointError(f"{path}: num_attention_heads {heads} does not divide hidden_size {hidden}; expected one of {divisors}")
    if (hidden // heads) % 2:  # rotary embeddings turn pairs of dimensions of each head
        raise CheckpointError(f"{path}: hidden_size {hidden} / num_attention_heads {heads} = {hidden // heads} dimensions per head; expected an even number (rotary embeddings)")
    for key in TOKEN_IDS:
        value = config.get(key)
        if key == "pad_token_id" and value is None:  # no padding id: transformers accepts it (the engine never pads)
            continue
        if key in config and not (_is_int(value) and 0 <= value < config["vocab_size"]):
            raise CheckpointError(f"{path}: {key} {_show(value)}; expected an integer from 0 to vocab_size - 1 ({config['vocab_size'] - 1})")
    if config.get("rotary_emb_base") is not None:  # null: the loader falls back to rope_parameters
        _positive_number(config["rotary_emb_base"], "rotary_emb_base", path)
    if "layer_norm_eps" in config:
        _positive_number(config["layer_norm_eps"], "layer_norm_eps", path)
    rope = config.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict):
            raise CheckpointError(f"{path}: rope_parameters {_show(rope)}; expected an object like {{\"rope_theta\": 20000.0}}")
        if rope.get("rope_theta") is not None:
            _positive_number(rope["rope_theta"], "rope_parameters.rope_theta", path)
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise CheckpointError(f"{path}: lora_alpha {_show(config['lora_alpha'])}; expected a number")
    if "hidden_act" in config and not isinstance(config["hidden_act"], str):
        raise CheckpointError(f"{path}: hidden_act {_show(config['hidden_act'])}; expected an activation name like \"gelu\"")
    _check_tasks(config, path)


def _check_tasks(config: dict, path: Path) -> None:
    tasks = config.get("lora_adaptations")
    if tasks is not None and not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
        raise CheckpointError(f"{path}: lora_adaptations {_show(tasks)}; expected a list of task names, some of {', '.join(TASKS)}")
    table = config.get("task_instructions")
    if table is not None and not (isinstance(table, dict) and all(isinstance(v, str) for v in table.values())):
        raise CheckpointError(
            f"{path}: task_instructions {_show(table)}; expected an object of task name to the instruction "
            f"prepended to its texts, e.g. {{\"retrieval.query\": \"Represent the query for retrieving evidence documents: \"}}"
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to us


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _positive_int(config: dict, key: str, path: Path) -> None:
    value = config[key]
    if not _is_int(value) or value < 1:
        hint = f" (write {int(value)})" if isinstance(value, float) and value.is_integer() and value >= 1 else ""
        raise CheckpointError(f"{path}: {key} {_show(value)} is not a positive integer{hint}; expected a whole number such as {EXAMPLES[key]}")


def _positive_number(value, key: str, path: Path) -> None:
    if not _is_number(value) or value <= 0:
        raise CheckpointError(f"{path}: {key} {_show(value)} is not a positive number; expected a number such as {EXAMPLES[key]}")


def _show(value) -> str:
    """A value as config.json spells it (so that "2" and 2 read differently), cut short."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_type(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def check_tokenizer(model_dir: Path, config: dict) -> None:
    """tokenizer.json parses and loads as a ``tokenizers.Tokenizer`` whose ids fit the embedding table.

    Not part of the endpoint's load (which loads the tokenizer itself): the packager calls it, so that
    a broken file fails the build, not the deployment."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception with serde's message
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is JSON but not a tokenizer ({reason}); expected the fast tokenizer file that "
            f"tokenizers or transformers' save_pretrained writes"
        ) from None
    size, vocab = tokenizer.get_vocab_size(with_added_tokens=True), config["vocab_size"]
    if size > vocab:
        raise CheckpointError(f"{path} has {size} tokens but config.json vocab_size is {vocab}: ids from {vocab} on have no embedding")


def weight_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index ({type(exc).__name__}: {exc}); expected {{\"weight_map\": {{tensor: file}}}}") from None
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
    return "hf"


def _rename(name: str) -> str:
    """A saved name (either layout, base or adapter) → transformers' name, through the one table."""
    for prefix in PREFIXES:
        name = name.removeprefix(prefix)
    for pattern, repl in RENAMES:
        new, count = re.subn(pattern, repl, name)
        if count:
            return new
    return name


def _classify(name: str) -> tuple[str, str | tuple[str, str]]:
    """A base-file tensor name → ("lora", (module, "lora_A"|"lora_B")) or ("base", transformers name).

    Only the released file has "lora" tensors (parametrizations); the hf file's are all "base"."""
    native = _rename(name)
    m = PARAMETRIZED.match(native)
    if m and m["part"] != "original":
        return "lora", (m["module"], m["part"].removeprefix("0."))
    return "base", (m["module"] + ".weight" if m else native)


def _peft_name(name: str) -> str:
    """A PEFT adapter tensor name → the same name on transformers' module names (unmatched names pass)."""
    m = PEFT_LORA.match(name)
    return f"{_rename(m['module'])}.{m['part']}" if m else _rename(name)


def adapter_dirs(model_dir: Path) -> dict[str, Path]:
    """Task → PEFT adapter folder beside the weights, in TASKS order. A folder holding an
    adapter_config.json whose name is no task is refused rather than silently left out."""
    found: dict[str, Path] = {}
    for cfg in sorted(Path(model_dir).glob("*/adapter_config.json")):
        folder = cfg.parent
        task = ADAPTER_FOLDERS.get(folder.name)
        if task is None:
            raise CheckpointError(
                f"adapter folder {folder.name!r} in {model_dir} is not a task; expected one of {', '.join(ADAPTER_FOLDERS)}"
            )
        if task in found:
            raise CheckpointError(f"adapter folders {found[task].name!r} and {folder.name!r} are both task {task!r}; keep one")
        found[task] = folder
    return {task: found[task] for task in TASKS if task in found}


# ---------------------------------------------------------------------------------------------
# Validation (headers only) and loading


def validate_checkpoint(model_dir, *, thorough: bool = False) -> dict:
    """Check config, tokenizer, weight and adapter names/shapes (headers only); raise CheckpointError.

    ``thorough`` (the packager's check) also loads tokenizer.json and reads every weight to see that
    it is finite (``check_finite``), so that a broken file fails the build; ``load_checkpoint`` checks
    the weights it reads again, at each start.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{model_dir} has no tokenizer.json (the fast tokenizer file is required)")
    if thorough:
        check_tokenizer(model_dir, config)
    files = weight_files(model_dir)
    headers = _headers(files)
    layout = detect_layout(headers)
    shapes, lora_shapes = _base_shapes(headers)
    _check_base(shapes, config)
    if layout == "released":
        tasks = tuple(config.get("lora_adaptations") or ())
        _check_released_lora(lora_shapes, config, len(tasks))
        adapter_files = []
    else:
        adapters = _hf_adapters(model_dir, config)
        tasks = tuple(adapters)
        adapter_files = [a.folder / "adapter_model.safetensors" for a in adapters.values()]
    if thorough:
        check_finite([*files, *adapter_files])
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


FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# The exact count's scratch (an abs() copy and bool masks) is made per block of this many elements:
# about 30 MB, where the whole embedding table at once would need 1.5 GB beside it.
CHUNK_ELEMENTS = 4 << 20


def check_finite(files: list[Path]) -> None:
    """Refuse the first tensor holding a NaN or an infinity, by file and name (the packager's check).

    All-NaN weights load and serve NaN vectors, so they are looked for before an archive is shipped.
    Tensors are read one at a time (safetensors ``safe_open``, which maps the file rather than copying
    it) and summed (``nonfinite``): the check needs a few tens of MB, whatever the checkpoint's size."""
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                counts = nonfinite(tensor)
                if counts is not None:
                    raise CheckpointError(f"{_nonfinite_message(path.name, name, tensor, counts)}; {REEXPORT}")
                del tensor  # before the next one is read


REEXPORT = "expected finite weights (a diverged run or a broken conversion): re-export the checkpoint"


def nonfinite(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(NaN count, infinity count) of a tensor that holds any; None when every value is finite.

    Run on every tensor at every load, so it must cost next to nothing: one sum, which reads the tensor
    once at memory speed, and NaN and ±inf propagate through it. torch accumulates bfloat16 and float16
    sums in float32 (``torch.ones(2**20, dtype=torch.bfloat16).sum()`` is exactly 1048576); a sum
    without ``dtype=`` is also the fast kernel (``sum(dtype=torch.float32)`` of bfloat16 casts first:
    3-7 times slower on a CPU). Only a sum that is not finite pays for the exact count, by blocks; it
    also clears a tensor of finite values whose sum merely overflowed (past 3.4e38, or 65504 for a
    float16 result), which is then served.

    Measured on the project's 2-core CPU host (torch 2.13, best of 5) over random tensors of the full
    model's shapes (492 tensors, 572M parameters, in memory): 0.11 s in bfloat16 (1.1 GB), 0.17 s in
    float32 (2.3 GB), 0.11 s in float16, where the exact ``isfinite`` count of every block takes
    1.4 s (float32) to 8.5 s (bfloat16). ``Engine.load`` of a full-size bfloat16 checkpoint on that
    host took 3.3-6.0 s without the check and 3.5-6.2 s with it: its cost is within the load's noise.
    On a GPU (``load_checkpoint(device="cuda")``) the sums run on the device; not measured there."""
    if not tensor.is_floating_point():
        return None
    if tensor.dtype in FLOATS:
        total = tensor.sum()
    else:  # float8: no sum kernel; its blocks are widened to float32 (_blocks)
        total = sum(block.sum() for block in _blocks(tensor))
    if bool(torch.isfinite(total)):  # one device sync per tensor
        return None
    nan = sum(int(torch.isnan(b).sum()) for b in _blocks(tensor))
    inf = sum(int(torch.isinf(b).sum()) for b in _blocks(tensor))
    return (nan, inf) if nan or inf else None


def _nonfinite_message(where: str, name: str, tensor: torch.Tensor, counts: tuple[int, int]) -> str:
    nan, inf = counts
    return f"{where}: tensor {name} holds {nan} NaN and {inf} infinite value(s) of {tensor.numel()}"


def _blocks(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    for block in tensor.reshape(-1).split(CHUNK_ELEMENTS):  # views: safetensors tensors are contiguous
        yield block if block.dtype in FLOATS else block.float()  # float8: isfinite is not implemented for it


def _base_shapes(headers):
    """Split base-file names into base shapes (transformers names, Wqkv split) and released LoRA shapes."""
    shapes, lora = {}, {}
    for name, (shape, _, _) in headers.items():
        kind, native = _classify(name)
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
    served = {n: s for n, s in shapes.items() if not n.startswith(UNSERVED)}
    problems = _compare(expected_shapes(config), served)
    if problems:
        raise CheckpointError("checkpoint does not match its config.json: " + "; ".join(problems))


def _compare(expected: dict, found: dict) -> list[str]:
    """Missing, unexpected and mis-shaped tensors, each named."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{n} {tuple(found[n])} (expected {expected[n]})" for n in set(expected) & set(found) if tuple(found[n]) != expected[n])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_names(unexpected)}")
    if wrong:
        problems.append(f"mis-shaped: {_names(wrong)}")
    return problems


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
        r = config.get("lora_rank", 4)  # read_config checked that it is a positive integer
        inner_a = a[2] if module in EMBEDDINGS else a[1]
        inner_b = b[1] if module in EMBEDDINGS else b[2]
        if inner_a != r or inner_b != r:
            raise CheckpointError(f"adapter of {module} has rank {inner_a}/{inner_b}, config.json says lora_rank {r}")


# -- the hf layout's PEFT adapters


@dataclass
class _Adapter:
    folder: Path
    r: int
    scale: float
    modules: set[str]  # the modules its target_modules select


def _hf_adapters(model_dir: Path, config: dict) -> dict[str, _Adapter]:
    """Every task's adapter, checked (headers only) against its adapter_config.json and the model."""
    folders = adapter_dirs(model_dir)
    if not folders:
        raise CheckpointError(
            f"{model_dir} holds transformers weights but no PEFT adapter folder beside them; "
            f"expected folders named {', '.join(ADAPTER_FOLDERS)}"
        )
    adapters = {task: _read_adapter(folder, config) for task, folder in folders.items()}
    # Every task's adapter is stacked into one tensor per module and merged with one scale.
    for what in ("r", "scale"):
        values = {getattr(a, what) for a in adapters.values()}
        if len(values) > 1:
            each = ", ".join(f"{a.folder.name} {getattr(a, what):g}" for a in adapters.values())
            raise CheckpointError(f"adapters differ in LoRA {what} ({each}); expected one {what} for all tasks")
    return adapters


def _read_adapter(folder: Path, config: dict) -> _Adapter:
    path = folder / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    # What our merge W + scale·B@A computes: plain LoRA, one rank and one alpha for every module.
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg['peft_type']!r} is not served; expected 'LORA'")
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise CheckpointError(f"{path}: {key} {cfg[key]!r} is not served; expected a plain LoRA adapter (one r, one lora_alpha)")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1 or "lora_alpha" not in cfg:
        raise CheckpointError(f"{path}: r {cfg.get('r')!r} and lora_alpha {cfg.get('lora_alpha')!r}; expected a positive integer r and a lora_alpha")
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    scale = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
    modules = _targets(cfg.get("target_modules"), lora_modules(config), path)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"adapter {folder.name!r} in {folder.parent} has no adapter_model.safetensors")
    found = {_peft_name(n): s for n, (s, _, _) in _headers([weights]).items()}
    problems = _compare(_adapter_shapes(modules, lora_modules(config), r), found)
    if problems:
        raise CheckpointError(f"adapter {folder.name!r} does not match its adapter_config.json and the model: " + "; ".join(problems))
    return _Adapter(folder=folder, r=r, scale=scale, modules=modules)


def _targets(target_modules, modules: dict, path: Path) -> set[str]:
    """The modules PEFT adapts for ``target_modules``: a regex over the whole module name, "all-linear",
    or a list of names, each matching a module with that name or that ends in "." + it."""
    if isinstance(target_modules, str):
        chosen = {m for m in modules if m not in EMBEDDINGS} if target_modules == "all-linear" else {m for m in modules if re.fullmatch(target_modules, m)}
        if not chosen:
            raise CheckpointError(f"{path}: target_modules {target_modules!r} selects no module of the model; its modules are {_short_names(modules)}")
        return chosen
    if not target_modules:
        raise CheckpointError(f"{path} names no target_modules; expected some of {_short_names(modules)}")
    unknown = [t for t in target_modules if not any(m == t or m.endswith("." + t) for m in modules)]
    if unknown:
        raise CheckpointError(f"{path}: target_modules {', '.join(map(repr, unknown))} match no module of the model; expected some of {_short_names(modules)}")
    return {m for m in modules if any(m == t or m.endswith("." + t) for t in target_modules)}


def _short_names(modules) -> str:
    return ", ".join(dict.fromkeys(m.rpartition(".")[2] for m in modules))


def _adapter_shapes(modules: set[str], shapes: dict, r: int) -> dict[str, tuple[int, int]]:
    """The tensors PEFT saves for ``modules``, in PEFT's orientation: a Linear (out, in) has
    lora_A (r, in) and lora_B (out, r); an Embedding (num, dim) lora_embedding_A (r, num) and _B (dim, r)."""
    out = {}
    for module in sorted(modules):
        rows, cols = shapes[module]
        if module in EMBEDDINGS:
            out[f"{module}.lora_embedding_A"], out[f"{module}.lora_embedding_B"] = (r, rows), (cols, r)
        else:
            out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = (r, cols), (rows, r)
    return out


def _names(names, limit=8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _iter_tensors(files: list[Path], device: str, bad: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``files`` on ``device``; one that is not finite (``nonfinite``) is described in ``bad``."""
    for path in files:
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                counts = nonfinite(tensor)
                if counts is not None:  # adapter files share one name: the whole path says which task
                    bad.append(_nonfinite_message(str(path), name, tensor, counts))
                yield name, tensor


def load_checkpoint(model_dir, *, device: str = "cpu") -> Checkpoint:
    """Read a checkpoint of either layout into a ``Checkpoint`` (validated first, headers only).

    Every tensor read is checked finite (``nonfinite``: a fraction of a second on the full model on a
    CPU): weights with a NaN or an infinity would load and serve NaN vectors, so they are refused here,
    each named with its file, after all files are read."""
    model_dir = Path(model_dir)
    info = validate_checkpoint(model_dir)
    config = read_config(model_dir)
    files = weight_files(model_dir)
    bad: list[str] = []
    base, parts = _read_base(files, device, bad)
    if info["layout"] == "released":
        ckpt = _released_lora(config, base, parts)
    else:
        ckpt = _hf_lora(model_dir, config, base, device, bad)
    if bad:
        more = f"; and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise CheckpointError(f"{len(bad)} tensor(s) are not finite: {'; '.join(bad[:8])}{more}; {REEXPORT}")
    ckpt.instructions = {t: (config.get("task_instructions") or {}).get(t, "") for t in ckpt.tasks}
    return ckpt


def _read_base(files: list[Path], device: str, bad: list[str]):
    """The base weights under transformers' names (fused QKV split), and the released file's LoRA parts."""
    base, parts = {}, {}
    for name, tensor in _iter_tensors(files, device, bad):
        kind, native = _classify(name)
        if (native[0] if kind == "lora" else native).startswith(UNSERVED):
            continue
        if kind == "lora":
            parts[native] = tensor
        else:
            base[native] = tensor
    # One fused QKV projection in both files; transformers' attention has q/k/v Linears.
    for key in [k for k in base if ".qkv_proj." in k]:
        for proj, chunk in zip(QKV, base.pop(key).chunk(3, dim=0), strict=True):
            base[key.replace("qkv_proj", proj)] = chunk
    return base, parts


def _released_lora(config: dict, base: dict, parts: dict) -> Checkpoint:
    tasks = tuple(config.get("lora_adaptations") or ())
    scale = float(config.get("lora_alpha", 1)) / float(config.get("lora_rank", 4))
    # Linear: A (T, r, in), B (T, out, r), delta = B @ A; embeddings: A (T, vocab, r), B (T, r, hidden), delta = A @ B
    lora = {module: (parts[(module, "lora_A")], parts[(module, "lora_B")]) for module in sorted({m for m, _ in parts})}
    for module in [m for m in lora if m.endswith(".qkv_proj")]:
        a, b = lora.pop(module)
        for proj, b_chunk in zip(QKV, b.chunk(3, dim=1), strict=True):
            lora[module.replace("qkv_proj", proj)] = (a, b_chunk)
    return Checkpoint(config=config, layout="released", tasks=tasks, scale=scale, base=base, lora=lora)


def _hf_lora(model_dir: Path, config: dict, base: dict, device: str, bad: list[str]) -> Checkpoint:
    adapters = _hf_adapters(model_dir, config)
    tasks = tuple(adapters)
    first = next(iter(adapters.values()))
    shapes = lora_modules(config)
    # A module one task adapts and another does not gets a zero delta for the latter; the two
    # embeddings are always present because the model applies their adapters on the fly.
    modules = sorted(set().union(*(a.modules for a in adapters.values())) | set(EMBEDDINGS))
    per_task = []
    for adapter in adapters.values():
        tensors = {_peft_name(n): t for n, t in _iter_tensors([adapter.folder / "adapter_model.safetensors"], device, bad)}
        like = next(iter(tensors.values()))  # zeros in the adapter's dtype, so that the tasks stack
        per_task.append({m: _to_ours(m, tensors, shapes[m], first.r, like) for m in modules})
    lora = {m: (torch.stack([t[m][0] for t in per_task]), torch.stack([t[m][1] for t in per_task])) for m in modules}
    return Checkpoint(config=config, layout="hf", tasks=tasks, scale=first.scale, base=base, lora=lora)


def _to_ours(module: str, tensors: dict, shape: tuple[int, int], r: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's PEFT (A, B) in our orientation; zeros where this adapter does not target it."""
    rows, cols = shape
    if module in EMBEDDINGS:  # PEFT: A (r, vocab), B (hidden, r) → ours: A (vocab, r), B (r, hidden)
        if f"{module}.lora_embedding_A" not in tensors:
            return like.new_zeros(rows, r), like.new_zeros(r, cols)
        return tensors[f"{module}.lora_embedding_A"].T, tensors[f"{module}.lora_embedding_B"].T
    if f"{module}.lora_A.weight" not in tensors:  # Linear: A (r, in), B (out, r), as ours
        return like.new_zeros(r, cols), like.new_zeros(rows, r)
    return tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
