"""Index build pipeline: FASTA -> embeddings -> FAISS index directory."""

from __future__ import annotations

from esmsearch.indexer.build import BuildConfig, BuildResult, build_index, scan_fasta

__all__ = ["BuildConfig", "BuildResult", "build_index", "scan_fasta"]
