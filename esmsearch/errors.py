"""Exceptions raised by esmsearch's library code.

The tree, in the manner of httpx's one-docstring map::

    EsmsearchError                      base of everything esmsearch raises on purpose
    ├── InvalidSequenceError            a FASTA record or query sequence is unusable
    │   └── DuplicateRecordError        a record id occurs twice in one input
    ├── FastaFormatError                the input is not FASTA at all
    ├── ModelLoadError                  a model name or checkpoint cannot be loaded
    ├── IndexError_                     base of index-directory problems
    │   ├── IndexNotFoundError          no index (manifest.json) at the given path
    │   ├── IndexFormatError            manifest, checksums or files are inconsistent
    │   └── IndexMismatchError          model settings differ from the index's manifest
    ├── InvalidIndexFactoryError        a FAISS factory string is rejected
    └── ConfigError                     a setting is out of its valid range

Client-side errors (gRPC status mapped to classes) live in
:mod:`esmsearch.client.errors` so the client imports without torch or faiss.

Library code raises these, chained with ``raise ... from exc`` where a lower-layer
error is the cause; it never logs and returns ``None``.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DuplicateRecordError",
    "EsmsearchError",
    "FastaFormatError",
    "IndexError_",
    "IndexFormatError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "InvalidIndexFactoryError",
    "InvalidSequenceError",
    "ModelLoadError",
]


class EsmsearchError(Exception):
    """Base class of every error esmsearch raises on purpose."""


class InvalidSequenceError(EsmsearchError, ValueError):
    """A sequence record is unusable (bad residue, empty, ...).

    Attributes:
        record_id: id of the offending record (first word of its FASTA header),
            or ``"#<n>"`` (1-based) when the input had no ids.
        position: 1-based residue position of the offending character, or
            ``None`` when the problem is not at one position.
        reason: short human-readable reason.
    """

    def __init__(self, record_id: str, reason: str, position: int | None = None) -> None:
        self.record_id = record_id
        self.reason = reason
        self.position = position
        where = f" at residue {position}" if position is not None else ""
        super().__init__(f"record {record_id!r}{where}: {reason}")


class DuplicateRecordError(InvalidSequenceError):
    """A record id occurs more than once in one input."""

    def __init__(self, record_id: str, first_index: int, second_index: int) -> None:
        super().__init__(
            record_id,
            f"duplicate record id (records #{first_index} and #{second_index}); record ids must be unique",
        )
        self.first_index = first_index
        self.second_index = second_index


class FastaFormatError(EsmsearchError, ValueError):
    """The input is not FASTA (no '>' header before sequence data, unreadable gzip, ...)."""


class ModelLoadError(EsmsearchError):
    """A model name or checkpoint path cannot be loaded."""


class IndexError_(EsmsearchError):  # noqa: N801 - avoid shadowing builtin IndexError
    """Base class of index-directory problems."""


class IndexNotFoundError(IndexError_, FileNotFoundError):
    """No index (manifest.json) exists at the given path."""


class IndexFormatError(IndexError_):
    """An index directory is inconsistent: bad manifest, checksum or row count."""


class IndexMismatchError(IndexError_):
    """The loaded model's settings differ from those recorded in an index manifest."""


class InvalidIndexFactoryError(EsmsearchError, ValueError):
    """A FAISS index factory string is rejected (syntax, metric or dimension)."""


class ConfigError(EsmsearchError, ValueError):
    """A configuration value is outside its valid range."""
