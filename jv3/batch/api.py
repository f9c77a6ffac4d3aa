"""``BatchJobs``: one object for the life of batch transform runs, each method one stage.

    jobs = BatchJobs(JobSettings(model_name=..., input_bucket=..., output_bucket=...))  # or BatchJobs.from_stack("Jv3Embeddings")
    run = jobs.submit("corpus.jsonl", task="retrieval.passage", dimensions=256)
    jobs.wait(run.job)
    result = jobs.collect(run.job, output="out/")   # embeddings.npy, ids.json, errors.jsonl
    if not result.complete:
        jobs.rerun(run.job)                           # only the failed parts, same settings

The settings are built once, with the object; ``status``, ``wait``, ``collect`` and ``rerun`` need none
(a job knows its run), and ``rerun`` re-uses the settings its job ran with (model, instances, the KMS
key of the outputs). boto3 clients are made on first use unless given.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import aws
from ..errors import InvalidArgument
from .collecting import BatchResult, collect
from .jobs import JobSettings, describe, manifest_of_job, run_uri_of, submit
from .manifest import Manifest, Part
from .rerun import resubmit_failed
from .screening import job_limit
from .staging import stage_corpus
from .waiting import parts_done, wait


@dataclass
class Submitted:
    """A transform job created by ``BatchJobs.submit`` or ``rerun``: its name, its run, the parts it runs."""

    job: str
    manifest: Manifest
    parts: list[Part]


@dataclass
class JobStatus:
    job: str
    status: str  # InProgress, Completed, Failed, Stopping, Stopped
    parts_done: int  # parts with an output object
    parts: int
    failure_reason: str | None = None

    def __str__(self) -> str:
        line = f"{self.job}: {self.status}, {self.parts_done}/{self.parts} parts"
        return f"{line} ({self.failure_reason})" if self.failure_reason else line


class BatchJobs:
    """Submit, watch, collect and re-run transform jobs over S3 corpora; see the module doc."""

    def __init__(
        self,
        settings: JobSettings | None = None,
        *,
        region_name: str | None = None,
        s3=None,
        sagemaker=None,
        progress: bool = True,
        poll_interval: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.settings = settings
        self.region_name = region_name
        self._s3 = s3
        self._sagemaker = sagemaker
        self.progress = progress
        self.poll_interval = poll_interval
        self._sleep = sleep

    @classmethod
    def from_stack(cls, stack_name: str, *, region_name: str | None = None, cloudformation=None, **options) -> BatchJobs:
        """Settings from the infra stack's outputs (``JobSettings.from_stack``); ``options`` are
        ``JobSettings`` fields that override them, or keyword arguments of ``BatchJobs``."""
        fields = set(JobSettings.__dataclass_fields__)
        overrides = {k: options.pop(k) for k in list(options) if k in fields}
        settings = JobSettings.from_stack(stack_name, cloudformation=cloudformation, region_name=region_name, **overrides)
        return cls(settings, region_name=region_name, **options)

    @property
    def s3(self):
        if self._s3 is None:
            self._s3 = aws.client("s3", region_name=self.region_name)
        return self._s3

    @property
    def sagemaker(self):
        if self._sagemaker is None:
            self._sagemaker = aws.client("sagemaker", region_name=self.region_name)
        return self._sagemaker

    # ---- the stages -----------------------------------------------------------------------------

    def submit(
        self,
        corpus: str | os.PathLike,
        *,
        task: str | None = None,
        dimensions: int | None = None,
        embedding_type: str = "float",
        records_per_part: int = 10_000,
        payload_mb: int | None = None,
        run_name: str | None = None,
        fmt: str | None = None,
        text_column: str = "text",
        id_column: str = "id",
        skip_oversized: bool = False,
    ) -> Submitted:
        """Stage a local corpus on S3 (``stage_corpus``) and create its transform job (``submit``).
        ``task``, ``dimensions`` and ``embedding_type`` are the job's ``JV3_DEFAULT_*`` environment.
        A record over ``payload_mb`` (or, sized, over the largest ``MaxPayloadInMB``) raises
        ``OversizedRecord`` before anything is uploaded; with ``skip_oversized`` its output is an error
        record in its place instead (``screening``)."""
        if self.settings is None:
            raise InvalidArgument("submitting a job needs JobSettings (model and buckets): pass them, or use from_stack")
        manifest = stage_corpus(
            corpus,
            input_bucket=self.settings.input_bucket,
            output_bucket=self.settings.output_bucket,
            s3=self.s3,
            run_name=run_name,
            records_per_part=records_per_part,
            fmt=fmt,
            text_column=text_column,
            id_column=id_column,
            task=task,
            dimensions=dimensions,
            embedding_type=embedding_type,
            limit=job_limit(payload_mb),
            skip_oversized=skip_oversized,
        )
        job = submit(manifest, self.settings, sagemaker=self.sagemaker, s3=self.s3, payload_mb=payload_mb)
        return Submitted(job, manifest, list(manifest.parts))

    def status(self, job: str) -> JobStatus:
        """The job's status and how many of its run's parts have outputs."""
        description = describe(job, sagemaker=self.sagemaker)
        manifest = Manifest.load(run_uri_of(description), self.s3)
        return JobStatus(
            job,
            description["TransformJobStatus"],
            parts_done(manifest, self.s3),
            len(manifest.parts),
            description.get("FailureReason"),
        )

    def wait(self, job: str, *, manifest: Manifest | None = None, timeout: float = 24 * 3600) -> dict:
        """Poll until the job stops (``wait``); its description once it completed, else ``BatchJobError``."""
        if manifest is None and self.progress:
            manifest = manifest_of_job(job, sagemaker=self.sagemaker, s3=self.s3)  # for the parts bar
        return wait(
            job,
            sagemaker=self.sagemaker,
            s3=self.s3,
            manifest=manifest,
            poll_interval=self.poll_interval,
            timeout=timeout,
            progress=self.progress,
            sleep=self._sleep,
        )

    def collect(self, job: str, *, output: str | os.PathLike | None = None) -> BatchResult:
        """The outputs of ``job``'s run (the first job or a re-run) aligned with its corpus; with
        ``output``, also saved there (``BatchResult.save``)."""
        manifest = manifest_of_job(job, sagemaker=self.sagemaker, s3=self.s3)
        result = collect(manifest, s3=self.s3, progress=self.progress)
        if output is not None:
            result.save(Path(output))
        return result

    def rerun(self, job: str) -> Submitted:
        """A job over the parts of ``job``'s run without complete outputs, with the settings ``job``
        ran with (``InvalidArgument`` when there are none to re-run)."""
        new_job, manifest, parts = resubmit_failed(job, sagemaker=self.sagemaker, s3=self.s3)
        return Submitted(new_job, manifest, parts)
