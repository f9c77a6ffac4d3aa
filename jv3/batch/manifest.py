"""What every stage of a batch run shares: the run's ``Manifest`` (its parts, where outputs go, the
job's parameters and the jobs run so far), stored as ``<run>/manifest.json`` beside the parts, and
the container environment those parameters become (``job_environment``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import botocore.exceptions

from .. import aws
from ..errors import BatchJobError
from ..wire import check_dimensions, check_embedding_type, check_task

JSONLINES = "application/jsonlines"
MiB = 1024 * 1024
RUN_PREFIX = "jv3-batch"


@dataclass
class Part:
    name: str  # part-00000.jsonl
    records: int
    first: int  # position of its first record in the corpus
    bytes: int
    max_record_bytes: int


@dataclass
class Manifest:
    """What ``stage_corpus`` wrote, and where the job's outputs go; stored as ``<run>/manifest.json``."""

    run_uri: str  # s3://input-bucket/jv3-batch/<run>
    output_uri: str  # s3://output-bucket/jv3-batch/<run>
    source: str
    parts: list[Part]
    task: str | None = None
    dimensions: int | None = None
    embedding_type: str = "float"
    jobs: list[str] = field(default_factory=list)
    # records staged as placeholders (blank lines, skipped oversized records; ``screening``), by corpus
    # position as a string: {"line", "kind", "type", "message"}; their error records are final
    withheld: dict[str, dict] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(p.records for p in self.parts)

    @property
    def parts_uri(self) -> str:
        return aws.join_s3_uri(self.run_uri, "parts") + "/"

    @property
    def manifest_uri(self) -> str:
        return aws.join_s3_uri(self.run_uri, "manifest.json")

    def part_uri(self, part: Part) -> str:
        return self.parts_uri + part.name

    def output_part_uri(self, part: Part) -> str:
        """Where the job writes ``part``'s output: ``<output_uri>/<part>.out``."""
        return aws.join_s3_uri(self.output_uri, f"{part.name}.out")

    def output_key(self, part: Part) -> tuple[str, str]:
        """(bucket, key) of ``output_part_uri``."""
        return aws.split_s3_uri(self.output_part_uri(part))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        data = json.loads(raw)
        data["parts"] = [Part(**p) for p in data["parts"]]
        return cls(**data)

    def save(self, s3) -> None:
        aws.put_s3_object(s3, self.manifest_uri, self.to_json(), "application/json")

    @classmethod
    def load(cls, run_uri: str, s3) -> Manifest:
        uri = aws.join_s3_uri(run_uri, "manifest.json")
        try:
            raw = aws.read_s3_object(s3, uri)
        except botocore.exceptions.ClientError as exc:  # access denied, no such bucket
            raise BatchJobError(f"cannot read the run manifest {uri}: {exc}") from exc
        if raw is None:
            raise BatchJobError(f"cannot read the run manifest {uri}: it does not exist")
        return cls.from_json(raw)


def job_environment(*, task: str | None, dimensions: int | None, embedding_type: str) -> dict[str, str]:
    """The container environment of a job: the ``JV3_DEFAULT_*`` variables, validated as
    ``EmbeddingClient.embed`` validates its arguments (``task`` None leaves the container's default)."""
    if task is not None:
        check_task(task)
    dimensions = check_dimensions(dimensions)
    check_embedding_type(embedding_type)
    env = {"JV3_DEFAULT_ENCODING": embedding_type}
    if task:
        env["JV3_DEFAULT_TASK"] = task
    if dimensions:
        env["JV3_DEFAULT_DIMENSIONS"] = str(dimensions)
    return env
