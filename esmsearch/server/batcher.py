"""The model scheduler: every request that needs the model goes through here, batched or not.

In the manner of Triton Inference Server's dynamic batcher: a request is *admitted*
first (:class:`esmsearch.server.admission.Admission`: bounded queries in flight and
queued residues; a full server answers :class:`~esmsearch.errors.ServerBusyError`
with a retry-after estimate), then enqueued with its (already validated) sequences,
its deadline and a future. One scheduler thread takes the oldest live request and,
when batching is on, keeps gathering queued requests until the batch reaches its
token budget (``max_batch_toks``, counted as fair-esm counts them: residues + BOS +
EOS per sequence) or until ``max_wait_ms`` has passed since that first request was
taken; with batching off, every request is its own batch. Right before the forward
pass, the deadline and cancellation of every request of the batch are checked again
and dead ones are dropped (:class:`~esmsearch.errors.RequestExpiredError`), so no
model time goes to callers that have left. One :meth:`SearchEngine.embed` call
embeds the batch and one FAISS search serves all of its searching requests, at the
largest ``k`` among them (one search of the batch's query matrix costs less than one
per distinct ``k``: for exact search the query x database product dominates and ``k``
only sizes the heaps). From there on each request gets only its own ``k`` columns:
its hits, metadata and E-values (:meth:`esmsearch.store.Index.evalues`, fitted per
query, so splitting the batch by request changes no value) are built for its first
``k`` columns alone, and its future gets its own rows.

SearchByEmbedding needs no model: :meth:`DynamicBatcher.search_vectors` admits it
through the same :class:`~esmsearch.server.admission.Admission` and searches in the
caller's thread, so every RPC that does work counts against the same bounds.

So there is one bounded admission path whether batching is on or off; "off" only
means "never merge".

Isolation: every request is validated before it is enqueued, so a batch only holds
valid sequences. Should the batched forward still fail, each request of the batch is
retried alone, so only the request at fault gets the error.

Requests arriving while a forward pass runs wait in the queue and form the next
batch, so a loaded server batches even with ``max_wait_ms=0``. The scheduler waits
``max_wait_ms`` for more only while other queries are admitted; a lone request (the
only one in flight) starts its forward pass at once.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from esmsearch.errors import ConfigError, EvaluesUnavailableError, RequestExpiredError, ServerClosingError
from esmsearch.server.admission import Admission, Ticket
from esmsearch.server.engine import EngineResult, HitList, SearchEngine, hits_from_scores

if TYPE_CHECKING:
    from esmsearch.server.metrics import ServerMetrics
    from esmsearch.store import Index

__all__ = [
    "DEFAULT_MAX_BATCH_TOKS",
    "DEFAULT_MAX_WAIT_MS",
    "BatchingConfig",
    "DynamicBatcher",
    "hits_from_scores",
]

#: Default longest wait, in ms, for more requests once a batch has its first one.
DEFAULT_MAX_WAIT_MS: Final = 2.0
#: Default token budget of one batch (residues + 2 per sequence), as fair-esm's
#: ``extract.py --toks_per_batch`` counts them.
DEFAULT_MAX_BATCH_TOKS: Final = 4096


@dataclass(frozen=True)
class BatchingConfig:
    """Settings of the dynamic batcher.

    Attributes:
        enabled: ``True`` (default) merges concurrent requests into one packed
            forward pass, ``False`` runs each request as its own batch (same queue,
            same admission bounds). On by default on every device: with packed
            (unpadded) batches it measured no slower than off on a 2-core CPU at 1, 8
            and 32 clients (1.07x, 1.11x, 1.18x the requests/s of off;
            ``benchmarks/serve_load.py``, docs/performance.md).
        max_wait_ms: longest wait in ms for more requests after the first one of a
            batch was taken, >= 0; only while other queries are admitted (a lone
            request never waits).
        max_batch_toks: token budget of one batch (sum over its sequences of
            residues + 2), >= 1; a single request larger than this still forms a
            batch of its own. The merged sequences are packed end to end (no
            padding), so a batch costs what its real tokens cost.

    Raises:
        ConfigError: a value is out of range.
    """

    enabled: bool = True
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    max_batch_toks: int = DEFAULT_MAX_BATCH_TOKS

    def __post_init__(self) -> None:
        if not (self.max_wait_ms >= 0 and np.isfinite(self.max_wait_ms)):
            raise ConfigError(f"max_wait_ms must be a finite number >= 0, got {self.max_wait_ms!r}")
        value = self.max_batch_toks
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"max_batch_toks must be an integer >= 1, got {value!r}")


@dataclass
class _Request:
    sequences: list[str]
    k: int | None  # None: embed only (Embed RPC)
    min_score: float | None
    is_active: Callable[[], bool]
    deadline: float | None  # time.monotonic() after which nobody waits for the answer
    ticket: Ticket
    future: Future[Any]
    enqueued_at: float = field(default_factory=time.perf_counter)
    max_evalue: float | None = None
    evalue_db_size: int | None = None  # None: the engine's default (SearchEngine.evalue_db_size_for)

    @property
    def toks(self) -> int:
        return sum(len(s) + 2 for s in self.sequences)

    def expired(self, now: float) -> bool:
        return (self.deadline is not None and now >= self.deadline) or not self.is_active()


def _always_active() -> bool:
    return True


class DynamicBatcher:
    """The scheduler thread that embeds (and searches) every model request, batched or not.

    Args:
        engine: the engine whose :meth:`SearchEngine.embed` and current index are used
            (read per batch, so an index swap applies from the next batch on).
        config: batching settings (``enabled=False``: one request per batch).
        admission: the bounds on admitted work (default: :class:`Admission` with its
            default :class:`~esmsearch.server.admission.AdmissionConfig`).
        metrics: optional metrics sink (queue depth, work in flight, batch sizes).
        on_batch: optional hook called in the scheduler thread after each batch with
            ``(n_requests, n_sequences, n_tokens)`` (tests count batches with it).
        on_enqueue: optional hook called after each request is queued, with the
            queue depth (tests wait for it instead of sleeping).

    Thread-safe: :meth:`search` and :meth:`embed` may be called from any number of
    gRPC worker threads.
    """

    def __init__(
        self,
        engine: SearchEngine,
        config: BatchingConfig | None = None,
        *,
        admission: Admission | None = None,
        metrics: ServerMetrics | None = None,
        on_batch: Callable[[int, int, int], None] | None = None,
        on_enqueue: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.config = config or BatchingConfig()
        self.admission = admission or Admission()
        self.metrics = metrics
        self.on_batch = on_batch
        self.on_enqueue = on_enqueue
        self._merge = bool(self.config.enabled)
        # Unbounded: Admission bounds what can be queued.
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._closed = threading.Event()
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="esmsearch-batcher", daemon=True)
        self._thread.start()

    @property
    def merges(self) -> bool:
        """Whether concurrent requests are merged into one forward pass."""
        return self._merge

    # -- producer side ---------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the scheduler now."""
        return self._queue.qsize()

    def _publish_load(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())
            self.metrics.queries_in_flight.set(self.admission.queries_in_flight)
            self.metrics.queued_residues.set(self.admission.queued_residues)

    def _submit(
        self,
        sequences: Sequence[str],
        k: int | None,
        min_score: float | None,
        is_active: Callable[[], bool] | None,
        timeout_s: float | None,
        max_evalue: float | None = None,
        evalue_db_size: int | None = None,
    ) -> Future[Any]:
        seqs = list(sequences)
        if self._closed.is_set():
            raise ServerClosingError("the server is shutting down")
        hits = 0 if k is None else len(seqs) * k
        ticket = self.admission.admit(len(seqs), sum(len(s) for s in seqs), hits)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        future: Future[Any] = Future()
        request = _Request(
            seqs,
            k,
            min_score,
            is_active or _always_active,
            deadline,
            ticket,
            future,
            max_evalue=max_evalue,
            evalue_db_size=evalue_db_size,
        )
        with self._submit_lock:
            if self._closed.is_set():
                self._release(ticket)
                raise ServerClosingError("the server is shutting down")
            # Released exactly once, however the request ends (answer, error, drop, close).
            future.add_done_callback(lambda _f: self._release(ticket))
            self._queue.put_nowait(request)
        depth = self._queue.qsize()
        self._publish_load()
        if self.on_enqueue is not None:
            self.on_enqueue(depth)
        return future

    def _release(self, ticket: Ticket) -> None:
        self.admission.release(ticket)
        self._publish_load()

    def _wait(self, future: Future[Any], timeout_s: float | None) -> object:
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError as exc:  # not the builtin TimeoutError before 3.11
            raise RequestExpiredError("deadline passed while waiting for the model") from exc

    def search(
        self,
        sequences: Sequence[str],
        k: int,
        min_score: float | None = None,
        *,
        max_evalue: float | None = None,
        is_active: Callable[[], bool] | None = None,
        timeout_s: float | None = None,
        evalue_db_size: int | None = None,
    ) -> EngineResult:
        """Embed and search validated ``sequences`` as part of a batch; block for the answer.

        Args:
            sequences: validated residue strings (one request's queries).
            k: hits per query, >= 1.
            min_score: drop hits with cosine score below this; ``None`` keeps all.
            max_evalue: drop hits with E-value above this, >= 0; ``None`` keeps all.
            is_active: returns ``False`` once the caller has gone away (gRPC
                ``context.is_active``); such a request is dropped before embedding.
            timeout_s: the caller's remaining deadline in seconds (``None`` = none):
                the longest wait, and past it the request is dropped before embedding.
            evalue_db_size: database size this request's E-values are scaled to, >= 1;
                ``None``: :meth:`SearchEngine.evalue_db_size_for`. Each request of a
                batch gets its own.

        Returns:
            An :class:`EngineResult` (hits in input order, the index version, and the
            request's queue/embed/search seconds; embed and search are the whole
            batch's times).

        Raises:
            ServerBusyError: admission is full now (``retry_after_s`` says when to retry).
            RequestTooLargeError: the request alone exceeds an admission bound.
            RequestExpiredError: the caller went away or ``timeout_s`` passed first.
            ServerClosingError: the scheduler was closed before the request ran.
            EvaluesUnavailableError: ``max_evalue`` given but the index version the
                batch ran on has no decoys.
        """
        future = self.submit_search(
            sequences,
            k,
            min_score,
            max_evalue=max_evalue,
            is_active=is_active,
            timeout_s=timeout_s,
            evalue_db_size=evalue_db_size,
        )
        result = self._wait(future, timeout_s)
        assert isinstance(result, EngineResult)
        return result

    def submit_search(
        self,
        sequences: Sequence[str],
        k: int,
        min_score: float | None = None,
        *,
        max_evalue: float | None = None,
        is_active: Callable[[], bool] | None = None,
        timeout_s: float | None = None,
        evalue_db_size: int | None = None,
    ) -> Future[Any]:
        """Queue a search without waiting: the future resolves to an :class:`EngineResult`.

        Raises:
            ServerBusyError, RequestTooLargeError, ServerClosingError: the request was not queued.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return self._submit(sequences, k, min_score, is_active, timeout_s, max_evalue, evalue_db_size)

    def submit_embed(
        self,
        sequences: Sequence[str],
        *,
        is_active: Callable[[], bool] | None = None,
        timeout_s: float | None = None,
    ) -> Future[Any]:
        """Queue an embedding without waiting: the future resolves as :meth:`embed` returns.

        Raises:
            ServerBusyError, RequestTooLargeError, ServerClosingError: the request was not queued.
        """
        return self._submit(sequences, None, None, is_active, timeout_s)

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int,
        min_score: float | None = None,
        *,
        max_evalue: float | None = None,
        index: Index | None = None,
        evalue_db_size: int | None = None,
    ) -> list[HitList]:
        """Search validated query vectors in the caller's thread, admitted like every request.

        No model work, so no queue: the request is admitted (``len(vectors)`` queries,
        no residues, ``len(vectors) * k`` hits), searched with
        :meth:`SearchEngine.search_vectors`, and released.

        Args:
            vectors: float32 ``[q, dim]``, L2-normalised.
            k: hits per query, >= 1.
            min_score: drop hits with cosine score below this; ``None`` keeps all.
            max_evalue: drop hits with E-value above this, >= 0; ``None`` keeps all.
            index: the (leased) index version to search; default the current one.
            evalue_db_size: database size the E-values are scaled to, >= 1; ``None``:
                :meth:`SearchEngine.evalue_db_size_for`.

        Returns:
            One list of hits per query, by descending cosine score.

        Raises:
            Reject: INVALID_ARGUMENT: more hits asked for than the admission allows.
            ServerBusyError: admission is full now (``retry_after_s`` says when to retry).
            RequestTooLargeError: the request alone exceeds an admission bound.
            ServerClosingError: the scheduler is closed.
            EvaluesUnavailableError: ``max_evalue`` given for an index without decoys.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._closed.is_set():
            raise ServerClosingError("the server is shutting down")
        n = int(vectors.shape[0])
        ticket = self.admission.admit(n, 0, n * k)
        self._publish_load()
        try:
            return self.engine.search_vectors(
                vectors, k, min_score, max_evalue=max_evalue, index=index, evalue_db_size=evalue_db_size
            )
        finally:
            self._release(ticket)

    def embed(
        self,
        sequences: Sequence[str],
        *,
        is_active: Callable[[], bool] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[np.ndarray, str, float, float]:
        """Embed validated ``sequences`` as part of a batch.

        Returns:
            ``(vectors, index_version, queue_s, embed_s)``: float32 ``[n, dim]``
            L2-normalised, in input order; the version of the index served when the
            batch ran; seconds queued; seconds of the batch's forward pass.

        Raises:
            ServerBusyError, RequestTooLargeError, RequestExpiredError, ServerClosingError:
                as :meth:`search`.
        """
        future = self.submit_embed(sequences, is_active=is_active, timeout_s=timeout_s)
        result = self._wait(future, timeout_s)
        assert isinstance(result, tuple)
        return result

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the thread after the current batch; queued requests fail with ServerClosingError."""
        with self._submit_lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._queue.put_nowait(None)  # wake the thread
        self._thread.join(timeout_s)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and not item.future.done():
                item.future.set_exception(ServerClosingError("the server is shutting down"))

    # -- scheduler thread ------------------------------------------------------------

    def _drop(self, request: _Request) -> None:
        if not request.future.done():
            request.future.set_exception(
                RequestExpiredError("the caller went away (deadline passed or call cancelled) before embedding")
            )
        if self.metrics is not None:
            self.metrics.dropped.inc()

    def _take_live(self, block_s: float | None) -> _Request | None:
        """Next queued request whose caller is still there, or ``None`` on timeout/close."""
        deadline = None if block_s is None else time.monotonic() + block_s
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if remaining is None:
                    item = self._queue.get()
                elif remaining == 0.0:
                    item = self._queue.get_nowait()
                else:
                    item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return None
            if item is None:
                return None
            if item.expired(time.monotonic()):
                self._drop(item)
                continue
            return item

    def _run(self) -> None:
        cfg = self.config
        carry: _Request | None = None
        while not self._closed.is_set():
            first = carry if carry is not None else self._take_live(None)
            carry = None
            if first is None:
                continue
            batch, toks, queries = [first], first.toks, len(first.sequences)
            wait_until = time.monotonic() + cfg.max_wait_ms / 1e3
            while self._merge and toks < cfg.max_batch_toks and not self._closed.is_set():
                # Wait for more only while other queries are admitted (queued or about to
                # be): when the batch holds every query in flight, waiting cannot fill it
                # and would only add max_wait_ms to a lone caller's latency.
                alone = self.admission.queries_in_flight <= queries
                nxt = self._take_live(0.0 if alone else max(0.0, wait_until - time.monotonic()))
                if nxt is None:
                    break
                if toks + nxt.toks > cfg.max_batch_toks:
                    carry = nxt  # starts the next batch
                    break
                batch.append(nxt)
                toks += nxt.toks
                queries += len(nxt.sequences)
            self._publish_load()
            self._run_batch(batch)
        if carry is not None and not carry.future.done():
            carry.future.set_exception(ServerClosingError("the server is shutting down"))

    def _run_batch(self, batch: list[_Request]) -> None:
        # The last look before model time is spent: drop callers that left meanwhile.
        now = time.monotonic()
        live = []
        for request in batch:
            if request.expired(now):
                self._drop(request)
            else:
                live.append(request)
        if not live:
            return
        started = time.perf_counter()
        try:
            self._answer(live, started)
        except Exception as exc:
            if len(live) == 1:
                if not live[0].future.done():
                    live[0].future.set_exception(exc)
                return
            # Isolate the fault: run each request alone.
            for request in live:
                try:
                    self._answer([request], started)
                except Exception as exc:
                    if not request.future.done():
                        request.future.set_exception(exc)

    def _answer(self, batch: list[_Request], started: float) -> None:
        # One index version for the whole batch; lease it so that a live swap
        # does not close it under us.
        with self.engine.lease_index() as index:
            self._answer_with(batch, started, index)

    def _answer_with(self, batch: list[_Request], started: float, index: Index) -> None:
        sequences = [s for r in batch for s in r.sequences]
        vectors, lock_s, embed_s = self.engine.embed(sequences)
        self.admission.observe_rate(sum(len(s) for s in sequences), embed_s)
        searching = [i for i, r in enumerate(batch) if r.k is not None]
        offsets = np.cumsum([0] + [len(r.sequences) for r in batch])
        search_s = 0.0
        hits_of: dict[int, list[HitList]] = {}
        failed: dict[int, Exception] = {}
        if searching:
            t0 = time.perf_counter()
            # One FAISS search for the batch at its largest k (see the module docstring) ...
            k_max = max(int(batch[i].k or 1) for i in searching)
            k_eff = max(1, min(k_max, index.count))
            sel = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in searching])
            queries = np.ascontiguousarray(vectors[sel])
            scores, rows = index.search(queries, k_eff)
            at = 0
            for i in searching:
                n = len(batch[i].sequences)
                req = batch[i]
                # ... then hits, metadata and E-values of this request's own k columns only.
                k_own = max(1, min(int(req.k or 1), k_eff))
                own_scores, own_rows = scores[at : at + n, :k_own], rows[at : at + n, :k_own]
                try:
                    db_size = self.engine.evalue_db_size_for(req.evalue_db_size, index)
                    evalues = index.evalues(queries[at : at + n], own_scores, db_size) if index.has_evalues else None
                    hits_of[i] = hits_from_scores(
                        index,
                        own_scores,
                        own_rows,
                        k_own,
                        req.min_score,
                        evalues=evalues,
                        max_evalue=req.max_evalue,
                    )
                except EvaluesUnavailableError as exc:  # this request alone: the version has no decoys
                    failed[i] = exc
                at += n
            search_s = time.perf_counter() - t0
        n_toks = sum(r.toks for r in batch)
        if self.metrics is not None:
            self.metrics.observe_batch(len(sequences), n_toks, embed_s, search_s)
        if self.on_batch is not None:
            self.on_batch(len(batch), len(sequences), n_toks)
        for i, req in enumerate(batch):
            queue_s = started - req.enqueued_at + lock_s
            if req.future.done():
                continue
            if i in failed:
                req.future.set_exception(failed[i])
            elif req.k is None:
                req.future.set_result((vectors[offsets[i] : offsets[i + 1]], index.version, queue_s, embed_s))
            else:
                req.future.set_result(EngineResult(hits_of[i], index.version, queue_s, embed_s, search_s))
