"""``esmsearch easy-search``: in-process search equal to the server's, FASTA targets cached."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from esmsearch import cli
from esmsearch.client.formats import write_tsv
from esmsearch.easy_search import EasySearchConfig, cache_key, default_cache_dir, easy_search, resolve_target
from esmsearch.errors import ConfigError

QUERIES = {
    "q1": (
        "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGE"
        "GLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDL"
        "DAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWEAELLRPGNLRLAV"
    ),
    "q2": (
        "MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTFSYGVQCFSRYPDHMKQHDFFKSAMPE"
        "GYVQERTIFFKDDGNYKTRAEVKFEGDTLVNRIELKGIDFKEDGNILGHKLEYNYNSHNVYIMADKQKNGIKVNFKIRHNIEDGSVQLAD"
        "HYQQNTPIGDGPVLLPDNHYLSTQSALSKDPNEKRDHMVLLEFVTAAGITHGMDELYK"
    ),
}


@pytest.fixture()
def query_fasta(tmp_path: Path) -> Path:
    path = tmp_path / "queries.fasta"
    path.write_text("".join(f">{qid} a query\n{seq}\n" for qid, seq in QUERIES.items()), encoding="ascii")
    return path


def _tsv(results) -> str:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    write_tsv(results, out)
    return out.getvalue()


def test_hits_equal_the_servers_for_the_same_index_and_queries(client, server, query_fasta: Path) -> None:  # type: ignore[no-untyped-def]
    _, index_dir = server
    served = client.search(query_fasta, k=7)
    local = easy_search(query_fasta, index_dir, k=7, config=EasySearchConfig(device="cpu"))
    assert local == served  # ids, descriptions, float32 scores, ranks, lengths, E-values, version
    assert all(r.hits and r.hits[0].evalue is not None for r in local)
    # The filters and the database-size override take the server's path too.
    kw = {"k": 10, "min_score": local[0].hits[3].cosine_score, "evalue_db_size": 1_000_000}
    assert easy_search(query_fasta, index_dir, config=EasySearchConfig(device="cpu"), **kw) == client.search(
        query_fasta, **kw
    )
    cutoff = local[1].hits[2].evalue
    assert easy_search(
        query_fasta, index_dir, k=10, max_evalue=cutoff, config=EasySearchConfig(device="cpu")
    ) == client.search(query_fasta, k=10, max_evalue=cutoff)


def test_cli_writes_the_same_tsv_as_search(client, server, query_fasta: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    address, index_dir = server
    out = tmp_path / "hits.tsv"
    assert (
        cli.main(["easy-search", str(query_fasta), str(index_dir), "-o", str(out), "-k", "4", "--device", "cpu"]) == 0
    )
    via_server = tmp_path / "served.tsv"
    assert cli.main(["search", str(query_fasta), "--server", address, "-k", "4", "-o", str(via_server)]) == 0
    assert out.read_text() == via_server.read_text()
    assert len(out.read_text().splitlines()) == 1 + 2 * 4
    js = tmp_path / "hits.json"
    assert (
        cli.main(["easy-search", str(query_fasta), str(index_dir), "-o", str(js), "--format", "json", "-k", "2"]) == 0
    )
    assert [q["query_id"] for q in json.loads(js.read_text())] == ["q1", "q2"]


def test_fasta_target_is_indexed_once_and_reused(
    tiny_checkpoint: Path, ecoli_fasta: Path, query_fasta: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "db.fasta"
    target.write_bytes(ecoli_fasta.read_bytes())
    config = EasySearchConfig(model=str(tiny_checkpoint), device="cpu", decoys=40, cache_dir=tmp_path / "cache")
    first = easy_search(query_fasta, target, k=5, config=config)
    entries = sorted(p for p in (tmp_path / "cache" / "targets").iterdir() if p.is_dir())
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    assert first[0].hits and first[0].hits[0].evalue is not None

    import esmsearch.indexer

    def no_build(*a, **kw):  # type: ignore[no-untyped-def]
        raise AssertionError("the cached index should have been reused")

    monkeypatch.setattr(esmsearch.indexer, "build_index", no_build)
    again = easy_search(query_fasta, target, k=5, config=config)
    assert again == first
    # The cached index gives what the same build searched directly gives.
    assert easy_search(query_fasta, entries[0], k=5, config=EasySearchConfig(device="cpu")) == first
    # One changed residue in the target is a new cache entry (and a build, refused here).
    target.write_text(target.read_text().replace("M", "L", 1))
    with pytest.raises(AssertionError, match="cached index should have been reused"):
        easy_search(query_fasta, target, k=5, config=config)


def test_cache_key_follows_every_setting(tmp_path: Path) -> None:
    base = EasySearchConfig()
    key = cache_key("ab" * 32, base, "esm2_t6_8M_UR50D")
    assert key == cache_key("ab" * 32, EasySearchConfig(device="cpu", cache_dir=tmp_path), "esm2_t6_8M_UR50D")
    others = {
        cache_key("cd" * 32, base, "esm2_t6_8M_UR50D"),
        cache_key("ab" * 32, base, "esm2_t12_35M_UR50D"),
        cache_key("ab" * 32, EasySearchConfig(layer=3), "esm2_t6_8M_UR50D"),
        cache_key("ab" * 32, EasySearchConfig(precision="int8"), "esm2_t6_8M_UR50D"),
        cache_key("ab" * 32, EasySearchConfig(decoys=0), "esm2_t6_8M_UR50D"),
    }
    assert key not in others and len(others) == 5
    # A local checkpoint rewritten in place is another model.
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"one")
    k1 = cache_key("ab" * 32, base, str(ckpt))
    ckpt.write_bytes(b"other weights")
    assert cache_key("ab" * 32, base, str(ckpt)) != k1


def test_default_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESMSEARCH_CACHE_DIR", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("ESMSEARCH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "esmsearch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "esmsearch"


def test_root_target_searches_its_live_version(
    tiny_checkpoint: Path, ecoli_fasta: Path, query_fasta: Path, tmp_path: Path
) -> None:
    from esmsearch.indexer import build_version
    from esmsearch.versions import IndexRoot

    root = tmp_path / "root"
    build_version(ecoli_fasta, root, model=str(tiny_checkpoint), device="cpu", decoys=0)
    live = IndexRoot(root).current_path()
    assert resolve_target(root, EasySearchConfig(), "unused") == live
    results = easy_search(query_fasta, root, k=3, config=EasySearchConfig(device="cpu"))
    assert results[0].index_version == live.name
    assert all(h.evalue is None for r in results for h in r.hits)  # built without decoys


def test_bad_targets_and_arguments_are_one_clear_error(
    query_fasta: Path, small_index: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_target(tmp_path / "nope.fasta", EasySearchConfig(), "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither an index"):
        resolve_target(tmp_path / "empty", EasySearchConfig(), "m")
    with pytest.raises(ConfigError, match="k must be"):
        easy_search(query_fasta, small_index, k=0)
    assert cli.main(["easy-search", str(query_fasta), str(tmp_path / "empty")]) == 1
    assert "neither an index" in capsys.readouterr().err
    bad = tmp_path / "bad.fasta"
    bad.write_text(">" + "x" * 300 + "\nMKV\n")
    assert cli.main(["easy-search", str(bad), str(small_index), "--device", "cpu"]) == 1
    assert "300 characters" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hits.tsv")
