"""Outputs in an S3-compatible bucket: ``diffserve serve --output-storage s3://bucket/prefix``.

Objects are ``<prefix>/images/<name>`` and ``<prefix>/videos/<name>`` (the names of
`diffserve.server.outputs`), written whole with PutObject. Clients never get the bucket's credentials: the
server's ``/outputs/images/<name>`` and ``/v1/videos/<id>/content`` answer a 307 redirect to a presigned GET
URL minted at that moment and valid for ``url_ttl_s`` (15 minutes, never beyond the job TTL). Minting at
download time, rather than putting a presigned URL in the response, keeps a ``url`` image usable for the
whole job TTL: a presigned URL dies with the credentials that signed it (temporary credentials last hours)
and SigV4 caps it at 7 days, while the server's URL is signed afresh at each download.

Endpoint, region and credentials come from boto3's usual sources (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL_S3``, instance roles), and ``--s3-endpoint-url`` for other S3-compatible services (MinIO,
R2, Ceph; path-style addressing is then used). `check` (HeadBucket and a one-key listing) runs before the
server starts, so a missing bucket or refused credentials stop it with one line.

At start-up the prefix is listed (paginated) to index what a previous run left. `sweep` lists the prefix
(at most every 10 minutes; between, it expires what the index holds) and deletes, in batches of 1000, every
output object older than the TTL, including any the index does not know (a delete that failed earlier); the
quota counts the indexed objects' sizes, oldest removed first.
One server per prefix: another server's objects under the same prefix would be expired and counted too.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from diffserve.errors import UserError
from diffserve.server.outputs import KINDS, NAMES, Found, Location, OutputStore, OutputStoreError, media_type

URL_TTL_S = 900.0  # life of a presigned download URL (minted when the client asks for the file)
DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys
LIST_EVERY_S = 600.0  # a sweep lists the whole prefix at most this often; between, it expires from the index

log = logging.getLogger("diffserve.server")


@dataclass(frozen=True)
class S3Target:
    """A bucket and a key prefix ("" or ending in "/")."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_s3_url(url: str) -> S3Target:
    """``s3://bucket`` or ``s3://bucket/some/prefix`` -> S3Target (UserError, one line, for anything else)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "s3":
        raise UserError(f"--output-storage {url!r} is not accepted: give s3://BUCKET or s3://BUCKET/PREFIX "
                        "(leave it out to keep outputs in --output-dir)")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise UserError(f"--output-storage {url!r} names no bucket: give s3://BUCKET or s3://BUCKET/PREFIX")
    if not (3 <= len(bucket) <= 63) or not all(c.isascii() and (c.isalnum() or c in ".-_") for c in bucket):
        raise UserError(f"--output-storage {url!r}: {bucket!r} is not a bucket name (3 to 63 letters, digits, "
                        "'.', '-' or '_')")
    prefix = "/".join(p for p in prefix.split("/") if p)
    return S3Target(bucket=bucket, prefix=f"{prefix}/" if prefix else "")


def require_boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise UserError("--output-storage s3://... needs boto3, which is not installed: "
                        "pip install 'diffserve[s3]' (or pip install boto3)") from None
    return boto3


@functools.cache
def _service_loader() -> Any:
    """botocore's reader of service descriptions, shared: reading S3's costs about 0.2 s per client."""
    import botocore.loaders

    return botocore.loaders.create_loader()


def _reason(error: Exception) -> str:
    """A botocore error in a few words: the S3 error code and message, or the exception's text."""
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response["Error"]
        code = err.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{code}: {err.get('Message') or 'no message'}"
    return f"{type(error).__name__}: {error}"


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None


class S3OutputStore(OutputStore):
    """Outputs as objects under one bucket prefix, downloaded by clients through presigned URLs."""

    def __init__(self, target: S3Target, *, endpoint_url: str | None, ttl_s: float, quota_bytes: int,
                 on_evict: Callable[[str, str], None] | None = None, url_ttl_s: float = URL_TTL_S,
                 list_page_size: int = 1000, attempts: int = 3, list_every_s: float = LIST_EVERY_S) -> None:
        super().__init__(ttl_s=ttl_s, quota_bytes=quota_bytes, on_evict=on_evict)
        self.target = target
        self.endpoint_url = endpoint_url
        self.list_page_size = list_page_size  # keys per ListObjectsV2 page (S3 gives at most 1000)
        self.attempts = attempts  # tries of each request (botocore's standard retries, with backoff)
        self.list_every_s = list_every_s
        self._listed_at: float | None = None  # when a sweep last listed the prefix (time.monotonic())
        self.url_ttl_s = max(1, int(min(url_ttl_s, ttl_s)))
        self._client = self._make_client(region=None)

    def _make_client(self, region: str | None) -> Any:
        boto3 = require_boto3()
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        s3 = {"addressing_style": "path"} if self.endpoint_url else {}
        config = Config(signature_version="s3v4", s3=s3, connect_timeout=5, read_timeout=60,
                        retries={"max_attempts": self.attempts, "mode": "standard"})
        try:
            core = botocore.session.get_session()  # a session of its own: credentials are looked up afresh
            core.register_component("data_loader", _service_loader())
            return boto3.session.Session(botocore_session=core).client(
                "s3", endpoint_url=self.endpoint_url, region_name=region, config=config)
        except (BotoCoreError, ValueError) as e:  # a bad AWS_PROFILE, region or endpoint
            raise UserError(f"--output-storage {self.target.url}: cannot set up the S3 client ({_reason(e)})") \
                from None

    def describe(self) -> str:
        return self.target.url + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def key(self, kind: str, name: str) -> str:
        return f"{self.target.prefix}{kind}/{name}"

    def check(self) -> None:
        """HeadBucket, then list one key of the prefix: a missing bucket, refused credentials or an
        unreachable endpoint is a UserError naming the bucket, before the server starts."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = self.describe()
        try:
            head = self._client.head_bucket(Bucket=self.target.bucket)
            region = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
            if self.endpoint_url is None and region and region != self._client.meta.region_name:
                self._client = self._make_client(region)  # presigned URLs must name the bucket's region
            self._client.list_objects_v2(Bucket=self.target.bucket, Prefix=self.target.prefix, MaxKeys=1)
        except NoCredentialsError:
            raise UserError(f"--output-storage {where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from None
        except ClientError as e:
            status = _status(e)
            if status == 404:
                raise UserError(f"--output-storage {where}: bucket {self.target.bucket!r} does not exist") from None
            if status in (401, 403):
                raise UserError(f"--output-storage {where}: access refused ({_reason(e)}); check the AWS "
                                "credentials and that they may read and write the bucket") from None
            raise UserError(f"--output-storage {where}: the bucket cannot be used ({_reason(e)})") from None
        except BotoCoreError as e:
            raise UserError(f"--output-storage {where}: cannot reach the storage ({_reason(e)})") from None

    def _list(self) -> Iterator[tuple[str, str, float, int]]:
        """(kind, name, last modified, size) of every output object under the prefix, page by page."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.target.bucket, Prefix=self.target.prefix, PaginationConfig={"PageSize": self.list_page_size})
        for page in pages:
            for obj in page.get("Contents", []):
                kind, _, name = obj["Key"][len(self.target.prefix):].partition("/")
                if kind in KINDS and NAMES[kind].match(name):
                    yield kind, name, obj["LastModified"].timestamp(), int(obj["Size"])

    def _scan(self) -> list[Found]:
        return [(mtime, kind, name, size) for kind, name, mtime, size in self._list()]

    def _put(self, kind: str, name: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.key(kind, name)
        try:
            self._client.put_object(Bucket=self.target.bucket, Key=key, Body=data, ContentType=media_type(name))
        except (BotoCoreError, ClientError) as e:
            raise OutputStoreError(f"storing s3://{self.target.bucket}/{key} failed ({_reason(e)})") from None

    def _delete(self, kind: str, name: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(Bucket=self.target.bucket, Key=self.key(kind, name))
        except (BotoCoreError, ClientError) as e:  # the sweep deletes it once it has expired
            log.warning("deleting %s/%s from %s failed (%s); the sweep removes it later", kind, name,
                        self.target.url, _reason(e))

    def _locate(self, kind: str, name: str, filename: str | None) -> Location | None:
        params = {"Bucket": self.target.bucket, "Key": self.key(kind, name)}
        if filename is not None:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return str(self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=self.url_ttl_s))

    def sweep(self, now: float | None = None) -> int:
        """Delete every output object under the prefix older than the TTL (indexed or not); how many. Within
        ``list_every_s`` of the last listing, only the indexed ones (no listing)."""
        if self._listed_at is not None and time.monotonic() - self._listed_at < self.list_every_s:
            return super().sweep(now)
        self._listed_at = time.monotonic()
        cutoff = (time.time() if now is None else now) - self.ttl_s
        expired = [(kind, name) for kind, name, mtime, _ in self._list() if mtime <= cutoff]
        for kind, name in expired + self._expired(cutoff):
            self._forget(kind, name)
        for start in range(0, len(expired), DELETE_BATCH):
            batch = expired[start:start + DELETE_BATCH]
            result = self._client.delete_objects(Bucket=self.target.bucket, Delete={
                "Objects": [{"Key": self.key(kind, name)} for kind, name in batch], "Quiet": True})
            for err in result.get("Errors", []):
                log.warning("expiring %s failed (%s: %s)", err.get("Key"), err.get("Code"), err.get("Message"))
        return len(expired)
