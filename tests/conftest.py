"""Session fixtures shared by the test suite.

* ``tiny_checkpoint``: a seeded random ESM-2 (2 layers, dim 32, 4 heads) written in
  fair-esm's checkpoint format, so the real loading code runs.
* ``ecoli_fasta``: 40 real E. coli proteins (tests/data/ecoli_40.fasta).
* ``tiny_embedder``: an Embedder on ``tiny_checkpoint`` (CPU).
* ``small_index``: an index of ``ecoli_fasta`` built through the public API.
* ``pki``: a throw-away CA with server and client certificates (tests/pki.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from esmsearch.checkpoints import write_random_checkpoint

    out = tmp_path_factory.mktemp("ckpt")
    return write_random_checkpoint(
        "esm2_t6_8M_UR50D",
        out,
        seed=1234,
        num_layers=2,
        embed_dim=32,
        attention_heads=4,
        name="esm2_tiny_test",
    )


@pytest.fixture(scope="session")
def ecoli_fasta() -> Path:
    return DATA / "ecoli_40.fasta"


@pytest.fixture(scope="session")
def tiny_embedder(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    from esmsearch.embedding import Embedder

    return Embedder(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="session")
def small_index(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, ecoli_fasta: Path) -> Path:
    from esmsearch.indexer import build_index

    out = tmp_path_factory.mktemp("index") / "ecoli40"
    build_index(ecoli_fasta, out, model=str(tiny_checkpoint), device="cpu")
    return out


@pytest.fixture(scope="session")
def server(small_index: Path):  # type: ignore[no-untyped-def]
    """An in-process esmsearch server on a free port over ``small_index``.

    Yields ``(address, index_path)``; stopped (drained) at session teardown.
    """
    from esmsearch.server import ServerConfig, create_server

    srv, port = create_server(ServerConfig(index=small_index, port=0, device="cpu", max_workers=4))
    try:
        yield f"127.0.0.1:{port}", small_index
    finally:
        srv.stop(1.0)


@pytest.fixture()
def client(server):  # type: ignore[no-untyped-def]
    """A :class:`esmsearch.client.SearchClient` connected to the ``server`` fixture."""
    from esmsearch.client import SearchClient

    address, _ = server
    with SearchClient(address, timeout_s=60.0) as c:
        yield c


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from pki import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


def reap(proc) -> None:  # type: ignore[no-untyped-def]
    """Kill ``proc`` if it still runs, wait for it, and close its pipes (no ResourceWarning)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
