"""The network: transformers' ``JinaEmbeddingsV3Model`` with per-task merged weights, run padding-free.

Three choices make it fast, each measured in bench/:
- **Merged task weights.** Every Linear gets ``W + scale · B[t] @ A[t]`` precomputed per task, so a
  forward pass costs what the plain model costs (PEFT's per-row routing was 3.7× slower on an H100).
  The word-embedding adapter is applied on the fly instead (``A[t][ids] @ B[t]``, rank 4): a merged
  250k×1024 table per task would cost 0.5 GB each for a gather.
- **Packed sequences.** A batch is one row of concatenated texts with positions restarting at each
  text; attention sees ``cu_seqlens`` so no FLOP is spent on padding (flash-attention varlen on GPU;
  elsewhere one SDPA call per *run* of equal-length adjacent texts, see ``runs_attention``). Linear
  layers, LayerNorm and the MLP never see padding either.
- **Mixed tasks in one pass.** Inside a batch the texts of one task are adjacent, and every Linear
  holds all tasks' weights: it runs one GEMM per task segment (``TaskLinear``). Attention, norms
  and the rest run once over the whole row.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpoint, native_config

ATTENTION = "jv3_packed"

try:  # flash-attention varlen, public in torch ≥ 2.9 (CUDA only)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch: the same flash kernel through its aten op

    def _varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k):
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False)[0]


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over texts packed in one row. query/key/value: (1, heads, tokens, head_dim).

    Returns (1, tokens, heads, head_dim), as transformers' attention functions do.
    """
    cu_seqlens = kwargs.get("cu_seqlens")
    if cu_seqlens is None:  # one text, no packing
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling)
        return out.transpose(1, 2), None
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        max_len = int(kwargs["max_seqlen"])
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
        out = _varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
        return out.unsqueeze(0), None
    runs = kwargs.get("attention_runs")
    if runs is None:  # the reference path (tests, bench): one SDPA call per text
        return per_text_attention(query, key, value, kwargs["cu_seqlens_list"], scaling), None
    return runs_attention(query, key, value, runs, scaling), None


def equal_length_runs(lengths) -> list[tuple[int, int, int, int]]:
    """Maximal runs of adjacent texts of one length: ``(start token, end token, texts, length)``.

    The engine packs a batch longest first within each task, so equal lengths are adjacent; a run
    of ``n`` texts of length ``L`` is a (n, L) block of the packed row that attention takes whole.
    """
    runs, start, i = [], 0, 0
    while i < len(lengths):
        length, j = lengths[i], i + 1
        while j < len(lengths) and lengths[j] == length:
            j += 1
        runs.append((start, start + (j - i) * length, j - i, int(length)))
        start += (j - i) * length
        i = j
    return runs


def runs_attention(query, key, value, runs, scaling=None) -> torch.Tensor:
    """One SDPA call per run of equal-length texts: the run's tokens, viewed (no copy) as a batch of
    ``n`` texts × ``L`` tokens, need no padding and no mask. Exactly per-text attention, in ``len(runs)``
    calls instead of one per text: each call is one parallel region, and on a busy CPU every region
    costs a wait for all of its threads (issue 10, item 3). Returns (1, tokens, heads, head_dim)."""
    outs = []
    for start, end, n, length in runs:
        if n == 1:
            o = F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], scale=scaling)
            outs.append(o[0].transpose(0, 1))  # (L, heads, head_dim)
            continue
        q, k, v = (t[0, :, start:end].unflatten(1, (n, length)).transpose(0, 1) for t in (query, key, value))  # (n, heads, L, d) views
        o = F.scaled_dot_product_attention(q, k, v, scale=scaling)  # (n, heads, L, d)
        outs.append(o.transpose(1, 2).flatten(0, 1))  # (n·L, heads, head_dim)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.unsqueeze(0)


def per_text_attention(query, key, value, bounds, scaling=None) -> torch.Tensor:
    """One SDPA call per text (``bounds``: token offsets of the texts, with the end)."""
    outs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scale=scaling)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outs, dim=2).transpose(1, 2)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION, packed_attention)
    # Packing replaces the mask: tell transformers to build none.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, lambda *args, **kwargs: None)


class TaskLinear(nn.Module):
    """A Linear whose weight depends on the task of each token segment of the packed row.

    Holds the base weight and every task's merged weight stacked: (variants, out, in). Tokens are
    sorted by task inside a batch, so each task is one contiguous row range and gets one GEMM
    (``addmm`` into its slice of the output): a mixed-task batch costs what a single-task one does,
    instead of one forward pass per task.
    """

    def __init__(self, weights: torch.Tensor, bias: torch.Tensor | None, segments: list):
        super().__init__()
        self.weights = weights  # (variants, out, in)
        self.bias = bias
        self.segments = segments  # shared, set per forward: [(variant, start, end), ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.segments) == 1:
            return F.linear(x, self.weights[self.segments[0][0]], self.bias)
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        out = flat.new_empty(flat.shape[0], self.weights.shape[1])
        for variant, start, end in self.segments:
            w = self.weights[variant].T
            if self.bias is None:
                torch.mm(flat[start:end], w, out=out[start:end])
            else:
                torch.addmm(self.bias, flat[start:end], w, out=out[start:end])
        return out.reshape(*x.shape[:-1], -1)


class TaskModel:
    """``JinaEmbeddingsV3Model`` whose Linear layers carry the base and every task's merged weights."""

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

        # Variant 0 is the base model (no adapter), variant i+1 the i-th served task.
        self.variants: dict[str | None, int] = {None: 0, **{t: i + 1 for i, t in enumerate(tasks)}}
        self.segments: list[tuple[int, int, int]] = [(0, 0, 0)]
        order = [ckpt.tasks.index(t) for t in tasks]
        for module_name, (a, b) in ckpt.lora.items():
            if module_name.startswith("embeddings."):
                continue
            parent, _, attr = module_name.rpartition(".")
            linear = self.model.get_submodule(module_name)
            stack = [linear.weight.data]
            for t in order:  # W + scale · B[t] @ A[t], merged in float32
                delta = b[t].to(device, torch.float32) @ a[t].to(device, torch.float32)
                stack.append((linear.weight.data.float() + ckpt.scale * delta).to(dtype))
            setattr(self.model.get_submodule(parent), attr, TaskLinear(torch.stack(stack), linear.bias, self.segments))
            del linear, stack
        # Embedding adapters (A (vocab, r), B (r, hidden)): the word one runs on the fly at rank r,
        # the token-type one (a single row: token type is always 0) becomes a per-task offset.
        a, b = ckpt.lora["embeddings.word_embeddings"]
        self.word_a = torch.stack([torch.zeros_like(a[0])] + [a[t] for t in order]).to(device, dtype)  # (variants, vocab, r)
        self.word_b = torch.stack([torch.zeros_like(b[0])] + [ckpt.scale * b[t] for t in order]).to(device, dtype)  # (variants, r, hidden)
        a, b = ckpt.lora["embeddings.token_type_embeddings"]
        self.type_offset = torch.stack(
            [torch.zeros(b.shape[-1], device=b.device)] + [ckpt.scale * (a[t, 0].float() @ b[t].float()) for t in order]
        ).to(device, dtype)  # (variants, hidden)
        # Attention where flash-attention varlen does not run (CPU, float32): "runs" (one SDPA call per
        # run of equal-length texts) or "per_text" (one call per text: the reference, for tests and bench).
        self.attention = "runs"
        self._lock = threading.Lock()

    @torch.inference_mode()
    def forward_packed(self, input_ids: torch.Tensor, lengths: list[int], tasks: list[str | None]) -> torch.Tensor:
        """Texts back to back (``input_ids`` (tokens,), ``lengths`` and ``tasks`` per text, texts of one
        task adjacent) → last hidden state (tokens, hidden)."""
        bounds = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        positions = np.arange(bounds[-1]) - np.repeat(bounds[:-1], lengths)  # restart at each text
        segments, start = [], 0
        for i in range(1, len(tasks) + 1):
            if i == len(tasks) or tasks[i] != tasks[start]:
                segments.append((self.variants[tasks[start]], int(bounds[start]), int(bounds[i])))
                start = i
        pos = torch.from_numpy(positions)
        cu_seqlens = torch.from_numpy(bounds.astype(np.int32))
        if self.device.type == "cuda":
            # Copies from pinned memory are asynchronous (non_blocking), so the host goes on to queue the
            # kernels; from pageable memory each would wait. Unmeasured on a GPU (issue 11 item 2).
            pos, cu_seqlens = pos.pin_memory(), cu_seqlens.pin_memory()
            if input_ids.device.type == "cpu" and not input_ids.is_pinned():
                input_ids = input_ids.pin_memory()
        ids = input_ids.to(self.device, non_blocking=True)
        pos = pos.to(self.device, non_blocking=True)
        cu_seqlens = cu_seqlens.to(self.device, non_blocking=True)
        with self._lock:
            self.segments[:] = segments
            embeds = self.model.embeddings.word_embeddings(ids)  # (tokens, hidden)
            for variant, s, e in segments:
                if variant:
                    seg = ids[s:e]
                    embeds[s:e] += self.word_a[variant][seg] @ self.word_b[variant] + self.type_offset[variant]
            out = self.model(
                inputs_embeds=embeds[None],
                position_ids=pos[None],
                cu_seqlens=cu_seqlens,
                cu_seqlens_list=bounds.tolist(),
                attention_runs=equal_length_runs(lengths) if self.attention == "runs" else None,
                max_seqlen=int(max(lengths)),
            )
        return out.last_hidden_state[0]  # (tokens, hidden)
