"""Output formats for search results: BLAST/MMseqs2-style TSV and JSON.

:func:`results_to_jsonable` is the one definition of the JSON shape of a hit (the CLI's
``--format json`` and any other JSON front end use it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import IO, Any

from esmsearch.client.types import Hit, QueryResult
from esmsearch.errors import EsmsearchError

__all__ = [
    "TSV_COLUMNS",
    "TsvFieldError",
    "format_evalue",
    "hit_to_jsonable",
    "results_to_jsonable",
    "write_json",
    "write_tsv",
]

#: Column names of :func:`write_tsv`'s header line, in order.
TSV_COLUMNS = (
    "query_id",
    "target_id",
    "cosine_score",
    "rank",
    "query_length",
    "target_length",
    "evalue",
    "target_description",
)
#: What the ``evalue`` column holds for hits of an index without decoys (read as
#: missing by R's ``read.table`` and pandas' ``read_csv`` by default).
NO_EVALUE = "NA"


class TsvFieldError(EsmsearchError, ValueError):
    """A record id holds whitespace (a tab, a newline, ...) and cannot be one TSV field.

    Query ids are checked by the server (printable, one word) and target ids are the
    first word of a database FASTA header, so only a result from elsewhere (an older
    server, a hand-built :class:`QueryResult`) can hold one; the writer refuses it
    rather than forge rows or silently change the id.
    """


def _clean(text: str) -> str:
    # A tab or line break inside a description would break the one-hit-per-line format:
    # every whitespace run (str.isspace: tabs, CR/LF, VT/FF, U+2028 ...) becomes one space.
    return " ".join(text.split())


#: Any character ``str.isspace`` calls whitespace (``re``'s ``\s`` on ``str`` patterns is
#: the same Unicode class), found at C speed: one id check per hit.
_WHITESPACE = re.compile(r"\s")


def _id_field(text: str, what: str) -> str:
    if _WHITESPACE.search(text):
        raise TsvFieldError(
            f"{what} {text[:40]!r} holds whitespace and cannot be written as one TSV field; use --format json"
        )
    return text


def format_evalue(evalue: float | None) -> str:
    """An E-value as BLAST's tabular output writes it: ``%.2e`` (``1.23e-05``), or
    :data:`NO_EVALUE` when there is none."""
    return NO_EVALUE if evalue is None else f"{evalue:.2e}"


def write_tsv(results: Iterable[QueryResult], stream: IO[str], *, header: bool = True) -> None:
    """Write hits as tab-separated values, one hit per line (the BLAST ``-outfmt 6`` habit).

    Columns are :data:`TSV_COLUMNS`; ``cosine_score`` has 6 decimals, ``evalue`` is
    in scientific notation with 3 significant digits (``%.2e``, as BLAST writes it),
    ``NA`` for hits of an index without decoys. Queries with no hits write no line.
    No field ever holds a tab or a line break: whitespace runs inside descriptions
    (which come from the database FASTA headers and may hold tabs) are collapsed to one
    space, and a query or target id holding whitespace is refused.

    Args:
        results: query results, written in the given order as they are iterated (an
            iterator such as :meth:`SearchClient.iter_search` is written as its results
            arrive; the header goes out with the first one, or at the end if none).
        stream: text stream to write to.
        header: write the header line first.

    Raises:
        TsvFieldError: a query or target id holds whitespace (raised before the line
            that would hold it is written).
    """
    header_pending = header  # written once the first result exists: a search that fails at once prints nothing
    for result in results:
        if header_pending:
            stream.write("\t".join(TSV_COLUMNS) + "\n")
            header_pending = False
        query_id = _id_field(result.query_id, "query id") if result.hits else ""
        for hit in result.hits:
            target_id = _id_field(hit.target_id, "target id")
            stream.write(
                f"{query_id}\t{target_id}\t{hit.cosine_score:.6f}\t{hit.rank}\t"
                f"{result.query_length}\t{hit.target_length}\t{format_evalue(hit.evalue)}\t"
                f"{_clean(hit.description)}\n"
            )
    if header_pending:
        stream.write("\t".join(TSV_COLUMNS) + "\n")


def hit_to_jsonable(hit: Hit) -> dict[str, Any]:
    """One hit as a JSON object: ``cosine_score`` rounded to 6 decimals, ``evalue`` to the
    3 significant digits the TSV shows (a number, or ``None`` -> ``null`` when the index
    has no decoys)."""
    return {
        "target_id": hit.target_id,
        "cosine_score": round(hit.cosine_score, 6),
        "evalue": None if hit.evalue is None else float(format_evalue(hit.evalue)),
        "rank": hit.rank,
        "target_length": hit.target_length,
        "target_description": hit.description,
    }


def results_to_jsonable(results: Iterable[QueryResult]) -> list[dict[str, Any]]:
    """Convert results into JSON-serialisable dicts (the structure :func:`write_json` writes)."""
    return [
        {
            "query_id": r.query_id,
            "query_length": r.query_length,
            "index_version": r.index_version,
            "hits": [hit_to_jsonable(h) for h in r.hits],
        }
        for r in results
    ]


def write_json(results: Iterable[QueryResult], stream: IO[str], *, indent: int | None = 2) -> None:
    """Write results as a JSON list of query objects, each with its index version and hits.

    Shape::

        [{"query_id": str, "query_length": int, "index_version": str,
          "hits": [{"target_id": str, "cosine_score": float (6 decimals),
                    "evalue": float (3 significant digits) | null (index without decoys),
                    "rank": int, "target_length": int, "target_description": str}, ...]}, ...]

    Args:
        results: query results, written in the given order (collected whole first:
            one JSON list).
        stream: text stream to write to (a trailing newline is added).
        indent: JSON indentation; ``None`` for one line.
    """
    json.dump(results_to_jsonable(results), stream, indent=indent)
    stream.write("\n")
