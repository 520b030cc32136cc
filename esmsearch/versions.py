"""Versioned index roots: immutable versions, an atomically swapped ``current`` pointer.

Layout (the blue-green switch of Qdrant/Milvus collection aliases, on a filesystem)::

    ROOT/versions/<version>/   immutable, each a complete index directory
    ROOT/current               symlink -> versions/<version>, replaced by rename(2)
    ROOT/.build.lock           held (flock) by the one build allowed at a time
    ROOT/.build.partial/       work directory of a build in progress (resumable)

``current`` is never edited in place: a new symlink is made beside it and renamed
over it, which POSIX guarantees atomic, so a reader sees the old or the new version
and never a mix. Every publishing rename is followed by an fsync of its directory
(``versions/`` after a version is moved in, ROOT after ``current`` is swapped), so a
power cut cannot bring back a ``current`` naming a version whose entry was lost.
Versions are never modified after publication; retention deletes whole old
versions but never the live one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esmsearch import fsutil
from esmsearch.errors import BuildLockedError, ConfigError, EsmsearchError, IndexFormatError, IndexNotFoundError
from esmsearch.store import MANIFEST, Index, Manifest, unit_float32

__all__ = [
    "BuildLockedError",
    "IndexRoot",
    "VerifyReport",
    "VersionInfo",
    "verify_index",
]

log = logging.getLogger(__name__)

VERSIONS = "versions"
CURRENT = "current"
LOCK = ".build.lock"


@dataclass(frozen=True)
class VersionInfo:
    """One published version of a root."""

    version: str
    path: Path
    count: int
    built_at: str
    model_name: str
    is_current: bool


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify_index` (raised as IndexFormatError when it fails)."""

    count: int
    sampled: int
    self_hits_at_rank1: int


def verify_index(
    path: str | os.PathLike[str], *, sample: int = 64, seed: int = 0, checksums: bool = True
) -> VerifyReport:
    """Check an index version before it is published.

    Checks: manifest readable; every file's sha256 equals the manifest's (with
    ``checksums``; a build that has just computed them, :meth:`IndexWriter.finish`,
    passes False so that no file is hashed twice); row
    counts of FAISS, metadata and embeddings equal the manifest count; decoys (if
    any) are finite unit vectors of the index's dimension; and a self-search:
    ``sample`` stored vectors (seeded choice) are searched and each must come
    back at rank 1 -- as itself, or as a row with an identical vector
    (identical sequences under different record ids tie). Exact (``Flat``) indexes
    must pass for every sampled row; approximate ones (IVF, HNSW, PQ) for at least
    90% of them, since compression can legitimately reorder near-ties.

    The index is opened memory-mapped (``Index.open(mmap=True)``): the FAISS index
    and the decoys are searched and read from the page cache, not copied to the heap.

    Raises:
        IndexNotFoundError, IndexFormatError: with the reason.
    """
    with Index.open(path, verify=checksums, mmap=True) as index:
        n = index.count
        if n == 0:
            raise IndexFormatError(f"index {path} has no sequences")
        if index.null is not None:
            decoys = index.null.decoys
            norms = np.concatenate(  # in chunks: no float64 copy of all decoys at once
                [
                    np.linalg.norm(np.asarray(decoys[i : i + 4096], dtype=np.float64), axis=1)
                    for i in range(0, len(decoys), 4096)
                ]
            )
            bad = np.flatnonzero(~(np.abs(norms - 1.0) <= 1e-3))  # also catches NaN
            if bad.size:
                raise IndexFormatError(
                    f"index {path}: {bad.size} decoy vectors are not finite unit vectors (first: decoy {bad[0]})"
                )
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
        stored = index.embeddings()  # memory-mapped once (float32 or float16)
        vectors = unit_float32(stored[rows])
        scores, hits = index.search(vectors, 1)
        ok = 0
        for row, vec, hit, score in zip(rows, vectors, hits[:, 0], scores[:, 0], strict=True):
            if hit == row:
                ok += 1
            elif (
                hit >= 0
                and float(np.dot(vec, unit_float32(stored[hit : hit + 1])[0])) >= 1.0 - 1e-5
                and score >= 1.0 - 1e-3
            ):
                ok += 1
        exact = index.manifest.index_factory.replace(" ", "") in ("Flat", "IDMap,Flat")
        needed = len(rows) if exact else int(np.ceil(0.9 * len(rows)))
        if ok < needed:
            raise IndexFormatError(
                f"index {path} failed its self-search check: {ok} of {len(rows)} sampled sequences "
                f"found themselves at rank 1 (need {needed})"
            )
        return VerifyReport(count=n, sampled=len(rows), self_hits_at_rank1=ok)


class IndexRoot:
    """A directory of immutable index versions with an atomically swapped ``current``.

    Args:
        path: the root directory (created by :meth:`create` or the first build).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def versions_dir(self) -> Path:
        return self.path / VERSIONS

    @property
    def current_link(self) -> Path:
        return self.path / CURRENT

    @property
    def partial_dir(self) -> Path:
        return self.path / ".build.partial"

    @staticmethod
    def is_root(path: str | os.PathLike[str]) -> bool:
        """True if ``path`` looks like a versioned root (has ``versions/``, no manifest)."""
        p = Path(path)
        return (p / VERSIONS).is_dir() and not (p / MANIFEST).is_file()

    def create(self) -> None:
        """Create ``ROOT/versions/`` (and ROOT) if missing, durably."""
        if self.versions_dir.is_dir():
            return
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        fsutil.fsync_dir(self.path)

    # -- reading ------------------------------------------------------------------------------
    def current_version(self) -> str | None:
        """Version id ``current`` points to, or None before the first publish."""
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise IndexFormatError(f"{self.current_link} is not a symlink ({exc})") from exc
        return Path(target).name

    def current_path(self) -> Path:
        """Resolved directory of the live version.

        Raises:
            IndexNotFoundError: nothing published yet.
        """
        version = self.current_version()
        if version is None:
            raise IndexNotFoundError(f"no published index version in {self.path} (no {CURRENT} link)")
        return self.versions_dir / version

    def version_path(self, version: str) -> Path:
        path = self.versions_dir / version
        if not (path / MANIFEST).is_file():
            known = ", ".join(v.version for v in self.list_versions()) or "none"
            raise IndexNotFoundError(f"no version {version!r} in {self.path} (published: {known})")
        return path

    def list_versions(self) -> list[VersionInfo]:
        """Published versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        current = self.current_version()
        out = []
        for p in sorted(self.versions_dir.iterdir()):
            if p.name.startswith(".") or not (p / MANIFEST).is_file():
                continue
            try:
                m = Manifest.read(p)
            except EsmsearchError:
                continue
            out.append(VersionInfo(p.name, p, m.count, m.built_at, m.model_name, p.name == current))
        return out

    # -- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the root's build lock (non-blocking).

        Raises:
            BuildLockedError: another process holds it (its pid is in the message).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise BuildLockedError(
                    f"another build of {self.path} is running (lock {path} held by pid {holder}); "
                    "two rebuilds never run at once"
                ) from exc
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def add_version(self, built: Path, version: str) -> Path:
        """Move a finished, verified index directory into ``versions/<version>``, durably
        (``versions/`` is fsynced after the rename). ``current`` is not touched.

        Returns:
            The version's directory.

        Raises:
            IndexFormatError: the version already exists.
            OSError: the rename or the fsync failed.
        """
        self.create()
        dest = self.versions_dir / version
        if dest.exists():
            raise IndexFormatError(f"version {version} already exists in {self.path}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(built, 0o777 & ~umask)
        os.rename(built, dest)
        fsutil.fsync_dir(self.versions_dir)
        return dest

    def set_current(self, version: str) -> None:
        """Atomically and durably point ``current`` at ``versions/<version>``
        (new symlink beside it, ``rename(2)`` over it, fsync of the root).

        Raises:
            IndexNotFoundError: no such version.
            OSError: the symlink, rename or fsync failed (if the rename failed,
                ``current`` is unchanged).
        """
        self.version_path(version)
        tmp = self.path / f".{CURRENT}.{uuid.uuid4().hex[:8]}"
        os.symlink(Path(VERSIONS) / version, tmp)
        try:
            os.replace(tmp, self.current_link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsutil.fsync_dir(self.path)
        log.info("%s: current -> %s", self.path, version)

    def rollback(self, version: str | None = None) -> str:
        """Point ``current`` at ``version``, or at the newest version older than the live one.

        Returns:
            The version now live.

        Raises:
            IndexNotFoundError: no such version, or no older version to roll back to.
        """
        if version is None:
            versions = [v.version for v in self.list_versions()]
            live = self.current_version()
            older = [v for v in versions if live is None or v < live]
            if not older:
                raise IndexNotFoundError(f"no version older than {live} in {self.path} to roll back to")
            version = older[-1]
        self.verify_version(version)
        self.set_current(version)
        return version

    def verify_version(self, version: str) -> VerifyReport:
        return verify_index(self.version_path(version))

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions; never the live one.

        Returns:
            The deleted version ids.

        Raises:
            ConfigError: ``keep`` < 1.
        """
        if keep < 1:
            raise ConfigError(f"keep must be >= 1 (the live version is never deleted), got {keep}")
        versions = self.list_versions()
        keep_set = {v.version for v in versions[-keep:]}
        live = self.current_version()
        deleted = []
        for v in versions:
            if v.version in keep_set or v.version == live:
                continue
            # Rename aside first so a crash never leaves a half-deleted version that looks whole.
            aside = self.versions_dir / f".deleting-{v.version}"
            os.rename(v.path, aside)
            fsutil.fsync_dir(self.versions_dir)
            shutil.rmtree(aside, ignore_errors=True)
            deleted.append(v.version)
        return deleted

    def describe(self) -> str:
        return json.dumps(
            {
                "root": str(self.path),
                "current": self.current_version(),
                "versions": [v.version for v in self.list_versions()],
            }
        )
