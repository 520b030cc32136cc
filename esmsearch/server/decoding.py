"""Undecodable request messages: INVALID_ARGUMENT, and no server memory kept for them.

grpcio's synchronous server (measured on grpcio 1.85.3) answers a request message its
deserializer cannot decode with INTERNAL ("Exception deserializing request!") and
never frees that call: for a unary request it then aborts the call a second time
("requires exactly one request message"), that second status batch never completes,
and the call's state -- the Python ``_RPCState`` and the core call it holds -- stays
alive for the life of the process, about 19 KiB of RSS per undecodable request
(``benchmarks/grpc_undecodable_leak.py``: 8,000 of them grew a bare grpcio server from
64 to 215 MiB and left 8,000 call states; with this module, 0). Anyone who can reach the port
could grow the server's memory without bound with a few bytes per request
(``benchmarks/hostile_inputs.py`` found it: RSS +278 MiB over 20 rounds of 600
malformed messages each, growing every round).

:class:`RequestDecodingInterceptor` wraps every method handler of the server (the
search service, health and reflection alike) so that its request deserializer never
raises: a message that does not decode becomes an :class:`Undecodable` marker, and the
wrapped behaviour answers it with INVALID_ARGUMENT -- a normal, single status, so gRPC
frees the call -- before any servicer code runs. INVALID_ARGUMENT rather than gRPC's
INTERNAL: the request is at fault, not the server, and it must not be retried. The
details name the method, never the decoder's exception text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from esmsearch.server.rpc import RpcObserver

__all__ = ["RequestDecodingInterceptor", "Undecodable"]

_log = logging.getLogger(__name__)

#: Attributes by which grpcio's server changes how it calls a behaviour (``_server.py``).
_BEHAVIOUR_MARKS = ("experimental_non_blocking", "experimental_thread_pool")


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message that its deserializer could not decode.

    Attributes:
        error: the deserializer's exception class name (logged when the interceptor
            has no :class:`~esmsearch.server.rpc.RpcObserver`; never sent to the client).
        size: the message's length in bytes.
    """

    error: str
    size: int


def _never_raises(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the request's fault
            return Undecodable(type(exc).__name__, len(data))

    return decode


def _copy_marks(inner: Callable[..., Any], wrapper: Callable[..., Any]) -> None:
    """Give ``wrapper`` the attributes by which gRPC calls ``inner`` differently.

    gRPC's experimental non-blocking streams (grpcio-health-checking's ``Watch``) are
    marked by attributes of the behaviour (and then get a ``send_response_callback``
    argument, which the wrappers pass on); without them ``Watch`` would hold a worker
    thread for the life of each stream.
    """
    for attr in _BEHAVIOUR_MARKS:
        if hasattr(inner, attr):
            setattr(wrapper, attr, getattr(inner, attr))


class RequestDecodingInterceptor(grpc.ServerInterceptor):
    """Answer undecodable request messages with INVALID_ARGUMENT (see the module docstring).

    Args:
        observer: if given, each refused call is logged and counted like any other RPC
            (method name, INVALID_ARGUMENT).

    Put it first in ``grpc.server(interceptors=...)``, so that it wraps whatever handler
    the other interceptors return. Handlers without a request deserializer (raw bytes)
    are returned unchanged.
    """

    def __init__(self, observer: RpcObserver | None = None) -> None:
        self._observer = observer

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        rpc = method.rsplit("/", 1)[-1]
        observer = self._observer

        def refuse(bad: Undecodable, context: grpc.ServicerContext) -> None:
            code = grpc.StatusCode.INVALID_ARGUMENT
            details = f"the request message of {method} does not decode as that method's protocol buffer"
            if observer is not None:  # the call's one log line and its metrics, like any other RPC; aborts
                observer.refuse(rpc, context, code, details)
            else:
                _log.info("%s: a request message of %d bytes does not decode (%s)", method, bad.size, bad.error)
                context.abort(code, details)

        def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for request in requests:
                if isinstance(request, Undecodable):
                    refuse(request, context)
                yield request

        decode = _never_raises(handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.request_streaming:
            inner_stream = handler.stream_stream if handler.response_streaming else handler.stream_unary
            if inner_stream is None:  # a malformed handler: leave it to gRPC
                return handler

            def stream_behaviour(requests: Iterator[Any], context: grpc.ServicerContext, *more: Any) -> Any:
                return inner_stream(checked(requests, context), context, *more)

            _copy_marks(inner_stream, stream_behaviour)

            make = (
                grpc.stream_stream_rpc_method_handler
                if handler.response_streaming
                else grpc.stream_unary_rpc_method_handler
            )
            return make(stream_behaviour, request_deserializer=decode, response_serializer=serialize)

        inner_unary = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if inner_unary is None:
            return handler

        def unary_behaviour(request: Any, context: grpc.ServicerContext, *more: Any) -> Any:
            if isinstance(request, Undecodable):
                refuse(request, context)
            return inner_unary(request, context, *more)  # more: a send_response_callback (_copy_marks)

        _copy_marks(inner_unary, unary_behaviour)

        make = (
            grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
        )
        return make(unary_behaviour, request_deserializer=decode, response_serializer=serialize)
