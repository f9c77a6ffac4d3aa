"""The network: transformers' ``JinaEmbeddingsV3Model`` with per-task merged weights, run padding-free.

Three choices make it fast, each measured in bench/:
- **Merged task weights.** Every Linear gets ``W + scale · B[t] @ A[t]`` precomputed per task, so a
  forward pass costs what the plain model costs (PEFT's per-row routing was 3.7× slower on an H100).
  The word-embedding adapter is applied on the fly instead (``A[t][ids] @ B[t]``, rank 4): a merged
  250k×1024 table per task would cost 0.5 GB each for a gather.
- **Packed sequences.** A batch is one row of concatenated texts with positions restarting at each
  text; attention sees ``cu_seqlens`` so no FLOP is spent on padding (flash-attention varlen on GPU,
  one SDPA call per text on CPU). Linear layers, LayerNorm and the MLP never see padding either.
- **One model object.** Tasks switch by pointing the Linear parameters at the task's tensors
  (a few hundred pointer swaps, only when the task changes), under a lock.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .checkpoint import EMBEDDINGS, Checkpoint, native_config

ATTENTION = "jv3_packed"

try:  # flash-attention varlen, public in torch ≥ 2.9 (CUDA only)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over texts packed in one row. query/key/value: (1, heads, tokens, head_dim).

    Returns (1, tokens, heads, head_dim), as transformers' attention functions do.
    """
    cu_seqlens = kwargs.get("cu_seqlens")
    if cu_seqlens is None:  # one text, no packing
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling)
        return out.transpose(1, 2), None
    if query.is_cuda and _varlen_attn is not None and query.dtype in (torch.float16, torch.bfloat16):
        max_len = int(kwargs["max_seqlen"])
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
        out = _varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
        return out.unsqueeze(0), None
    bounds = kwargs["cu_seqlens_list"]
    outs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scale=scaling)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outs, dim=2).transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION, packed_attention)
    # Packing replaces the mask: tell transformers to build none.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, lambda *args, **kwargs: None)


class TaskModel:
    """``JinaEmbeddingsV3Model`` holding the base weights plus each task's merged weights."""

    def __init__(self, ckpt: Checkpoint, *, device: torch.device, dtype: torch.dtype, tasks: tuple[str, ...]):
        from transformers import JinaEmbeddingsV3Model

        _register_attention()
        self.config = native_config(ckpt.config, attn_implementation=ATTENTION)
        self.device, self.dtype = device, dtype
        with torch.device("meta"):  # no random init of 570M parameters we overwrite anyway
            model = JinaEmbeddingsV3Model(self.config, add_pooling_layer=False)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in ckpt.base.items()}, strict=True, assign=True)
        # Non-persistent buffers are not in the checkpoint: rebuild the rotary tables on the device.
        model.rotary_emb = type(model.rotary_emb)(self.config).to(device)
        model.embeddings.position_ids = torch.zeros(1, 1, dtype=torch.long, device=device)  # unused
        model.embeddings.token_type_ids = torch.zeros(1, 1, dtype=torch.long, device=device)  # unused
        self.model = model.eval().requires_grad_(False)

        self.params = dict(self.model.named_parameters())
        self.task_index = {t: i for i, t in enumerate(ckpt.tasks)}
        self.scale = ckpt.scale
        # task → {parameter name → merged tensor}; None is the base model (no adapter)
        self.weights: dict[str | None, dict[str, torch.Tensor]] = {None: {n: p.data for n, p in self.params.items()}}
        self.word_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for task in tasks:
            self.weights[task] = self._merge(ckpt, self.task_index[task])
        self._active: str | None = None
        self._lock = threading.Lock()

    def _merge(self, ckpt: Checkpoint, t: int) -> dict[str, torch.Tensor]:
        merged = {}
        for module, (a, b) in ckpt.lora.items():
            name = module + ".weight"
            base = self.params[name].data.float()
            a_t, b_t = a[t].to(self.device, torch.float32), b[t].to(self.device, torch.float32)
            if module == "embeddings.word_embeddings":
                task = ckpt.tasks[t]
                self.word_lora[task] = (a_t.to(self.dtype), (self.scale * b_t).to(self.dtype))  # (V, r), (r, H)
                continue
            # Embedding adapters store A (vocab, r) and B (r, hidden); Linear ones B (out, r) @ A (r, in).
            delta = a_t @ b_t if module in EMBEDDINGS else b_t @ a_t
            merged[name] = (base + self.scale * delta).to(self.dtype)
        return merged

    def _activate(self, task: str | None) -> None:
        if task == self._active:
            return
        for name, tensor in self.weights[task].items():
            self.params[name].data = tensor
        if task is not None:  # untouched parameters (norms, biases) fall back to the base
            for name in self.weights[None].keys() - self.weights[task].keys():
                self.params[name].data = self.weights[None][name]
        self._active = task

    @torch.inference_mode()
    def forward_packed(self, input_ids: torch.Tensor, lengths: list[int], task: str | None) -> torch.Tensor:
        """input_ids (tokens,) of texts back to back, ``lengths`` per text → last hidden state (tokens, hidden)."""
        ids = input_ids.to(self.device, non_blocking=True)
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device, non_blocking=True)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32).to(self.device, non_blocking=True)
        with self._lock:
            self._activate(task)
            embeds = self.model.embeddings.word_embeddings(ids)  # (tokens, hidden)
            if task is not None and task in self.word_lora:
                a, b = self.word_lora[task]
                embeds = embeds + a[ids] @ b  # the embedding adapter, rank r, on the fly
            out = self.model(
                inputs_embeds=embeds[None],
                position_ids=positions[None],
                cu_seqlens=cu_seqlens,
                cu_seqlens_list=bounds,
                max_seqlen=max(lengths),
            )
        return out.last_hidden_state[0]  # (tokens, hidden)
