"""The gRPC health service (``grpc.health.v1``), without grpcio-health-checking's deadlock.

grpcio-health-checking 1.85's :class:`grpc_health.v1.health.HealthServicer` serves
``Watch`` without holding a thread per stream (``experimental_non_blocking``): a
status is sent by whichever thread calls :meth:`set` (or by ``Watch`` itself for the
first response), **while holding the servicer's lock**, and gRPC's send waits until
the server's event thread has processed the write. A ``Watch`` stream's close
callback runs *on that event thread* and takes the same lock. So when a client closes
its channel while a status is being sent to any watcher, the event thread waits for
the lock and the sender waits for the event thread: the server stops answering every
RPC. Clients that balance over replicas watch health on every channel
(:mod:`esmsearch.client.channel`, ``round_robin`` with health checks), so channels
opening and closing while a server starts, drains or reloads make this likely.

:class:`HealthServicer` keeps the library's servicer and changes one thing: the close
callback never takes the servicer's lock; it records the closed stream under a lock
that is never held while sending, and closed streams are dropped from the watchers
the next time :meth:`set` or ``Watch`` runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health

__all__ = ["HealthServicer"]


class HealthServicer(health.HealthServicer):  # type: ignore[misc]  # untyped library class
    """:class:`grpc_health.v1.health.HealthServicer` whose ``Watch`` close callback cannot deadlock.

    Same API: ``set(service, status)``, ``enter_graceful_shutdown()``, ``Check``,
    ``Watch``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._closed_lock = threading.Lock()  # never held while sending
        self._closed: list[tuple[Callable[[Any], Any], str]] = []

    def _on_close_callback(self, send_response_callback: Callable[[Any], Any], service: str) -> Callable[[], None]:
        def callback() -> None:  # runs on gRPC's event thread: must not wait for a sender
            with self._closed_lock:
                self._closed.append((send_response_callback, service))
            send_response_callback(None)  # ends the stream; never blocks

        return callback

    def _drop_closed(self) -> None:
        """Forget closed streams (caller holds ``self._lock``)."""
        with self._closed_lock:
            closed, self._closed = self._closed, []
        for send_response_callback, service in closed:
            self._send_response_callbacks.get(service, set()).discard(send_response_callback)

    def Watch(self, request: Any, context: Any, send_response_callback: Any = None) -> Any:  # noqa: N802 - gRPC's name
        with self._lock:
            self._drop_closed()
            return super().Watch(request, context, send_response_callback)

    def set(self, service: str, status: Any) -> None:
        with self._lock:
            self._drop_closed()
            super().set(service, status)
