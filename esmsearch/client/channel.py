"""Client credentials (TLS, mutual TLS, bearer token) and channel construction.

Shared by :class:`esmsearch.client.SearchClient` and
:class:`esmsearch.client.aio.AsyncSearchClient`. The bearer token travels as
``authorization: Bearer <token>`` call metadata on every RPC. Over a plaintext
channel it is sent only to loopback targets (``localhost``, 127.0.0.0/8, ``::1``, unix
sockets), where gRPC would refuse call credentials; a token with a plaintext channel to
any other address is refused (:class:`~esmsearch.errors.ConfigError`) before anything is
sent, since anyone on the path could read it: use TLS. Tokens are read from a file
(:func:`read_token_file`) or the :data:`TOKEN_ENV` environment variable, never from
the command line, where every local user could see them in the process list.

Replicas: a target may name several servers -- ``dns:///search.example.org:50051``
(every address the name resolves to), ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` or
``ipv6:[::1]:50051,[::1]:50052`` (gRPC's name syntax,
https://github.com/grpc/grpc/blob/master/doc/naming.md). Channels use gRPC's
``round_robin`` load-balancing policy with **client-side health checking**
(service config ``healthCheckConfig``, https://github.com/grpc/proposal/blob/master/A17-client-side-health-checking.md):
each connection watches the server's standard ``grpc.health.v1`` service for
``esmsearch.v1.HomologSearch``, and a replica that reports NOT_SERVING (a server
draining on SIGTERM, or still loading) gets no new requests until it reports
SERVING again. A plain ``host:port`` target is round-robined over the addresses
the host name resolves to.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from esmsearch.client.retry import RETRY_BUFFER_BYTES, RetryPolicy
from esmsearch.errors import ConfigError
from esmsearch.protocol import SERVICE_NAME

__all__ = [
    "HEALTH_SERVICE_NAME",
    "LB_POLICIES",
    "RETRIED_METHODS",
    "TOKEN_ENV",
    "ClientCredentials",
    "channel_options",
    "is_loopback_target",
    "read_token_file",
    "service_config",
]

#: Environment variable the CLI reads the client token from.
TOKEN_ENV: Final = "ESMSEARCH_TOKEN"


#: Health-check service name the servers report (:data:`esmsearch.protocol.SERVICE_NAME`).
HEALTH_SERVICE_NAME: Final = SERVICE_NAME
#: The read-only, hence idempotent, methods that the service config's retry policy covers
#: (never the streams nor the admin ReloadIndex).
RETRIED_METHODS: Final = ("Search", "SearchByEmbedding", "Embed", "GetIndexInfo")
#: gRPC load-balancing policies a client may ask for: ``round_robin`` (default: spread
#: calls over every healthy address) or ``pick_first`` (one address at a time).
LB_POLICIES: Final = ("round_robin", "pick_first")


def service_config(lb_policy: str = "round_robin", retry: RetryPolicy | None = None) -> str:
    """The gRPC service config (JSON) of client channels.

    ``round_robin`` comes with client-side health checking of
    :data:`HEALTH_SERVICE_NAME`; ``pick_first`` without (gRPC checks health only for
    policies that spread load). With ``retry`` (and more than one attempt), the
    :data:`RETRIED_METHODS` get its ``retryPolicy`` (:meth:`RetryPolicy.grpc_retry_policy`;
    :mod:`esmsearch.client.retry` says what gRPC retries and what is left to the client).

    Raises:
        ValueError: ``lb_policy`` is not one of :data:`LB_POLICIES`.
    """
    if lb_policy not in LB_POLICIES:
        raise ValueError(f"lb_policy must be one of {', '.join(LB_POLICIES)}, got {lb_policy!r}")
    config: dict[str, object] = {"loadBalancingConfig": [{lb_policy: {}}]}
    if lb_policy == "round_robin":
        config["healthCheckConfig"] = {"serviceName": HEALTH_SERVICE_NAME}
    policy = retry.grpc_retry_policy() if retry is not None else None
    if policy is not None:
        names = [{"service": SERVICE_NAME, "method": method} for method in RETRIED_METHODS]
        config["methodConfig"] = [{"name": names, "retryPolicy": policy}]
    return json.dumps(config)


def channel_options(lb_policy: str = "round_robin", retry: RetryPolicy | None = None) -> list[tuple[str, int | str]]:
    """Channel options of both clients: no cap on response size (hits grow with k x
    queries), the service config (:func:`service_config`: load balancing, and gRPC's
    retry policy from ``retry``), retries on, and a retry buffer that holds the largest
    request (:data:`esmsearch.client.retry.RETRY_BUFFER_BYTES`)."""
    return [
        ("grpc.max_receive_message_length", -1),
        ("grpc.service_config", service_config(lb_policy, retry)),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
    ]


def _read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from exc


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The bearer token in ``path``: its first line that is neither blank nor a ``#`` comment, stripped.

    Raises:
        ConfigError: the file cannot be read or holds no token (the message never
            shows the file's content).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"cannot read token file {str(path)!r}: {reason}") from exc
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise ConfigError(f"token file {str(path)!r} holds no token (one token on its first non-comment line)")


def _host_is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _split_host(hostport: str) -> str:
    """The host of ``host[:port]``, ``[v6][:port]`` or a bare IPv6 address."""
    if hostport.startswith("["):
        return hostport[1 : hostport.find("]")] if "]" in hostport else hostport
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


def is_loopback_target(address: str) -> bool:
    """Whether every server a gRPC target names is on this host.

    Understands gRPC's target syntax (https://github.com/grpc/grpc/blob/master/doc/naming.md):
    ``host:port``, ``[v6]:port``, ``dns:[//authority/]host[:port]``,
    ``ipv4:a:port,b:port``, ``ipv6:[a]:port,...`` and ``unix:``/``unix-abstract:``
    sockets (always local). Host names other than ``localhost`` count as remote: they
    are not resolved here.
    """
    target = address.strip()
    scheme, sep, rest = target.partition(":")
    scheme = scheme.lower() if sep else ""
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme == "dns":
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]
        hosts = [_split_host(rest)]
    elif scheme in ("ipv4", "ipv6"):
        hosts = [_split_host(part) for part in rest.split(",")]
    else:
        hosts = [_split_host(target)]
    return all(h and _host_is_loopback(h) for h in hosts)


@dataclass(frozen=True)
class ClientCredentials:
    """How a client proves who it is and checks the server.

    Attributes:
        tls: use TLS (implied by any of the files below).
        root_cert_file: PEM CA certificate(s) to verify the server with; ``None`` =
            the system's default roots.
        client_cert_file, client_key_file: PEM certificate chain and key for mutual
            TLS (both or neither).
        token: bearer token sent as ``authorization: Bearer <token>`` metadata (over
            TLS, or plaintext to loopback only: see :meth:`check_target`); read it with
            :func:`read_token_file` or from :data:`TOKEN_ENV`.
        server_name_override: host name to verify in the server certificate instead
            of the address's host (e.g. a test certificate for ``localhost`` reached
            as ``127.0.0.1``).
        lb_policy: gRPC load balancing over the addresses of the target (see the
            module docstring): ``round_robin`` with health checks (default) or
            ``pick_first``.

    Raises:
        ValueError: only one of client cert/key is given, the token has whitespace, or
            an unknown ``lb_policy``.
    """

    tls: bool = False
    root_cert_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    token: str | None = None
    server_name_override: str | None = None
    lb_policy: str = "round_robin"

    def __post_init__(self) -> None:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together (mutual TLS)")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("token must be non-empty without whitespace")
        if self.root_cert_file is not None or self.client_cert_file is not None:
            object.__setattr__(self, "tls", True)
        service_config(self.lb_policy)  # validates it

    def metadata(self) -> tuple[tuple[str, str | bytes], ...] | None:
        """Call metadata carrying the token, or ``None`` without one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def _ssl(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_cert_file, "TLS root certificate"),
            private_key=_read(self.client_key_file, "TLS client key"),
            certificate_chain=_read(self.client_cert_file, "TLS client certificate"),
        )

    def _options(self, retry: RetryPolicy | None) -> list[tuple[str, int | str]]:
        opts: list[tuple[str, int | str]] = channel_options(self.lb_policy, retry)
        if self.server_name_override:
            opts.append(("grpc.ssl_target_name_override", self.server_name_override))
        return opts

    def check_target(self, address: str) -> None:
        """Refuse to send the token in clear: a token, no TLS and a target off this host.

        Raises:
            ConfigError: naming the alternatives (TLS, or a loopback address).
        """
        if self.token and not self.tls and not is_loopback_target(address):
            raise ConfigError(
                f"refusing to send a bearer token in clear to {address!r}: anyone on the path could read it; "
                "use TLS (--tls, or --tls-ca CA.pem; ClientCredentials(tls=True)), or reach the server "
                "through a loopback address (an SSH tunnel, a sidecar proxy)"
            )

    def channel(self, address: str, retry: RetryPolicy | None = None) -> grpc.Channel:
        """A blocking channel to ``address`` with these credentials (and gRPC's retry
        policy from ``retry``: :func:`service_config`).

        Raises:
            ConfigError: a token over plaintext to a non-loopback address (:meth:`check_target`).
        """
        self.check_target(address)
        if self.tls:
            return grpc.secure_channel(address, self._ssl(), options=self._options(retry))
        return grpc.insecure_channel(address, options=self._options(retry))

    def aio_channel(self, address: str, retry: RetryPolicy | None = None) -> grpc.aio.Channel:
        """An asyncio channel to ``address`` with these credentials (and gRPC's retry
        policy from ``retry``: :func:`service_config`).

        Raises:
            ConfigError: a token over plaintext to a non-loopback address (:meth:`check_target`).
        """
        self.check_target(address)
        if self.tls:
            return grpc.aio.secure_channel(address, self._ssl(), options=self._options(retry))
        return grpc.aio.insecure_channel(address, options=self._options(retry))
