"""FASTA reading and validation (esmsearch.sequences)."""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from esmsearch import sequences
from esmsearch.errors import DuplicateRecordError, FastaFormatError, InvalidSequenceError
from esmsearch.sequences import (
    RESIDUE_ALPHABET,
    RecordIdSet,
    SequenceRecord,
    check_unique_ids,
    file_sha256,
    open_text,
    read_fasta,
    records_from,
    sequence_sha256,
    validate_sequence,
)


def _write(tmp_path: Path, text: str | bytes, name: str = "db.fasta") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_bytes(text.encode("utf-8"))
    else:
        path.write_bytes(text)
    return path


def _read(path: Path) -> list[SequenceRecord]:
    return list(read_fasta(path))


# -- validate_sequence ------------------------------------------------------------------


def test_alphabet_is_20_standard_plus_xbzuo() -> None:
    assert RESIDUE_ALPHABET == frozenset("ACDEFGHIKLMNPQRSTVWY") | frozenset("XBZUO")


def test_lowercase_is_upper_cased() -> None:
    assert validate_sequence("r1", "mkTaYiak") == "MKTAYIAK"


def test_one_trailing_stop_is_stripped() -> None:
    assert validate_sequence("r1", "MKT*") == "MKT"
    assert validate_sequence("r1", "mkt*") == "MKT"


def test_two_trailing_stops_rejected_at_position_of_the_second_last() -> None:
    with pytest.raises(InvalidSequenceError) as ei:
        validate_sequence("r1", "MKT**")
    assert ei.value.record_id == "r1"
    assert ei.value.position == 4


def test_internal_stop_rejected() -> None:
    with pytest.raises(InvalidSequenceError) as ei:
        validate_sequence("r7", "MK*T")
    assert ei.value.position == 3


@pytest.mark.parametrize(
    ("seq", "bad", "position"),
    [
        ("MKT-A", "-", 4),
        ("MK.TA", ".", 3),
        ("1MKTA", "1", 1),
        ("MKTAJ", "J", 5),
        ("mktaj", "J", 5),
        ("MK TA", " ", 3),
    ],
)
def test_invalid_character_names_id_and_1_based_position(seq: str, bad: str, position: int) -> None:
    with pytest.raises(InvalidSequenceError) as ei:
        validate_sequence("prot_9", seq)
    err = ei.value
    assert err.record_id == "prot_9"
    assert err.position == position
    assert "prot_9" in str(err)
    assert f"residue {position}" in str(err)
    assert repr(bad) in str(err)


@pytest.mark.parametrize("char", ["\u0131", "\u017f", "\u00df", "\ufb01"])
def test_non_ascii_letters_that_upper_case_to_residues_are_rejected(char: str) -> None:
    # str.upper() maps dotless i -> "I", long s -> "S", sharp s -> "SS", the fi
    # ligature -> "FI": none of them is a residue, so they must not become one.
    with pytest.raises(InvalidSequenceError) as ei:
        validate_sequence("uni", f"MK{char}T")
    assert ei.value.record_id == "uni"
    assert ei.value.position == 3


def test_gap_characters_get_a_hint() -> None:
    with pytest.raises(InvalidSequenceError, match="gap"):
        validate_sequence("r1", "MK-T")


def test_non_printable_character_is_shown_as_code_point() -> None:
    with pytest.raises(InvalidSequenceError, match="U\\+0001"):
        validate_sequence("r1", "MK\x01T")


@pytest.mark.parametrize("seq", ["", "*"])
def test_empty_sequence_rejected(seq: str) -> None:
    with pytest.raises(InvalidSequenceError) as ei:
        validate_sequence("empty1", seq)
    assert ei.value.record_id == "empty1"
    assert ei.value.position is None
    assert "empty" in str(ei.value)


def test_every_alphabet_letter_is_accepted() -> None:
    letters = "".join(sorted(RESIDUE_ALPHABET))
    assert validate_sequence("all", letters.lower()) == letters


# -- read_fasta -------------------------------------------------------------------------


def test_id_is_first_word_rest_is_description(tmp_path: Path) -> None:
    path = _write(tmp_path, ">sp|P1|X_ECOLI  Some protein  OS=E. coli\nMKT\n>p2\nACD\n")
    recs = _read(path)
    assert recs == [
        SequenceRecord("sp|P1|X_ECOLI", "Some protein  OS=E. coli", "MKT"),
        SequenceRecord("p2", "", "ACD"),
    ]
    assert len(recs[0]) == 3


def test_wrapped_lines_blank_lines_and_lowercase(tmp_path: Path) -> None:
    path = _write(tmp_path, "\n\n>a desc\nmkt\n\nAYI\n\n>b\n\nacd*\n\n")
    recs = _read(path)
    assert [(r.record_id, r.sequence) for r in recs] == [("a", "MKTAYI"), ("b", "ACD")]


def test_crlf_line_endings(tmp_path: Path) -> None:
    path = _write(tmp_path, ">a first one\r\nMKT\r\nAYI\r\n>b\r\nACD*\r\n")
    recs = _read(path)
    assert recs == [SequenceRecord("a", "first one", "MKTAYI"), SequenceRecord("b", "", "ACD")]


def test_position_counts_residues_across_wrapped_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, ">ok\nMKT\n>bad one\nACDE\nFG-H\n")
    with pytest.raises(InvalidSequenceError) as ei:
        _read(path)
    assert ei.value.record_id == "bad"
    assert ei.value.position == 7


def test_empty_record_rejected_naming_id(tmp_path: Path) -> None:
    path = _write(tmp_path, ">a\nMKT\n>nothing here\n>c\nACD\n")
    with pytest.raises(InvalidSequenceError) as ei:
        _read(path)
    assert ei.value.record_id == "nothing"
    assert "empty" in str(ei.value)


@pytest.mark.parametrize("header", [">", ">   "])
def test_header_without_id_rejected_with_record_number(tmp_path: Path, header: str) -> None:
    path = _write(tmp_path, f">a\nMKT\n{header}\nACD\n")
    with pytest.raises(InvalidSequenceError) as ei:
        _read(path)
    assert ei.value.record_id == "#2"
    assert "no record id" in str(ei.value)


def test_duplicate_ids_rejected_naming_id(tmp_path: Path) -> None:
    path = _write(tmp_path, ">a\nMKT\n>b\nACD\n>a other description\nGGG\n")
    with pytest.raises(DuplicateRecordError) as ei:
        _read(path)
    err = ei.value
    assert isinstance(err, InvalidSequenceError)
    assert err.record_id == "a"
    assert (err.first_index, err.second_index) == (1, 3)
    assert "'a'" in str(err)


@pytest.mark.parametrize("unique_ids", ["memory", "disk"])
def test_duplicate_ids_found_on_disk_as_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unique_ids: str
) -> None:
    # 30 records, commits every 7 on disk: the duplicate's first occurrence sits in an
    # earlier, committed transaction and the check must still name both records.
    monkeypatch.setattr(RecordIdSet, "_COMMIT_EVERY", 7)
    text = "".join(f">r{i}\nMKT\n" for i in range(30)) + ">r3 again\nGGG\n>r31\nACD\n"
    path = _write(tmp_path, text)
    seen: list[str] = []
    with pytest.raises(DuplicateRecordError) as ei:
        for rec in read_fasta(path, unique_ids=unique_ids):  # type: ignore[arg-type]
            seen.append(rec.record_id)
    assert (ei.value.record_id, ei.value.first_index, ei.value.second_index) == ("r3", 4, 31)
    assert seen == [f"r{i}" for i in range(30)]  # raised at the duplicate, not later


def test_unique_ids_none_reads_a_validated_file_without_the_check(tmp_path: Path) -> None:
    path = _write(tmp_path, ">a\nMKT\n>a\nACD\n")
    assert [r.sequence for r in read_fasta(path, unique_ids=None)] == ["MKT", "ACD"]


def test_record_id_set_on_disk_keeps_no_python_objects_per_id() -> None:
    # The point of the on-disk set: its memory does not grow with the number of ids.
    # tracemalloc sees every Python object (the in-memory dict's keys, values and table)
    # and none of SQLite's page cache, which is bounded by CACHE_KIB.
    import tracemalloc

    def traced_growth(on_disk: bool) -> int:
        ids = RecordIdSet(on_disk=on_disk)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for n in range(1, 50_001):
                ids.add(f"UniRef50_A0A{n:07d}", n)
            return tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
            ids.close()

    in_memory, on_disk = traced_growth(False), traced_growth(True)
    assert in_memory > 50_000 * 80  # a dict: well over 80 bytes per id
    assert on_disk < 256 * 1024  # SQLite: nothing per id in Python's heap


def test_record_id_set_close_removes_the_ids() -> None:
    ids = RecordIdSet(on_disk=True)
    ids.add("a", 1)
    ids.close()
    ids.close()  # idempotent
    with pytest.raises(Exception, match="closed"):
        ids.add("b", 2)


def test_text_before_first_header_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "MKTAYIAK\n>a\nMKT\n")
    with pytest.raises(FastaFormatError, match="not FASTA"):
        _read(path)


def test_text_after_blank_lines_before_first_header_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "\n\n# comment\n>a\nMKT\n")
    with pytest.raises(FastaFormatError):
        _read(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_gives_no_records(tmp_path: Path, content: str) -> None:
    assert _read(_write(tmp_path, content)) == []


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _read(tmp_path / "absent.fasta")


def test_gzip_detected_with_and_without_suffix(tmp_path: Path) -> None:
    text = ">a desc\nmkt*\n>b\nACD\n"
    expected = [SequenceRecord("a", "desc", "MKT"), SequenceRecord("b", "", "ACD")]
    gz = gzip.compress(text.encode())
    assert _read(_write(tmp_path, gz, "db.fasta.gz")) == expected
    assert _read(_write(tmp_path, gz, "db.fasta")) == expected
    # and a plain file named .gz is read as plain text
    assert _read(_write(tmp_path, text, "plain.fa.gz")) == expected


def test_corrupt_gzip_is_fasta_format_error(tmp_path: Path) -> None:
    gz = gzip.compress(b">a\nMKT\n" * 200)
    path = _write(tmp_path, gz[: len(gz) // 2], "cut.fa.gz")
    with pytest.raises(FastaFormatError):
        _read(path)


def test_non_utf8_is_fasta_format_error(tmp_path: Path) -> None:
    path = _write(tmp_path, b">a \xff\xfe\nMKT\n")
    with pytest.raises(FastaFormatError):
        _read(path)


def test_reading_gzip_fasta_leaves_no_unclosed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, gzip.compress(b">a\nMKT\n>b\nACD\n"), "db.fa.gz")
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # where a warning raised in __del__ goes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unclosed file's ResourceWarning becomes an error
        assert [r.record_id for r in read_fasta(path)] == ["a", "b"]
        for _ in range(3):
            assert len(_read(path)) == 2
        gc.collect()
    assert [u.exc_value for u in unraisable] == []


@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "plain"])
def test_closing_the_text_handle_closes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compressed: bool
) -> None:
    data = b">a\nMKT\n"
    path = _write(tmp_path, gzip.compress(data) if compressed else data, "db.fa")
    opened: list[Any] = []

    def tracking_open(*args: Any, **kwargs: Any) -> Any:
        fh = open(*args, **kwargs)  # noqa: SIM115
        opened.append(fh)
        return fh

    monkeypatch.setattr(sequences, "open", tracking_open, raising=False)
    handle = open_text(path)
    assert handle.read() == data.decode()
    assert len(opened) == 1 and not opened[0].closed
    handle.close()
    assert opened[0].closed


def test_read_fasta_from_stdin_gzip(monkeypatch: pytest.MonkeyPatch) -> None:
    gz = gzip.compress(b">q1\nMKT\n")
    fake = io.TextIOWrapper(io.BufferedReader(io.BytesIO(gz)))  # type: ignore[arg-type]
    monkeypatch.setattr(sys, "stdin", fake)
    assert list(read_fasta("-")) == [SequenceRecord("q1", "", "MKT")]


def test_reads_real_ecoli_file(ecoli_fasta: Path) -> None:
    recs = _read(ecoli_fasta)
    assert len(recs) == 40
    assert recs[0].record_id == "sp|A0A385XJ53|INSA9_ECOLI"
    assert recs[0].description.startswith("Insertion element IS1 9 protein InsA")
    assert recs[0].sequence.startswith("MASVSISCPSC")
    assert all(0 < len(r) <= 400 for r in recs)


# -- records_from, helpers --------------------------------------------------------------


def test_records_from_path_str_and_pathlike(tmp_path: Path) -> None:
    path = _write(tmp_path, ">x d\nmkt\n")
    expected = [SequenceRecord("x", "d", "MKT")]
    assert records_from(path) == expected
    assert records_from(str(path)) == expected


def test_records_from_mapping_keeps_ids_and_order() -> None:
    assert records_from({"b": "acd*", "a": "MKT"}) == [
        SequenceRecord("b", "", "ACD"),
        SequenceRecord("a", "", "MKT"),
    ]


def test_records_from_mapping_error_names_key() -> None:
    with pytest.raises(InvalidSequenceError) as ei:
        records_from({"good": "MKT", "bad_q": "MK1"})
    assert ei.value.record_id == "bad_q"
    assert ei.value.position == 3


def test_records_from_list_numbers_ids() -> None:
    assert records_from(["mkt", "ACD*"]) == [
        SequenceRecord("query_1", "", "MKT"),
        SequenceRecord("query_2", "", "ACD"),
    ]
    with pytest.raises(InvalidSequenceError) as ei:
        records_from(["MKT", ""])
    assert ei.value.record_id == "query_2"


def test_check_unique_ids() -> None:
    check_unique_ids([SequenceRecord("a", "", "M"), SequenceRecord("b", "", "M")])
    with pytest.raises(DuplicateRecordError) as ei:
        check_unique_ids(
            [
                SequenceRecord("a", "", "M"),
                SequenceRecord("b", "", "M"),
                SequenceRecord("b", "", "K"),
            ]
        )
    assert ei.value.record_id == "b"
    assert (ei.value.first_index, ei.value.second_index) == (2, 3)


def test_sha256_helpers(tmp_path: Path) -> None:
    assert sequence_sha256("MKT") == hashlib.sha256(b"MKT").hexdigest()
    data = bytes(range(256)) * 10_000
    path = _write(tmp_path, data, "blob.bin")
    assert file_sha256(path, chunk_bytes=1000) == hashlib.sha256(data).hexdigest()
