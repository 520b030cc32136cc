"""Stages 2 and 3 of a build: embed the database in journaled chunks, then the decoys.

See :func:`embed_chunks` and :func:`embed_decoys`; both write through a
:class:`~esmsearch.indexer.shards.ShardSet` and record their stage in the
:class:`~esmsearch.indexer.journal.BuildJournal`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esmsearch import fsutil
from esmsearch.embedding import WINDOW_RESIDUES
from esmsearch.errors import ConfigError
from esmsearch.indexer.blocks import BlockEmbedder, EmbedBlock, LocalBlockEmbedder
from esmsearch.indexer.datatypes import BuildConfig, DecoyOutcome, EmbedOutcome, Prepared, PreviousVectors
from esmsearch.indexer.journal import BuildJournal, FileDigest, Stage, StageRecord
from esmsearch.indexer.shards import (
    DECOY_SHARDS,
    SHARDS,
    ShardSet,
    assemble,
    chunk_records,
    gather_rows,
    residue_ranges,
)
from esmsearch.sequences import SequenceRecord, read_fasta, sequence_sha256
from esmsearch.significance import DecoyNull, DecoySettings, decoy_sequences, pseudo_query_rows, sample_decoy_rows
from esmsearch.store import DECOYS_FILE, IndexWriter

__all__ = ["embed_chunks", "embed_decoys"]

log = logging.getLogger(__name__)


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
    """Stage ``embed``: stream the FASTA in chunks, reuse or embed each, and journal it.

    For each chunk of about ``cfg.chunk_residues`` residues: vectors of sequences
    whose sha256 is in ``previous`` are copied, the rest go to ``block_embedder``
    as one :class:`EmbedBlock` (which sorts them by length into token-budget
    batches); the chunk's float32 ``[n, dim]`` vectors go to
    ``<work>/shards/shard-NNNNNN.npy`` (fsynced before its rename, the shard
    directory fsynced after), its metadata rows are committed to SQLite, and only
    then the journal records the chunk as done -- strictly in input order, whatever
    order a distributed embedder finishes blocks in. Memory is bounded by the chunks
    the embedder holds at once (one in this process); chunks the journal names are
    skipped when resuming (their count is in the loaded journal). Once every chunk
    is written, :attr:`Stage.EMBED` is recorded with the shards' total size and
    chained sha256 (:meth:`FileDigest.of_files`).

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
    state = journal.current
    embedded_residues = 0
    shard_set = ShardSet(writer.directory / SHARDS, "shard")
    done_shards = state.shards
    if done_shards and not shard_set.matches(done_shards, state.shard_chain):
        log.warning("%s: the finished shards are missing or changed; embedding the database again", shard_set.directory)
        journal.forget_from(Stage.EMBED)
        done_shards = 0
    writer.truncate_rows(state.rows)
    shard_set.keep_first(done_shards)
    if done_shards:
        log.info("resuming %s: %d sequences already done", writer.directory, writer.rows)
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
        # Validated (ids unique) by the validate stage: re-read without keeping the ids, whose
        # dict grew by ~150 bytes per sequence (300 MB at 2M) and stayed for the whole build.
        records = read_fasta(prep.fasta, unique_ids=None)
        for number, chunk in enumerate(chunk_records(records, cfg.chunk_residues)):
            shards.append(shard_set.path(number))
            if number < done_shards:
                if bar is not None:
                    bar.update(sum(len(r.sequence) for r in chunk))
                continue
            plan = _ChunkPlan(number, chunk, [sequence_sha256(r.sequence) for r in chunk], [], [])
            previous_rows = previous.rows_of(plan.shas) if previous else [None] * len(chunk)
            for i, row in enumerate(previous_rows):
                if row is None:
                    plan.to_embed.append(i)
                else:
                    plan.reuse_rows.append((i, row))
            if bar is not None:
                bar.update(sum(len(chunk[i].sequence) for i, _row in plan.reuse_rows))
            plans[number] = plan
            yield EmbedBlock(number, tuple(chunk[i].sequence for i in plan.to_embed), rows=len(chunk))

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
            chain = shard_set.write(plan.number, vectors, state.shard_chain)  # durable before the journal names it
            writer.add_metadata(
                (r.record_id, r.description, len(r.sequence), sha)
                for r, sha in zip(plan.records, plan.shas, strict=True)
            )
            writer.commit()
            embedded_residues += block.residues
            state.reused += len(plan.reuse_rows)
            state.reused_residues += sum(len(plan.records[i].sequence) for i, _row in plan.reuse_rows)
            state.embedded += len(plan.to_embed)
            state.windowed += sum(1 for seq in block.sequences if len(seq) > WINDOW_RESIDUES)
            state.shard_chain = chain
            state.shards, state.rows = plan.number + 1, writer.rows
            journal.save()
    finally:
        if bar is not None:
            bar.close()
    if plans:
        raise ConfigError(f"the embedder returned no vectors for chunks {sorted(plans)}")
    size = sum(shard.stat().st_size for shard in shards)
    journal.record(
        Stage.EMBED,
        StageRecord(
            outputs={SHARDS: FileDigest(size, state.shard_chain)},
            info={"rows": state.rows, "reused": state.reused, "embedded": state.embedded},
            seconds=round(embedder.embed_seconds, 3),
        ),
    )
    return EmbedOutcome(
        shards=tuple(shards),
        rows=writer.rows,
        reused=state.reused,
        embedded=state.embedded,
        reused_residues=state.reused_residues,
        embed_seconds=embedder.embed_seconds,
        embedded_residues=embedded_residues,
        windowed_sequences=state.windowed,
    )


def embed_decoys(
    writer: IndexWriter,
    journal: BuildJournal,
    prep: Prepared,
    cfg: BuildConfig,
    previous: PreviousVectors | None,
    database: Sequence[Path] = (),
    block_embedder: BlockEmbedder | None = None,
) -> DecoyOutcome:
    """Stage ``decoys``: the decoys behind E-values, in ``decoys.npy``, and the index's shape.

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
        if not journal.done(Stage.DECOYS):
            journal.record(Stage.DECOYS, StageRecord(info={"shape": None, "reused_from": None, "embedded_residues": 0}))
        return DecoyOutcome(None, None, 0.0, 0)
    out = writer.decoys_path()
    state = journal.current
    if journal.done(Stage.DECOYS):
        info = journal.info(Stage.DECOYS)
        journaled = dataclasses.replace(settings, shape=float(info["shape"]))
        return DecoyOutcome(journaled, info.get("reused_from"), 0.0, 0)
    if previous is not None and previous.decoys is not None and settings.same_decoys(previous.decoy_settings):
        assert previous.decoy_settings is not None
        reused = dataclasses.replace(settings, shape=previous.decoy_settings.shape)
        writer.write_decoys(np.asarray(previous.decoys))
        journal.record(
            Stage.DECOYS,
            StageRecord(
                outputs={DECOYS_FILE: FileDigest.of(out)},
                info={"shape": reused.shape, "reused_from": previous.version, "embedded_residues": 0},
            ),
        )
        log.info(
            "reused the %d decoys of version %s (same model contract, count and seed)", settings.count, previous.version
        )
        return DecoyOutcome(reused, previous.version, 0.0, 0)
    emb = prep.embedder
    records = read_fasta(prep.fasta, unique_ids=None)  # validated: no id set (see embed_chunks)
    sequences = decoy_sequences((r.sequence for r in records), prep.summary.sequences, settings)
    ranges = residue_ranges(sequences, cfg.chunk_residues)
    shard_set = ShardSet(writer.directory / DECOY_SHARDS, "decoy")
    done = state.decoy_shards
    if done and not shard_set.matches(done, state.decoy_chain):
        log.warning("%s: the finished decoy shards are missing or changed; embedding them again", shard_set.directory)
        journal.forget_from(Stage.DECOYS)
        done = 0
    shard_set.keep_first(done)
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
    shards = shard_set.paths(len(ranges))
    if bar is not None:
        bar.update(sum(len(s) for s in sequences[: ranges[done - 1][1]]) if done else 0)
    todo = [EmbedBlock(n, tuple(sequences[start:stop])) for n, (start, stop) in enumerate(ranges) if n >= done]
    model = block_embedder if block_embedder is not None else LocalBlockEmbedder(emb)
    seconds_before = model.embed_seconds
    embedded_residues = 0
    try:
        for block, vectors in model.embed_blocks(todo, bar.update if bar else None):
            embedded_residues += block.residues
            # durable before the journal names it
            state.decoy_chain = shard_set.write(block.number, vectors, state.decoy_chain)
            state.decoy_shards = block.number + 1
            journal.save()
    finally:
        if bar is not None:
            bar.close()
    embed_seconds = model.embed_seconds - seconds_before
    assemble(shards, out, emb.dim)
    fsutil.fsync_file(out)
    fsutil.fsync_dir(out.parent)
    estimated = dataclasses.replace(settings, shape=_estimate_shape(out, settings, prep.summary.sequences, database))
    journal.record(
        Stage.DECOYS,
        StageRecord(
            outputs={DECOYS_FILE: FileDigest.of(out)},
            info={"shape": estimated.shape, "reused_from": None, "embedded_residues": embedded_residues},
            seconds=round(embed_seconds, 3),
        ),
    )
    shutil.rmtree(shard_set.directory)
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
    return null.estimate_shape(gather_rows(database, rows), own)
