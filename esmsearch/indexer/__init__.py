"""Index build pipeline: FASTA -> embeddings -> FAISS index directory or root version."""

from __future__ import annotations

from esmsearch.indexer.build import (
    BuildConfig,
    BuildResult,
    ReuseCounts,
    build_index,
    build_version,
    discard_partial,
    partial_build_dir,
    scan_fasta,
)

__all__ = [
    "BuildConfig",
    "BuildResult",
    "ReuseCounts",
    "build_index",
    "build_version",
    "discard_partial",
    "partial_build_dir",
    "scan_fasta",
]
