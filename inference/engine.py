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
import ctypes
import functools
import json
import logging
import math
import os
import re
import sys
import threading
import time
import unicodedata
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
                 f", {engine.threads} intra-op thread(s) of {_cpu_count()} CPUs" if engine.threads else "")  # fmt: skip
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


# ---------------------------------------------------------------------------------------------
# 2: cut a text that will be truncated before tokenising it (issue 10)


class PrefixCut:
    """Tokenise a long text only as far as truncation keeps it, with exactly the whole text's ids.

    A 5 MB text sent with ``truncate: true`` used to be tokenised whole (tens of seconds) to keep
    ``keep`` ids. Instead a prefix is tokenised, cut where the tokenizer provably treats the text
    before the cut as it would inside the whole text, and accepted only when its ids up to ``keep``
    cannot depend on anything after the cut. ``of`` accepts only the structure this is proven for
    (XLM-R's): a Unigram model behind Metaspace splitting on spaces, a normaliser made of Nmt, NFC,
    NFKC, SentencePiece's Precompiled map and the collapse of space runs, and a post-processor that
    closes with one special token; anything else is tokenised whole, as before.

    Why the cut is exact. Normalising: Nmt and NFC/NFKC map each character alone, except that
    composition may merge a character into the one before it, and Precompiled maps each grapheme
    cluster; so the text before a cut normalises as it does inside the whole text when the
    character at the cut starts a cluster and composes with nothing before it. Splitting: Metaspace
    splits the normalised text into words at spaces and Unigram tokenises each word alone, so:
    - *Cut at a space* (``_separator_cut``: a separator that normalises to a space, at or after the
      character budget): every word of the prefix is a whole word of the text; only the prefix's last
      token can differ (a trailing "▁" that the text joins to its next word).
    - *Cut inside a word* (``_window_cut``, when no space comes within the budget after it: CJK, a
      long URL, base64). Unigram's Viterbi keeps, for each position, the best path ending there,
      computed from the characters before it only; the whole word's best path passes a token boundary
      in every ``window`` consecutive positions (no piece is longer than ``window`` characters), and up
      to a boundary it is the best path to that boundary, that is, the tokenisation of the prefix
      ending there. So when the prefixes ending at each of ``window`` consecutive positions all start
      with the same ``keep`` ids, the whole text starts with them too. It costs ``window`` prefixes,
      so it is tried only on texts over ``window + 2`` times the cut; if they disagree (a periodic run
      such as "aaaa…" whose tokens depend on where it ends) the text is tokenised whole.
    A prefix's last token is never counted (fused unknown characters or the trailing "▁" can run on
    in the text), nor its closing special token: a prefix is accepted when ``len(ids) - 2 >= keep``.
    Too few ids: the next cut is further on, by the characters per token seen so far (at least
    twice as far), until it would pass the end: then the whole text.

    Characters at a cut (``_simple``): a letter, number, punctuation or symbol that the tokenizer's
    normaliser leaves as it is, that no canonical composition merges into the character before it,
    that does not join a grapheme cluster with its neighbour (Hangul jamo and syllables, regional
    indicators, emoji modifiers, prepended letters); and no cut falls inside an added token ("<mask>"
    cut in two would be tokenised as text). Combining marks, controls, format characters, spaces and
    "▁" are never cut at. Thread-safe: only reads the tokenizer.
    """

    CHARS_PER_TOKEN = 8  # first cut at keep × 8 characters: English runs ~4 a token, CJK ~1.5
    MAX_WINDOW = 64  # longer pieces would make the inside-word proof cost more than it saves
    SEPARATORS = " \t\n\r\x0c\xa0\u3000"  # those the normaliser turns into a space are cut at
    # Letters of Grapheme_Cluster_Break=Prepend (Unicode 15): they join the character after them.
    PREPEND = frozenset("\u0d4e\U000111c2\U000111c3\U0001193f\U00011941\U00011a3a\U00011a84\U00011a85\U00011a86"
                        "\U00011a87\U00011a88\U00011a89\U00011d46\U00011f02\u0600\u0601\u0602\u0603\u0604\u0605"
                        "\u06dd\u070f\u0890\u0891\u08e2\U000110bd\U000110cd")  # fmt: skip

    def __init__(self, tokenizer: Tokenizer, keep: int, *, separators: str, excluded: frozenset[str], added: tuple[str, ...], window: int):
        self.tokenizer = tokenizer
        self.keep = keep
        self.budget = keep * self.CHARS_PER_TOKEN
        self.window = window
        self._separator = re.compile(f"[{re.escape(separators)}]") if separators else None
        self._excluded = excluded  # never cut at: "▁", and the characters of added tokens matched after normalising
        self._added = added  # added tokens matched in the text as it is: a cut must not fall inside one
        self._normalizer = tokenizer.normalizer
        self._simple_chars: dict[str, bool] = {}

    @classmethod
    def of(cls, tokenizer: Tokenizer, keep: int) -> PrefixCut | None:
        """The cut for this tokenizer, or None when its structure is not one the cut is exact for."""
        spec = json.loads(tokenizer.to_str())
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if model.get("type") != "Unigram" or model.get("byte_fallback") or keep < 1:
            return None
        if pre.get("type") != "Metaspace" or not pre.get("split", True) or not _normalizer_is_local(spec.get("normalizer")):
            return None
        added = spec.get("added_tokens") or []
        if any(t.get("single_word") for t in added):  # matched only as whole words: depends on what follows
            return None
        probe = tokenizer.encode_batch(["a"])[0].special_tokens_mask  # <s> … </s>: one closing special token
        if len(probe) < 2 or probe[-1] != 1 or probe[-2] != 0:
            return None
        replacement = pre.get("replacement", "\u2581")
        # An added token matched after normalising could be formed across a cut from other characters
        # (NFKC makes "＜" a "<"): never cut at its characters. One matched in the text as it is: never
        # cut inside an occurrence of it.
        excluded = frozenset("".join(t.get("content", "") for t in added if t.get("normalized"))) | {replacement}
        verbatim = tuple(t["content"] for t in added if not t.get("normalized") and len(t.get("content", "")) > 1)
        normalize = tokenizer.normalizer.normalize_str if tokenizer.normalizer is not None else (lambda s: s)
        separators = "".join(
            c for c in cls.SEPARATORS if normalize(c) == " " and c not in excluded and not any(c in a for a in verbatim)
        )
        window = max(len(piece) for piece in tokenizer.get_vocab(with_added_tokens=False))
        return cls(tokenizer, keep, separators=separators, excluded=excluded, added=verbatim, window=max(window, 1))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids; for a text past the budget possibly a prefix's, which starts with exactly the
        whole text's first ``keep`` ids and is longer than ``keep + 1``, so truncation gives the same ids."""
        out: list[list[int] | None] = [None] * len(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= self.budget]
        if short:
            for i, enc in zip(short, self.tokenizer.encode_batch([texts[i] for i in short]), strict=True):
                out[i] = enc.ids
        for i, text in enumerate(texts):
            if out[i] is None:
                out[i] = self._encode_long(text)
        return out

    def _encode_long(self, text: str) -> list[int]:
        start = self.budget
        while start < len(text):
            cut = self._separator_cut(text, start)
            inside = cut is None
            if inside:
                cut = self._window_cut(text, start)
                if cut is None or len(text) < (self.window + 2) * cut:
                    break  # nowhere exact to cut, or proving it would cost more than the whole text
            ids = self._ids([text[:cut]])[0]
            settled = len(ids) - 2  # neither the last token nor the closing special token
            if settled >= self.keep:
                if not inside:
                    return ids
                others = self._ids([text[:y] for y in range(cut + 1, cut + self.window)])
                if all(len(o) - 2 >= self.keep and o[: self.keep] == ids[: self.keep] for o in others):
                    return ids
                break  # the word's end decides its start
            # too few ids: go as far again as the characters per token so far say is needed, at least twice
            start = max(2 * cut, math.ceil(cut * (self.keep + 2) / max(settled, 1) * 1.25))
        return self._ids([text])[0]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def _separator_cut(self, text: str, start: int) -> int | None:
        """The first separator at or after ``start`` (within one budget), that ends a grapheme cluster."""
        if self._separator is None:
            return None
        end = min(len(text), start + self.budget)
        match = self._separator.search(text, start, end)
        while match is not None:
            at = match.start()
            before = text[at - 1]
            if before != "\r" and before not in self.PREPEND:  # CR LF and Prepend × are one cluster
                return at
            match = self._separator.search(text, at + 1, end)
        return None

    def _window_cut(self, text: str, start: int) -> int | None:
        """The first ``c`` at or after ``start`` (within one budget) with ``text[c-1 : c+window]`` all
        ``_simple`` and no added token across any of them: the cut and the ``window - 1`` positions after
        it are all exact cuts."""
        if self.window > self.MAX_WINDOW:
            return None
        run, need = 0, self.window + 1
        for j in range(start - 1, min(len(text), start + self.budget)):
            if self._simple(text[j]):
                run += 1
                if run == need:
                    c = j - self.window + 1
                    if not self._inside_added(text, c, c + self.window):
                        return c
                    run = 0
            else:
                run = 0
        return None

    def _inside_added(self, text: str, first: int, end: int) -> bool:
        """Whether an added token's occurrence in ``text`` spans a cut at any of ``first..end-1``."""
        for token in self._added:
            n = len(token)
            at = text.find(token, max(first - n + 1, 0), end + n - 1)
            while at != -1:
                if at < end - 1 and at + n > first:  # it holds a position p with at < p < at + n
                    return True
                at = text.find(token, at + 1, end + n - 1)
        return False

    def _simple(self, ch: str) -> bool:
        known = self._simple_chars.get(ch)
        if known is None:
            code = ord(ch)
            known = (
                unicodedata.category(ch)[0] in "LNPS"
                and unicodedata.combining(ch) == 0
                and ch not in self._excluded
                and ch not in self.PREPEND
                and not (0x1100 <= code <= 0x11FF or 0xA960 <= code <= 0xA97F or 0xAC00 <= code <= 0xD7FF)  # Hangul
                and not (0x1F1E6 <= code <= 0x1F1FF or 0x1F3FB <= code <= 0x1F3FF)  # regional indicators, skin tones
                and ch not in _composes_backward()
                and (self._normalizer is None or self._normalizer.normalize_str(ch) == ch)
            )
            self._simple_chars[ch] = known
        return known


def _normalizer_is_local(spec: dict | None) -> bool:
    """Normalisers whose output before a cut does not depend on the text after it (``PrefixCut``)."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_normalizer_is_local(s) for s in spec.get("normalizers", []))
    if kind == "Replace":  # XLM-R's collapse of space runs into one space
        return spec.get("pattern") == {"Regex": " {2,}"} and spec.get("content") == " "
    return kind in ("Nmt", "NFC", "NFKC", "Precompiled")


@functools.cache
def _composes_backward() -> frozenset[str]:
    """Characters that canonical composition may merge into the character before them: the second half of
    every two-character canonical decomposition (Hangul composes by rule; ``_simple`` excludes it)."""
    seconds = set()
    for code in range(0x110000):
        decomposition = unicodedata.decomposition(chr(code))
        if decomposition and not decomposition.startswith("<"):
            parts = decomposition.split()
            if len(parts) == 2:
                seconds.add(chr(int(parts[1], 16)))
    return frozenset(seconds)


# ---------------------------------------------------------------------------------------------
# CPU runtime: OpenMP spinning, threads, allocator (issue 10 item 3, issue 11; bench/cpu_paths.py)


def cpu_threads() -> int:
    """Intra-op threads for a CPU engine: torch's team as the process has it (every CPU by default,
    ``OMP_NUM_THREADS``, or ``torch.set_num_threads`` before the load, as the local server does when
    several CPU engines share the cores). Measured on 2 shared cores (bench/cpu_paths.py), the full
    team with OpenMP's spinning throttled (``throttle_openmp_spin``) served 1.5–1.8× the requests of
    one thread with the hidden-384 model and 0.9–1.1× with the tiny one, and one thread was 1.7–1.9×
    slower on a quiet machine: so the team is kept, and its spinning is what changes. On a host whose
    other cores are busy all the time, ``OMP_NUM_THREADS=1`` can still be the better choice."""
    return torch.get_num_threads()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


THROTTLE_THREAD = "jv3-openmp-throttle"
_throttle: threading.Thread | None = None
_throttle_release = threading.Event()


def throttle_openmp_spin(threads: int) -> bool:
    """Make libgomp's idle threads sleep after 100 spins instead of 300,000; True if in effect.

    The cause of issue 11's "2–3× slower on the main thread" and of issue 10's collapse under load.
    torch's parallel ops are OpenMP fork/joins, and while a process's OpenMP threads are no more than
    its CPUs, libgomp's idle team members spin about 300,000 times at every join before they sleep
    (``GOMP_SPINCOUNT``). When anything else wants a core (handler threads, the tokenizer, TorchServe's
    frontend, a neighbour) a spinning thread holds it, and the next fork or join waits a scheduler
    slice for a descheduled one, per op. Past the CPU count libgomp spins 100 times instead (its
    documented rule for oversubscription). A second thread's OpenMP pool crosses that line, which is
    why the same ``embed_many`` ran 2–3× faster on a ``threading.Thread`` than on the main thread:
    measured, the main thread alone and a worker thread alone are equally slow, and the main thread
    is as fast as a worker thread while another thread holds an idle pool.

    ``OMP_WAIT_POLICY=passive`` or ``GOMP_SPINCOUNT`` would do this at process start, but torch has
    read them by the time the handler runs (TorchServe imports torch first). So this parks one
    daemon thread holding an idle pool of ``cpus - threads + 2`` OpenMP threads (asleep on a futex:
    no CPU) for the life of the process: every team, on whichever thread, then spins 100 times.

    Skipped when the engine runs one thread (no fork/join), when OpenMP is not GNU libgomp, or when the
    operator set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``. Once per process.
    """
    global _throttle
    if _throttle is not None:
        return True
    if threads <= 1 or os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT"):
        return False
    gomp = _libgomp()
    if gomp is None:
        return False
    try:
        parallel = gomp.GOMP_parallel  # GCC ≥ 4.9: GOMP_parallel(fn, data, num_threads, flags)
        noop = ctypes.cast(ctypes.CDLL(None).free, ctypes.c_void_p)  # free(NULL) does nothing
    except (AttributeError, OSError):
        return False
    parallel.argtypes, parallel.restype = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint), None
    pool = max(2, _cpu_count() - threads + 2)
    ready = threading.Event()

    _throttle_release.clear()

    def park() -> None:
        parallel(noop, None, pool, 0)  # this thread now owns an idle pool of `pool` OpenMP threads
        ready.set()
        _throttle_release.wait()  # for the life of the process (bench/cpu_paths.py releases it to compare)

    _throttle = threading.Thread(target=park, name=THROTTLE_THREAD, daemon=True)
    _throttle.start()
    ready.wait(timeout=10)
    log.info("OpenMP: %d intra-op thread(s) on %d CPUs, idle spinning throttled by a parked pool of %d", threads, _cpu_count(), pool)
    return True


def release_openmp_throttle() -> None:
    """End the parked pool (libgomp spins 300,000 times again): for benchmarks that compare both."""
    global _throttle
    if _throttle is not None:
        _throttle_release.set()
        _throttle.join(timeout=10)
        _throttle = None


def _libgomp():
    """The GNU OpenMP runtime torch loaded (the one in this process's memory map), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)  # already loaded: the same instance torch uses
        except OSError:
            continue
    return None


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_KEEP_FREED_BYTES = 1 << 30
_allocator_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from the heap and keep what is freed; True if applied.

    A CPU forward pass allocates and frees tensors of tens to hundreds of MB per layer. glibc maps
    every block over 32 MB with ``mmap`` and unmaps it on ``free``, and trims the heap top past a
    threshold, so each batch faults its memory in again page by page: about 0.5 million page faults
    and 1–1.4 s of system time per 256 texts at hidden 384; keeping the memory saved 10–16 % of the
    engine's CPU time and 24–30 % of the padded native model's. ``M_MMAP_MAX=0`` and ``M_TRIM_THRESHOLD=1 GiB`` keep that memory
    in the process for the next batch: resident memory stays at its peak (the largest batch's
    working set) instead of falling back between batches.

    Applied once per process, on glibc only, and never over the operator's own malloc settings
    (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or
    ``GLIBC_TUNABLES`` naming ``glibc.malloc``).
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    own = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
    if not sys.platform.startswith("linux") or any(os.environ.get(k) for k in own) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - musl and others have no such symbol: leave them alone
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _allocator_tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))
    log.info("glibc malloc: large blocks from the heap, freed memory kept (M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB): %s", _allocator_tuned)
    return _allocator_tuned


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
