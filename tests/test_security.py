"""TLS, mutual TLS, bearer tokens (read and admin roles) and the bind rule.

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

from esmsearch.client import PermissionDeniedError, SearchClient, UnauthenticatedError, UnavailableError
from esmsearch.client.aio import AsyncSearchClient
from esmsearch.client.channel import ClientCredentials, is_loopback_target, read_token_file
from esmsearch.client.retry import NO_RETRY
from esmsearch.errors import ConfigError
from esmsearch.server import ServerConfig, create_server
from esmsearch.server.security import (
    ADMIN_TOKENS_ENV,
    SecurityConfig,
    TlsConfig,
    bearer_token_ok,
    check_bind_host,
    is_loopback_host,
    load_tokens,
)
from esmsearch.v1 import search_pb2, search_pb2_grpc

TOKEN = "s3cret-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
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


def _tls(pki: Pki, *, mutual: bool = False) -> TlsConfig:
    return TlsConfig(pki.server_cert, pki.server_key, client_ca_file=pki.ca if mutual else None)


@pytest.mark.parametrize(
    ("combination", "missing"),
    [
        ("nothing", ["TLS", "client authentication"]),
        ("tokens without TLS", ["TLS"]),
        ("TLS without client authentication", ["client authentication"]),
    ],
)
def test_an_unsafe_combination_off_loopback_is_refused(
    small_index: Path, pki: Pki, combination: str, missing: list[str]
) -> None:
    security = {
        "nothing": SecurityConfig(),
        "tokens without TLS": SecurityConfig(tokens=frozenset({TOKEN})),
        "TLS without client authentication": SecurityConfig(tls=_tls(pki)),
    }[combination]
    for host in ("0.0.0.0", "::", "10.1.2.3", "search.example.org"):
        with pytest.raises(ConfigError, match="--insecure-bind-any") as info:
            check_bind_host(host, security)
        for what in missing:
            assert f"needs {what}" in str(info.value) or f"and {what}" in str(info.value)
        if "TLS" not in missing:
            assert "--tls-cert" not in str(info.value)
    with pytest.raises(ConfigError, match="refusing to bind '0.0.0.0'"):
        create_server(ServerConfig(index=small_index, host="0.0.0.0", port=0, device="cpu", security=security))
    check_bind_host("127.0.0.1", security)  # loopback: always allowed


def test_safe_combinations_off_loopback_are_accepted(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    for security in (
        SecurityConfig(tls=_tls(pki), tokens=frozenset({TOKEN})),
        SecurityConfig(tls=_tls(pki), admin_tokens=frozenset({ADMIN_TOKEN})),
        SecurityConfig(tls=_tls(pki, mutual=True)),
    ):
        check_bind_host("0.0.0.0", security)
    with caplog.at_level(logging.WARNING, logger="esmsearch.server"):
        check_bind_host("0.0.0.0", SecurityConfig(insecure_bind_any=True))
    assert "--insecure-bind-any" in caplog.text  # the opt-out is logged


def _serve_any(small_index: Path, security: SecurityConfig) -> tuple[object, int]:
    return create_server(
        ServerConfig(index=small_index, host="0.0.0.0", port=0, device="cpu", security=security, max_workers=2)
    )


@pytest.mark.parametrize("kind", ["TLS + tokens", "mutual TLS", "--insecure-bind-any"])
def test_server_on_every_interface_starts_when_secure_or_explicitly_insecure(
    small_index: Path, pki: Pki, kind: str
) -> None:
    security, creds = {
        "TLS + tokens": (
            SecurityConfig(tls=_tls(pki), tokens=frozenset({TOKEN})),
            ClientCredentials(root_cert_file=pki.ca, token=TOKEN),
        ),
        "mutual TLS": (SecurityConfig(tls=_tls(pki, mutual=True)), _creds(pki, token=None)),
        "--insecure-bind-any": (SecurityConfig(insecure_bind_any=True), ClientCredentials()),
    }[kind]
    srv, port = _serve_any(small_index, security)
    try:
        with SearchClient(f"localhost:{port}", credentials=creds, timeout_s=30) as c:
            assert c.index_info().count == 40
    finally:
        srv.stop(0)  # type: ignore[attr-defined]


# -- the client never sends a token in clear off this host ----------------------------------


@pytest.mark.parametrize(
    ("target", "loopback"),
    [("127.0.0.1:50051", True), ("localhost:50051", True), ("[::1]:50051", True), ("dns:///localhost:1", True),
     ("ipv4:127.0.0.1:1,127.0.0.2:2", True), ("unix:/tmp/esmsearch.sock", True),
     ("10.1.2.3:50051", False), ("search.example.org:50051", False), ("dns:///search.example.org:50051", False),
     ("ipv4:127.0.0.1:1,10.0.0.1:2", False), ("ipv6:[::1]:1,[2001:db8::1]:2", False), ("0.0.0.0:50051", False)],
)  # fmt: skip
def test_loopback_targets(target: str, loopback: bool) -> None:
    assert is_loopback_target(target) is loopback


@pytest.mark.parametrize("target", ["10.1.2.3:50051", "search.example.org:50051", "dns:///search.example.org:50051"])
def test_client_refuses_a_token_over_plaintext_off_loopback(target: str) -> None:
    creds = ClientCredentials(token=TOKEN)
    with pytest.raises(ConfigError, match="in clear") as info:
        creds.channel(target)
    assert "TLS" in str(info.value) and TOKEN not in str(info.value)
    with pytest.raises(ConfigError, match="in clear"):
        creds.aio_channel(target)
    with pytest.raises(ConfigError, match="in clear"):
        SearchClient(target, credentials=creds)
    # TLS, or no token: fine (channels connect lazily, nothing is sent here)
    ClientCredentials(tls=True, token=TOKEN).channel(target).close()
    ClientCredentials().channel(target).close()


def test_read_token_file(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("# my token\n\n  " + TOKEN + "  \nsecond-line-ignored\n")
    assert read_token_file(f) == TOKEN
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no token"):
        read_token_file(empty)
    with pytest.raises(ConfigError, match="cannot read token file"):
        read_token_file(tmp_path / "missing")


# -- digests ----------------------------------------------------------------------------------


def test_tokens_are_compared_as_fixed_length_digests_against_every_token(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    import esmsearch.server.security as security

    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    tokens = {TOKEN, "x" * 64, "another-token-0123456789"}
    for presented, ok in [(TOKEN, True), ("short", False), ("y" * 200, False), (TOKEN[:-1], False)]:
        calls.clear()
        assert bearer_token_ok([f"Bearer {presented}"], tokens) is ok
        # every configured token is compared (no early exit), always 32 bytes against 32
        assert calls == [(32, 32)] * len(tokens), presented


# -- admin calls ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin_server(small_index: Path) -> Iterator[int]:
    """Plaintext loopback with a read token and an admin token."""
    security = SecurityConfig(tokens=frozenset({TOKEN}), admin_tokens=frozenset({ADMIN_TOKEN}))
    srv, port = create_server(ServerConfig(index=small_index, port=0, device="cpu", security=security, max_workers=4))
    try:
        yield port
    finally:
        srv.stop(0)


def _reload(port: int, token: str | None) -> grpc.RpcError:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            search_pb2_grpc.HomologSearchStub(ch).ReloadIndex(
                search_pb2.ReloadIndexRequest(), timeout=10, metadata=metadata
            )
    return info.value


def test_reload_needs_an_admin_token(admin_server: int) -> None:
    denied = _reload(admin_server, TOKEN)
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "admin token" in denied.details()
    assert _reload(admin_server, None).code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reload(admin_server, "wrong-token-0123456789").code() == grpc.StatusCode.UNAUTHENTICATED
    # the admin token passes the check; this fixed-index server then says why it cannot reload
    passed = _reload(admin_server, ADMIN_TOKEN)
    assert passed.code() == grpc.StatusCode.FAILED_PRECONDITION and "versioned index root" in passed.details()
    # an admin token also reads; the client maps the refusal to PermissionDeniedError
    address = f"127.0.0.1:{admin_server}"
    with SearchClient(address, credentials=ClientCredentials(token=ADMIN_TOKEN), timeout_s=30) as c:
        assert c.search([SEQ], k=1)[0].hits
    with SearchClient(address, credentials=ClientCredentials(token=TOKEN), retry=NO_RETRY, timeout_s=30) as c:
        with pytest.raises(PermissionDeniedError):
            c.reload_index()


def test_reload_is_refused_without_admin_tokens_configured(token_server: int, small_index: Path, pki: Pki) -> None:
    denied = _reload(token_server, TOKEN)
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--admin-token-file" in denied.details()
    # mutual TLS without tokens: reads need only the certificate, admin calls are refused
    srv, port = create_server(
        ServerConfig(
            index=small_index, port=0, device="cpu", security=SecurityConfig(tls=_tls(pki, mutual=True)), max_workers=2
        )
    )
    try:
        with SearchClient(f"localhost:{port}", credentials=_creds(pki, token=None), retry=NO_RETRY, timeout_s=30) as c:
            assert c.search([SEQ], k=1)[0].hits
            with pytest.raises(PermissionDeniedError, match="--admin-token-file"):
                c.reload_index()
    finally:
        srv.stop(0)


def test_admin_tokens_from_file_and_environment_and_one_role_per_token(tmp_path: Path) -> None:
    f = tmp_path / "admin"
    f.write_text(ADMIN_TOKEN + "\n")
    env = {ADMIN_TOKENS_ENV: "env-admin-token-0123456789", "ESMSEARCH_TOKENS": "read-token-0123456789"}
    assert load_tokens(f, environ=env, env_var=ADMIN_TOKENS_ENV) == {ADMIN_TOKEN, "env-admin-token-0123456789"}
    with pytest.raises(ConfigError, match="one role"):
        SecurityConfig(tokens=frozenset({TOKEN}), admin_tokens=frozenset({TOKEN}))


# -- CLI flags --------------------------------------------------------------------------------


def test_cli_serve_refuses_an_open_bind_and_half_tls(small_index: Path, pki: Pki, capsys) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.cli import main

    assert main(["serve", str(small_index), "--host", "0.0.0.0", "--port", "0", "--device", "cpu"]) == 1
    assert "--insecure-bind-any" in capsys.readouterr().err
    assert main(["serve", str(small_index), "--tls-cert", str(pki.server_cert), "--port", "0"]) == 1
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


def test_cli_search_sends_the_token_from_file_or_environment(
    token_server: int, tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.cli import main

    fasta = tmp_path / "q.fasta"
    fasta.write_text(f">q1\n{SEQ}\n")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    address = f"127.0.0.1:{token_server}"
    monkeypatch.delenv("ESMSEARCH_TOKEN", raising=False)
    assert main(["search", str(fasta), "--server", address, "-k", "2", "--token-file", str(token_file)]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("q1\t")]
    assert len(rows) == 2
    assert main(["search", str(fasta), "--server", address, "-k", "2"]) == 1
    assert "bearer token" in capsys.readouterr().err
    monkeypatch.setenv("ESMSEARCH_TOKEN", TOKEN)
    assert main(["search", str(fasta), "--server", address, "-k", "1"]) == 0
    assert sum(ln.startswith("q1\t") for ln in capsys.readouterr().out.splitlines()) == 1
    # ... but never in clear to another host: refused before anything is sent
    assert main(["search", str(fasta), "--server", "192.0.2.1:50051", "-k", "1"]) == 1
    err = capsys.readouterr().err
    assert "in clear" in err and "--tls" in err and TOKEN not in err


@pytest.mark.parametrize(
    ("argv", "alternative"),
    [
        (["search", "q.fasta", "--token", TOKEN], "--token-file"),
        (["search", "q.fasta", f"--token={TOKEN}"], "ESMSEARCH_TOKEN"),
        (["serve", "index", "--token", TOKEN], "--token-file"),
        (["serve", "index", "--admin-token", TOKEN], "--admin-token-file"),
    ],
)
def test_cli_refuses_tokens_on_the_command_line(argv: list[str], alternative: str, capsys) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "process list" in err and alternative in err and TOKEN not in err


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
