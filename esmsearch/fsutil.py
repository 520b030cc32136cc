"""Filesystem helpers for durable, atomic publication of index files and directories.

One home for what the indexer, the index store and versioned roots each need:

* :func:`file_sha256` -- the one checksum helper (files are hashed as stored).
* :func:`fsync_file`, :func:`fsync_dir` -- make a file's bytes, or a directory's
  entries (a rename into it), durable. POSIX makes a ``rename(2)`` atomic but not
  durable: until the directory holding the new name is fsynced, a power cut can
  bring the old name back.
* :func:`write_text_atomic`, :func:`open_text_atomic` -- write a file (whole, or
  streamed) beside its destination, fsync it, ``os.replace`` it into place and
  fsync the directory.
* :func:`exchange` -- swap two paths atomically with Linux's
  ``renameat2(RENAME_EXCHANGE)`` (glibc >= 2.28, Linux >= 3.15; ext4, xfs, btrfs,
  tmpfs; not every network or FUSE filesystem), so that a path holds the old or
  the new directory at every instant. Where the call or the filesystem does not
  support it, :class:`ExchangeNotSupportedError` is raised and the caller chooses
  a fallback.
* :func:`sqlite_uri` -- a properly percent-encoded SQLite ``file:`` URI, so paths
  containing ``?``, ``#`` or ``%`` open the file they name.

Stdlib only: :mod:`esmsearch.sequences` (imported by the client, which must not
need torch or faiss) uses :func:`file_sha256`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

__all__ = [
    "ExchangeNotSupportedError",
    "exchange",
    "file_sha256",
    "fsync_dir",
    "fsync_file",
    "open_text_atomic",
    "sqlite_uri",
    "write_text_atomic",
]

#: ``AT_FDCWD`` of Linux's ``<fcntl.h>``: resolve relative paths against the cwd.
_AT_FDCWD = -100
#: ``RENAME_EXCHANGE`` of Linux's ``<linux/fs.h>``: atomically swap the two paths.
_RENAME_EXCHANGE = 2
#: errno values meaning "this kernel, libc or filesystem cannot exchange": no
#: syscall (ENOSYS), flag unknown or unsupported by the filesystem (EINVAL,
#: EOPNOTSUPP/ENOTSUP).
_EXCHANGE_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
#: errno values of ``fsync`` on a directory meaning "this filesystem cannot sync
#: directories" (some FUSE and network filesystems); nothing more can be done there.
_FSYNC_DIR_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


class ExchangeNotSupportedError(OSError):
    """``renameat2(RENAME_EXCHANGE)`` is unavailable here (OS, libc or filesystem)."""


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, as stored (a gzip file hashes compressed).

    Args:
        path: the file.
        chunk_bytes: read size in bytes (memory bound; the digest does not depend on it).

    Raises:
        FileNotFoundError, PermissionError, OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data and metadata to stable storage.

    Raises:
        OSError: the file cannot be opened or the fsync fails (an I/O error: the
            data may not be on disk, so the caller must not publish it).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of a directory durable (after a rename, create or unlink in it).

    A filesystem that cannot fsync directories (EINVAL/ENOTSUP from some FUSE and
    network filesystems) is skipped silently: nothing stronger is available there.

    Raises:
        OSError: the directory cannot be opened, or the fsync fails with an I/O error.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_DIR_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically and durably.

    Writes ``<path>.tmp``, fsyncs it, renames it over ``path`` and fsyncs the
    directory: a reader (or a crash) sees the old content or the new, never a mix.

    Raises:
        OSError: a write, fsync or rename fails (the temporary file is removed).
    """
    with open_text_atomic(path) as stream:
        stream.write(text)


@contextlib.contextmanager
def open_text_atomic(path: str | os.PathLike[str]) -> Iterator[TextIO]:
    """A UTF-8 text stream that replaces ``path`` atomically and durably when the block ends.

    What is written goes to ``<path>.tmp`` beside it; when the ``with`` block exits
    normally the file is flushed, fsynced, renamed over ``path`` and the directory
    fsynced. When the block raises (an error, ``KeyboardInterrupt``), the temporary
    file is removed and ``path`` is left as it was: a failed search never leaves a
    half-written output file behind.

    Raises:
        OSError: the temporary file cannot be created, or a write, fsync or rename
            fails (the temporary file is removed).
    """
    dest = Path(path)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as stream:
            yield stream
        fsync_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    func = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if func is None:
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return]


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
    """Atomically swap two existing paths (files or directories) on one filesystem.

    Uses glibc's ``renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)``: at every
    instant each path names one of the two objects, whole. Does not fsync; call
    :func:`fsync_dir` on the parent afterwards for durability.

    Raises:
        ExchangeNotSupportedError: not Linux, a libc without ``renameat2``, or a
            kernel/filesystem that rejects ``RENAME_EXCHANGE`` (errno ENOSYS,
            EINVAL, EOPNOTSUPP); nothing was changed.
        OSError: any other failure (e.g. ENOENT if a path is missing, EXDEV across
            filesystems); nothing was changed.
    """
    func = _renameat2()
    if func is None:
        raise ExchangeNotSupportedError(
            errno.ENOSYS, f"renameat2(RENAME_EXCHANGE) is not available on this system ({sys.platform})"
        )
    rc = func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        cls = ExchangeNotSupportedError if err in _EXCHANGE_UNSUPPORTED else OSError
        raise cls(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", os.fspath(a), None, os.fspath(b))


def sqlite_uri(path: str | os.PathLike[str], *, mode: str = "ro") -> str:
    """SQLite ``file:`` URI of ``path`` opened with ``mode`` (``ro``, ``rw``, ``rwc``).

    The absolute path is percent-encoded (``?`` -> ``%3F``, ``#`` -> ``%23``,
    ``%`` -> ``%25``, space -> ``%20``, non-ASCII as UTF-8 bytes), which SQLite
    decodes back (https://www.sqlite.org/uri.html), so the URI names exactly
    ``path``; pass it with ``sqlite3.connect(uri, uri=True)``.
    """
    return Path(path).resolve().as_uri() + f"?mode={mode}"
