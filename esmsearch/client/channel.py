"""Client credentials (TLS, mutual TLS, bearer token) and channel construction.

Shared by :class:`esmsearch.client.SearchClient` and
:class:`esmsearch.client.aio.AsyncSearchClient`. The bearer token travels as
``authorization: Bearer <token>`` call metadata on every RPC (also over plaintext
loopback channels, where gRPC would refuse call credentials); use TLS whenever the
server is not on the same host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

__all__ = ["TOKEN_ENV", "ClientCredentials", "channel_options"]

#: Environment variable the CLI reads the client token from.
TOKEN_ENV: Final = "ESMSEARCH_TOKEN"


def channel_options() -> list[tuple[str, int]]:
    """Channel options of both clients: no cap on response size (hits grow with k x queries)."""
    return [("grpc.max_receive_message_length", -1)]


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

    Raises:
        ValueError: only one of client cert/key is given, or the token has whitespace.
    """

    tls: bool = False
    root_cert_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    token: str | None = None
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together (mutual TLS)")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("token must be non-empty without whitespace")
        if self.root_cert_file is not None or self.client_cert_file is not None:
            object.__setattr__(self, "tls", True)

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
        opts: list[tuple[str, int | str]] = list(channel_options())
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
