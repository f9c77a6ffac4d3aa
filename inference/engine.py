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

On the CPU the engine also sets two process-wide knobs when it loads (bench/cpu_paths.py measures
both): libgomp's idle threads spin 100 times instead of 300,000 (``throttle_openmp_spin``: the cause
of the main-thread slowness and of the collapse under load), and glibc's malloc keeps freed memory
(``keep_freed_memory``). Each call runs with the engine's intra-op team (``cpu_threads``) on
whichever thread calls it.
"""

from __future__ import annotations

import bisect
import ctypes
import json
import logging
import os
import sys
import threading
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
