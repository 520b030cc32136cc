#!/usr/bin/env python
"""Regenerate the committed gRPC/protobuf Python code from ``proto/``.

Usage::

    python scripts/gen_proto.py            # rewrite esmsearch/v1/*_pb2*.py[i]
    python scripts/gen_proto.py --out DIR  # write into DIR/esmsearch/v1/ instead

Generator versions are pinned (below) because generated code embeds them: the
``*_pb2.py`` files check the protobuf runtime version and ``*_pb2_grpc.py`` checks
the grpcio version at import time. Running with other versions is refused, so the
committed files only change when the pins here are bumped on purpose.

Outputs (from ``proto/esmsearch/v1/search.proto``):

* ``search_pb2.py`` (protoc, via grpcio-tools), ``search_pb2_grpc.py`` (grpcio-tools);
* ``search_pb2.pyi``, ``search_pb2_grpc.pyi`` (mypy-protobuf, as qdrant-client does).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import metadata, resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"
PROTO_FILES = ("esmsearch/v1/search.proto",)

#: Pinned generator versions (the ones the committed code was generated with).
PINNED = {"grpcio-tools": "1.85.1", "mypy-protobuf": "5.1.0"}


def check_versions() -> None:
    """Raise SystemExit if an installed generator differs from :data:`PINNED`."""
    for dist, want in PINNED.items():
        have = metadata.version(dist)
        if have != want:
            raise SystemExit(
                f"gen_proto: {dist}=={have} installed but {want} is pinned; "
                f"install {dist}=={want} (or bump PINNED on purpose)"
            )


def _plugin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"gen_proto: protoc plugin {name} not found (pip install mypy-protobuf)")
    return found


def generate(out_root: Path) -> list[Path]:
    """Generate the Python code under ``out_root`` (package layout kept).

    Returns:
        The generated files, sorted.

    Raises:
        SystemExit: pinned versions differ or protoc fails.
    """
    check_versions()
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *PROTO_FILES,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"gen_proto: protoc failed with exit status {rc}")
    return sorted(p for f in PROTO_FILES for p in (out_root / f).parent.glob("*_pb2*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="output root (default: repo root)")
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
