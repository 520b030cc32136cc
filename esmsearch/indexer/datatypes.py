"""The typed inputs and outputs of the build stages (:mod:`esmsearch.indexer.build`).

One place for the build's configuration (:class:`BuildConfig`), each stage's
output (:class:`Prepared`, :class:`PreviousVectors`, :class:`EmbedOutcome`,
:class:`DecoyOutcome`, :class:`Verified`) and the build's result
(:class:`BuildResult`, :class:`ReuseCounts`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from esmsearch.errors import ConfigError
from esmsearch.significance import DEFAULT_DECOY_SEED, DEFAULT_DECOYS, DecoySettings
from esmsearch.store import DECOYS_FILE, METADATA_FILE, STORE_DTYPES, Index, Manifest

if TYPE_CHECKING:
    from esmsearch.embedding import Embedder
    from esmsearch.indexer.distributed import DistributedConfig
    from esmsearch.vector_index import IndexSpec
    from esmsearch.versions import VerifyReport

__all__ = [
    "BuildConfig",
    "BuildResult",
    "DecoyOutcome",
    "EmbedOutcome",
    "FastaSummary",
    "Prepared",
    "PreviousVectors",
    "ReuseCounts",
    "Verified",
]


@dataclass(frozen=True)
class BuildConfig:
    """Model and batching settings of a build; validates itself.

    Attributes:
        model: ESM-2 pretrained name or local ``.pt`` path.
        layer: representation layer (None = last).
        toks_per_batch: token budget per forward pass.
        device: ``auto|cpu|cuda|cuda:N``.
        precision: ``fp32|bf16|fp16|auto`` (see :class:`~esmsearch.embedding.Embedder`;
            the resolved value is recorded as ``Manifest.precision``).
        index_factory: FAISS factory string or ``auto``.
        chunk_residues: residues embedded per chunk (bounds memory; one shard each).
        resume: continue an interrupted build from its last completed chunk.
        progress: show a progress bar on stderr.
        decoys: decoys to embed for E-values (:data:`~esmsearch.significance.DEFAULT_DECOYS`
            = 10,000; a smaller database gets one per sequence); 0 = no decoys, so
            the index serves hits without E-values.
        decoy_seed: seed of the decoy sample and shuffles, >= 0.
        store_dtype: dtype of ``embeddings.npy``: ``float32`` or ``float16`` (half the
            disk; recorded as ``Manifest.store_dtype``).
        distributed: embed on a Ray cluster
            (:class:`esmsearch.indexer.distributed.DistributedConfig`); None = in this
            process.
    """

    model: str
    layer: int | None = None
    toks_per_batch: int = 4096
    device: str = "auto"
    precision: str = "fp32"
    index_factory: str = "Flat"
    chunk_residues: int = 200_000
    resume: bool = False
    progress: bool = False
    decoys: int = DEFAULT_DECOYS
    decoy_seed: int = DEFAULT_DECOY_SEED
    store_dtype: str = "float32"
    distributed: DistributedConfig | None = None

    def __post_init__(self) -> None:
        if self.chunk_residues < 1:
            raise ConfigError(f"chunk_residues must be >= 1, got {self.chunk_residues}")
        if self.decoys < 0:
            raise ConfigError(f"decoys must be >= 0 (0 = no E-values), got {self.decoys}")
        if self.decoy_seed < 0:
            raise ConfigError(f"decoy seed must be >= 0, got {self.decoy_seed}")
        if not self.index_factory.strip():
            raise ConfigError("index factory must not be empty")
        if self.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"store_dtype must be one of {', '.join(STORE_DTYPES)}, got {self.store_dtype!r}")
        if self.distributed is not None and self.distributed.precision != self.precision:
            raise ConfigError(
                f"precision {self.precision!r} differs from the distributed workers' precision "
                f"{self.distributed.precision!r}; give the same value to both"
            )


@dataclass(frozen=True)
class ReuseCounts:
    """How a rebuild related to the previous version.

    Attributes:
        reused: rows whose vector was copied from the previous version (same sha256).
        embedded: rows embedded by the model in this build.
        added: record ids absent from the previous version.
        changed: record ids present before with a different sequence.
        removed: record ids of the previous version absent now.
        reused_residues: residues whose embedding work was skipped.
    """

    reused: int = 0
    embedded: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    reused_residues: int = 0


@dataclass(frozen=True)
class BuildResult:
    """What a build produced and how fast."""

    manifest: Manifest
    path: Path
    sequences: int
    residues: int
    windowed_sequences: int
    seconds: float
    embed_seconds: float
    embedded_residues: int
    reuse: ReuseCounts = field(default_factory=ReuseCounts)
    previous_version: str | None = None

    @property
    def residues_per_s(self) -> float:
        """Embedding speed over the residues this build embedded (0 if it embedded none)."""
        return self.embedded_residues / self.embed_seconds if self.embed_seconds > 0 else 0.0

    @property
    def seconds_saved(self) -> float:
        """Embedding time the reused vectors saved, estimated at this build's speed
        (or, if it embedded nothing, at the speed recorded by the previous version)."""
        rate = self.residues_per_s or float(self.manifest.build.get("previous_residues_per_s") or 0.0)
        return self.reuse.reused_residues / rate if rate > 0 else 0.0


@dataclass(frozen=True)
class FastaSummary:
    """Output of FASTA validation.

    Attributes:
        sequences: number of records.
        residues: total residues.
        longest: residues of the longest record.
        sha256: hex sha256 of the file's bytes (as stored).
    """

    sequences: int
    residues: int
    longest: int
    sha256: str


@dataclass(frozen=True)
class Prepared:
    """Output of :func:`validate`: a checked input, a loaded model and an index type.

    Attributes:
        fasta: the database FASTA.
        summary: its validated counts and checksum.
        embedder: the loaded model (its resolved ``precision`` is what the index records).
        spec: the FAISS index type, checked against the model's dimension and the
            database size.
        decoys: the decoy set to make (count from the database size), or ``None``
            for no E-values.
    """

    fasta: Path
    summary: FastaSummary
    embedder: Embedder
    spec: IndexSpec
    decoys: DecoySettings | None = None


class PreviousVectors:
    """Output of :func:`plan_reuse`: a previous version's vectors, looked up by sequence.

    Memory does not grow with the previous version's row count: its vectors and
    decoys stay memory-mapped, and the two lookups a rebuild needs (sequence sha256 ->
    row, for reuse; record id -> sha256, for the added/changed/removed counts) run in
    SQLite, against the version's own ``metadata.sqlite`` (attached read-only; its
    ``record_id`` is UNIQUE, so indexed) and a private temporary database
    (``sqlite3.connect("")``: on disk, removed by :meth:`close`) holding a
    ``sha256 -> first row`` table keyed by its B-tree. (Before, two Python dicts over
    every live row: hundreds of bytes per row in the build's heap.)

    Attributes:
        version: the previous version's id.
        count: its number of rows.
        embeddings: ``[count, dim]`` in ``store_dtype``, memory-mapped read-only.
        store_dtype: the previous version's ``Manifest.store_dtype``.
        residues_per_s: embedding speed the previous build recorded (or None).
        decoy_settings: its decoy set (None without decoys).
        decoys: its decoy vectors, float32 ``[decoys.count, dim]``, memory-mapped
            read-only (None without decoys).
    """

    #: Host parameters per ``IN (...)`` query (below SQLite's historic limit of 999).
    _BATCH = 900

    def __init__(self, index: Index) -> None:
        import sqlite3

        self.version = index.version
        self.count = index.count
        self.embeddings = index.embeddings()
        self.decoy_settings = index.manifest.decoys
        self.decoys: np.ndarray | None = None
        if self.decoy_settings is not None:
            self.decoys = np.load(index.path / DECOYS_FILE, mmap_mode="r")
        self.store_dtype = index.manifest.store_dtype
        self.residues_per_s: float | None = index.manifest.build.get("residues_per_s")
        # "" = a private temporary database on disk; uri=True lets ATTACH take a read-only URI.
        self._db = sqlite3.connect("", uri=True, check_same_thread=False)
        try:
            self._db.execute("PRAGMA cache_size = -16384")  # 16 MiB page cache, the rest on disk
            uri = (index.path / METADATA_FILE).resolve().as_uri() + "?mode=ro"
            self._db.execute("ATTACH DATABASE ? AS live", (uri,))
            self._db.execute("CREATE TABLE by_sha (sha256 TEXT PRIMARY KEY, row INTEGER NOT NULL) WITHOUT ROWID")
            # First row per sequence: a GROUP BY sorts (external merge sort, bounded memory).
            self._db.execute("INSERT INTO by_sha SELECT sha256, MIN(row) FROM live.sequences GROUP BY sha256")
            self._db.commit()
        except BaseException:
            self._db.close()
            raise

    def rows_of(self, shas: list[str]) -> list[int | None]:
        """The previous version's row holding each sequence (by sha256), or None, in order."""
        found: dict[str, int] = {}
        unique = list(dict.fromkeys(shas))
        for start in range(0, len(unique), self._BATCH):
            part = unique[start : start + self._BATCH]
            marks = ",".join("?" * len(part))
            found.update(self._db.execute(f"SELECT sha256, row FROM by_sha WHERE sha256 IN ({marks})", part))
        return [found.get(sha) for sha in shas]

    def changes(self, rows: Iterable[tuple[str, str]]) -> tuple[int, int, int]:
        """``(added, changed, removed)`` record ids of a new version against this one.

        Args:
            rows: ``(record_id, sequence_sha256)`` of every new row, streamed (kept in
                the temporary database, not in memory); record ids unique.
        """
        db = self._db
        db.execute("DROP TABLE IF EXISTS new_rows")
        db.execute("CREATE TABLE new_rows (record_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL) WITHOUT ROWID")
        batch: list[tuple[str, str]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= 10_000:
                db.executemany("INSERT INTO new_rows VALUES (?, ?)", batch)
                batch.clear()
        db.executemany("INSERT INTO new_rows VALUES (?, ?)", batch)
        ((added,),) = db.execute(
            "SELECT COUNT(*) FROM new_rows n WHERE NOT EXISTS "
            "(SELECT 1 FROM live.sequences o WHERE o.record_id = n.record_id)"
        )
        ((changed,),) = db.execute(
            "SELECT COUNT(*) FROM new_rows n JOIN live.sequences o ON o.record_id = n.record_id "
            "WHERE o.sha256 != n.sha256"
        )
        ((removed,),) = db.execute(
            "SELECT COUNT(*) FROM live.sequences o WHERE NOT EXISTS "
            "(SELECT 1 FROM new_rows n WHERE n.record_id = o.record_id)"
        )
        db.execute("DROP TABLE new_rows")
        return int(added), int(changed), int(removed)

    def close(self) -> None:
        """Close the lookups (the temporary database is removed); idempotent."""
        self._db.close()


@dataclass(frozen=True)
class EmbedOutcome:
    """Output of :func:`embed_chunks`.

    Attributes:
        shards: the ``.npy`` shard files, one per chunk, in row order; each float32
            ``[rows of the chunk, dim]``.
        rows: metadata rows written (= database sequences).
        reused: rows whose vector was copied from the previous version.
        embedded: rows embedded by the model (in this run and, when resuming, before).
        reused_residues: residues of the reused rows.
        embed_seconds: seconds spent in the model (this run only).
        embedded_residues: residues embedded by the model (this run only).
        windowed_sequences: sequences longer than the model context embedded in
            windows (this run only).
    """

    shards: tuple[Path, ...]
    rows: int
    reused: int
    embedded: int
    reused_residues: int
    embed_seconds: float
    embedded_residues: int
    windowed_sequences: int


@dataclass(frozen=True)
class DecoyOutcome:
    """Output of :func:`embed_decoys`.

    Attributes:
        settings: the decoy set written to ``decoys.npy``, with its estimated shape
            (None: no decoys).
        reused_from: version whose decoys (and shape) were copied, or None if
            embedded here.
        embed_seconds: seconds spent in the model on decoys (this run only).
        embedded_residues: decoy residues embedded (this run only).
    """

    settings: DecoySettings | None
    reused_from: str | None
    embed_seconds: float
    embedded_residues: int


@dataclass(frozen=True)
class Verified:
    """Output of :func:`verify`: the sealed manifest and the self-search report."""

    manifest: Manifest
    report: VerifyReport
