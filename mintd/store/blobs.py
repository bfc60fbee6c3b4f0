"""Content-addressed blobs: immutable byte strings named by their sha256.

A blob's name is its content's hash, so identical content is stored once, a name never changes
meaning, and any reader can verify what it got. The catalog records which blobs a revision uses;
this layer only stores bytes and collects the ones nothing references any more.

`BlobStore` keeps them under a local folder as `<root>/<first two hex digits>/<sha256>`. A write goes to
a temporary file in the blob's own folder, is fsynced, renamed into place and the folder fsynced, so a
blob either exists whole or not at all, also after a crash; a leftover temporary file is never listed
as a blob and `gc` removes it once stale. `Blobs` is the interface every backend provides; `open_blobs`
picks one from a URL (a folder, or `s3://` for `mintd.store.s3`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

_SHA = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


class BlobNotFound(LookupError):
    pass


class BlobCorrupt(ValueError):
    pass


class BlobUnavailable(OSError):
    """The store could not be reached or refused the request (network, credentials, permissions)."""


# `claim(sha)` is entered around each deletion and yields whether it may go ahead: the catalog's
# cross-replica blob lock, taken without waiting, with the hash re-checked against the catalog inside it.
Claim = Callable[[str], AbstractContextManager[bool]]


def no_claim(_sha: str) -> AbstractContextManager[bool]:
    return nullcontext(True)


@runtime_checkable
class Blobs(Protocol):
    """What the rest of mintd needs from a blob backend."""

    def put(self, data: bytes) -> str:
        """Store `data` (once, whatever the number of calls); return its sha256 hex."""
        ...

    def put_file(self, path: Path | str) -> str:
        """Store a file's content without holding it in memory; return its sha256 hex."""
        ...

    def read(self, sha: str, verify: bool = False) -> bytes:
        """The blob's bytes; `verify` re-hashes them. Raises BlobNotFound / BlobCorrupt."""
        ...

    def exists(self, sha: str) -> bool: ...

    def path(self, sha: str) -> Path:
        """A local file holding the blob, to memory-map (a remote backend would serve it from a cache)."""
        ...

    def delete(self, sha: str) -> None:
        """Remove a blob; removing one that is absent is not an error (so retries are safe)."""
        ...

    def iter_hashes(self) -> Iterator[str]: ...

    def stale(self, live: set[str], min_age_s: float = 3600.0) -> list[str]:
        """Blobs not in `live` and older than `min_age_s`: what `gc` would delete (a dry run)."""
        ...

    def gc(self, live: set[str], min_age_s: float = 3600.0, claim: Claim = no_claim) -> list[str]:
        """Delete the stale blobs that `claim` grants, each re-checked for age just before; return them."""
        ...


def open_blobs(url: str | None, data_dir: Path, cache_budget: int) -> Blobs:
    """The blob store a URL names: unset (`<data_dir>/blobs`), a folder, or `s3://BUCKET/PREFIX` read
    through a disk cache of `cache_budget` bytes under `<data_dir>/blob-cache`."""
    if url is None:
        return BlobStore(Path(data_dir) / "blobs")
    if url.startswith("s3://"):
        from mintd.store.s3 import S3Blobs  # boto3 only when a bucket is used

        return S3Blobs(url, Path(data_dir) / "blob-cache", cache_budget)
    if "://" in url:
        raise ValueError(f"blob_url: {url!r} must be a local folder or s3://BUCKET/PREFIX")
    return BlobStore(url)


def check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA.match(sha):
        raise ValueError(f"blob: {sha!r} is not a sha256 hex digest (64 lowercase hex digits)")
    return sha


def _fsync_dir(path: Path) -> None:
    """Persist a folder's entries (a rename or a new child), not only the files' contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Local-disk `Blobs`.

    Blobs younger than `gc`'s `min_age_s` are never collected: a writer puts a blob before the catalog
    records it, and the grace period keeps a collection running in between from deleting it. A `put`
    of content already present refreshes its modification time for the same reason; a lock makes that
    refresh and gc's age check + delete exclusive within this process (one store per data dir).
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, sha: str) -> Path:
        """Where the blob lives (whether or not it exists); memory-map it from here."""
        check_sha(sha)
        return self.root / sha[:2] / sha

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def _folder(self, sha: str) -> Path:
        folder = self.root / sha[:2]
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            _fsync_dir(self.root)
        return folder

    def _touch(self, sha: str) -> bool:
        """Refresh an existing blob's age (see the class doc); False when there is none."""
        with self._lock:
            try:
                os.utime(self.path(sha))
            except FileNotFoundError:
                return False
            return True

    def _commit(self, tmp: Path, sha: str) -> str:
        """Move a complete, fsynced temporary file into place (or drop it when the blob exists)."""
        if self._touch(sha):
            tmp.unlink()
            return sha
        final = self.path(sha)
        os.replace(tmp, final)  # same content whoever wins a race, so replacing is harmless
        _fsync_dir(final.parent)
        return sha

    def _temp(self, folder: Path) -> tuple[BinaryIO, Path]:
        fd, name = tempfile.mkstemp(dir=folder, prefix=_TMP_PREFIX)
        return os.fdopen(fd, "wb"), Path(name)

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self._touch(sha):
            return sha
        f, tmp = self._temp(self._folder(sha))
        try:
            with f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return self._commit(tmp, sha)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_file(self, path: Path | str) -> str:
        with Path(path).open("rb") as src:
            return self.put_stream(iter(lambda: src.read(_CHUNK), b""))

    def put_stream(self, chunks: Iterable[bytes], expect: str | None = None) -> str:
        """Copy and hash in one pass. The temporary file sits at the root until its name is known; with
        `expect`, content whose hash differs raises BlobCorrupt and is never stored."""
        h = hashlib.sha256()
        f, tmp = self._temp(self.root)
        try:
            with f:
                for chunk in chunks:
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            sha = h.hexdigest()
            if expect is not None and sha != expect:
                raise BlobCorrupt(f"blob {expect}: received content whose sha256 is {sha}")
            moved = self._folder(sha) / tmp.name
            os.replace(tmp, moved)
            tmp = moved
            return self._commit(tmp, sha)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def open(self, sha: str) -> BinaryIO:
        try:
            return self.path(sha).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(f"blob {sha} not found") from None

    def read(self, sha: str, verify: bool = False) -> bytes:
        with self.open(sha) as f:
            data = f.read()
        if verify and hashlib.sha256(data).hexdigest() != sha:
            raise BlobCorrupt(f"blob {sha}: content does not match its hash (corrupt on disk)")
        return data

    def verify(self, sha: str) -> None:
        """Re-hash a blob from disk without holding it in memory; raise BlobCorrupt on a mismatch."""
        with self.open(sha) as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != sha:
            raise BlobCorrupt(f"blob {sha}: content does not match its hash (corrupt on disk)")

    def delete(self, sha: str) -> None:
        path = self.path(sha)
        if path.is_file():
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)

    def iter_hashes(self) -> Iterator[str]:
        """Every stored blob; temporary files and foreign files are skipped."""
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or len(folder.name) != 2:
                continue
            for path in sorted(folder.iterdir()):
                if _SHA.match(path.name) and path.name[:2] == folder.name and path.is_file():
                    yield path.name

    def stale(self, live: set[str], min_age_s: float = 3600.0) -> list[str]:
        cutoff = time.time() - min_age_s
        return [sha for sha in self.iter_hashes() if sha not in live and _older(self.path(sha), cutoff)]

    def gc(self, live: set[str], min_age_s: float = 3600.0, claim: Claim = no_claim) -> list[str]:
        """Delete unreferenced blobs and stale temporary files, both only when older than `min_age_s`."""
        cutoff = time.time() - min_age_s
        removed = []
        for sha in self.stale(live, min_age_s):
            with claim(sha) as granted, self._lock:
                if granted and _older(self.path(sha), cutoff):
                    self.delete(sha)
                    removed.append(sha)
        for tmp in [*self.root.glob(f"{_TMP_PREFIX}*"), *self.root.glob(f"??/{_TMP_PREFIX}*")]:
            if _older(tmp, cutoff):
                tmp.unlink(missing_ok=True)
        return removed


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime <= cutoff
    except FileNotFoundError:  # removed concurrently: nothing left to collect
        return False
