"""SCOPe remote-homology sensitivity: the benchmark measure of Foldseek and Progres.

Definition (implemented exactly as written here)
------------------------------------------------

Every domain carries a SCOPe ``sccs`` label ``class.fold.superfamily.family``
(e.g. ``a.1.1.1``). For one query domain ``q`` and one *labelled* target domain
``t`` the relation is, from the most to the least specific:

* **family** true positive: same family (``a.1.1.1`` == ``a.1.1.1``), ``t != q``;
* **superfamily** true positive: same superfamily, another family;
* **fold** true positive: same fold (``class.fold``), another superfamily;
* **false positive**: another fold (hence also any other class);

so each target is a true positive at exactly one level or a false positive. At a
given level, true positives of the *other* levels are ignored (neither counted
nor a false positive): at fold level, for example, a same-family hit above the
first other-fold hit changes nothing.

Sensitivity of query ``q`` at level ``L``::

    sens_L(q) = |{TP_L hits of q ranked above q's first false positive}| / |TP_L(q)|

where ``TP_L(q)`` is the set of *all* labelled database domains that are level-``L``
true positives of ``q`` (whether the tool reported them or not), and "ranked
above" means a strictly better score than the best-scoring false positive
(ties with the first false positive are resolved against the tool: a true
positive with the same score as the first false positive is not counted). A
query with no false positive among its hits gets every reported true positive
counted. The sensitivity at level ``L`` is the mean of ``sens_L(q)`` over the
queries with ``|TP_L(q)| >= 1``; a query with at least one true positive in the
database but no hits at all scores 0 (it is never dropped).

Hits are one row per (query, target) pair with a score whose direction is given
(``higher_is_better``: cosine, bit score; or lower: E-value). Repeated rows for
one (query, target) pair, as BLAST writes for several HSPs, are merged keeping
the best score. Hits to targets without a SCOPe label (e.g. the 50 unlabelled
``g*`` domains of the Progres SCOPe 2.08 FASTA) are skipped: they neither count
nor stop the ranking.

The query's own hit (``t == q``) has two conventions, chosen with
:class:`SelfHit`:

* :attr:`SelfHit.EXCLUDE` (Foldseek; van Kempen M et al. "Fast and accurate
  protein structure search with Foldseek", Nat Biotechnol, published online 2023,
  42:243-246 (2024)): the self hit is dropped from the hits and the query is not
  in its own family total.
* :attr:`SelfHit.COUNT` (Progres; Greener JG, Jamali K (2025) "Fast protein
  structure searching using structure graph embeddings", Bioinformatics
  Advances): when the query is itself a database domain, it is
  one of its own family true positives, in the family total, and counted when the
  tool reports it above the first false positive. This raises family-level
  numbers (a family of one then scores 1.0 if the self hit is found); superfamily
  and fold numbers are identical under both conventions.

Cumulative sensitivity curves (:func:`cumulative_curve`) follow Foldseek's
Fig. 2: the per-query sensitivities of one level sorted from high to low, plotted
as sensitivity (y) against the fraction of queries (x) that reach it.

Public API: :func:`parse_sccs`, :func:`read_sid_sccs`,
:func:`read_astral_fasta_labels`, :func:`read_hits_tsv`, :func:`merge_hits`,
:func:`evaluate`, :func:`cumulative_curve`, :class:`Hit`, :class:`SelfHit`,
:class:`ScopLabel`, :class:`SensitivityResult`, :data:`LEVELS`.
"""

from __future__ import annotations

import csv
import enum
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from esmsearch.errors import EsmsearchError

__all__ = [
    "LEVELS",
    "Hit",
    "HitsFormatError",
    "ScopLabel",
    "ScopLabelError",
    "SelfHit",
    "SensitivityResult",
    "cumulative_curve",
    "evaluate",
    "merge_hits",
    "parse_sccs",
    "read_astral_fasta_labels",
    "read_hits_tsv",
    "read_sid_sccs",
]

#: The three SCOPe levels evaluated, most specific first.
LEVELS: tuple[str, str, str] = ("family", "superfamily", "fold")


class ScopLabelError(EsmsearchError, ValueError):
    """A SCOPe sccs label or a label file is malformed, or a query has no label."""


class HitsFormatError(EsmsearchError, ValueError):
    """A hits TSV file cannot be parsed (missing column, non-numeric score)."""


class SelfHit(enum.Enum):
    """How the query's own hit is treated (see the module docstring)."""

    #: Foldseek convention: self hit dropped, query not in its own family total.
    EXCLUDE = "exclude"
    #: Progres convention: self hit is a family true positive and in the family total.
    COUNT = "count"


@dataclass(frozen=True)
class ScopLabel:
    """A parsed SCOPe ``sccs`` label such as ``a.1.1.1``.

    Attributes:
        fold: ``class.fold``, e.g. ``"a.1"``.
        superfamily: ``class.fold.superfamily``, e.g. ``"a.1.1"``.
        family: the full ``sccs``, e.g. ``"a.1.1.1"``.
    """

    fold: str
    superfamily: str
    family: str


def parse_sccs(sccs: str) -> ScopLabel:
    """Parse a SCOPe ``sccs`` string ``class.fold.superfamily.family``.

    Args:
        sccs: e.g. ``"b.82.2.13"``.

    Returns:
        The label with its fold, superfamily and family keys.

    Raises:
        ScopLabelError: if ``sccs`` does not have four non-empty dot-separated parts.
    """
    parts = sccs.strip().split(".")
    if len(parts) != 4 or not all(parts):
        raise ScopLabelError(f"not a SCOPe sccs (class.fold.superfamily.family): {sccs!r}")
    return ScopLabel(fold=".".join(parts[:2]), superfamily=".".join(parts[:3]), family=".".join(parts))


def read_sid_sccs(path: str | os.PathLike[str]) -> dict[str, ScopLabel]:
    """Read a ``sid sccs`` label file (whitespace separated, one domain a line).

    This is the format of Progres's ``search_all_scope2.08_sid_sccs.txt`` and
    ``test_unseen_sid.txt`` and of Foldseek's ``scop_lookup.fix.tsv``.

    Args:
        path: the label file; blank lines and ``#`` comments are skipped.

    Returns:
        sid -> label, in file order.

    Raises:
        ScopLabelError: on a line without two fields, a bad sccs or a repeated sid.
    """
    labels: dict[str, ScopLabel] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) < 2:
                raise ScopLabelError(f"{path}:{line_no}: expected 'sid sccs', got {line!r}")
            sid, sccs = fields[0], fields[1]
            if sid in labels:
                raise ScopLabelError(f"{path}:{line_no}: domain {sid!r} listed twice")
            try:
                labels[sid] = parse_sccs(sccs)
            except ScopLabelError as exc:
                raise ScopLabelError(f"{path}:{line_no}: {exc}") from exc
    return labels


def read_astral_fasta_labels(path: str | os.PathLike[str]) -> dict[str, ScopLabel]:
    """Read the labels from ASTRAL FASTA headers ``>sid sccs (chain) description``.

    Args:
        path: an ASTRAL ``astral-scopedom-seqres-gd-sel-gs-bib-*.fa`` file.

    Returns:
        sid -> label, in file order.

    Raises:
        ScopLabelError: on a header without an sccs or a repeated sid.
    """
    labels: dict[str, ScopLabel] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.startswith(">"):
                continue
            fields = line[1:].split()
            if len(fields) < 2:
                raise ScopLabelError(f"{path}:{line_no}: header without sccs: {line!r}")
            if fields[0] in labels:
                raise ScopLabelError(f"{path}:{line_no}: domain {fields[0]!r} listed twice")
            try:
                labels[fields[0]] = parse_sccs(fields[1])
            except ScopLabelError as exc:
                raise ScopLabelError(f"{path}:{line_no}: {exc}") from exc
    return labels


@dataclass(frozen=True)
class Hit:
    """One reported (query, target) pair.

    Attributes:
        query: query domain id.
        target: target domain id.
        score: the tool's score; its direction is given separately
            (``higher_is_better``), e.g. cosine (higher) or E-value (lower).
    """

    query: str
    target: str
    score: float


def read_hits_tsv(
    path: str | os.PathLike[str],
    *,
    query_column: int | str = 0,
    target_column: int | str = 1,
    score_column: int | str = 2,
    header: bool = False,
) -> list[Hit]:
    """Read hits from a tab-separated file.

    Columns are 0-based indices, or names when ``header`` is true. Examples:
    BLAST/MMseqs2 ``-outfmt 6`` / ``m8`` E-value: ``query_column=0,
    target_column=1, score_column=10``; ``esmsearch search --format tsv``:
    ``header=True, query_column="query_id", target_column="target_id",
    score_column="cosine_score"``. Lines starting with ``#`` are skipped.

    Args:
        path: the TSV file.
        query_column: column of the query id.
        target_column: column of the target id.
        score_column: column of the score (parsed as float).
        header: whether the first non-comment line holds column names.

    Returns:
        The hits in file order (repeated pairs are kept; see :func:`merge_hits`).

    Raises:
        HitsFormatError: on a missing named column, a short row or a non-numeric score.
    """
    hits: list[Hit] = []
    with open(path, encoding="utf-8", newline="") as handle:
        rows = (row for row in csv.reader(handle, delimiter="\t") if row and not row[0].startswith("#"))
        columns = [query_column, target_column, score_column]
        if header:
            names = next(rows, None)
            if names is None:
                return hits
            try:
                indices = [c if isinstance(c, int) else names.index(c) for c in columns]
            except ValueError as exc:
                raise HitsFormatError(f"{path}: column missing from header {names}: {exc}") from exc
        else:
            if not all(isinstance(c, int) for c in columns):
                raise HitsFormatError("named columns need header=True")
            indices = [int(c) for c in columns]
        q_i, t_i, s_i = indices
        for row_no, row in enumerate(rows, start=1):
            try:
                hits.append(Hit(row[q_i], row[t_i], float(row[s_i])))
            except (IndexError, ValueError) as exc:
                raise HitsFormatError(f"{path}: data row {row_no} unusable: {row!r}") from exc
    return hits


def merge_hits(hits: Iterable[Hit], *, higher_is_better: bool) -> dict[str, dict[str, float]]:
    """Merge repeated (query, target) rows, keeping the best score.

    Args:
        hits: hits in any order; NaN scores are rejected.
        higher_is_better: score direction (True for cosine/bit score, False for E-value).

    Returns:
        query -> target -> best score.

    Raises:
        HitsFormatError: if a score is NaN.
    """
    merged: dict[str, dict[str, float]] = {}
    for hit in hits:
        if math.isnan(hit.score):
            raise HitsFormatError(f"NaN score for ({hit.query}, {hit.target})")
        per_query = merged.setdefault(hit.query, {})
        old = per_query.get(hit.target)
        if old is None or (hit.score > old if higher_is_better else hit.score < old):
            per_query[hit.target] = hit.score
    return merged


@dataclass(frozen=True)
class SensitivityResult:
    """Sensitivities of one tool's hits.

    Attributes:
        self_hit: the self-hit convention used.
        per_query: level -> query -> sensitivity in [0, 1], only for queries with
            at least one true positive at that level.
        n_true_positives: level -> query -> size of the query's true-positive set
            at that level (0 for queries excluded from that level).
    """

    self_hit: SelfHit
    per_query: Mapping[str, Mapping[str, float]]
    n_true_positives: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def mean(self, level: str) -> float:
        """Mean sensitivity at ``level`` over the queries with >= 1 true positive.

        Returns:
            The mean in [0, 1], or NaN when no query has a true positive at ``level``.
        """
        values = list(self.per_query[level].values())
        return float(np.mean(values)) if values else float("nan")

    def n_queries(self, level: str) -> int:
        """Number of queries that enter the mean at ``level``."""
        return len(self.per_query[level])


def _level_of(query: ScopLabel, target: ScopLabel) -> str | None:
    """Level at which ``target`` is a true positive of ``query``; None for a false positive."""
    if query.family == target.family:
        return "family"
    if query.superfamily == target.superfamily:
        return "superfamily"
    if query.fold == target.fold:
        return "fold"
    return None


def evaluate(
    hits: Iterable[Hit] | Mapping[str, Mapping[str, float]],
    *,
    queries: Sequence[str],
    labels: Mapping[str, ScopLabel],
    database: Iterable[str] | None = None,
    higher_is_better: bool,
    self_hit: SelfHit,
) -> SensitivityResult:
    """Per-query and mean sensitivity at family, superfamily and fold level.

    See the module docstring for the exact definition.

    Args:
        hits: the tool's hits as :class:`Hit` rows (merged here) or already merged
            ``query -> target -> score``. Hits of queries not in ``queries`` are ignored.
        queries: the query domain ids evaluated; every one needs a label. A query
            with no hits still counts (sensitivity 0 where it has true positives).
        labels: sid -> label for at least every query and every labelled database
            domain; targets missing from it are skipped.
        database: the ids of the searched database; true-positive totals count
            only labelled domains in it. Default: every domain in ``labels``.
        higher_is_better: score direction.
        self_hit: the self-hit convention.

    Returns:
        The per-query sensitivities and true-positive totals of each level.

    Raises:
        ScopLabelError: if a query has no label.
        HitsFormatError: if a score is NaN.
    """
    merged = hits if isinstance(hits, Mapping) else merge_hits(hits, higher_is_better=higher_is_better)
    db_ids = list(labels) if database is None else [d for d in database if d in labels]
    # Count database domains per family / superfamily / fold once.
    fam_count: dict[str, int] = {}
    sf_count: dict[str, int] = {}
    fold_count: dict[str, int] = {}
    for sid in dict.fromkeys(db_ids):
        lab = labels[sid]
        fam_count[lab.family] = fam_count.get(lab.family, 0) + 1
        sf_count[lab.superfamily] = sf_count.get(lab.superfamily, 0) + 1
        fold_count[lab.fold] = fold_count.get(lab.fold, 0) + 1
    db_set = set(db_ids)

    per_query: dict[str, dict[str, float]] = {level: {} for level in LEVELS}
    totals: dict[str, dict[str, int]] = {level: {} for level in LEVELS}
    for query in dict.fromkeys(queries):
        if query not in labels:
            raise ScopLabelError(f"query {query!r} has no SCOPe label")
        qlab = labels[query]
        in_db = query in db_set
        n_fam = fam_count.get(qlab.family, 0)
        n_sf = sf_count.get(qlab.superfamily, 0)
        n_fold = fold_count.get(qlab.fold, 0)
        n_tp = {
            # The query's own family count includes itself when it is in the database.
            "family": n_fam - (1 if in_db and self_hit is SelfHit.EXCLUDE else 0),
            "superfamily": n_sf - n_fam,
            "fold": n_fold - n_sf,
        }
        found = {level: 0 for level in LEVELS}
        targets = merged.get(query, {})
        ranked = sorted(
            ((score, target) for target, score in targets.items() if target in db_set),
            key=lambda st: st[0],
            reverse=higher_is_better,
        )
        first_fp: float | None = None
        for score, target in ranked:
            if target == query and self_hit is SelfHit.EXCLUDE:
                continue
            if _level_of(qlab, labels[target]) is None:
                first_fp = score
                break
        for score, target in ranked:
            if target == query and self_hit is SelfHit.EXCLUDE:
                continue
            level = _level_of(qlab, labels[target])
            if level is None:
                continue
            if first_fp is None or (score > first_fp if higher_is_better else score < first_fp):
                found[level] += 1
        for level in LEVELS:
            totals[level][query] = n_tp[level]
            if n_tp[level] > 0:
                per_query[level][query] = found[level] / n_tp[level]
    return SensitivityResult(self_hit=self_hit, per_query=per_query, n_true_positives=totals)


def cumulative_curve(values: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    """Foldseek-style cumulative sensitivity curve of per-query sensitivities.

    Source: van Kempen et al. (2023) Nat Biotechnol 42:243, Fig. 2 (each query's
    sensitivity up to the first false positive, queries sorted by it).

    Args:
        values: per-query sensitivities of one level, each in [0, 1].

    Returns:
        ``(fraction, sensitivity)``: two float64 ``[n]`` arrays. ``sensitivity``
        holds the values sorted from high to low; ``fraction[i] = (i + 1) / n``, so
        at least a fraction ``fraction[i]`` of the queries reaches
        ``sensitivity[i]``. Drawn as a step curve (each value over a width ``1 / n``
        ending at ``fraction[i]``), the area under it is the mean sensitivity.
        Empty input gives two empty arrays.
    """
    sens = np.sort(np.asarray(list(values), dtype=np.float64))[::-1]
    n = sens.size
    fraction = np.arange(1, n + 1, dtype=np.float64) / max(n, 1)
    return fraction, sens
