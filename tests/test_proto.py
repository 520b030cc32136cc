"""The API contract: committed generated code is fresh, and every field is documented."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[1]
PROTO = REPO / "proto" / "esmsearch" / "v1" / "search.proto"
GENERATED = ("search_pb2.py", "search_pb2.pyi", "search_pb2_grpc.py", "search_pb2_grpc.pyi")


def _load_gen_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_generated_code_is_fresh(tmp_path: Path) -> None:
    gen = _load_gen_script()
    written = gen.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(GENERATED)
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "esmsearch" / "v1" / name).read_bytes() != (REPO / "esmsearch" / "v1" / name).read_bytes()
    ]
    assert not stale, f"stale generated code {stale}: run `python scripts/gen_proto.py`"


def test_gen_script_refuses_unpinned_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _load_gen_script()
    monkeypatch.setitem(gen.PINNED, "grpcio-tools", "0.0.1")
    with pytest.raises(SystemExit, match="grpcio-tools"):
        gen.check_versions()


def _descriptor_with_comments(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "search.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={REPO / 'proto'}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            "esmsearch/v1/search.proto",
        ],
        check=True,
    )
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (fd,) = fds.file
    return fd


def test_every_field_message_and_rpc_has_a_comment(tmp_path: Path) -> None:
    fd = _descriptor_with_comments(tmp_path)
    comments = {
        tuple(loc.path): loc.leading_comments.strip()
        for loc in fd.source_code_info.location
        if loc.leading_comments.strip()
    }
    missing = []
    for mi, message in enumerate(fd.message_type):  # path 4 = message_type, 2 = field
        if (4, mi) not in comments:
            missing.append(message.name)
        for fi, fld in enumerate(message.field):
            if (4, mi, 2, fi) not in comments:
                missing.append(f"{message.name}.{fld.name}")
    for si, service in enumerate(fd.service):  # path 6 = service, 2 = method
        if (6, si) not in comments:
            missing.append(service.name)
        for ri, method in enumerate(service.method):
            if (6, si, 2, ri) not in comments:
                missing.append(f"{service.name}.{method.name}")
    assert not missing, f"undocumented in search.proto: {missing}"
    assert fd.package == "esmsearch.v1"
    assert {m.name for m in fd.service[0].method} >= {"Search", "GetIndexInfo"}


def test_generated_module_path_mirrors_package() -> None:
    from esmsearch.v1 import search_pb2, search_pb2_grpc

    assert search_pb2.DESCRIPTOR.name == "esmsearch/v1/search.proto"
    assert search_pb2.DESCRIPTOR.package == "esmsearch.v1"
    assert hasattr(search_pb2_grpc, "HomologSearchStub")
    response = search_pb2.SearchResponse.DESCRIPTOR
    assert "index_version" in response.fields_by_name
