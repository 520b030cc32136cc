"""The client library imports and works without torch, faiss or fair-esm."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKER = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = ("torch", "faiss", "esm")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name} (client must not need it)")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_blocker_really_blocks() -> None:
    for module in ("torch", "faiss", "esm.pretrained"):
        proc = _run(f"import {module}\n")
        assert proc.returncode != 0
        assert f"blocked import of {module.split('.')[0]}" in proc.stderr


def test_client_imports_and_searches_without_torch_or_faiss(server: tuple[str, Path]) -> None:
    address, _ = server
    proc = _run(
        f"""
        import io
        from esmsearch.client import SearchClient, write_tsv
        with SearchClient({address!r}, timeout_s=60) as client:
            info = client.index_info()
            results = client.search({{"q": "MKTAYIAKQRQISFVKSHFSRQ"}}, k=3)
        out = io.StringIO()
        write_tsv(results, out)
        print(info.count, len(results[0].hits), len(out.getvalue().splitlines()))
        assert not any(m in sys.modules for m in ("torch", "faiss", "esm"))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["40", "3", "4"]
