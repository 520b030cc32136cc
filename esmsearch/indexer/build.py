"""Build an index from a protein FASTA file: standalone directory or new version of a root.

The pipeline is eight stages, each a plain function with typed input and output, so
that a test can run (or swap) one alone:

1. :func:`validate` -- the whole FASTA first (ids, residues, duplicates: a bad record
   at the end of a large database fails in seconds, before any embedding work),
   the model, and the FAISS factory string against its dimension -> :class:`Prepared`;
2. :func:`plan_reuse` -- whether the live version's vectors can be reused (same
   checkpoint, layer, pooling, normalisation, precision, dim) -> :class:`PreviousVectors`;
3. :func:`embed_chunks` -- stream records in chunks of about ``chunk_residues``
   residues; per chunk, copy reused vectors, hand the rest to a :class:`BlockEmbedder`
   (in this process: :class:`LocalBlockEmbedder`, length-sorted token-budget
   batches; on a Ray cluster: :class:`esmsearch.indexer.distributed.RayBlockEmbedder`,
   which gets only the sequences that need the model and returns their vectors in
   input order), write the chunk's vectors to a shard (fsynced) and its metadata
   to SQLite, then journal the chunk -- memory is bounded by one chunk (a wave of
   chunks when distributed), and a crash resumes from the last journaled chunk
   (``resume``; :func:`open_work`) -> :class:`EmbedOutcome`;
4. :func:`embed_decoys` -- the decoys behind E-values (:mod:`esmsearch.significance`):
   shuffles of a seeded sample of the database's sequences, embedded with the same
   model, layer and precision (through the same :class:`BlockEmbedder`) into
   ``decoys.npy`` (journaled in chunks like stage 3), and the index's extreme-value
   shape estimated from a sample of database sequences scored against them; or both
   copied from the previous version when its model contract and decoy count and seed
   are this build's -> :class:`DecoyOutcome`;
5. :func:`assemble` -- concatenate the shards into ``embeddings.npy``, as float32 or
   float16 (``store_dtype``);
6. :func:`build_faiss` -- build ``index.faiss`` out of core
   (:func:`esmsearch.vector_index.build_out_of_core`): stream ``embeddings.npy`` in
   blocks of rows, train IVF/PQ/SQ indexes on a seeded sample, add block by block,
   and put an IVF's inverted lists on disk (``index.ivfdata``) when they exceed
   half of RAM -- memory is bounded by the trained index, one block and the codes,
   never by a float32 copy of the database;
7. :func:`verify` -- write the manifest last (checksums, fsync), then check
   checksums, row counts and a self-search -> :class:`Verified`;
8. :func:`publish_standalone` (rename, or atomic exchange with ``overwrite``, to
   ``out_dir``; :func:`build_index`) or :func:`publish_version`
   (``ROOT/versions/<version>`` and an atomic swap of ``ROOT/current``;
   :func:`build_version`). Every publishing rename is followed by an fsync of its
   directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from esmsearch import __version__, fsutil
from esmsearch.embedding import NORMALISATION, POOLING, WINDOW_OVERLAP, WINDOW_RESIDUES, Embedder
from esmsearch.errors import (
    ConfigError,
    FastaFormatError,
    IndexFormatError,
    IndexMismatchError,
    InvalidIndexFactoryError,
)
from esmsearch.fsutil import file_sha256
from esmsearch.sequences import SequenceRecord, read_fasta, sequence_sha256
from esmsearch.significance import (
    DEFAULT_DECOY_SEED,
    DEFAULT_DECOYS,
    DecoyNull,
    DecoySettings,
    decoy_sequences,
    pseudo_query_rows,
    sample_decoy_rows,
)
from esmsearch.store import (
    DECOYS_FILE,
    FAISS_FILE,
    STORE_DTYPES,
    Index,
    IndexWriter,
    Manifest,
    publish_directory,
    unit_float32,
)
from esmsearch.versions import IndexRoot, VerifyReport, verify_index

if TYPE_CHECKING:
    from esmsearch.indexer.distributed import DistributedConfig
    from esmsearch.vector_index import IndexSpec, OutOfCoreBuild

__all__ = [
    "BlockEmbedder",
    "BuildConfig",
    "BuildJournal",
    "BuildResult",
    "DecoyOutcome",
    "EmbedBlock",
    "EmbedOutcome",
    "LocalBlockEmbedder",
    "FastaSummary",
    "Prepared",
    "PreviousVectors",
    "ReuseCounts",
    "Verified",
    "assemble",
    "build_faiss",
    "build_index",
    "build_version",
    "count_changes",
    "embed_chunks",
    "embed_decoys",
    "iter_stored_vectors",
    "open_work",
    "partial_build_dir",
    "plan_reuse",
    "publish_standalone",
    "publish_version",
    "scan_fasta",
    "validate",
    "verify",
]

log = logging.getLogger(__name__)

#: Journal of a build in progress, inside the partial build directory.
STATE_FILE = "build-state.json"
#: Rows per block read from ``embeddings.npy`` while the FAISS index is built: a
#: multiple of :data:`esmsearch.vector_index.ADD_CHUNK_ROWS` (65,536), so the
#: ``index.add`` calls are those of an in-memory build; 262,144 x 1,280 float32 is
#: 1.3 GB at ESM-2 650M's dim (336 MB at 320).
FAISS_BLOCK_ROWS = 262_144


def partial_build_dir(out_dir: Path) -> Path:
    """Work directory of a standalone build of ``out_dir``: ``<parent>/.<name>.partial``.

    A build writes here and renames it to ``out_dir`` when complete; an interrupted
    build leaves it for ``resume``.
    """
    return out_dir.parent / f".{out_dir.name}.partial"


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

    Attributes:
        version: the previous version's id.
        count: its number of rows.
        embeddings: ``[count, dim]`` in ``store_dtype``, memory-mapped read-only.
        store_dtype: the previous version's ``Manifest.store_dtype``.
        row_by_sha: sequence sha256 -> first row holding it.
        sha_by_id: record id -> sequence sha256.
        residues_per_s: embedding speed the previous build recorded (or None).
        decoy_settings: its decoy set (None without decoys).
        decoys: its decoy vectors, float32 ``[decoys.count, dim]``, memory-mapped
            read-only (None without decoys).
    """

    def __init__(self, index: Index) -> None:
        self.version = index.version
        self.count = index.count
        self.embeddings = index.embeddings()
        self.decoy_settings = index.manifest.decoys
        self.decoys: np.ndarray | None = None
        if self.decoy_settings is not None:
            self.decoys = np.load(index.path / DECOYS_FILE, mmap_mode="r")
        self.store_dtype = index.manifest.store_dtype
        self.row_by_sha: dict[str, int] = {}
        self.sha_by_id: dict[str, str] = {}
        for row, record_id, _desc, _length, sha in index.iter_metadata():
            self.row_by_sha.setdefault(sha, row)
            self.sha_by_id[record_id] = sha
        self.residues_per_s: float | None = index.manifest.build.get("residues_per_s")


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


# -- stage 1: validate ----------------------------------------------------------------------
def scan_fasta(path: Path) -> FastaSummary:
    """Validate every record of ``path`` and count sequences and residues.

    Raises:
        FileNotFoundError, FastaFormatError, InvalidSequenceError, DuplicateRecordError.
    """
    n = residues = longest = 0
    for rec in read_fasta(path):
        n += 1
        residues += len(rec.sequence)
        longest = max(longest, len(rec.sequence))
    if n == 0:
        raise FastaFormatError(f"{path}: no FASTA records")
    return FastaSummary(n, residues, longest, file_sha256(path))


def validate(fasta: Path, cfg: BuildConfig, embedder: Embedder | None = None) -> Prepared:
    """Stage 1: everything that can fail cheaply, before any embedding.

    Validates the whole FASTA (ids, residues, duplicates), loads the model (unless
    ``embedder`` is given), checks the FAISS factory string against the model's
    dimension and the database size, and sizes the decoy set
    (:meth:`DecoySettings.for_database`).

    Raises:
        ConfigError: ``fasta`` is ``-`` (a build reads its input twice).
        FileNotFoundError, FastaFormatError, InvalidSequenceError, DuplicateRecordError:
            a bad database FASTA.
        ModelLoadError: the model cannot be loaded.
        InvalidIndexFactoryError: a bad factory string, or too few sequences to train it.
    """
    from esmsearch import vector_index

    if str(fasta) == "-":
        raise ConfigError(
            "index builds read the database FASTA twice (validation, then embedding): give a file, not '-'"
        )
    summary = scan_fasta(fasta)
    log.info("validated %s: %d sequences, %d residues", fasta, summary.sequences, summary.residues)
    if embedder is not None:
        emb = embedder
    elif cfg.distributed is not None:
        from esmsearch.indexer.distributed import driver_embedder

        emb = driver_embedder(cfg.model, layer=cfg.layer, toks_per_batch=cfg.toks_per_batch, config=cfg.distributed)
    else:
        emb = Embedder(
            cfg.model, layer=cfg.layer, toks_per_batch=cfg.toks_per_batch, device=cfg.device, precision=cfg.precision
        )
    if cfg.index_factory == "auto":
        spec = vector_index.auto_spec(summary.sequences, emb.dim)
    else:
        spec = vector_index.validate_factory(cfg.index_factory, emb.dim)
    need = vector_index.min_training_vectors(spec, emb.dim)
    if need > summary.sequences:
        raise InvalidIndexFactoryError(
            f"index factory {spec.factory!r} needs at least {need} training vectors, "
            f"but {fasta} has {summary.sequences} sequences; use a smaller nlist or 'Flat'"
        )
    decoys = DecoySettings.for_database(summary.sequences, cfg.decoys, cfg.decoy_seed)
    return Prepared(fasta, summary, emb, spec, decoys)


# -- stage 2: plan reuse --------------------------------------------------------------------
def plan_reuse(embedder: Embedder, live: Index | None, store_dtype: str = "float32") -> PreviousVectors | None:
    """Stage 2: decide whether the live version's vectors can be reused.

    They can when the live version was built with everything that changes a vector
    equal to this build's (:meth:`Embedder.check_manifest`: checkpoint sha256,
    layer, pooling, normalisation, precision, dimension) and stores them at least as
    precisely as this build will (float16 vectors are not reused for a float32
    store: they would differ from freshly embedded ones by up to ~1e-3); otherwise
    everything is re-embedded and the reason is logged.

    This stage runs before embedding, in the driver, so a distributed build sends
    only new or changed sequences to its workers.

    Args:
        embedder: this build's model.
        live: the live version, or None (first build, or reuse switched off).
        store_dtype: this build's ``store_dtype``.

    Returns:
        The live version's vectors by sequence sha256, or None.
    """
    if live is None:
        return None
    try:
        embedder.check_manifest(live.manifest)
    except IndexMismatchError as exc:
        log.warning("not reusing vectors of %s: %s", live.version, exc)
        return None
    if live.manifest.store_dtype == "float16" and store_dtype == "float32":
        log.warning(
            "not reusing vectors of %s: they are stored as float16 and this build stores float32 "
            "(pass --store-dtype float16 to reuse them)",
            live.version,
        )
        return None
    return PreviousVectors(live)


# -- stage 3: embed chunks ------------------------------------------------------------------
class BuildJournal:
    """The journal of a build in progress: input/model settings and chunks completed.

    A JSON object in ``<work>/build-state.json``, replaced atomically and durably
    (:func:`esmsearch.fsutil.write_text_atomic`) after each chunk's shard and
    metadata are durable, so it never names a chunk that a crash could lose.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def load(self) -> None:
        """Read the journal.

        Raises:
            ConfigError: it is missing or unreadable (the partial build cannot be resumed).
        """
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot resume: {self.path} is missing or unreadable ({exc}); remove {self.path.parent}"
            ) from exc

    def save(self) -> None:
        """Write the journal atomically and durably (raises OSError on failure)."""
        fsutil.write_text_atomic(self.path, json.dumps(self.data, sort_keys=True))


def _journal_settings(prep: Prepared, cfg: BuildConfig, previous: PreviousVectors | None) -> dict[str, Any]:
    """What a resumed build must share with the interrupted one."""
    return {
        "fasta_sha256": prep.summary.sha256,
        "chunk_residues": cfg.chunk_residues,
        "index_factory": prep.spec.factory,
        "store_dtype": cfg.store_dtype,
        "reuse_version": previous.version if previous else None,
        "decoys": prep.decoys.to_json() if prep.decoys else None,
        **prep.embedder.settings,  # includes the resolved precision
    }


def open_work(work: Path, prep: Prepared, cfg: BuildConfig, previous: PreviousVectors | None) -> BuildJournal:
    """Check or clear the work directory before :func:`embed_chunks`.

    With ``cfg.resume`` and a partial build at ``work``, its journal is loaded and
    must have been written with this build's settings; without ``resume``, a partial
    build there is removed.

    Returns:
        The journal; its ``data`` is empty unless a build is being resumed.

    Raises:
        ConfigError: the partial build cannot be resumed (missing journal, or other
            settings: each difference is named).
    """
    journal = BuildJournal(work / STATE_FILE)
    if work.exists():
        if cfg.resume:
            journal.load()
            expected = _journal_settings(prep, cfg, previous)
            mismatch = {k: (journal.data.get(k), v) for k, v in expected.items() if journal.data.get(k) != v}
            if mismatch:
                details = "; ".join(f"{k}: partial build has {a!r}, this build {b!r}" for k, (a, b) in mismatch.items())
                raise ConfigError(f"cannot resume the partial build at {work}: {details}; remove it or drop --resume")
        else:
            log.warning("removing the partial build left at %s (pass --resume to continue one)", work)
            shutil.rmtree(work)
    elif cfg.resume:
        log.info("no partial build at %s; starting from the beginning", work)
    return journal


def _chunks(records: Iterator[SequenceRecord], chunk_residues: int) -> Iterator[list[SequenceRecord]]:
    chunk: list[SequenceRecord] = []
    size = 0
    for rec in records:
        chunk.append(rec)
        size += len(rec.sequence)
        if size >= chunk_residues:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _write_shard(shard: Path, vectors: np.ndarray) -> None:
    """Write one chunk's vectors durably: temp file, fsync, rename, fsync the shard dir."""
    tmp = shard.with_name(shard.stem + ".tmp.npy")
    np.save(tmp, vectors)
    fsutil.fsync_file(tmp)
    os.replace(tmp, shard)
    fsutil.fsync_dir(shard.parent)


@dataclass(frozen=True)
class EmbedBlock:
    """The sequences of one chunk that need the model (reused ones are not in it).

    Attributes:
        number: the chunk's number (= its shard's number), increasing in input order.
        sequences: residue strings, validated, in input order; may be empty (a chunk
            whose vectors were all reused).
    """

    number: int
    sequences: tuple[str, ...]

    @property
    def residues(self) -> int:
        return sum(len(s) for s in self.sequences)


class BlockEmbedder(Protocol):
    """Stage 3's model: embeds blocks and returns them **in the order given**.

    Implementations: :class:`LocalBlockEmbedder` (this process) and
    :class:`esmsearch.indexer.distributed.RayBlockEmbedder` (an actor pool on Ray
    Data). A test may pass its own.
    """

    def embed_blocks(
        self, blocks: Iterable[EmbedBlock], on_residues: Callable[[int], object] | None
    ) -> Iterator[tuple[EmbedBlock, np.ndarray]]:
        """Yield ``(block, vectors)`` for every block, in input order.

        ``vectors`` is float32 ``[len(block.sequences), dim]``, L2-normalised, row i =
        ``block.sequences[i]``. ``on_residues`` is called with residues as they are
        embedded (for a progress bar).
        """
        ...

    @property
    def embed_seconds(self) -> float:
        """Seconds spent embedding so far (wall time of the model work)."""
        ...


def _as_none_callback(fn: Callable[[int], object] | None) -> Callable[[int], None] | None:
    if fn is None:
        return None

    def call(n: int) -> None:
        fn(n)

    return call


class LocalBlockEmbedder:
    """:class:`BlockEmbedder` running one :class:`Embedder` in this process.

    ``embed_seconds`` sums the time inside :meth:`Embedder.embed`.
    """

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._seconds = 0.0

    @property
    def embed_seconds(self) -> float:
        return self._seconds

    def embed_blocks(
        self, blocks: Iterable[EmbedBlock], on_residues: Callable[[int], object] | None
    ) -> Iterator[tuple[EmbedBlock, np.ndarray]]:
        for block in blocks:
            if not block.sequences:
                yield block, np.empty((0, self.embedder.dim), dtype=np.float32)
                continue
            t0 = time.perf_counter()
            vectors = self.embedder.embed(list(block.sequences), on_batch=_as_none_callback(on_residues))
            self._seconds += time.perf_counter() - t0
            yield block, vectors


@dataclass
class _ChunkPlan:
    """A chunk read from the FASTA, with which of its records need the model."""

    number: int
    records: list[SequenceRecord]
    shas: list[str]
    to_embed: list[int]  # positions in `records`
    reuse_rows: list[tuple[int, int]]  # (position, row of the previous version)


def embed_chunks(
    writer: IndexWriter,
    journal: BuildJournal,
    prep: Prepared,
    cfg: BuildConfig,
    previous: PreviousVectors | None,
    block_embedder: BlockEmbedder | None = None,
) -> EmbedOutcome:
    """Stage 3: stream the FASTA in chunks, reuse or embed each, and journal it.

    For each chunk of about ``cfg.chunk_residues`` residues: vectors of sequences
    whose sha256 is in ``previous`` are copied, the rest go to ``block_embedder``
    as one :class:`EmbedBlock` (which sorts them by length into token-budget
    batches); the chunk's float32 ``[n, dim]`` vectors go to
    ``<work>/shards/shard-NNNNNN.npy`` (fsynced before its rename, the shard
    directory fsynced after), its metadata rows are committed to SQLite, and only
    then the journal records the chunk as done -- strictly in input order, whatever
    order a distributed embedder finishes blocks in. Memory is bounded by the chunks
    the embedder holds at once (one in this process); chunks the journal names are
    skipped when resuming (``journal.data`` loaded).

    Args:
        writer: the work directory's writer (resumed when the journal is loaded).
        journal: from :func:`open_work`.
        prep: from :func:`validate`.
        cfg: chunk size and progress bar.
        previous: from :func:`plan_reuse`.
        block_embedder: the model stage (default :class:`LocalBlockEmbedder` over
            ``prep.embedder``).

    Returns:
        The shard files in row order and the counts.

    Raises:
        InvalidSequenceError: cannot happen after :func:`validate` unless the file
            changed since; the model's errors propagate unchanged.
    """
    emb, summary = prep.embedder, prep.summary
    embedder = block_embedder if block_embedder is not None else LocalBlockEmbedder(emb)
    resuming = bool(journal.data)
    counts = {"reused": 0, "embedded": 0, "reused_residues": 0}
    embedded_residues = 0
    windowed = 0
    shard_dir = writer.directory / "shards"
    shard_dir.mkdir(exist_ok=True)
    done_shards = int(journal.data.get("shards", 0)) if resuming else 0
    if resuming:
        writer.truncate_rows(int(journal.data.get("rows", 0)))
        for key in counts:
            counts[key] = int(journal.data.get(key, 0))
        for stale in shard_dir.glob("*"):
            keep = stale.name.startswith("shard-") and stale.name.endswith(".npy") and ".tmp" not in stale.name
            if not keep or int(stale.name[6:12]) >= done_shards:
                stale.unlink()
        log.info("resuming %s: %d sequences already done", writer.directory, writer.rows)
    else:
        journal.data = dict(_journal_settings(prep, cfg, previous), shards=0, rows=0)
        journal.save()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=summary.residues,
            unit="res",
            unit_scale=True,
            desc=f"embedding {summary.sequences} seqs",
            file=sys.stderr,
        )
    shards: list[Path] = []
    plans: dict[int, _ChunkPlan] = {}

    def blocks() -> Iterator[EmbedBlock]:
        """Plan each chunk still to do (reuse lookup) and hand its other sequences on."""
        for number, chunk in enumerate(_chunks(read_fasta(prep.fasta), cfg.chunk_residues)):
            shards.append(shard_dir / f"shard-{number:06d}.npy")
            if number < done_shards:
                if bar is not None:
                    bar.update(sum(len(r.sequence) for r in chunk))
                continue
            plan = _ChunkPlan(number, chunk, [sequence_sha256(r.sequence) for r in chunk], [], [])
            for i, sha in enumerate(plan.shas):
                row = previous.row_by_sha.get(sha) if previous else None
                if row is None:
                    plan.to_embed.append(i)
                else:
                    plan.reuse_rows.append((i, row))
            if bar is not None:
                bar.update(sum(len(chunk[i].sequence) for i, _row in plan.reuse_rows))
            plans[number] = plan
            yield EmbedBlock(number, tuple(chunk[i].sequence for i in plan.to_embed))

    try:
        for block, embedded in embedder.embed_blocks(blocks(), bar.update if bar is not None else None):
            if not plans or block.number != next(iter(plans)):
                raise ConfigError(
                    f"the embedder returned block {block.number} out of order (next expected: "
                    f"{next(iter(plans), None)}); blocks must come back in input order"
                )
            plan = plans.pop(block.number)
            if embedded.shape != (len(plan.to_embed), emb.dim):
                raise ConfigError(
                    f"block {block.number}: the embedder returned {list(embedded.shape)} vectors for "
                    f"{len(plan.to_embed)} sequences of dim {emb.dim}"
                )
            vectors = np.empty((len(plan.records), emb.dim), dtype=np.float32)
            if plan.to_embed:
                vectors[plan.to_embed] = embedded
            for i, row in plan.reuse_rows:
                vectors[i] = previous.embeddings[row]  # type: ignore[union-attr]
            counts["reused"] += len(plan.reuse_rows)
            counts["reused_residues"] += sum(len(plan.records[i].sequence) for i, _row in plan.reuse_rows)
            counts["embedded"] += len(plan.to_embed)
            embedded_residues += block.residues
            windowed += sum(1 for seq in block.sequences if len(seq) > WINDOW_RESIDUES)
            _write_shard(shard_dir / f"shard-{plan.number:06d}.npy", vectors)  # durable before the journal names it
            writer.add_metadata(
                (r.record_id, r.description, len(r.sequence), sha)
                for r, sha in zip(plan.records, plan.shas, strict=True)
            )
            writer.commit()
            journal.data.update(shards=plan.number + 1, rows=writer.rows, **counts)
            journal.save()
    except BaseException:
        log.error(
            "build interrupted after %d of %d sequences; the work done is kept in %s: "
            "rerun the same command with --resume to continue",
            writer.rows,
            summary.sequences,
            writer.directory,
        )
        raise
    finally:
        if bar is not None:
            bar.close()
    if plans:
        raise ConfigError(f"the embedder returned no vectors for chunks {sorted(plans)}")
    return EmbedOutcome(
        shards=tuple(shards),
        rows=writer.rows,
        reused=counts["reused"],
        embedded=counts["embedded"],
        reused_residues=counts["reused_residues"],
        embed_seconds=embedder.embed_seconds,
        embedded_residues=embedded_residues,
        windowed_sequences=windowed,
    )


# -- stage 4: decoys -------------------------------------------------------------------------
#: Work subdirectory holding the decoy shards of a build in progress.
DECOY_SHARDS = "decoy-shards"


def _residue_chunks(sequences: Sequence[str], chunk_residues: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of ``sequences`` of about ``chunk_residues`` residues each."""
    ranges: list[tuple[int, int]] = []
    start = size = 0
    for i, seq in enumerate(sequences):
        size += len(seq)
        if size >= chunk_residues:
            ranges.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(sequences):
        ranges.append((start, len(sequences)))
    return ranges


def _gather_rows(shards: Sequence[Path], rows: np.ndarray) -> np.ndarray:
    """float32 ``[len(rows), dim]`` vectors of database ``rows`` (sorted) from chunk shards."""
    parts = []
    start = 0
    for shard in shards:
        part: np.ndarray = np.load(shard, mmap_mode="r")
        stop = start + part.shape[0]
        inside = rows[(rows >= start) & (rows < stop)]
        if inside.size:
            parts.append(np.asarray(part[inside - start], dtype=np.float32))
        start = stop
    return np.concatenate(parts)


def embed_decoys(
    writer: IndexWriter,
    journal: BuildJournal,
    prep: Prepared,
    cfg: BuildConfig,
    previous: PreviousVectors | None,
    database: Sequence[Path] = (),
    block_embedder: BlockEmbedder | None = None,
) -> DecoyOutcome:
    """Stage 4: the decoys behind E-values, in ``decoys.npy``, and the index's shape.

    With ``prep.decoys`` set, either

    * copies the previous version's decoys and shape, when ``previous`` (which
      :func:`plan_reuse` only returns for an equal model contract: checkpoint
      sha256, layer, pooling, normalisation, precision, dim) holds decoys of equal
      count, seed, method and block size -- the database may have changed since,
      and the decoys then stay those of its earlier sample; or
    * makes them (:func:`esmsearch.significance.decoy_sequences`: residues of a seeded
      sample of the database's sequences shuffled) and embeds them with this build's
      model, in chunks of about ``cfg.chunk_residues`` residues, each written to
      ``<work>/decoy-shards/decoy-NNNNNN.npy`` and journaled like :func:`embed_chunks`, so a resumed
      build continues after the last finished chunk; then concatenates them and
      estimates the shape (:meth:`esmsearch.significance.DecoyNull.estimate_shape`)
      from the database vectors of :func:`esmsearch.significance.pseudo_query_rows`,
      each without the decoy made from its own sequence.

    ``decoys.npy`` is fsynced before the journal records the stage (and the shape)
    as done.

    Args:
        writer: the work directory's writer.
        journal: the build's journal (:func:`open_work`, already saved by
            :func:`embed_chunks`).
        prep: from :func:`validate` (``prep.decoys`` says how many, which seed).
        cfg: chunk size and progress bar.
        previous: from :func:`plan_reuse`.
        database: the database's vector shards in row order (:attr:`EmbedOutcome.shards`),
            for the pseudo-queries.
        block_embedder: the model (default: :class:`LocalBlockEmbedder` over
            ``prep.embedder``); a distributed build passes its Ray embedder.

    Returns:
        What was written (the settings with the shape) and how long embedding took.

    Raises:
        ConfigError: the FASTA changed since validation.
        OSError: a shard, the journal or ``decoys.npy`` cannot be written.
    """
    settings = prep.decoys
    if settings is None:
        return DecoyOutcome(None, None, 0.0, 0)
    out = writer.decoys_path()
    if journal.data.get("decoys_done") and out.is_file():
        journaled = dataclasses.replace(settings, shape=float(journal.data["decoy_shape"]))
        return DecoyOutcome(journaled, journal.data.get("decoys_reused_from"), 0.0, 0)
    if previous is not None and previous.decoys is not None and settings.same_decoys(previous.decoy_settings):
        assert previous.decoy_settings is not None
        reused = dataclasses.replace(settings, shape=previous.decoy_settings.shape)
        writer.write_decoys(np.asarray(previous.decoys))
        journal.data.update(decoys_done=True, decoys_reused_from=previous.version, decoy_shape=reused.shape)
        journal.save()
        log.info(
            "reused the %d decoys of version %s (same model contract, count and seed)", settings.count, previous.version
        )
        return DecoyOutcome(reused, previous.version, 0.0, 0)
    emb = prep.embedder
    sequences = decoy_sequences((r.sequence for r in read_fasta(prep.fasta)), prep.summary.sequences, settings)
    ranges = _residue_chunks(sequences, cfg.chunk_residues)
    shard_dir = writer.directory / DECOY_SHARDS
    shard_dir.mkdir(exist_ok=True)
    done = int(journal.data.get("decoy_shards", 0))
    for stale in shard_dir.glob("*"):
        finished = stale.name.startswith("decoy-") and ".tmp" not in stale.name and int(stale.name[6:12]) < done
        if not finished:
            stale.unlink()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(len(s) for s in sequences),
            unit="res",
            unit_scale=True,
            desc=f"embedding {settings.count} decoys",
            file=sys.stderr,
        )
    shards = [shard_dir / f"decoy-{n:06d}.npy" for n in range(len(ranges))]
    if bar is not None:
        bar.update(sum(len(s) for s in sequences[: ranges[done - 1][1]]) if done else 0)
    todo = [EmbedBlock(n, tuple(sequences[start:stop])) for n, (start, stop) in enumerate(ranges) if n >= done]
    model = block_embedder if block_embedder is not None else LocalBlockEmbedder(emb)
    seconds_before = model.embed_seconds
    embedded_residues = 0
    try:
        for block, vectors in model.embed_blocks(todo, bar.update if bar else None):
            embedded_residues += block.residues
            _write_shard(shards[block.number], vectors)  # durable before the journal names it
            journal.data.update(decoy_shards=block.number + 1)
            journal.save()
    finally:
        if bar is not None:
            bar.close()
    embed_seconds = model.embed_seconds - seconds_before
    assemble(shards, out, emb.dim)
    fsutil.fsync_file(out)
    fsutil.fsync_dir(out.parent)
    estimated = dataclasses.replace(settings, shape=_estimate_shape(out, settings, prep.summary.sequences, database))
    journal.data.update(decoys_done=True, decoys_reused_from=None, decoy_shape=estimated.shape)
    journal.save()
    shutil.rmtree(shard_dir)
    log.info(
        "embedded %d decoys (%d residues) in %.1f s; extreme-value shape %.4f",
        settings.count,
        sum(len(s) for s in sequences),
        embed_seconds,
        estimated.shape,
    )
    return DecoyOutcome(estimated, None, embed_seconds, embedded_residues)


def _estimate_shape(decoys_path: Path, settings: DecoySettings, n_sequences: int, database: Sequence[Path]) -> float:
    """The regional shape from pseudo-queries (database rows), each without its own decoy."""
    rows = pseudo_query_rows(n_sequences, settings.seed)
    column_of = {int(row): j for j, row in enumerate(sample_decoy_rows(n_sequences, settings))}
    own = np.array([column_of.get(int(r), -1) for r in rows], dtype=np.int64)
    null = DecoyNull(np.load(decoys_path, mmap_mode="r"), settings)
    return null.estimate_shape(_gather_rows(database, rows), own)


# -- stage 5: assemble ----------------------------------------------------------------------
def assemble(shards: Sequence[Path], out: Path, dim: int, *, store_dtype: str = "float32") -> int:
    """Stage 5: concatenate chunk shards, in order, into one ``.npy`` file.

    Streams shard by shard into a memory-mapped ``out`` (memory bounded by one shard).

    Args:
        shards: ``.npy`` files, each float32 ``[n_i, dim]``, in row order.
        out: the ``embeddings.npy`` to write: ``[sum(n_i), dim]`` in ``store_dtype``.
        dim: embedding dimension.
        store_dtype: ``float32`` (a plain copy) or ``float16`` (rounded to nearest: half
            the size; see :data:`esmsearch.store.STORE_DTYPES`).

    Returns:
        The number of rows written.

    Raises:
        IndexFormatError: a shard is not a float32 ``[n, dim]`` array.
        ConfigError: ``store_dtype`` is not one of :data:`esmsearch.store.STORE_DTYPES`.
        OSError: a shard cannot be read or ``out`` written.
    """
    if store_dtype not in STORE_DTYPES:
        raise ConfigError(f"store_dtype must be one of {', '.join(STORE_DTYPES)}, got {store_dtype!r}")
    sizes: list[int] = []
    for shard in shards:
        part: np.ndarray = np.load(shard, mmap_mode="r")
        if part.ndim != 2 or part.shape[1] != dim or part.dtype != np.float32:
            raise IndexFormatError(f"shard {shard} is {part.dtype} {list(part.shape)}, expected float32 [n, {dim}]")
        sizes.append(int(part.shape[0]))
    rows = sum(sizes)
    vectors = np.lib.format.open_memmap(out, mode="w+", dtype=np.dtype(store_dtype), shape=(rows, dim))
    start = 0
    for shard, size in zip(shards, sizes, strict=True):
        vectors[start : start + size] = np.load(shard)
        start += size
    vectors.flush()
    del vectors
    return rows


# -- stage 6: build FAISS -------------------------------------------------------------------
def _npy_layout(path: Path) -> tuple[int, int, np.dtype[Any], int]:
    """``(rows, dim, dtype, header bytes)`` of a 2-D C-ordered ``.npy`` file."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        offset = fh.tell()
    if len(shape) != 2 or fortran or dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise IndexFormatError(
            f"{path} is {dtype} {list(shape)}{' (Fortran order)' if fortran else ''}, expected float32 or "
            "float16 [n, dim] in C order"
        )
    return int(shape[0]), int(shape[1]), dtype, offset


def iter_stored_vectors(path: Path, block_rows: int = FAISS_BLOCK_ROWS) -> Iterator[np.ndarray]:
    """Stream ``embeddings.npy`` as float32 unit vectors, ``block_rows`` rows at a time.

    Plain file reads into one block at a time (not a memory map, so the build's
    resident memory is one block, not the page cache of the whole file); float16
    rows are cast and re-normalised (:func:`esmsearch.store.unit_float32`).

    Args:
        path: a float32 or float16 ``[n, dim]`` ``.npy`` file.
        block_rows: rows per yielded block, >= 1.

    Yields:
        float32 ``[<= block_rows, dim]`` blocks, in row order.

    Raises:
        IndexFormatError: not a 2-D float32/float16 array, or the file is truncated.
    """
    rows, dim, dtype, offset = _npy_layout(path)
    with open(path, "rb") as fh:
        fh.seek(offset)
        for start in range(0, rows, block_rows):
            n = min(block_rows, rows - start)
            buf = np.empty((n, dim), dtype=dtype)
            got = fh.readinto(buf.data.cast("B"))
            if got != buf.nbytes:
                raise IndexFormatError(f"{path} is truncated: {got} of {buf.nbytes} bytes at row {start}")
            yield unit_float32(buf)


def build_faiss(
    embeddings: Path,
    spec: IndexSpec,
    out: Path,
    *,
    block_rows: int = FAISS_BLOCK_ROWS,
    ondisk: bool | None = None,
    memory_budget_bytes: int | None = None,
    on_rows: Callable[[int], object] | None = None,
) -> OutOfCoreBuild:
    """Stage 6: build the FAISS index of ``spec`` over stored vectors, out of core, and write it.

    Streams ``embeddings`` twice in blocks of ``block_rows`` rows
    (:func:`iter_stored_vectors`) through
    :func:`esmsearch.vector_index.build_out_of_core`: indexes that need training (IVF,
    PQ, SQ) train on a seeded uniform sample of
    :func:`esmsearch.vector_index.default_training_sample_size` rows
    (``max(64 x nlist, 65,536)``, capped at the database; seed 0), then every block is
    added in row order. An IVF whose inverted lists, ``n x (code bytes + 8)``, exceed
    ``memory_budget_bytes`` (default: half of physical RAM) gets them on disk, in
    ``index.ivfdata`` beside ``out`` (FAISS ``OnDiskInvertedLists``, merged shard by
    shard with ``merge_ondisk``). Peak memory: the trained index + one block (+ the
    inverted lists when they stay in RAM), never the whole float32 database. Flat and
    HNSW indexes hold every vector by nature; for them this saves the copy of the
    database an in-memory build makes.

    Args:
        embeddings: ``.npy`` float32 or float16 ``[n, dim]``, L2-normalised (row i = sequence i).
        spec: the index type (from :func:`validate`).
        out: the ``index.faiss`` file to write; ``<stem>.ivfdata`` may appear beside it.
        block_rows: rows read per block.
        ondisk: force (True) or forbid (False) on-disk inverted lists; None decides by budget.
        memory_budget_bytes: bytes the inverted lists may take in RAM.
        on_rows: called with the rows of each block added (progress).

    Returns:
        What was written (:class:`esmsearch.vector_index.OutOfCoreBuild`: ``ntotal``,
        ``train_rows``, ``ivfdata_path``).

    Raises:
        InvalidIndexFactoryError: FAISS rejects the spec for these vectors, or there
            are fewer vectors than it needs to train.
        IndexFormatError: ``embeddings`` is not a float32/float16 ``[n, dim]`` array.
        OSError: ``out`` cannot be written.
    """
    from esmsearch import vector_index

    rows, dim, _dtype, _offset = _npy_layout(embeddings)
    if rows == 0:
        raise IndexFormatError(f"{embeddings} holds no vectors")
    return vector_index.build_out_of_core(
        lambda: iter_stored_vectors(embeddings, block_rows),
        rows,
        dim,
        spec,
        out,
        work_dir=out.parent,
        ondisk=ondisk,
        memory_budget_bytes=memory_budget_bytes,
        on_rows=on_rows,
    )


def count_changes(
    outcome: EmbedOutcome, rows: Iterable[tuple[str, str]], previous: PreviousVectors | None
) -> ReuseCounts:
    """How the new rows relate to the previous version.

    Args:
        outcome: from :func:`embed_chunks` (reused/embedded counts).
        rows: ``(record_id, sequence_sha256)`` of every new row.
        previous: from :func:`plan_reuse`; None gives zero added/changed/removed.
    """
    if previous is None:
        return ReuseCounts(reused=outcome.reused, embedded=outcome.embedded, reused_residues=outcome.reused_residues)
    new_ids = dict(rows)
    old = previous.sha_by_id
    return ReuseCounts(
        reused=outcome.reused,
        embedded=outcome.embedded,
        added=sum(1 for rid in new_ids if rid not in old),
        changed=sum(1 for rid, sha in new_ids.items() if rid in old and old[rid] != sha),
        removed=sum(1 for rid in old if rid not in new_ids),
        reused_residues=outcome.reused_residues,
    )


# -- stage 7: verify ------------------------------------------------------------------------
def verify(writer: IndexWriter, fields: dict[str, Any]) -> Verified:
    """Stage 7: seal the work directory and check it before anything is published.

    Writes the manifest last (:meth:`IndexWriter.finish`: checksums, fsync, re-open
    with row counts) and runs :func:`esmsearch.versions.verify_index` (checksums,
    row counts, seeded self-search).

    Args:
        writer: the work directory's writer, with every data file written.
        fields: :class:`Manifest` fields (see :meth:`IndexWriter.finish`).

    Raises:
        IndexFormatError: with the reason the index is not consistent.
    """
    manifest = writer.finish(**fields)
    report = verify_index(writer.directory)
    log.info(
        "verified %s: checksums, row counts, %d/%d sampled self-hits at rank 1",
        manifest.version,
        report.self_hits_at_rank1,
        report.sampled,
    )
    return Verified(manifest, report)


# -- stage 8: publish -----------------------------------------------------------------------
def publish_standalone(work: Path, out: Path, *, overwrite: bool) -> Path:
    """Stage 8 (standalone): move the verified work directory to ``out``.

    See :func:`esmsearch.store.publish_directory`: an existing index at ``out`` is
    swapped out atomically with ``overwrite``. On failure the work directory is
    removed and ``out`` holds a whole index (the old one, or the new one if only the
    final fsync failed).

    Returns:
        ``out``.

    Raises:
        FileExistsError, IndexFormatError, OSError: see ``publish_directory``.
    """
    try:
        publish_directory(work, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def publish_version(index_root: IndexRoot, work: Path, version: str, *, keep_versions: int | None = None) -> Path:
    """Stage 8 (versioned root): add ``versions/<version>``, swap ``current``, prune.

    Each step is atomic and durable (rename + fsync of the directory): ``current``
    names a whole version at every instant, the old one until the swap.

    Args:
        index_root: the root (its build lock held by the caller).
        work: the verified work directory.
        version: the new version's id (its manifest's ``version``).
        keep_versions: after the swap, delete all but the newest N versions (never
            the live one); None keeps all.

    Returns:
        The new version's directory.

    Raises:
        IndexFormatError: the version exists already.
        OSError: a rename or fsync failed (``current`` still names the old version
            unless only the fsync after its swap failed).
    """
    try:
        path = index_root.add_version(work, version)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    index_root.set_current(version)
    if keep_versions is not None:
        deleted = index_root.prune(keep_versions)
        if deleted:
            log.info("retention (keep %d): deleted versions %s", keep_versions, ", ".join(deleted))
    return path


# -- the pipeline ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Built:
    manifest: Manifest
    info: dict[str, Any]
    reuse: ReuseCounts
    embed_seconds: float
    embedded_residues: int


def _build_in(work: Path, prep: Prepared, cfg: BuildConfig, previous: PreviousVectors | None, t_start: float) -> _Built:
    """Stages 3-7 into the work directory ``work`` (published by the caller)."""
    emb, summary = prep.embedder, prep.summary
    journal = open_work(work, prep, cfg, previous)
    with IndexWriter(work, resume=bool(journal.data)) as writer:
        writer.keep_on_error = True  # while embedding, a failure leaves a resumable state
        if cfg.distributed is not None:
            from esmsearch.indexer.distributed import RayBlockEmbedder

            with RayBlockEmbedder(cfg.distributed, emb) as ray_embedder:
                outcome = embed_chunks(writer, journal, prep, cfg, previous, ray_embedder)
                decoys = embed_decoys(writer, journal, prep, cfg, previous, outcome.shards, ray_embedder)
            distributed_info: dict[str, Any] | None = ray_embedder.info()
        else:
            outcome = embed_chunks(writer, journal, prep, cfg, previous)
            decoys = embed_decoys(writer, journal, prep, cfg, previous, outcome.shards)
            distributed_info = None
        writer.keep_on_error = False  # past embedding, a failure discards the work directory
        if outcome.rows != summary.sequences:
            raise ConfigError(
                f"partial build at {work} holds {outcome.rows} rows but {prep.fasta} has "
                f"{summary.sequences} sequences; remove it and build again"
            )
        assemble(outcome.shards, writer.embeddings_path(), emb.dim, store_dtype=cfg.store_dtype)
        shutil.rmtree(writer.directory / "shards")  # before the FAISS build: free the disk it needs
        t_faiss = time.perf_counter()
        faiss_build = build_faiss(writer.embeddings_path(), prep.spec, writer.directory / FAISS_FILE)
        faiss_seconds = time.perf_counter() - t_faiss
        journal.path.unlink()
        reuse = count_changes(outcome, ((rid, sha) for _r, rid, _d, _l, sha in writer.iter_metadata()), previous)
        info: dict[str, Any] = {
            "sequences": summary.sequences,
            "residues": summary.residues,
            "longest_sequence": summary.longest,
            "windowed_sequences": outcome.windowed_sequences,
            "window_residues": WINDOW_RESIDUES,
            "window_overlap": WINDOW_OVERLAP,
            "embedded_sequences": reuse.embedded,
            "reused_sequences": reuse.reused,
            "previous_version": previous.version if previous else None,
            "previous_residues_per_s": previous.residues_per_s if previous else None,
            "embed_seconds": round(outcome.embed_seconds, 3),
            "total_seconds": round(time.perf_counter() - t_start, 3),
            "residues_per_s": (
                round(outcome.embedded_residues / outcome.embed_seconds, 1) if outcome.embed_seconds else None
            ),
            "device": str(emb.device) if distributed_info is None else distributed_info["device"],
            "toks_per_batch": emb.toks_per_batch,
            "decoys_reused_from": decoys.reused_from,
            "decoy_embed_seconds": round(decoys.embed_seconds, 3),
            "decoy_embedded_residues": decoys.embedded_residues,
            "faiss_seconds": round(faiss_seconds, 3),
            "faiss_train_rows": faiss_build.train_rows,
            "faiss_ondisk_lists": faiss_build.ondisk,
        }
        if distributed_info is not None:
            info["distributed"] = distributed_info
        verified = verify(
            writer,
            {
                "model_name": emb.model_name,
                "model_source": emb.model_source,
                "model_source_kind": emb.model_source_kind,
                "checkpoint_sha256": emb.checkpoint_sha256,
                "layer": emb.layer,
                "pooling": POOLING,
                "normalisation": NORMALISATION,
                "precision": emb.precision,
                "metric": "inner_product",
                "dim": emb.dim,
                "index_factory": prep.spec.factory,
                "search_params": {k: v for k, v in prep.spec.to_json().items() if k != "factory" and v is not None},
                "source_fasta": str(prep.fasta),
                "source_fasta_sha256": summary.sha256,
                "tool_version": __version__,
                "build": info,
                "decoys": decoys.settings,
                "store_dtype": cfg.store_dtype,
            },
        )
    return _Built(verified.manifest, info, reuse, outcome.embed_seconds, outcome.embedded_residues)


def build_index(
    fasta_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model: str,
    layer: int | None = None,
    toks_per_batch: int = 4096,
    device: str = "auto",
    precision: str = "fp32",
    index_factory: str = "Flat",
    chunk_residues: int = 200_000,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    embedder: Embedder | None = None,
    decoys: int = DEFAULT_DECOYS,
    decoy_seed: int = DEFAULT_DECOY_SEED,
    store_dtype: str = "float32",
    distributed: DistributedConfig | None = None,
) -> BuildResult:
    """Embed a FASTA database and write a standalone index directory at ``out_dir``.

    Args:
        fasta_path: database FASTA, plain or gzip.
        out_dir: destination; must not exist unless ``overwrite``.
        model: ESM-2 pretrained name or local fair-esm ``.pt`` path.
        layer: representation layer (None = last).
        toks_per_batch: token budget per forward pass.
        device: ``auto|cpu|cuda|cuda:N``.
        precision: ``fp32|bf16|fp16|auto``; ``auto`` is bf16 on CUDA devices with bf16
            support and on CPUs with AMX, fp32 elsewhere. The resolved value is the
            manifest's ``precision``, at which the server embeds queries.
        index_factory: FAISS factory string (``Flat``, ``IVF1024,Flat``, ``HNSW32``, ...)
            or ``auto`` (chosen from database size; see :func:`esmsearch.vector_index.auto_spec`).
        chunk_residues: residues per streamed chunk (memory bound).
        overwrite: replace an existing index at ``out_dir``.
        resume: continue an interrupted build of the same FASTA with the same model
            settings from its last completed chunk (kept in
            :func:`partial_build_dir`); the result equals an uninterrupted build.
        progress: show a progress bar in residues/s on stderr.
        embedder: reuse an already loaded :class:`Embedder` (its settings win over
            ``model``/``layer``/``device``/``precision``/``toks_per_batch``; with
            ``distributed`` it is the driver's copy, used for its settings only).
        decoys: shuffled database sequences to embed for E-values, >= 0 (default
            :data:`~esmsearch.significance.DEFAULT_DECOYS` = 10,000; a database of fewer
            sequences gets one decoy per sequence); 0 builds an index without
            E-values. They add about ``min(decoys, n) / n`` of the database's
            embedding time to a first build.
        decoy_seed: seed of the decoy sample and shuffles (recorded in the manifest).
        store_dtype: ``float32`` or ``float16`` for ``embeddings.npy`` (float16: half
            the disk; recorded in the manifest; the FAISS index is built from the
            vectors cast back to float32 and re-normalised).
        distributed: embed on a Ray cluster instead of in this process
            (:class:`esmsearch.indexer.distributed.DistributedConfig`); the result
            equals a single-process build's (same rows, vectors within 1e-6). The
            decoys go through the same cluster.

    Returns:
        :class:`BuildResult` with the manifest and timings.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
        FileNotFoundError, FastaFormatError, InvalidSequenceError, DuplicateRecordError:
            bad database FASTA (found before any embedding).
        ModelLoadError: the model cannot be loaded.
        InvalidIndexFactoryError: bad factory string (found before any embedding).
        IndexFormatError: the built index failed verification.
        ConfigError: a setting out of range, or a partial build that cannot be resumed.
        DistributedError: the Ray cluster cannot be reached or a block failed for good
            (with ``distributed``; the work done is kept for ``resume``).

    On any error an existing index at ``out_dir`` is untouched (it is replaced by an
    atomic exchange, see :func:`esmsearch.store.publish_directory`; only if the fsync
    after that exchange fails is the whole new index left there), and no new one
    appears at a fresh ``out_dir``.
    A failure while embedding keeps the work done in :func:`partial_build_dir` for
    ``resume``; a failure before it (bad input, model, factory) leaves nothing.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    cfg = BuildConfig(
        model=model,
        layer=layer,
        toks_per_batch=toks_per_batch,
        device=device,
        precision=precision,
        index_factory=index_factory,
        chunk_residues=chunk_residues,
        resume=resume,
        progress=progress,
        decoys=decoys,
        decoy_seed=decoy_seed,
        store_dtype=store_dtype,
        distributed=distributed,
    )
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    prep = validate(Path(fasta_path), cfg, embedder)
    built = _build_in(partial_build_dir(out), prep, cfg, None, t_start)
    publish_standalone(partial_build_dir(out), out, overwrite=overwrite)
    return _result(built, out, prep, t_start, None)


def build_version(
    fasta_path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    model: str,
    layer: int | None = None,
    toks_per_batch: int = 4096,
    device: str = "auto",
    precision: str = "fp32",
    index_factory: str = "Flat",
    chunk_residues: int = 200_000,
    resume: bool = False,
    progress: bool = False,
    reuse: bool = True,
    keep_versions: int | None = None,
    embedder: Embedder | None = None,
    decoys: int = DEFAULT_DECOYS,
    decoy_seed: int = DEFAULT_DECOY_SEED,
    store_dtype: str = "float32",
    distributed: DistributedConfig | None = None,
) -> BuildResult:
    """Build a new version of a versioned index root and make it live.

    Holds ``ROOT/.build.lock`` for the whole build (a second concurrent build fails
    at once with :class:`~esmsearch.versions.BuildLockedError`). With ``reuse``, the
    vectors of sequences whose sha256 is in the live version are copied instead of
    re-embedded, provided the live version was built with the same checkpoint
    sha256, layer, pooling, normalisation and precision (otherwise everything is re-embedded);
    removed sequences disappear. The new version is verified (checksums, row counts,
    self-search), moved to ``ROOT/versions/<version>``, and ``ROOT/current`` is
    swapped to it atomically and durably; a failure at any point leaves ``current``
    naming the old version (or, if only the fsync after the swap failed, the new one).

    Args:
        fasta_path, model, layer, toks_per_batch, device, precision, index_factory,
        chunk_residues, resume, progress, embedder, decoys, decoy_seed, store_dtype,
        distributed: as for :func:`build_index`; the live version's decoys are reused
            (copied) when ``reuse`` is on, its model contract equals this build's and
            its decoy count and seed are the same. Reuse is planned before embedding,
            so a distributed build sends only new or changed sequences to its workers.
        root: the versioned root (created if missing).
        reuse: reuse vectors from the live version (incremental rebuild).
        keep_versions: after publishing, delete all but the newest N versions
            (never the live one); None keeps all.

    Returns:
        :class:`BuildResult`; ``reuse`` holds reused/embedded/added/changed/removed counts.

    Raises:
        BuildLockedError: another build of this root is running.
        plus everything :func:`build_index` raises (but not FileExistsError).
    """
    t_start = time.perf_counter()
    cfg = BuildConfig(
        model=model,
        layer=layer,
        toks_per_batch=toks_per_batch,
        device=device,
        precision=precision,
        index_factory=index_factory,
        chunk_residues=chunk_residues,
        resume=resume,
        progress=progress,
        decoys=decoys,
        decoy_seed=decoy_seed,
        store_dtype=store_dtype,
        distributed=distributed,
    )
    if keep_versions is not None and keep_versions < 1:
        raise ConfigError(f"keep_versions must be >= 1, got {keep_versions}")
    index_root = IndexRoot(root)
    with index_root.lock():
        index_root.create()
        prep = validate(Path(fasta_path), cfg, embedder)
        previous = None
        live = index_root.current_version()
        if reuse and live is not None:
            with Index.open(index_root.current_path()) as live_index:
                previous = plan_reuse(prep.embedder, live_index, cfg.store_dtype)
        built = _build_in(index_root.partial_dir, prep, cfg, previous, t_start)
        path = publish_version(index_root, index_root.partial_dir, built.manifest.version, keep_versions=keep_versions)
    return _result(built, path, prep, t_start, live)


def _result(built: _Built, path: Path, prep: Prepared, t_start: float, previous_version: str | None) -> BuildResult:
    windowed = int(built.info["windowed_sequences"])
    if windowed:
        log.info("%d sequences longer than %d residues were embedded in overlapping windows", windowed, WINDOW_RESIDUES)
    return BuildResult(
        manifest=built.manifest,
        path=path,
        sequences=prep.summary.sequences,
        residues=prep.summary.residues,
        windowed_sequences=windowed,
        seconds=time.perf_counter() - t_start,
        embed_seconds=built.embed_seconds,
        embedded_residues=built.embedded_residues,
        reuse=built.reuse,
        previous_version=previous_version,
    )
