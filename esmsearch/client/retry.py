"""Client-side retries: exponential backoff with full jitter, for UNAVAILABLE only.

Every RPC the clients retry is read-only (Search, SearchStream before its first
response, SearchByEmbedding, Embed, GetIndexInfo), hence idempotent: sending it
twice cannot change the server's state, so a retry after UNAVAILABLE (server
unreachable, restarting or draining) is always safe. Other codes are not retried:
INVALID_ARGUMENT and RESOURCE_EXHAUSTED would fail again, and DEADLINE_EXCEEDED
means the caller's time is spent. The admin ReloadIndex RPC is never retried.

Backoff is AWS's "full jitter" (Brooker, *Exponential Backoff And Jitter*, AWS
Architecture Blog, 2015): before attempt ``n`` (n >= 1) sleep a uniform random
time in ``[0, min(max_backoff_s, initial_backoff_s * multiplier ** (n - 1))]``.
Retries stop at ``max_attempts`` or when the next sleep would pass the call's
overall deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import grpc

from esmsearch.errors import ConfigError

__all__ = ["NO_RETRY", "RETRYABLE_CODES", "RetryPolicy", "call_with_retry", "call_with_retry_async"]

T = TypeVar("T")

#: Status codes that are retried.
RETRYABLE_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry UNAVAILABLE.

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
        """Seconds to sleep before retry number ``retry`` (1-based): full jitter."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return self.rng.uniform(0.0, cap)


#: A policy that never retries.
NO_RETRY: Final = RetryPolicy(max_attempts=1)


def _retryable(exc: grpc.RpcError) -> bool:
    code = exc.code() if hasattr(exc, "code") else None
    return code in RETRYABLE_CODES


def call_with_retry(
    call: Callable[[float | None], T],
    policy: RetryPolicy,
    timeout_s: float | None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``call(remaining_timeout_s)``, retrying ``grpc.RpcError`` UNAVAILABLE per ``policy``.

    Args:
        call: makes one attempt given the seconds left of the overall deadline
            (``None`` = no deadline).
        policy: the retry policy.
        timeout_s: overall deadline in seconds over all attempts; ``None`` = none.
        sleep, clock: injectable for tests.

    Returns:
        The first successful attempt's result.

    Raises:
        grpc.RpcError: the last attempt's error (non-retryable code, attempts used
            up, or no time left for another attempt).
    """
    deadline = None if timeout_s is None else clock() + timeout_s
    attempt = 1
    while True:
        remaining = None if deadline is None else max(0.0, deadline - clock())
        try:
            return call(remaining)
        except grpc.RpcError as exc:
            if not _retryable(exc) or attempt >= policy.max_attempts:
                raise
            pause = policy.backoff_s(attempt)
            if deadline is not None and clock() + pause >= deadline:
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
            if not _retryable(exc) or attempt >= policy.max_attempts:
                raise
            pause = policy.backoff_s(attempt)
            if deadline is not None and clock() + pause >= deadline:
                raise
            await asyncio.sleep(pause)
            attempt += 1
