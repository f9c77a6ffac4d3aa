"""The embedding engine: texts in, jina-embeddings-v3 vectors out.

The story of one call, top to bottom, in two halves: ``prepare`` (steps 1-3, one request, any thread)
and ``run`` (steps 4-6, many prepared plans at once); ``embed_many`` is one after the other.
1. each request is validated and its defaults resolved (task, dimensions, encoding);
2. texts become token sequences (task instruction prepended, truncated or refused past the limit; a
   text that will be truncated is cut before it is tokenised, to exactly the ids truncation keeps:
   ``PrefixCut``); a late-chunking request becomes one document, cut into overlapping windows past
   the limit;
3. every token gets the output *slot* it is pooled into (its text, or its chunk; -1 for tokens that
   overlapping windows already produced), counted from 0 within the request's ``Plan``;
4. ``run`` rebases the plans' slots one after another; sequences are sorted by length and packed into
   batches by a token budget, each batch with one contiguous segment per task;
5. each batch runs through the model once, padding-free, and its tokens are summed into their slots
   in float32 (a batch that runs out of GPU memory is split in two and retried);
6. slot means are truncated to the Matryoshka size, then L2-normalised.
Requests are independent: one bad request in ``embed_many`` gets its own error, the others their vectors.
A plan can be split into pieces that run in different calls and are joined back (``Plan.split`` and
``Plan.join``): the local server's scheduler (``inference/scheduling.py``) shares batches that way.

On the CPU the engine also sets two process-wide knobs when it loads (bench/cpu_paths.py measures
both): libgomp's idle threads spin 100 times instead of 300,000 (``throttle_openmp_spin``: the cause
of the main-thread slowness and of the collapse under load), and glibc's malloc keeps freed memory
(``keep_freed_memory``). Each call runs with the engine's intra-op team (``cpu_threads``) on
whichever thread calls it.
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
from .cpu_runtime import cpu_threads, keep_freed_memory, throttle_openmp_spin, usable_cpus
from .errors import CapacityError, CheckpointError, InvalidRequest, JV3Error, ModelError, SettingsError
from .model import TaskModel
from .request import EmbedRequest, EmbedResult
from .settings import Settings, check_against
from .truncation import PrefixCut

log = logging.getLogger("jv3.engine")

DEFAULT_BATCH_TOKENS = {"cuda": 65536, "cpu": 8192}


@dataclass
class Sequence:
    """One forward-pass row: token ids and, per token, the output slot it is pooled into (-1: drop)."""

    task: str | None
    ids: list[int]
    slots: np.ndarray  # (len(ids),) int64


@dataclass
class Plan:
    """What ``Engine.prepare`` turns one request into: its sequences, their output slots counted from 0
    within the plan (``Engine.run`` rebases them), and how to finish them."""

    request: EmbedRequest
    task: str | None
    dimensions: int
    encoding: str
    n_slots: int
    token_counts: list[int]
    sequences: list[Sequence]
    rows: np.ndarray | None = None  # a piece (``split``): the rows of the plan it came from, in slot order

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self.sequences)

    def split(self, max_tokens: int) -> list[Plan]:
        """Pieces of at most ``max_tokens`` tokens (a longer text is a piece alone), longest texts first
        as ``run`` batches them, so that each piece fits one forward batch beside others'. A late-chunking
        plan stays whole: its chunks are one document (and the request's size bounds it)."""
        if self.request.late_chunking or self.tokens <= max_tokens:
            return [self]
        order = sorted(range(len(self.sequences)), key=lambda i: len(self.sequences[i].ids), reverse=True)
        pieces, members, tokens = [], [], 0
        for i in order:
            n = len(self.sequences[i].ids)
            if members and tokens + n > max_tokens:
                pieces.append(self._piece(members))
                members, tokens = [], 0
            members.append(i)
            tokens += n
        pieces.append(self._piece(members))
        return pieces

    def _piece(self, members: list[int]) -> Plan:
        # Outside late chunking a text is one sequence, pooled whole into its own slot: its place in the piece.
        sequences = [
            Sequence(self.sequences[i].task, self.sequences[i].ids, np.full(len(self.sequences[i].ids), k, dtype=np.int64))
            for k, i in enumerate(members)
        ]
        counts = [self.token_counts[i] for i in members]
        return Plan(self.request, self.task, self.dimensions, self.encoding, len(members), counts, sequences, np.asarray(members))

    def join(self, pieces: list[Plan], results: list[EmbedResult | JV3Error]) -> EmbedResult | JV3Error:
        """This plan's result from its ``split`` pieces' results: the first error, else every row back in its place."""
        for result in results:
            if isinstance(result, JV3Error):
                return result
        if len(pieces) == 1 and pieces[0] is self:
            return results[0]
        first = results[0]
        embeddings = np.empty((self.n_slots, first.embeddings.shape[1]), dtype=np.float32)
        counts = [0] * self.n_slots
        for piece, result in zip(pieces, results, strict=True):
            embeddings[piece.rows] = result.embeddings
            for row, count in zip(piece.rows.tolist(), result.token_counts, strict=True):
                counts[row] = count
        return EmbedResult(embeddings=embeddings, token_counts=counts, encoding=first.encoding, ids=first.ids, extra=first.extra)


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
        # Keeps max_seq_length - 1 ids and appends </s>, as the truncation in _plan does; None: no exact cut.
        self.prefix_cut = PrefixCut.of(tokenizer, keep=self.max_seq_length - 1)
        # Intra-op threads of the forward pass on the CPU (None on a GPU); every call enforces it, on
        # whichever thread runs it (TorchServe's main thread, the local server's batcher thread).
        self.threads = cpu_threads() if kind == "cpu" else None
        if self.threads is not None:
            torch.set_num_threads(self.threads)
            throttle_openmp_spin(self.threads)
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
        if device.type == "cpu":
            keep_freed_memory()  # before the weights, so that they sit below the per-batch tensors
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
        log.info("loaded %s (%s) on %s/%s in %.1fs%s", model_dir, ",".join(settings.tasks), device, dtype, time.perf_counter() - started,
                 f", {engine.threads} intra-op thread(s) of {usable_cpus()} CPUs" if engine.threads else "")  # fmt: skip
        return engine

    # -----------------------------------------------------------------------------------------
    # Public API

    def embed(self, request: EmbedRequest) -> EmbedResult:
        result = self.embed_many([request])[0]
        if isinstance(result, JV3Error):
            raise result
        return result

    def embed_many(self, requests: list[EmbedRequest | Plan]) -> list[EmbedResult | JV3Error]:
        """Embed several requests in shared forward passes; each gets its result or its own error.

        ``prepare`` each request, then ``run`` them all. An item that is already a ``Plan`` (or a piece of
        one) is run as it is: the local server prepares on its handler threads and hands its batchers plans.
        """
        return self.run([r if isinstance(r, Plan) else self.prepare(r) for r in requests])

    def prepare(self, request: EmbedRequest) -> Plan | JV3Error:
        """Validate and tokenise one request (steps 1-3): its plan, with slots counted from 0, or its error.

        Safe on any thread, several at once: the tokenizer is only read (its ``encode_batch`` takes it
        shared and releases the GIL, so requests are tokenised while a forward pass runs), never
        reconfigured after ``load``.
        """
        try:
            return self._plan(request)
        except JV3Error as exc:
            return exc

    def run(self, plans: list[Plan | JV3Error]) -> list[EmbedResult | JV3Error]:
        """Embed prepared plans in shared forward passes (steps 4-6); an error in the list keeps its place."""
        live = [p for p in plans if isinstance(p, Plan)]
        if not live:
            return list(plans)
        sequences, firsts, n_slots = [], [], 0
        for plan in live:  # rebase each plan's slots after the plans before it; -1 stays dropped
            firsts.append(n_slots)
            for s in plan.sequences:
                sequences.append(s if not n_slots else Sequence(s.task, s.ids, np.where(s.slots < 0, -1, s.slots + n_slots)))
            n_slots += plan.n_slots
        try:
            sums, counts = self._run(sequences, n_slots)
        except JV3Error as exc:
            return [exc if isinstance(p, Plan) else p for p in plans]
        finished = iter(self._finish(live, firsts, sums, counts))
        return [next(finished) if isinstance(p, Plan) else p for p in plans]

    def count_tokens(self, texts: list[str], task: str | None = None) -> list[int]:
        prefix = self.instructions.get(task or self.settings.default_task, "")
        return [len(e.ids) for e in self.tokenizer.encode_batch([prefix + t for t in texts])]

    # -----------------------------------------------------------------------------------------
    # 1-3: plan a request into sequences and slots

    def _plan(self, request: EmbedRequest) -> Plan:
        request.validate(hidden_size=self.hidden_size, tasks=self.tasks)
        task = request.task or self.settings.default_task
        dimensions = request.dimensions or self.settings.default_dimensions or self.hidden_size
        encoding = request.encoding or self.settings.default_encoding
        if request.late_chunking:
            sequences, n_tokens = self._late_chunking(request.texts, task, 0)
            return Plan(request, task, dimensions, encoding, len(request.texts), [n_tokens] + [0] * (len(request.texts) - 1), sequences)
        prefix = self.instructions.get(task, "")
        texts = [prefix + t for t in request.texts]
        if request.truncate and self.prefix_cut is not None:
            all_ids = self.prefix_cut.encode_batch(texts)  # what is past the limit is not tokenised
        else:  # refused past the limit: the message names the text's whole length
            all_ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        sequences, counts = [], []
        for i, ids in enumerate(all_ids):
            if len(ids) > self.max_seq_length:
                if not request.truncate:
                    raise InvalidRequest(
                        f"text {i} is {len(ids)} tokens, over the limit of {self.max_seq_length}; "
                        "send truncate: true to cut it, or late_chunking to embed it in pieces",
                        field=f"texts[{i}]",
                    )
                ids = ids[: self.max_seq_length - 1] + [self.eos_id]  # keep </s>, as the tokenizer would
            sequences.append(Sequence(task, ids, np.full(len(ids), i, dtype=np.int64)))
            counts.append(len(ids))
        return Plan(request, task, dimensions, encoding, len(request.texts), counts, sequences)

    def _late_chunking(self, chunks: list[str], task: str, first_slot: int) -> tuple[list[Sequence], int]:
        """Late chunking as Jina's API defines it: the chunks are one document, encoded once.

        Each token is pooled into the chunk its first character falls in; the first chunk also takes
        ``<s>`` and the instruction, the last one ``</s>``. Past the token limit the document runs in
        windows of ``max_seq_length`` overlapping by ``late_chunking_overlap``; a later window drops
        the outputs of its first ``overlap`` tokens, which the window before produced with more context.
        """
        prefix = self.instructions.get(task, "")
        enc = self.tokenizer.encode_batch([prefix + " ".join(chunks)])[0]  # encode_batch releases the GIL, encode does not
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
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # OpenMP's team size is per calling thread
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
            slots = torch.from_numpy(np.concatenate([s.slots for s in batch]))
            if sums.is_cuda:
                # A copy from pinned memory runs asynchronously (non_blocking), so the host goes on to queue
                # the forward pass; from pageable memory it would wait. Unmeasured on a GPU (issue 11 item 2).
                ids, slots = ids.pin_memory(), slots.pin_memory()
            hidden = self.model.forward_packed(ids, [len(s.ids) for s in batch], [s.task for s in batch])  # (tokens, hidden)
            slots = slots.to(hidden.device, non_blocking=True)
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

    def _finish(self, plans: list[Plan], firsts: list[int], sums: torch.Tensor, counts: torch.Tensor) -> list[EmbedResult]:
        vectors = []
        for plan, first in zip(plans, firsts, strict=True):
            s = slice(first, first + plan.n_slots)
            pooled = sums[s] / counts[s].clamp(min=1)[:, None]  # (n, hidden) float32
            v = pooled[:, : plan.dimensions]  # truncate first, then normalise
            vectors.append(F.normalize(v, p=2, dim=-1) if plan.request.normalized else v)
        if sums.is_cuda:
            # One device→host copy (and one wait for the GPU) per run instead of one per plan. Unmeasured on a GPU.
            flat = torch.cat([v.reshape(-1) for v in vectors]).cpu().numpy()
            bounds = np.cumsum([0] + [v.numel() for v in vectors])
            host = [flat[a:b].reshape(v.shape) for a, b, v in zip(bounds[:-1], bounds[1:], vectors, strict=True)]
        else:
            host = [v.numpy().astype(np.float32, copy=False) for v in vectors]
        return [
            EmbedResult(
                embeddings=h,
                token_counts=plan.token_counts,
                encoding=plan.encoding,
                ids=plan.request.ids,
                extra={"task": plan.task, "dimensions": plan.dimensions},
            )
            for plan, h in zip(plans, host, strict=True)
        ]


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
