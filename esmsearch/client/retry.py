"""Client-side retries: gRPC's own retry policy first, a hand-made loop only for what it cannot do.

Every RPC the clients retry is read-only (Search, SearchByEmbedding, Embed,
GetIndexInfo), hence idempotent: sending it twice cannot change the server's state.
Streams and the admin ReloadIndex RPC are never retried.

**gRPC's retry policy does the retrying.** A :class:`RetryPolicy` becomes the
``retryPolicy`` of those four methods in the service config of the channels the
clients open (:meth:`RetryPolicy.grpc_retry_policy`,
:func:`esmsearch.client.channel.service_config`; gRFC A6 "gRPC Retry Design"), which
gRPC's core applies to every attempt:

* UNAVAILABLE (server unreachable, restarting or draining) and RESOURCE_EXHAUSTED
  are retried, with exponential backoff: before retry ``n`` gRPC waits about
  ``min(maxBackoff, initialBackoff * multiplier ** (n - 1))`` (its core adds +-20%
  jitter; measured with 10 ms initial backoff: 12 ms, then 23 ms);
* a server's ``grpc-retry-pushback-ms`` trailer replaces that wait: a busy esmsearch
  server sends the time its admission needs to find room, and ``-1`` ("never retry")
  with RESOURCE_EXHAUSTED over a permanent limit (the request must be split), so that
  is never retried; RESOURCE_EXHAUSTED without a trailer (gRPC's own
  ``maximum_concurrent_rpcs`` refusal) is retried with backoff;
* every other code is final; retries never run past the call's deadline; a request
  is retried only while it fits gRPC's retry buffer (``grpc.per_rpc_retry_buffer_size``,
  raised to :data:`RETRY_BUFFER_BYTES` by :func:`esmsearch.client.channel.channel_options`).

Every gRPC client with such a service config (Go, Java, Node, C++) backs off the
same way, since the trailer is gRPC's standard.

**The hand-made loop** (:func:`call_with_retry`, :func:`call_with_retry_async`) runs
only where the retry policy cannot express the behaviour:

1. more than :data:`GRPC_MAX_ATTEMPTS` attempts: gRPC caps ``maxAttempts`` at 5, so
   a policy asking for more runs ``ceil(max_attempts / 5)`` gRPC calls, each with up
   to 5 attempts, from the loop (:meth:`RetryPolicy.loop_policy`);
2. a channel the caller built (``SearchClient(channel=...)``): its service config is
   not ours, so the loop makes every attempt itself;
3. an initial backoff under :data:`GRPC_MIN_BACKOFF_S`: with grpcio 1.85 a call that
   gRPC retried after a 1 ms backoff hung until its deadline in 12 of 30 runs (blocking
   channel) and 2 of 3 runs (``grpc.aio``); with 2, 5 and 10 ms, no hang in 100 runs
   each (a server failing 2 of 3 calls with UNAVAILABLE, 2 s deadline), so such
   policies stay in the loop entirely.

The loop applies the same rules as gRPC (:meth:`RetryPolicy.pause_s`): the pushback
when there is one (negative or malformed: stop), else the legacy ``retry-after-ms``
hint of earlier servers, else AWS's "full jitter" backoff (Brooker, *Exponential
Backoff And Jitter*, AWS Architecture Blog, 2015: a uniform random wait in
``[0, min(max_backoff_s, initial_backoff_s * multiplier ** (n - 1))]``); a busy
server's hint gets up to 25% more at random, so that clients refused together do not
return together; and a retry never extends the deadline the caller allowed.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Final, TypeVar

import grpc

from esmsearch.client.errors import retry_after_s, trailer_text
from esmsearch.errors import ConfigError
from esmsearch.protocol import RETRY_PUSHBACK_KEY

__all__ = [
    "GRPC_MAX_ATTEMPTS",
    "GRPC_MIN_BACKOFF_S",
    "NO_RETRY",
    "RETRYABLE_CODES",
    "RETRY_BUFFER_BYTES",
    "RetryPolicy",
    "call_with_retry",
    "call_with_retry_async",
    "pushback_ms",
]

T = TypeVar("T")

#: Status codes that are retried (unless the server's pushback says not to).
RETRYABLE_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
#: The most attempts gRPC's retry policy makes for one call (gRFC A6: larger values are
#: treated as 5).
GRPC_MAX_ATTEMPTS: Final = 5
#: Largest request gRPC keeps for retrying (``grpc.per_rpc_retry_buffer_size``; gRPC's
#: default, 256 KiB, would leave a 1,000-query Search unretried): the server's largest
#: request message is well below it.
RETRY_BUFFER_BYTES: Final = 64 << 20
#: Smallest initial backoff left to gRPC's retry policy (point 3 of the module docstring);
#: below it the hand-made loop makes every attempt.
GRPC_MIN_BACKOFF_S: Final = 0.01
#: Extra random share of a server's retry hint added to the hand-made loop's sleep.
_RETRY_AFTER_JITTER: Final = 0.25


def pushback_ms(exc: grpc.RpcError) -> int | None:
    """The ``grpc-retry-pushback-ms`` trailer of a failed call.

    Returns:
        The milliseconds to wait (>= 0); ``-1`` when the server said not to retry
        (a negative or malformed value, as gRFC A6 reads it); ``None`` without one.
    """
    text = trailer_text(exc, RETRY_PUSHBACK_KEY)
    if text is None:
        return None
    return int(text) if text.isdigit() else -1


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry (see the module docstring for which failures).

    Attributes:
        max_attempts: total attempts including the first, >= 1 (1 = no retry).
        initial_backoff_s: cap of the first backoff in seconds, > 0.
        max_backoff_s: largest backoff cap in seconds, >= initial_backoff_s.
        multiplier: growth of the cap per attempt, >= 1.
        rng: random source of the hand-made loop's jitter (seed it for reproducible
            sleeps; gRPC's own retries use gRPC's random source).

    Raises:
        ConfigError: a value is out of range.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if not self.initial_backoff_s > 0:
            raise ConfigError(f"initial_backoff_s must be > 0 s, got {self.initial_backoff_s!r}")
        if not self.max_backoff_s >= self.initial_backoff_s:
            raise ConfigError("max_backoff_s must be >= initial_backoff_s")
        if not self.multiplier >= 1:
            raise ConfigError(f"multiplier must be >= 1, got {self.multiplier!r}")

    def grpc_retry_policy(self) -> dict[str, object] | None:
        """This policy as a service config ``retryPolicy`` (gRFC A6); ``None`` when gRPC is
        to make no retry (one attempt, or a backoff under :data:`GRPC_MIN_BACKOFF_S`).

        ``maxAttempts`` is capped at :data:`GRPC_MAX_ATTEMPTS` (gRPC's cap); the rest is
        :meth:`loop_policy`'s.
        """
        attempts = min(self.max_attempts, GRPC_MAX_ATTEMPTS)
        if attempts < 2 or self.initial_backoff_s < GRPC_MIN_BACKOFF_S:  # A6: maxAttempts must be > 1
            return None
        return {
            "maxAttempts": attempts,
            "initialBackoff": _duration(self.initial_backoff_s),
            "maxBackoff": _duration(self.max_backoff_s),
            "backoffMultiplier": self.multiplier,
            "retryableStatusCodes": sorted(code.name for code in RETRYABLE_CODES),
        }

    def loop_policy(self, *, in_channel: bool) -> RetryPolicy:
        """The policy left to the hand-made loop (see the module docstring).

        Args:
            in_channel: the channel was opened with this policy (its service config
                carries :meth:`grpc_retry_policy`, if that is not ``None``).

        Returns:
            When gRPC retries: one attempt, or ``ceil(max_attempts / 5)`` gRPC calls
            when more than :data:`GRPC_MAX_ATTEMPTS` attempts are asked for; else
            this policy, whole.
        """
        if not in_channel or self.grpc_retry_policy() is None:
            return self
        return replace(self, max_attempts=math.ceil(self.max_attempts / GRPC_MAX_ATTEMPTS))

    def backoff_s(self, retry: int) -> float:
        """Seconds to sleep before retry number ``retry`` (1-based): full jitter."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return self.rng.uniform(0.0, cap)

    def pause_s(self, exc: grpc.RpcError, retry: int) -> float | None:
        """Seconds to sleep before retry number ``retry`` after ``exc``; ``None`` = do not retry."""
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if code not in RETRYABLE_CODES:
            return None
        pushback = pushback_ms(exc)
        if pushback is not None and pushback < 0:
            return None  # the server said: retrying cannot succeed
        hint = pushback / 1e3 if pushback is not None else retry_after_s(exc)
        if hint is not None:
            return hint * (1.0 + self.rng.uniform(0.0, _RETRY_AFTER_JITTER))
        return self.backoff_s(retry)


#: A policy that never retries.
NO_RETRY: Final = RetryPolicy(max_attempts=1)


def _duration(seconds: float) -> str:
    """A protobuf JSON ``Duration`` (``"0.1s"``), as service configs spell them."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def call_with_retry(
    call: Callable[[float | None], T],
    policy: RetryPolicy,
    timeout_s: float | None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``call(remaining_timeout_s)``, retrying per ``policy`` (see the module docstring).

    Args:
        call: makes one attempt given the seconds left of the overall deadline
            (``None`` = no deadline).
        policy: the retry policy (the channel's share already taken out: see
            :meth:`RetryPolicy.loop_policy`).
        timeout_s: overall deadline in seconds over all attempts; ``None`` = none.
        sleep, clock: injectable for tests.

    Returns:
        The first successful attempt's result.

    Raises:
        grpc.RpcError: the last attempt's error (not retryable, attempts used up, or
            no time left for another attempt within ``timeout_s``).
    """
    deadline = None if timeout_s is None else clock() + timeout_s
    attempt = 1
    while True:
        remaining = None if deadline is None else max(0.0, deadline - clock())
        try:
            return call(remaining)
        except grpc.RpcError as exc:
            pause = policy.pause_s(exc, attempt) if attempt < policy.max_attempts else None
            if pause is None or (deadline is not None and clock() + pause >= deadline):
                raise
            sleep(pause)
            attempt += 1


async def call_with_retry_async(
    call: Callable[[float | None], Awaitable[T]],
    policy: RetryPolicy,
    timeout_s: float | None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """The asyncio form of :func:`call_with_retry` (sleeps with ``asyncio.sleep``)."""
    deadline = None if timeout_s is None else clock() + timeout_s
    attempt = 1
    while True:
        remaining = None if deadline is None else max(0.0, deadline - clock())
        try:
            return await call(remaining)
        except grpc.RpcError as exc:
            pause = policy.pause_s(exc, attempt) if attempt < policy.max_attempts else None
            if pause is None or (deadline is not None and clock() + pause >= deadline):
                raise
            await asyncio.sleep(pause)
            attempt += 1
