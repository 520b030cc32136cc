"""Replicas: one client target naming two servers, gRPC round_robin with client-side
health checks; one replica stopped mid-run (health NOT_SERVING first, then a graceful
stop) costs no request."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from esmsearch.client import SearchClient, UnavailableError
from esmsearch.client.channel import HEALTH_SERVICE_NAME, ClientCredentials, channel_options, service_config
from esmsearch.client.retry import NO_RETRY
from esmsearch.sequences import read_fasta
from esmsearch.server import SearchServer, ServerConfig, create_server
from esmsearch.server.app import SERVICE_NAME


def searches(server: SearchServer) -> float:
    value = server.metrics.registry.get_sample_value("esmsearch_requests_total", {"rpc": "Search"})
    return float(value or 0.0)


def test_service_config_asks_for_round_robin_with_health_checks_of_the_search_service() -> None:
    assert HEALTH_SERVICE_NAME == SERVICE_NAME  # the name the servers report health under
    config = json.loads(service_config())
    assert config == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "esmsearch.v1.HomologSearch"},
    }
    assert json.loads(service_config("pick_first")) == {"loadBalancingConfig": [{"pick_first": {}}]}
    assert ("grpc.service_config", service_config()) in channel_options()
    with pytest.raises(ValueError, match="lb_policy"):
        ClientCredentials(lb_policy="random")


def test_round_robin_over_two_replicas_one_stopped_mid_run_fails_no_request(
    small_index: Path, ecoli_fasta: Path
) -> None:
    records = list(read_fasta(ecoli_fasta))
    query = {"q": records[0].sequence}
    config = ServerConfig(index=small_index, port=0, device="cpu", max_workers=4, grace_s=10.0)
    first, port_a = create_server(config)
    second, port_b = create_server(config)
    failures: list[BaseException] = []
    answered: list[str] = []
    try:
        with SearchClient(f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}", timeout_s=60.0) as client:
            # Both replicas take requests.
            for _ in range(10):
                assert client.search(query, k=3)[0].hits[0].target_id == records[0].record_id
            assert searches(first) > 0 and searches(second) > 0
            assert searches(first) + searches(second) == 10

            # A client thread keeps searching while the first replica is stopped.
            running = threading.Event()
            stopped = threading.Event()

            def load() -> None:
                n_after_stop = 0
                while n_after_stop < 20:
                    after = stopped.is_set()
                    try:
                        result = client.search(query, k=3)[0]
                        answered.append(result.hits[0].target_id)
                    except BaseException as exc:  # noqa: BLE001 - every failure counts
                        failures.append(exc)
                    if len(answered) >= 5:
                        running.set()
                    n_after_stop += int(after)

            thread = threading.Thread(target=load)
            thread.start()
            assert running.wait(timeout=120)
            first.stop(grace_s=10.0)  # health NOT_SERVING, no new RPCs, in-flight ones finish
            before = searches(second)
            stopped.set()
            thread.join(timeout=300)
            assert not thread.is_alive()
            assert searches(second) - before >= 20  # after the stop, every request went to the second replica
    finally:
        first.stop(1.0)
        second.stop(1.0)
    assert failures == []
    assert answered and set(answered) == {records[0].record_id}


def test_a_replica_reporting_not_serving_gets_no_requests(small_index: Path, ecoli_fasta: Path) -> None:
    from grpc_health.v1 import health_pb2

    query = {"q": next(iter(read_fasta(ecoli_fasta))).sequence}
    config = ServerConfig(index=small_index, port=0, device="cpu", max_workers=4)
    first, port_a = create_server(config)
    second, port_b = create_server(config)
    try:
        # Still accepting RPCs, but reporting NOT_SERVING (as while draining or loading): a
        # health-checking client never marks its connection READY, so round_robin skips it.
        first.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        with SearchClient(f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}", timeout_s=60.0) as client:
            for _ in range(10):
                client.search(query, k=1)
        assert (searches(first), searches(second)) == (0, 10)
        # The replica itself still answers a client that does not check health ...
        unchecked = ClientCredentials(lb_policy="pick_first")
        with SearchClient(f"127.0.0.1:{port_a}", timeout_s=60.0, credentials=unchecked) as direct:
            direct.search(query, k=1)
        assert searches(first) == 1
        # ... while a health-checking client with only this replica has nowhere to go.
        with SearchClient(f"127.0.0.1:{port_a}", timeout_s=2.0, retry=NO_RETRY) as checked:
            with pytest.raises(UnavailableError):
                checked.search(query, k=1)
        assert searches(first) == 1
    finally:
        first.stop(1.0)
        second.stop(1.0)
