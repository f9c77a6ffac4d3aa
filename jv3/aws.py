"""boto3 clients as the rest of ``client`` wants them.

Retries are the client's own (``jv3.retry``), so clients built here switch botocore's off; an
injected client keeps whatever its owner configured. ``endpoint_url`` points the runtime at a local
endpoint (``python -m inference.serve``), which checks no signature: dummy credentials are used
there when the environment has none, so no AWS account is needed.

S3 URIs are read (``split_s3_uri``), built (``join_s3_uri``), written and read back here only, for
the async client and batch transform alike.
"""

from __future__ import annotations

import os

import boto3
import botocore.exceptions
from botocore.config import Config

from .errors import InvalidArgument

LOCAL_REGION = "us-east-1"


def runtime_client(
    *,
    region_name: str | None = None,
    endpoint_url: str | None = None,
    max_pool_connections: int = 10,
    read_timeout: float = 70.0,
    connect_timeout: float = 10.0,
):
    """A ``sagemaker-runtime`` client; with ``endpoint_url``, one that speaks to a local endpoint.

    ``read_timeout`` bounds each wait for bytes of an answer and ``connect_timeout`` each connection
    attempt (botocore's ``Config``); SageMaker itself gives a real-time invocation 60 s.
    """
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=max(10, max_pool_connections),
        read_timeout=read_timeout,
        connect_timeout=connect_timeout,
    )
    kwargs: dict = {"config": config}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
        kwargs["region_name"] = region_name or os.environ.get("AWS_REGION") or LOCAL_REGION
        if not os.environ.get("AWS_ACCESS_KEY_ID") and not os.environ.get("AWS_PROFILE"):
            kwargs["aws_access_key_id"] = "local"
            kwargs["aws_secret_access_key"] = "local"
    elif region_name:
        kwargs["region_name"] = region_name
    return boto3.client("sagemaker-runtime", **kwargs)


def client(service: str, *, region_name: str | None = None, **kwargs):
    """Any other boto3 client (s3, sagemaker, cloudformation) in the given region."""
    if region_name:
        kwargs["region_name"] = region_name
    return boto3.client(service, **kwargs)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/prefix`` → ("bucket", "key/prefix")."""
    if not isinstance(uri, str) or not uri.startswith("s3://") or len(uri) <= 5:
        raise InvalidArgument(f"expected an s3://bucket/key URI, got {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise InvalidArgument(f"expected an s3://bucket/key URI, got {uri!r}")
    return bucket, key


def join_s3_uri(uri: str, *names: str) -> str:
    """``join_s3_uri("s3://b/run/", "parts", "x.jsonl")`` → "s3://b/run/parts/x.jsonl" (one slash
    between the parts, whether or not ``uri`` ends with one or has a key at all)."""
    bucket, key = split_s3_uri(uri)
    return f"s3://{bucket}/" + "/".join(p.strip("/") for p in (key, *names) if p.strip("/"))


def put_s3_object(s3, uri: str, body: bytes, content_type: str) -> None:
    bucket, key = split_s3_uri(uri)
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)


def read_s3_object(s3, uri: str) -> bytes | None:
    """The object's bytes, or None when there is none (yet); other S3 errors are raised."""
    bucket, key = split_s3_uri(uri)
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
