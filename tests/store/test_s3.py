"""The S3 blob store against a real S3 server (moto on loopback): the same boto3 calls real S3 gets.

Bytes round-trip and dedupe, large blobs go up multipart, reads verify content once as it enters the
byte-bounded cache, corrupt or missing objects fail only their own reads, and garbage collection by
several replicas at once keeps everything referenced, held by a save, or young.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest

from mintd.catalog import Catalog, CatalogDB, Provenance
from mintd.store.blobs import BlobCorrupt, BlobNotFound, Blobs, open_blobs
from mintd.store.s3 import S3Blobs, parse_s3_url

MiB = 2**20


def store(url: str, root: Path, budget: int = 64 * MiB, **kw: object) -> S3Blobs:
    return S3Blobs(url, root, budget, **kw)


def raw(url: str) -> tuple[object, str, str]:
    bucket, prefix = parse_s3_url(url)
    return boto3.client("s3"), bucket, prefix


def test_round_trip_dedupe_and_listing(s3_url: str, tmp_path: Path) -> None:
    a = store(s3_url, tmp_path / "a")
    assert isinstance(a, Blobs)
    sha = a.put(b"adapter bytes")
    assert sha == hashlib.sha256(b"adapter bytes").hexdigest()
    assert a.put(b"adapter bytes") == sha
    src = tmp_path / "file.bin"
    src.write_bytes(b"from a file")
    sha_file = a.put_file(src)
    assert sorted(a.iter_hashes()) == sorted([sha, sha_file])

    b = store(s3_url, tmp_path / "b")  # another replica: empty cache, same bucket
    assert b.exists(sha) and not b.exists("0" * 64)
    assert b.read(sha, verify=True) == b"adapter bytes"
    assert b.path(sha_file).read_bytes() == b"from a file"
    assert b.path(sha).parent.parent == tmp_path / "b"  # served from b's local cache
    client, bucket, prefix = raw(s3_url)
    head = client.head_object(Bucket=bucket, Key=f"{prefix}{sha[:2]}/{sha}", ChecksumMode="ENABLED")
    # the upload carried the content's sha256 as its S3 checksum (real S3 refuses a mismatch)
    assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(sha)).decode()


def test_open_blobs_picks_the_backend(s3_url: str, tmp_path: Path) -> None:
    assert isinstance(open_blobs(s3_url, tmp_path, MiB), S3Blobs)
    assert open_blobs(None, tmp_path, MiB).root == tmp_path / "blobs"
    with pytest.raises(ValueError, match="^blob_url:"):
        open_blobs("gs://bucket/x", tmp_path, MiB)
    with pytest.raises(ValueError, match="^blob_url:"):
        parse_s3_url("s3:///nobucket")


def test_large_blobs_go_up_multipart(s3_url: str, tmp_path: Path) -> None:
    data = os.urandom(40 * MiB)
    a = store(s3_url, tmp_path / "a", budget=128 * MiB, multipart_threshold=8 * MiB)
    sha = a.put(data)
    client, bucket, prefix = raw(s3_url)
    etag = client.head_object(Bucket=bucket, Key=f"{prefix}{sha[:2]}/{sha}")["ETag"]
    assert etag.strip('"').endswith("-3")  # three 16 MiB parts
    b = store(s3_url, tmp_path / "b", budget=128 * MiB)
    assert hashlib.sha256(b.read(sha)).hexdigest() == sha


def test_corrupt_and_missing_objects_fail_only_their_own_reads(s3_url: str, tmp_path: Path) -> None:
    writer = store(s3_url, tmp_path / "w")
    good, bad = writer.put(b"good"), writer.put(b"will be damaged")
    client, bucket, prefix = raw(s3_url)
    client.put_object(Bucket=bucket, Key=f"{prefix}{bad[:2]}/{bad}", Body=b"damaged!")
    reader = store(s3_url, tmp_path / "r")
    with pytest.raises(BlobCorrupt, match=f"{bad}.*s3://{bucket}/{prefix}{bad[:2]}/{bad} is corrupt"):
        reader.path(bad)
    assert list(reader.cache.store.iter_hashes()) == []  # nothing unverified entered the cache
    with pytest.raises(BlobNotFound, match="0{64} not found"):
        reader.path("0" * 64)
    assert reader.read(good) == b"good"


def test_cache_stays_within_its_byte_budget_evicting_least_recently_used(s3_url: str, tmp_path: Path) -> None:
    writer = store(s3_url, tmp_path / "w")
    blobs = [writer.put(bytes([i]) * MiB) for i in range(5)]
    reader = store(s3_url, tmp_path / "r", budget=3 * MiB, cache_in_use_s=0)
    for sha in blobs[:3]:
        reader.path(sha)
    reader.path(blobs[0])  # used again: now blobs[1] is the least recently used
    reader.path(blobs[3])
    cached = set(reader.cache.store.iter_hashes())
    assert cached == {blobs[0], blobs[2], blobs[3]}
    assert reader.cache.bytes == 3 * MiB
    reader.path(blobs[4])
    assert reader.cache.bytes <= 3 * MiB and blobs[4] in set(reader.cache.store.iter_hashes())
    again = store(s3_url, tmp_path / "r", budget=2 * MiB)  # a restart with a smaller budget
    assert again.cache.bytes == 2 * MiB


PROV = Provenance(base_fingerprint="fp", lora_config={"rank": 4})


def test_gc_by_two_replicas_at_once_keeps_referenced_held_and_young_blobs(
    s3_url: str, pg_url: str, tmp_path: Path
) -> None:
    replicas = [(Catalog(CatalogDB(pg_url)), store(s3_url, tmp_path / f"r{k}")) for k in range(2)]
    cat, blobs = replicas[0]
    referenced = blobs.put(b"referenced")
    cat.register_revision("alice", "pol", referenced, "sampler", provenance=PROV)
    garbage = [blobs.put(f"garbage {i}".encode()) for i in range(6)]
    held = blobs.put(b"being saved right now")

    # A save in progress on replica 0: its blob is stored but its revision not yet committed.
    holding, release = threading.Event(), threading.Event()

    def save() -> None:
        with cat.hold_blob(held):
            holding.set()
            release.wait(30)

    saver = threading.Thread(target=save)
    saver.start()
    holding.wait(30)

    removed: list[list[str]] = [[], []]

    def collect(k: int) -> None:
        c, b = replicas[k]
        removed[k] = b.gc(c.referenced_hashes(), min_age_s=0, claim=c.claim_blob)

    threads = [threading.Thread(target=collect, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    release.set()
    saver.join()

    assert sorted(removed[0] + removed[1]) == sorted(garbage)  # each deleted once, by one of them
    left = set(replicas[1][1].iter_hashes())
    assert left == {referenced, held}
    assert replicas[1][1].read(referenced) == b"referenced"
    young = blobs.put(b"young")
    assert blobs.gc(set(), min_age_s=3600, claim=cat.claim_blob) == []
    assert young in set(blobs.iter_hashes())
    for c, _ in replicas:
        c.db.dispose()


def test_a_revision_registered_between_listing_and_delete_is_kept(
    s3_url: str, pg_url: str, tmp_path: Path
) -> None:
    cat, blobs = Catalog(CatalogDB(pg_url)), store(s3_url, tmp_path / "r")
    sha = blobs.put(b"registered late")

    @contextmanager
    def late_claim(s: str):
        # another replica registers the blob after the collector's listing, before its delete
        cat.register_revision("bob", "pol", s, "sampler", provenance=PROV)
        with cat.claim_blob(s) as granted:
            yield granted

    assert blobs.gc(set(), min_age_s=0, claim=late_claim) == []
    assert blobs.read(sha) == b"registered late"
    cat.db.dispose()
