"""Stage 3 of a batch run: wait for a transform job to stop, showing how many parts have outputs."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm.auto import tqdm

from .. import aws
from ..errors import BatchJobError, WaitTimeout
from .jobs import describe
from .manifest import Manifest


def parts_done(manifest: Manifest, s3) -> int:
    """How many parts have an output object (complete or not: ``collect`` checks that)."""
    bucket, prefix = aws.split_s3_uri(manifest.output_uri)
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    names = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        names.update(obj["Key"].rsplit("/", 1)[-1] for obj in page.get("Contents", []))
    return sum(f"{p.name}.out" in names for p in manifest.parts)


def wait(
    job_name: str,
    *,
    sagemaker,
    s3=None,
    manifest: Manifest | None = None,
    poll_interval: float = 30.0,
    timeout: float = 24 * 3600,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Poll until the job stops; raise ``BatchJobError`` unless it completed. Shows parts with outputs."""
    deadline = clock() + timeout
    total = len(manifest.parts) if manifest else None
    with tqdm(total=total, unit="part", desc=job_name, disable=not progress, file=sys.stderr) as bar:
        while True:
            description = describe(job_name, sagemaker=sagemaker)
            status = description["TransformJobStatus"]
            if manifest is not None and s3 is not None:
                bar.n = parts_done(manifest, s3)
            bar.set_postfix_str(status)
            bar.refresh()
            if status == "Completed":
                return description
            if status in ("Failed", "Stopped"):
                reason = description.get("FailureReason", "no reason given")
                raise BatchJobError(f"transform job {job_name} {status.lower()}: {reason}")
            if clock() >= deadline:
                raise WaitTimeout(f"transform job {job_name} still {status} after {timeout:g} s")
            sleep(poll_interval)
