"""esmsearch: protein remote-homology search with ESM-2 embeddings and FAISS."""

from __future__ import annotations

__version__ = "0.1.0"
