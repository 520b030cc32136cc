"""Output formats for search results: BLAST/MMseqs2-style TSV and JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import IO, Any

from esmsearch.client.types import QueryResult

__all__ = ["TSV_COLUMNS", "results_to_jsonable", "write_json", "write_tsv"]

#: Column names of :func:`write_tsv`'s header line, in order.
TSV_COLUMNS = (
    "query_id",
    "target_id",
    "cosine_score",
    "rank",
    "query_length",
    "target_length",
    "target_description",
)


def _clean(text: str) -> str:
    # A tab or newline inside a description would break the one-hit-per-line format.
    return " ".join(text.split())


def write_tsv(results: Iterable[QueryResult], stream: IO[str], *, header: bool = True) -> None:
    """Write hits as tab-separated values, one hit per line (the BLAST ``-outfmt 6`` habit).

    Columns are :data:`TSV_COLUMNS`; ``cosine_score`` has 6 decimals. Queries
    with no hits write no line. Whitespace runs inside descriptions (tabs,
    newlines) are collapsed to one space.

    Args:
        results: query results, written in the given order.
        stream: text stream to write to.
        header: write the header line first.
    """
    if header:
        stream.write("\t".join(TSV_COLUMNS) + "\n")
    for result in results:
        for hit in result.hits:
            stream.write(
                f"{result.query_id}\t{hit.target_id}\t{hit.cosine_score:.6f}\t{hit.rank}\t"
                f"{result.query_length}\t{hit.target_length}\t{_clean(hit.description)}\n"
            )


def results_to_jsonable(results: Iterable[QueryResult]) -> list[dict[str, Any]]:
    """Convert results into JSON-serialisable dicts (the structure :func:`write_json` writes)."""
    return [
        {
            "query_id": r.query_id,
            "query_length": r.query_length,
            "index_version": r.index_version,
            "hits": [
                {
                    "target_id": h.target_id,
                    "cosine_score": round(h.cosine_score, 6),
                    "rank": h.rank,
                    "target_length": h.target_length,
                    "target_description": h.description,
                }
                for h in r.hits
            ],
        }
        for r in results
    ]


def write_json(results: Iterable[QueryResult], stream: IO[str], *, indent: int | None = 2) -> None:
    """Write results as a JSON list of query objects, each with its index version and hits.

    Shape::

        [{"query_id": str, "query_length": int, "index_version": str,
          "hits": [{"target_id": str, "cosine_score": float (6 decimals), "rank": int,
                    "target_length": int, "target_description": str}, ...]}, ...]

    Args:
        results: query results, written in the given order.
        stream: text stream to write to (a trailing newline is added).
        indent: JSON indentation; ``None`` for one line.
    """
    json.dump(results_to_jsonable(results), stream, indent=indent)
    stream.write("\n")
