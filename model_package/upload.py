"""Upload the archive to S3: multipart, a SHA-256 checksum per part, and a check of what S3 stored."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from tqdm.auto import tqdm

from .build import PackageError

PART_SIZE = 64 * 1024 * 1024  # S3 allows 5 MiB to 5 GiB per part, 10,000 parts


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:] or uri.endswith("/"):
        raise PackageError(f"expected s3://bucket/key, got {uri!r}")
    bucket, key = uri[5:].split("/", 1)
    return bucket, key


def upload(path: str | os.PathLike, uri: str, *, s3=None, part_size: int = PART_SIZE) -> str:
    """Upload ``path`` to ``uri``; raise ``PackageError`` if S3's checksum differs from ours."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3_uri(uri)
    s3 = s3 or boto3.client("s3")
    path = Path(path)
    size = path.stat().st_size
    upload_id = None
    try:
        upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256")["UploadId"]
        parts, digests = [], []
        with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"s3://{bucket}/{key}",
                                         disable=None if size > part_size else True) as bar:  # fmt: skip
            number = 1
            while True:
                block = f.read(part_size)
                if not block and number > 1:
                    break
                digest = hashlib.sha256(block).digest()
                checksum = base64.b64encode(digest).decode()
                answer = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=block,
                                        ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum)  # fmt: skip
                parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum})
                digests.append((digest, hashlib.md5(block).digest()))
                bar.update(len(block))
                number += 1
                if len(block) < part_size:
                    break
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
        upload_id = None
        _verify(s3, bucket, key, size, digests)
    except (BotoCoreError, ClientError) as exc:
        if upload_id is not None:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise PackageError(f"upload to {uri} failed: {exc}") from None
    return f"s3://{bucket}/{key}"


def _verify(s3, bucket: str, key: str, size: int, digests: list[tuple[bytes, bytes]]) -> None:
    """Compare S3's composite checksums (checksum of the part checksums, ``-N``) with ours."""
    head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    n = len(digests)
    if head["ContentLength"] != size:
        raise PackageError(f"s3://{bucket}/{key} holds {head['ContentLength']} bytes, expected {size}")
    etag = head.get("ETag", "").strip('"')
    expected_etag = hashlib.md5(b"".join(m for _, m in digests)).hexdigest() + f"-{n}"
    if etag and etag != expected_etag:
        raise PackageError(f"s3://{bucket}/{key} ETag {etag} differs from the uploaded parts' {expected_etag}")
    stored = head.get("ChecksumSHA256")
    if stored:
        expected = base64.b64encode(hashlib.sha256(b"".join(d for d, _ in digests)).digest()).decode()
        if stored.split("-")[0] != expected:
            raise PackageError(f"s3://{bucket}/{key} SHA-256 checksum {stored} differs from ours {expected}-{n}")
