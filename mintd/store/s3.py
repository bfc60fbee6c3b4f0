"""Blobs in an S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, Ceph), read through a local disk cache.

Objects are named `<prefix><sha[:2]>/<sha>`, the local store's content-addressed names, so any number of
replicas share one bucket and a name never changes meaning. Endpoint, region and credentials come from
boto3's standard chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
AWS_DEFAULT_REGION, instance roles).

Writes: a PUT is atomic (the object appears whole or not at all) and carries the content's sha256 as its
S3 checksum, so the server refuses bytes that are not what the name says. Blobs above the multipart
threshold go up in parallel parts, each carrying a SHA256 checksum the server checks. Content already in
the bucket and written recently is not sent again; older content is sent again, which renews its age for
the collector's grace period. A save is written through to the local cache, since the replica that
saved a sampler checkpoint is the one most likely to sample it next.

Reads: `path()` serves the blob from the cache, downloading it when absent. The download is hashed as it
arrives and enters the cache only when it matches its name, so a corrupt or missing object fails only
the request that needed it (BlobCorrupt / BlobNotFound) and never poisons the cache.
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from mintd.store.blobs import _SHA, BlobNotFound, BlobUnavailable, Claim, check_sha, no_claim
from mintd.store.cache import BlobCache

MULTIPART_THRESHOLD = 64 * 2**20
_PART = 16 * 2**20
_CHUNK = 1 << 20
# Content this young is trusted to outlive a concurrent collection without being sent again.
REUSE_MAX_AGE_S = 300.0
_MISSING = {"404", "NoSuchKey", "NotFound"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://BUCKET/PREFIX` -> (bucket, prefix ending in '/' or empty)."""
    rest = url[len("s3://") :] if url.startswith("s3://") else ""
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"blob_url: {url!r} must look like s3://BUCKET or s3://BUCKET/PREFIX")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Blobs:
    def __init__(
        self,
        url: str,
        cache_root: Path | str,
        cache_budget: int,
        *,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        cache_in_use_s: float = 60.0,
    ) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.cache = BlobCache(cache_root, cache_budget, cache_in_use_s)
        self.multipart_threshold = multipart_threshold
        # boto3 clients are thread-safe; retries cover throttling and transient network errors.
        self._s3 = boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=_PART, max_concurrency=8
        )
        self._fetching: dict[str, threading.Lock] = {}
        self._fetching_lock = threading.Lock()

    def _key(self, sha: str) -> str:
        return f"{self.prefix}{sha[:2]}/{check_sha(sha)}"

    def _where(self, sha: str) -> str:
        return f"s3://{self.bucket}/{self._key(sha)}"

    def _failed(self, sha: str | None, exc: Exception) -> Exception:
        """botocore's errors as the store's: missing -> BlobNotFound, anything else -> BlobUnavailable."""
        code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
        if sha is not None and code in _MISSING:
            return BlobNotFound(f"blob {sha} not found ({self._where(sha)})")
        where = self._where(sha) if sha else f"s3://{self.bucket}/{self.prefix}"
        return BlobUnavailable(f"blob store {where}: {exc}")

    # writes ---------------------------------------------------------------------------------------

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data)
        sha = digest.hexdigest()
        if not self._recent(sha):
            if len(data) < self.multipart_threshold:
                self._put_object(sha, data, digest.digest())
            else:
                self._upload(sha, io.BytesIO(data))
        self.cache.add_bytes(sha, data)
        return sha

    def put_file(self, path: Path | str) -> str:
        sha, cached = self.cache.add_file(path)  # hashed once; the local copy is what gets sent
        if not self._recent(sha):
            if cached.stat().st_size < self.multipart_threshold:
                data = cached.read_bytes()
                self._put_object(sha, data, bytes.fromhex(sha))
            else:
                with cached.open("rb") as f:
                    self._upload(sha, f)
        return sha

    def _put_object(self, sha: str, data: bytes, digest: bytes) -> None:
        try:
            self._s3.put_object(
                Bucket=self.bucket,
                Key=self._key(sha),
                Body=data,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=base64.b64encode(digest).decode(),
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._failed(sha, exc) from None

    def _upload(self, sha: str, f: Any) -> None:
        """Multipart upload, parts in parallel, each part checksummed (SHA256) and checked by the server;
        the object becomes visible only when the upload completes."""
        try:
            self._s3.upload_fileobj(
                f,
                self.bucket,
                self._key(sha),
                ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                Config=self._transfer,
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._failed(sha, exc) from None

    def _recent(self, sha: str) -> bool:
        """The object exists and was written within REUSE_MAX_AGE_S (so need not be sent again)."""
        modified = self._modified(sha)
        return modified is not None and modified > time.time() - REUSE_MAX_AGE_S

    def _modified(self, sha: str) -> float | None:
        try:
            head = self._s3.head_object(Bucket=self.bucket, Key=self._key(sha))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") in _MISSING:
                return None
            raise self._failed(sha, exc) from None
        except BotoCoreError as exc:
            raise self._failed(sha, exc) from None
        return _timestamp(head["LastModified"])

    # reads ----------------------------------------------------------------------------------------

    def path(self, sha: str) -> Path:
        """A verified local copy in the cache (downloaded once, however many threads ask at once)."""
        check_sha(sha)
        cached = self.cache.lookup(sha)
        if cached is not None:
            return cached
        with self._fetching_lock:
            lock = self._fetching.setdefault(sha, threading.Lock())
        try:
            with lock:
                cached = self.cache.lookup(sha)
                if cached is not None:
                    return cached
                try:
                    body = self._s3.get_object(Bucket=self.bucket, Key=self._key(sha))["Body"]
                    with body:
                        return self.cache.add_stream(sha, body.iter_chunks(_CHUNK))
                except (ClientError, BotoCoreError) as exc:
                    raise self._failed(sha, exc) from None
                except ValueError as exc:  # BlobCorrupt from the cache: name the object
                    raise type(exc)(f"{exc} ({self._where(sha)} is corrupt)") from None
        finally:
            with self._fetching_lock:
                self._fetching.pop(sha, None)

    def read(self, sha: str, verify: bool = False) -> bytes:
        """The blob's bytes (verified when they entered the cache; `verify` re-hashes the cached copy)."""
        path = self.path(sha)
        if verify:
            self.cache.store.verify(sha)
        return path.read_bytes()

    def exists(self, sha: str) -> bool:
        return self.cache.lookup(sha) is not None or self._modified(sha) is not None

    # deletion and collection ----------------------------------------------------------------------

    def delete(self, sha: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(sha))
        except (ClientError, BotoCoreError) as exc:
            raise self._failed(sha, exc) from None
        self.cache.discard(sha)

    def _objects(self) -> Iterator[tuple[str, float]]:
        """(sha, last modified) of every blob under the prefix; foreign keys are skipped."""
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    folder, _, name = obj["Key"][len(self.prefix) :].partition("/")
                    if _SHA.match(name) and folder == name[:2]:
                        yield name, _timestamp(obj["LastModified"])
        except (ClientError, BotoCoreError) as exc:
            raise self._failed(None, exc) from None

    def iter_hashes(self) -> Iterator[str]:
        for sha, _ in self._objects():
            yield sha

    def stale(self, live: set[str], min_age_s: float = 3600.0) -> list[str]:
        cutoff = time.time() - min_age_s
        return [sha for sha, modified in self._objects() if sha not in live and modified <= cutoff]

    def gc(self, live: set[str], min_age_s: float = 3600.0, claim: Claim = no_claim) -> list[str]:
        """Delete unreferenced blobs older than `min_age_s`, each re-checked under `claim` just before its
        delete (the age from a fresh HEAD, not the listing), and abort multipart uploads left that long."""
        cutoff = time.time() - min_age_s
        removed = []
        for sha in self.stale(live, min_age_s):
            with claim(sha) as granted:
                modified = self._modified(sha) if granted else None
                if modified is not None and modified <= cutoff:
                    self.delete(sha)
                    removed.append(sha)
        self._abort_stale_uploads(cutoff)
        return removed

    def _abort_stale_uploads(self, cutoff: float) -> None:
        try:
            pages = self._s3.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    if _timestamp(upload["Initiated"]) <= cutoff:
                        self._s3.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
        except (ClientError, BotoCoreError) as exc:
            raise self._failed(None, exc) from None


def _timestamp(value: datetime) -> float:
    return value.timestamp()
