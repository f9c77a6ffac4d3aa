"""Issue 10, the client's part: nothing silently wrong, nothing lost. ``EmbeddingClient`` through a
real boto3 sagemaker-runtime client (``endpoint_url``) against a fake endpoint on loopback that
answers crafted bodies, fails one sub-request, times out, or never answers."""

from __future__ import annotations

import base64
import json
import re
import time

import numpy as np
import pytest
from fake_endpoint import HANG, FakeEndpoint, Reply, container_timeout, jina_ok, model_error, reply_json

from jv3 import (
    BadResponse,
    DeadlineExceeded,
    EmbeddingClient,
    EndpointNotFound,
    EndpointTimeout,
    EndpointUnavailable,
    PartialFailure,
    ProtocolError,
    ServerError,
)
from jv3.retry import RetryPolicy


def number(text: str) -> float:
    return float(text.split("-")[1])


def vectors_of(texts: list[str], width: int) -> list[dict]:
    """Row k of text "t-i" is [i, 1, 1, ...]; items come back in reverse order, placed by index."""
    items = [{"index": k, "embedding": [number(t)] + [1.0] * (width - 1)} for k, t in enumerate(texts)]
    return items[::-1]


def ok(width: int = 4):
    return lambda request: jina_ok(vectors_of(request.texts, width))


def client_for(fake: FakeEndpoint, **kw) -> EmbeddingClient:
    kw.setdefault("progress", False)
    return EmbeddingClient("jv3", endpoint_url=fake.url, **kw)


TEXTS = [f"t-{i}" for i in range(3)]


# ---- 2. the client never accepts a wrong answer ---------------------------------------------------


def bad(body, status: int = 200) -> Reply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Reply(status, raw, {"Content-Type": "application/json"})


def floats(*rows, index=True):
    return {"data": [({"index": k} if index else {}) | {"embedding": row} for k, row in enumerate(rows)]}


F4 = [0.5, 0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    "body, call, match",
    [
        (floats(F4, F4), {}, "asked for 3 embeddings, response carries 2"),
        (floats(F4, F4, F4, F4), {}, "asked for 3 embeddings, response carries 4"),
        (floats(F4, F4, [0.5, 0.5, 0.5]), {"dimensions": 4}, "response item 2 has 3 float values; dimensions=4 asks for 4"),
        (floats(F4, F4, F4), {"dimensions": 8}, "response item 0 has 4 float values; dimensions=8 asks for 8"),
        (floats(F4, F4, [0.5, 0.5, 0.5]), {}, "different shapes"),
        (floats(F4, [0.5, float("nan"), 0.5, 0.5], F4), {}, r"response item 1: a float embedding holds nan at position 1"),
        (floats(F4, F4, [float("inf"), 0.5, 0.5, 0.5]), {}, "holds inf at position 0"),
        (floats(F4, F4, [1e39, 0.5, 0.5, 0.5]), {}, "holds inf at position 0"),
        (floats(F4, F4, ["0.5", 0.5, 0.5, 0.5]), {}, "response item 2: a float embedding is not a flat list of numbers"),
        (floats(F4, F4, [True, False, True, True]), {}, "not a flat list of numbers"),
        (floats(F4, F4, [[0.5], [0.5]]), {}, "not a flat list of numbers"),
        (floats(F4, F4, []), {}, "response item 2: a float embedding is empty"),
        ({"data": [{"index": 0, "embedding": F4}, {"index": 0, "embedding": F4}, {"index": 2, "embedding": F4}]}, {},
         "response items 0 and 1 have the same index 0 .a duplicate.: the indices are not a permutation"),
        ({"data": [{"index": 0, "embedding": F4}, {"index": 1, "embedding": F4}, {"index": 3, "embedding": F4}]}, {},
         "response item 2 has index 3; expected an integer from 0 to 2"),
        ({"data": [{"index": 0, "embedding": F4}, {"index": True, "embedding": F4}, {"index": 2, "embedding": F4}]},
         {}, "response item 1 has index True"),
        ({"data": [{"index": 0, "embedding": F4}, {"embedding": F4}, {"index": 2, "embedding": F4}]}, {},
         "response item 1 has no 'index' while other items have one"),
        ({"data": [{"index": 0, "embedding": F4}, {"index": 1, "embedding": F4}, {"index": 2}]}, {},
         "response item 2 has no 'embedding'"),
        ({"vectors": []}, {}, "not a JSON object with a 'data' list"),
        (b"<html>502 Bad Gateway</html>", {}, "not a JSON object with a 'data' list"),
        ({"data": [{"index": k, "embedding": [1, 300]} for k in range(3)]}, {"embedding_type": "binary"},
         "a binary embedding holds 300, outside -128..127"),
        ({"data": [{"index": k, "embedding": [1, 2, 3]} for k in range(3)]}, {"embedding_type": "ubinary", "dimensions": 16},
         "response item 0 has 3 ubinary values; dimensions=16 asks for 2"),
        ({"data": [{"index": k, "embedding": [1.5, 2.0]} for k in range(3)]}, {"embedding_type": "ubinary"},
         "must hold integers"),
        ({"data": [{"index": k, "embedding": base64.b64encode(np.array([np.nan, 1], "<f4").tobytes()).decode()}
                   for k in range(3)]}, {"embedding_type": "base64"}, "a base64 embedding holds nan"),
        ({"data": [{"index": k, "embedding": "AAAA=="} for k in range(3)]}, {"embedding_type": "base64"},
         "not a whole number of float32 values|does not decode"),
    ],
)
def test_a_wrong_answer_is_refused_with_bad_response_naming_the_fault(aws_env, retry, body, call, match):
    with FakeEndpoint(lambda request: bad(body)) as fake:
        with pytest.raises(BadResponse, match=match) as info:
            client_for(fake, retry=retry).embed(TEXTS, **call)
        assert len(fake.requests) == 1  # refused, not retried into another answer
    assert isinstance(info.value, ProtocolError)


def test_rows_follow_the_index_when_every_item_has_one_and_keep_their_order_when_none_has(aws_env):
    shuffled = {"data": [{"index": 2, "embedding": [2.0, 0.0]}, {"index": 0, "embedding": [0.0, 0.0]},
                         {"index": 1, "embedding": [1.0, 0.0]}]}
    plain = {"data": [{"embedding": [0.0, 0.0]}, {"embedding": [1.0, 0.0]}, {"embedding": [2.0, 0.0]}]}
    for body in (shuffled, plain):
        with FakeEndpoint(lambda request, body=body: bad(body)) as fake:
            vectors = client_for(fake).embed(TEXTS, dimensions=2)
        np.testing.assert_array_equal(vectors[:, 0], [0.0, 1.0, 2.0])


def test_sub_requests_of_different_widths_are_refused(aws_env):
    # no dimensions asked: each response is self-consistent, but the call's two halves disagree
    def answer(request):
        return jina_ok(vectors_of(request.texts, 4 if "t-0" in request.texts else 5))

    with FakeEndpoint(answer) as fake:
        with pytest.raises(BadResponse, match=r"different widths \[4, 5\]"):
            client_for(fake, max_batch_size=2).embed([f"t-{i}" for i in range(4)])


# ---- 3. keep what succeeded -----------------------------------------------------------------------


def failing(texts_that_fail: set[str], reply: Reply, *, times: int | None = None, width: int = 4):
    """Answers ``reply`` to requests holding one of ``texts_that_fail`` (the first ``times`` times), else vectors."""
    count = {"n": 0}

    def answer(request):
        if texts_that_fail & set(request.texts) and (times is None or count["n"] < times):
            count["n"] += 1
            return reply
        return jina_ok(vectors_of(request.texts, width))

    return answer


def by_request(fake: FakeEndpoint) -> dict[tuple[str, ...], int]:
    sent: dict[tuple[str, ...], int] = {}
    for texts in fake.sent_texts():
        sent[tuple(texts)] = sent.get(tuple(texts), 0) + 1
    return sent


TWENTY = [f"t-{i}" for i in range(20)]


def test_a_500_in_one_sub_request_keeps_the_vectors_of_the_others(aws_env, retry):
    with FakeEndpoint(failing({"t-7"}, model_error(500, "model_error", "CUDA error: device-side assert"))) as fake:
        with pytest.raises(PartialFailure) as info:
            client_for(fake, retry=retry, max_batch_size=5, max_concurrency=2).embed(TWENTY, dimensions=4)
        sent = by_request(fake)
    failure = info.value
    assert isinstance(failure.error, ServerError) and "device-side assert" in failure.error.message
    assert failure.failed_indices == [5, 6, 7, 8, 9]
    assert failure.vectors.shape == (20, 4)
    kept = failure.valid
    assert kept.sum() == 15
    np.testing.assert_array_equal(failure.vectors[kept, 0], np.flatnonzero(kept).astype(np.float32))
    assert np.isnan(failure.vectors[~kept]).all()
    assert [(start, stop) for start, stop, _ in failure.errors] == [(5, 10)]
    assert sorted(sent.values()) == [1, 1, 1, 1]  # each sub-request once: a 500 is not retried


def test_only_the_failed_sub_request_is_retried(aws_env, retry, sleeps):
    reply = model_error(507, "capacity_error", "out of GPU memory embedding 5 texts")
    with FakeEndpoint(failing({"t-12"}, reply, times=2)) as fake:
        vectors = client_for(fake, retry=retry, max_batch_size=5, max_concurrency=3).embed(TWENTY, dimensions=4)
        sent = by_request(fake)
    np.testing.assert_array_equal(vectors[:, 0], np.arange(20, dtype=np.float32))
    assert sent == {tuple(TWENTY[0:5]): 1, tuple(TWENTY[5:10]): 1, tuple(TWENTY[10:15]): 3, tuple(TWENTY[15:20]): 1}
    assert len(sleeps.calls) == 2


def test_a_sub_request_that_keeps_failing_after_its_retries_is_reported_and_the_rest_kept(aws_env, retry):
    reply = model_error(503, "model_error", "worker restarting")
    with FakeEndpoint(failing({"t-19"}, reply)) as fake:
        with pytest.raises(PartialFailure, match="5 of 20 texts failed .positions 15, 16, 17, 18, 19.") as info:
            client_for(fake, retry=retry, max_batch_size=5).embed(TWENTY, dimensions=4)
        sent = by_request(fake)
    assert isinstance(info.value.error, EndpointUnavailable)
    assert sent[tuple(TWENTY[15:20])] == retry.max_attempts and sum(sent.values()) == 3 + retry.max_attempts
    np.testing.assert_array_equal(info.value.vectors[:15, 0], np.arange(15, dtype=np.float32))


def test_a_bad_answer_to_one_sub_request_is_a_partial_failure_too(aws_env, retry):
    nan_rows = reply_json({"data": [{"index": k, "embedding": [float("nan")] * 4} for k in range(5)]})
    with FakeEndpoint(failing({"t-0"}, nan_rows)) as fake:
        with pytest.raises(PartialFailure) as info:
            client_for(fake, retry=retry, max_batch_size=5).embed(TWENTY, dimensions=4)
    assert isinstance(info.value.error, BadResponse) and info.value.failed_indices == [0, 1, 2, 3, 4]
    assert not np.isnan(info.value.vectors[5:]).any()


def test_an_error_of_the_whole_call_stops_sending_and_is_raised_as_itself(aws_env, retry):
    not_found = Reply(400, json.dumps({"__type": "ValidationError", "message": "Endpoint jv3 of account 1 not found."})
                      .encode(), {"Content-Type": "application/json", "x-amzn-ErrorType": "ValidationError"})
    with FakeEndpoint(lambda request: not_found) as fake:
        with pytest.raises(EndpointNotFound, match="not found"):
            client_for(fake, retry=retry, max_batch_size=5, max_concurrency=1).embed(TWENTY)
        assert len(fake.requests) == 1  # the other three sub-requests would meet the same answer


# ---- 4. a hung endpoint fails within a bound the user sets ---------------------------------------


def test_a_hung_endpoint_fails_within_the_per_attempt_timeout(aws_env, retry):
    with FakeEndpoint(lambda request: HANG) as fake:
        started = time.monotonic()
        with pytest.raises(EndpointTimeout) as info:
            client_for(fake, retry=retry, timeout=1).embed(["t-0"])
        elapsed = time.monotonic() - started
        assert len(fake.requests) == 1  # one text timed out: nothing smaller to send, and not re-sent
    assert isinstance(info.value, TimeoutError)
    assert 0.9 <= elapsed < 3.0


def test_a_hung_endpoint_fails_within_the_deadline_of_the_call(aws_env, retry):
    with FakeEndpoint(lambda request: HANG) as fake:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="within the deadline of 1.5 s") as info:
            client_for(fake, retry=retry, timeout=30, deadline=1.5).embed(TWENTY, dimensions=4)
        elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert 1.4 <= elapsed < 3.0


def test_past_the_deadline_the_answers_already_in_are_kept(aws_env, retry):
    with FakeEndpoint(lambda request: HANG if "t-3" in request.texts else jina_ok(vectors_of(request.texts, 4))) as fake:
        started = time.monotonic()
        with pytest.raises(PartialFailure) as info:
            client_for(fake, retry=retry, timeout=30, deadline=1.5, max_batch_size=5).embed(TWENTY, dimensions=4)
        assert time.monotonic() - started < 3.0
    assert isinstance(info.value.error, DeadlineExceeded) and info.value.failed_indices == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(info.value.vectors[5:, 0], np.arange(5, 20, dtype=np.float32))


def test_timeout_and_deadline_must_be_positive_seconds():
    from jv3 import InvalidArgument

    for bad_value in (0, -1, float("inf"), "5", True):
        with pytest.raises(InvalidArgument, match="must be a positive number of seconds or None"):
            EmbeddingClient("jv3", runtime_client=object(), timeout=bad_value)
        with pytest.raises(InvalidArgument, match="deadline must be a positive number"):
            EmbeddingClient("jv3", runtime_client=object(), deadline=bad_value)


def test_the_timeout_reaches_botocore_config(aws_env):
    config = EmbeddingClient("jv3", endpoint_url="http://127.0.0.1:9", timeout=2.5).runtime.meta.config
    assert (config.read_timeout, config.connect_timeout) == (2.5, 2.5)
    default = EmbeddingClient("jv3", endpoint_url="http://127.0.0.1:9").runtime.meta.config
    assert (default.read_timeout, default.connect_timeout) == (70, 10)


# ---- 5. never re-send work that timed out without shrinking it -----------------------------------


def times_out_above(k: int, reply=container_timeout):
    def answer(request):
        return reply() if len(request.texts) > k else jina_ok(vectors_of(request.texts, 4))

    return answer


def test_a_sub_request_that_times_out_is_split_in_halves_until_it_fits(aws_env, retry):
    with FakeEndpoint(times_out_above(3)) as fake:
        vectors = client_for(fake, retry=retry, max_batch_size=20, max_concurrency=2).embed(TWENTY, dimensions=4)
        sent = fake.sent_texts()
    np.testing.assert_array_equal(vectors[:, 0], np.arange(20, dtype=np.float32))
    sizes = sorted((len(texts) for texts in sent), reverse=True)
    assert sizes == [20, 10, 10, 5, 5, 5, 5, 3, 3, 3, 3, 2, 2, 2, 2]
    assert len({tuple(texts) for texts in sent}) == len(sent)  # no payload was ever sent twice
    answered = [texts for texts in sent if len(texts) <= 3]
    assert sorted(t for texts in answered for t in texts) == sorted(TWENTY)  # each text answered once


def test_a_read_timeout_is_split_too(aws_env, retry):
    with FakeEndpoint(times_out_above(2, reply=lambda: HANG)) as fake:
        vectors = client_for(fake, retry=retry, timeout=0.5, max_batch_size=8, max_concurrency=4).embed(
            TWENTY[:8], dimensions=4)
        sizes = sorted((len(texts) for texts in fake.sent_texts()), reverse=True)
    np.testing.assert_array_equal(vectors[:, 0], np.arange(8, dtype=np.float32))
    assert sizes == [8, 4, 4, 2, 2, 2, 2]


def test_one_text_or_one_late_chunking_document_that_times_out_fails_without_being_re_sent(aws_env, retry):
    with FakeEndpoint(times_out_above(0)) as fake:
        with pytest.raises(EndpointTimeout, match="timeout: no answer within 60 s") as info:
            client_for(fake, retry=retry).embed(["t-0"])
        assert info.value.status == 503 and len(fake.requests) == 1
        with pytest.raises(EndpointTimeout):
            client_for(fake, retry=retry).embed(TEXTS, late_chunking=True)  # chunks of one document: never split
        assert len(fake.requests) == 2


def test_an_endpoint_that_only_times_out_is_given_up_on(aws_env):
    policy = RetryPolicy(max_attempts=2, sleep=lambda s: None)
    with FakeEndpoint(times_out_above(0)) as fake:
        with pytest.raises(EndpointTimeout, match=re.escape("2 requests in a row timed out")):
            client_for(fake, retry=policy, max_batch_size=4, max_concurrency=1).embed(TWENTY)
        assert len(fake.requests) == 2  # retry.max_attempts × max_concurrency, not the whole split tree


def test_jv3_embed_timeout_and_deadline_options_bound_a_hung_endpoint(aws_env):
    from typer.testing import CliRunner

    from jv3.cli import app

    with FakeEndpoint(lambda request: HANG) as fake:
        started = time.monotonic()
        result = CliRunner().invoke(app, ["embed", "--endpoint-url", fake.url, "--timeout", "30", "--deadline", "1",
                                          "hello", "world"])
        elapsed = time.monotonic() - started
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: no answer for 2 texts within the deadline of 1 s; their requests were abandoned"
    assert elapsed < 2.5


def test_sagemakers_own_invocation_timeout_is_an_endpoint_timeout():
    from botocore.exceptions import ClientError as BotoClientError

    from jv3.wire import error_from_botocore

    message = ("Received server error (0) from primary with message \"Your invocation timed out while waiting for a "
               "response from container primary.\"")
    exc = BotoClientError({"Error": {"Code": "ModelError", "Message": message}, "OriginalStatusCode": 0,
                           "OriginalMessage": ""}, "InvokeEndpoint")
    assert isinstance(error_from_botocore(exc), EndpointTimeout)
    other = BotoClientError({"Error": {"Code": "ModelError", "Message": "x"}, "OriginalStatusCode": 503,
                             "OriginalMessage": json.dumps({"error": {"type": "model_error", "message": "busy"}})},
                            "InvokeEndpoint")
    assert type(error_from_botocore(other)) is EndpointUnavailable


def test_a_retry_whose_backoff_would_pass_the_deadline_is_not_made():
    sleeps: list[float] = []
    policy = RetryPolicy(max_attempts=5, base_delay=10.0, sleep=sleeps.append, random=lambda lo, hi: hi)
    calls = []

    def flaky():
        calls.append(1)
        raise EndpointUnavailable("busy", status=503)

    with pytest.raises(EndpointUnavailable):
        policy.call(flaky, deadline=time.monotonic() + 5.0)
    assert (len(calls), sleeps) == (1, [])
    with pytest.raises(EndpointUnavailable):
        policy.call(flaky, retry_if=lambda exc: False)
    assert len(calls) == 2
