"""One-off searches without a server: ``esmsearch easy-search QUERY TARGET``.

MMseqs2's habit (``mmseqs easy-search query.fasta target.fasta result.m8 tmp``):
nothing to prepare, one command from FASTA files to a table of hits. TARGET is

* a FASTA file (plain or gzip): indexed once, with :func:`esmsearch.indexer.build_index`
  and E-values on, into a cache directory keyed by the FASTA's sha256 and the model
  settings (:func:`cache_key`); later calls on the same TARGET reuse the cached index;
* an index directory (``esmsearch index build -o``) or an index root (``--root``;
  its live version), searched as it is.

Queries are embedded and searched in this process by :class:`esmsearch.server.engine.SearchEngine`,
the server's own engine (the same embedding, FAISS search with re-ranking, E-values and
metadata lookup; no gRPC), and come back as the client's :class:`~esmsearch.client.QueryResult`,
so the TSV and JSON written are those of ``esmsearch search`` against a server of the same
index, column for column. Scores and E-values are rounded to float32 as the wire format does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esmsearch.client.types import Hit, QueryResult
from esmsearch.errors import ConfigError
from esmsearch.sequences import SequenceRecord, records_from
from esmsearch.significance import DEFAULT_DECOYS

__all__ = ["CACHE_ENV", "EasySearchConfig", "cache_key", "default_cache_dir", "easy_search", "resolve_target"]

log = logging.getLogger(__name__)

#: Environment variable naming the cache directory of indexed FASTA targets.
CACHE_ENV = "ESMSEARCH_CACHE_DIR"
#: Bumped when what a cached index holds changes incompatibly: older entries are rebuilt.
CACHE_LAYOUT = 1


@dataclass(frozen=True)
class EasySearchConfig:
    """Settings of one ``easy-search``.

    Attributes:
        model: model for indexing a FASTA target (any :func:`esmsearch.models.load_model`
            form); for an index target, ``None`` loads the manifest's model, a value
            overrides its source (it must be the same checkpoint).
        layer: representation layer for a FASTA target (``None`` = last).
        precision: compute precision for a FASTA target (``fp32``, ``bf16``, ``fp16``,
            ``int8``, ``auto``); queries are embedded at the index's precision.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        decoys: decoys for a FASTA target's E-values (see
            :func:`esmsearch.indexer.build_index`), >= 0.
        cache_dir: where FASTA targets are indexed (default :func:`default_cache_dir`).
        progress: progress bars on stderr while indexing.
    """

    model: str | None = None
    layer: int | None = None
    precision: str = "fp32"
    device: str = "auto"
    decoys: int = DEFAULT_DECOYS
    cache_dir: Path | None = None
    progress: bool = False


def default_cache_dir() -> Path:
    """``$ESMSEARCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/esmsearch``, else ``~/.cache/esmsearch``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "esmsearch"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_identity(model: str) -> str:
    """A pretrained name or Hub id as given; a local file or directory by its absolute
    path, size and modification time (a changed checkpoint gets a new cache entry)."""
    path = Path(model).expanduser()
    if path.exists():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return model


def cache_key(fasta_sha256: str, config: EasySearchConfig, model: str) -> str:
    """Hex key of a FASTA target's cached index: sha256 over the FASTA's sha256, the
    model (:func:`_model_identity`), layer, precision, decoys and the cache layout."""
    fields = {
        "layout": CACHE_LAYOUT,
        "fasta_sha256": fasta_sha256,
        "model": _model_identity(model),
        "layer": config.layer,
        "precision": config.precision,
        "decoys": config.decoys,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (two easy-searches never index the same target at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_target(target: str | os.PathLike[str], config: EasySearchConfig, default_model: str) -> Path:
    """The index directory to search for TARGET, indexing a FASTA into the cache if needed.

    Args:
        target: FASTA file (plain or gzip), index directory or index root.
        config: the search's settings (model, layer, precision, decoys, cache_dir).
        default_model: model used to index a FASTA when ``config.model`` is ``None``.

    Returns:
        An index version directory (with ``manifest.json``).

    Raises:
        FileNotFoundError: TARGET does not exist.
        ConfigError: TARGET is a directory that is neither an index nor an index root
            (or a root with no published version).
        FastaFormatError, InvalidSequenceError, DuplicateRecordError, ModelLoadError:
            indexing the FASTA failed (nothing is left in the cache but the partial
            build, which the next call resumes).
    """
    from esmsearch.versions import IndexRoot

    path = Path(target)
    if not path.exists():
        raise FileNotFoundError(f"target {str(path)!r} does not exist (a FASTA file, an index directory or root)")
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return path
        if IndexRoot.is_root(path):
            return IndexRoot(path).current_path()
        raise ConfigError(
            f"target {str(path)!r} is a directory but neither an index (no manifest.json) nor an index root "
            "(no current version)"
        )
    model = config.model or default_model
    cache = config.cache_dir if config.cache_dir is not None else default_cache_dir()
    key = cache_key(_file_sha256(path), config, model)
    out = cache / "targets" / key
    with _locked(cache / "targets" / f"{key}.lock"):
        if (out / "manifest.json").is_file():
            log.info("easy-search: reusing the cached index %s of %s", out, path)
            return out
        from esmsearch.indexer import build_index

        print(f"esmsearch: indexing {path} into {out} (first use; later searches reuse it)", file=sys.stderr)
        build_index(
            path,
            out,
            model=model,
            layer=config.layer,
            device=config.device,
            precision=config.precision,
            decoys=config.decoys,
            resume=True,  # an interrupted first call continues where it stopped
            progress=config.progress,
        )
        (cache / "targets" / f"{key}.json").write_text(
            json.dumps({"target": str(path.resolve()), "model": model}, indent=1) + "\n", encoding="utf-8"
        )
    return out


def easy_search(
    queries: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    k: int = 10,
    min_score: float | None = None,
    max_evalue: float | None = None,
    evalue_db_size: int | None = None,
    config: EasySearchConfig | None = None,
    default_model: str = "esm2_t33_650M_UR50D",
) -> list[QueryResult]:
    """Search query sequences against TARGET in this process.

    Args:
        queries: query FASTA path, ``-`` (stdin), FASTA text or one sequence (see
            :func:`esmsearch.sequences.records_from`).
        target: FASTA file, index directory or index root (:func:`resolve_target`).
        k: hits per query, >= 1.
        min_score: drop hits with cosine score below this, in [-1, 1].
        max_evalue: drop hits with E-value above this, >= 0 (needs decoys).
        evalue_db_size: database size the E-values are scaled to, >= 1 (HMMER's
            ``-Z``); ``None`` = the index's count.
        config: indexing and model settings (:class:`EasySearchConfig`).
        default_model: model for a FASTA target when ``config.model`` is ``None``.

    Returns:
        One :class:`~esmsearch.client.QueryResult` per query, in input order; hits by
        descending cosine score (higher = closer), float32 scores and E-values.

    Raises:
        ConfigError: ``k`` < 1, or a query id that is not one printable word of at
            most 256 characters.
        EvaluesUnavailableError: ``max_evalue`` given for an index without decoys.
        and what :func:`resolve_target` and :func:`esmsearch.sequences.records_from` raise.
    """
    from esmsearch.server.engine import SearchEngine, check_db_size
    from esmsearch.server.validation import id_problem

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
    check_db_size(evalue_db_size, "evalue_db_size")
    config = config or EasySearchConfig()
    records: list[SequenceRecord] = records_from(queries)
    for rec in records:
        problem = id_problem(rec.record_id)
        if problem is not None:
            raise ConfigError(f"query {rec.record_id[:40]!r}: {problem}")
    index_dir = resolve_target(target, config, default_model)
    # An index target keeps its own model unless --model overrides the source.
    engine = SearchEngine.load(index_dir, model=None if Path(target).is_file() else config.model, device=config.device)
    try:
        result = engine.search(
            [r.sequence for r in records],
            k,
            min_score,
            max_evalue=max_evalue,
            evalue_db_size=evalue_db_size,
        )
    finally:
        engine.close()
    return [
        QueryResult(
            query_id=rec.record_id,
            query_length=len(rec.sequence),
            index_version=result.index_version,
            hits=[
                Hit(
                    target_id=h.target_id,
                    description=h.target_description,
                    cosine_score=float(np.float32(h.cosine_score)),
                    rank=h.rank,
                    target_length=h.target_length,
                    evalue=None if h.evalue is None else float(np.float32(h.evalue)),
                )
                for h in hits
            ],
        )
        for rec, hits in zip(records, result.hits, strict=True)
    ]
