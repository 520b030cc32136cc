"""Client-side retries: UNAVAILABLE with backoff, a busy server after its retry-after hint.

Every RPC the clients retry is read-only (Search, SearchByEmbedding, Embed,
GetIndexInfo), hence idempotent: sending it twice cannot change the server's state.
Two failures are retried:

* UNAVAILABLE (server unreachable, restarting or draining), with AWS's "full jitter"
  backoff (Brooker, *Exponential Backoff And Jitter*, AWS Architecture Blog, 2015):
  before retry ``n`` (n >= 1) sleep a uniform random time in
  ``[0, min(max_backoff_s, initial_backoff_s * multiplier ** (n - 1))]``;
* RESOURCE_EXHAUSTED *with* a ``retry-after-ms`` trailing hint (the server's
  admission is full for now): sleep the hint plus up to 25% of it at random, so
  that clients refused together do not return together.

RESOURCE_EXHAUSTED *without* the hint means a permanent limit (the request must be
split) and is never retried, nor are INVALID_ARGUMENT and the other codes;
DEADLINE_EXCEEDED means the caller's time is spent. Retries stop at ``max_attempts``
or when the next sleep would pass the call's overall deadline: a retry never
extends the time the caller allowed. Streams and the admin ReloadIndex RPC are
never retried.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import grpc

from esmsearch.client.errors import retry_after_s
from esmsearch.errors import ConfigError

__all__ = ["NO_RETRY", "RETRYABLE_CODES", "RetryPolicy", "call_with_retry", "call_with_retry_async"]

T = TypeVar("T")

#: Status codes that are retried (RESOURCE_EXHAUSTED only with a retry-after hint).
RETRYABLE_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
#: Extra random share of a server's retry-after hint added to the sleep.
_RETRY_AFTER_JITTER: Final = 0.25


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry (see the module docstring for which failures).

    Attributes:
        max_attempts: total attempts including the first, >= 1 (1 = no retry).
        initial_backoff_s: cap of the first backoff in seconds, > 0.
        max_backoff_s: largest backoff cap in seconds, >= initial_backoff_s.
        multiplier: growth of the cap per attempt, >= 1.
        rng: random source of the jitter (seed it for reproducible sleeps).

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

    def backoff_s(self, retry: int) -> float:
        """Seconds to sleep before retry number ``retry`` (1-based) after UNAVAILABLE: full jitter."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return self.rng.uniform(0.0, cap)

    def pause_s(self, exc: grpc.RpcError, retry: int) -> float | None:
        """Seconds to sleep before retry number ``retry`` after ``exc``; ``None`` = do not retry."""
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if code == grpc.StatusCode.UNAVAILABLE:
            return self.backoff_s(retry)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            hint = retry_after_s(exc)
            if hint is None:
                return None  # a permanent limit: retrying cannot succeed
            return hint * (1.0 + self.rng.uniform(0.0, _RETRY_AFTER_JITTER))
        return None


#: A policy that never retries.
NO_RETRY: Final = RetryPolicy(max_attempts=1)


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
        policy: the retry policy.
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
