"""Blobs are stored once under their sha256, appear whole or not at all, and gc keeps what is live."""

import hashlib
import os
import threading
import time

import pytest

from mintd.store.blobs import BlobCorrupt, BlobNotFound, Blobs, BlobStore


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def _files(store: BlobStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())


def test_put_read_and_layout(store):
    sha = store.put(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert store.path(sha) == store.root / sha[:2] / sha
    assert store.read(sha, verify=True) == b"hello"
    with store.open(sha) as f:
        assert f.read() == b"hello"
    assert store.exists(sha) and list(store.iter_hashes()) == [sha]
    assert isinstance(store, Blobs)


def test_identical_content_is_stored_once(store, tmp_path):
    first = store.put(b"same bytes")
    mtime = store.path(first).stat().st_mtime_ns
    os.utime(store.path(first), ns=(mtime - 10**10, mtime - 10**10))
    assert store.put(b"same bytes") == first
    source = tmp_path / "file.bin"
    source.write_bytes(b"same bytes")
    assert store.put_file(source) == first
    assert _files(store) == [f"{first[:2]}/{first}"]
    assert store.path(first).stat().st_mtime_ns >= mtime  # a re-put refreshes the blob's age


def test_put_file_streams_large_content(store, tmp_path):
    data = os.urandom(3 << 20)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    sha = store.put_file(source)
    assert sha == hashlib.sha256(data).hexdigest() and store.read(sha) == data
    assert _files(store) == [f"{sha[:2]}/{sha}"]  # no temporary file left behind


def test_leftover_temp_file_is_never_a_blob(store):
    sha = store.put(b"real")
    crash = store.root / sha[:2] / ".tmp-crashed"
    crash.write_bytes(b"half a blob")
    (store.root / ".tmp-root").write_bytes(b"half")
    (store.root / sha[:2] / ("0" * 64)).write_bytes(b"misplaced: wrong folder for its name")
    assert list(store.iter_hashes()) == [sha]
    assert store.gc({sha}, min_age_s=3600) == []
    assert crash.exists()  # a recent temp file may belong to a put in progress
    old = time.time() - 7200
    for p in (crash, store.root / ".tmp-root"):
        os.utime(p, (old, old))
    store.gc({sha}, min_age_s=3600)
    assert not crash.exists() and not (store.root / ".tmp-root").exists()
    assert store.exists(sha)


def test_failed_write_leaves_nothing(store, monkeypatch):
    def broken(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk on fire"):
        store.put(b"never stored")
    monkeypatch.undo()
    assert _files(store) == []


def test_gc_keeps_live_and_young_blobs(store):
    live, dead, young = store.put(b"live"), store.put(b"dead"), store.put(b"young")
    old = time.time() - 7200
    for sha in (live, dead):
        os.utime(store.path(sha), (old, old))
    assert store.gc({live}, min_age_s=3600) == [dead]
    assert sorted(store.iter_hashes()) == sorted([live, young])
    assert store.gc(set(), min_age_s=0) == sorted([live, young])
    assert list(store.iter_hashes()) == []


def test_delete_is_idempotent_and_missing_blobs_raise(store):
    sha = store.put(b"x")
    store.delete(sha)
    store.delete(sha)
    assert not store.exists(sha)
    with pytest.raises(BlobNotFound, match=sha):
        store.read(sha)


def test_corruption_is_caught_on_verify(store):
    sha = store.put(b"original")
    store.path(sha).write_bytes(b"tampered")
    assert store.read(sha) == b"tampered"  # unverified reads trust the name
    with pytest.raises(BlobCorrupt, match="does not match its hash"):
        store.read(sha, verify=True)
    with pytest.raises(BlobCorrupt, match="does not match its hash"):
        store.verify(sha)


def test_bad_hash_is_refused(store):
    for bad in ("", "abc", "A" * 64, "../" + "0" * 61):
        with pytest.raises(ValueError, match="not a sha256"):
            store.path(bad)


def test_concurrent_puts_of_the_same_content(store):
    data = os.urandom(1 << 20)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def put() -> None:
        barrier.wait()
        results.append(store.put(data))

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sha = hashlib.sha256(data).hexdigest()
    assert results == [sha] * 8
    assert _files(store) == [f"{sha[:2]}/{sha}"]
    assert store.read(sha, verify=True) == data
