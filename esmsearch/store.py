"""The index directory format: write atomically, open, verify.

One index version is a directory::

    manifest.json     the contract between indexer and server (see :class:`Manifest`)
    index.faiss       FAISS index over the vectors, row i = database sequence i
    index.ivfdata     (only for IVF indexes built with on-disk inverted lists) the lists
                      that ``index.faiss`` maps; FAISS ``OnDiskInvertedLists``
    embeddings.npy    [count, dim] in the manifest's ``store_dtype`` (float32, or float16
                      at half the size), L2-normalised (kept for rebuilds)
    metadata.sqlite   table ``sequences(row, record_id, description, length, sha256)``
    decoys.npy        float32 [decoys.count, dim], L2-normalised embeddings of shuffled
                      database sequences, for E-values (:mod:`esmsearch.significance`);
                      absent when the manifest's ``decoys`` is null (indexes built
                      before E-values existed, or with ``--decoys 0``)

:class:`IndexWriter` writes into a temporary sibling directory and renames it into
place only after every file is written, fsynced, checksummed and re-opened: an
interrupted or failed build leaves nothing at the destination and an existing
index there untouched. :func:`publish_directory` fsyncs the parent after the rename
and replaces an existing index by an atomic ``renameat2(RENAME_EXCHANGE)``, so the
destination holds the whole old or the whole new index at every instant (with a
logged fallback to rename-aside where the filesystem cannot exchange).

The metadata database is opened read-only through a percent-encoded SQLite URI
(:func:`esmsearch.fsutil.sqlite_uri`), so directories named with ``?``, ``#`` or
``%`` work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from esmsearch import fsutil
from esmsearch.errors import EsmsearchError, EvaluesUnavailableError, IndexFormatError, IndexNotFoundError
from esmsearch.significance import DECOYS_FILE, DecoyNull, DecoySettings, check_decoy_vectors

__all__ = [
    "DECOYS_FILE",
    "FORMAT_VERSION",
    "MANIFEST",
    "PRECISIONS",
    "STORE_DTYPES",
    "Index",
    "IndexWriter",
    "Manifest",
    "MetadataReader",
    "Target",
    "new_version_id",
    "publish_directory",
    "unit_float32",
]

#: Version of the on-disk layout written by this esmsearch; bumped on incompatible
#: changes. 2: the top-level ``precision`` field is part of the contract (an older
#: server, which ignores it, would embed queries at fp32 for a bf16 index: it must refuse).
FORMAT_VERSION = 2
#: Versions this esmsearch reads (1: written before ``precision`` was top-level; read as
#: the ``build.precision`` it recorded, else fp32).
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
FAISS_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.npy"
METADATA_FILE = "metadata.sqlite"
DATA_FILES = (FAISS_FILE, EMBEDDINGS_FILE, METADATA_FILE)
#: On-disk inverted lists of an IVF index (beside ``index.faiss``, which maps them);
#: present, checksummed and listed in the manifest only when the build wrote them
#: (:func:`esmsearch.vector_index.build_out_of_core` names it after the index file).
IVFDATA_FILE = "index.ivfdata"
#: dtypes ``embeddings.npy`` may be stored in (``Manifest.store_dtype``). float16 halves
#: the file (10 significant bits: a stored vector's cosine to its float32 original is
#: >= 0.99999 at ESM-2 dims); readers cast to float32 and re-normalise (:func:`unit_float32`).
STORE_DTYPES: tuple[str, ...] = ("float32", "float16")
#: Resolved compute precisions a manifest may record (never ``auto``).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")

log = logging.getLogger(__name__)


def _check_precision(value: object, source: str) -> None:
    if value not in PRECISIONS:
        raise IndexFormatError(
            f"{source}: precision {value!r} is not one of {', '.join(PRECISIONS)} "
            "(a manifest records the resolved precision, never 'auto')"
        )


@dataclass(frozen=True)
class Manifest:
    """Contents of ``manifest.json``.

    Attributes:
        format_version: on-disk layout version (:data:`FORMAT_VERSION`).
        version: id of this index version (UTC build time + random suffix).
        model_name: model name (pretrained name, Hugging Face Hub id, or the checkpoint
            file stem / model directory name).
        model_source: what loads the model: pretrained name, Hub id, or absolute path
            of a ``.pt`` file or Hugging Face directory.
        checkpoint_sha256: sha256 of the model's weights file (fair-esm ``.pt``,
            ``model.safetensors`` or ``pytorch_model.bin``; sharded weights:
            :func:`esmsearch.hf_convert.weights_sha256`).
        layer: representation layer pooled (0 = token embeddings .. num_layers).
        pooling: ``mean_residues`` (mean over residue positions, no BOS/EOS/padding).
        normalisation: ``l2``.
        precision: resolved compute precision of the embeddings, one of
            :data:`PRECISIONS` (``fp32``, ``bf16``, ``fp16``, ``int8``; never ``auto``). Part of
            the contract: the server embeds queries at this precision, and a rebuild
            reuses vectors only from a version of equal precision. JSON: a top-level
            string, e.g. ``"precision": "bf16"``. Manifests written before the field
            existed are read as ``build.precision`` if present, else ``fp32``.
        metric: ``inner_product`` (= cosine on L2-normalised vectors; higher = closer).
        dim: embedding dimension.
        count: number of database sequences (rows).
        index_factory: FAISS index factory string.
        search_params: FAISS search-time parameters (``nprobe``, ``ef_search``) and, for
            indexes with lossy codes (PQ, SQ), ``k_factor``: candidates per hit re-ranked
            exactly against the stored embeddings.
        source_fasta: path of the source FASTA as given at build time.
        source_fasta_sha256: sha256 of the source FASTA file's bytes.
        files: file name -> sha256 of every data file.
        built_at: ISO-8601 UTC build time.
        tool_version: esmsearch version that built it.
        build: informative build statistics (seconds, residues/s, windowed sequences, ...).
        decoys: the decoy set behind the index's E-values (count, seed, method, block
            size; see :class:`~esmsearch.significance.DecoySettings`), stored in
            ``decoys.npy``; ``None`` (JSON ``null``, or no key in manifests written
            before E-values existed) = no decoys, so hits carry no E-values.
        model_source_kind: how ``model_source`` is loaded: ``fair-esm-pretrained``,
            ``fair-esm-checkpoint``, ``hf-directory`` or ``hf-hub``
            (:data:`esmsearch.embedding.SOURCE_KINDS`). Manifests written before the
            field existed are read with ``fair-esm-checkpoint`` for an absolute
            ``model_source`` and ``fair-esm-pretrained`` otherwise (the only two
            kinds then).
        store_dtype: dtype of ``embeddings.npy``, one of :data:`STORE_DTYPES` (``float32``
            or ``float16``); manifests written before the field existed are float32. It does
            not change the FAISS index (built from the vectors cast to float32 and
            re-normalised) nor query vectors, but a rebuild reuses float16 vectors only for
            a float16 store (see :func:`esmsearch.indexer.build.plan_reuse`).
    """

    format_version: int
    version: str
    model_name: str
    model_source: str
    checkpoint_sha256: str
    layer: int
    pooling: str
    normalisation: str
    precision: str
    metric: str
    dim: int
    count: int
    index_factory: str
    search_params: dict[str, Any]
    source_fasta: str
    source_fasta_sha256: str
    files: dict[str, str]
    built_at: str
    tool_version: str
    build: dict[str, Any] = field(default_factory=dict)
    decoys: DecoySettings | None = None
    model_source_kind: str = ""
    store_dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_precision(self.precision, "manifest")
        if self.store_dtype not in STORE_DTYPES:
            raise IndexFormatError(
                f"manifest: store_dtype {self.store_dtype!r} is not one of {', '.join(STORE_DTYPES)}"
            )
        if not self.model_source_kind:
            legacy = "fair-esm-checkpoint" if os.path.isabs(self.model_source) else "fair-esm-pretrained"
            object.__setattr__(self, "model_source_kind", legacy)

    @property
    def data_files(self) -> tuple[str, ...]:
        """The data files this version holds: :data:`DATA_FILES`, plus ``decoys.npy`` with
        decoys and ``index.ivfdata`` for an IVF built with on-disk inverted lists."""
        return (
            DATA_FILES
            + ((DECOYS_FILE,) if self.decoys is not None else ())
            + ((IVFDATA_FILE,) if IVFDATA_FILE in self.files else ())
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "manifest") -> Manifest:
        """Build from parsed JSON.

        A manifest without a top-level ``precision`` (written before it existed) is
        read with the precision its ``build`` statistics recorded, else ``fp32``
        (the only precision those versions could build by default).

        A manifest without ``decoys`` (written before E-values existed) is read with
        ``decoys=None``.

        Raises:
            IndexFormatError: missing keys, an unsupported format version, a
                precision outside :data:`PRECISIONS`, or a malformed ``decoys`` object.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        if "precision" not in data:
            build = data.get("build")
            legacy = build.get("precision") if isinstance(build, dict) else None
            data = {**data, "precision": legacy if legacy is not None else "fp32"}
        _check_precision(data["precision"], source)
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = required - data.keys()
        if missing:
            raise IndexFormatError(f"{source}: missing keys {sorted(missing)}")
        if data["format_version"] not in READABLE_FORMAT_VERSIONS:
            raise IndexFormatError(
                f"{source}: format version {data['format_version']} is not supported "
                f"(this esmsearch reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}); "
                "rebuild the index or upgrade esmsearch"
            )
        decoys = data.get("decoys")
        data = {**data, "decoys": None if decoys is None else DecoySettings.from_json(decoys, source=source)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> Manifest:
        """Read ``<directory>/manifest.json``.

        Raises:
            IndexNotFoundError: no manifest there.
            IndexFormatError: the manifest is not valid JSON or lacks keys.
        """
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise IndexNotFoundError(f"no esmsearch index at {directory}: {MANIFEST} not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"{path}: unreadable manifest ({exc})") from exc
        if not isinstance(data, dict):
            raise IndexFormatError(f"{path}: manifest is not a JSON object")
        return cls.from_dict(data, source=str(path))


@dataclass(frozen=True)
class Target:
    """Metadata of one database sequence (a hit's target)."""

    row: int
    record_id: str
    description: str
    length: int


def new_version_id(now: datetime | None = None) -> str:
    """A sortable, unique index version id such as ``20261122T031500.123Z-1a2b3c``
    (UTC build time to the millisecond, then a random suffix)."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}Z-" + uuid.uuid4().hex[:6]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sequences (
    row INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    length INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""


class IndexWriter:
    """Write one index version into a work directory, then publish it by rename.

    Usage::

        with IndexWriter(work_dir) as w:         # a fresh (or, with resume, reused) directory
            w.add_metadata(records)              # in row order
            w.write_embeddings(array)
            w.write_faiss(index)
            manifest = w.finish(**manifest_fields)   # checksums, fsync, verify
            publish_directory(w.directory, out_dir)  # rename into place

    If the ``with`` block raises, the work directory is deleted unless
    :attr:`keep_on_error` was set (the indexer sets it once embedding has started,
    so an interrupted build can be resumed).

    Args:
        directory: the work directory; created. Without ``resume`` an existing one is
            an error; with ``resume`` its metadata rows are kept.
        resume: reuse an existing work directory.
    """

    def __init__(self, directory: str | os.PathLike[str], *, resume: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self.directory.mkdir(exist_ok=resume)
        self.keep_on_error = False
        self._db = sqlite3.connect(self.directory / METADATA_FILE)
        self._db.executescript(_SCHEMA)
        (rows,) = self._db.execute("SELECT COUNT(*) FROM sequences").fetchone()
        self._rows: int = int(rows)
        self._finished = False

    @classmethod
    def temporary(cls, parent: str | os.PathLike[str], *, prefix: str = ".esmsearch-build-") -> IndexWriter:
        """A writer on a fresh uniquely named directory inside ``parent``."""
        parent_path = Path(parent)
        parent_path.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent_path))
        directory.rmdir()
        return cls(directory)

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None and self.keep_on_error:
            with contextlib.suppress(Exception):
                self._db.close()
            return
        if exc_type is not None or not self._finished:
            self.abort()

    def abort(self) -> None:
        """Delete the work directory (idempotent)."""
        with contextlib.suppress(Exception):
            self._db.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def truncate_rows(self, rows: int) -> None:
        """Drop metadata rows ``>= rows`` (used when resuming after a crash)."""
        self._db.execute("DELETE FROM sequences WHERE row >= ?", (rows,))
        self._db.commit()
        self._rows = min(self._rows, rows)

    def commit(self) -> None:
        """Make metadata rows added so far durable."""
        self._db.commit()

    def iter_metadata(self) -> Iterator[tuple[int, str, str, int, str]]:
        """Rows written so far: ``(row, record_id, description, length, sha256)`` in row order."""
        yield from self._db.execute("SELECT row, record_id, description, length, sha256 FROM sequences ORDER BY row")

    @property
    def rows(self) -> int:
        return self._rows

    def add_metadata(self, rows: Iterable[tuple[str, str, int, str]]) -> None:
        """Append ``(record_id, description, length, sequence_sha256)`` rows in row order."""
        start = self._rows
        batch = [(start + i, rid, desc, length, sha) for i, (rid, desc, length, sha) in enumerate(rows)]
        self._db.executemany("INSERT INTO sequences VALUES (?, ?, ?, ?, ?)", batch)
        self._rows += len(batch)

    def embeddings_path(self) -> Path:
        return self.directory / EMBEDDINGS_FILE

    def write_embeddings(self, vectors: np.ndarray, *, store_dtype: str = "float32") -> None:
        """Write ``[rows, dim]`` vectors to ``embeddings.npy`` as ``store_dtype`` (:data:`STORE_DTYPES`)."""
        if store_dtype not in STORE_DTYPES:
            raise IndexFormatError(f"store_dtype {store_dtype!r} is not one of {', '.join(STORE_DTYPES)}")
        np.save(self.embeddings_path(), np.ascontiguousarray(vectors, dtype=np.dtype(store_dtype)))

    def decoys_path(self) -> Path:
        return self.directory / DECOYS_FILE

    def write_decoys(self, vectors: np.ndarray) -> None:
        """Write float32 ``[n_decoys, dim]`` decoy vectors to ``decoys.npy``, atomically and durably."""
        path = self.decoys_path()
        tmp = path.with_name(path.stem + ".tmp.npy")
        np.save(tmp, np.ascontiguousarray(vectors, dtype=np.float32))
        fsutil.fsync_file(tmp)
        os.replace(tmp, path)
        fsutil.fsync_dir(self.directory)

    def write_faiss(self, index: Any) -> None:
        from esmsearch import vector_index

        vector_index.write(index, self.directory / FAISS_FILE)

    def finish(self, *, known_sha256: dict[str, str] | None = None, **fields: Any) -> Manifest:
        """Checksum files, write ``manifest.json`` last, fsync, and check the row counts.

        ``fields`` are the :class:`Manifest` fields other than ``format_version``,
        ``files``, ``count`` and (optionally) ``version``/``built_at``/``decoys``.
        With ``decoys`` (a :class:`~esmsearch.significance.DecoySettings`), ``decoys.npy``
        must have been written (:meth:`write_decoys`) and is checksummed too.

        Each file is read once, to hash it, unless ``known_sha256`` already gives
        its sha256 (the indexer's journal holds the digest of every file a stage
        wrote, taken when it was written): a multi-GB ``embeddings.npy`` or
        ``index.faiss`` is then not read again here. The result is opened
        memory-mapped (:meth:`Index.open` with ``mmap=True``, no checksums) to
        check that FAISS, metadata and manifest agree on the row count and the
        dimension, and ``embeddings.npy``'s header is checked against them, so the
        FAISS index is never read into the heap here. Checksums are checked by
        :func:`esmsearch.versions.verify_index` or ``Index.open(verify=True)``.

        Args:
            known_sha256: file name -> hex sha256 for files whose digest the caller
                computed when it wrote them.
            **fields: the manifest fields.

        Raises:
            IndexFormatError: the written files are inconsistent (row counts differ,
                decoys settings without ``decoys.npy`` or the reverse), or a field is
                invalid (e.g. an unknown precision).
            OSError: an fsync or the manifest's rename failed (nothing is published).
        """
        known = dict(known_sha256 or {})
        self._db.commit()
        self._db.execute("VACUUM")
        self._db.close()
        decoys = fields.get("decoys")
        if decoys is None and self.decoys_path().is_file():
            raise IndexFormatError(f"build wrote {DECOYS_FILE} but its manifest has no decoys settings")
        if decoys is not None and not self.decoys_path().is_file():
            raise IndexFormatError(f"manifest has decoys settings {decoys} but the build wrote no {DECOYS_FILE}")
        files = {}
        names = (
            DATA_FILES
            + ((DECOYS_FILE,) if decoys is not None else ())
            + ((IVFDATA_FILE,) if (self.directory / IVFDATA_FILE).is_file() else ())
        )
        for name in names:
            path = self.directory / name
            if not path.is_file():
                raise IndexFormatError(f"build produced no {name}")
            fsutil.fsync_file(path)
            files[name] = known[name] if name in known else fsutil.file_sha256(path)
        now = datetime.now(UTC)
        fields.setdefault("built_at", now.isoformat(timespec="seconds"))
        fields.setdefault("version", new_version_id(now))
        manifest = Manifest(format_version=FORMAT_VERSION, files=files, count=self._rows, **fields)
        # The manifest goes last: a directory with a manifest has every file it lists.
        fsutil.write_text_atomic(self.directory / MANIFEST, manifest.to_json())
        with Index.open(self.directory, mmap=True) as index:
            emb = np.load(self.embeddings_path(), mmap_mode="r")
            if emb.shape != (index.count, manifest.dim) or emb.dtype != np.dtype(manifest.store_dtype):
                raise IndexFormatError(
                    f"index {self.directory}: embeddings.npy is {emb.dtype} {emb.shape}, manifest says "
                    f"{manifest.store_dtype} {(index.count, manifest.dim)}"
                )
            del emb
        self._finished = True
        return manifest


def publish_directory(built: Path, destination: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Move a finished index directory to ``destination`` by rename, durably.

    Without an index at ``destination``: ``rename(built, destination)``, then the
    parent directory is fsynced.

    With ``overwrite`` and an index at ``destination``: the two directories are
    swapped atomically with ``renameat2(RENAME_EXCHANGE)`` (:func:`esmsearch.fsutil.exchange`),
    so ``destination`` holds the whole old index or the whole new one at every
    instant; the parent is fsynced, then the old index (now at ``built``) is deleted.
    Where the OS or filesystem cannot exchange (not Linux, old glibc/kernel, some
    network and FUSE filesystems), a warning is logged and the old way is used:
    rename the old index aside, rename the new one in, delete the old one -- between
    those two renames ``destination`` briefly does not exist (a reader retrying an
    open sees the new index; a crash there leaves the old index at
    ``.<name>.old-<random>`` beside it).

    Args:
        built: a finished, verified index directory (see :meth:`IndexWriter.finish`),
            on the same filesystem as ``destination``.
        destination: where the index is published.
        overwrite: replace an existing index at ``destination``.

    Raises:
        FileExistsError: ``destination`` exists and ``overwrite`` is false.
        IndexFormatError: ``destination`` exists but is not an esmsearch index
            (refused even with ``overwrite``, so no unrelated directory is deleted).
        OSError: a rename or fsync failed. If the swap itself failed, ``destination``
            is unchanged; if only the fsync after it failed, the new index is in place
            (but possibly not yet durable) and the old one is left at ``built``.
    """
    dest = Path(destination)
    # A work directory from mkdtemp is 0700; give the published index the usual
    # permissions (0777 less the umask) so other users and services can read it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(built, 0o777 & ~umask)
    if not (dest.exists() or dest.is_symlink()):
        os.rename(built, dest)
        fsutil.fsync_dir(dest.parent)
        return
    if not overwrite:
        raise FileExistsError(f"{dest} already exists; pass --overwrite to replace it")
    if not (dest / MANIFEST).is_file():
        raise IndexFormatError(f"{dest} exists and is not an esmsearch index; refusing to replace it")
    try:
        fsutil.exchange(built, dest)
    except fsutil.ExchangeNotSupportedError as exc:
        log.warning(
            "cannot swap %s atomically (%s); replacing it by rename-aside, during which it briefly does not exist",
            dest,
            exc.strerror,
        )
        aside = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, aside)
        try:
            os.rename(built, dest)
        except BaseException:
            os.rename(aside, dest)
            raise
        fsutil.fsync_dir(dest.parent)
        _remove_tree(aside)
        return
    # `built` now names the old index.
    fsutil.fsync_dir(dest.parent)
    _remove_tree(built)


def _remove_tree(path: Path) -> None:
    """Delete a replaced index (a directory, or a symlink that stood at the destination)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def unit_float32(vectors: np.ndarray) -> np.ndarray:
    """Stored vectors as float32 unit vectors, ready for FAISS or cosine scores.

    float32 input is returned as float32 unchanged (it was normalised when embedded);
    float16 input is cast and L2-normalised again, so that a vector's cosine with
    itself is 1 to float32 precision (rounding to float16 moves the norm by up to
    ~1e-3).

    Args:
        vectors: ``[n, dim]`` float32 or float16.

    Returns:
        float32 ``[n, dim]``, a new array unless the input was float32 already.
    """
    if vectors.dtype == np.float32:
        return np.asarray(vectors)
    out = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.maximum(norms, np.float32(1e-12), out=norms)
    out /= norms
    return out


class MetadataReader:
    """Lookups in one index version's ``metadata.sqlite`` from many threads at once.

    A fixed pool of read-only connections (``file:...?mode=ro`` URIs, opened with
    ``check_same_thread=False``): a lookup borrows an idle connection for its duration
    and gives it back, so up to ``connections`` lookups run side by side (SQLite
    releases the GIL while it steps a statement) instead of queueing behind one lock;
    beyond that a lookup waits for the next connection given back. All connections are
    opened together when the index is opened, never later: a version directory that is
    pruned or replaced at the same path while it is still served keeps answering from
    the files that were opened, as the FAISS index does. Each connection is used by one
    thread at a time and reads the file through a memory map (``PRAGMA mmap_size``), so
    the connections share the OS page cache rather than each filling its own.
    ``benchmarks/metadata_lookup.py`` measures this against one locked connection and
    against memory-mapped arrays.

    Args:
        path: the ``metadata.sqlite`` file.
        first: an open read-only connection to it to start the pool with (e.g. the one
            :meth:`Index.open` checked the row count with); ``None`` opens one.
        connections: size of the pool, >= 1; default: the number of CPUs, 2 to 8.

    Raises:
        IndexFormatError: the file cannot be opened.
    """

    #: Rows per ``IN (...)`` statement: under SQLite's historical limit of 999 bound
    #: parameters (``SQLITE_MAX_VARIABLE_NUMBER`` before 3.32).
    CHUNK_ROWS = 900
    #: Largest memory map per connection (SQLite's ``PRAGMA mmap_size``; address space,
    #: not memory: pages are read in only when looked up).
    MMAP_BYTES = 1 << 40

    def __init__(self, path: Path, first: sqlite3.Connection | None = None, *, connections: int | None = None) -> None:
        self.path = path
        n = connections if connections is not None else min(8, max(2, os.cpu_count() or 1))
        if n < 1:
            raise ValueError(f"connections must be >= 1, got {n}")
        self._cond = threading.Condition()  # guards _idle and _closed; never held during a query
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        uri = fsutil.sqlite_uri(path, mode="ro")
        try:
            self._idle.append(first if first is not None else sqlite3.connect(uri, uri=True, check_same_thread=False))
            while len(self._idle) < n:
                self._idle.append(sqlite3.connect(uri, uri=True, check_same_thread=False))
            for db in self._idle:
                # Pages read through a memory map: one copy in the OS page cache for all
                # connections, no read() per page (https://www.sqlite.org/mmap.html).
                db.execute(f"PRAGMA mmap_size = {self.MMAP_BYTES}")
        except sqlite3.Error as exc:
            for db in self._idle:
                db.close()
            raise IndexFormatError(f"cannot open {path} ({exc})") from exc
        try:  # SQLite's JSON functions: built in since 3.38, an option before
            self._idle[0].execute("SELECT json_group_array(json_array(1, 'a'))").fetchone()
            self._json = True
        except sqlite3.OperationalError:
            self._json = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection for this thread alone until the block ends (waits for
        one while all are lent out).

        Raises:
            sqlite3.ProgrammingError: the reader is closed (also while waiting).
        """
        with self._cond:
            while not self._idle and not self._closed:
                self._cond.wait()
            if self._closed:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            db = self._idle.pop()
        try:
            yield db
        finally:
            with self._cond:
                if self._closed:
                    db.close()
                else:
                    self._idle.append(db)
                    self._cond.notify()

    def lookup(self, rows: Sequence[int] | np.ndarray) -> dict[int, Target]:
        """Metadata of the distinct rows among ``rows`` (those without metadata are absent).

        Args:
            rows: database rows, a sequence of ints or an integer array (any order and
                shape, repeats allowed; negative rows are skipped).

        Returns:
            ``{row: Target}``, one entry per distinct row found.

        Raises:
            sqlite3.ProgrammingError: the reader is closed.
        """
        found: dict[int, Target] = {}
        asked = np.asarray(rows, dtype=np.int64)
        if asked.size == 0:
            return found
        # numpy sorts with the GIL released: a large lookup does not stall other threads here.
        distinct = np.unique(asked)
        wanted: list[int] = distinct[distinct >= 0].tolist()
        with self.connection() as db:
            for start in range(0, len(wanted), self.CHUNK_ROWS):
                chunk = wanted[start : start + self.CHUNK_ROWS]
                marks = ",".join("?" * len(chunk))
                if self._json:
                    # One JSON text per chunk: one statement step, so one GIL hand-over per
                    # chunk instead of one per row (measured: benchmarks/metadata_lookup.py).
                    (text,) = db.execute(
                        "SELECT json_group_array(json_array(row, record_id, description, length)) "
                        f"FROM sequences WHERE row IN ({marks})",
                        chunk,
                    ).fetchone()
                    rows_found = json.loads(text)
                else:
                    rows_found = db.execute(
                        f"SELECT row, record_id, description, length FROM sequences WHERE row IN ({marks})", chunk
                    )
                for row, rid, desc, length in rows_found:
                    found[row] = Target(row, rid, desc, length)
        return found

    def close(self) -> None:
        """Close idle connections now and lent ones when given back; idempotent."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for db in idle:
            db.close()


class Index:
    """An opened, read-only index version: FAISS search plus metadata lookup.

    Thread-safe: FAISS search is re-entrant; metadata lookups take read-only SQLite
    connections from a pool (:class:`MetadataReader`), no global lock; the decoys and
    stored embeddings are read-only. Use :meth:`open`.

    Attributes:
        path: the index directory.
        manifest: its manifest.
        null: the decoys and per-query null behind E-values, or ``None`` for an index
            without decoys (:attr:`Manifest.decoys` is ``None``).
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        faiss_index: Any,
        db: sqlite3.Connection,
        null: DecoyNull | None = None,
        *,
        k_factor: int | None = None,
        stored: np.ndarray | None = None,
    ) -> None:
        if (k_factor is None) != (stored is None):
            raise ValueError("k_factor and the stored embeddings re-ranked against come together")
        self.path = path
        self.manifest = manifest
        self._faiss = faiss_index
        self._metadata = MetadataReader(path / METADATA_FILE, db)
        self.null = null
        self._k_factor = k_factor
        self._stored = stored

    @property
    def k_factor(self) -> int | None:
        """Candidates per hit that :meth:`search` re-ranks exactly, or ``None`` when the
        FAISS index stores exact vectors (Flat, IVF-Flat, HNSW-Flat) and scores need no
        re-ranking. Set for every index with lossy codes (PQ, SQ;
        :func:`esmsearch.vector_index.has_lossy_codes`): the manifest's
        ``search_params["k_factor"]``, else :data:`esmsearch.vector_index.DEFAULT_K_FACTOR`
        (an index built before the parameter existed), unless :meth:`open` overrode it."""
        return self._k_factor

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def count(self) -> int:
        return self.manifest.count

    @property
    def has_evalues(self) -> bool:
        """Whether hits of this index get E-values (it was built with decoys)."""
        return self.null is not None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        verify: bool = False,
        mmap: bool = False,
        k_factor: int | None = None,
    ) -> Index:
        """Open an index directory.

        For a FAISS index with lossy codes (PQ, SQ), ``embeddings.npy`` is also
        memory-mapped (always, whatever ``mmap`` says: only the rows :meth:`search`
        re-ranks are ever read), and its dtype and shape are checked against the
        manifest.

        Args:
            path: the index directory.
            verify: also check every file's sha256 against the manifest.
            mmap: memory-map the FAISS index and the decoys instead of reading them
                into memory.
            k_factor: re-rank this many candidates per hit instead of the manifest's
                ``search_params["k_factor"]`` (>= 1; e.g. a server override); ignored
                for an index that stores exact vectors.

        Raises:
            IndexNotFoundError: no manifest at ``path``.
            IndexFormatError: a file is missing, a checksum differs (with ``verify``),
                row counts of FAISS, metadata and manifest disagree, the manifest's
                search parameters are invalid, ``embeddings.npy`` is not
                ``[count, dim]`` in the manifest's ``store_dtype`` (checked with
                ``verify`` or when scores are re-ranked), or ``decoys.npy`` is not
                float32 ``[decoys.count, dim]``.
            ConfigError: ``k_factor`` is not a positive integer.
        """
        from esmsearch import vector_index

        if k_factor is not None:
            vector_index.IndexSpec("Flat", k_factor=k_factor)  # validates it (ConfigError)
        directory = Path(path)
        manifest = Manifest.read(directory)
        expected_files = manifest.data_files
        for name in expected_files:
            if not (directory / name).is_file():
                raise IndexFormatError(f"index {directory} is incomplete: {name} missing")
        if verify:
            if set(manifest.files) != set(expected_files):
                raise IndexFormatError(
                    f"index {directory}: manifest lists checksums for {sorted(manifest.files)}, "
                    f"expected {sorted(expected_files)}"
                )
            for name, expected in manifest.files.items():
                actual = fsutil.file_sha256(directory / name)
                if actual != expected:
                    raise IndexFormatError(
                        f"index {directory}: {name} sha256 {actual[:12]}... differs from manifest {expected[:12]}..."
                    )
        try:
            index = vector_index.read(directory / FAISS_FILE, mmap=mmap)
        except Exception as exc:
            raise IndexFormatError(f"index {directory}: cannot read {FAISS_FILE} ({exc})") from exc
        try:
            spec = vector_index.IndexSpec.from_json({"factory": manifest.index_factory, **manifest.search_params})
            vector_index.apply_search_params(index, spec)
        except EsmsearchError as exc:
            raise IndexFormatError(f"index {directory}: bad search parameters in manifest ({exc})") from exc
        rerank_by: int | None = None
        if vector_index.has_lossy_codes(index):
            rerank_by = k_factor or spec.k_factor or vector_index.DEFAULT_K_FACTOR
        try:
            db = sqlite3.connect(
                fsutil.sqlite_uri(directory / METADATA_FILE, mode="ro"), uri=True, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise IndexFormatError(f"index {directory}: cannot open {METADATA_FILE} ({exc})") from exc
        try:
            # Opening to serve reads metadata lazily: MAX(row) is one B-tree descent on the
            # INTEGER PRIMARY KEY, while COUNT(*) reads every row (seconds and hundreds of MB
            # of page cache at tens of millions of sequences); rows are written 0..n-1, so
            # with verify the full count must agree too.
            (max_row,) = db.execute("SELECT MAX(row) FROM sequences").fetchone()
            n_meta = 0 if max_row is None else int(max_row) + 1
            n_counted = int(db.execute("SELECT COUNT(*) FROM sequences").fetchone()[0]) if verify else n_meta
        except sqlite3.Error as exc:
            db.close()
            raise IndexFormatError(f"index {directory}: unreadable metadata ({exc})") from exc
        problems = []
        if index.ntotal != manifest.count:
            problems.append(f"FAISS has {index.ntotal} vectors")
        if n_meta != manifest.count:
            problems.append(f"metadata has {n_meta} rows")
        elif n_counted != n_meta:
            problems.append(f"metadata has {n_counted} rows numbered up to {n_meta - 1}")
        if index.d != manifest.dim:
            problems.append(f"FAISS dimension {index.d} != manifest dim {manifest.dim}")
        stored: np.ndarray | None = None
        if verify or rerank_by is not None:
            try:
                stored = np.load(directory / EMBEDDINGS_FILE, mmap_mode="r")  # header only; rows read lazily
            except (OSError, ValueError) as exc:
                problems.append(f"embeddings.npy is unreadable ({exc})")
            else:
                if stored.shape != (manifest.count, manifest.dim) or stored.dtype != np.dtype(manifest.store_dtype):
                    problems.append(
                        f"embeddings.npy is {stored.dtype} {stored.shape}, manifest says {manifest.store_dtype} "
                        f"{(manifest.count, manifest.dim)}"
                    )
        null = None
        if manifest.decoys is not None:
            try:
                decoys = np.load(directory / DECOYS_FILE, mmap_mode="r" if mmap else None)
                check_decoy_vectors(decoys, manifest.decoys, manifest.dim)
                null = DecoyNull(decoys, manifest.decoys)
            except (OSError, ValueError, IndexFormatError) as exc:
                problems.append(str(exc))
        if problems:
            db.close()
            raise IndexFormatError(
                f"index {directory} is inconsistent (manifest count {manifest.count}): " + "; ".join(problems)
            )
        if rerank_by is None:
            return cls(directory, manifest, index, db, null)
        return cls(directory, manifest, index, db, null, k_factor=rerank_by, stored=stored)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k-nearest database sequences by cosine score.

        The one search path of the engine, the batcher and every RPC. For a FAISS
        index with lossy codes (PQ, SQ; :attr:`k_factor` is set), FAISS proposes
        ``max(k_factor * k, RERANK_MIN_CANDIDATES)`` candidates (at the manifest's nprobe/efSearch) and they are
        re-ranked exactly against ``embeddings.npy``
        (:func:`esmsearch.vector_index.search_reranked`; only candidate rows are read
        from the memory map), so every score is the exact cosine of the query and the
        stored vector, computed in float32: for a float16 store
        (``manifest.store_dtype``), of the float16-rounded vector, re-normalised as
        :func:`unit_float32` does. Indexes that store exact vectors (Flat, IVF-Flat,
        HNSW-Flat) are searched directly; their scores are exact already.

        Args:
            vectors: float32 ``[q, dim]``, L2-normalised query embeddings.
            k: hits per query (>= 1); more than ``count`` pads with row -1.

        Returns:
            ``(scores, rows)``: float32 ``[q, k]`` cosine scores in [-1, 1], each row
            descending (higher = closer), and int64 ``[q, k]`` database rows, -1 where
            there is no hit.

        Raises:
            ValueError: ``vectors`` is not ``[q, dim]``.
            ConfigError: ``k`` < 1.
        """
        from esmsearch import vector_index

        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.manifest.dim:
            raise ValueError(f"query vectors must be [q, {self.manifest.dim}], got {list(queries.shape)}")
        if self._k_factor is None:
            return vector_index.search(self._faiss, queries, k)
        assert self._stored is not None  # __init__ sets both or neither
        return vector_index.search_reranked(self._faiss, queries, k, self._stored, self._k_factor)

    def evalues(self, vectors: np.ndarray, scores: np.ndarray, db_size: int | np.ndarray | None = None) -> np.ndarray:
        """E-values of hits of this index (see :mod:`esmsearch.significance`).

        Fits each query's null to its scores against the stored decoys (one matrix
        product) and scales it to ``db_size`` database sequences (this index's
        ``count`` by default).

        Args:
            vectors: float32 ``[q, dim]``, L2-normalised query embeddings.
            scores: ``[q, k]`` cosine scores of their hits (from :meth:`search`).
            db_size: number of database sequences to scale the E-values to (HMMER's
                ``-Z``, BLAST's ``-dbsize``; e.g. the size of the whole database this
                index is a shard of), >= 1: one for all queries, or int ``[q]``, one per
                query; ``None`` = this index's ``count``.

        Returns:
            float32 ``[q, k]`` E-values in ``(0, db_size]``: the expected number of
            database sequences unrelated to the query scoring at least each score;
            lower = more significant.

        Raises:
            EvaluesUnavailableError: the index has no decoys.
            ValueError: ``db_size`` below 1, or an array that is not ``[q]``.
        """
        if self.null is None:
            raise EvaluesUnavailableError(
                f"index {self.version} has no decoys, so no E-values; rebuild it with decoys "
                "(esmsearch index build --decoys N, N > 0)"
            )
        n: int | np.ndarray = self.count if db_size is None else db_size
        if db_size is not None and np.any(np.asarray(db_size) < 1):
            raise ValueError(f"db_size must be >= 1 database sequences, got {db_size}")
        return self.null.evalues(np.ascontiguousarray(vectors, dtype=np.float32), scores, n)

    def embeddings(self) -> np.ndarray:
        """The stored vectors, memory-mapped read-only (nothing is read until rows are
        indexed): ``[count, dim]`` in ``manifest.store_dtype`` (float32 or float16); pass
        rows through :func:`unit_float32` before computing cosine scores with them.
        For an index whose scores are re-ranked, this is the map :meth:`search` reads."""
        if self._stored is not None:
            return self._stored
        vectors: np.ndarray = np.load(self.path / EMBEDDINGS_FILE, mmap_mode="r")
        return vectors

    def targets(self, rows: Sequence[int]) -> list[Target]:
        """Metadata of database rows, in the order given (rows must exist).

        Each distinct row is read once, however often it repeats. Safe to call from
        many threads at once: each call reads through its own pooled read-only
        connection (:class:`MetadataReader`), so a large lookup does not hold up others.

        Args:
            rows: database rows, ``0 <= row < count``, any order, repeats allowed (e.g.
                the distinct rows of an answer, ``np.unique(rows).tolist()``).

        Returns:
            One :class:`Target` per entry of ``rows``, in that order.

        Raises:
            IndexFormatError: a row has no metadata (out of range, negative, or a
                corrupt index).
            sqlite3.ProgrammingError: the index is closed.
        """
        found = self._metadata.lookup(rows)
        try:
            return [found[int(r)] for r in rows]
        except KeyError as exc:
            raise IndexFormatError(f"index {self.path}: row {exc.args[0]} has no metadata") from exc

    def iter_metadata(self) -> Iterator[tuple[int, str, str, int, str]]:
        """All ``(row, record_id, description, length, sha256)`` rows in row order."""
        with self._metadata.connection() as db:
            rows = db.execute(
                "SELECT row, record_id, description, length, sha256 FROM sequences ORDER BY row"
            ).fetchall()
        yield from rows

    def file_sizes(self) -> dict[str, int]:
        """Bytes on disk of each file of this version."""
        return {p.name: p.stat().st_size for p in sorted(self.path.iterdir()) if p.is_file()}

    def close(self) -> None:
        """Close the metadata connections (those lent to lookups in flight when they end)."""
        self._metadata.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
