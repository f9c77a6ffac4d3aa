"""The embedding engine: texts in, jina-embeddings-v3 vectors out.

The story of one call, top to bottom:
1. each request is validated and its defaults resolved (task, dimensions, encoding);
2. texts become token sequences (task instruction prepended, truncated or refused past the limit);
   a late-chunking request becomes one document, cut into overlapping windows past the limit;
3. every token gets the output *slot* it is pooled into (its text, or its chunk; -1 for tokens that
   overlapping windows already produced);
4. sequences are grouped by task, sorted by length and packed into batches by a token budget;
5. each batch runs through the model once, padding-free, and its tokens are summed into their slots
   in float32 (a batch that runs out of GPU memory is split in two and retried);
6. slot means are truncated to the Matryoshka size, then L2-normalised.
Requests are independent: one bad request in ``embed_many`` gets its own error, the others their vectors.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from .checkpoint import load_checkpoint
from .errors import CapacityError, CheckpointError, InvalidRequest, JV3Error, ModelError, SettingsError
from .model import TaskModel
from .request import EmbedRequest, EmbedResult
from .settings import Settings, check_against

log = logging.getLogger("jv3.engine")

DEFAULT_BATCH_TOKENS = {"cuda": 65536, "cpu": 8192}


@dataclass
class Sequence:
    """One forward-pass row: token ids and, per token, the output slot it is pooled into (-1: drop)."""

    task: str | None
    ids: list[int]
    slots: np.ndarray  # (len(ids),) int64


@dataclass
class _Plan:
    """What one request turns into: its sequences, its output slots and how to finish them."""

    request: EmbedRequest
    task: str | None
    dimensions: int
    encoding: str
    first_slot: int
    n_slots: int
    token_counts: list[int]
    sequences: list[Sequence]


class Engine:
    model_name = "jina-embeddings-v3"

    def __init__(self, model: TaskModel, tokenizer: Tokenizer, *, settings: Settings, instructions: dict[str, str], tasks: tuple[str, ...]):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.instructions = instructions
        self.tasks = tasks
        self.hidden_size = int(model.config.hidden_size)
        self.bos_id = int(model.config.bos_token_id)
        self.eos_id = int(model.config.eos_token_id)
        self.max_seq_length = min(settings.max_seq_length, int(model.config.max_position_embeddings) - 2)
        kind = "cuda" if model.device.type == "cuda" else "cpu"
        self.max_batch_tokens = max(settings.max_batch_tokens or DEFAULT_BATCH_TOKENS[kind], self.max_seq_length)
        check_against(settings, hidden_size=self.hidden_size, tasks=tasks)

    # -----------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def load(cls, model_dir, settings: Settings | None = None, *, device: str | None = None) -> Engine:
        """Load a checkpoint directory (either published layout) onto ``device`` (default: ``JV3_DEVICE``)."""
        settings = settings or Settings.resolve()
        started = time.perf_counter()
        device = _device(device or settings.device)
        dtype = _dtype(settings.dtype, device)
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"{model_dir} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        # Read straight onto the GPU when there is one: merging adapters there takes a fraction of a second.
        ckpt = load_checkpoint(model_dir, device=str(device) if device.type == "cuda" else "cpu")
        check_against(settings, hidden_size=int(ckpt.config["hidden_size"]), tasks=ckpt.tasks)
        model = TaskModel(ckpt, device=device, dtype=dtype, tasks=settings.tasks)
        del ckpt
        engine = cls(model, tokenizer, settings=settings, instructions=_instructions(model_dir, settings.tasks), tasks=settings.tasks)
        log.info("loaded %s (%s) on %s/%s in %.1fs", model_dir, ",".join(settings.tasks), device, dtype, time.perf_counter() - started)
        return engine

    # -----------------------------------------------------------------------------------------
    # Public API

    def embed(self, request: EmbedRequest) -> EmbedResult:
        result = self.embed_many([request])[0]
        if isinstance(result, JV3Error):
            raise result
        return result

    def embed_many(self, requests: list[EmbedRequest]) -> list[EmbedResult | JV3Error]:
        """Embed several requests in shared forward passes; each gets its result or its own error."""
        plans: list[_Plan | JV3Error] = []
        next_slot = 0
        for request in requests:
            try:
                plan = self._plan(request, next_slot)
            except JV3Error as exc:
                plans.append(exc)
                continue
            plans.append(plan)
            next_slot += plan.n_slots
        live = [p for p in plans if isinstance(p, _Plan)]
        if live:
            try:
                sums, counts = self._run([s for p in live for s in p.sequences], next_slot)
            except JV3Error as exc:
                return [exc if isinstance(p, _Plan) else p for p in plans]
        results: list[EmbedResult | JV3Error] = []
        for plan in plans:
            results.append(plan if isinstance(plan, JV3Error) else self._finish(plan, sums, counts))
        return results

    def count_tokens(self, texts: list[str], task: str | None = None) -> list[int]:
        prefix = self.instructions.get(task or self.settings.default_task, "")
        return [len(e.ids) for e in self.tokenizer.encode_batch([prefix + t for t in texts])]

    # -----------------------------------------------------------------------------------------
    # 1-3: plan a request into sequences and slots

    def _plan(self, request: EmbedRequest, first_slot: int) -> _Plan:
        request.validate(hidden_size=self.hidden_size, tasks=self.tasks)
        task = request.task or self.settings.default_task
        dimensions = request.dimensions or self.settings.default_dimensions or self.hidden_size
        encoding = request.encoding or self.settings.default_encoding
        if request.late_chunking:
            sequences, n_tokens = self._late_chunking(request.texts, task, first_slot)
            return _Plan(request, task, dimensions, encoding, first_slot, len(request.texts), [n_tokens] + [0] * (len(request.texts) - 1), sequences)
        prefix = self.instructions.get(task, "")
        encodings = self.tokenizer.encode_batch([prefix + t for t in request.texts])
        sequences, counts = [], []
        for i, enc in enumerate(encodings):
            ids = enc.ids
            if len(ids) > self.max_seq_length:
                if not request.truncate:
                    raise InvalidRequest(
                        f"text {i} is {len(ids)} tokens, over the limit of {self.max_seq_length}; "
                        "send truncate: true to cut it, or late_chunking to embed it in pieces",
                        field=f"texts[{i}]",
                    )
                ids = ids[: self.max_seq_length - 1] + [self.eos_id]  # keep </s>, as the tokenizer would
            sequences.append(Sequence(task, ids, np.full(len(ids), first_slot + i, dtype=np.int64)))
            counts.append(len(ids))
        return _Plan(request, task, dimensions, encoding, first_slot, len(request.texts), counts, sequences)

    def _late_chunking(self, chunks: list[str], task: str, first_slot: int) -> tuple[list[Sequence], int]:
        """Late chunking as Jina's API defines it: the chunks are one document, encoded once.

        Each token is pooled into the chunk its first character falls in; the first chunk also takes
        ``<s>`` and the instruction, the last one ``</s>``. Past the token limit the document runs in
        windows of ``max_seq_length`` overlapping by ``late_chunking_overlap``; a later window drops
        the outputs of its first ``overlap`` tokens, which the window before produced with more context.
        """
        prefix = self.instructions.get(task, "")
        enc = self.tokenizer.encode(prefix + " ".join(chunks))
        # Character where each chunk starts. The joining space belongs to no chunk, so a token that
        # begins on it ("▁for") stays with the chunk before, as the original implementation does.
        starts, pos = [0], len(prefix)
        for chunk in chunks[:-1]:
            pos += len(chunk) + 1
            starts.append(pos)
        slots = np.empty(len(enc.ids), dtype=np.int64)
        for j, ((begin, _end), special) in enumerate(zip(enc.offsets, enc.special_tokens_mask, strict=True)):
            if special:
                slots[j] = len(chunks) - 1 if j == len(enc.ids) - 1 else 0
            else:
                slots[j] = bisect.bisect_right(starts, begin) - 1
        special = np.asarray(enc.special_tokens_mask, dtype=bool)
        empty = sorted(set(range(len(chunks))) - set(slots[~special].tolist()))
        if empty:
            raise InvalidRequest(
                f"late chunking: chunk {empty[0]} ({chunks[empty[0]]!r}) gets no token of its own; "
                "remove empty or whitespace-only chunks",
                field=f"texts[{empty[0]}]",
            )
        slots += first_slot
        ids = enc.ids
        window, overlap = self.max_seq_length, min(self.settings.late_chunking_overlap, self.max_seq_length // 2)
        if len(ids) <= window:
            return [Sequence(task, ids, slots)], len(ids)
        sequences, start = [], 0
        while True:
            end = min(start + window, len(ids))
            piece = slots[start:end].copy()
            if start:
                piece[:overlap] = -1  # produced by the previous window
            sequences.append(Sequence(task, ids[start:end], piece))
            if end == len(ids):
                return sequences, len(ids)
            start += window - overlap

    # -----------------------------------------------------------------------------------------
    # 4-5: batch, run, pool

    def _run(self, sequences: list[Sequence], n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.model.device
        # One spare slot at the end takes the tokens that are dropped (slot -1), so that pooling
        # needs no boolean indexing, which would stall the GPU pipeline.
        sums = torch.zeros(n_slots + 1, self.hidden_size, dtype=torch.float32, device=device)
        counts = torch.zeros(n_slots + 1, dtype=torch.float32, device=device)
        order = {t: i for i, t in enumerate((None, *self.tasks))}
        # Longest first, so batches hold texts of similar length; tasks mix freely within a batch.
        for batch in self._batches(sorted(sequences, key=lambda s: len(s.ids), reverse=True)):
            batch.sort(key=lambda s: order[s.task])  # one contiguous segment per task
            self._forward_pool(batch, sums, counts)
        return sums[:-1], counts[:-1]

    def _batches(self, group: list[Sequence]):
        batch, tokens = [], 0
        for seq in group:
            if batch and tokens + len(seq.ids) > self.max_batch_tokens:
                yield batch
                batch, tokens = [], 0
            batch.append(seq)
            tokens += len(seq.ids)
        if batch:
            yield batch

    def _forward_pool(self, batch: list[Sequence], sums: torch.Tensor, counts: torch.Tensor) -> None:
        try:
            ids = torch.from_numpy(np.concatenate([np.asarray(s.ids, dtype=np.int64) for s in batch]))
            hidden = self.model.forward_packed(ids, [len(s.ids) for s in batch], [s.task for s in batch])  # (tokens, hidden)
            slots = torch.from_numpy(np.concatenate([s.slots for s in batch])).to(hidden.device, non_blocking=True)
            slots = torch.where(slots < 0, sums.shape[0] - 1, slots)
            sums.index_add_(0, slots, hidden.float())  # pool in float32
            counts.index_add_(0, slots, torch.ones(slots.shape, dtype=torch.float32, device=slots.device))
        except torch.OutOfMemoryError:
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                raise CapacityError(
                    f"out of GPU memory on one text of {len(batch[0].ids)} tokens even alone; "
                    "lower JV3_MAX_BATCH_TOKENS or JV3_MAX_SEQ_LENGTH, or use a larger instance"
                ) from None
            half = len(batch) // 2
            log.warning("out of memory on a batch of %d texts; retrying in halves", len(batch))
            self._forward_pool(batch[:half], sums, counts)
            self._forward_pool(batch[half:], sums, counts)
        except RuntimeError as exc:
            raise ModelError(f"the model failed on a batch of {len(batch)} texts: {exc}") from exc

    # -----------------------------------------------------------------------------------------
    # 6: Matryoshka and normalisation

    def _finish(self, plan: _Plan, sums: torch.Tensor, counts: torch.Tensor) -> EmbedResult:
        s = slice(plan.first_slot, plan.first_slot + plan.n_slots)
        pooled = sums[s] / counts[s].clamp(min=1)[:, None]  # (n, hidden) float32
        vectors = pooled[:, : plan.dimensions]  # truncate first, then normalise
        if plan.request.normalized:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return EmbedResult(
            embeddings=vectors.cpu().numpy().astype(np.float32, copy=False),
            token_counts=plan.token_counts,
            encoding=plan.encoding,
            ids=plan.request.ids,
            extra={"task": plan.task, "dimensions": plan.dimensions},
        )


def serving_devices(setting: str, *, gpu_id: int | None = None) -> list[str]:
    """The devices to load one engine on each, from ``JV3_DEVICE``.

    ``auto``: the GPU TorchServe gave this worker (``gpu_id``, on the DLC), else every visible GPU (the
    BYOC server runs one engine per GPU), else the CPU. A comma-separated list names the devices
    (``cuda:0,cuda:1``; ``cpu,cpu`` runs two engines on the CPU).
    """
    names = [n.strip() for n in setting.split(",") if n.strip()]
    if names != ["auto"]:
        for name in names:
            _device(name)  # refuse a bad name now, by name
        return names or ["cpu"]
    if not torch.cuda.is_available():
        return ["cpu"]
    if gpu_id is not None:
        return [f"cuda:{gpu_id}"]
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingsError(f"JV3_DEVICE={name!r} is not a device; expected auto, cpu, cuda, cuda:N or a comma-separated list") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"JV3_DEVICE={name!r} but no CUDA device is visible")
    return device


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# What the released config.json says; used when a checkpoint's config carries no task_instructions.
DEFAULT_INSTRUCTIONS = {
    "retrieval.query": "Represent the query for retrieving evidence documents: ",
    "retrieval.passage": "Represent the document for retrieval: ",
}


def _instructions(model_dir: Path, tasks: tuple[str, ...]) -> dict[str, str]:
    config = json.loads((model_dir / "config.json").read_text())
    table = config.get("task_instructions")
    if table is None:
        table = DEFAULT_INSTRUCTIONS
    return {t: table.get(t, "") for t in tasks}
