"""The served index, swappable while requests use it (reference-counted leases).

:class:`IndexSlot` holds the served :class:`~esmsearch.store.Index` and hands out
*leases* on it. A swap installs the new index for every request that starts
afterwards; the old one is closed only when the last request that leased it has
finished, so no request ever sees a closed index and each request's hits all come
from the one version it leased. Used by :class:`esmsearch.server.engine.SearchEngine`;
:class:`esmsearch.server.reload.IndexReloader` decides *when* to swap.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from esmsearch.store import Index

__all__ = ["IndexSlot"]


class _Entry:
    """One index and the number of requests currently using it."""

    __slots__ = ("closed", "index", "refs", "retired")

    def __init__(self, index: Index) -> None:
        self.index = index
        self.refs = 0
        self.retired = False
        self.closed = False


class IndexSlot:
    """The served index, swappable while requests use it (reference counted).

    Thread-safe. Requests use :meth:`lease`; :meth:`swap` installs a new index and
    closes the old one once no lease on it remains.

    Args:
        index: the initially served index.
    """

    def __init__(self, index: Index) -> None:
        self._lock = threading.Lock()
        self._entry = _Entry(index)

    @property
    def current(self) -> Index:
        """The index new requests get (do not use it across a swap; lease it)."""
        return self._entry.index

    def in_use(self) -> int:
        """Leases held on the current index (for tests and metrics)."""
        with self._lock:
            return self._entry.refs

    @contextlib.contextmanager
    def lease(self) -> Iterator[Index]:
        """Use the current index for one request; it stays open until the block ends."""
        with self._lock:
            entry = self._entry
            entry.refs += 1
        try:
            yield entry.index
        finally:
            self._release(entry)

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.refs -= 1
            close = entry.retired and entry.refs == 0 and not entry.closed
            if close:
                entry.closed = True
        if close:
            entry.index.close()

    def swap(self, index: Index) -> Index:
        """Serve ``index`` from now on; close the old index when its last lease ends.

        Returns:
            The index served before (closed already if no request was using it).
        """
        with self._lock:
            old = self._entry
            self._entry = _Entry(index)
            old.retired = True
            close = old.refs == 0 and not old.closed
            if close:
                old.closed = True
        if close:
            old.index.close()
        return old.index

    def close(self) -> None:
        """Retire the current index (closed now, or when its last lease ends)."""
        with self._lock:
            entry = self._entry
            entry.retired = True
            close = entry.refs == 0 and not entry.closed
            if close:
                entry.closed = True
        if close:
            entry.index.close()
