"""Transport security and authentication of the search server.

* TLS: server certificate and key from PEM files; optionally a client CA, in which
  case every client must present a certificate signed by it (mutual TLS).
* Bearer tokens: clients send ``authorization: Bearer <token>`` metadata (gRPC) or
  an ``Authorization: Bearer <token>`` header (HTTP API). :func:`bearer_token_ok`,
  behind the :class:`TokenAuthInterceptor` and the HTTP API alike, accepts a call
  only if the token equals one of the configured tokens, compared with
  :func:`hmac.compare_digest` (constant time in the token length) against every
  configured token. Anything else gets UNAUTHENTICATED (HTTP 401). The standard
  health service (``grpc.health.v1.Health``) and the HTTP ``/healthz`` and
  ``/readyz`` stay reachable without a token so that load balancers and
  orchestrators can probe the server; they reveal only whether it serves.
  Reflection, every search RPC and every ``/v1`` HTTP endpoint need the token.
* Binding: without TLS and without tokens the server only binds loopback
  interfaces; a non-loopback host is refused unless ``insecure_bind_any`` is set.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc

from esmsearch.errors import ConfigError

if TYPE_CHECKING:
    from esmsearch.server.rpc import RpcObserver

__all__ = [
    "HEALTH_METHOD_PREFIX",
    "TOKENS_ENV",
    "SecurityConfig",
    "TlsConfig",
    "TokenAuthInterceptor",
    "bearer_token_ok",
    "check_bind_host",
    "is_loopback_host",
    "load_tokens",
]

#: Environment variable holding accepted tokens (comma- or whitespace-separated).
TOKENS_ENV: Final = "ESMSEARCH_TOKENS"
#: Calls whose method starts with this need no token (health checks).
HEALTH_METHOD_PREFIX: Final = "/grpc.health.v1.Health/"


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} {str(path)!r} is not a PEM file")
    return data


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS material, read from PEM files when built.

    Attributes:
        cert_file: server certificate chain (PEM).
        key_file: its private key (PEM).
        client_ca_file: CA certificate(s) (PEM) that client certificates must chain
            to; ``None`` = no client certificates asked for.

    Raises:
        ConfigError: a file is missing, unreadable or not PEM.
    """

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    _pem: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cert_file", Path(self.cert_file))
        object.__setattr__(self, "key_file", Path(self.key_file))
        self._pem["cert"] = _read_pem(self.cert_file, "TLS certificate")
        self._pem["key"] = _read_pem(self.key_file, "TLS key")
        if self.client_ca_file is not None:
            object.__setattr__(self, "client_ca_file", Path(self.client_ca_file))
            self._pem["ca"] = _read_pem(Path(self.client_ca_file), "TLS client CA")

    def server_credentials(self) -> grpc.ServerCredentials:
        """``grpc.ssl_server_credentials``; client certificates required iff a client CA is set."""
        ca = self._pem.get("ca")
        return grpc.ssl_server_credentials(
            [(self._pem["key"], self._pem["cert"])],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


def load_tokens(
    token_file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_var: str = TOKENS_ENV,
) -> frozenset[str]:
    """Accepted bearer tokens from a file and/or an environment variable.

    Args:
        token_file: text file with one token per line; blank lines and lines
            starting with ``#`` are skipped.
        environ: environment to read (default ``os.environ``).
        env_var: variable with comma- or whitespace-separated tokens.

    Returns:
        The union of both sources (empty = no token auth).

    Raises:
        ConfigError: the file cannot be read, or a token is shorter than 16
            characters or contains whitespace or non-ASCII characters.
    """
    env = os.environ if environ is None else environ
    tokens: list[str] = []
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read token file {str(token_file)!r}: {exc}") from exc
        tokens += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    tokens += env.get(env_var, "").replace(",", " ").split()
    for i, token in enumerate(tokens, start=1):
        if len(token) < 16 or not token.isascii() or any(c.isspace() for c in token):
            raise ConfigError(f"token #{i} is unusable: tokens need >= 16 printable ASCII characters, no spaces")
    return frozenset(tokens)


@dataclass(frozen=True)
class SecurityConfig:
    """How the server authenticates clients and where it may bind.

    Attributes:
        tls: TLS material, or ``None`` for plaintext.
        tokens: accepted bearer tokens; empty = no token check.
        insecure_bind_any: allow binding a non-loopback host with neither TLS nor tokens.
    """

    tls: TlsConfig | None = None
    tokens: frozenset[str] = frozenset()
    insecure_bind_any: bool = False

    @property
    def has_credentials(self) -> bool:
        return self.tls is not None or bool(self.tokens)


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind_host(host: str, security: SecurityConfig) -> None:
    """Refuse to expose an unauthenticated plaintext server beyond loopback.

    Raises:
        ConfigError: ``host`` is not loopback, there is neither TLS nor a token, and
            ``insecure_bind_any`` is not set.
    """
    if is_loopback_host(host) or security.has_credentials or security.insecure_bind_any:
        return
    raise ConfigError(
        f"refusing to bind {host!r} without TLS or tokens: anyone on the network could "
        "query the server; configure TLS (--tls-cert/--tls-key) or tokens (--token-file / "
        f"{TOKENS_ENV}), or pass --insecure-bind-any to do it anyway"
    )


def _token_ok(presented: str, tokens: Iterable[str]) -> bool:
    given = presented.encode("utf-8", "surrogatepass")
    ok = False
    for token in tokens:  # compare against every token: no early exit
        ok |= hmac.compare_digest(given, token.encode("utf-8"))
    return ok


def bearer_token_ok(authorization: Sequence[object], tokens: Iterable[str]) -> bool:
    """Whether the ``authorization`` values of one call carry exactly one accepted bearer token.

    The one check behind both interfaces: gRPC metadata (:class:`TokenAuthInterceptor`)
    and the HTTP ``Authorization`` header (:mod:`esmsearch.server.httpapi`).

    Args:
        authorization: every value the call sent under ``authorization``; exactly one
            of the form ``Bearer <token>`` (scheme case-insensitive) is accepted.
        tokens: the accepted tokens, each compared in constant time.
    """
    if len(authorization) != 1 or not isinstance(authorization[0], str):
        return False
    scheme, _, token = authorization[0].partition(" ")
    return scheme.lower() == "bearer" and _token_ok(token.strip(), tokens)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a valid ``authorization: Bearer <token>`` with UNAUTHENTICATED.

    Args:
        tokens: accepted tokens (non-empty).
        exempt_prefixes: method prefixes served without a token (default: health).
        observer: logs and counts each refused call like any other RPC (its log line
            and ``esmsearch_errors_total{code="UNAUTHENTICATED"}``); ``None`` = silent.
    """

    def __init__(
        self,
        tokens: Iterable[str],
        exempt_prefixes: tuple[str, ...] = (HEALTH_METHOD_PREFIX,),
        *,
        observer: RpcObserver | None = None,
    ) -> None:
        self._tokens = tuple(tokens)
        if not self._tokens:
            raise ConfigError("TokenAuthInterceptor needs at least one token")
        self._exempt = exempt_prefixes
        self._observer = observer

    def _authorised(self, metadata: Iterable[Any] | None) -> bool:
        return bearer_token_ok([v for k, v in (metadata or ()) if k == "authorization"], self._tokens)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method.startswith(self._exempt) or self._authorised(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        observer = self._observer
        rpc = method.rsplit("/", 1)[-1]

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            code = grpc.StatusCode.UNAUTHENTICATED
            if observer is not None:
                rec = observer.start(rpc, context)
                rec.code = code
                observer.finish(rec)
            context.abort(code, "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')")

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
