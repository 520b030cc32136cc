"""Live reload of a versioned index root: swap versions between requests, never fail one.

:class:`IndexReloader` decides *when* to swap; :class:`esmsearch.server.slot.IndexSlot`
(inside the engine) does the swap with reference-counted leases.

The reloader watches ``ROOT/current`` (see :class:`esmsearch.versions.IndexRoot`) by
polling ``readlink`` every ``poll_s`` seconds, and on demand (SIGHUP, the ``ReloadIndex``
admin RPC). When ``current`` names a version other than the served one, it opens that
version with full verification (``Index.open(path, verify=True)``: checksums and row
counts), memory-mapped where FAISS allows it (so a reload does not hold two copies of a
large index in RAM), checks the version's model settings against the loaded model
(:meth:`esmsearch.embedding.Embedder.check_manifest`) and swaps it in. Any failure --
model mismatch, failed verification, a version deleted by retention while ``current``
briefly pointed at it -- leaves the serving version in place; the error is logged and
kept in :attr:`IndexReloader.last_error` (reported by ``GetIndexInfo.reload_error``).

This is the blue-green switch of collection aliases in Qdrant/Milvus, done with
a symlink: the indexer publishes by ``rename(2)`` of the link, the server follows.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from esmsearch.errors import EsmsearchError, IndexNotFoundError
from esmsearch.server.rpc import new_error_id, public_reason
from esmsearch.versions import IndexRoot

if TYPE_CHECKING:
    from esmsearch.server.engine import SearchEngine

__all__ = ["DEFAULT_RELOAD_POLL_S", "IndexReloader", "ReloadOutcome"]

log = logging.getLogger("esmsearch.server")

#: Seconds between two looks at ``ROOT/current`` (a readlink: cheap).
DEFAULT_RELOAD_POLL_S: Final = 5.0


@dataclass(frozen=True)
class ReloadOutcome:
    """What one reload attempt did (``ReloadIndexResponse`` in search.proto).

    Attributes:
        reloaded: a new version was swapped in.
        index_version: version served after the attempt.
        previous_version: version served before it (== ``index_version`` if not reloaded).
    """

    reloaded: bool
    index_version: str
    previous_version: str


class IndexReloader:
    """Follows ``ROOT/current`` of a versioned root and swaps new versions into an engine.

    Args:
        engine: the engine serving the root's versions (its index must be one of them).
        root: the versioned index root.
        poll_s: seconds between looks at ``current``; ``None`` = no polling (only
            :meth:`request` and :meth:`reload`).
        mmap: open new versions memory-mapped (as the engine's first version), so a
            reload adds page cache, not a second private copy of the index.

    Raises:
        ValueError: ``poll_s`` is not > 0.
    """

    def __init__(
        self,
        engine: SearchEngine,
        root: IndexRoot | str | os.PathLike[str],
        *,
        poll_s: float | None = DEFAULT_RELOAD_POLL_S,
        mmap: bool = True,
    ) -> None:
        if poll_s is not None and not poll_s > 0:
            raise ValueError(f"reload poll interval must be > 0 seconds or None, got {poll_s!r}")
        self.engine = engine
        self.root = root if isinstance(root, IndexRoot) else IndexRoot(root)
        self.poll_s = poll_s
        self.mmap = mmap
        self._lock = threading.Lock()  # one reload at a time
        self._served_dir = Path(engine.index.path).name
        # Target of the last failed attempt: polling does not retry it.
        self._failed_dir: str | None = None
        self._last_error = ""
        self._last_detail = ""  # the logged text behind _last_error
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def last_error(self) -> str:
        """Why the last attempt to load a new version failed; ``""`` if it did not
        (or ``current`` names the served version again). Safe to show clients: the
        version names, a reason by the error's class and an error id, never server
        paths; the server log has the full text under the same id."""
        return self._last_error

    def start(self) -> None:
        """Start the background thread (polling and :meth:`request` triggers)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="esmsearch-reload", daemon=True)
            self._thread.start()

    def request(self) -> None:
        """Ask the background thread to reload now (safe to call from a signal handler)."""
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the background thread, waiting up to ``timeout_s`` s for a load in progress."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            forced = self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.reload(force=forced)
            except EsmsearchError:
                pass  # logged and recorded in last_error; the served version stays
            except Exception:  # noqa: BLE001 - the watcher must never die
                log.exception("index reload of %s failed unexpectedly", self.root.path)

    def reload(self, *, force: bool = True) -> ReloadOutcome:
        """Load the version ``current`` names now, if it differs from the served one.

        Args:
            force: retry a version whose last load failed (polling passes ``False``
                so a refused version is not re-verified every ``poll_s``).

        Returns:
            :class:`ReloadOutcome`.

        Raises:
            IndexNotFoundError: ``current`` is missing or names a missing version.
            IndexFormatError: the new version failed verification.
            IndexMismatchError: the new version was built with other model settings.
            In every case the served version is unchanged and the error is in
            :attr:`last_error`.
        """
        from esmsearch.store import Index

        with self._lock:
            previous = self.engine.index.version
            try:
                target = self.root.current_version()
                if target is None:
                    raise IndexNotFoundError(f"{self.root.current_link} is missing")
            except EsmsearchError as exc:
                self._fail(None, exc)
                raise
            if target == self._served_dir:
                self._failed_dir = None
                self._last_error = self._last_detail = ""
                return ReloadOutcome(False, previous, previous)
            if target == self._failed_dir and not force:
                return ReloadOutcome(False, previous, previous)
            path = self.root.versions_dir / target
            try:
                index = Index.open(path, verify=True, mmap=self.mmap)
            except EsmsearchError as exc:
                self._fail(target, exc)
                raise
            except OSError as exc:  # e.g. files deleted under us by retention
                err = IndexNotFoundError(f"cannot open index version {path}: {exc}")
                self._fail(target, err)
                raise err from exc
            try:
                self.engine.swap_index(index)
            except BaseException as exc:
                index.close()
                if isinstance(exc, EsmsearchError):
                    self._fail(target, exc)
                raise
            self._served_dir = target
            self._failed_dir = None
            self._last_error = self._last_detail = ""
            log.info(
                "index reloaded: now serving version %s (%d sequences) from %s, was %s",
                index.version,
                index.count,
                path,
                previous,
            )
            return ReloadOutcome(True, index.version, previous)

    def _fail(self, target: str | None, exc: BaseException) -> None:
        # The log gets the full text (paths, the OS's and FAISS's messages); last_error,
        # which clients see, only a reason by the error's class and the log line's id.
        served = self.engine.index.version
        detail = f"not serving {target or 'current'} of {self.root.path}: {exc}; still serving {served}"
        if detail != self._last_detail:
            error_id = new_error_id()
            log.error("index reload refused (error_id=%s): %s", error_id, detail)
            self._last_detail = detail
            self._last_error = (
                f"not serving index version {target or 'current'!r}: {public_reason(exc)}; "
                f"still serving {served!r}; error id {error_id} (the server log has the details)"
            )
        self._failed_dir = target
