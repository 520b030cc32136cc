"""Transport security and authentication of the search server.

* TLS: server certificate and key from PEM files; optionally a client CA, in which
  case every client must present a certificate signed by it (mutual TLS).
* Bearer tokens: clients send ``authorization: Bearer <token>`` metadata (gRPC) or
  an ``Authorization: Bearer <token>`` header (HTTP API). Tokens come from files
  (``--token-file``, ``--admin-token-file``: one per line) or the environment
  (:data:`TOKENS_ENV`, :data:`ADMIN_TOKENS_ENV`), never from the command line, where
  every local user could read them in the process list. The server keeps only their
  SHA-256 digests and compares the digest of a presented token with each of them
  with :func:`hmac.compare_digest`: the comparison takes the same time whatever the
  token's length or content, and no early exit tells which token was close.
* Roles (:class:`TokenCheck`): a *read* token (``--token-file``) calls every search
  and information RPC and every ``/v1`` HTTP endpoint; an *admin* token
  (``--admin-token-file``) calls those and the admin RPCs (:data:`ADMIN_METHODS`:
  ``ReloadIndex``). A read token on an admin RPC gets PERMISSION_DENIED; a missing or
  unknown token UNAUTHENTICATED (HTTP 401). A server that authenticates by client
  certificate only (mutual TLS, no tokens) needs no token for reads, and an admin
  token for admin RPCs. Only a server that authenticates nobody -- loopback, or
  ``--insecure-bind-any`` -- has no checks at all. The standard health service
  (``grpc.health.v1.Health``) and the HTTP ``/healthz`` and ``/readyz`` stay reachable
  without a token so that load balancers and orchestrators can probe the server; they
  say only whether it serves (no index version, no paths).
* Binding (:func:`check_bind_host`): a non-loopback host needs TLS *and* client
  authentication (tokens, or a client CA for mutual TLS): TLS alone would let anyone
  query, and tokens alone would travel in clear. ``insecure_bind_any``
  (``--insecure-bind-any``) is the explicit opt-out, logged as a warning.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
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
    "ADMIN_METHODS",
    "ADMIN_TOKENS_ENV",
    "HEALTH_METHOD_PREFIX",
    "TOKENS_ENV",
    "SecurityConfig",
    "TlsConfig",
    "TokenAuthInterceptor",
    "TokenCheck",
    "auth_interceptors",
    "bearer_token_ok",
    "check_bind_host",
    "is_loopback_host",
    "load_tokens",
    "token_digest",
]

log = logging.getLogger("esmsearch.server")

#: Environment variable holding accepted read tokens (comma- or whitespace-separated).
TOKENS_ENV: Final = "ESMSEARCH_TOKENS"
#: Environment variable holding accepted admin tokens (comma- or whitespace-separated).
ADMIN_TOKENS_ENV: Final = "ESMSEARCH_ADMIN_TOKENS"
#: Calls whose method starts with this need no token (health checks).
HEALTH_METHOD_PREFIX: Final = "/grpc.health.v1.Health/"
#: gRPC methods that need an admin token (read tokens get PERMISSION_DENIED).
ADMIN_METHODS: Final = frozenset({"/esmsearch.v1.HomologSearch/ReloadIndex"})


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

    @property
    def requires_client_certificates(self) -> bool:
        """Whether clients must present a certificate signed by :attr:`client_ca_file` (mutual TLS)."""
        return self.client_ca_file is not None

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
        env_var: variable with comma- or whitespace-separated tokens
            (:data:`TOKENS_ENV` for read tokens, :data:`ADMIN_TOKENS_ENV` for admin ones).

    Returns:
        The union of both sources (empty = none configured).

    Raises:
        ConfigError: the file cannot be read, or a token is shorter than 16
            characters or contains whitespace or non-ASCII characters (the message
            names the token by number, never its text).
    """
    env = os.environ if environ is None else environ
    tokens: list[str] = []
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ConfigError(f"cannot read token file {str(token_file)!r}: {reason}") from exc
        tokens += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    tokens += env.get(env_var, "").replace(",", " ").split()
    for i, token in enumerate(tokens, start=1):
        if len(token) < 16 or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            raise ConfigError(f"token #{i} is unusable: tokens need >= 16 printable ASCII characters, no spaces")
    return frozenset(tokens)


def token_digest(token: str) -> bytes:
    """SHA-256 of a token's UTF-8 bytes (lone surrogates kept): 32 bytes whatever its length."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class SecurityConfig:
    """How the server authenticates clients and where it may bind.

    Attributes:
        tls: TLS material, or ``None`` for plaintext.
        tokens: accepted read bearer tokens (search and information calls); empty =
            no read token asked for.
        admin_tokens: accepted admin bearer tokens (every call, admin RPCs such as
            ``ReloadIndex`` included).
        insecure_bind_any: allow binding a non-loopback host without TLS and client
            authentication (logged as a warning).

    Raises:
        ConfigError: a token is both a read and an admin token (which role would it have?).
    """

    tls: TlsConfig | None = None
    tokens: frozenset[str] = frozenset()
    admin_tokens: frozenset[str] = frozenset()
    insecure_bind_any: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", frozenset(self.tokens))
        object.__setattr__(self, "admin_tokens", frozenset(self.admin_tokens))
        if self.tokens & self.admin_tokens:
            raise ConfigError("a token is listed both as a read and as an admin token; give each token one role")

    @property
    def all_tokens(self) -> frozenset[str]:
        """Every accepted token (read and admin): what a ``/v1`` HTTP request may carry."""
        return self.tokens | self.admin_tokens

    @property
    def read_call_tokens(self) -> frozenset[str]:
        """Tokens a read call (search, information, ``/v1`` HTTP) must carry one of; empty =
        none asked for (no tokens, or admin tokens only behind mutual TLS). The same rule
        as :class:`TokenCheck`."""
        mtls = self.tls is not None and self.tls.requires_client_certificates
        if self.tokens or (self.admin_tokens and not mtls):
            return self.all_tokens
        return frozenset()

    @property
    def authenticates_clients(self) -> bool:
        """Whether callers must prove who they are: tokens, or client certificates (mutual TLS)."""
        return bool(self.all_tokens) or (self.tls is not None and self.tls.requires_client_certificates)

    @property
    def has_credentials(self) -> bool:
        """Whether the server may face a network: TLS *and* client authentication."""
        return self.tls is not None and self.authenticates_clients


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
    """Refuse to expose a server beyond loopback without TLS and client authentication.

    Raises:
        ConfigError: ``host`` is not loopback, TLS or client authentication (tokens,
            or a client CA) is missing, and ``insecure_bind_any`` is not set; the
            message names what is missing and the flags that add it.
    """
    if is_loopback_host(host) or security.has_credentials:
        return
    if security.insecure_bind_any:
        log.warning(
            "--insecure-bind-any: serving %s without %s; anyone who can reach it can %s",
            host,
            "TLS" if security.tls is None else "client authentication",
            "read its traffic and tokens" if security.tls is None else "query it",
        )
        return
    missing, why = [], []
    if security.tls is None:
        missing.append("TLS (--tls-cert/--tls-key)")
        why.append("without TLS, tokens and queries travel in clear")
    if not security.authenticates_clients:
        missing.append(f"client authentication (--token-file or {TOKENS_ENV}; or --tls-client-ca for mutual TLS)")
        why.append("without client authentication, anyone on the network can query it")
    raise ConfigError(
        f"refusing to bind {host!r}: a server reachable from the network needs {' and '.join(missing)} "
        f"({'; '.join(why)}); bind 127.0.0.1, or pass --insecure-bind-any to do it anyway"
    )


class TokenCheck:
    """Who a call's ``authorization`` values make it, and whether that may call a method.

    Holds only the SHA-256 digests of the tokens (:func:`token_digest`); a presented
    token is hashed too and compared with :func:`hmac.compare_digest` against every
    configured digest, with no early exit.

    Args:
        tokens: read tokens.
        admin_tokens: admin tokens.
        clients_authenticated_by_certificate: the transport already authenticated the
            caller (mutual TLS): reads need no token when no read token is configured.
    """

    def __init__(
        self,
        tokens: Iterable[str] = (),
        admin_tokens: Iterable[str] = (),
        *,
        clients_authenticated_by_certificate: bool = False,
    ) -> None:
        self._read = tuple(token_digest(t) for t in tokens)
        self._admin = tuple(token_digest(t) for t in admin_tokens)
        # Read tokens are always asked for; with admin tokens only, reads need one of
        # them unless a client certificate already authenticated the caller.
        self._reads_need_token = bool(self._read) or (bool(self._admin) and not clients_authenticated_by_certificate)

    def role(self, authorization: Sequence[object]) -> str | None:
        """``"admin"``, ``"read"`` or ``None`` (no, several or an unknown token).

        Args:
            authorization: every value the call sent under ``authorization``; exactly one
                of the form ``Bearer <token>`` (scheme case-insensitive) counts.
        """
        if len(authorization) != 1 or not isinstance(authorization[0], str):
            return None
        scheme, _, token = authorization[0].partition(" ")
        if scheme.lower() != "bearer":
            return None
        given = token_digest(token.strip())
        admin = read = False
        for digest in self._admin:  # every digest, no early exit
            admin |= hmac.compare_digest(given, digest)
        for digest in self._read:
            read |= hmac.compare_digest(given, digest)
        return "admin" if admin else "read" if read else None

    def refusal(self, authorization: Sequence[object], *, admin: bool) -> tuple[grpc.StatusCode, str] | None:
        """Why a call may not proceed (status code and message), or ``None`` when it may.

        Args:
            authorization: the call's ``authorization`` values.
            admin: the call is an admin call (:data:`ADMIN_METHODS`).
        """
        role = self.role(authorization)
        if admin:
            if role == "admin":
                return None
            if not self._admin:
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "admin calls are disabled on this server: it was started without admin tokens "
                    f"(--admin-token-file or {ADMIN_TOKENS_ENV})",
                )
            if role == "read":
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "this call needs an admin token; the token sent is a read token",
                )
            return grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED + " (an admin token)"
        if role is not None or not self._reads_need_token:
            return None
        return grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED


_UNAUTHENTICATED: Final = "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')"


def bearer_token_ok(authorization: Sequence[object], tokens: Iterable[str]) -> bool:
    """Whether the ``authorization`` values of one call carry exactly one accepted bearer token.

    The check of the HTTP ``Authorization`` header (:mod:`esmsearch.server.httpapi`);
    gRPC calls go through :class:`TokenCheck` in :class:`TokenAuthInterceptor`, the same
    digest comparison.

    Args:
        authorization: every value the call sent under ``authorization``; exactly one
            of the form ``Bearer <token>`` (scheme case-insensitive) is accepted.
        tokens: the accepted tokens, each compared by digest in constant time.
    """
    return TokenCheck(tokens).role(authorization) is not None


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls that :class:`TokenCheck` does not let through: UNAUTHENTICATED or PERMISSION_DENIED.

    Args:
        tokens: accepted read tokens.
        exempt_prefixes: method prefixes served without a token (default: health).
        observer: logs and counts each refused call like any other RPC (its log line
            and ``esmsearch_errors_total{code=...}``); ``None`` = silent.
        admin_tokens: accepted admin tokens (needed by :data:`ADMIN_METHODS`).
        clients_authenticated_by_certificate: see :class:`TokenCheck`.

    Raises:
        ConfigError: no token at all and no certificate authentication (nothing to check).
    """

    def __init__(
        self,
        tokens: Iterable[str],
        exempt_prefixes: tuple[str, ...] = (HEALTH_METHOD_PREFIX,),
        *,
        observer: RpcObserver | None = None,
        admin_tokens: Iterable[str] = (),
        clients_authenticated_by_certificate: bool = False,
    ) -> None:
        tokens, admin_tokens = tuple(tokens), tuple(admin_tokens)
        if not (tokens or admin_tokens or clients_authenticated_by_certificate):
            raise ConfigError("TokenAuthInterceptor needs at least one token or certificate authentication")
        self._check = TokenCheck(
            tokens, admin_tokens, clients_authenticated_by_certificate=clients_authenticated_by_certificate
        )
        self._exempt = exempt_prefixes
        self._observer = observer

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method.startswith(self._exempt):
            return continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        refusal = self._check.refusal([v for k, v in metadata if k == "authorization"], admin=method in ADMIN_METHODS)
        if refusal is None:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        observer = self._observer
        rpc = method.rsplit("/", 1)[-1]
        code, message = refusal

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            if observer is not None:  # logged and counted; aborts
                observer.refuse(rpc, context, code, message)
            else:
                context.abort(code, message)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def auth_interceptors(security: SecurityConfig, observer: RpcObserver | None = None) -> list[grpc.ServerInterceptor]:
    """The gRPC server's authentication interceptors for ``security`` (none if it authenticates nobody)."""
    if not security.authenticates_clients:
        return []
    return [
        TokenAuthInterceptor(
            security.tokens,
            observer=observer,
            admin_tokens=security.admin_tokens,
            clients_authenticated_by_certificate=security.tls is not None and security.tls.requires_client_certificates,
        )
    ]
