"""Stage 5 of a batch run: re-run only the parts without complete outputs. ``failed_parts`` finds
them; ``submit(..., parts=...)`` lists them in a SageMaker manifest file, so the outputs land where
the first job put them; ``resubmit_failed`` does both for a job, with the settings that job ran with.
"""

from __future__ import annotations

from .collecting import part_records, read_part_output
from .jobs import JobSettings, describe, run_uri_of, submit
from .manifest import Manifest, Part


def failed_parts(manifest: Manifest, *, s3) -> list[Part]:
    """Parts whose ``.out`` is missing, has the wrong number of lines, or holds records that
    ``collect`` reports as errors (error records, embeddings that do not decode), other than those of
    records the client withheld (blank lines, skipped oversized records), which a re-run cannot change."""
    failed = []
    for part in manifest.parts:
        lines = read_part_output(manifest, part, s3)
        if lines is None or len(lines) != part.records:
            failed.append(part)
            continue
        _, _, errors, final = part_records(manifest, part, lines)
        if len(errors) > len(final):
            failed.append(part)
    return failed


def resubmit_failed(job_name: str, *, sagemaker, s3, settings: JobSettings | None = None) -> tuple[str, Manifest, list[Part]]:
    """Submit a job over the parts of ``job_name``'s run that failed; returns (new job, run manifest,
    those parts). ``settings`` default to the ones ``job_name`` ran with (``JobSettings.from_job``),
    KMS key included. Raises ``InvalidArgument`` when no part failed."""
    description = describe(job_name, sagemaker=sagemaker)
    manifest = Manifest.load(run_uri_of(description), s3)
    failed = failed_parts(manifest, s3=s3)
    settings = settings or JobSettings.from_job(description, manifest)
    new_job = submit(manifest, settings, sagemaker=sagemaker, s3=s3, parts=failed)
    return new_job, manifest, failed
