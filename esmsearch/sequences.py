"""Protein FASTA reading and validation.

Parsing is Biopython's ``SimpleFastaParser`` (handles blank lines, CRLF, wrapped
lines); this module adds what a search service needs on top of it:

* gzip input detected by its magic bytes (``.gz`` name or not), ``-`` for stdin;
* record id = first whitespace-separated word of the header, the rest is the
  description (the BLAST/MMseqs2 convention);
* residues upper-cased; one trailing ``*`` (stop) stripped; the alphabet is the 20
  standard amino acids plus ``X B Z U O`` (the ESM-2 vocabulary's residue tokens);
* one clear :class:`~esmsearch.errors.InvalidSequenceError` naming the record id
  (and 1-based residue position) for any other character, an empty sequence, a
  header without id, or a duplicate record id; data before the first ``>`` is an
  error rather than silently dropped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from Bio.SeqIO.FastaIO import SimpleFastaParser

from esmsearch.errors import DuplicateRecordError, FastaFormatError, InvalidSequenceError

__all__ = [
    "RESIDUE_ALPHABET",
    "SequenceRecord",
    "check_unique_ids",
    "file_sha256",
    "open_text",
    "read_fasta",
    "records_from",
    "sequence_sha256",
    "validate_sequence",
]

#: Accepted residue letters: 20 standard amino acids + X (unknown), B (D/N), Z (E/Q),
#: U (selenocysteine), O (pyrrolysine) -- the residue tokens of ESM-2's alphabet.
RESIDUE_ALPHABET = frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO")

_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class SequenceRecord:
    """One validated protein sequence.

    Attributes:
        record_id: first word of the FASTA header; unique within one input.
        description: the rest of the header (may be empty).
        sequence: upper-case residues from :data:`RESIDUE_ALPHABET`, no trailing ``*``.
    """

    record_id: str
    description: str
    sequence: str

    def __len__(self) -> int:
        return len(self.sequence)


def validate_sequence(record_id: str, sequence: str) -> str:
    """Return ``sequence`` upper-cased with one trailing ``*`` removed.

    Args:
        record_id: id used in the error message.
        sequence: raw residues (whitespace already removed).

    Raises:
        InvalidSequenceError: empty sequence, or a character outside
            :data:`RESIDUE_ALPHABET` (message gives the character and 1-based position).
    """
    # Check before upper-casing: str.upper() maps some non-ASCII letters onto ASCII
    # residues (U+017F long s -> 'S', U+0131 dotless i -> 'I').
    raw = sequence[:-1] if sequence.endswith("*") else sequence
    seq = raw.upper()
    if not raw:
        raise InvalidSequenceError(record_id, "empty sequence")
    if not (raw.isascii() and RESIDUE_ALPHABET.issuperset(seq)):
        for i, ch in enumerate(raw):
            ch = ch.upper() if ch.isascii() else ch
            if ch not in RESIDUE_ALPHABET:
                shown = repr(ch) if ch.isprintable() else f"U+{ord(ch):04X}"
                hint = " (gap characters are not allowed; give unaligned sequences)" if ch in "-." else ""
                raise InvalidSequenceError(
                    record_id,
                    f"invalid residue {shown}{hint}; allowed: 20 standard amino acids and X B Z U O",
                    position=i + 1,
                )
    return seq


def open_text(path: str | os.PathLike[str]) -> IO[str]:
    """Open a FASTA file (plain or gzip, detected by magic bytes) or ``-`` (stdin) as text.

    Raises:
        FileNotFoundError: the path does not exist.
        FastaFormatError: the file starts like gzip but cannot be decompressed.
    """
    if str(path) == "-":
        raw: IO[bytes] = sys.stdin.buffer
    else:
        raw = open(path, "rb")  # noqa: SIM115 - returned to caller
    head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    if head == _GZIP_MAGIC:
        raw = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline=None)  # type: ignore[arg-type]


def _parse(handle: IO[str], source: str) -> Iterator[SequenceRecord]:
    # SimpleFastaParser silently skips text before the first '>'; refuse it instead.
    first = ""
    for line in handle:
        if line.strip():
            first = line
            break
    if not first:
        return
    if not first.startswith(">"):
        raise FastaFormatError(f"{source}: not FASTA: expected a '>' header line, found {first.strip()[:40]!r}")
    chained = _prepend(first, handle)
    seen: dict[str, int] = {}
    for n, (header, raw_seq) in enumerate(SimpleFastaParser(chained), start=1):
        parts = header.strip().split(None, 1)
        if not parts:
            raise InvalidSequenceError(f"#{n}", "FASTA header has no record id")
        record_id = parts[0]
        description = parts[1] if len(parts) > 1 else ""
        if record_id in seen:
            raise DuplicateRecordError(record_id, seen[record_id], n)
        seen[record_id] = n
        seq = validate_sequence(record_id, "".join(raw_seq.split()))
        yield SequenceRecord(record_id, description, seq)


def _prepend(first: str, rest: Iterable[str]) -> Iterator[str]:
    yield first
    yield from rest


def read_fasta(path: str | os.PathLike[str]) -> Iterator[SequenceRecord]:
    """Stream validated records from a FASTA file (plain, gzip, or ``-`` for stdin).

    Records are yielded lazily (memory is bounded by one record plus the set of
    ids seen, used for the duplicate check).

    Raises:
        FileNotFoundError: the file does not exist.
        FastaFormatError: the input is not FASTA, is not UTF-8, or a gzip stream is corrupt.
        InvalidSequenceError: a record is invalid (see :func:`validate_sequence`).
        DuplicateRecordError: a record id occurs twice.
    """
    source = str(path)
    try:
        with open_text(path) as handle:
            yield from _parse(handle, source)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise FastaFormatError(f"{source}: cannot read FASTA: {exc}") from exc


def check_unique_ids(records: Iterable[SequenceRecord]) -> None:
    """Raise :class:`DuplicateRecordError` if two records share an id."""
    seen: dict[str, int] = {}
    for n, rec in enumerate(records, start=1):
        if rec.record_id in seen:
            raise DuplicateRecordError(rec.record_id, seen[rec.record_id], n)
        seen[rec.record_id] = n


def records_from(
    queries: str | os.PathLike[str] | Mapping[str, str] | Sequence[str],
) -> list[SequenceRecord]:
    """Normalise the query forms users pass into validated records.

    Args:
        queries: a FASTA path (``str``/``Path``; ``-`` for stdin), a mapping of
            record id -> sequence, or a sequence of residue strings (ids become
            ``query_1``, ``query_2``, ...).

    Raises:
        InvalidSequenceError, DuplicateRecordError, FastaFormatError, FileNotFoundError.
    """
    if isinstance(queries, (str, os.PathLike)):
        return list(read_fasta(queries))
    if isinstance(queries, Mapping):
        records = [SequenceRecord(str(k), "", validate_sequence(str(k), v)) for k, v in queries.items()]
        check_unique_ids(records)
        return records
    out = []
    for i, seq in enumerate(queries, start=1):
        rid = f"query_{i}"
        out.append(SequenceRecord(rid, "", validate_sequence(rid, seq)))
    return out


def sequence_sha256(sequence: str) -> str:
    """Hex sha256 of the validated residue string (ASCII), used to detect changed records."""
    return hashlib.sha256(sequence.encode("ascii")).hexdigest()


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (as stored: a gzip file hashes compressed)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
