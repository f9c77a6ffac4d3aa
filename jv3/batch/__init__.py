"""Batch transform over S3 corpora, and a local rehearsal of the same job.

``BatchJobs`` (``api``) is the one object to use: ``submit``, ``status``, ``wait``, ``collect``,
``rerun``. Each stage of a run is a module of its own, usable alone:

1. ``staging``: ``corpus_lines`` reads a local file (JSON Lines ``{"text", "id"?}``, CSV with a text
   column, or plain text) as JSON Lines records with ids; ``stage_corpus`` writes them to S3 as part
   files ``<run>/parts/part-00000.jsonl`` … and the run's ``manifest.json`` (``manifest``).
2. ``jobs``: ``JobSettings`` (where the job runs), ``job_request`` (the ``CreateTransformJob``
   request: SplitType Line, BatchStrategy MultiRecord, JSON Lines in and out, ``MaxPayloadInMB``
   sized by ``max_payload_mb``), ``submit``.
3. ``waiting``: ``wait`` polls the job, showing how many parts have outputs.
4. ``collecting``: ``collect`` reads every ``<part>.out`` back into one array aligned with the
   input, listing error records.
5. ``rerun``: ``failed_parts`` and ``resubmit_failed`` re-run only the parts without complete outputs (through
   a SageMaker manifest file, so outputs land where the first job put them), with the settings the
   first job ran with.

``screening`` checks every record before any is sent, at staging and in a rehearsal: a record
over the mini-batch limit refuses the corpus (or, with ``skip_oversized``, gets an error record in
its place), a blank line gets an error record in its place and is never sent.

``rehearsal.run_local`` rehearses stages 2–4 against ``python -m inference.serve``: the same lines,
split into MultiRecord payloads the way SageMaker splits them, but capped by records too and split
again when the endpoint cannot answer one in time (``minibatches``), one ``<input-name>.out`` written
atomically; the endpoint dies with the run, however it ends (``interrupt``, ``jv3.local``). Lines
end at ``\\n`` only everywhere (``jv3.lines``).
"""

from __future__ import annotations

from ..errors import BatchJobError
from .api import BatchJobs, JobStatus, Submitted
from .collecting import BatchResult, RecordError, assemble, collect, parse_output_lines, read_part_output
from .files import atomic_write
from .interrupt import Interrupted
from .jobs import (
    CONTAINER_MAX_PAYLOAD_MB,
    OPTIONAL_STACK_OUTPUTS,
    RECORD_OVERHEAD,
    SAGEMAKER_PAYLOAD_BUDGET_MB,
    STACK_OUTPUTS,
    JobSettings,
    describe,
    job_request,
    manifest_of_job,
    max_payload_mb,
    run_uri_of,
    stack_outputs,
    submit,
)
from .manifest import JSONLINES, RUN_PREFIX, Manifest, MiB, Part, job_environment
from .minibatches import DEFAULT_MAX_RECORDS, MiniBatch, Overloaded, Pacing
from .rehearsal import (
    LocalCorpus,
    LocalRunSummary,
    multirecord_payloads,
    post_records,
    read_corpus,
    run_local,
    transform_file,
)
from .rerun import failed_parts, resubmit_failed
from .screening import Limit, OversizedRecord, Withheld, job_limit, record_limit, screen
from .staging import corpus_format, corpus_lines, corpus_records, new_run_name, stage_corpus
from .waiting import parts_done, wait

__all__ = [
    "CONTAINER_MAX_PAYLOAD_MB",
    "DEFAULT_MAX_RECORDS",
    "JSONLINES",
    "OPTIONAL_STACK_OUTPUTS",
    "RECORD_OVERHEAD",
    "RUN_PREFIX",
    "SAGEMAKER_PAYLOAD_BUDGET_MB",
    "STACK_OUTPUTS",
    "BatchJobError",
    "BatchJobs",
    "BatchResult",
    "Interrupted",
    "JobSettings",
    "JobStatus",
    "Limit",
    "LocalCorpus",
    "LocalRunSummary",
    "Manifest",
    "MiB",
    "MiniBatch",
    "Overloaded",
    "OversizedRecord",
    "Pacing",
    "Part",
    "RecordError",
    "Submitted",
    "Withheld",
    "assemble",
    "atomic_write",
    "collect",
    "corpus_format",
    "corpus_lines",
    "corpus_records",
    "describe",
    "failed_parts",
    "job_environment",
    "job_limit",
    "job_request",
    "manifest_of_job",
    "max_payload_mb",
    "multirecord_payloads",
    "new_run_name",
    "parse_output_lines",
    "parts_done",
    "post_records",
    "read_corpus",
    "read_part_output",
    "record_limit",
    "resubmit_failed",
    "run_local",
    "run_uri_of",
    "screen",
    "stack_outputs",
    "stage_corpus",
    "submit",
    "transform_file",
    "wait",
]
