"""Query input forms (esmsearch.sequences.records_from, used by the clients): a FASTA
path, FASTA text, one bare sequence, a mapping, a list -- and one clear ValueError for
a string that is none of them."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from esmsearch.errors import DuplicateRecordError, InvalidSequenceError
from esmsearch.sequences import SequenceRecord, records_from, records_from_text

MKT = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"


def test_bare_sequence_is_one_query() -> None:
    assert records_from(MKT) == [SequenceRecord("query_1", "", MKT)]


@pytest.mark.parametrize(
    "text",
    [
        MKT.lower(),
        MKT + "*",
        f"  {MKT}\n",
        f"{MKT[:10]}\n{MKT[10:20]}\r\n{MKT[20:]}",  # a pasted, wrapped sequence
        f"{MKT[:10]} {MKT[10:]}\t",
    ],
    ids=["lowercase", "stop", "surrounding-space", "wrapped-lines", "inner-space"],
)
def test_bare_sequence_normalisation(text: str) -> None:
    assert records_from(text) == [SequenceRecord("query_1", "", MKT)]


def test_fasta_text_is_parsed_like_a_file() -> None:
    text = f"\n  >q1 first query\n{MKT[:12]}\n{MKT[12:]}\n>q2\nacd*\n"
    assert records_from(text) == [
        SequenceRecord("q1", "first query", MKT),
        SequenceRecord("q2", "", "ACD"),
    ]
    assert records_from(">q1\r\nMKT\r\n") == [SequenceRecord("q1", "", "MKT")]


def test_fasta_text_is_validated_like_a_file() -> None:
    with pytest.raises(DuplicateRecordError) as dup:
        records_from(">q1\nMKT\n>q1\nACD\n")
    assert dup.value.record_id == "q1"
    with pytest.raises(InvalidSequenceError) as bad:
        records_from(">q1\nMKT\n>q2\nMK1T\n")
    assert (bad.value.record_id, bad.value.position) == ("q2", 3)
    with pytest.raises(InvalidSequenceError, match="empty"):
        records_from(">q1\n>q2\nMKT\n")
    with pytest.raises(InvalidSequenceError, match="no record id"):
        records_from(">\nMKT\n")


def test_existing_file_wins_over_a_sequence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert records_from("ACE") == [SequenceRecord("query_1", "", "ACE")]  # no such file: a sequence
    Path("ACE").write_text(">from_file\nWWW\n")
    assert records_from("ACE") == [SequenceRecord("from_file", "", "WWW")]  # documented: the file wins
    assert records_from(["ACE"]) == [SequenceRecord("query_1", "", "ACE")]  # a list always means sequences


def test_records_from_text_never_opens_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a server does with pasted text: a file named like a sequence, or a path, stays text.
    monkeypatch.chdir(tmp_path)
    Path("ACE").write_text(f">from_file\n{MKT}\n")
    assert records_from_text("ACE") == [SequenceRecord("query_1", "", "ACE")]
    assert records_from("ACE")[0].record_id == "from_file"  # the client's rule, for contrast
    with pytest.raises(InvalidSequenceError, match="neither FASTA text .* nor a valid protein sequence") as info:
        records_from_text(str(tmp_path / "ACE"))
    assert "existing file" not in str(info.value) and info.value.position == 1
    assert records_from_text(f">q {MKT[:3]}\n{MKT}") == [SequenceRecord("q", MKT[:3], MKT)]


def test_paths_as_str_and_pathlike_and_gzip(tmp_path: Path) -> None:
    plain = tmp_path / "q.fasta"
    plain.write_text(">a d\nmkt\n")
    gz = tmp_path / "q.fasta.gz"
    gz.write_bytes(gzip.compress(b">a d\nmkt\n"))
    expected = [SequenceRecord("a", "d", "MKT")]
    assert records_from(str(plain)) == records_from(plain) == records_from(str(gz)) == expected


def test_a_directory_is_not_a_query_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidSequenceError, match="neither an existing file"):
        records_from(str(tmp_path))


def test_pathlike_is_always_a_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        records_from(tmp_path / "MKT")


@pytest.mark.parametrize(
    ("text", "char", "position"),
    [
        ("queries.fasta", ".", 8),  # a mistyped path
        ("data/missing.fa", "/", 5),
        ("MKTAYIAKQR1", "1", 11),
        ("MKT-AYI", "-", 4),
        (f"{MKT[:5]}\n{MKT[5:10]}J", "J", 11),  # positions count residues, not whitespace
    ],
)
def test_neither_file_nor_sequence_nor_fasta_is_one_value_error(text: str, char: str, position: int) -> None:
    with pytest.raises(ValueError) as excinfo:
        records_from(text)
    err = excinfo.value
    assert isinstance(err, InvalidSequenceError)
    message = str(err)
    assert "neither an existing file, nor FASTA text" in message and "nor a valid protein sequence" in message
    assert repr(text[:37])[1:-1] in message
    assert f"invalid residue {char!r}" in message
    assert (err.record_id, err.position) == ("query_1", position)
    assert f"at residue {position}" in message


@pytest.mark.parametrize("text", ["", "   ", "\n\n"])
def test_empty_string_is_a_value_error(text: str) -> None:
    with pytest.raises(InvalidSequenceError, match="neither an existing file.*empty"):
        records_from(text)


def test_long_invalid_string_is_shortened_in_the_message() -> None:
    text = "M" * 5000 + "!"
    with pytest.raises(InvalidSequenceError) as excinfo:
        records_from(text)
    assert excinfo.value.position == 5001
    assert len(str(excinfo.value)) < 400


def test_fasta_text_errors_name_the_record_not_query_1() -> None:
    with pytest.raises(InvalidSequenceError) as excinfo:
        records_from(">q\nMK T?\n")
    assert (excinfo.value.record_id, excinfo.value.position) == ("q", 4)
    assert "neither an existing file" not in str(excinfo.value)


def test_fasta_text_with_data_before_the_first_header_is_not_fasta() -> None:
    # Does not start with '>': read as a sequence, so the newline-separated header is invalid.
    with pytest.raises(InvalidSequenceError, match="invalid residue '>'") as excinfo:
        records_from("MKT\n>q1\nACD\n")
    assert excinfo.value.position == 4


def test_stdin_dash_is_still_a_fasta_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    fake = io.TextIOWrapper(io.BufferedReader(io.BytesIO(b">s1\nMKT\n")))  # type: ignore[arg-type]
    monkeypatch.setattr(sys, "stdin", fake)
    assert records_from("-") == [SequenceRecord("s1", "", "MKT")]


# -- through the real client ----------------------------------------------------------------


def test_client_searches_a_bare_sequence(client, ecoli_fasta: Path) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.sequences import read_fasta

    first = next(read_fasta(ecoli_fasta))
    results = client.search(first.sequence, k=3)
    assert len(results) == 1
    assert results[0].query_id == "query_1"
    assert results[0].hits[0].target_id == first.record_id
    assert results[0].hits[0].cosine_score >= 0.99999


def test_client_searches_fasta_text(client, ecoli_fasta: Path) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.sequences import read_fasta

    records = list(read_fasta(ecoli_fasta))[:2]
    text = "".join(f">mine_{i} copy\n{r.sequence}\n" for i, r in enumerate(records))
    results = client.search(text, k=1)
    assert [r.query_id for r in results] == ["mine_0", "mine_1"]
    assert [r.hits[0].target_id for r in results] == [r.record_id for r in records]


def test_client_rejects_garbage_locally(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="neither an existing file") as excinfo:
        client.search("no_such_queries.fasta", k=1)
    assert isinstance(excinfo.value, InvalidSequenceError)
    assert not os.path.exists("no_such_queries.fasta")


# -- query ids: one printable word, <= 256 characters; TSV never forged (issue 19, part 5) --------


@pytest.mark.parametrize(
    ("qid", "problem"),
    [
        ("q\tforged", "whitespace ('\\t' at character 2)"),
        ("q\nforged", "whitespace ('\\n' at character 2)"),
        ("two words", "whitespace (' ' at character 4)"),
        ("q\x00", "non-printable character ('\\x00' at character 2)"),
        ("q\x7f", "non-printable character ('\\x7f' at character 2)"),
        ("\u200bq", "non-printable character ('\\u200b' at character 1)"),
        ("q" * 257, "257 characters, over the limit of 256"),
    ],
)
def test_query_ids_must_be_one_printable_word(qid: str, problem: str) -> None:
    import grpc

    from esmsearch.server.rpc import Reject
    from esmsearch.server.validation import RequestLimits, check_queries
    from esmsearch.v1.search_pb2 import Query

    queries = [Query(query_id="fine|id/1-9;é", sequence=MKT), Query(query_id=qid, sequence=MKT)]
    with pytest.raises(Reject) as excinfo:
        check_queries(queries, RequestLimits())
    assert excinfo.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert excinfo.value.record_id == qid
    assert excinfo.value.details.startswith(f"query #2 ({qid[:40]!r}")
    assert problem in excinfo.value.details
    assert check_queries(queries[:1] + [Query(query_id="q" * 256, sequence=MKT)], RequestLimits()) == [MKT, MKT]


def _result(query_id: str, *hits: tuple[str, str]) -> object:
    from esmsearch.client.types import Hit, QueryResult

    return QueryResult(
        query_id,
        10,
        "v1",
        [Hit(tid, desc, 0.5, rank, 10) for rank, (tid, desc) in enumerate(hits, start=1)],
    )


def test_tsv_descriptions_with_tabs_and_line_breaks_stay_one_field() -> None:
    import io

    from esmsearch.client.formats import TSV_COLUMNS, write_tsv

    hostile = "kinase\tforged\t1.0\nq2\tseqX\r\x0b\x0c\x1c\x85\u2028\u2029end"
    out = io.StringIO()
    write_tsv([_result("q1", ("t1", hostile), ("t2", "plain"))], out)  # type: ignore[list-item]
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 1 + 2 + 1
    assert all(len(line.split("\t")) == len(TSV_COLUMNS) for line in lines[:-1])
    assert lines[1].split("\t")[-1] == "kinase forged 1.0 q2 seqX end"
    assert out.getvalue().splitlines() == lines[:-1]  # no other line break either


@pytest.mark.parametrize("where", ["query id", "target id"])
def test_tsv_refuses_an_id_that_would_forge_rows(where: str) -> None:
    import io

    from esmsearch.client.formats import TsvFieldError, write_tsv
    from esmsearch.errors import EsmsearchError

    forged = "q\tt9\t1.000000\t1\t10\t10\tNA\t\nq"
    result = _result(forged, ("t1", "")) if where == "query id" else _result("q1", (forged, ""))
    out = io.StringIO()
    with pytest.raises(TsvFieldError, match=where) as excinfo:
        write_tsv([result], out)  # type: ignore[list-item]
    assert isinstance(excinfo.value, EsmsearchError)  # the CLI prints one line, exit 1
    assert "\t" not in out.getvalue().split("\n", 1)[1]  # no row of it was written


def test_cli_search_with_a_hostile_fasta_id_fails_naming_the_record(server, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.cli import main

    address, _ = server
    fasta = tmp_path / "q.fasta"
    fasta.write_text(f">ok\n{MKT}\n>q\x1b[2J\x07 desc\n{MKT}\n")
    assert main(["search", str(fasta), "--server", address, "-k", "1", "--format", "tsv"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "query #2 ('q\\x1b[2J\\x07')" in captured.err and "\x1b" not in captured.err
