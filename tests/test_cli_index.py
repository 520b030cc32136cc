"""``esmsearch index build`` and ``esmsearch index info`` through esmsearch.cli.main."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import pytest

from esmsearch.cli import main
from esmsearch.store import EMBEDDINGS_FILE, Manifest


def _run(argv: list[str]) -> int:
    """Exit status of the CLI, whether main returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _assert_one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("esmsearch: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def _build_args(fasta: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        "index",
        "build",
        str(fasta),
        "-o",
        str(out),
        "--model",
        str(ckpt),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory: pytest.TempPathFactory, ecoli_fasta: Path, tiny_checkpoint: Path) -> tuple[Path, str]:
    """An index built by the CLI, and what the build printed."""
    out = tmp_path_factory.mktemp("cli") / "ecoli_cli"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = main(_build_args(ecoli_fasta, out, tiny_checkpoint))
    assert status == 0
    return out, buf.getvalue()


def test_build_prints_summary(cli_index: tuple[Path, str], tiny_checkpoint: Path) -> None:
    out, stdout = cli_index
    first = stdout.splitlines()[0]
    assert first.startswith(f"built {out}: 40 sequences, ")
    assert "model esm2_tiny_test layer 2 dim 32, index Flat, version " in first
    assert "residues/s" in stdout
    m = Manifest.read(out)
    assert m.count == 40
    assert m.version in first
    assert m.checkpoint_sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()


def test_build_options_reach_the_manifest(
    tmp_path: Path, ecoli_fasta: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "idx"
    assert (
        _run(
            _build_args(
                ecoli_fasta,
                out,
                tiny_checkpoint,
                "--layer",
                "-2",
                "--index-factory",
                "HNSW8",
                "--toks-per-batch",
                "2048",
            )
        )
        == 0
    )
    m = Manifest.read(out)
    assert (m.layer, m.index_factory, m.build["toks_per_batch"]) == (1, "HNSW8", 2048)
    assert "layer 1 dim 32, index HNSW8" in capsys.readouterr().out


def test_info_plain(cli_index: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = cli_index
    assert _run(["index", "info", str(out)]) == 0
    text = capsys.readouterr().out
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition("  ")
        fields[key.strip()] = value.strip()
    assert fields["sequences"] == "40"
    assert fields["model"] == "esm2_tiny_test"
    assert fields["dim"] == "32"
    assert fields["layer"] == "2"
    assert "verified" not in fields


def test_info_json_verify(cli_index: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = cli_index
    assert _run(["index", "info", str(out), "--json", "--verify"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["count"] == 40
    assert data["dim"] == 32
    assert data["model_name"] == "esm2_tiny_test"
    assert data["verified"] is True
    assert data["file_sizes"][EMBEDDINGS_FILE] == (out / EMBEDDINGS_FILE).stat().st_size
    assert data == {
        **json.loads(Manifest.read(out).to_json()),
        "file_sizes": data["file_sizes"],
        "verified": True,
    }


def test_info_verify_plain(cli_index: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = cli_index
    assert _run(["index", "info", str(out), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out


def test_info_verify_detects_corruption(
    tmp_path: Path, cli_index: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    out, _ = cli_index
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    emb = copy / EMBEDDINGS_FILE
    data = bytearray(emb.read_bytes())
    data[-3] ^= 0x10
    emb.write_bytes(bytes(data))
    assert _run(["index", "info", str(copy)]) == 0
    capsys.readouterr()
    assert _run(["index", "info", str(copy), "--verify"]) == 1
    line = _assert_one_error_line(capsys.readouterr().err)
    assert EMBEDDINGS_FILE in line


def test_info_missing_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["index", "info", str(tmp_path / "nope")]) == 1
    captured = capsys.readouterr()
    assert "manifest.json not found" in _assert_one_error_line(captured.err)
    assert captured.out == ""


def test_build_missing_fasta(tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "idx"
    assert _run(_build_args(tmp_path / "absent.fasta", out, tiny_checkpoint)) == 1
    assert "absent.fasta" in _assert_one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_build_bad_record(
    tmp_path: Path, ecoli_fasta: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.fasta"
    bad.write_text(ecoli_fasta.read_text() + ">broken_one\nMKJT\n")
    assert _run(_build_args(bad, tmp_path / "idx", tiny_checkpoint)) == 1
    line = _assert_one_error_line(capsys.readouterr().err)
    assert "broken_one" in line and "residue 3" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fasta"]


def test_build_existing_output(
    tmp_path: Path, ecoli_fasta: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "idx"
    out.mkdir()
    assert _run(_build_args(ecoli_fasta, out, tiny_checkpoint)) == 1
    assert "--overwrite" in _assert_one_error_line(capsys.readouterr().err)
    assert list(out.iterdir()) == []


def test_build_unknown_model(tmp_path: Path, ecoli_fasta: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "index",
        "build",
        str(ecoli_fasta),
        "-o",
        str(tmp_path / "idx"),
        "--model",
        "esm2_t99_nope",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert _run(argv) == 1
    assert "local" in _assert_one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "extra",
    [
        ["--layer", "7"],
        ["--toks-per-batch", "100"],
        ["--device", "tpu"],
        ["--index-factory", "nonsense"],
    ],
)
def test_build_bad_settings_exit_1(
    tmp_path: Path,
    ecoli_fasta: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
) -> None:
    assert _run(_build_args(ecoli_fasta, tmp_path / "idx", tiny_checkpoint, *extra)) == 1
    _assert_one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["index"],
        ["index", "build", "db.fasta"],  # no -o
        ["index", "build", "db.fasta", "-o", "x", "--layer", "last"],
        ["index", "build", "db.fasta", "-o", "x", "--precision", "fp8"],
        ["index", "info"],
        ["index", "frobnicate"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert "Traceback" not in err


def test_cli_defaults_repeated_for_a_light_import_match_their_sources() -> None:
    from esmsearch import cli, significance
    from esmsearch.easy_search import EasySearchConfig

    assert cli.DEFAULT_DECOYS == significance.DEFAULT_DECOYS == EasySearchConfig().decoys
    for command in (["index", "build", "x.fa", "-o", "out"], ["easy-search", "q.fa", "t.fa"]):
        args = cli.build_parser().parse_args(command)
        assert args.decoys == significance.DEFAULT_DECOYS
        assert args.precision in cli.PRECISION_CHOICES
