"""TLS, mutual TLS, bearer tokens and the loopback-only bind rule.

Certificates are generated at test time (the ``pki`` fixture of conftest.py: a
throw-away CA, a server certificate for localhost/127.0.0.1 and a client certificate,
made by tests/pki.py with ``cryptography``); no key is committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import Pki

from esmsearch.client import SearchClient, UnauthenticatedError, UnavailableError
from esmsearch.client.aio import AsyncSearchClient
from esmsearch.client.channel import ClientCredentials
from esmsearch.client.retry import NO_RETRY
from esmsearch.errors import ConfigError
from esmsearch.server import ServerConfig, create_server
from esmsearch.server.security import (
    SecurityConfig,
    TlsConfig,
    check_bind_host,
    is_loopback_host,
    load_tokens,
)
from esmsearch.v1 import search_pb2, search_pb2_grpc

TOKEN = "s3cret-token-0123456789"
SEQ = "MKTAYIAKQRQISFVKSHFSRQ"


def _request() -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(queries=[search_pb2.Query(query_id="q", sequence=SEQ)], k=2)


@pytest.fixture(scope="module")
def mtls_token_server(small_index: Path, pki: Pki) -> Iterator[int]:
    """TLS with required client certificates AND a token."""
    security = SecurityConfig(
        tls=TlsConfig(pki.server_cert, pki.server_key, client_ca_file=pki.ca),
        tokens=frozenset({TOKEN}),
    )
    srv, port = create_server(ServerConfig(index=small_index, port=0, device="cpu", security=security, max_workers=4))
    try:
        yield port
    finally:
        srv.stop(0)


@pytest.fixture(scope="module")
def token_server(small_index: Path) -> Iterator[int]:
    """Plaintext loopback with a token."""
    srv, port = create_server(
        ServerConfig(
            index=small_index, port=0, device="cpu", security=SecurityConfig(tokens=frozenset({TOKEN})), max_workers=4
        )
    )
    try:
        yield port
    finally:
        srv.stop(0)


def _creds(pki: Pki, *, client: bool = True, token: str | None = TOKEN, rogue: bool = False) -> ClientCredentials:
    cert, key = (pki.rogue_cert, pki.rogue_key) if rogue else (pki.client_cert, pki.client_key)
    return ClientCredentials(
        root_cert_file=pki.ca,
        client_cert_file=cert if client else None,
        client_key_file=key if client else None,
        token=token,
    )


# -- TLS ----------------------------------------------------------------------------------


def test_mtls_with_token_is_accepted(mtls_token_server: int, pki: Pki) -> None:
    with SearchClient(f"localhost:{mtls_token_server}", credentials=_creds(pki), timeout_s=30) as c:
        results = c.search({"q": SEQ}, k=2)
        assert len(results[0].hits) == 2
        assert c.index_info().count == 40


@pytest.mark.parametrize(
    "kind",
    [
        "no client certificate",
        "client certificate from another CA",
        "plaintext",
        "untrusted server",
    ],
)
def test_tls_handshake_failures_are_unavailable(mtls_token_server: int, pki: Pki, kind: str) -> None:
    address = f"localhost:{mtls_token_server}"
    if kind == "plaintext":
        creds = ClientCredentials(token=TOKEN)
    elif kind == "untrusted server":
        creds = ClientCredentials(root_cert_file=pki.other_ca, token=TOKEN)
    else:
        creds = _creds(pki, client=kind != "no client certificate", rogue=kind != "no client certificate")
    with SearchClient(address, credentials=creds, retry=NO_RETRY, timeout_s=10) as c:
        with pytest.raises(UnavailableError):
            c.index_info()


def test_tls_config_rejects_missing_or_non_pem_files(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="cannot read TLS certificate"):
        TlsConfig(tmp_path / "missing.pem", pki.server_key)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM file"):
        TlsConfig(pki.server_cert, junk)


# -- tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", "Bearer wrong-token-0123456789"),),
        (("authorization", TOKEN),),  # no scheme
        (("authorization", f"Basic {TOKEN}"),),
        (("authorization", f"Bearer {TOKEN}x"),),
        (("authorization", f"Bearer {TOKEN[:-1]}"),),
    ],
)
def test_missing_or_wrong_token_is_unauthenticated(token_server: int, metadata) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(f"127.0.0.1:{token_server}") as ch:
        stub = search_pb2_grpc.HomologSearchStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(_request(), timeout=10, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # streaming RPCs are guarded too
            list(stub.SearchStream(iter([_request()]), timeout=10, metadata=metadata))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_valid_token_is_accepted_and_health_needs_none(token_server: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{token_server}") as ch:
        stub = search_pb2_grpc.HomologSearchStub(ch)
        response = stub.Search(_request(), timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert len(response.results[0].hits) == 2
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_clients_send_the_token(token_server: int) -> None:
    address = f"127.0.0.1:{token_server}"
    with SearchClient(address, credentials=ClientCredentials(token=TOKEN), timeout_s=30) as c:
        assert c.search([SEQ], k=1)[0].hits
    with SearchClient(address, retry=NO_RETRY, timeout_s=30) as c:
        with pytest.raises(UnauthenticatedError) as info:
            c.index_info()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED

    async def go() -> int:
        async with AsyncSearchClient(address, credentials=ClientCredentials(token=TOKEN)) as ac:
            return (await ac.index_info()).count

    assert asyncio.run(go()) == 40


def test_load_tokens_from_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# comment\n\nfile-token-0123456789\n  padded-token-0123456789  \n")
    env = {"ESMSEARCH_TOKENS": "env-token-0123456789a, env-token-0123456789b"}
    assert load_tokens(f, environ=env) == {
        "file-token-0123456789",
        "padded-token-0123456789",
        "env-token-0123456789a",
        "env-token-0123456789b",
    }
    assert load_tokens(None, environ={}) == frozenset()
    with pytest.raises(ConfigError, match="token #1"):
        load_tokens(None, environ={"ESMSEARCH_TOKENS": "short"})
    with pytest.raises(ConfigError, match="cannot read token file"):
        load_tokens(tmp_path / "missing", environ={})


# -- binding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.org", False)],
)  # fmt: skip
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_non_loopback_bind_without_credentials_is_refused(small_index: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="--insecure-bind-any"):
        create_server(ServerConfig(index=small_index, host="0.0.0.0", port=0, device="cpu"))
    check_bind_host("0.0.0.0", SecurityConfig(insecure_bind_any=True))
    check_bind_host("0.0.0.0", SecurityConfig(tokens=frozenset({TOKEN})))
    check_bind_host("0.0.0.0", SecurityConfig(tls=TlsConfig(pki.server_cert, pki.server_key)))
    with pytest.raises(ConfigError):
        check_bind_host("10.1.2.3", SecurityConfig())


# -- CLI flags --------------------------------------------------------------------------------


def test_cli_serve_refuses_an_open_bind_and_half_tls(small_index: Path, pki: Pki, capsys) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.cli import main

    assert main(["serve", str(small_index), "--host", "0.0.0.0", "--port", "0", "--device", "cpu"]) == 1
    assert "--insecure-bind-any" in capsys.readouterr().err
    assert main(["serve", str(small_index), "--tls-cert", str(pki.server_cert), "--port", "0"]) == 1
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


def test_cli_search_sends_the_token_from_flag_or_environment(
    token_server: int, tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.cli import main

    fasta = tmp_path / "q.fasta"
    fasta.write_text(f">q1\n{SEQ}\n")
    address = f"127.0.0.1:{token_server}"
    monkeypatch.delenv("ESMSEARCH_TOKEN", raising=False)
    assert main(["search", str(fasta), "--server", address, "-k", "2", "--token", TOKEN]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("q1\t")]
    assert len(rows) == 2
    assert main(["search", str(fasta), "--server", address, "-k", "2"]) == 1
    assert "bearer token" in capsys.readouterr().err
    monkeypatch.setenv("ESMSEARCH_TOKEN", TOKEN)
    assert main(["search", str(fasta), "--server", address, "-k", "1"]) == 0
    assert sum(ln.startswith("q1\t") for ln in capsys.readouterr().out.splitlines()) == 1


def test_refused_calls_are_logged_and_counted_like_any_rpc(small_index: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    srv, port = create_server(
        ServerConfig(index=small_index, port=0, device="cpu", security=SecurityConfig(tokens=frozenset({TOKEN})))
    )
    try:
        with caplog.at_level(logging.INFO, logger="esmsearch.server"):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = search_pb2_grpc.HomologSearchStub(ch)
                for call in (
                    lambda: stub.Search(_request(), timeout=10),
                    lambda: stub.GetIndexInfo(search_pb2.GetIndexInfoRequest(), timeout=10),
                ):
                    with pytest.raises(grpc.RpcError) as info:
                        call()
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        sample = srv.metrics.registry.get_sample_value
        assert sample("esmsearch_errors_total", {"rpc": "Search", "code": "UNAUTHENTICATED"}) == 1
        assert sample("esmsearch_errors_total", {"rpc": "GetIndexInfo", "code": "UNAUTHENTICATED"}) == 1
        assert "rpc=Search code=UNAUTHENTICATED" in caplog.text
    finally:
        srv.stop(0)
