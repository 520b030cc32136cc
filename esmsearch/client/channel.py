"""Client credentials (TLS, mutual TLS, bearer token) and channel construction.

Shared by :class:`esmsearch.client.SearchClient` and
:class:`esmsearch.client.aio.AsyncSearchClient`. The bearer token travels as
``authorization: Bearer <token>`` call metadata on every RPC (also over plaintext
loopback channels, where gRPC would refuse call credentials); use TLS whenever the
server is not on the same host.

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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

__all__ = ["HEALTH_SERVICE_NAME", "LB_POLICIES", "TOKEN_ENV", "ClientCredentials", "channel_options", "service_config"]

#: Environment variable the CLI reads the client token from.
TOKEN_ENV: Final = "ESMSEARCH_TOKEN"


#: Health-check service name the servers report (``esmsearch.server.app.SERVICE_NAME``,
#: repeated here so that the client imports no server code).
HEALTH_SERVICE_NAME: Final = "esmsearch.v1.HomologSearch"
#: gRPC load-balancing policies a client may ask for: ``round_robin`` (default: spread
#: calls over every healthy address) or ``pick_first`` (one address at a time).
LB_POLICIES: Final = ("round_robin", "pick_first")


def service_config(lb_policy: str = "round_robin") -> str:
    """The gRPC service config (JSON) of client channels.

    ``round_robin`` comes with client-side health checking of
    :data:`HEALTH_SERVICE_NAME`; ``pick_first`` without (gRPC checks health only for
    policies that spread load).

    Raises:
        ValueError: ``lb_policy`` is not one of :data:`LB_POLICIES`.
    """
    if lb_policy not in LB_POLICIES:
        raise ValueError(f"lb_policy must be one of {', '.join(LB_POLICIES)}, got {lb_policy!r}")
    config: dict[str, object] = {"loadBalancingConfig": [{lb_policy: {}}]}
    if lb_policy == "round_robin":
        config["healthCheckConfig"] = {"serviceName": HEALTH_SERVICE_NAME}
    return json.dumps(config)


def channel_options(lb_policy: str = "round_robin") -> list[tuple[str, int | str]]:
    """Channel options of both clients: no cap on response size (hits grow with k x
    queries) and the load-balancing service config (:func:`service_config`)."""
    return [("grpc.max_receive_message_length", -1), ("grpc.service_config", service_config(lb_policy))]


def _read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class ClientCredentials:
    """How a client proves who it is and checks the server.

    Attributes:
        tls: use TLS (implied by any of the files below).
        root_cert_file: PEM CA certificate(s) to verify the server with; ``None`` =
            the system's default roots.
        client_cert_file, client_key_file: PEM certificate chain and key for mutual
            TLS (both or neither).
        token: bearer token sent as ``authorization: Bearer <token>`` metadata.
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

    def _options(self) -> list[tuple[str, int | str]]:
        opts: list[tuple[str, int | str]] = channel_options(self.lb_policy)
        if self.server_name_override:
            opts.append(("grpc.ssl_target_name_override", self.server_name_override))
        return opts

    def channel(self, address: str) -> grpc.Channel:
        """A blocking channel to ``address`` with these credentials."""
        if self.tls:
            return grpc.secure_channel(address, self._ssl(), options=self._options())
        return grpc.insecure_channel(address, options=self._options())

    def aio_channel(self, address: str) -> grpc.aio.Channel:
        """An asyncio channel to ``address`` with these credentials."""
        if self.tls:
            return grpc.aio.secure_channel(address, self._ssl(), options=self._options())
        return grpc.aio.insecure_channel(address, options=self._options())
