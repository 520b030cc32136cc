"""Distributed embedding on Ray Data: an actor pool embeds blocks, the driver assembles shards.

``esmsearch index build DB.fasta (-o DIR | --root ROOT) --distributed ray
[--ray-address ADDR] [--workers N] [--cpus-per-worker C] [--gpus-per-worker G]``
runs the same build pipeline as a single-process build
(:mod:`esmsearch.indexer.build`) with one stage swapped: the embed stage's model is a
:class:`RayBlockEmbedder` instead of an :class:`~esmsearch.embedding.Embedder` in
the driver process.

What runs where:

* **Driver** (the ``esmsearch index build`` process): validates the whole FASTA,
  plans rebuild reuse by sequence sha256 against the live version (so only new or
  changed sequences travel), streams the FASTA in chunks of ``chunk_residues``,
  sends each chunk's sequences that need the model as one block, and writes the
  returned vectors to shards, metadata and the build journal **in input order**,
  exactly as a single-process build does. A killed driver therefore resumes with
  ``--resume`` from its last journaled chunk; blocks that were in flight are
  embedded again.
* **Workers**: a Ray Data actor pool (``Dataset.map_batches`` with
  ``ActorPoolStrategy``), one :class:`EmbedActor` per worker, each holding one
  model (``num_gpus`` = ``gpus_per_worker`` on GPU nodes) with torch's thread
  count set from the CPUs Ray assigned to it. An actor embeds a block with the
  same :class:`~esmsearch.embedding.Embedder` code (length-sorted, token-budget
  packed batches, windows beyond 1,022 residues), so a distributed build equals a
  single-process one (same record ids and order; vectors within 1e-6, the
  difference of float summation order between batchings).
* **Faults**: an actor whose process dies is restarted by Ray and its block is
  retried (``max_restarts`` / ``max_task_retries`` = :attr:`DistributedConfig.max_retries`);
  a block that still fails raises :class:`~esmsearch.errors.DistributedError`, with
  the journaled chunks kept for ``--resume``.

Blocks are sent in *waves* of at most :attr:`DistributedConfig.wave_residues`
embedded residues or :attr:`DistributedConfig.wave_sequences` database sequences
(reused ones included), whichever comes first (one Ray dataset each), which bounds what the driver and the object store
hold at once; each wave starts its actor pool anew (one model load per worker per
wave).

Without an address (and without ``RAY_ADDRESS``) a local Ray instance is started
with this machine's CPUs and GPUs and shut down at the end; with one, the build
joins that cluster (``ray start --head`` on the head node, ``ray start
--address=HEAD:6379`` on each worker node; see ``docs/scaling.md``). A checkpoint
given as a path must exist at that path on every node (a shared filesystem);
pretrained names are downloaded by each worker. Every worker checks that its
model's checkpoint sha256, layer, precision and dimension equal the driver's.

Ray is an optional dependency (``pip install "esmsearch[ray]"``); this module
imports it only when a distributed build starts.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from esmsearch.errors import ConfigError, DistributedError, IndexMismatchError

if TYPE_CHECKING:
    from esmsearch.embedding import Embedder
    from esmsearch.indexer.blocks import EmbedBlock

__all__ = [
    "DEFAULT_WAVE_RESIDUES",
    "DistributedConfig",
    "EmbedActor",
    "RayBlockEmbedder",
    "driver_embedder",
]

log = logging.getLogger(__name__)

#: Residues per wave (one Ray dataset): 100M residues are ~100 MB of sequences in
#: the driver and object store, and at 20,000 residues/s per GPU (an order-of-magnitude
#: estimate for esm2_t33_650M, docs/scaling.md) 8 GPUs take ~10 minutes over them,
#: against ~10-30 s for each worker to load the model again at the next wave.
DEFAULT_WAVE_RESIDUES = 100_000_000
#: Database sequences per wave, reused ones included: the driver holds every record of
#: a wave's chunks (id, description, sequence, sha256: ~0.5 kB each at UniRef50's
#: mean length) until their shards are written, so a rebuild that reuses almost
#: everything (chunks with nothing to embed count no residues) must still send a
#: wave every 250,000 sequences (~125 MB of records), not hold the whole FASTA.
DEFAULT_WAVE_SEQUENCES = 250_000

#: Precisions a distributed build accepts: resolved, never ``auto`` (the driver's
#: device is not the workers').
_WORKER_PRECISIONS = ("fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class DistributedConfig:
    """Where and how a distributed build embeds; validates itself.

    Attributes:
        address: Ray cluster address (``ray://host:10001``, ``host:6379`` or
            ``auto``); ``None`` = ``RAY_ADDRESS`` if set, else a local Ray instance
            started for this build (or the one this process already initialised).
        workers: actors in the pool; ``None`` = as many as the cluster fits
            (GPUs / ``gpus_per_worker``, or CPUs / ``cpus_per_worker`` without GPUs).
        cpus_per_worker: CPUs Ray reserves per actor, >= 1; also the actor's torch
            thread count.
        gpus_per_worker: GPUs per actor (0 = embed on CPU; 1 = one GPU each;
            fractions share a GPU between actors).
        precision: compute precision on the workers: ``fp32``, ``bf16``, ``fp16``
            (CUDA only) or ``int8`` (CPU); recorded in the manifest. ``auto`` is not
            accepted: the driver cannot resolve it for the workers' devices.
        wave_residues: most residues sent in one wave (see the module docstring).
        wave_sequences: most database sequences (reused ones included,
            :attr:`EmbedBlock.rows`) in one wave: bounds the driver's memory when
            most vectors are reused.
        max_retries: restarts of a dead actor and retries of its block before the
            build fails (Ray's ``max_restarts`` / ``max_task_retries``).
        actor_cls: the actor class (:class:`EmbedActor` or a subclass; tests swap it).

    Raises:
        ConfigError: a value out of range.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    precision: str = "fp32"
    wave_residues: int = DEFAULT_WAVE_RESIDUES
    wave_sequences: int = DEFAULT_WAVE_SEQUENCES
    max_retries: int = 3
    actor_cls: type[EmbedActor] | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker < 1:
            raise ConfigError(f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.precision not in _WORKER_PRECISIONS:
            raise ConfigError(
                f"a distributed build needs an explicit precision ({', '.join(_WORKER_PRECISIONS)}), "
                f"got {self.precision!r}: 'auto' would be resolved on the driver, not on the workers"
            )
        if self.precision == "fp16" and self.gpus_per_worker == 0:
            raise ConfigError("precision 'fp16' runs on CUDA only: give --gpus-per-worker")
        if self.wave_residues < 1:
            raise ConfigError(f"wave_residues must be >= 1, got {self.wave_residues}")
        if self.wave_sequences < 1:
            raise ConfigError(f"wave_sequences must be >= 1, got {self.wave_sequences}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")

    @property
    def device(self) -> str:
        """The workers' device: ``cuda`` with GPUs, else ``cpu``."""
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


def driver_embedder(model: str, *, layer: int | None, toks_per_batch: int, config: DistributedConfig) -> Embedder:
    """The driver's copy of the model: loaded on the CPU for its settings only.

    The driver never embeds in a distributed build; it needs the model's dimension,
    checkpoint sha256, layer and name for the journal, rebuild reuse and the
    manifest. It is loaded at fp32 on the CPU (the driver may have no GPU) and then
    labelled with the workers' precision, which is what the vectors will have and
    what each worker checks (:class:`EmbedActor`).

    Raises:
        ModelLoadError: the model cannot be loaded on the driver.
        ConfigError: a bad layer or token budget.
    """
    from esmsearch.embedding import Embedder

    emb = Embedder(model, layer=layer, toks_per_batch=toks_per_batch, device="cpu", precision="fp32")
    emb.precision = config.precision  # the workers' precision; this copy never embeds
    return emb


class EmbedActor:
    """One Ray Data actor: one model, called with one block per batch.

    Args:
        model: pretrained name or ``.pt`` path (the same path on every node).
        layer, toks_per_batch, device, precision: as for :class:`~esmsearch.embedding.Embedder`.
        expected: the driver's ``Embedder.settings``; the actor refuses to start
            with a model that differs (another checkpoint under the same path...).

    Raises:
        IndexMismatchError: the worker's model differs from the driver's.
        ModelLoadError: the model cannot be loaded on this worker.
    """

    def __init__(
        self,
        model: str,
        layer: int,
        toks_per_batch: int,
        device: str,
        precision: str,
        expected: dict[str, Any],
    ) -> None:
        import ray
        import torch

        from esmsearch.embedding import Embedder

        assigned: dict[str, float] = ray.get_runtime_context().get_assigned_resources()  # type: ignore[no-untyped-call]
        cpus = assigned.get("CPU", 1.0)
        self.threads = max(1, int(cpus))
        torch.set_num_threads(self.threads)
        self.embedder = Embedder(model, layer=layer, toks_per_batch=toks_per_batch, device=device, precision=precision)
        diffs = {
            k: (v, self.embedder.settings.get(k)) for k, v in expected.items() if self.embedder.settings.get(k) != v
        }
        if diffs:
            raise IndexMismatchError(
                f"worker on {socket.gethostname()} loaded {model} with other settings than the driver: "
                + "; ".join(f"{k}: driver {a!r}, worker {b!r}" for k, (a, b) in diffs.items())
            )
        self.host = socket.gethostname()

    def embed_block(self, number: int, sequences: list[str]) -> np.ndarray:
        """Embed one block; a hook point for subclasses (tests kill the worker here).

        Returns:
            float32 ``[len(sequences), dim]``, L2-normalised, in input order.
        """
        return self.embedder.embed(sequences)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data batch (one or more blocks) -> their vectors, as float32 bytes."""
        out: dict[str, list[Any]] = {"number": [], "vectors": [], "rows": [], "seconds": [], "host": []}
        for number, joined in zip(batch["number"], batch["sequences"], strict=True):
            sequences = str(joined).split("\n")
            t0 = time.perf_counter()
            vectors = self.embed_block(int(number), sequences)
            out["seconds"].append(time.perf_counter() - t0)
            out["number"].append(int(number))
            out["vectors"].append(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
            out["rows"].append(len(sequences))
            out["host"].append(self.host)
        return {
            "number": np.asarray(out["number"], dtype=np.int64),
            "vectors": np.asarray(out["vectors"], dtype=object),
            "rows": np.asarray(out["rows"], dtype=np.int64),
            "seconds": np.asarray(out["seconds"], dtype=np.float64),
            "host": np.asarray(out["host"], dtype=object),
        }


class RayBlockEmbedder:
    """:class:`esmsearch.indexer.blocks.BlockEmbedder` on a Ray Data actor pool.

    Use as a context manager: entering connects to (or starts) Ray, leaving shuts
    down a Ray instance this object started (one it joined is left running).

    Args:
        config: cluster and pool settings.
        driver: the driver's model (:func:`driver_embedder`), whose settings the
            workers must reproduce.

    Attributes:
        workers: actors per wave (resolved from the cluster on entering).
        embed_seconds: wall seconds of the waves so far, from a wave's start to its
            last block (actor start, model loads and embedding; the driver's shard
            writes overlap with the workers' embedding).

    Raises:
        DistributedError: Ray is not installed, the cluster cannot be reached or
            cannot fit one worker, or a block failed after its retries.
    """

    def __init__(self, config: DistributedConfig, driver: Embedder) -> None:
        self.config = config
        self.driver = driver
        self.workers = 0
        self._seconds = 0.0
        self._started_ray = False
        self._waves = 0
        self._worker_seconds = 0.0
        self._hosts: set[str] = set()
        self._address = ""

    @property
    def embed_seconds(self) -> float:
        return self._seconds

    def __enter__(self) -> RayBlockEmbedder:
        try:
            import ray
        except ImportError as exc:
            raise DistributedError(
                'distributed builds need Ray Data: pip install "esmsearch[ray]" (or "ray[data]")'
            ) from exc
        address = self.config.address or os.environ.get("RAY_ADDRESS") or None
        if not ray.is_initialized():
            try:
                ray.init(
                    address=address,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    configure_logging=False,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise DistributedError(f"cannot start or join {where}: {exc}") from exc
            self._started_ray = True
        self._address = ray.get_runtime_context().gcs_address
        resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
        cfg = self.config
        if cfg.gpus_per_worker > 0:
            fits = int(gpus // cfg.gpus_per_worker)
            fits = min(fits, int(cpus // cfg.cpus_per_worker))
        else:
            fits = int(cpus // cfg.cpus_per_worker)
        self.workers = cfg.workers if cfg.workers is not None else fits
        if fits < 1 or self.workers > fits:
            self.close()
            raise DistributedError(
                f"the Ray cluster at {self._address} has {cpus:g} CPUs and {gpus:g} GPUs: it fits {fits} "
                f"workers of {cfg.cpus_per_worker} CPUs and {cfg.gpus_per_worker:g} GPUs, "
                f"{self.workers} requested"
            )
        log.info(
            "Ray cluster %s (%g CPUs, %g GPUs): %d workers x %d CPUs x %g GPUs, precision %s",
            self._address,
            cpus,
            gpus,
            self.workers,
            cfg.cpus_per_worker,
            cfg.gpus_per_worker,
            cfg.precision,
        )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Shut down the Ray instance this object started (idempotent)."""
        if self._started_ray:
            import ray

            self._started_ray = False
            ray.shutdown()

    def info(self) -> dict[str, Any]:
        """What the manifest's ``build.distributed`` records about this run."""
        cfg = self.config
        return {
            "backend": "ray",
            "ray_address": self._address,
            "workers": self.workers,
            "cpus_per_worker": cfg.cpus_per_worker,
            "gpus_per_worker": cfg.gpus_per_worker,
            "device": cfg.device,
            "precision": cfg.precision,
            "waves": self._waves,
            "worker_embed_seconds": round(self._worker_seconds, 3),
            "hosts": sorted(self._hosts),
        }

    def embed_blocks(
        self, blocks: Iterable[EmbedBlock], on_residues: Callable[[int], object] | None
    ) -> Iterator[tuple[EmbedBlock, np.ndarray]]:
        """Embed blocks on the actor pool, wave by wave; yield them in input order.

        Empty blocks (every vector reused) are not sent; they are yielded in their
        place with a ``[0, dim]`` array.

        Raises:
            DistributedError: a block failed after ``max_retries`` retries, or the
                cluster was lost.
        """
        if not self.workers:
            raise DistributedError("RayBlockEmbedder is not entered (use it as a context manager)")
        wave: list[EmbedBlock] = []
        residues = rows = 0
        for block in blocks:
            wave.append(block)
            residues += block.residues
            rows += max(block.rows, len(block.sequences))
            if residues >= self.config.wave_residues or rows >= self.config.wave_sequences:
                yield from self._run_wave(wave, on_residues)
                wave, residues, rows = [], 0, 0
        if wave:
            yield from self._run_wave(wave, on_residues)

    def _run_wave(
        self, wave: list[EmbedBlock], on_residues: Callable[[int], object] | None
    ) -> Iterator[tuple[EmbedBlock, np.ndarray]]:
        import ray
        import ray.data
        from ray.exceptions import RayError

        dim = self.driver.dim
        todo = [b for b in wave if b.sequences]
        results: Iterator[dict[str, Any]] = iter(())
        t0 = time.perf_counter()
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        if todo:
            self._waves += 1
            ctx.execution_options.preserve_order = True  # blocks come back in input order
            ctx.enable_progress_bars = False  # the build has its own, in residues/s
            cfg = self.config
            items = [{"number": b.number, "sequences": "\n".join(b.sequences)} for b in todo]
            with warnings.catch_warnings():
                # Ray 2.60 deprecates passing actor options such as max_restarts as keyword
                # arguments (removal announced for 2.64, hence the pin in pyproject.toml) and
                # offers no named parameter for them yet; without them a block that kills
                # its worker every time would be retried forever.
                warnings.filterwarnings("ignore", message=r".*ray_remote_args.* is deprecated")
                dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                    cfg.actor_cls or EmbedActor,
                    batch_size=1,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(
                        size=min(self.workers, len(items)), max_tasks_in_flight_per_actor=1
                    ),
                    fn_constructor_kwargs={
                        "model": self.driver.model_source,
                        "layer": self.driver.layer,
                        "toks_per_batch": self.driver.toks_per_batch,
                        "device": cfg.device,
                        "precision": cfg.precision,
                        "expected": self.driver.settings,
                    },
                    num_cpus=cfg.cpus_per_worker,
                    num_gpus=cfg.gpus_per_worker or None,
                    max_restarts=cfg.max_retries,
                    max_task_retries=cfg.max_retries,
                )
            results = iter(dataset.iter_rows())
        try:
            for block in wave:
                if not block.sequences:
                    yield block, np.empty((0, dim), dtype=np.float32)
                    continue
                try:
                    row = next(results)
                except StopIteration:
                    raise DistributedError(f"the Ray pipeline returned no vectors for block {block.number}") from None
                except RayError as exc:
                    raise DistributedError(
                        f"embedding on Ray failed (a worker died or raised after up to {self.config.max_retries} "
                        f"retries); blocks {block.number}..{wave[-1].number} of this wave are not journaled, "
                        f"--resume continues from the first of them: {exc}"
                    ) from exc
                if int(row["number"]) != block.number:
                    raise DistributedError(
                        f"the Ray pipeline returned block {int(row['number'])} where block {block.number} was due"
                    )
                vectors = np.frombuffer(row["vectors"], dtype=np.float32).reshape(int(row["rows"]), dim)
                self._worker_seconds += float(row["seconds"])
                self._hosts.add(str(row["host"]))
                if on_residues is not None:
                    on_residues(block.residues)
                yield block, vectors
        finally:
            self._seconds += time.perf_counter() - t0
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
