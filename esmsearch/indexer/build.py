"""Build an index from a protein FASTA file: standalone directory or new version of a root.

Pipeline (each stage a plain function so tests can swap one):

1. validate the whole FASTA first (ids, residues, duplicates): a bad record at the
   end of a large database fails in seconds, before any embedding work;
2. load the model and check the FAISS factory string against its dimension;
3. stream records in chunks of about ``chunk_residues`` residues; for each chunk,
   reuse the stored vectors of sequences whose sha256 is in the previous version
   (same checkpoint, layer, pooling), embed the rest (length-sorted token-budget
   batches), append the chunk's vectors to a shard file and its metadata to SQLite,
   and journal the chunk -- memory is bounded by one chunk, and a crash resumes
   from the last journaled chunk (``resume``);
4. concatenate shards into ``embeddings.npy``, build the FAISS index, write the
   manifest, verify (checksums, row counts, self-search), and publish by rename:
   to ``out_dir`` (:func:`build_index`) or as ``ROOT/versions/<version>`` followed
   by an atomic swap of ``ROOT/current`` (:func:`build_version`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esmsearch import __version__
from esmsearch.embedding import NORMALISATION, POOLING, WINDOW_OVERLAP, WINDOW_RESIDUES, Embedder
from esmsearch.errors import ConfigError, FastaFormatError, IndexMismatchError, InvalidIndexFactoryError
from esmsearch.sequences import SequenceRecord, file_sha256, read_fasta, sequence_sha256
from esmsearch.store import Index, IndexWriter, Manifest, publish_directory
from esmsearch.versions import IndexRoot, verify_index

__all__ = [
    "BuildConfig",
    "BuildResult",
    "ReuseCounts",
    "build_index",
    "build_version",
    "partial_build_dir",
    "scan_fasta",
]

log = logging.getLogger(__name__)

#: Journal of a build in progress, inside the partial build directory.
STATE_FILE = "build-state.json"


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
        precision: ``fp32|bf16|fp16``.
        index_factory: FAISS factory string or ``auto``.
        chunk_residues: residues embedded per chunk (bounds memory; one shard each).
        resume: continue an interrupted build from its last completed chunk.
        progress: show a progress bar on stderr.
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

    def __post_init__(self) -> None:
        if self.chunk_residues < 1:
            raise ConfigError(f"chunk_residues must be >= 1, got {self.chunk_residues}")
        if not self.index_factory.strip():
            raise ConfigError("index factory must not be empty")


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
    sequences: int
    residues: int
    longest: int
    sha256: str


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


class _BuildState:
    """Atomically rewritten JSON journal: input/model settings and chunks completed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def load(self) -> None:
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot resume: {self.path} is missing or unreadable ({exc}); remove {self.path.parent}"
            ) from exc

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, sort_keys=True), encoding="utf-8")
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


@dataclass
class _Prepared:
    fasta: Path
    summary: FastaSummary
    embedder: Embedder
    spec: Any  # vector_index.IndexSpec


def _prepare(fasta: Path, cfg: BuildConfig, embedder: Embedder | None) -> _Prepared:
    """Stages 1-2: everything that can fail cheaply, before any embedding."""
    from esmsearch import vector_index

    if str(fasta) == "-":
        raise ConfigError(
            "index builds read the database FASTA twice (validation, then embedding): give a file, not '-'"
        )
    summary = scan_fasta(fasta)
    log.info("validated %s: %d sequences, %d residues", fasta, summary.sequences, summary.residues)
    emb = embedder or Embedder(
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
    return _Prepared(fasta, summary, emb, spec)


class _Previous:
    """Lookup of a previous version's vectors by sequence sha256 and record id."""

    def __init__(self, index: Index) -> None:
        self.version = index.version
        self.count = index.count
        self.embeddings = index.embeddings()
        self.row_by_sha: dict[str, int] = {}
        self.sha_by_id: dict[str, str] = {}
        for row, record_id, _desc, _length, sha in index.iter_metadata():
            self.row_by_sha.setdefault(sha, row)
            self.sha_by_id[record_id] = sha
        self.residues_per_s = index.manifest.build.get("residues_per_s")


def _build_in(
    work: Path,
    prep: _Prepared,
    cfg: BuildConfig,
    previous: _Previous | None,
    t_start: float,
) -> tuple[Manifest, dict[str, Any], ReuseCounts, float, int]:
    """Stages 3-4 into ``work``; returns (manifest, build info, reuse counts, embed s, embedded residues)."""
    from esmsearch import vector_index

    emb, summary, spec = prep.embedder, prep.summary, prep.spec
    state_expected = {
        "fasta_sha256": summary.sha256,
        "chunk_residues": cfg.chunk_residues,
        "precision": emb.precision,
        "index_factory": spec.factory,
        "reuse_version": previous.version if previous else None,
        **emb.settings,
    }
    state = _BuildState(work / STATE_FILE)
    resuming = False
    if work.exists():
        if cfg.resume:
            state.load()
            mismatch = {k: (state.data.get(k), v) for k, v in state_expected.items() if state.data.get(k) != v}
            if mismatch:
                details = "; ".join(f"{k}: partial build has {a!r}, this build {b!r}" for k, (a, b) in mismatch.items())
                raise ConfigError(f"cannot resume the partial build at {work}: {details}; remove it or drop --resume")
            resuming = True
        else:
            log.warning("removing the partial build left at %s (pass --resume to continue one)", work)
            shutil.rmtree(work)
    elif cfg.resume:
        log.info("no partial build at %s; starting from the beginning", work)

    counts = dict(reused=0, embedded=0, reused_residues=0)
    embed_seconds = 0.0
    embedded_residues = 0
    windowed_before = emb.stats.windowed_sequences
    bar = None
    with IndexWriter(work, resume=resuming) as writer:
        shard_dir = writer.directory / "shards"
        shard_dir.mkdir(exist_ok=True)
        done_shards = int(state.data.get("shards", 0)) if resuming else 0
        if resuming:
            writer.truncate_rows(int(state.data.get("rows", 0)))
            for key in counts:
                counts[key] = int(state.data.get(key, 0))
            for stale in shard_dir.glob("*"):
                keep = stale.name.startswith("shard-") and stale.name.endswith(".npy") and ".tmp" not in stale.name
                if not keep or int(stale.name[6:12]) >= done_shards:
                    stale.unlink()
            log.info("resuming %s: %d sequences already done", work, writer.rows)
        else:
            state.data = dict(state_expected, shards=0, rows=0)
            state.save()
        writer.keep_on_error = True  # from here on a failure leaves a resumable state
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
        try:
            for n_chunk, chunk in enumerate(_chunks(read_fasta(prep.fasta), cfg.chunk_residues)):
                shas = [sequence_sha256(r.sequence) for r in chunk]
                shard = shard_dir / f"shard-{n_chunk:06d}.npy"
                shards.append(shard)
                if n_chunk < done_shards:
                    if bar is not None:
                        bar.update(sum(len(r.sequence) for r in chunk))
                    continue
                vectors = np.empty((len(chunk), emb.dim), dtype=np.float32)
                to_embed = []
                for i, (rec, sha) in enumerate(zip(chunk, shas, strict=True)):
                    row = previous.row_by_sha.get(sha) if previous else None
                    if row is None:
                        to_embed.append(i)
                    else:
                        vectors[i] = previous.embeddings[row]  # type: ignore[union-attr]
                        counts["reused"] += 1
                        counts["reused_residues"] += len(rec.sequence)
                if bar is not None:
                    embedding = set(to_embed)
                    bar.update(sum(len(r.sequence) for i, r in enumerate(chunk) if i not in embedding))
                if to_embed:
                    t0 = time.perf_counter()
                    vectors[to_embed] = emb.embed(
                        [chunk[i].sequence for i in to_embed], on_batch=bar.update if bar else None
                    )
                    embed_seconds += time.perf_counter() - t0
                    embedded_residues += sum(len(chunk[i].sequence) for i in to_embed)
                    counts["embedded"] += len(to_embed)
                tmp = shard.with_name(shard.stem + ".tmp.npy")
                np.save(tmp, vectors)
                os.replace(tmp, shard)
                writer.add_metadata(
                    (r.record_id, r.description, len(r.sequence), sha) for r, sha in zip(chunk, shas, strict=True)
                )
                writer.commit()
                state.data.update(shards=n_chunk + 1, rows=writer.rows, **counts)
                state.save()
        except BaseException:
            log.error(
                "build interrupted after %d of %d sequences; the work done is kept in %s: "
                "rerun the same command with --resume to continue",
                writer.rows,
                summary.sequences,
                work,
            )
            raise
        finally:
            if bar is not None:
                bar.close()
        writer.keep_on_error = False  # past embedding, a failure discards the work directory
        if writer.rows != summary.sequences:
            raise ConfigError(
                f"partial build at {work} holds {writer.rows} rows but {prep.fasta} has "
                f"{summary.sequences} sequences; remove it and build again"
            )
        vectors_all = np.lib.format.open_memmap(
            writer.embeddings_path(), mode="w+", dtype=np.float32, shape=(writer.rows, emb.dim)
        )
        row = 0
        for shard in shards:
            part = np.load(shard)
            vectors_all[row : row + len(part)] = part
            row += len(part)
        vectors_all.flush()
        faiss_index = vector_index.build(np.asarray(vectors_all), spec)
        del vectors_all
        writer.write_faiss(faiss_index)
        del faiss_index
        shutil.rmtree(shard_dir)
        state.path.unlink()

        reuse = ReuseCounts(
            reused=counts["reused"], embedded=counts["embedded"], reused_residues=counts["reused_residues"]
        )
        if previous is not None:
            new_ids = {}
            for _row, rid, _d, _l, sha in writer.iter_metadata():
                new_ids[rid] = sha
            added = sum(1 for rid in new_ids if rid not in previous.sha_by_id)
            changed = sum(
                1 for rid, sha in new_ids.items() if rid in previous.sha_by_id and previous.sha_by_id[rid] != sha
            )
            removed = sum(1 for rid in previous.sha_by_id if rid not in new_ids)
            reuse = ReuseCounts(
                reused=counts["reused"],
                embedded=counts["embedded"],
                added=added,
                changed=changed,
                removed=removed,
                reused_residues=counts["reused_residues"],
            )
        windowed = emb.stats.windowed_sequences - windowed_before
        build_info: dict[str, Any] = {
            "sequences": summary.sequences,
            "residues": summary.residues,
            "longest_sequence": summary.longest,
            "windowed_sequences": windowed,
            "window_residues": WINDOW_RESIDUES,
            "window_overlap": WINDOW_OVERLAP,
            "embedded_sequences": reuse.embedded,
            "reused_sequences": reuse.reused,
            "previous_version": previous.version if previous else None,
            "previous_residues_per_s": previous.residues_per_s if previous else None,
            "embed_seconds": round(embed_seconds, 3),
            "total_seconds": round(time.perf_counter() - t_start, 3),
            "residues_per_s": round(embedded_residues / embed_seconds, 1) if embed_seconds else None,
            "device": str(emb.device),
            "precision": emb.precision,
            "toks_per_batch": emb.toks_per_batch,
        }
        manifest = writer.finish(
            model_name=emb.model_name,
            model_source=emb.model_source,
            checkpoint_sha256=emb.checkpoint_sha256,
            layer=emb.layer,
            pooling=POOLING,
            normalisation=NORMALISATION,
            metric="inner_product",
            dim=emb.dim,
            index_factory=spec.factory,
            search_params={k: v for k, v in spec.to_json().items() if k != "factory" and v is not None},
            source_fasta=str(prep.fasta),
            source_fasta_sha256=summary.sha256,
            tool_version=__version__,
            build=build_info,
        )
        report = verify_index(writer.directory)
        log.info(
            "verified %s: checksums, row counts, %d/%d sampled self-hits at rank 1",
            manifest.version,
            report.self_hits_at_rank1,
            report.sampled,
        )
    return manifest, build_info, reuse, embed_seconds, embedded_residues


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
) -> BuildResult:
    """Embed a FASTA database and write a standalone index directory at ``out_dir``.

    Args:
        fasta_path: database FASTA, plain or gzip.
        out_dir: destination; must not exist unless ``overwrite``.
        model: ESM-2 pretrained name or local fair-esm ``.pt`` path.
        layer: representation layer (None = last).
        toks_per_batch: token budget per forward pass.
        device: ``auto|cpu|cuda|cuda:N``.
        precision: ``fp32|bf16|fp16``.
        index_factory: FAISS factory string (``Flat``, ``IVF1024,Flat``, ``HNSW32``, ...)
            or ``auto`` (chosen from database size; see :func:`esmsearch.vector_index.auto_spec`).
        chunk_residues: residues per streamed chunk (memory bound).
        overwrite: replace an existing index at ``out_dir``.
        resume: continue an interrupted build of the same FASTA with the same model
            settings from its last completed chunk (kept in
            :func:`partial_build_dir`); the result equals an uninterrupted build.
        progress: show a progress bar in residues/s on stderr.
        embedder: reuse an already loaded :class:`Embedder` (its settings win over
            ``model``/``layer``/``device``/``precision``/``toks_per_batch``).

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

    On any error nothing is left at ``out_dir`` and an existing index there is untouched.
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
    )
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    prep = _prepare(Path(fasta_path), cfg, embedder)
    work = partial_build_dir(out)
    manifest, info, reuse, embed_s, embedded_res = _build_in(work, prep, cfg, None, t_start)
    try:
        publish_directory(work, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return _result(manifest, out, prep, info, reuse, embed_s, embedded_res, t_start, None)


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
) -> BuildResult:
    """Build a new version of a versioned index root and make it live.

    Holds ``ROOT/.build.lock`` for the whole build (a second concurrent build fails
    at once with :class:`~esmsearch.versions.BuildLockedError`). With ``reuse``, the
    vectors of sequences whose sha256 is in the live version are copied instead of
    re-embedded, provided the live version was built with the same checkpoint
    sha256, layer, pooling and normalisation (otherwise everything is re-embedded);
    removed sequences disappear. The new version is verified (checksums, row counts,
    self-search), moved to ``ROOT/versions/<version>``, and ``ROOT/current`` is
    swapped to it atomically; a failure at any point leaves ``current`` untouched.

    Args:
        fasta_path, model, layer, toks_per_batch, device, precision, index_factory,
        chunk_residues, resume, progress, embedder: as for :func:`build_index`.
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
    )
    if keep_versions is not None and keep_versions < 1:
        raise ConfigError(f"keep_versions must be >= 1, got {keep_versions}")
    index_root = IndexRoot(root)
    with index_root.lock():
        index_root.create()
        prep = _prepare(Path(fasta_path), cfg, embedder)
        previous = None
        live = index_root.current_version()
        if reuse and live is not None:
            with Index.open(index_root.current_path()) as live_index:
                try:
                    prep.embedder.check_manifest(live_index.manifest)
                    previous = _Previous(live_index)
                except IndexMismatchError as exc:
                    log.warning("not reusing vectors of %s: %s", live, exc)
        manifest, info, counts, embed_s, embedded_res = _build_in(index_root.partial_dir, prep, cfg, previous, t_start)
        try:
            path = index_root.add_version(index_root.partial_dir, manifest.version)
        except BaseException:
            shutil.rmtree(index_root.partial_dir, ignore_errors=True)
            raise
        index_root.set_current(manifest.version)
        if keep_versions is not None:
            deleted = index_root.prune(keep_versions)
            if deleted:
                log.info("retention (keep %d): deleted versions %s", keep_versions, ", ".join(deleted))
    return _result(manifest, path, prep, info, counts, embed_s, embedded_res, t_start, live)


def _result(
    manifest: Manifest,
    path: Path,
    prep: _Prepared,
    info: dict[str, Any],
    reuse: ReuseCounts,
    embed_seconds: float,
    embedded_residues: int,
    t_start: float,
    previous_version: str | None,
) -> BuildResult:
    windowed = int(info["windowed_sequences"])
    if windowed:
        log.info("%d sequences longer than %d residues were embedded in overlapping windows", windowed, WINDOW_RESIDUES)
    return BuildResult(
        manifest=manifest,
        path=path,
        sequences=prep.summary.sequences,
        residues=prep.summary.residues,
        windowed_sequences=windowed,
        seconds=time.perf_counter() - t_start,
        embed_seconds=embed_seconds,
        embedded_residues=embedded_residues,
        reuse=reuse,
        previous_version=previous_version,
    )
