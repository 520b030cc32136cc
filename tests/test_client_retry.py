"""Client retries: UNAVAILABLE with jittered backoff, a busy server after its retry-after hint, within the deadline."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from esmsearch.client import InvalidArgumentError, SearchClient, UnavailableError
from esmsearch.client.aio import AsyncSearchClient
from esmsearch.client.retry import NO_RETRY, RetryPolicy, call_with_retry
from esmsearch.errors import ConfigError
from esmsearch.v1 import search_pb2, search_pb2_grpc


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, retry_after_ms: str | None = None) -> None:
        super().__init__(code.name)
        self._code = code
        self._trailing = (("retry-after-ms", retry_after_ms),) if retry_after_ms is not None else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


class Flaky:
    """Fails with the given codes (or prepared errors), then returns "ok"; records each attempt's timeout."""

    def __init__(self, *codes: grpc.StatusCode | FakeRpcError) -> None:
        self.codes = list(codes)
        self.timeouts: list[float | None] = []

    def __call__(self, remaining: float | None) -> str:
        self.timeouts.append(remaining)
        if self.codes:
            err = self.codes.pop(0)
            raise err if isinstance(err, FakeRpcError) else FakeRpcError(err)
        return "ok"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def __call__(self) -> float:
        return self.now


U = grpc.StatusCode.UNAVAILABLE


def test_unavailable_is_retried_with_growing_jittered_backoff() -> None:
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=0.3, rng=random.Random(3))
    call = Flaky(U, U, U, U)
    assert call_with_retry(call, policy, None, sleep=clock.sleep, clock=clock) == "ok"
    assert len(call.timeouts) == 5
    caps = [0.1, 0.2, 0.3, 0.3]  # initial * 2**n, capped by max_backoff_s
    assert all(0 <= s <= cap for s, cap in zip(clock.sleeps, caps, strict=True))
    expected = random.Random(3)
    assert clock.sleeps == [expected.uniform(0, cap) for cap in caps]  # full jitter, seeded


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,  # no retry-after: permanent
     grpc.StatusCode.DEADLINE_EXCEEDED,
     grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL],
)  # fmt: skip
def test_other_codes_are_not_retried(code: grpc.StatusCode) -> None:
    clock, call = FakeClock(), Flaky(code)
    with pytest.raises(FakeRpcError):
        call_with_retry(call, RetryPolicy(), None, sleep=clock.sleep, clock=clock)
    assert len(call.timeouts) == 1 and clock.sleeps == []


def test_busy_server_is_retried_after_its_hint_plus_jitter() -> None:
    clock = FakeClock()
    busy = [FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, ms) for ms in ("200", "50")]
    call = Flaky(*busy)
    policy = RetryPolicy(max_attempts=4, rng=random.Random(5))
    assert call_with_retry(call, policy, 10.0, sleep=clock.sleep, clock=clock) == "ok"
    assert len(call.timeouts) == 3
    assert 0.2 <= clock.sleeps[0] <= 0.25 and 0.05 <= clock.sleeps[1] <= 0.0625  # never sooner than asked


def test_busy_server_is_not_retried_past_the_deadline() -> None:
    clock = FakeClock()
    call = Flaky(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "5000"))
    with pytest.raises(FakeRpcError):
        call_with_retry(call, RetryPolicy(), 2.0, sleep=clock.sleep, clock=clock)
    assert len(call.timeouts) == 1 and clock.sleeps == []  # waiting 5 s would pass the 2 s deadline


def test_malformed_retry_after_is_a_permanent_refusal() -> None:
    clock = FakeClock()
    call = Flaky(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "soon"))
    with pytest.raises(FakeRpcError):
        call_with_retry(call, RetryPolicy(), None, sleep=clock.sleep, clock=clock)
    assert len(call.timeouts) == 1


def test_attempts_are_bounded_and_the_last_error_is_raised() -> None:
    clock, call = FakeClock(), Flaky(U, U, U, U, U)
    with pytest.raises(FakeRpcError):
        call_with_retry(call, RetryPolicy(max_attempts=3), None, sleep=clock.sleep, clock=clock)
    assert len(call.timeouts) == 3


def test_retries_share_one_deadline() -> None:
    clock = FakeClock()
    call = Flaky(U, U, U, U, U, U, U, U)
    policy = RetryPolicy(max_attempts=100, initial_backoff_s=1.0, max_backoff_s=1.0, rng=random.Random(0))
    with pytest.raises(FakeRpcError):
        call_with_retry(call, policy, 2.5, sleep=clock.sleep, clock=clock)
    assert call.timeouts[0] == 2.5
    assert all(b < a for a, b in zip(call.timeouts, call.timeouts[1:], strict=False))  # each attempt gets what is left
    assert clock.now < 2.5  # never slept past the deadline


def test_policy_validates_itself() -> None:
    for bad in (
        {"max_attempts": 0},
        {"initial_backoff_s": 0},
        {"max_backoff_s": 0.01},
        {"multiplier": 0.5},
    ):
        with pytest.raises(ConfigError):
            RetryPolicy(**bad)  # type: ignore[arg-type]


# -- against a real gRPC server that is unavailable at first --------------------------------


class FlakyServicer(search_pb2_grpc.HomologSearchServicer):
    """GetIndexInfo answers after ``fail`` UNAVAILABLE replies; Search: always INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.fail = 0
        self.calls = 0
        self.search_calls = 0
        self.lock = threading.Lock()

    def GetIndexInfo(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        with self.lock:
            self.calls += 1
            failing = self.fail > 0
            self.fail -= 1
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return search_pb2.IndexInfo(count=7, index_version="v1")

    def Search(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        with self.lock:
            self.search_calls += 1
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "k must be in [1, 1000], got 0")


@pytest.fixture(scope="module")
def flaky() -> Iterator[tuple[FlakyServicer, str]]:
    servicer = FlakyServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    search_pb2_grpc.add_HomologSearchServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.005, rng=random.Random(1))


def test_sync_client_retries_unavailable_until_it_succeeds(flaky) -> None:  # type: ignore[no-untyped-def]
    servicer, address = flaky
    servicer.fail, servicer.calls = 2, 0
    with SearchClient(address, retry=FAST, timeout_s=10) as client:
        assert client.index_info().count == 7
    assert servicer.calls == 3
    servicer.fail, servicer.calls = 10, 0
    with SearchClient(address, retry=FAST, timeout_s=10) as client:
        with pytest.raises(UnavailableError, match="warming up"):
            client.index_info()
    assert servicer.calls == 4
    servicer.fail, servicer.calls = 1, 0
    with SearchClient(address, retry=NO_RETRY, timeout_s=10) as client:
        with pytest.raises(UnavailableError):
            client.index_info()
    assert servicer.calls == 1


def test_sync_client_does_not_retry_invalid_argument(flaky) -> None:  # type: ignore[no-untyped-def]
    servicer, address = flaky
    servicer.search_calls = 0
    with SearchClient(address, retry=FAST, timeout_s=10) as client:
        with pytest.raises(InvalidArgumentError):
            client.search(["MKV"], k=0, split_requests=False)
    assert servicer.search_calls == 1


def test_async_client_retries_unavailable(flaky) -> None:  # type: ignore[no-untyped-def]
    servicer, address = flaky
    servicer.fail, servicer.calls = 2, 0

    async def go() -> int:
        async with AsyncSearchClient(address, retry=FAST, timeout_s=10) as client:
            return (await client.index_info()).count

    assert asyncio.run(go()) == 7
    assert servicer.calls == 3
