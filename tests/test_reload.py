"""Live reload of a versioned index root by the server.

Covers: reference-counted release of a swapped-out index; the ``ReloadIndex`` RPC,
polling and SIGHUP (through ``esmsearch serve ROOT``) picking up a new ``current``;
refusal of a version built with another model or missing (the old version keeps
serving and ``reload_error`` says why); and a live server hammered by concurrent
queries while two versions are published and one rollback happens, with zero
failed requests. Synchronisation is by explicit RPCs, or by polling a condition
with a bounded deadline -- never by sleeping.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import reap

from esmsearch.client import FailedPreconditionError, SearchClient
from esmsearch.indexer import build_version
from esmsearch.server import ServerConfig, create_server
from esmsearch.server.slot import IndexSlot
from esmsearch.store import Index
from esmsearch.versions import IndexRoot

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def random_records(n: int, seed: int, prefix: str = "seq") -> dict[str, str]:
    """``n`` seeded random proteins of 30..90 residues: record id -> sequence."""
    rng = np.random.default_rng(seed)
    return {
        f"{prefix}{i:04d}": "".join(rng.choice(list(AMINO_ACIDS), size=int(rng.integers(30, 91)))) for i in range(n)
    }


def write_fasta(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in records.items()))
    return path


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` until true; fail after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)  # polling interval of a bounded wait, not synchronisation by sleep


@dataclass
class Root:
    path: Path
    records: dict[str, str]
    v1: str
    tmp: Path
    model: str


@pytest.fixture()
def root(tmp_path: Path, tiny_checkpoint: Path, tiny_embedder) -> Root:  # type: ignore[no-untyped-def]
    records = random_records(60, seed=21)
    fasta = write_fasta(tmp_path / "db_v1.fasta", records)
    result = build_version(fasta, tmp_path / "root", model=str(tiny_checkpoint), embedder=tiny_embedder)
    return Root(tmp_path / "root", records, result.manifest.version, tmp_path, str(tiny_checkpoint))


def publish(root: Root, records: dict[str, str], name: str, tiny_embedder) -> str:  # type: ignore[no-untyped-def]
    fasta = write_fasta(root.tmp / f"{name}.fasta", records)
    return build_version(fasta, root.path, model=root.model, embedder=tiny_embedder).manifest.version


@pytest.fixture()
def root_server(root: Root) -> Iterator[tuple[SearchClient, object]]:
    server, port = create_server(ServerConfig(index=root.path, port=0, device="cpu", max_workers=8, reload_poll_s=None))
    try:
        with SearchClient(f"127.0.0.1:{port}", timeout_s=60.0) as client:
            yield client, server
    finally:
        server.stop(1.0)


def test_swapped_out_index_is_closed_only_after_its_last_lease(small_index: Path) -> None:
    old, new = Index.open(small_index), Index.open(small_index)
    slot = IndexSlot(old)
    with slot.lease() as leased:
        assert leased is old
        returned = slot.swap(new)
        assert returned is old and slot.current is new
        # The in-flight request still reads its (old) index: not closed under it.
        assert leased.targets([0])[0].row == 0
        with slot.lease() as later:
            assert later is new
    with pytest.raises(sqlite3.ProgrammingError):  # closed once the last lease ended
        old.targets([0])
    assert new.targets([1])[0].row == 1
    slot.close()
    with pytest.raises(sqlite3.ProgrammingError):
        new.targets([0])


def test_reload_rpc_swaps_in_the_new_current_and_follows_a_rollback(
    root: Root,
    root_server,
    tiny_embedder,  # type: ignore[no-untyped-def]
) -> None:
    client, _ = root_server
    query = {"q": root.records["seq0003"]}
    assert client.search(query, k=1)[0].index_version == root.v1
    assert client.reload_index().reloaded is False  # nothing new yet

    records2 = dict(root.records)
    records2["extra"] = "MKTAYIAKQRQISFVKSHFSRQ"
    v2 = publish(root, records2, "v2", tiny_embedder)
    outcome = client.reload_index()
    assert (outcome.reloaded, outcome.index_version, outcome.previous_version) == (
        True,
        v2,
        root.v1,
    )
    info = client.index_info()
    assert (info.index_version, info.count, info.reload_error) == (v2, 61, "")
    hit = client.search({"q": "MKTAYIAKQRQISFVKSHFSRQ"}, k=1)[0]
    assert hit.index_version == v2 and hit.hits[0].target_id == "extra"

    assert IndexRoot(root.path).rollback() == root.v1
    outcome = client.reload_index()
    assert (outcome.reloaded, outcome.index_version, outcome.previous_version) == (
        True,
        root.v1,
        v2,
    )
    assert client.index_info().count == 60


def test_polling_picks_up_a_new_version(root: Root, tiny_embedder) -> None:  # type: ignore[no-untyped-def]
    server, port = create_server(ServerConfig(index=root.path, port=0, device="cpu", reload_poll_s=0.05))
    try:
        with SearchClient(f"127.0.0.1:{port}", timeout_s=60.0) as client:
            assert client.index_info().index_version == root.v1
            v2 = publish(root, dict(list(root.records.items())[:50]), "v2", tiny_embedder)
            wait_for(lambda: client.index_info().index_version == v2, what="the poller to load v2")
            assert client.index_info().count == 50
            assert client.search({"q": root.records["seq0001"]}, k=1)[0].index_version == v2
    finally:
        server.stop(1.0)


def test_version_built_with_another_model_is_refused_and_old_one_keeps_serving(
    root: Root,
    root_server,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    from esmsearch.checkpoints import write_random_checkpoint

    client, _ = root_server
    other = write_random_checkpoint(
        "esm2_t6_8M_UR50D",
        tmp_path / "other",
        seed=99,
        num_layers=2,
        embed_dim=32,
        attention_heads=4,
        name="esm2_other",
    )
    fasta = write_fasta(tmp_path / "v2.fasta", root.records)
    v2 = build_version(fasta, root.path, model=str(other), device="cpu").manifest.version
    assert IndexRoot(root.path).current_version() == v2

    with pytest.raises(FailedPreconditionError, match="checkpoint_sha256") as excinfo:
        client.reload_index()
    assert v2 in str(excinfo.value)
    info = client.index_info()
    assert info.index_version == root.v1
    assert "checkpoint_sha256" in info.reload_error and v2 in info.reload_error
    result = client.search({"q": root.records["seq0005"]}, k=1)[0]
    assert result.index_version == root.v1 and result.hits[0].target_id == "seq0005"

    # Rolling current back to the served version clears the error.
    IndexRoot(root.path).set_current(root.v1)
    assert client.reload_index().reloaded is False
    assert client.index_info().reload_error == ""


def test_current_pointing_at_a_missing_version_is_refused(root: Root, root_server) -> None:  # type: ignore[no-untyped-def]
    client, _ = root_server
    link = IndexRoot(root.path).current_link
    tmp_link = root.path / ".current.test"
    os.symlink(Path("versions") / "20990101T000000.000Z-pruned", tmp_link)
    os.replace(tmp_link, link)  # as if retention deleted it under us
    with pytest.raises(FailedPreconditionError, match="pruned"):
        client.reload_index()
    assert "pruned" in client.index_info().reload_error
    assert client.search({"q": root.records["seq0002"]}, k=1)[0].index_version == root.v1


def test_reload_on_a_fixed_index_directory_is_failed_precondition(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FailedPreconditionError, match="not a versioned index root"):
        client.reload_index()
    assert client.index_info().reload_error == ""


@dataclass
class _Outcome:
    sent_s: float
    done_s: float
    version: str | None
    error: str | None


def test_no_request_fails_while_two_versions_are_published_and_one_rolled_back(
    root: Root,
    root_server,
    tiny_embedder,  # type: ignore[no-untyped-def]
) -> None:
    client, server = root_server
    ids = list(root.records)
    outcomes: list[_Outcome] = []
    cond = threading.Condition()
    stop = threading.Event()

    def hammer(worker: int) -> None:
        local_rng = np.random.default_rng(100 + worker)
        while not stop.is_set():
            rid = ids[int(local_rng.integers(len(ids)))]
            t0 = time.monotonic()
            try:
                res = client.search({f"w{worker}": root.records[rid]}, k=5, timeout_s=60.0)
                out = _Outcome(t0, time.monotonic(), res[0].index_version, None)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                out = _Outcome(t0, time.monotonic(), None, f"{type(exc).__name__}: {exc}")
            with cond:
                outcomes.append(out)
                cond.notify_all()

    def wait_more(n: int, after_s: float) -> None:
        with cond:
            ok = cond.wait_for(lambda: sum(o.sent_s > after_s for o in outcomes) >= n, timeout=60.0)
        assert ok, f"fewer than {n} responses to requests sent after the swap"

    threads = [threading.Thread(target=hammer, args=(w,), daemon=True) for w in range(4)]
    for t in threads:
        t.start()
    swaps: list[tuple[float, str]] = []  # (time the reload returned, version now served)
    try:
        wait_more(8, 0.0)
        records2 = {rid: root.records[rid] for rid in ids[:55]}
        records2.update(random_records(5, seed=31, prefix="v2_"))
        v2 = publish(root, records2, "v2", tiny_embedder)
        assert client.reload_index().index_version == v2
        swaps.append((time.monotonic(), v2))
        wait_more(8, swaps[-1][0])

        records3 = dict(records2)
        records3.update(random_records(5, seed=32, prefix="v3_"))
        v3 = publish(root, records3, "v3", tiny_embedder)
        assert client.reload_index().index_version == v3
        swaps.append((time.monotonic(), v3))
        wait_more(8, swaps[-1][0])

        assert IndexRoot(root.path).rollback() == v2
        assert client.reload_index().index_version == v2
        swaps.append((time.monotonic(), v2))
        wait_more(8, swaps[-1][0])
    finally:
        stop.set()
        for t in threads:
            t.join(60.0)
    assert not any(t.is_alive() for t in threads)

    failures = [o.error for o in outcomes if o.error is not None]
    assert failures == [], failures[:3]
    published = {root.v1, v2, v3}
    assert {o.version for o in outcomes} <= published
    # A request sent after a reload returned is answered by the version it swapped in.
    bounds = [s for s, _ in swaps] + [float("inf")]
    for (start, version), end in zip(swaps, bounds[1:], strict=True):
        window = [o for o in outcomes if start < o.sent_s and o.done_s < end]
        assert window and all(o.version == version for o in window), (
            version,
            {o.version for o in window},
        )
    assert sum(o.version == root.v1 for o in outcomes) >= 8
    # The swapped-out indexes were released: only the served one is leased now.
    assert server.engine._slot.in_use() == 0


def test_cli_serve_on_a_root_reloads_on_sighup(root: Root, tiny_embedder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "esmsearch.cli",
                "serve",
                str(root.path),
                "--port",
                "0",
                "--device",
                "cpu",
                "--reload-poll-s",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.search(r"version (\S+)\) on (\S+:\d+)$", line.strip())
            assert match, (line, log_path.read_text())
            assert match.group(1) == root.v1
            with SearchClient(match.group(2), timeout_s=60.0) as client:
                v2 = publish(root, dict(list(root.records.items())[:40]), "v2", tiny_embedder)
                assert client.index_info().index_version == root.v1  # no polling: not yet
                proc.send_signal(signal.SIGHUP)
                wait_for(lambda: client.index_info().index_version == v2, what="SIGHUP reload")
                assert client.search({"q": root.records["seq0001"]}, k=1)[0].index_version == v2
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            reap(proc)
    assert "index reloaded: now serving version " + v2 in log_path.read_text()
