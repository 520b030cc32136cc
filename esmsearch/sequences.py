"""Protein FASTA reading and validation.

Parsing is Biopython's ``SimpleFastaParser`` (handles blank lines, CRLF, wrapped
lines); this module adds what a search service needs on top of it:

* gzip input detected by its magic bytes (``.gz`` name or not), ``-`` for stdin;
  closing the text handle closes the decompressor and the file under it;
* record id = first whitespace-separated word of the header, the rest is the
  description (the BLAST/MMseqs2 convention);
* residues upper-cased; one trailing ``*`` (stop) stripped; the alphabet is the 20
  standard amino acids plus ``X B Z U O`` (the ESM-2 vocabulary's residue tokens);
* one clear :class:`~esmsearch.errors.InvalidSequenceError` naming the record id
  (and 1-based residue position) for any other character, an empty sequence, a
  header without id, or a duplicate record id; data before the first ``>`` is an
  error rather than silently dropped;
* :func:`records_from` turns what a user passes as queries (a FASTA path, FASTA
  text, one bare sequence, a mapping or a list of sequences) into records.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Literal, cast

from Bio.SeqIO.FastaIO import SimpleFastaParser

from esmsearch.errors import DuplicateRecordError, FastaFormatError, InvalidSequenceError
from esmsearch.fsutil import file_sha256

__all__ = [
    "RESIDUE_ALPHABET",
    "RecordIdSet",
    "SequenceRecord",
    "check_unique_ids",
    "file_sha256",
    "open_text",
    "read_fasta",
    "records_from",
    "records_from_text",
    "sequence_sha256",
    "validate_sequence",
]

#: Accepted residue letters: 20 standard amino acids + X (unknown), B (D/N), Z (E/Q),
#: U (selenocysteine), O (pyrrolysine) -- the residue tokens of ESM-2's alphabet.
#: The one definition of the alphabet; iterate it as ``sorted(RESIDUE_ALPHABET)`` where
#: order matters.
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


class _OwningGzipFile(gzip.GzipFile):
    """A GzipFile that closes the file object it decompresses when it is closed
    (``GzipFile(fileobj=...)`` leaves it open, leaking the file handle)."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def open_text(path: str | os.PathLike[str]) -> IO[str]:
    """Open a FASTA file (plain or gzip, detected by magic bytes) or ``-`` (stdin) as text.

    Closing the returned handle closes every layer under it (decompressor and file).

    Raises:
        FileNotFoundError: the path does not exist.
        FastaFormatError: the file starts like gzip but cannot be decompressed.
    """
    if str(path) == "-":
        raw: IO[bytes] = sys.stdin.buffer
    else:
        raw = open(path, "rb")  # noqa: SIM115 - returned to caller
    try:
        head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
        binary = cast(IO[bytes], _OwningGzipFile(raw)) if head == _GZIP_MAGIC else raw
        return io.TextIOWrapper(binary, encoding="utf-8", errors="strict", newline=None)
    except BaseException:
        raw.close()
        raise


class RecordIdSet:
    """The record ids of one input seen so far, for its duplicate-id check.

    In memory (a dict, the default) an id costs about 150 bytes of heap (a 9-character
    id, its record number and the dict slot): 300 MB for 2,000,000 records, 9 GB for
    UniRef50's 60 million -- memory that grows with the database, and stays (the freed
    small objects leave the heap fragmented). With ``on_disk=True`` the ids live in a
    private temporary SQLite database instead (``sqlite3.connect("")``: a file SQLite
    creates and removes itself, spilled to once its page cache is full), keyed by a
    ``WITHOUT ROWID`` B-tree: memory is bounded by :attr:`CACHE_KIB` whatever the
    number of records (the index builder's validation uses it).

    Args:
        on_disk: keep the ids in SQLite rather than in a dict.
    """

    #: SQLite page cache of the on-disk set, KiB (``PRAGMA cache_size`` = -this).
    CACHE_KIB = 16_384
    #: Rows inserted per transaction of the on-disk set.
    _COMMIT_EVERY = 50_000

    def __init__(self, *, on_disk: bool = False) -> None:
        self._numbers: dict[str, int] | None = None if on_disk else {}
        self._db: sqlite3.Connection | None = None
        self._pending = 0
        if on_disk:
            self._db = sqlite3.connect("")
            self._db.execute(f"PRAGMA cache_size = -{self.CACHE_KIB}")
            self._db.execute("CREATE TABLE ids (record_id TEXT PRIMARY KEY, number INTEGER NOT NULL) WITHOUT ROWID")

    def add(self, record_id: str, number: int) -> None:
        """Record ``record_id`` as record ``number`` (1-based) of the input.

        Raises:
            DuplicateRecordError: ``record_id`` was added before (naming both numbers).
        """
        if self._numbers is not None:
            first = self._numbers.setdefault(record_id, number)
            if first != number:
                raise DuplicateRecordError(record_id, first, number)
            return
        assert self._db is not None
        try:
            self._db.execute("INSERT INTO ids VALUES (?, ?)", (record_id, number))
        except sqlite3.IntegrityError:
            ((first,),) = self._db.execute("SELECT number FROM ids WHERE record_id = ?", (record_id,))
            raise DuplicateRecordError(record_id, int(first), number) from None
        self._pending += 1
        if self._pending >= self._COMMIT_EVERY:
            self._db.commit()
            self._pending = 0

    def close(self) -> None:
        """Free the ids (the on-disk database is removed); idempotent."""
        self._numbers = {} if self._numbers is not None else None
        if self._db is not None:
            self._db.close()


def _parse(handle: IO[str], source: str, ids: RecordIdSet | None) -> Iterator[SequenceRecord]:
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
    for n, (header, raw_seq) in enumerate(SimpleFastaParser(chained), start=1):  # type: ignore[no-untyped-call]
        parts = header.strip().split(None, 1)
        if not parts:
            raise InvalidSequenceError(f"#{n}", "FASTA header has no record id")
        record_id = parts[0]
        description = parts[1] if len(parts) > 1 else ""
        if ids is not None:
            ids.add(record_id, n)
        seq = validate_sequence(record_id, "".join(raw_seq.split()))
        yield SequenceRecord(record_id, description, seq)


def _prepend(first: str, rest: Iterable[str]) -> Iterator[str]:
    yield first
    yield from rest


def read_fasta(
    path: str | os.PathLike[str], *, unique_ids: Literal["memory", "disk"] | None = "memory"
) -> Iterator[SequenceRecord]:
    """Stream validated records from a FASTA file (plain, gzip, or ``-`` for stdin).

    Records are yielded lazily: memory is bounded by one record plus the duplicate-id
    check's :class:`RecordIdSet`.

    Args:
        path: the FASTA file, or ``-``.
        unique_ids: where the duplicate-id check keeps the ids seen: ``"memory"``
            (a dict, ~150 bytes per record: for query files), ``"disk"`` (a temporary
            SQLite database, memory bounded whatever the size: for databases), or
            ``None`` for no check (a file already validated, re-read).

    Raises:
        FileNotFoundError: the file does not exist.
        FastaFormatError: the input is not FASTA, is not UTF-8, or a gzip stream is corrupt.
        InvalidSequenceError: a record is invalid (see :func:`validate_sequence`).
        DuplicateRecordError: a record id occurs twice (unless ``unique_ids`` is None).
    """
    source = str(path)
    ids = None if unique_ids is None else RecordIdSet(on_disk=unique_ids == "disk")
    try:
        with open_text(path) as handle:
            yield from _parse(handle, source, ids)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise FastaFormatError(f"{source}: cannot read FASTA: {exc}") from exc
    finally:
        if ids is not None:
            ids.close()


def check_unique_ids(records: Iterable[SequenceRecord]) -> None:
    """Raise :class:`DuplicateRecordError` if two records share an id."""
    ids = RecordIdSet()
    for n, rec in enumerate(records, start=1):
        ids.add(rec.record_id, n)


def records_from(
    queries: str | os.PathLike[str] | Mapping[str, str] | Sequence[str],
) -> list[SequenceRecord]:
    """Normalise the query forms users pass into validated records.

    A ``str`` is read, in this order, as:

    1. a FASTA file, if it is ``-`` (stdin) or names an existing path that is not a
       directory -- an existing file always wins, so a file called ``ACE`` in the
       working directory is read even though ``"ACE"`` is also a valid sequence
       (pass ``["ACE"]`` to mean the sequence);
    2. FASTA text, if it starts with ``>`` after leading whitespace: parsed and
       validated exactly as a FASTA file (record ids, duplicates, residues);
    3. one protein sequence, record id ``query_1``: whitespace anywhere in it
       (spaces, newlines of a pasted wrapped sequence) is removed, case is ignored
       and one trailing ``*`` is allowed, as in FASTA files; residue positions in
       errors count residues only.

    An ``os.PathLike`` is always a FASTA file.

    Args:
        queries: a FASTA path, FASTA text or one sequence (``str``, see above); a
            ``Path``/``os.PathLike`` FASTA path; a mapping of record id -> sequence;
            or a sequence of residue strings (ids become ``query_1``, ``query_2``, ...).

    Returns:
        The validated records, in input order.

    Raises:
        InvalidSequenceError: a record is invalid; or a ``str`` is neither an
            existing file, nor FASTA text, nor a valid sequence (the message says
            so and gives the first invalid residue and its 1-based position). It
            is a ``ValueError``.
        DuplicateRecordError: two records share an id.
        FastaFormatError: a FASTA file or text is malformed or unreadable.
        FileNotFoundError: an ``os.PathLike`` path does not exist.
    """
    if isinstance(queries, str):
        return _records_from_str(queries)
    if isinstance(queries, os.PathLike):
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


def _records_from_str(text: str) -> list[SequenceRecord]:
    """:func:`records_from` for one ``str``: existing file, FASTA text, or one sequence."""
    if text == "-" or (os.path.exists(text) and not os.path.isdir(text)):
        return list(read_fasta(text))
    return _text_records(text, "neither an existing file, nor FASTA text (starting with '>'), nor")


def records_from_text(text: str) -> list[SequenceRecord]:
    """Validated records from FASTA text or one bare protein sequence; never reads a file.

    What a server does with text a user pasted (the HTTP API's ``fasta`` field): the
    same rules as :func:`records_from` for a ``str``, without its first step, so that
    no text sent over the network is ever opened as a path.

    Args:
        text: FASTA text (starts with ``>`` after leading whitespace), or one protein
            sequence (record id ``query_1``; whitespace removed, case ignored, one
            trailing ``*`` allowed).

    Returns:
        The validated records, in input order.

    Raises:
        InvalidSequenceError: a record is invalid, or the text is neither FASTA nor
            a valid sequence (the message gives the first invalid residue and its
            1-based position); a ``ValueError``.
        DuplicateRecordError: two records share an id.
        FastaFormatError: the FASTA text is malformed.
    """
    return _text_records(text, "neither FASTA text (starting with '>') nor")


def _text_records(text: str, neither: str) -> list[SequenceRecord]:
    stripped = text.lstrip()
    if stripped.startswith(">"):
        return list(_parse(io.StringIO(stripped, newline=None), "FASTA text", RecordIdSet()))
    rid = "query_1"
    shown = repr(text) if len(text) <= 40 else repr(text[:37]) + "..."
    what = f"{shown} is {neither} a valid protein sequence"
    residues = "".join(text.split())
    if not residues:
        raise InvalidSequenceError(rid, f"{what}: it is empty")
    try:
        sequence = validate_sequence(rid, residues)
    except InvalidSequenceError as exc:
        raise InvalidSequenceError(rid, f"{what}: {exc.reason}", position=exc.position) from exc
    return [SequenceRecord(rid, "", sequence)]


def sequence_sha256(sequence: str) -> str:
    """Hex sha256 of the validated residue string (ASCII), used to detect changed records."""
    return hashlib.sha256(sequence.encode("ascii")).hexdigest()
