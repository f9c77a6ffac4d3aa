"""Issue 10, item 8 "batch without loss" (client side) and the batch part of item 9: every input line
has its output line, ids kept, in order, error records in place, whatever the corpus holds and
however the run ends.

- mini-batches fit the server's request timeout: capped by records as well as bytes, and a 503
  timeout splits a mini-batch and sends it again, never dropping a record;
- a record over the mini-batch limit is found before anything is sent (batch local and batch submit):
  refused with its line and size, or with --skip-oversized an error record in its place;
- a blank line is an error record in its place wherever it is, never sent; a mini-batch of only blank
  lines never fails the run;
- `jv3 batch local` killed (SIGTERM, SIGKILL) leaves no server and no temporary behind.

The fake container (``container``) answers JSON Lines as inference/ does (docs/wire-format.md): one
line per record, a blank line an error record, a body of only blank lines a 400, a body over the
limit a 413, and, like JV3_REQUEST_TIMEOUT_S, a 503 timeout for a body it cannot answer in time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from client_support import REPO, TINY
from fake_endpoint import FakeEndpoint, Reply, Request
from typer.testing import CliRunner

from jv3 import aws as client_aws
from jv3 import batch
from jv3.batch import files
from jv3.cli import app
from jv3.local import LocalEndpoint, free_port

runner = CliRunner()
MiB = 1024 * 1024
JSONL = {"Content-Type": "application/jsonlines"}


def error_reply(status: int, error_type: str, message: str) -> Reply:
    return Reply(status, json.dumps({"error": {"type": error_type, "message": message, "code": status}}).encode(), JSONL)


def container(*, answers_at_most: int | None = None, never_answers: frozenset = frozenset(), limit: int = 6 * MiB):
    """A JSON Lines container like inference/'s; it cannot answer more than ``answers_at_most`` records
    within its timeout (503), nor a body holding an id of ``never_answers``."""

    def answer(request) -> Reply:
        body = request.body
        if len(body) > limit:
            return error_reply(413, "payload_too_large", f"request body of {len(body)} bytes is over the limit")
        if not body.strip():
            return error_reply(400, "invalid_request", "empty JSON Lines body; expected one record per line")
        lines = body.split(b"\n")[:-1]
        if answers_at_most is not None and len(lines) > answers_at_most:
            return error_reply(503, "timeout", "no answer within 60 s (JV3_REQUEST_TIMEOUT_S)")
        out = []
        for k, line in enumerate(lines):
            if not line.strip():
                out.append({"id": None, "index": k, "error": {"type": "invalid_request", "code": 400,
                                                               "message": f"line {k + 1} is blank"}})
                continue
            record = json.loads(line)
            if record.get("id") in never_answers:
                return error_reply(503, "timeout", "no answer within 60 s (JV3_REQUEST_TIMEOUT_S)")
            if "text" not in record:
                out.append({"id": record.get("id"), "index": k, "error": {
                    "type": "invalid_request", "code": 400, "message": f"line {k + 1} has no 'text' (keys: {sorted(record)})"}})
                continue
            out.append({"id": record.get("id"), "index": k, "embedding": [float(len(record["text"])), 1.0], "tokens": 2})
        return Reply(200, "".join(json.dumps(o) + "\n" for o in out).encode(), JSONL)

    return answer


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_output(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.split(b"\n")[:-1]]


def records_sent(fake: FakeEndpoint) -> list[list[bytes]]:
    return [r.body.split(b"\n")[:-1] for r in fake.requests]


# ---- mini-batches that fit the request timeout ------------------------------------------------------


def test_defaults_cap_the_records_of_a_mini_batch_and_split_one_answered_503(tmp_path):
    # GIVEN 500 short records (one 6 MB mini-batch by bytes) and a container that answers 40 records
    # within its timeout at most (before: one mini-batch of 500, a 503, and nothing written)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": f"line {i} " * 5, "id": f"d{i}"} for i in range(500)])
    with FakeEndpoint(container(answers_at_most=40)) as fake:
        summary = batch.transform_file(fake.url, corpus, tmp_path / "out", progress=False)
        sent = records_sent(fake)
    # THEN every record has its output line, in order, none an error
    records = read_output(tmp_path / "out" / "c.jsonl.out")
    assert [r["id"] for r in records] == [f"d{i}" for i in range(500)]
    assert all("embedding" in r for r in records) and summary.errors == 0 and summary.records == 500
    # AND no request held more than the default cap; the 503s were split, and the cap halved for later ones
    assert max(len(s) for s in sent) == batch.DEFAULT_MAX_RECORDS == 128
    assert summary.splits >= 2 and summary.requests == len(sent)
    assert max(len(s) for s in sent[-5:]) <= 32
    answered = [line for s in sent if len(s) <= 40 for line in s]
    assert [json.loads(line)["id"] for line in answered] == [f"d{i}" for i in range(500)]  # each answered once


def test_progress_reports_each_split_on_stderr(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": f"t{i}", "id": i} for i in range(100)])
    with FakeEndpoint(container(answers_at_most=60)) as fake:
        summary = batch.transform_file(fake.url, corpus, tmp_path / "out", max_records=100, progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and summary.splits == 1
    assert ("a mini-batch of 100 records from record 0 was refused (the endpoint refused a 2,280-byte mini-batch of "
            "100 records with 503: ") in captured.err
    assert "sending it again as 50 + 50 records, and at most 50 per request from now on" in captured.err
    assert "100/100" in captured.err  # the bar


def test_a_record_the_endpoint_never_answers_in_time_gets_an_error_record_in_its_place(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": f"text {i}", "id": f"d{i}"} for i in range(20)])
    with FakeEndpoint(container(never_answers=frozenset({"d7"}))) as fake:
        summary = batch.transform_file(fake.url, corpus, tmp_path / "out", progress=False)
    records = read_output(tmp_path / "out" / "c.jsonl.out")
    assert [r["id"] for r in records] == [f"d{i}" for i in range(20)]
    assert records[7]["error"]["type"] == "timeout" and records[7]["error"]["code"] == 503
    assert "no answer after 3 tries" in records[7]["error"]["message"]
    assert [i for i, r in enumerate(records) if "error" in r] == [7] and summary.errors == 1


def test_post_records_tells_a_mini_batch_to_split_from_a_fatal_refusal(tmp_path):
    with FakeEndpoint(lambda request: error_reply(503, "timeout", "no answer within 60 s")) as fake:
        with pytest.raises(batch.Overloaded, match="with 503") as info:
            batch.post_records(fake.url, [b'{"text":"a"}'])
    assert (info.value.status, info.value.error_type) == (503, "timeout")
    with FakeEndpoint(lambda request: error_reply(400, "invalid_request", "bad")) as fake:
        with pytest.raises(batch.BatchJobError, match="with 400") as info:
            batch.post_records(fake.url, [b'{"text":"a"}'])
    assert not isinstance(info.value, batch.Overloaded)


# ---- records over the mini-batch limit: found before anything is sent ---------------------------------


def oversized_corpus(tmp_path: Path, size: int = 7 * MiB, name: str = "c.jsonl") -> tuple[Path, int]:
    """30 records, the 25th (line 25) of ``size`` bytes of text; returns the corpus and that record's size."""
    records = [{"text": f"doc {i}", "id": f"d{i}"} for i in range(30)]
    records[24] = {"text": "x" * size, "id": "d24"}
    path = write_jsonl(tmp_path / name, records)
    return path, len(json.dumps(records[24], separators=(",", ":"))) + 1


def test_a_record_over_the_limit_refuses_the_run_before_anything_is_sent(tmp_path):
    corpus, size = oversized_corpus(tmp_path)
    with FakeEndpoint(container()) as fake:
        with pytest.raises(batch.OversizedRecord) as info:
            batch.transform_file(fake.url, corpus, tmp_path / "out", progress=False)
        assert fake.requests == []  # before: 24 records' work, then a failure at the 25th
    assert str(info.value).startswith(
        f"line 25 of c.jsonl is a record of {size:,} bytes, over the 6,291,456-byte limit of a mini-batch "
        "(MaxPayloadInMB 6). Nothing was sent"
    )
    assert (info.value.line, info.value.size) == (25, size)
    assert not (tmp_path / "out" / "c.jsonl.out").exists()
    # a smaller MaxPayloadInMB is the limit, and every record over it is counted
    small, _ = oversized_corpus(tmp_path, size=2 * MiB, name="small.jsonl")
    with pytest.raises(batch.OversizedRecord, match=r"line 25 of small.jsonl .* over the 1,048,576-byte limit of a "
                                                    r"mini-batch \(MaxPayloadInMB 1\)"):
        batch.read_corpus(small, max_payload_mb=1)
    write_jsonl(tmp_path / "two.jsonl", [{"text": "x" * 2 * MiB}, {"text": "a"}, {"text": "y" * 2 * MiB}])
    with pytest.raises(batch.OversizedRecord, match="1 more record.s. are over it, the next on line 3"):
        batch.read_corpus(tmp_path / "two.jsonl", max_payload_mb=1)
    # and the local server's own limit, when it is the smaller one
    with pytest.raises(batch.OversizedRecord, match="over the 1,000-byte limit .*JV3_MAX_REQUEST_BYTES 1,000"):
        batch.read_corpus(small, server_max_bytes=1000)


def test_skip_oversized_writes_an_error_record_in_its_place(tmp_path):
    corpus, size = oversized_corpus(tmp_path)
    with FakeEndpoint(container()) as fake:
        summary = batch.transform_file(fake.url, corpus, tmp_path / "out", progress=False, skip_oversized=True)
        assert max(len(r.body) for r in fake.requests) < 1000  # the big record never went out
    records = read_output(tmp_path / "out" / "c.jsonl.out")
    assert [r["id"] for r in records] == [f"d{i}" for i in range(30)]
    error = records[24]["error"]
    assert (error["type"], error["code"], error["field"]) == ("payload_too_large", 413, "line 25")
    assert error["message"].startswith(f"line 25 of c.jsonl is a record of {size:,} bytes, over the 6,291,456-byte")
    assert summary.errors == 1 and all("embedding" in r for i, r in enumerate(records) if i != 24)


def test_cli_batch_local_refuses_an_oversized_record_before_starting_the_endpoint(tmp_path, monkeypatch):
    corpus, size = oversized_corpus(tmp_path)

    def never(self):
        raise AssertionError("the endpoint must not start for a corpus that is refused")

    monkeypatch.setattr(LocalEndpoint, "start", never)
    result = runner.invoke(app, ["batch", "local", "--model-dir", str(TINY), "-i", str(corpus), "-o",
                                 str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: line 25 of c.jsonl is a record of {size:,} bytes, over the 6,291,456")
    assert "--skip-oversized" in result.stderr
    assert not (tmp_path / "out").exists()
    batch_commands = typer.main.get_command(app).commands["batch"].commands
    for command in ("local", "submit"):  # the default is documented where the option is
        (option,) = [p for p in batch_commands[command].params if "--skip-oversized" in p.opts]
        assert option.default is False and "by default the whole corpus is refused" in option.help


SETTINGS = batch.JobSettings(model_name="jv3-model", input_bucket="jv3-in", output_bucket="jv3-out")


def staged_objects(s3) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket="jv3-in").get("Contents", [])]


def answer_staged(s3, manifest: batch.Manifest) -> None:
    """Write each part's output as the container answers its staged lines."""
    answer = container()
    for part in manifest.parts:
        staged = client_aws.read_s3_object(s3, manifest.part_uri(part))
        reply = answer(Request("/invocations", staged, {}))
        assert reply.status == 200, reply.body
        bucket, key = manifest.output_key(part)
        s3.put_object(Bucket=bucket, Key=key, Body=reply.body)


def test_batch_submit_refuses_an_oversized_record_before_uploading_anything(batch_aws, tmp_path):
    s3, sagemaker = batch_aws
    jobs = batch.BatchJobs(SETTINGS, s3=s3, sagemaker=sagemaker, progress=False)
    corpus, size = oversized_corpus(tmp_path)
    with pytest.raises(batch.OversizedRecord, match=f"line 25 of c.jsonl is a record of {size:,} bytes"):
        jobs.submit(corpus, run_name="big")
    small, small_size = oversized_corpus(tmp_path, size=2 * MiB, name="small.jsonl")  # fits the container, not MaxPayloadInMB 1
    with pytest.raises(batch.OversizedRecord, match=rf"{small_size:,} bytes, over the 1,048,576-byte limit of a "
                                                    r"mini-batch \(MaxPayloadInMB 1\)"):
        jobs.submit(small, run_name="small", payload_mb=1)
    assert staged_objects(s3) == []  # before: every part uploaded, then refused (or the job failed on AWS)
    assert sagemaker.list_transform_jobs()["TransformJobSummaries"] == []
    # the CLI says the same in one line
    env = {"JV3_MODEL_NAME": "m", "JV3_INPUT_BUCKET": "jv3-in", "JV3_OUTPUT_BUCKET": "jv3-out"}
    result = runner.invoke(app, ["batch", "submit", str(corpus)], env=env)
    assert result.exit_code == 1 and result.stderr.startswith(f"error: line 25 of c.jsonl is a record of {size:,}")
    assert staged_objects(s3) == []


def test_batch_submit_skip_oversized_stages_a_placeholder_reported_with_the_clients_message(batch_aws, tmp_path):
    s3, sagemaker = batch_aws
    corpus, size = oversized_corpus(tmp_path)
    env = {"JV3_MODEL_NAME": "m", "JV3_INPUT_BUCKET": "jv3-in", "JV3_OUTPUT_BUCKET": "jv3-out"}
    result = runner.invoke(app, ["batch", "submit", str(corpus), "--skip-oversized", "--records-per-part", "10"],
                           env=env)
    assert result.exit_code == 0, result.output
    job = result.stdout.strip()
    jobs = batch.BatchJobs(s3=s3, sagemaker=sagemaker, progress=False)
    manifest = batch.manifest_of_job(job, sagemaker=sagemaker, s3=s3)
    assert max(p.max_record_bytes for p in manifest.parts) < 100  # a placeholder was staged, not 7 MiB
    assert manifest.withheld["24"]["kind"] == "oversized"
    answer_staged(s3, manifest)
    result = jobs.collect(job)
    assert result.ids == [f"d{i}" for i in range(30)]
    assert [(e.position, e.id, e.type) for e in result.errors] == [(24, "d24", "payload_too_large")]
    assert result.errors[0].message.startswith(f"line 25 of c.jsonl is a record of {size:,} bytes")
    assert batch.failed_parts(manifest, s3=s3) == []  # a re-run cannot change it: nothing to re-run


# ---- blank lines: an error record in place, never sent, never a failed run ----------------------------


def test_blank_lines_are_error_records_in_place_and_never_sent(tmp_path):
    # GIVEN a record, 50 blank lines (before: with small mini-batches, some of only blank lines: a 400
    # that failed the run), a whitespace-only line, a record
    lines = [json.dumps({"text": "first", "id": "a"}), *[""] * 50, " \t", json.dumps({"text": "last", "id": "b"})]
    corpus = write_jsonl(tmp_path / "c.jsonl", lines)
    with FakeEndpoint(container()) as fake:
        summary = batch.transform_file(fake.url, corpus, tmp_path / "out", max_payload_mb=40 / MiB, progress=False)
        sent = [line for s in records_sent(fake) for line in s]
    # THEN only the two records were sent, and every line has its output line
    assert [json.loads(line)["id"] for line in sent] == ["a", "b"]
    records = read_output(tmp_path / "out" / "c.jsonl.out")
    assert len(records) == 53 and records[0]["id"] == "a" and records[52]["id"] == "b"
    for position in range(1, 52):
        error = records[position]["error"]
        assert records[position]["id"] == position
        assert (error["type"], error["code"], error["field"]) == ("invalid_request", 400, f"line {position + 1}")
        assert error["message"].startswith(f"line {position + 1} of c.jsonl is blank")
    assert (summary.records, summary.errors) == (53, 51)


def test_a_corpus_of_only_blank_lines_sends_nothing_and_fails_nothing(tmp_path):
    corpus = tmp_path / "blank.txt"
    corpus.write_text("\n  \n\n")
    with FakeEndpoint(container()) as fake:
        summary = batch.transform_file(fake.url, corpus, tmp_path / "out", progress=False)
        assert fake.requests == []
    records = read_output(tmp_path / "out" / "blank.txt.out")
    assert [r["error"]["field"] for r in records] == ["line 1", "line 2", "line 3"]
    assert (summary.records, summary.errors, summary.requests) == (3, 3, 0)


def test_a_blank_line_of_a_text_corpus_is_an_error_record_not_an_empty_text(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("one\n\ntwo\n")
    assert list(batch.corpus_records(corpus)) == [(1, '{"text":"one","id":0}'), (2, ""), (3, '{"text":"two","id":2}')]
    with FakeEndpoint(container()) as fake:
        batch.transform_file(fake.url, corpus, tmp_path / "out", progress=False)
    records = read_output(tmp_path / "out" / "c.txt.out")
    assert [("embedding" in r, r["id"]) for r in records] == [(True, 0), (False, 1), (True, 2)]


def test_staged_blank_lines_are_placeholders_and_a_part_of_them_never_fails_the_job(batch_aws, tmp_path):
    s3, sagemaker = batch_aws
    corpus = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"text": "a", "id": "a"}), "", "  ",
                                                 json.dumps({"text": "b", "id": "b"})])
    manifest = batch.stage_corpus(corpus, input_bucket="jv3-in", output_bucket="jv3-out", s3=s3, run_name="r",
                                  records_per_part=1)
    staged = [s3.get_object(Bucket="jv3-in", Key=f"jv3-batch/r/parts/{p.name}")["Body"].read() for p in manifest.parts]
    assert all(line.strip() for body in staged for line in body.split(b"\n")[:-1])  # no blank line goes to SageMaker
    assert sorted(manifest.withheld) == ["1", "2"]
    answer_staged(s3, manifest)  # parts 1 and 2 hold nothing but a blank line: answered, not failed
    result = batch.collect(manifest, s3=s3)
    assert result.ids == ["a", 1, 2, "b"] and result.valid.tolist() == [True, False, False, True]
    assert [(e.position, e.type, e.message.split(";")[0]) for e in result.errors] == [
        (1, "invalid_request", "line 2 of c.jsonl is blank"), (2, "invalid_request", "line 3 of c.jsonl is blank")]
    assert batch.failed_parts(manifest, s3=s3) == []
    assert batch.Manifest.load("s3://jv3-in/jv3-batch/r", s3).withheld == manifest.withheld


# ---- never a half-written output; leftovers of killed runs --------------------------------------------


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_a_killed_writers_temporary_is_removed_by_the_next_write_a_running_ones_stays(tmp_path):
    target = tmp_path / "c.jsonl.out"
    host = files.owner().split("@")[1]
    old = time.time() - files.STALE_AFTER_S - 60
    names = {
        f".c.jsonl.out.{dead_pid()}@{host}.abc_12.tmp": True,  # its writer is gone
        f".c.jsonl.out.{os.getpid()}@{host}.abc_13.tmp": False,  # this very process: still writing
        f".c.jsonl.out.{dead_pid()}@otherhost.abc_14.tmp": False,  # another host's, recent
        ".c.jsonl.out.k2j3h4g5.tmp": "old",  # from before writers were named, an hour old
        ".c.jsonl.out.k2j3h4g6.tmp": False,
        ".other.out.k2j3h4g7.tmp": "old",  # another target's
    }
    for name, verdict in names.items():
        (tmp_path / name).write_bytes(b"half")
        if verdict in ("old",):
            os.utime(tmp_path / name, (old, old))
    batch.atomic_write(target, [b"whole\n"])
    left = sorted(p.name for p in tmp_path.iterdir())
    expected = sorted([n for n, verdict in names.items() if verdict is False or n.startswith(".other")] + [target.name])
    assert left == expected
    assert target.read_bytes() == b"whole\n"


# ---- the real rehearsal in a process of its own: SIGKILL, SIGTERM, a rerun -----------------------------


def server_processes(port: int) -> list[int]:
    """Live (not zombie) processes of ``python -m inference.serve ... --port <port>``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"inference.serve" in argv and b"--port" in argv and argv[argv.index(b"--port") + 1] == str(port).encode():
            if state != "Z":
                found.append(int(entry.name))
    return found


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port``: a server can bind it again (as servers do, with SO_REUSEADDR, past the
    TIME_WAIT of connections the server closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_rehearsal(corpus: Path, out: Path, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "jv3.cli", "batch", "local", "--model-dir", str(TINY), "-i", str(corpus),
               "-o", str(out), "--port", str(port), "-d", "8", "--no-progress", *extra]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_mid_run(process: subprocess.Popen, out: Path, name: str, port: int, timeout: float = 120) -> None:
    """Until the run has written answers to its temporary (the server is up and embedding)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        temporaries = files.temporaries(out / name)
        if temporaries and temporaries[0].stat().st_size > 0 and server_processes(port):
            return
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"the rehearsal did not start writing within {timeout} s: {process.communicate()}")


def wait_gone(port: int, timeout: float = 10) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not server_processes(port) and port_is_free(port):
            return time.monotonic() - started
        time.sleep(0.05)
    pytest.fail(f"the server on port {port} outlived its rehearsal by {timeout} s: {server_processes(port)}")


needs_proc = pytest.mark.skipif(not Path("/proc/self/cmdline").exists() or not sys.platform.startswith("linux"),
                                reason="finds the server through /proc; the parent-death signal is Linux's")


@pytest.fixture
def corpus_3000(tmp_path) -> Path:
    return write_jsonl(tmp_path / "c.jsonl", [{"text": f"line {i} " * 6, "id": f"d{i}"} for i in range(3000)])


@pytest.mark.slow
@needs_proc
def test_sigkill_of_batch_local_ends_its_server_and_a_rerun_completes(tmp_path, corpus_3000):
    out, port = tmp_path / "out", free_port()
    # GIVEN a rehearsal in the middle of its run (small mini-batches, so that it runs a while)
    process = start_rehearsal(corpus_3000, out, port, "--max-records", "8")
    wait_mid_run(process, out, "c.jsonl.out", port)
    # WHEN it is killed outright
    process.kill()
    process.communicate(timeout=30)
    # THEN its server goes with it (before: it stayed, 450 MB and the port), and only a temporary is left
    assert wait_gone(port) < 10
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".c.jsonl.out.{process.pid}@"), left
    # AND a rerun with the defaults, against a server whose request timeout a single mini-batch of the
    # whole corpus outlasts (before: a 503 and no output), writes the whole output and removes the leftover
    rerun = start_rehearsal(corpus_3000, out, free_port(), env={"JV3_REQUEST_TIMEOUT_S": "2"})
    stdout, stderr = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, stderr[-3000:]
    assert "records:  3,000 (0 errors)" in stdout
    assert [p.name for p in out.iterdir()] == ["c.jsonl.out"]
    records = read_output(out / "c.jsonl.out")
    assert [r["id"] for r in records] == [f"d{i}" for i in range(3000)]
    assert all(len(r["embedding"]) == 8 for r in records)


@pytest.mark.slow
@needs_proc
def test_sigterm_of_batch_local_stops_its_server_and_leaves_no_temporary(tmp_path, corpus_3000):
    out, port = tmp_path / "out", free_port()
    process = start_rehearsal(corpus_3000, out, port, "--max-records", "8")
    wait_mid_run(process, out, "c.jsonl.out", port)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "error: interrupted by SIGTERM; the local endpoint was stopped and nothing was written to" in stderr
    assert "Traceback" not in stderr
    assert wait_gone(port, timeout=5) < 5
    assert list(out.iterdir()) == []  # no temporary, no half output


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("JV3_LONG_TESTS") != "1", reason="about 80 s on 2 cores: set JV3_LONG_TESTS=1")
def test_batch_local_with_defaults_goes_through_a_20000_line_corpus(tmp_path):
    corpus = tmp_path / "c20k.txt"
    corpus.write_text("".join(f"line {i} " * 12 + "\n" for i in range(20_000)))
    result = runner.invoke(app, ["batch", "local", "--model-dir", str(TINY), "-i", str(corpus), "-o",
                                 str(tmp_path / "out"), "--no-progress"], env={"PYTHONPATH": str(REPO)})
    assert result.exit_code == 0, result.output
    assert "records:  20,000 (0 errors)" in result.stdout
    records = read_output(tmp_path / "out" / "c20k.txt.out")
    assert [r["id"] for r in records] == list(range(20_000))
