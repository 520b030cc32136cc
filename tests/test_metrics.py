"""Prometheus metrics over HTTP, and JSON-lines request logs."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from esmsearch.server import ServerConfig, create_server
from esmsearch.server.batcher import BatchingConfig
from esmsearch.server.logs import JsonLinesFormatter, use_log_format
from esmsearch.v1 import search_pb2, search_pb2_grpc

Q = search_pb2.Query


@pytest.fixture(scope="module")
def metrics_server(small_index: Path) -> Iterator[tuple[str, int]]:
    srv, port = create_server(
        ServerConfig(
            index=small_index,
            port=0,
            device="cpu",
            metrics_port=0,
            max_workers=4,
            batching=BatchingConfig(enabled=True),
        )
    )
    assert srv.metrics_port is not None
    try:
        yield f"127.0.0.1:{port}", srv.metrics_port
    finally:
        srv.stop(0)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_endpoint_counts_requests_errors_batches_and_stages(metrics_server) -> None:  # type: ignore[no-untyped-def]
    address, metrics_port = metrics_server
    with grpc.insecure_channel(address) as ch:
        stub = search_pb2_grpc.HomologSearchStub(ch)
        for qid in ("a", "b"):
            stub.Search(
                search_pb2.SearchRequest(queries=[Q(query_id=qid, sequence="MKTAYIAK")], k=2),
                timeout=30,
            )
        with pytest.raises(grpc.RpcError):
            stub.Search(search_pb2.SearchRequest(queries=[Q(query_id="a", sequence="MKV")], k=0), timeout=30)
        stub.Embed(search_pb2.EmbedRequest(queries=[Q(query_id="e", sequence="MKTAYIAKQR")]), timeout=30)
    m = _scrape(metrics_port)
    assert m[("esmsearch_requests_total", (("rpc", "Search"),))] == 3
    assert m[("esmsearch_requests_total", (("rpc", "Embed"),))] == 1
    assert m[("esmsearch_errors_total", (("code", "INVALID_ARGUMENT"), ("rpc", "Search")))] == 1
    assert ("esmsearch_errors_total", (("code", "OK"), ("rpc", "Search"))) not in m
    # the invalid request never reached the batcher: 3 batches (2 Search + 1 Embed)
    assert m[("esmsearch_batches_total", ())] == 3
    assert m[("esmsearch_batch_sequences_count", ())] == 3
    assert m[("esmsearch_batch_tokens_sum", ())] == 2 * (8 + 2) + (10 + 2)
    assert m[("esmsearch_queue_depth", ())] == 0
    for stage in ("queue", "embed", "search", "total"):
        assert m[("esmsearch_stage_seconds_count", (("rpc", "Search"), ("stage", stage)))] == 3
    total = m[("esmsearch_stage_seconds_sum", (("rpc", "Search"), ("stage", "total")))]
    embed = m[("esmsearch_stage_seconds_sum", (("rpc", "Search"), ("stage", "embed")))]
    assert total >= embed > 0


def test_metrics_http_is_off_by_default(small_index: Path) -> None:
    srv, _ = create_server(ServerConfig(index=small_index, port=0, device="cpu", max_workers=2))
    try:
        assert srv.metrics_port is None
    finally:
        srv.stop(0)


def test_json_lines_formatter_carries_the_request_fields(metrics_server, caplog) -> None:  # type: ignore[no-untyped-def]
    address, _ = metrics_server
    with caplog.at_level(logging.INFO, logger="esmsearch.server"):
        with grpc.insecure_channel(address) as ch:
            search_pb2_grpc.HomologSearchStub(ch).Search(
                search_pb2.SearchRequest(queries=[Q(query_id="j", sequence="MKTAYIAK")], k=3),
                timeout=30,
            )
    record = next(r for r in caplog.records if r.getMessage().startswith("rpc=Search"))
    doc = json.loads(JsonLinesFormatter().format(record))
    assert doc["rpc"] == "Search" and doc["code"] == "OK"
    assert doc["queries"] == 1 and doc["residues"] == 8 and doc["k"] == 3
    assert doc["level"] == "INFO" and doc["logger"] == "esmsearch.server"
    assert doc["total_ms"] >= doc["embed_ms"] >= 0
    assert doc["msg"].startswith("rpc=Search code=OK")


def test_use_log_format_installs_the_json_formatter() -> None:
    logger = logging.getLogger("esmsearch.test.json")
    use_log_format("json", logger)
    assert logger.handlers and all(isinstance(h.formatter, JsonLinesFormatter) for h in logger.handlers)
    with pytest.raises(ValueError, match="log format"):
        use_log_format("xml", logger)
