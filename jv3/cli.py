"""``jv3``: embed texts, run batch transform jobs, package and serve the model.

Commands are thin: they read options (each with ``--help`` text and, where it makes sense, an
environment variable), call ``client``, and print. Errors of the domain (``jv3.errors``,
botocore's) are caught here only, printed as ``error: ...`` on stderr, and exit with status 1.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import subprocess
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import botocore.exceptions
import numpy as np
import typer

from .batch import BatchJobError, BatchJobs, JobSettings, run_local
from .batch.interrupt import Interrupted
from .batch.minibatches import DEFAULT_MAX_RECORDS
from .errors import ClientError, InvalidArgument
from .lines import decode_lines, split_lines
from .realtime import EmbeddingClient
from .wire import EMBEDDING_TYPES, TASKS

app = typer.Typer(
    help="jina-embeddings-v3 on SageMaker: embed, batch transform, package, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
batch_app = typer.Typer(help="Batch transform jobs over S3 corpora, and a local rehearsal.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")


def _choices(name: str, values: tuple[str, ...]) -> type[StrEnum]:
    """A typer choice of ``values`` (the wire vocabulary, ``jv3.wire``): members named like the
    values, with ``.`` and ``-`` as ``_``."""
    return StrEnum(name, [(v.replace(".", "_").replace("-", "_"), v) for v in values])


Task = _choices("Task", TASKS)
EmbeddingType = _choices("EmbeddingType", EMBEDDING_TYPES)


class OutputFormat(StrEnum):
    json = "json"
    npy = "npy"
    csv = "csv"


def domain_errors(command):
    """Turn the errors a user can cause or meet into one line on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ClientError as exc:
            typer.echo(f"error: {exc}", err=True)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            typer.echo(f"error: {error.get('Code', 'AWS')}: {error.get('Message', exc)}", err=True)
        except botocore.exceptions.BotoCoreError as exc:
            typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)

    return wrapper


Region = Annotated[
    str | None, typer.Option("--region", envvar="AWS_REGION", help="AWS region (default: boto3's configuration).")
]
TaskOption = Annotated[Task, typer.Option("--task", "-t", envvar="JV3_TASK", help="Task adapter.")]
DimensionsOption = Annotated[
    int | None,
    typer.Option("--dimensions", "-d", min=1, max=1024, envvar="JV3_DIMENSIONS", help="Matryoshka size (1-1024)."),
]
EmbeddingTypeOption = Annotated[
    EmbeddingType,
    typer.Option("--embedding-type", envvar="JV3_EMBEDDING_TYPE", help="float/base64 → float32; binary/ubinary → packed bits."),
]


# ---- embed --------------------------------------------------------------------------------------


@app.command()
@domain_errors
def embed(
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to embed (else --file, else stdin).")] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            help="Read texts from a UTF-8 file, one per line ('-' for stdin). Lines end at \\n only (\\r\\n too); "
            "a form feed, U+2028 or a lone \\r stays inside its text.",
        ),
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", "-e", envvar="JV3_ENDPOINT_NAME", help="SageMaker endpoint name.")
    ] = None,
    endpoint_url: Annotated[
        str | None,
        typer.Option(
            "--endpoint-url",
            envvar="JV3_ENDPOINT_URL",
            help="Runtime URL of a local endpoint, e.g. http://127.0.0.1:8080 (no AWS account needed).",
        ),
    ] = None,
    region: Region = None,
    task: TaskOption = Task.text_matching,
    dimensions: DimensionsOption = None,
    embedding_type: EmbeddingTypeOption = EmbeddingType.float,
    late_chunking: Annotated[
        bool, typer.Option("--late-chunking", help="The texts are the chunks of one document.")
    ] = False,
    normalized: Annotated[bool, typer.Option("--normalize/--no-normalize", help="L2-normalise vectors.")] = True,
    output_format: Annotated[OutputFormat, typer.Option("--format", help="Output: json, npy or csv.")] = OutputFormat.json,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
    max_batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, envvar="JV3_BATCH_SIZE", help="Texts per request at most.")
    ] = 128,
    max_concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, envvar="JV3_CONCURRENCY", help="Requests in flight at most.")
    ] = 4,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout", min=0.001, envvar="JV3_TIMEOUT",
            help="Seconds per attempt of a request (connect and read; default 10 s and 70 s).",
        ),
    ] = None,
    deadline: Annotated[
        float | None,
        typer.Option(
            "--deadline", min=0.001, envvar="JV3_DEADLINE",
            help="Seconds for the whole command's requests, retries included (default: no limit).",
        ),
    ] = None,
) -> None:
    """Embed texts with a real-time endpoint and print the vectors."""
    items = _read_texts(texts, file)
    if not endpoint and not endpoint_url:
        raise InvalidArgument("no endpoint: pass --endpoint NAME (or set JV3_ENDPOINT_NAME) or --endpoint-url URL")
    client = EmbeddingClient(
        endpoint or "local",
        region_name=region,
        endpoint_url=endpoint_url,
        max_batch_size=max_batch_size,
        max_concurrency=max_concurrency,
        timeout=timeout,
        deadline=deadline,
    )
    vectors = client.embed(
        items,
        task=task.value,
        dimensions=dimensions,
        late_chunking=late_chunking,
        normalized=normalized,
        embedding_type=embedding_type.value,
    )
    _write_matrix(vectors, output_format, output)


def _read_texts(texts: list[str] | None, file: Path | None) -> list[str]:
    if texts and file:
        raise InvalidArgument("pass texts as arguments or --file, not both")
    if texts:
        return list(texts)
    if file is not None and str(file) != "-":
        if not file.is_file():
            raise InvalidArgument(f"--file {str(file)!r} does not exist")
        return _decode_texts(file.read_bytes(), f"--file {str(file)!r}")
    if file is None and sys.stdin.isatty():
        raise InvalidArgument("no texts: pass them as arguments, with --file, or on stdin")
    stdin = getattr(sys.stdin, "buffer", None)
    # the bytes, not the text stream: text mode would turn a lone \r into a line break
    lines = _decode_texts(stdin.read(), "stdin") if stdin is not None else split_lines(sys.stdin.read())
    if not lines:
        raise InvalidArgument("no texts on stdin")
    return lines


def _decode_texts(raw: bytes, where: str) -> list[str]:
    """One text per line by the one line rule (``jv3.lines``); a leading byte order mark is dropped."""
    try:
        return decode_lines(raw.removeprefix(b"\xef\xbb\xbf"), what=where)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _write_matrix(vectors: np.ndarray, output_format: OutputFormat, output: Path | None) -> None:
    if output_format is OutputFormat.npy:
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        data = buffer.getvalue()
        if output is not None:
            output.write_bytes(data)
        elif sys.stdout.isatty():
            raise InvalidArgument("--format npy writes binary; pass --output FILE or redirect stdout")
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        return
    if output_format is OutputFormat.json:
        text = json.dumps(vectors.tolist()) + "\n"
    else:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(vectors.tolist())
        text = buffer.getvalue()
    if output is not None:
        output.write_text(text)
    else:
        typer.echo(text, nl=False)


# ---- batch --------------------------------------------------------------------------------------

Stack = Annotated[
    str | None,
    typer.Option(
        "--stack", envvar="JV3_STACK_NAME", help="Infra stack (Jv3Embeddings) whose outputs name the model and buckets."
    ),
]


Wait = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the job to finish.")]
SkipOversized = Annotated[
    bool,
    typer.Option(
        "--skip-oversized/--refuse-oversized",
        help="A record larger than a mini-batch may be (MaxPayloadInMB, the container's 6 MB request limit): "
        "by default the whole corpus is refused before anything is sent, naming the record's line and size; "
        "with --skip-oversized it is not sent and an error record takes its place in the output.",
    ),
]


def _settings(stack: str | None, region: str | None, **options) -> JobSettings:
    """The job's settings, built once: the stack's outputs (``options`` that are set override them),
    or the options alone, which must then name the model and both buckets."""
    if stack:
        return JobSettings.from_stack(stack, region_name=region, **options)
    missing = [f"--{k.replace('_', '-')}" for k in ("model_name", "input_bucket", "output_bucket") if not options[k]]
    if missing:
        raise InvalidArgument(f"pass --stack, or all of {', '.join(missing)}")
    return JobSettings(**{k: v for k, v in options.items() if v is not None})


@batch_app.command("submit")
@domain_errors
def batch_submit(
    input_file: Annotated[Path, typer.Argument(help="Corpus: .jsonl ({text, id?}), .csv (text column) or plain text.")],
    stack: Stack = None,
    model_name: Annotated[str | None, typer.Option(envvar="JV3_MODEL_NAME", help="SageMaker Model name.")] = None,
    input_bucket: Annotated[str | None, typer.Option(envvar="JV3_INPUT_BUCKET", help="Bucket for staged parts.")] = None,
    output_bucket: Annotated[str | None, typer.Option(envvar="JV3_OUTPUT_BUCKET", help="Bucket for outputs.")] = None,
    kms_key_arn: Annotated[
        str | None, typer.Option(envvar="JV3_KMS_KEY_ARN", help="KMS key for the outputs (default: the stack's).")
    ] = None,
    instance_type: Annotated[str, typer.Option(envvar="JV3_INSTANCE_TYPE", help="Transform instance type.")] = "ml.g5.xlarge",
    instance_count: Annotated[int, typer.Option(min=1, help="Transform instances.")] = 1,
    max_concurrent: Annotated[int, typer.Option(min=1, help="MaxConcurrentTransforms per instance.")] = 1,
    task: TaskOption = Task.retrieval_passage,
    dimensions: DimensionsOption = None,
    embedding_type: EmbeddingTypeOption = EmbeddingType.float,
    records_per_part: Annotated[int, typer.Option(min=1, help="Records per staged part file.")] = 10_000,
    payload_mb: Annotated[int | None, typer.Option(min=1, max=100, help="MaxPayloadInMB (default: sized).")] = None,
    skip_oversized: SkipOversized = False,
    wait: Wait = False,
    region: Region = None,
) -> None:
    """Stage a local corpus on S3 and start a transform job; prints the job name.

    Every record is checked before anything is uploaded: one over MaxPayloadInMB refuses the corpus
    (or, with --skip-oversized, gets an error record in its place). A blank line gets an error
    record in its place and never fails the job."""
    settings = _settings(
        stack, region, model_name=model_name, input_bucket=input_bucket, output_bucket=output_bucket,
        kms_key_arn=kms_key_arn, instance_type=instance_type, instance_count=instance_count,
        max_concurrent_transforms=max_concurrent,
    )
    jobs = BatchJobs(settings, region_name=region)
    run = jobs.submit(
        input_file,
        task=task.value,
        dimensions=dimensions,
        embedding_type=embedding_type.value,
        records_per_part=records_per_part,
        payload_mb=payload_mb,
        skip_oversized=skip_oversized,
    )
    manifest = run.manifest
    typer.echo(f"staged {manifest.records:,} records in {len(manifest.parts)} parts under {manifest.run_uri}", err=True)
    typer.echo(run.job)
    if wait:
        jobs.wait(run.job, manifest=manifest)
        typer.echo(f"{run.job}: Completed", err=True)


@batch_app.command("status")
@domain_errors
def batch_status(
    job: Annotated[str, typer.Argument(help="Transform job name.")],
    region: Region = None,
) -> None:
    """Show a transform job's status and how many parts have outputs."""
    typer.echo(str(BatchJobs(region_name=region).status(job)))


@batch_app.command("fetch")
@domain_errors
def batch_fetch(
    job: Annotated[str, typer.Argument(help="Transform job name (the first one or a re-run).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for embeddings.npy, ids.json, errors.jsonl.")],
    region: Region = None,
) -> None:
    """Collect a job's outputs into files aligned with the input."""
    result = BatchJobs(region_name=region).collect(job, output=output)
    typer.echo(
        f"{len(result.ids):,} records → {output}: {int(result.valid.sum()):,} embedded, "
        f"{len(result.errors):,} error records, {len(result.missing_parts)} parts without complete output"
    )
    if result.missing_parts:
        raise BatchJobError(
            f"{len(result.missing_parts)} parts have no complete output ({', '.join(result.missing_parts[:5])}); "
            f"`jv3 batch rerun {job}` re-runs them"
        )


@batch_app.command("rerun")
@domain_errors
def batch_rerun(
    job: Annotated[str, typer.Argument(help="A transform job of the run.")],
    wait: Wait = False,
    region: Region = None,
) -> None:
    """Re-run only the parts whose outputs are missing or hold error records, with the job's settings."""
    jobs = BatchJobs(region_name=region)
    run = jobs.rerun(job)
    typer.echo(f"re-running {len(run.parts)} of {len(run.manifest.parts)} parts", err=True)
    typer.echo(run.job)
    if wait:
        jobs.wait(run.job, manifest=run.manifest)


@batch_app.command("local")
@domain_errors
def batch_local(
    model_dir: Annotated[Path, typer.Option("--model-dir", envvar="JV3_MODEL_DIR", help="Checkpoint directory to serve.")],
    input_file: Annotated[Path, typer.Option("--input", "-i", help="Corpus file (.jsonl, .csv or text).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for <input-name>.out.")],
    task: Annotated[Task | None, typer.Option("--task", "-t", help="JV3_DEFAULT_TASK of the job.")] = None,
    dimensions: DimensionsOption = None,
    embedding_type: EmbeddingTypeOption = EmbeddingType.float,
    max_payload_mb: Annotated[float, typer.Option("--max-payload-mb", min=0.001, help="MaxPayloadInMB.")] = 6.0,
    max_records: Annotated[
        int,
        typer.Option(
            "--max-records",
            min=1,
            help="Records per request at most, so that a mini-batch fits the server's JV3_REQUEST_TIMEOUT_S; "
            "a mini-batch answered 503 (timeout) is split and sent again, and the cap halves.",
        ),
    ] = DEFAULT_MAX_RECORDS,
    max_concurrent: Annotated[int, typer.Option(min=1, help="MaxConcurrentTransforms.")] = 1,
    skip_oversized: SkipOversized = False,
    price_per_hour: Annotated[
        float, typer.Option(help="Instance price in $/h for the cost estimate (ml.g5.xlarge on demand ≈ 1.41).")
    ] = 1.41,
    throughput: Annotated[
        float | None, typer.Option(help="Records/s on that instance (default: the rate measured here).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port for the local endpoint (default: a free one).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Rehearse a transform job on this machine: start the local endpoint, send the corpus in
    MultiRecord mini-batches, write <output>/<input-name>.out atomically, print a summary.

    Every record is checked before the endpoint starts: one over the mini-batch limit refuses the
    corpus (or, with --skip-oversized, gets an error record). The output has one line per input
    line, ids kept, in order, error records in place (a blank line gets one, and is never sent);
    it appears whole or not at all. SIGTERM or Ctrl-C stops the endpoint and leaves no temporary;
    a killed run's endpoint dies with it and its temporary is removed by the next run."""
    try:
        summary = run_local(
            model_dir,
            input_file,
            output,
            task=task.value if task else None,
            dimensions=dimensions,
            embedding_type=embedding_type.value,
            max_payload_mb=max_payload_mb,
            max_records=max_records,
            max_concurrent=max_concurrent,
            skip_oversized=skip_oversized,
            progress=progress,
            port=port,
        )
    except Interrupted as stop:  # the endpoint is stopped and the temporary output removed on the way out
        typer.echo(f"error: {stop}; the local endpoint was stopped and nothing was written to {output}", err=True)
        raise typer.Exit(128 + stop.signum) from None
    for line in summary.lines(price_per_hour, throughput):
        typer.echo(line)


# ---- package / serve ----------------------------------------------------------------------------


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def package(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Option(envvar="JV3_CHECKPOINT", help="Checkpoint directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Archive to write.")] = Path("model.tar.gz"),
) -> None:
    """Build model.tar.gz (runs `python -m model_package`; extra options are passed on)."""
    _delegate(["-m", "model_package", "--checkpoint", str(checkpoint), "--output", str(output), *ctx.args])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Option(envvar="JV3_MODEL_DIR", help="Checkpoint directory to serve.")],
    port: Annotated[int, typer.Option(envvar="JV3_PORT", help="Port to listen on.")] = 8080,
) -> None:
    """Serve a checkpoint locally on the SageMaker container contract (runs `python -m inference.serve`)."""
    _delegate(["-m", "inference.serve", "--model-dir", str(model_dir), "--port", str(port), *ctx.args])


def _delegate(args: list[str]) -> None:
    module = args[1].split(".")[0]
    if importlib.util.find_spec(module) is None:  # pip installs jv3 alone; these run from a checkout
        typer.echo(f"error: `python -m {args[1]}` is not importable here: run jv3 {module.replace('_', ' ').split()[-1]} "
                   f"from a checkout of the jina-v3-sagemaker repository (pip installs only the jv3 client)", err=True)
        raise typer.Exit(1)
    code = subprocess.call([sys.executable, *args])
    if code:
        raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
