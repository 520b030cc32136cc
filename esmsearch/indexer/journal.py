"""The journal of a build in progress: which stages finished, and what they produced.

A build runs the stages of :class:`Stage` in order. Each stage writes its outputs
into the work directory, makes them durable (fsync), and only then is recorded
here with the size and sha256 of each output (:class:`FileDigest`); the journal
itself is replaced atomically and durably after every change
(:func:`esmsearch.fsutil.write_text_atomic`). Nothing a later stage reads is
deleted before that later stage is recorded (the database shards go once
``assemble`` is, the trained FAISS index once ``add`` is), so ``--resume`` walks
the stages and starts at the first one not recorded, after checking that the
recorded outputs still on disk have the recorded checksums. This is the pattern of
MMseqs2's workflow scripts (``data/workflow/*.sh`` in soedinglab/MMseqs2: every
step guarded by the existence of its output, the marker written last).

The journal separates the settings the stored vectors depend on
(:attr:`JournalState.settings`: FASTA checksum, model contract, chunking, store
dtype, decoys) from those only the FAISS stages depend on
(:attr:`JournalState.faiss`: factory and search parameters). A resume whose
vector settings differ is refused; one whose FAISS settings differ keeps every
vector and redoes the FAISS stages (:meth:`BuildJournal.forget_from`).

The file is one JSON object (``build-state.json``)::

    {"schema": 1, "settings": {...}, "faiss": {...},
     "shards": 3, "rows": 40, "reused": 0, "embedded": 40, "reused_residues": 0,
     "windowed": 0, "shard_chain": "<hex>", "decoy_shards": 2, "decoy_chain": "<hex>",
     "stages": {"validate": {"outputs": {}, "info": {...}, "seconds": 0.1}, ...}}

where the counters describe the chunks of the database (and decoys) finished so
far, and ``*_chain`` is :func:`chain_digest` over their shard files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from esmsearch import fsutil
from esmsearch.errors import ConfigError

__all__ = [
    "JOURNAL_FILE",
    "SCHEMA_VERSION",
    "BuildJournal",
    "FileDigest",
    "JournalState",
    "Stage",
    "StageRecord",
    "chain_digest",
]

log = logging.getLogger(__name__)

#: The journal's file name, inside the work directory.
JOURNAL_FILE = "build-state.json"
#: Version of the journal's JSON layout; a journal of another version cannot be resumed.
SCHEMA_VERSION = 1


class Stage(StrEnum):
    """The stages of a build, in the order they run (the journal's keys)."""

    VALIDATE = "validate"
    """The FASTA, model and factory checked (nothing written)."""
    EMBED = "embed"
    """Database vectors in ``shards/shard-NNNNNN.npy`` and their metadata rows."""
    DECOYS = "decoys"
    """``decoys.npy`` and the extreme-value shape (nothing written without decoys)."""
    ASSEMBLE = "assemble"
    """``embeddings.npy`` from the shards (which are deleted once this is recorded)."""
    TRAIN = "train"
    """The trained, empty FAISS index in ``trained.faiss`` (nothing for Flat/HNSW)."""
    ADD = "add"
    """``index.faiss`` (and ``index.ivfdata``) with every vector added."""
    VERIFY = "verify"
    """``manifest.json`` written last and the whole directory checked."""
    PUBLISH = "publish"
    """The work directory renamed into place (the journal goes with it)."""

    @property
    def position(self) -> int:
        """0-based place in the pipeline."""
        return list(Stage).index(self)


#: The stages that only depend on :attr:`JournalState.faiss` and the vectors.
FAISS_STAGES = (Stage.TRAIN, Stage.ADD, Stage.VERIFY)


@dataclass(frozen=True)
class FileDigest:
    """Size and sha256 of one output.

    Attributes:
        size: bytes (for a set of shards: their total).
        sha256: hex sha256 of the file (for a set of shards: :func:`chain_digest`).
    """

    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> FileDigest:
        """The digest of the file at ``path`` (raises OSError if unreadable)."""
        return cls(path.stat().st_size, fsutil.file_sha256(path))

    @classmethod
    def of_files(cls, paths: Iterable[Path]) -> FileDigest:
        """The digest of files read in order: total size and :func:`chain_digest`."""
        chain = ""
        size = 0
        for path in paths:
            chain = chain_digest(chain, fsutil.file_sha256(path))
            size += path.stat().st_size
        return cls(size, chain)


def chain_digest(chain: str, file_sha256: str) -> str:
    """Extend a running digest over files in order: ``sha256(chain + file_sha256)`` (hex).

    Lets the journal carry one constant-size checksum of any number of shards,
    updated as each one is written; the empty string starts a chain.
    """
    return hashlib.sha256((chain + file_sha256).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class StageRecord:
    """A finished stage.

    Attributes:
        outputs: work-directory relative name -> digest of what the stage produced.
        info: stage facts a later stage or the manifest needs (counts, shape, ...).
        seconds: wall time of the stage in the run that finished it.
    """

    outputs: dict[str, FileDigest] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "outputs": {k: dataclasses.asdict(v) for k, v in self.outputs.items()},
            "info": self.info,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageRecord:
        outputs = {k: FileDigest(int(v["size"]), str(v["sha256"])) for k, v in data.get("outputs", {}).items()}
        return cls(outputs, dict(data.get("info", {})), float(data.get("seconds", 0.0)))


@dataclass
class JournalState:
    """What the journal holds (see the module docstring for its JSON).

    Attributes:
        settings: what the stored vectors depend on; a resume must match them.
        faiss: FAISS factory and search parameters; a resume that differs redoes
            the FAISS stages only.
        shards: database chunks finished (= shard files ``shard-000000`` ... kept).
        rows: metadata rows of those chunks.
        reused: rows copied from the previous version so far.
        embedded: rows embedded by the model so far (all runs).
        reused_residues: residues of the reused rows.
        windowed: sequences embedded in windows so far (all runs).
        shard_chain: :func:`chain_digest` over the finished shards.
        decoy_shards: decoy chunks finished.
        decoy_chain: :func:`chain_digest` over the finished decoy shards.
        stages: finished stages.
    """

    settings: dict[str, Any]
    faiss: dict[str, Any]
    shards: int = 0
    rows: int = 0
    reused: int = 0
    embedded: int = 0
    reused_residues: int = 0
    windowed: int = 0
    shard_chain: str = ""
    decoy_shards: int = 0
    decoy_chain: str = ""
    stages: dict[Stage, StageRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "stages"}
        data["schema"] = SCHEMA_VERSION
        data["stages"] = {stage.value: record.to_json() for stage, record in self.stages.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JournalState:
        """Parse the JSON object.

        Raises:
            ValueError: another schema version, or a malformed field.
        """
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"journal schema {data.get('schema')!r}, this esmsearch writes {SCHEMA_VERSION}")
        try:
            state = cls(settings=dict(data["settings"]), faiss=dict(data["faiss"]))
            for f in dataclasses.fields(cls):
                if f.name in ("settings", "faiss", "stages"):
                    continue
                if f.name in data:
                    setattr(state, f.name, type(getattr(state, f.name))(data[f.name]))
            state.stages = {Stage(k): StageRecord.from_json(v) for k, v in data.get("stages", {}).items()}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed journal: {exc!r}") from exc
        return state


class BuildJournal:
    """The journal file of one work directory, and its state once started or loaded.

    Every change is written at once, atomically and durably, so the file never
    names a stage or chunk whose outputs a crash could lose (the caller makes the
    outputs durable first).

    Attributes:
        path: ``<work>/build-state.json``.
        state: None until :meth:`start` or :meth:`load`.
        resumed: whether :meth:`load` read an earlier run's journal.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state: JournalState | None = None
        self.resumed = False

    @property
    def current(self) -> JournalState:
        """The state (raises ConfigError before :meth:`start` or :meth:`load`)."""
        if self.state is None:
            raise ConfigError(f"the build journal {self.path} was neither started nor loaded")
        return self.state

    def start(self, settings: dict[str, Any], faiss: dict[str, Any]) -> None:
        """Begin a fresh journal and write it (raises OSError on failure)."""
        self.state = JournalState(settings=settings, faiss=faiss)
        self.resumed = False
        self.save()

    def load(self) -> None:
        """Read the journal.

        Raises:
            ConfigError: it is missing, unreadable or of another schema (the partial
                build cannot be resumed).
        """
        try:
            self.state = JournalState.from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot resume: {self.path} is missing or unreadable ({exc}); remove {self.path.parent} "
                "(or pass --discard)"
            ) from exc
        self.resumed = True

    def save(self) -> None:
        """Write the journal atomically and durably (raises OSError on failure)."""
        fsutil.write_text_atomic(self.path, json.dumps(self.current.to_json(), sort_keys=True))

    def done(self, stage: Stage) -> bool:
        """Whether ``stage`` is recorded as finished."""
        return self.state is not None and stage in self.state.stages

    def record(self, stage: Stage, record: StageRecord) -> None:
        """Record ``stage`` as finished (its outputs already durable) and save.

        Raises:
            ConfigError: an earlier stage is not recorded (stages finish in order).
        """
        state = self.current
        missing = [s.value for s in Stage if s.position < stage.position and s not in state.stages]
        if missing:
            raise ConfigError(f"stage {stage.value} finished before {', '.join(missing)}")
        state.stages[stage] = record
        self.save()

    def forget_from(self, stage: Stage) -> list[Stage]:
        """Unrecord ``stage`` and every later one, and save; returns those unrecorded.

        Forgetting :attr:`Stage.EMBED` also resets the chunk counters (every chunk
        is redone), and :attr:`Stage.DECOYS` the decoy counters.
        """
        state = self.current
        dropped = [s for s in Stage if s.position >= stage.position and s in state.stages]
        for s in dropped:
            del state.stages[s]
        if stage.position <= Stage.EMBED.position:
            state.shards = state.rows = state.reused = state.embedded = state.reused_residues = state.windowed = 0
            state.shard_chain = ""
        if stage.position <= Stage.DECOYS.position:
            state.decoy_shards = 0
            state.decoy_chain = ""
        self.save()
        return dropped

    def info(self, stage: Stage) -> dict[str, Any]:
        """The ``info`` of a recorded stage (raises KeyError if it is not recorded)."""
        return self.current.stages[stage].info
