"""Batch transform helpers: reading corpora, staging on S3, the CreateTransformJob request, waiting,
collecting outputs and re-running failed parts (moto for S3, SageMaker and CloudFormation)."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pytest
from botocore.stub import Stubber

from jv3 import batch
from jv3.errors import BatchJobError, InvalidArgument

# ---- corpora -------------------------------------------------------------------------------------


def test_jsonl_corpus_gets_ids_and_keeps_malformed_lines_in_place(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a", "id": "x"}\n"bare"\nnot json\n{"text": "b"}\n')
    lines = list(batch.corpus_lines(path))
    assert [json.loads(line) for line in (lines[0], lines[1], lines[3])] == [
        {"text": "a", "id": "x"}, {"text": "bare", "id": 1}, {"text": "b", "id": 3}
    ]
    assert lines[2] == "not json"


def test_csv_corpus_reads_the_text_and_id_columns(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('id,text,other\nd1,"hello, world",1\n,"two\nlines",2\n')
    assert [json.loads(line) for line in batch.corpus_lines(path)] == [
        {"text": "hello, world", "id": "d1"}, {"text": "two\nlines", "id": 1}
    ]
    (tmp_path / "bad.csv").write_text("body\nx\n")
    with pytest.raises(InvalidArgument, match="bad.csv has no 'text' column; columns: body"):
        list(batch.corpus_lines(tmp_path / "bad.csv"))


def test_plain_text_corpus_is_one_document_per_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first\nsecond {json-looking}\n")
    assert [json.loads(line) for line in batch.corpus_lines(path)] == [
        {"text": "first", "id": 0}, {"text": "second {json-looking}", "id": 1}
    ]


# ---- sizing and splitting -------------------------------------------------------------------------


def test_max_payload_is_sized_by_the_response_and_bounded_by_the_container():
    short_float = batch.max_payload_mb(avg_record_bytes=200, max_record_bytes=500, dimensions=None, embedding_type="float")
    assert short_float == 1  # 1 MB of 200-byte texts is ~5,000 vectors of 24 kB: keep mini-batches small
    long_binary = batch.max_payload_mb(avg_record_bytes=20_000, max_record_bytes=50_000, dimensions=None, embedding_type="binary")
    assert long_binary == batch.CONTAINER_MAX_PAYLOAD_MB
    big_record = batch.max_payload_mb(avg_record_bytes=200, max_record_bytes=3 * batch.MiB, dimensions=None, embedding_type="float")
    assert big_record == 3  # never below the largest record
    with pytest.raises(InvalidArgument, match="exceeds the container's 6 MB request limit"):
        batch.max_payload_mb(avg_record_bytes=1, max_record_bytes=7 * batch.MiB, dimensions=None, embedding_type="float")


def test_multirecord_payloads_pack_whole_records_up_to_the_limit():
    lines = [b"x" * n for n in (10, 20, 30, 5, 40, 1)]
    payloads = list(batch.multirecord_payloads(lines, 45))
    assert [b for p in payloads for b in p] == lines  # every record once, in order
    assert all(sum(len(b) + 1 for b in p) <= 45 for p in payloads)
    assert [len(p) for p in payloads] == [2, 2, 2]
    with pytest.raises(BatchJobError, match="record 1 is 51 bytes, over MaxPayloadInMB"):
        list(batch.multirecord_payloads([b"a", b"b" * 50], 45))


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "x.out"
    target.write_text("old\n")

    def broken():
        yield b"half"
        raise BatchJobError("endpoint went away")

    with pytest.raises(BatchJobError):
        batch.atomic_write(target, broken())
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.out"]  # no temporary left behind


# ---- S3 and the transform job (moto) --------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}", "id": f"d{i}"}) + "\n" for i in range(25)))
    return path


SETTINGS = batch.JobSettings(model_name="jv3-model", input_bucket="jv3-in", output_bucket="jv3-out",
                             instance_type="ml.g5.xlarge", instance_count=2, max_concurrent_transforms=4)


def stage(batch_aws, corpus, **kw):
    return batch.stage_corpus(corpus, input_bucket="jv3-in", output_bucket="jv3-out", s3=batch_aws[0],
                              run_name="run1", records_per_part=10, task="retrieval.passage", dimensions=8, **kw)


def test_stage_writes_parts_and_a_manifest(batch_aws, corpus):
    s3 = batch_aws[0]
    manifest = stage(batch_aws, corpus)
    assert [(p.name, p.records, p.first) for p in manifest.parts] == [
        ("part-00000.jsonl", 10, 0), ("part-00001.jsonl", 10, 10), ("part-00002.jsonl", 5, 20)
    ]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="jv3-in")["Contents"])
    assert keys == ["jv3-batch/run1/manifest.json"] + [f"jv3-batch/run1/parts/part-0000{i}.jsonl" for i in range(3)]
    part = s3.get_object(Bucket="jv3-in", Key="jv3-batch/run1/parts/part-00001.jsonl")["Body"].read().decode()
    assert [json.loads(line)["id"] for line in part.splitlines()] == [f"d{i}" for i in range(10, 20)]
    assert batch.Manifest.load("s3://jv3-in/jv3-batch/run1", s3) == manifest


def test_job_request_follows_the_batch_contract(batch_aws, corpus):
    request = batch.job_request(stage(batch_aws, corpus, embedding_type="binary"), SETTINGS, job_name="run1")
    assert request["BatchStrategy"] == "MultiRecord"
    assert request["TransformInput"] == {
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://jv3-in/jv3-batch/run1/parts/"}},
        "ContentType": "application/jsonlines", "CompressionType": "None", "SplitType": "Line",
    }
    assert request["TransformOutput"] == {"S3OutputPath": "s3://jv3-out/jv3-batch/run1/",
                                          "Accept": "application/jsonlines", "AssembleWith": "Line"}
    assert request["Environment"] == {"JV3_DEFAULT_TASK": "retrieval.passage", "JV3_DEFAULT_DIMENSIONS": "8",
                                      "JV3_DEFAULT_ENCODING": "binary"}
    assert request["TransformResources"] == {"InstanceType": "ml.g5.xlarge", "InstanceCount": 2}
    assert 1 <= request["MaxPayloadInMB"] <= 6
    assert request["MaxPayloadInMB"] * request["MaxConcurrentTransforms"] <= 100


def write_outputs(s3, manifest, *, skip=(), error_at=()):
    for part in manifest.parts:
        if part.name in skip:
            continue
        lines = []
        for k in range(part.records):
            position = part.first + k
            if position in error_at:
                lines.append({"id": f"d{position}", "index": k,
                              "error": {"type": "invalid_request", "message": "text is empty", "code": 400}})
            else:
                lines.append({"id": f"d{position}", "index": k, "embedding": [float(position)] * 8, "tokens": 3})
        bucket, key = manifest.output_key(part)
        s3.put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(x) + "\n" for x in lines).encode())


def test_submit_wait_collect_and_rerun_only_the_failed_parts(batch_aws, corpus):
    s3, sagemaker = batch_aws
    # GIVEN a staged corpus and a job
    manifest = stage(batch_aws, corpus)
    job = batch.submit(manifest, SETTINGS, sagemaker=sagemaker, s3=s3)
    described = batch.describe(job, sagemaker=sagemaker)
    assert described["ModelName"] == "jv3-model" and described["BatchStrategy"] == "MultiRecord"
    assert batch.wait(job, sagemaker=sagemaker, s3=s3, manifest=manifest, progress=False, sleep=None)[
        "TransformJobStatus"] == "Completed"
    # WHEN one part has no output and another an error record
    write_outputs(s3, manifest, skip={"part-00001.jsonl"}, error_at={22})
    loaded = batch.manifest_of_job(job, sagemaker=sagemaker, s3=s3)
    result = batch.collect(loaded, s3=s3)
    # THEN the rows line up with the corpus, and what is missing is reported
    assert result.embeddings.shape == (25, 8)
    assert result.missing_parts == ["part-00001.jsonl"]
    assert [(e.position, e.id, e.message) for e in result.errors] == [(22, "d22", "text is empty")]
    assert result.valid.tolist() == [i < 10 or (i >= 20 and i != 22) for i in range(25)]
    np.testing.assert_array_equal(result.embeddings[result.valid, 0], np.flatnonzero(result.valid).astype(np.float32))
    assert np.isnan(result.embeddings[~result.valid]).all()
    assert result.ids[:2] == ["d0", "d1"] and result.ids[12] is None
    # AND a re-run covers exactly the failed parts, listed in a SageMaker manifest file
    failed = batch.failed_parts(loaded, s3=s3)
    assert [p.name for p in failed] == ["part-00001.jsonl", "part-00002.jsonl"]
    rerun = batch.submit(loaded, SETTINGS, sagemaker=sagemaker, s3=s3, parts=failed)
    source = batch.describe(rerun, sagemaker=sagemaker)["TransformInput"]["DataSource"]["S3DataSource"]
    assert source["S3DataType"] == "ManifestFile"
    bucket, key = source["S3Uri"][5:].split("/", 1)
    assert json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read()) == [
        {"prefix": "s3://jv3-in/jv3-batch/run1/parts/"}, "part-00001.jsonl", "part-00002.jsonl"
    ]
    assert batch.manifest_of_job(rerun, sagemaker=sagemaker, s3=s3).jobs == [job, rerun]
    # AND once the outputs are complete, nothing is left to re-run
    write_outputs(s3, manifest)
    assert batch.failed_parts(loaded, s3=s3) == []
    assert batch.collect(loaded, s3=s3).complete


def test_saved_results_are_aligned_files(batch_aws, corpus, tmp_path):
    s3, _ = batch_aws
    manifest = stage(batch_aws, corpus)
    write_outputs(s3, manifest, error_at={3})
    written = batch.collect(manifest, s3=s3).save(tmp_path / "out")
    assert sorted(p.name for p in written) == ["embeddings.npy", "errors.jsonl", "ids.json"]
    assert np.load(tmp_path / "out" / "embeddings.npy").shape == (25, 8)
    assert json.loads((tmp_path / "out" / "ids.json").read_text())[24] == "d24"
    assert json.loads((tmp_path / "out" / "errors.jsonl").read_text())["position"] == 3


def test_wait_raises_when_the_job_failed():
    class Failed:
        def describe_transform_job(self, TransformJobName):
            return {"TransformJobStatus": "Failed", "FailureReason": "ClientError: record too large"}

    with pytest.raises(BatchJobError, match="transform job j failed: ClientError: record too large"):
        batch.wait("j", sagemaker=Failed(), progress=False)


def test_job_settings_come_from_the_stack_outputs(aws_env):
    # moto's CloudFormation needs extras this project does not install; describe_stacks is stubbed
    cfn = boto3.client("cloudformation", region_name="us-east-1")
    outputs = [{"OutputKey": name, "OutputValue": f"value-of-{name}"} for name in batch.STACK_OUTPUTS.values()]
    created = "2025-01-01T00:00:00Z"
    with Stubber(cfn) as stubber:
        stubber.add_response("describe_stacks", {"Stacks": [{"StackName": "jv3", "CreationTime": created,
                                                             "StackStatus": "CREATE_COMPLETE", "Outputs": outputs}]},
                             {"StackName": "jv3"})
        stubber.add_response("describe_stacks", {"Stacks": [{"StackName": "bare", "CreationTime": created,
                                                             "StackStatus": "CREATE_COMPLETE"}]})
        stubber.add_client_error("describe_stacks", "ValidationError", "Stack with id missing does not exist")
        settings = batch.JobSettings.from_stack("jv3", cloudformation=cfn, instance_count=3)
        assert (settings.model_name, settings.input_bucket, settings.output_bucket, settings.role_arn) == (
            "value-of-BatchModelName", "value-of-BatchInputBucket", "value-of-BatchOutputBucket",
            "value-of-TransformRoleArn",
        )
        request = batch.job_request(batch.Manifest("s3://i/r", "s3://o/r", "c", [batch.Part("p", 1, 0, 9, 9)]),
                                    settings, job_name="r")
        assert request["ModelName"] == "value-of-BatchModelName"
        assert request["TransformOutput"]["KmsKeyId"] == "value-of-KmsKeyArn"
        assert settings.instance_count == 3
        with pytest.raises(InvalidArgument, match="stack 'bare' has no output 'BatchModelName'"):
            batch.JobSettings.from_stack("bare", cloudformation=cfn)
        with pytest.raises(InvalidArgument, match="cannot read stack 'missing': Stack with id missing does not exist"):
            batch.JobSettings.from_stack("missing", cloudformation=cfn)


def test_batch_jobs_is_the_whole_life_of_a_run_in_one_object(batch_aws, corpus, tmp_path):
    s3, sagemaker = batch_aws
    jobs = batch.BatchJobs(SETTINGS, s3=s3, sagemaker=sagemaker, progress=False, sleep=lambda _: None)
    # submit: staged parts and a job over all of them
    run = jobs.submit(corpus, task="retrieval.passage", dimensions=8, records_per_part=10, run_name="run1")
    assert run.job == "run1" and [p.name for p in run.parts] == [f"part-0000{i}.jsonl" for i in range(3)]
    assert jobs.wait(run.job)["TransformJobStatus"] == "Completed"
    assert str(jobs.status(run.job)) == "run1: Completed, 0/3 parts"
    # collect: what there is, aligned, saved; rerun: only the parts without complete output
    write_outputs(s3, run.manifest, skip={"part-00002.jsonl"})
    assert str(jobs.status(run.job)) == "run1: Completed, 2/3 parts"
    result = jobs.collect(run.job, output=tmp_path / "out")
    assert result.missing_parts == ["part-00002.jsonl"] and int(result.valid.sum()) == 20
    assert np.load(tmp_path / "out" / "embeddings.npy").shape == (25, 8)
    again = jobs.rerun(run.job)
    assert [p.name for p in again.parts] == ["part-00002.jsonl"] and again.manifest.jobs == ["run1", again.job]
    rerun_request = batch.describe(again.job, sagemaker=sagemaker)
    assert rerun_request["TransformResources"] == {"InstanceType": "ml.g5.xlarge", "InstanceCount": 2}
    write_outputs(s3, run.manifest)
    assert jobs.collect(again.job).complete  # a re-run's name reads the same run
    with pytest.raises(InvalidArgument, match="no parts to re-run"):
        jobs.rerun(again.job)
    with pytest.raises(InvalidArgument, match="submitting a job needs JobSettings"):
        batch.BatchJobs(s3=s3, sagemaker=sagemaker).submit(corpus)


def test_s3_uris_are_read_and_built_in_one_place(batch_aws):
    from jv3 import aws as client_aws

    s3, _ = batch_aws
    assert client_aws.join_s3_uri("s3://b/run/", "parts", "x.jsonl") == "s3://b/run/parts/x.jsonl"
    assert client_aws.join_s3_uri("s3://b", "x") == client_aws.join_s3_uri("s3://b/", "x") == "s3://b/x"
    with pytest.raises(InvalidArgument, match="expected an s3://bucket/key URI"):
        client_aws.split_s3_uri("https://b/x")
    client_aws.put_s3_object(s3, "s3://jv3-in/a/b.json", b"{}", "application/json")
    assert client_aws.read_s3_object(s3, "s3://jv3-in/a/b.json") == b"{}"
    assert client_aws.read_s3_object(s3, "s3://jv3-in/a/missing.json") is None
    manifest = batch.Manifest("s3://jv3-in/jv3-batch/r", "s3://jv3-out/jv3-batch/r", "c", [batch.Part("p.jsonl", 1, 0, 9, 9)])
    assert manifest.parts_uri == "s3://jv3-in/jv3-batch/r/parts/"
    assert manifest.output_key(manifest.parts[0]) == ("jv3-out", "jv3-batch/r/p.jsonl.out")
    with pytest.raises(BatchJobError, match="cannot read the run manifest s3://jv3-in/nothing/manifest.json"):
        batch.Manifest.load("s3://jv3-in/nothing", s3)


def test_batch_jobs_from_the_stack_builds_the_settings_once(aws_env):
    cfn = boto3.client("cloudformation", region_name="us-east-1")
    outputs = [{"OutputKey": name, "OutputValue": f"value-of-{name}"} for name in batch.STACK_OUTPUTS.values()]
    with Stubber(cfn) as stubber:
        stubber.add_response("describe_stacks", {"Stacks": [{"StackName": "jv3", "CreationTime": "2025-01-01T00:00:00Z",
                                                             "StackStatus": "CREATE_COMPLETE", "Outputs": outputs}]})
        jobs = batch.BatchJobs.from_stack("jv3", cloudformation=cfn, instance_count=3, progress=False)
    assert (jobs.settings.model_name, jobs.settings.kms_key_arn, jobs.settings.instance_count) == (
        "value-of-BatchModelName", "value-of-KmsKeyArn", 3)
    assert jobs.progress is False
