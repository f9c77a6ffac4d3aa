"""Issue 10, the one line rule: N input lines are N texts, N records, N vectors, wherever the client
splits lines (jv3 embed --file and stdin, batch staging, batch local, batch collect/fetch), even
when texts and ids hold form feeds, U+2028, U+0085, \\x0b, \\x1c-\\x1e or a lone \\r."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_endpoint import FakeEndpoint, Reply, jina_ok
from typer.testing import CliRunner

from jv3 import batch
from jv3.cli import app
from jv3.lines import decode_lines, dumps_line, iter_lines, split_lines

runner = CliRunner()

# every character str.splitlines() splits at, besides \n and \r\n
BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r"]
TEXTS = [f"left{c}right" for c in BREAKS]  # one text per odd character, each inside a text


def test_split_lines_splits_at_newline_only_and_drops_one_cr_of_crlf():
    assert split_lines("".join(t + "\n" for t in TEXTS)) == TEXTS
    assert split_lines("a\r\nb\r\n") == ["a", "b"]
    assert split_lines("a\r\r\nb") == ["a\r", "b"]  # only the \r of \r\n is part of the line break
    assert split_lines("a\n\nb") == ["a", "", "b"]  # a blank line is a line
    assert split_lines("a\nb") == split_lines("a\nb\n") == ["a", "b"]
    assert split_lines("") == [] and split_lines("\n") == [""]
    assert len("x\u2028y\x0cz\rw".splitlines()) == 4 and split_lines("x\u2028y\x0cz\rw") == ["x\u2028y\x0cz\rw"]


def test_iter_lines_and_decode_lines_follow_the_same_rule():
    text = "".join(t + "\r\n" for t in TEXTS) + "last"
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]  # chunks that cut lines and \r\n anywhere
    assert list(iter_lines(pieces)) == [*TEXTS, "last"] == split_lines(text)
    assert decode_lines(text.encode()) == [*TEXTS, "last"]
    with pytest.raises(ValueError, match="body is not UTF-8 at byte 1"):
        decode_lines(b"a\xff\n")


def test_dumps_line_escapes_what_other_readers_split_at():
    line = dumps_line({"text": "".join(BREAKS), "id": "a\u2028b"})
    assert "\n" not in line and len(line.splitlines()) == 1
    assert json.loads(line) == {"text": "".join(BREAKS), "id": "a\u2028b"}
    assert dumps_line({"text": "Grüße 世界"}) == '{"text":"Grüße 世界"}'  # other characters stay as they are


# ---- jv3 embed --file / stdin ---------------------------------------------------------------------


def echo_vectors(request) -> Reply:
    return jina_ok([{"index": k, "embedding": [float(k), float(len(t))]} for k, t in enumerate(request.texts)])


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_embed_file_gives_one_vector_per_line(aws_env, tmp_path, ending):
    path = tmp_path / "texts.txt"
    path.write_bytes("".join(t + ending for t in TEXTS).encode())
    with FakeEndpoint(echo_vectors) as fake:
        result = runner.invoke(app, ["embed", "--endpoint-url", fake.url, "-f", str(path)])
        assert result.exit_code == 0, result.output
        assert fake.sent_texts() == [TEXTS]  # each text exactly as it stands in its line
    vectors = np.array(json.loads(result.stdout))
    assert vectors.shape == (len(TEXTS), 2)
    assert vectors[:, 1].tolist() == [float(len(t)) for t in TEXTS]


def test_embed_stdin_gives_one_vector_per_line(aws_env):
    three = ["a\u2028b", "c\x0cd", "e\rf"]
    with FakeEndpoint(echo_vectors) as fake:
        result = runner.invoke(app, ["embed", "--endpoint-url", fake.url], input="\n".join(three) + "\n")
        assert result.exit_code == 0, result.output
        assert fake.sent_texts() == [three]
    assert len(json.loads(result.stdout)) == 3


def test_embed_file_that_is_not_utf8_is_a_one_line_error(aws_env, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok\nGr\xfc\xdfe\n".encode("latin-1"))
    result = runner.invoke(app, ["embed", "--endpoint-url", "http://127.0.0.1:9", "-f", str(path)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: --file {str(path)!r} is not UTF-8 at byte 5: b'\\xfc\\xdfe\\n'"


# ---- batch: corpora, staging, collect, local --------------------------------------------------------

IDS = [f"id{c}{k}" for k, c in enumerate(BREAKS)]


def test_text_and_jsonl_corpora_keep_one_record_per_line(tmp_path):
    text = tmp_path / "c.txt"
    text.write_bytes("".join(t + "\n" for t in TEXTS).encode())
    records = [json.loads(line) for line in batch.corpus_lines(text)]
    assert records == [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    jsonl = tmp_path / "c.jsonl"
    # raw (unescaped) U+2028, U+2029 and U+0085 inside JSON strings, as ensure_ascii=False writers leave them
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(
        json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\r\n" for t, i in zip(TEXTS, IDS, strict=True)
    ).encode())
    lines = list(batch.corpus_lines(jsonl))
    assert [json.loads(line) for line in lines] == [{"text": t, "id": i} for t, i in zip(TEXTS, IDS, strict=True)]
    assert all(len(line.splitlines()) == 1 for line in lines)  # staged lines split the same way for any reader


def test_staging_and_collecting_keep_every_record_and_id(batch_aws, tmp_path):
    s3, _ = batch_aws
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n"
                              for t, i in zip(TEXTS, IDS, strict=True)), encoding="utf-8")
    manifest = batch.stage_corpus(corpus, input_bucket="jv3-in", output_bucket="jv3-out", s3=s3, run_name="r",
                                  records_per_part=4, dimensions=2)
    assert manifest.records == len(TEXTS) and [p.records for p in manifest.parts] == [4, 4, 1]
    staged = [s3.get_object(Bucket="jv3-in", Key=f"jv3-batch/r/parts/{p.name}")["Body"].read() for p in manifest.parts]
    assert [json.loads(line)["id"] for body in staged for line in body.split(b"\n")[:-1]] == IDS
    # outputs whose ids hold raw U+2028 etc. (a writer that does not escape them)
    for part in manifest.parts:
        out = "".join(json.dumps({"id": IDS[part.first + k], "index": k, "embedding": [float(part.first + k), 0.0]},
                                 ensure_ascii=False) + "\n" for k in range(part.records))
        bucket, key = manifest.output_key(part)
        s3.put_object(Bucket=bucket, Key=key, Body=out.encode())
    result = batch.collect(manifest, s3=s3)
    assert result.complete and result.missing_parts == []
    assert result.ids == IDS
    np.testing.assert_array_equal(result.embeddings[:, 0], np.arange(len(TEXTS), dtype=np.float32))
    assert batch.failed_parts(manifest, s3=s3) == []


def test_an_output_record_with_a_bad_embedding_is_an_error_record_and_its_part_is_re_run(batch_aws, tmp_path):
    s3, _ = batch_aws
    corpus = tmp_path / "c.txt"
    corpus.write_text("a\nb\n")
    manifest = batch.stage_corpus(corpus, input_bucket="jv3-in", output_bucket="jv3-out", s3=s3, run_name="r")
    bucket, key = manifest.output_key(manifest.parts[0])
    s3.put_object(Bucket=bucket, Key=key, Body=b'{"id":0,"embedding":[1.0,2.0]}\n{"id":1,"embedding":[NaN,2.0]}\n')
    result = batch.collect(manifest, s3=s3)
    assert result.valid.tolist() == [True, False]
    assert [(e.position, e.type) for e in result.errors] == [(1, "bad_response")]
    assert "holds nan" in result.errors[0].message
    assert batch.failed_parts(manifest, s3=s3) == manifest.parts


def jsonlines_echo(request) -> Reply:
    """A container answering JSON Lines, one record per \\n-terminated line, ids echoed unescaped."""
    out = []
    for k, line in enumerate(request.body.decode().split("\n")[:-1]):
        record = json.loads(line)
        out.append(json.dumps({"id": record["id"], "index": k, "embedding": [float(len(record["text"]))]},
                              ensure_ascii=False))
    return Reply(200, ("\n".join(out) + "\n").encode(), {"Content-Type": "application/jsonlines"})


def test_batch_local_writes_one_output_line_per_input_line(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n"
                              for t, i in zip(TEXTS, IDS, strict=True)), encoding="utf-8")
    with FakeEndpoint(jsonlines_echo) as fake:
        summary = batch.transform_file(fake.url, corpus, tmp_path / "out", max_payload_mb=0.0002, progress=False)
        assert len(fake.requests) > 1  # several mini-batches
    assert (summary.records, summary.errors) == (len(TEXTS), 0)
    out = (tmp_path / "out" / "c.jsonl.out").read_bytes().split(b"\n")
    assert out[-1] == b"" and [json.loads(line)["id"] for line in out[:-1]] == IDS


@pytest.mark.slow
def test_the_real_endpoint_keeps_one_record_per_line(local_endpoint, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes("".join(t + "\n" for t in TEXTS).encode())
    summary = batch.transform_file(local_endpoint.url, corpus, tmp_path / "out", progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "c.txt.out").read_bytes().split(b"\n")[:-1]]
    assert (summary.records, summary.errors, len(records)) == (len(TEXTS), 0, len(TEXTS))
    assert [r["id"] for r in records] == list(range(len(TEXTS)))
