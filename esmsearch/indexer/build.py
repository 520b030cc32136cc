"""Build an index from a protein FASTA file: standalone directory or new version of a root.

The pipeline is eight stages (:class:`esmsearch.indexer.journal.Stage`), each a
plain function with typed input and output, so that a test can run (or swap) one
alone. Each stage writes into the work directory (:func:`partial_build_dir`, or
``ROOT/.build.partial``), fsyncs its output, and is then recorded in the journal
(:class:`~esmsearch.indexer.journal.BuildJournal`, ``build-state.json``) with the
size and sha256 of what it wrote. Nothing a later stage reads is deleted before that
stage is recorded, and a failure at any stage keeps the work directory, so
``resume`` restarts at the first stage not recorded (:func:`open_work`):

1. ``validate`` -- :func:`validate`: the whole FASTA first (ids, residues, duplicates:
   a bad record at the end of a large database fails in seconds, before any
   embedding work), the model, and the FAISS factory string against its dimension
   -> :class:`Prepared`; then :func:`plan_reuse`: whether the live version's
   vectors can be reused (same checkpoint, layer, pooling, normalisation,
   precision, dim) -> :class:`PreviousVectors`; :func:`open_work` records the stage;
2. ``embed`` -- :func:`embed_chunks`: stream records in chunks of about
   ``chunk_residues`` residues; per chunk, copy reused vectors, hand the rest to a
   :class:`BlockEmbedder` (in this process: :class:`LocalBlockEmbedder`,
   length-sorted token-budget batches; on a Ray cluster:
   :class:`esmsearch.indexer.distributed.RayBlockEmbedder`, which gets only the
   sequences that need the model and returns their vectors in input order), write
   the chunk's vectors to ``shards/shard-NNNNNN.npy`` (fsynced) and its metadata to
   SQLite, then journal the chunk -- memory is bounded by one chunk (a wave of
   chunks when distributed), and a crash resumes after the last journaled chunk
   -> :class:`EmbedOutcome`;
3. ``decoys`` -- :func:`embed_decoys`: the decoys behind E-values
   (:mod:`esmsearch.significance`): shuffles of a seeded sample of the database's
   sequences, embedded with the same model through the same :class:`BlockEmbedder`
   into ``decoys.npy`` (journaled in chunks like stage 2), and the index's
   extreme-value shape estimated from database rows scored against them; or both
   copied from the previous version when its model contract and decoy count and
   seed are this build's -> :class:`DecoyOutcome`;
4. ``assemble`` -- :func:`assemble`: concatenate the shards into ``embeddings.npy``
   (float32 or float16, ``store_dtype``); the shards are deleted once it is recorded;
5. ``train`` -- :func:`esmsearch.indexer.faiss_stage.train_faiss`: an IVF/PQ/SQ
   index trained on a seeded sample of ``embeddings.npy``, written empty to
   ``trained.faiss`` (nothing for Flat/HNSW);
6. ``add`` -- :func:`esmsearch.indexer.faiss_stage.add_faiss`: every stored vector
   streamed into the trained index, written to ``index.faiss`` (inverted lists on
   disk in ``index.ivfdata`` when they exceed half of RAM) -- memory is bounded by
   the trained index, one block and the codes, never by a float32 copy of the
   database; ``trained.faiss`` is deleted once it is recorded;
7. ``verify`` -- :func:`verify`: write the manifest last (checksums, fsync), then
   check checksums, row counts and a self-search -> :class:`Verified`. A failed
   verification unrecords train and add, so ``resume`` rebuilds the FAISS index
   from the (checksummed) vectors;
8. ``publish`` -- :func:`publish_standalone` (rename, or atomic exchange with
   ``overwrite``, to ``out_dir``; :func:`build_index`) or :func:`publish_version`
   (``ROOT/versions/<version>`` and an atomic swap of ``ROOT/current``;
   :func:`build_version`). Every publishing rename is followed by an fsync of its
   directory; the journal is removed from the published directory.

Only publishing, a fresh (non-resume) build of the same output, or
:func:`discard_partial` (``--discard``) removes a work directory. A resume whose
FAISS factory or search parameters differ keeps every vector and redoes stages 5-7.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from esmsearch.indexer.blocks import BlockEmbedder, EmbedBlock, LocalBlockEmbedder
from esmsearch.indexer.datatypes import (
    BuildConfig,
    BuildResult,
    DecoyOutcome,
    EmbedOutcome,
    FastaSummary,
    Prepared,
    PreviousVectors,
    ReuseCounts,
    Verified,
)
from esmsearch.indexer.embed_stage import embed_chunks, embed_decoys
from esmsearch.indexer.faiss_stage import (
    FAISS_BLOCK_ROWS,
    TRAINED_FILE,
    Trained,
    add_faiss,
    build_faiss,
    iter_stored_vectors,
    train_faiss,
)
from esmsearch.indexer.journal import JOURNAL_FILE, BuildJournal, FileDigest, Stage, StageRecord
from esmsearch.indexer.publish import discard_partial, partial_build_dir, publish_standalone, publish_version
from esmsearch.indexer.shards import SHARDS, assemble
from esmsearch.sequences import read_fasta
from esmsearch.significance import DEFAULT_DECOY_SEED, DEFAULT_DECOYS, DecoySettings
from esmsearch.store import (
    DECOYS_FILE,
    EMBEDDINGS_FILE,
    FAISS_FILE,
    IVFDATA_FILE,
    MANIFEST,
    Index,
    IndexWriter,
    Manifest,
)
from esmsearch.versions import IndexRoot, verify_index

if TYPE_CHECKING:
    from esmsearch.indexer.distributed import DistributedConfig

__all__ = [
    "FAISS_BLOCK_ROWS",
    "BlockEmbedder",
    "BuildConfig",
    "BuildJournal",
    "BuildResult",
    "DecoyOutcome",
    "EmbedBlock",
    "EmbedOutcome",
    "FastaSummary",
    "LocalBlockEmbedder",
    "Prepared",
    "PreviousVectors",
    "ReuseCounts",
    "Stage",
    "Trained",
    "Verified",
    "add_faiss",
    "assemble",
    "build_faiss",
    "build_index",
    "build_version",
    "count_changes",
    "discard_partial",
    "embed_chunks",
    "embed_decoys",
    "iter_stored_vectors",
    "open_work",
    "partial_build_dir",
    "plan_reuse",
    "publish_standalone",
    "publish_version",
    "scan_fasta",
    "train_faiss",
    "validate",
    "verify",
]

log = logging.getLogger(__name__)

#: Journal of a build in progress, inside the partial build directory.
STATE_FILE = JOURNAL_FILE


# -- stage 1 (validate): validate, plan reuse, open the work directory ----------------------
def scan_fasta(path: Path) -> FastaSummary:
    """Validate every record of ``path`` and count sequences and residues.

    The duplicate-id check keeps the ids on disk (:class:`~esmsearch.sequences.RecordIdSet`),
    so memory does not grow with the database.

    Raises:
        FileNotFoundError, FastaFormatError, InvalidSequenceError, DuplicateRecordError.
    """
    n = residues = longest = 0
    for rec in read_fasta(path, unique_ids="disk"):
        n += 1
        residues += len(rec.sequence)
        longest = max(longest, len(rec.sequence))
    if n == 0:
        raise FastaFormatError(f"{path}: no FASTA records")
    return FastaSummary(n, residues, longest, file_sha256(path))


def validate(fasta: Path, cfg: BuildConfig, embedder: Embedder | None = None) -> Prepared:
    """Stage ``validate``: everything that can fail cheaply, before any embedding.

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
    scanned = 4 * emb.dim * summary.sequences
    if spec.factory == "Flat" and scanned > vector_index.FLAT_SCAN_WARN_BYTES:
        log.warning(
            "a Flat index of %d x %d float32 is %.1f GiB and every query scans all of it (1,000,000 x 1,280, "
            "4.8 GiB, took 0.9 s per query on 2 CPU cores): for faster, approximate search build with "
            "--index-factory IVF%d,Flat (docs/index-builds.md)",
            summary.sequences,
            emb.dim,
            scanned / 2**30,
            vector_index.auto_nlist(summary.sequences),
        )
    decoys = DecoySettings.for_database(summary.sequences, cfg.decoys, cfg.decoy_seed)
    return Prepared(fasta, summary, emb, spec, decoys)


def plan_reuse(embedder: Embedder, live: Index | None, store_dtype: str = "float32") -> PreviousVectors | None:
    """Stage ``validate``, second half: decide whether the live version's vectors can be reused.

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


def _vector_settings(prep: Prepared, cfg: BuildConfig, previous: PreviousVectors | None) -> dict[str, Any]:
    """What the stored vectors depend on: a resumed build must share all of it."""
    return {
        "fasta_sha256": prep.summary.sha256,
        "chunk_residues": cfg.chunk_residues,
        "store_dtype": cfg.store_dtype,
        "reuse_version": previous.version if previous else None,
        "decoys": prep.decoys.to_json() if prep.decoys else None,
        **prep.embedder.settings,  # includes the resolved precision
    }


def _faiss_settings(prep: Prepared) -> dict[str, Any]:
    """What only the FAISS stages depend on: factory and search parameters."""
    return prep.spec.to_json()


#: Files of the FAISS stages and after, removed when a resume redoes them.
_FAISS_OUTPUTS = (TRAINED_FILE, FAISS_FILE, IVFDATA_FILE, MANIFEST)


def _stale_outputs(work: Path, journal: BuildJournal) -> Stage | None:
    """The first recorded stage whose outputs, still needed, are missing or differ from the journal."""
    state = journal.current
    for stage, record in state.stages.items():
        for name, expected in record.outputs.items():
            if name == SHARDS:
                if journal.done(Stage.ASSEMBLE):
                    continue  # consumed: deleted once assemble was recorded
                files = [work / SHARDS / f"shard-{n:06d}.npy" for n in range(state.shards)]
            elif name == TRAINED_FILE:
                if journal.done(Stage.ADD):
                    continue
                files = [work / name]
            else:
                files = [work / name]
            try:
                actual = FileDigest.of_files(files) if name == SHARDS else FileDigest.of(files[0])
            except OSError:
                actual = None
            if actual != expected:
                log.warning("%s: %s of stage %s is missing or changed; redoing it", work, name, stage.value)
                return stage
    return None


def _redo_from(stale: Stage, journal: BuildJournal) -> Stage:
    """Where to restart when ``stale``'s outputs are bad: there, or earlier when its inputs
    were deleted once it was recorded (the shards after assemble, ``trained.faiss`` after add)."""
    if stale in (Stage.DECOYS, Stage.ASSEMBLE) and journal.done(Stage.ASSEMBLE):
        return Stage.EMBED
    if stale == Stage.ADD:
        return Stage.TRAIN
    return stale


def open_work(work: Path, prep: Prepared, cfg: BuildConfig, previous: PreviousVectors | None) -> BuildJournal:
    """Check or clear the work directory and start or load its journal (stage 1 recorded).

    With ``cfg.resume`` and a partial build at ``work``, its journal is loaded and
    must have been written with this build's vector settings (FASTA checksum, model
    contract, chunk size, store dtype, reuse version, decoys); FAISS settings
    (factory, search parameters) may differ, and then the FAISS stages are redone
    from the stored vectors. Recorded outputs that a later stage still needs are
    checked against their journaled size and sha256, and the stage whose outputs
    differ is redone with every stage after it. Without ``resume``, a partial
    build there is removed.

    Returns:
        The journal, started (fresh build) or loaded (``journal.resumed``).

    Raises:
        ConfigError: the partial build cannot be resumed (missing journal, or other
            vector settings: each difference is named).
        OSError: the journal cannot be written.
    """
    journal = BuildJournal(work / STATE_FILE)
    if work.exists():
        if cfg.resume:
            journal.load()
            state = journal.current
            expected = _vector_settings(prep, cfg, previous)
            mismatch = {k: (state.settings.get(k), v) for k, v in expected.items() if state.settings.get(k) != v}
            if mismatch:
                details = "; ".join(f"{k}: partial build has {a!r}, this build {b!r}" for k, (a, b) in mismatch.items())
                raise ConfigError(
                    f"cannot resume the partial build at {work}: {details}; pass --discard to remove it, "
                    "or drop --resume"
                )
            faiss = _faiss_settings(prep)
            if state.faiss != faiss:
                log.warning(
                    "resuming %s with FAISS settings %s instead of %s: keeping every vector, redoing the FAISS stages",
                    work,
                    faiss,
                    state.faiss,
                )
                journal.forget_from(Stage.TRAIN)
                state.faiss = faiss
                journal.save()
            stale = _stale_outputs(work, journal)
            if stale is not None:
                journal.forget_from(_redo_from(stale, journal))
            if not journal.done(Stage.TRAIN):
                for name in _FAISS_OUTPUTS:
                    (work / name).unlink(missing_ok=True)
            done = [s.value for s in Stage if journal.done(s)]
            log.info("resuming %s: stages done: %s", work, ", ".join(done) or "none")
            return journal
        log.warning("removing the partial build left at %s (pass --resume to continue one)", work)
        shutil.rmtree(work)
    elif cfg.resume:
        log.info("no partial build at %s; starting from the beginning", work)
    work.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir()
    journal.start(_vector_settings(prep, cfg, previous), _faiss_settings(prep))
    journal.record(
        Stage.VALIDATE,
        StageRecord(
            info={
                "sequences": prep.summary.sequences,
                "residues": prep.summary.residues,
                "index_factory": prep.spec.factory,
            }
        ),
    )
    return journal


# -- counts for the manifest ---------------------------------------------------------------
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
    added, changed, removed = previous.changes(rows)  # in SQLite: memory flat in the row count
    return ReuseCounts(
        reused=outcome.reused,
        embedded=outcome.embedded,
        added=added,
        changed=changed,
        removed=removed,
        reused_residues=outcome.reused_residues,
    )


# -- stage 7 (verify) -----------------------------------------------------------------------
def verify(writer: IndexWriter, fields: dict[str, Any], known_sha256: dict[str, str] | None = None) -> Verified:
    """Stage ``verify``: seal the work directory and check it before anything is published.

    Writes the manifest last (:meth:`IndexWriter.finish`: checksums, fsync, re-open
    memory-mapped with row counts) and runs :func:`esmsearch.versions.verify_index`
    (row counts, decoys, seeded self-search on the memory-mapped index; checksums
    too unless ``known_sha256`` is given). Every file is hashed once: the files in
    ``known_sha256`` were hashed by the stage that wrote them, the rest by
    ``finish``; the FAISS index is never read into the heap.

    Args:
        writer: the work directory's writer, with every data file written.
        fields: :class:`Manifest` fields (see :meth:`IndexWriter.finish`).
        known_sha256: file name -> sha256 the build journaled when it wrote the
            file (None: hash everything, and check the checksums again).

    Raises:
        IndexFormatError: with the reason the index is not consistent.
    """
    manifest = writer.finish(known_sha256=known_sha256, **fields)
    report = verify_index(writer.directory, checksums=known_sha256 is None)
    log.info(
        "verified %s: checksums, row counts, %d/%d sampled self-hits at rank 1",
        manifest.version,
        report.self_hits_at_rank1,
        report.sampled,
    )
    return Verified(manifest, report)


# -- the pipeline ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Built:
    manifest: Manifest
    info: dict[str, Any]
    reuse: ReuseCounts
    embed_seconds: float
    embedded_residues: int


def _stage_seconds(journal: BuildJournal) -> dict[str, float]:
    return {stage.value: record.seconds for stage, record in journal.current.stages.items()}


def _build_in(work: Path, prep: Prepared, cfg: BuildConfig, previous: PreviousVectors | None, t_start: float) -> _Built:
    """Stages 1 (journal) to 7 into the work directory ``work`` (published by the caller).

    Skips every stage the journal records (:func:`open_work`); on any failure the
    work directory is kept and the exception carries a note saying how to resume.
    """
    try:
        journal = open_work(work, prep, cfg, previous)
    except ConfigError:
        raise  # a refused resume: the message says what differs
    except BaseException as exc:
        _note_kept(exc, work)
        raise
    try:
        if journal.done(Stage.VERIFY):
            manifest = Manifest.read(work)
            info = dict(manifest.build)
            return _Built(manifest, info, ReuseCounts(**info.get("reuse", {})), 0.0, 0)
        return _stages(work, journal, prep, cfg, previous, t_start)
    except BaseException as exc:
        _note_kept(exc, work)
        raise


def _note_kept(exc: BaseException, work: Path) -> None:
    """Log, and note on ``exc``, that the partial build at ``work`` is kept and how to resume it."""
    if not work.exists():
        return
    note = (
        f"the build's work is kept in {work}: rerun the same command with --resume to continue it "
        "(or with --discard to remove it)"
    )
    log.error("build failed (%s): %s", type(exc).__name__, note)
    exc.add_note(note)


def _stages(
    work: Path,
    journal: BuildJournal,
    prep: Prepared,
    cfg: BuildConfig,
    previous: PreviousVectors | None,
    t_start: float,
) -> _Built:
    """The stages after validation, each skipped when the journal records it."""
    emb, summary = prep.embedder, prep.summary
    state = journal.current
    with IndexWriter(work, resume=True) as writer:
        writer.keep_on_error = True  # a failure at any stage leaves a resumable state
        distributed_info: dict[str, Any] | None = None
        with contextlib.ExitStack() as stack:
            block_embedder: BlockEmbedder | None = None
            ray_embedder = None
            if cfg.distributed is not None and not journal.done(Stage.DECOYS):
                from esmsearch.indexer.distributed import RayBlockEmbedder

                ray_embedder = stack.enter_context(RayBlockEmbedder(cfg.distributed, emb))
                block_embedder = ray_embedder
            if journal.done(Stage.EMBED):
                outcome = EmbedOutcome(
                    shards=tuple(work / SHARDS / f"shard-{n:06d}.npy" for n in range(state.shards)),
                    rows=state.rows,
                    reused=state.reused,
                    embedded=state.embedded,
                    reused_residues=state.reused_residues,
                    embed_seconds=0.0,
                    embedded_residues=0,
                    windowed_sequences=state.windowed,
                )
            else:
                outcome = embed_chunks(writer, journal, prep, cfg, previous, block_embedder)
            if outcome.rows != summary.sequences:
                raise ConfigError(
                    f"partial build at {work} holds {outcome.rows} rows but {prep.fasta} has "
                    f"{summary.sequences} sequences; remove it (--discard) and build again"
                )
            decoys = embed_decoys(writer, journal, prep, cfg, previous, outcome.shards, block_embedder)
        if ray_embedder is not None:
            distributed_info = ray_embedder.info()

        embeddings = writer.embeddings_path()
        if not journal.done(Stage.ASSEMBLE):
            t0 = time.perf_counter()
            assemble(outcome.shards, embeddings, emb.dim, store_dtype=cfg.store_dtype)
            fsutil.fsync_file(embeddings)
            fsutil.fsync_dir(work)
            journal.record(
                Stage.ASSEMBLE,
                StageRecord(
                    outputs={embeddings.name: FileDigest.of(embeddings)},
                    info={"rows": outcome.rows, "store_dtype": cfg.store_dtype},
                    seconds=round(time.perf_counter() - t0, 3),
                ),
            )
        shutil.rmtree(work / SHARDS, ignore_errors=True)  # consumed: assemble is recorded

        trained_path = work / TRAINED_FILE
        if journal.done(Stage.TRAIN):
            record = state.stages[Stage.TRAIN]
            trained = Trained(trained_path if TRAINED_FILE in record.outputs else None, int(record.info["train_rows"]))
        else:
            t0 = time.perf_counter()
            trained = train_faiss(embeddings, prep.spec, trained_path)
            journal.record(
                Stage.TRAIN,
                StageRecord(
                    outputs={TRAINED_FILE: FileDigest.of(trained_path)} if trained.path is not None else {},
                    info={"train_rows": trained.train_rows, "index_factory": prep.spec.factory},
                    seconds=round(time.perf_counter() - t0, 3),
                ),
            )
        if not journal.done(Stage.ADD):
            t0 = time.perf_counter()
            faiss_file = work / FAISS_FILE
            built = add_faiss(embeddings, prep.spec, trained, faiss_file)
            outputs = {FAISS_FILE: FileDigest.of(faiss_file)}
            if built.ivfdata_path is not None:
                outputs[built.ivfdata_path.name] = FileDigest.of(built.ivfdata_path)
            journal.record(
                Stage.ADD,
                StageRecord(
                    outputs=outputs,
                    info={"ondisk": built.ondisk, "shards": built.shards},
                    seconds=round(time.perf_counter() - t0, 3),
                ),
            )
        trained_path.unlink(missing_ok=True)  # consumed: add is recorded

        reuse = count_changes(outcome, ((rid, sha) for _r, rid, _d, _l, sha in writer.iter_metadata()), previous)
        seconds = _stage_seconds(journal)
        info: dict[str, Any] = {
            "sequences": summary.sequences,
            "residues": summary.residues,
            "longest_sequence": summary.longest,
            "windowed_sequences": outcome.windowed_sequences,
            "window_residues": WINDOW_RESIDUES,
            "window_overlap": WINDOW_OVERLAP,
            "embedded_sequences": reuse.embedded,
            "reused_sequences": reuse.reused,
            "reuse": dataclasses.asdict(reuse),
            "previous_version": previous.version if previous else None,
            "previous_residues_per_s": previous.residues_per_s if previous else None,
            "embed_seconds": round(outcome.embed_seconds, 3),
            "embedded_residues": outcome.embedded_residues,
            "total_seconds": round(time.perf_counter() - t_start, 3),
            "residues_per_s": (
                round(outcome.embedded_residues / outcome.embed_seconds, 1) if outcome.embed_seconds else None
            ),
            "device": str(emb.device) if distributed_info is None else distributed_info["device"],
            "toks_per_batch": emb.toks_per_batch,
            "decoys_reused_from": decoys.reused_from,
            "decoy_embed_seconds": round(decoys.embed_seconds, 3),
            "decoy_embedded_residues": decoys.embedded_residues,
            "faiss_seconds": round(seconds.get(Stage.TRAIN.value, 0.0) + seconds.get(Stage.ADD.value, 0.0), 3),
            "faiss_train_rows": trained.train_rows,
            "faiss_ondisk_lists": bool(journal.info(Stage.ADD)["ondisk"]),
            "stage_seconds": seconds,
            "resumed": journal.resumed,
        }
        if distributed_info is not None:
            info["distributed"] = distributed_info
        t0 = time.perf_counter()
        try:
            known = {
                name: digest.sha256
                for record in state.stages.values()
                for name, digest in record.outputs.items()
                if name in (EMBEDDINGS_FILE, FAISS_FILE, IVFDATA_FILE, DECOYS_FILE)
            }
            verified = _verify_stage(writer, info, prep, cfg, decoys, known)
        except IndexFormatError:
            # The stored vectors are checksummed; what failed is built from them, so
            # a resume redoes the FAISS stages (and this one), never the embedding.
            journal.forget_from(Stage.TRAIN)
            raise
        manifest_path = work / MANIFEST
        journal.record(
            Stage.VERIFY,
            StageRecord(
                outputs={MANIFEST: FileDigest.of(manifest_path)},
                info={"version": verified.manifest.version},
                seconds=round(time.perf_counter() - t0, 3),
            ),
        )
    return _Built(verified.manifest, info, reuse, outcome.embed_seconds, outcome.embedded_residues)


def _verify_stage(
    writer: IndexWriter,
    info: dict[str, Any],
    prep: Prepared,
    cfg: BuildConfig,
    decoys: DecoyOutcome,
    known_sha256: dict[str, str],
) -> Verified:
    """Stage 7 with this build's manifest fields."""
    emb = prep.embedder
    return verify(
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
            "source_fasta_sha256": prep.summary.sha256,
            "tool_version": __version__,
            "build": info,
            "decoys": decoys.settings,
            "store_dtype": cfg.store_dtype,
        },
        known_sha256,
    )


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
            with Index.open(index_root.current_path(), mmap=True) as live_index:
                previous = plan_reuse(prep.embedder, live_index, cfg.store_dtype)
        try:
            built = _build_in(index_root.partial_dir, prep, cfg, previous, t_start)
        finally:
            if previous is not None:
                previous.close()
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
