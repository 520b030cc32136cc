"""Stage ``publish`` of a build: publish the verified work directory, or discard a partial one.

Only these functions (and a fresh build of the same output) remove a build's work
directory; every failure before them keeps it for ``resume``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from esmsearch import fsutil
from esmsearch.errors import ConfigError
from esmsearch.indexer.journal import JOURNAL_FILE
from esmsearch.store import publish_directory
from esmsearch.versions import IndexRoot

__all__ = ["discard_partial", "partial_build_dir", "publish_standalone", "publish_version"]

log = logging.getLogger(__name__)


def partial_build_dir(out_dir: Path) -> Path:
    """Work directory of a standalone build of ``out_dir``: ``<parent>/.<name>.partial``.

    A build writes here and renames it to ``out_dir`` when complete; an interrupted
    build leaves it for ``resume``.
    """
    return out_dir.parent / f".{out_dir.name}.partial"


def _drop_journal(published: Path) -> None:
    """Remove the journal that travelled with the published directory (it is no index file)."""
    (published / JOURNAL_FILE).unlink(missing_ok=True)
    fsutil.fsync_dir(published)


def publish_standalone(work: Path, out: Path, *, overwrite: bool) -> Path:
    """Stage ``publish`` (standalone): move the verified work directory to ``out``.

    See :func:`esmsearch.store.publish_directory`: an existing index at ``out`` is
    swapped out atomically with ``overwrite``. On failure ``out`` holds a whole
    index (the old one, or the new one if only the final fsync failed), and the
    verified work directory is kept, so ``resume`` publishes it again. The journal
    is removed from the published directory afterwards.

    Returns:
        ``out``.

    Raises:
        FileExistsError, IndexFormatError, OSError: see ``publish_directory``.
    """
    publish_directory(work, out, overwrite=overwrite)
    _drop_journal(out)
    return out


def publish_version(index_root: IndexRoot, work: Path, version: str, *, keep_versions: int | None = None) -> Path:
    """Stage ``publish`` (versioned root): add ``versions/<version>``, swap ``current``, prune.

    Each step is atomic and durable (rename + fsync of the directory): ``current``
    names a whole version at every instant, the old one until the swap. If adding
    the version fails, the verified work directory is kept for ``resume``.

    Args:
        index_root: the root (its build lock held by the caller).
        work: the verified work directory.
        version: the new version's id (its manifest's ``version``).
        keep_versions: after the swap, delete all but the newest N versions (never
            the live one); None keeps all.

    Returns:
        The new version's directory.

    Raises:
        IndexFormatError: the version exists already.
        OSError: a rename or fsync failed (``current`` still names the old version
            unless only the fsync after its swap failed).
    """
    path = index_root.add_version(work, version)
    _drop_journal(path)
    index_root.set_current(version)
    if keep_versions is not None:
        deleted = index_root.prune(keep_versions)
        if deleted:
            log.info("retention (keep %d): deleted versions %s", keep_versions, ", ".join(deleted))
    return path


def discard_partial(
    *, out_dir: str | os.PathLike[str] | None = None, root: str | os.PathLike[str] | None = None
) -> Path | None:
    """Remove the partial build of a standalone ``out_dir`` or of a versioned ``root``.

    Give exactly one. For a root, its build lock is taken first, so a running
    build's work is never removed.

    Returns:
        The directory removed, or None if there was none.

    Raises:
        ConfigError: neither or both of ``out_dir`` and ``root``.
        BuildLockedError: a build of ``root`` is running.
        OSError: the directory cannot be removed.
    """
    if (out_dir is None) == (root is None):
        raise ConfigError("give exactly one of out_dir and root")
    if out_dir is not None:
        work = partial_build_dir(Path(out_dir))
        if not work.exists():
            return None
        shutil.rmtree(work)
        return work
    index_root = IndexRoot(Path(root))  # type: ignore[arg-type]
    if not index_root.path.exists():
        return None
    with index_root.lock():
        work = index_root.partial_dir
        if not work.exists():
            return None
        shutil.rmtree(work)
    return work
