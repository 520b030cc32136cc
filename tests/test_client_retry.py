"""Client retries: gRPC's own retry policy in the channel's service config (UNAVAILABLE with
backoff, a busy server after its standard ``grpc-retry-pushback-ms``, never a permanent limit),
and the hand-made loop for what that policy cannot do, with the same rules, within the deadline."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from esmsearch.client import InvalidArgumentError, SearchClient, UnavailableError
from esmsearch.client.aio import AsyncSearchClient
from esmsearch.client.channel import RETRIED_METHODS, channel_options
from esmsearch.client.errors import ResourceExhaustedError
from esmsearch.client.retry import NO_RETRY, RetryPolicy, call_with_retry
from esmsearch.errors import ConfigError
from esmsearch.v1 import search_pb2, search_pb2_grpc


class FakeRpcError(grpc.RpcError):
    def __init__(
        self, code: grpc.StatusCode, retry_after_ms: str | None = None, pushback_ms: str | None = None
    ) -> None:
        super().__init__(code.name)
        self._code = code
        trailing = [] if pushback_ms is None else [("grpc-retry-pushback-ms", pushback_ms)]
        self._trailing = tuple(trailing + ([("retry-after-ms", retry_after_ms)] if retry_after_ms is not None else []))

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
    "err",
    [FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT), FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED),
     FakeRpcError(grpc.StatusCode.UNAUTHENTICATED), FakeRpcError(grpc.StatusCode.INTERNAL),
     FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, pushback_ms="-1"),  # a permanent limit
     FakeRpcError(grpc.StatusCode.UNAVAILABLE, pushback_ms="-1")],
)  # fmt: skip
def test_other_codes_and_a_negative_pushback_are_not_retried(err: FakeRpcError) -> None:
    clock, call = FakeClock(), Flaky(err)
    with pytest.raises(FakeRpcError):
        call_with_retry(call, RetryPolicy(), None, sleep=clock.sleep, clock=clock)
    assert len(call.timeouts) == 1 and clock.sleeps == []


def test_busy_server_is_retried_after_its_pushback_or_legacy_hint_plus_jitter() -> None:
    clock = FakeClock()
    busy = [
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_ms="999", pushback_ms="200"),  # pushback wins
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_ms="50"),  # an earlier server's hint
    ]
    call = Flaky(*busy)
    policy = RetryPolicy(max_attempts=4, rng=random.Random(5))
    assert call_with_retry(call, policy, 10.0, sleep=clock.sleep, clock=clock) == "ok"
    assert len(call.timeouts) == 3
    assert 0.2 <= clock.sleeps[0] <= 0.25 and 0.05 <= clock.sleeps[1] <= 0.0625  # never sooner than asked


def test_resource_exhausted_without_a_hint_is_retried_with_backoff_as_grpc_does() -> None:
    # gRPC's own maximum_concurrent_rpcs refusal carries no trailer; gRPC's policy retries it.
    clock = FakeClock()
    call = Flaky(grpc.StatusCode.RESOURCE_EXHAUSTED)
    policy = RetryPolicy(initial_backoff_s=0.1, rng=random.Random(2))
    assert call_with_retry(call, policy, None, sleep=clock.sleep, clock=clock) == "ok"
    assert len(clock.sleeps) == 1 and 0 <= clock.sleeps[0] <= 0.1


def test_busy_server_is_not_retried_past_the_deadline() -> None:
    clock = FakeClock()
    call = Flaky(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "5000"))
    with pytest.raises(FakeRpcError):
        call_with_retry(call, RetryPolicy(), 2.0, sleep=clock.sleep, clock=clock)
    assert len(call.timeouts) == 1 and clock.sleeps == []  # waiting 5 s would pass the 2 s deadline


def test_malformed_pushback_is_a_refusal_as_grpc_reads_it() -> None:
    clock = FakeClock()
    call = Flaky(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, pushback_ms="soon"))
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


def test_async_client_leaves_retries_to_grpc_with_a_backoff_it_survives(flaky) -> None:  # type: ignore[no-untyped-def]
    servicer, address = flaky
    servicer.fail, servicer.calls = 2, 0
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)

    async def go() -> tuple[int, int]:
        async with AsyncSearchClient(address, retry=policy, timeout_s=10) as client:
            return (await client.index_info()).count, client._loop_retry.max_attempts

    count, loop_attempts = asyncio.run(go())
    assert count == 7 and servicer.calls == 3
    assert loop_attempts == 1  # gRPC's policy made the retries, not the loop


# -- gRPC's own retry policy, in the channel's service config ------------------------------


def _service_config(options: list[tuple[str, int | str]]) -> dict:  # type: ignore[type-arg]
    config = dict(options)["grpc.service_config"]
    assert isinstance(config, str)
    return json.loads(config)  # type: ignore[no-any-return]


def test_the_channel_carries_the_retry_policy_for_the_read_only_methods() -> None:
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.25, max_backoff_s=3.0, multiplier=1.5)
    options = channel_options("round_robin", policy)
    config = _service_config(options)
    (method_config,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert names == {
        ("esmsearch.v1.HomologSearch", m) for m in ("Search", "SearchByEmbedding", "Embed", "GetIndexInfo")
    }
    assert set(RETRIED_METHODS) == {m for _, m in names}  # never SearchStream nor ReloadIndex
    assert method_config["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.25s",
        "maxBackoff": "3s",
        "backoffMultiplier": 1.5,
        "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"],
    }
    assert dict(options)["grpc.enable_retries"] == 1
    assert int(dict(options)["grpc.per_rpc_retry_buffer_size"]) >= 16 << 20  # a 1,000-query Search fits
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]  # load balancing kept
    # gRPC caps maxAttempts at 5; one attempt means no retry policy at all.
    assert (
        _service_config(channel_options("pick_first", RetryPolicy(max_attempts=12)))["methodConfig"][0]["retryPolicy"][
            "maxAttempts"
        ]
        == 5
    )
    assert "methodConfig" not in _service_config(channel_options("pick_first", NO_RETRY))
    assert "methodConfig" not in _service_config(channel_options("pick_first"))


def test_the_loop_takes_only_what_grpc_cannot() -> None:
    assert RetryPolicy(max_attempts=4).loop_policy(in_channel=True).max_attempts == 1
    assert RetryPolicy(max_attempts=12).loop_policy(in_channel=True).max_attempts == 3  # 3 gRPC calls of <= 5
    assert RetryPolicy(max_attempts=4).loop_policy(in_channel=False).max_attempts == 4  # a caller's channel
    # gRPC's retries hang with ~1 ms backoffs (grpcio 1.85): such a policy stays in the loop, whole
    tiny = RetryPolicy(max_attempts=4, initial_backoff_s=0.001)
    assert tiny.grpc_retry_policy() is None and tiny.loop_policy(in_channel=True).max_attempts == 4


class BusyServicer(search_pb2_grpc.HomologSearchServicer):
    """GetIndexInfo: RESOURCE_EXHAUSTED with ``pushback`` for the first ``busy`` calls, then an answer."""

    def __init__(self) -> None:
        self.busy = 0
        self.pushback = "0"
        self.times: list[float] = []
        self.lock = threading.Lock()

    def GetIndexInfo(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        with self.lock:
            self.times.append(time.monotonic())
            busy = len(self.times) <= self.busy
        if busy:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", self.pushback),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy")
        return search_pb2.IndexInfo(count=len(self.times), index_version="v1")


@pytest.fixture()
def busy() -> Iterator[tuple[BusyServicer, str]]:
    servicer = BusyServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    search_pb2_grpc.add_HomologSearchServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_grpc_retries_a_busy_server_after_its_pushback(busy) -> None:  # type: ignore[no-untyped-def]
    servicer, address = busy
    servicer.busy, servicer.pushback = 2, "60"
    with SearchClient(address, retry=RetryPolicy(max_attempts=4), timeout_s=10) as client:
        assert client._loop_retry.max_attempts == 1  # the loop makes one call: gRPC retries inside it
        assert client.index_info().count == 3
    gaps = [b - a for a, b in zip(servicer.times, servicer.times[1:], strict=False)]
    assert len(gaps) == 2 and all(g >= 0.06 for g in gaps)  # waited the pushback, never less


def test_a_negative_pushback_is_never_retried(busy) -> None:  # type: ignore[no-untyped-def]
    servicer, address = busy
    servicer.busy, servicer.pushback = 10, "-1"
    with SearchClient(address, retry=RetryPolicy(max_attempts=5), timeout_s=10) as client:
        with pytest.raises(ResourceExhaustedError):
            client.index_info()
    assert len(servicer.times) == 1


def test_more_attempts_than_grpc_allows_come_from_the_loop(busy) -> None:  # type: ignore[no-untyped-def]
    servicer, address = busy
    servicer.busy, servicer.pushback = 6, "20"
    with SearchClient(address, retry=RetryPolicy(max_attempts=10), timeout_s=10) as client:
        assert client.index_info().count == 7  # 5 attempts by gRPC, then 2 more in the loop's 2nd call
    servicer.times.clear()
    with SearchClient(address, retry=RetryPolicy(max_attempts=5), timeout_s=10) as client:
        with pytest.raises(ResourceExhaustedError):
            client.index_info()
    assert len(servicer.times) == 5
