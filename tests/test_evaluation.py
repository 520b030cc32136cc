"""Tests of the SCOPe sensitivity measure on hand-made cases with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from esmsearch.evaluation import (
    LEVELS,
    Hit,
    HitsFormatError,
    ScopLabelError,
    SelfHit,
    cumulative_curve,
    evaluate,
    merge_hits,
    parse_sccs,
    read_astral_fasta_labels,
    read_hits_tsv,
    read_sid_sccs,
)

# A small labelled database. Relations to query "q" (a.1.1.1):
#   f1, f2: same family                      -> family TPs (2, or 3 with q itself)
#   s1, s2: same superfamily, other family   -> superfamily TPs (2)
#   d1:     same fold, other superfamily     -> fold TP (1)
#   x1:     other class                      -> FP
#   x2:     same class, other fold           -> FP
#   lone:   the only domain of fold c.9      -> no TP at any level (except itself)
SCCS = {
    "q": "a.1.1.1",
    "f1": "a.1.1.1",
    "f2": "a.1.1.1",
    "s1": "a.1.1.2",
    "s2": "a.1.1.3",
    "d1": "a.1.2.1",
    "x1": "b.1.1.1",
    "x2": "a.2.1.1",
    "lone": "c.9.1.1",
}
LABELS = {sid: parse_sccs(sccs) for sid, sccs in SCCS.items()}


def _hits(query: str, ranked: list[tuple[str, float]]) -> list[Hit]:
    return [Hit(query, target, score) for target, score in ranked]


# Best first, cosine-like (higher is better).
RANKED_Q = [
    ("q", 1.0),
    ("f1", 0.9),
    ("s1", 0.8),
    ("x2", 0.7),  # first FP: same class, another fold
    ("f2", 0.6),
    ("d1", 0.5),
    ("s2", 0.4),
    ("x1", 0.3),
]


def test_parse_sccs_levels() -> None:
    lab = parse_sccs("b.82.2.13")
    assert (lab.fold, lab.superfamily, lab.family) == ("b.82", "b.82.2", "b.82.2.13")
    for bad in ("a.1.1", "a..1.1", "", "a.1.1.1.1"):
        with pytest.raises(ScopLabelError):
            parse_sccs(bad)


def test_exclude_self_hit_foldseek_convention() -> None:
    res = evaluate(
        _hits("q", RANKED_Q),
        queries=["q"],
        labels=LABELS,
        higher_is_better=True,
        self_hit=SelfHit.EXCLUDE,
    )
    # family: f1 above first FP (x2), f2 below -> 1/2; self hit neither found nor in total.
    assert res.per_query["family"]["q"] == pytest.approx(0.5)
    assert res.n_true_positives["family"]["q"] == 2
    # superfamily: s1 above, s2 below -> 1/2.
    assert res.per_query["superfamily"]["q"] == pytest.approx(0.5)
    assert res.n_true_positives["superfamily"]["q"] == 2
    # fold: d1 below the first FP -> 0.
    assert res.per_query["fold"]["q"] == 0.0
    assert res.n_true_positives["fold"]["q"] == 1
    assert res.self_hit is SelfHit.EXCLUDE


def test_count_self_hit_progres_convention() -> None:
    res = evaluate(
        _hits("q", RANKED_Q),
        queries=["q"],
        labels=LABELS,
        higher_is_better=True,
        self_hit=SelfHit.COUNT,
    )
    # family: q and f1 found out of {q, f1, f2} -> 2/3.
    assert res.per_query["family"]["q"] == pytest.approx(2 / 3)
    assert res.n_true_positives["family"]["q"] == 3
    # superfamily and fold do not depend on the convention.
    assert res.per_query["superfamily"]["q"] == pytest.approx(0.5)
    assert res.per_query["fold"]["q"] == 0.0


def test_count_convention_self_hit_below_first_fp_is_not_found() -> None:
    ranked = [("x1", 0.99), ("q", 0.9), ("f1", 0.8)]
    res = evaluate(
        _hits("q", ranked),
        queries=["q"],
        labels=LABELS,
        higher_is_better=True,
        self_hit=SelfHit.COUNT,
    )
    assert res.per_query["family"]["q"] == 0.0


def test_other_level_true_positives_neither_count_nor_stop() -> None:
    # At fold level, same-family and same-superfamily hits are ignored: d1 ranked
    # below them but above the first FP is found.
    ranked = [("f1", 0.9), ("s1", 0.85), ("d1", 0.8), ("x1", 0.7), ("f2", 0.6)]
    res = evaluate(
        _hits("q", ranked),
        queries=["q"],
        labels=LABELS,
        higher_is_better=True,
        self_hit=SelfHit.EXCLUDE,
    )
    assert res.per_query["fold"]["q"] == 1.0
    assert res.per_query["superfamily"]["q"] == pytest.approx(0.5)
    assert res.per_query["family"]["q"] == pytest.approx(0.5)


def test_lower_is_better_evalues() -> None:
    # The same ranking as RANKED_Q written as E-values (smaller is better), in
    # scrambled file order.
    evalues = {
        "q": 1e-50,
        "f1": 1e-10,
        "s1": 1e-5,
        "x2": 0.1,
        "f2": 1.0,
        "d1": 5.0,
        "s2": 20.0,
        "x1": 100.0,
    }
    hits = [Hit("q", t, e) for t, e in sorted(evalues.items(), key=lambda kv: -kv[1])]
    res = evaluate(hits, queries=["q"], labels=LABELS, higher_is_better=False, self_hit=SelfHit.EXCLUDE)
    assert res.per_query["family"]["q"] == pytest.approx(0.5)
    assert res.per_query["superfamily"]["q"] == pytest.approx(0.5)
    assert res.per_query["fold"]["q"] == 0.0
    # Read as higher-is-better, x1 (100) would be first and everything 0.
    wrong = evaluate(hits, queries=["q"], labels=LABELS, higher_is_better=True, self_hit=SelfHit.EXCLUDE)
    assert wrong.per_query["family"]["q"] == 0.0


def test_repeated_rows_keep_best_score() -> None:
    # BLAST-style: several HSPs per target. f2's best E-value (1e-6) lies above the
    # first FP (x2 at 0.1), its worse HSP (5.0) below it.
    hits = [
        Hit("q", "x2", 0.1),
        Hit("q", "f2", 5.0),
        Hit("q", "f1", 1e-9),
        Hit("q", "f2", 1e-6),
        Hit("q", "x2", 3.0),  # a worse repeat of the FP must not move it down
        Hit("q", "s1", 1.0),
    ]
    merged = merge_hits(hits, higher_is_better=False)
    assert merged["q"]["f2"] == 1e-6
    assert merged["q"]["x2"] == 0.1
    res = evaluate(hits, queries=["q"], labels=LABELS, higher_is_better=False, self_hit=SelfHit.EXCLUDE)
    assert res.per_query["family"]["q"] == 1.0
    assert res.per_query["superfamily"]["q"] == 0.0
    # Higher-is-better merge keeps the maximum.
    assert merge_hits([Hit("a", "b", 0.2), Hit("a", "b", 0.7)], higher_is_better=True)["a"]["b"] == pytest.approx(0.7)


def test_unlabelled_targets_are_skipped() -> None:
    # "g_unlabelled" has no label: ranked first, it must not act as a false positive,
    # and it does not enter any total.
    ranked = [("g_unlabelled", 0.99), ("f1", 0.9), ("f2", 0.85), ("x1", 0.5)]
    res = evaluate(
        _hits("q", ranked),
        queries=["q"],
        labels=LABELS,
        database=[*LABELS, "g_unlabelled"],
        higher_is_better=True,
        self_hit=SelfHit.EXCLUDE,
    )
    assert res.per_query["family"]["q"] == 1.0
    assert res.n_true_positives["family"]["q"] == 2


def test_database_restricts_totals_and_hits() -> None:
    # With f2 not in the searched database, the family total is 1 (f1 only), and a
    # hit to a domain outside the database (x1) is ignored.
    db = [sid for sid in LABELS if sid not in ("f2", "x1")]
    ranked = [("x1", 0.95), ("f1", 0.9), ("x2", 0.5)]
    res = evaluate(
        _hits("q", ranked),
        queries=["q"],
        labels=LABELS,
        database=db,
        higher_is_better=True,
        self_hit=SelfHit.EXCLUDE,
    )
    assert res.n_true_positives["family"]["q"] == 1
    assert res.per_query["family"]["q"] == 1.0


def test_queries_without_true_positives_are_excluded_from_the_mean() -> None:
    hits = _hits("q", RANKED_Q) + _hits("lone", [("lone", 1.0), ("x1", 0.5)])
    excl = evaluate(
        hits,
        queries=["q", "lone"],
        labels=LABELS,
        higher_is_better=True,
        self_hit=SelfHit.EXCLUDE,
    )
    for level in LEVELS:
        assert "lone" not in excl.per_query[level]
        assert excl.n_queries(level) == 1
    assert excl.mean("family") == pytest.approx(0.5)
    assert excl.mean("fold") == 0.0
    # Under the Progres convention "lone" is its own family TP and is found.
    count = evaluate(
        hits,
        queries=["q", "lone"],
        labels=LABELS,
        higher_is_better=True,
        self_hit=SelfHit.COUNT,
    )
    assert count.per_query["family"]["lone"] == 1.0
    assert count.mean("family") == pytest.approx((2 / 3 + 1.0) / 2)
    assert "lone" not in count.per_query["superfamily"]
    assert count.mean("superfamily") == pytest.approx(0.5)


def test_query_without_hits_scores_zero() -> None:
    res = evaluate(
        _hits("q", [("f1", 0.9), ("f2", 0.8)]),
        queries=["q", "f1"],
        labels=LABELS,
        higher_is_better=True,
        self_hit=SelfHit.EXCLUDE,
    )
    # f1 has TPs (q, f2, s1, ...) but no hits: 0 at each level, still in the mean.
    for level in LEVELS:
        assert res.per_query[level]["f1"] == 0.0
    assert res.per_query["family"]["q"] == 1.0
    assert res.mean("family") == pytest.approx(0.5)


def test_no_false_positive_counts_every_reported_true_positive() -> None:
    res = evaluate(
        _hits("q", [("f1", 0.9), ("s1", 0.8), ("s2", 0.7)]),
        queries=["q"],
        labels=LABELS,
        higher_is_better=True,
        self_hit=SelfHit.EXCLUDE,
    )
    assert res.per_query["family"]["q"] == pytest.approx(0.5)
    assert res.per_query["superfamily"]["q"] == 1.0
    assert res.per_query["fold"]["q"] == 0.0


def test_tie_with_first_false_positive_is_not_counted() -> None:
    res = evaluate(
        _hits("q", [("f1", 0.9), ("x1", 0.8), ("f2", 0.8)]),
        queries=["q"],
        labels=LABELS,
        higher_is_better=True,
        self_hit=SelfHit.EXCLUDE,
    )
    assert res.per_query["family"]["q"] == pytest.approx(0.5)


def test_unlabelled_query_raises() -> None:
    with pytest.raises(ScopLabelError, match="nolabel"):
        evaluate([], queries=["nolabel"], labels=LABELS, higher_is_better=True, self_hit=SelfHit.COUNT)


def test_nan_score_raises() -> None:
    with pytest.raises(HitsFormatError):
        merge_hits([Hit("q", "f1", float("nan"))], higher_is_better=True)


def test_cumulative_curve_sorted_and_area_is_mean() -> None:
    values = [0.5, 1.0, 0.0, 0.25]
    fraction, sens = cumulative_curve(values)
    np.testing.assert_allclose(fraction, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(sens, [1.0, 0.5, 0.25, 0.0])
    assert float(np.sum(sens) / sens.size) == pytest.approx(np.mean(values))
    empty_f, empty_s = cumulative_curve([])
    assert empty_f.size == 0 and empty_s.size == 0


def test_read_label_files(tmp_path: Path) -> None:
    sid_file = tmp_path / "labels.txt"
    sid_file.write_text("d1dlwa_ a.1.1.1\n\nd3bb6a1 b.82.2.13\n")
    labels = read_sid_sccs(sid_file)
    assert list(labels) == ["d1dlwa_", "d3bb6a1"]
    assert labels["d3bb6a1"].superfamily == "b.82.2"
    sid_file.write_text("d1dlwa_ a.1.1.1\nd1dlwa_ a.1.1.1\n")
    with pytest.raises(ScopLabelError, match="twice"):
        read_sid_sccs(sid_file)

    fasta = tmp_path / "astral.fa"
    fasta.write_text(
        ">d1dlwa_ a.1.1.1 (A:) Protozoan/bacterial hemoglobin {Ciliate}\nslfeqlgg\n"
        ">d2gkma_ a.1.1.2 (A:) Something\nmmxk\n"
    )
    astral = read_astral_fasta_labels(fasta)
    assert {k: v.family for k, v in astral.items()} == {
        "d1dlwa_": "a.1.1.1",
        "d2gkma_": "a.1.1.2",
    }


def test_read_hits_tsv_blast_and_esmsearch(tmp_path: Path) -> None:
    m8 = tmp_path / "blast.tsv"
    m8.write_text(
        "q\tf1\t45.0\t100\t0\t0\t1\t100\t1\t100\t1e-30\t200\n"
        "# comment\n"
        "q\tx1\t20.0\t100\t0\t0\t1\t100\t1\t100\t0.5\t30\n"
    )
    hits = read_hits_tsv(m8, score_column=10)
    assert hits == [Hit("q", "f1", 1e-30), Hit("q", "x1", 0.5)]

    tsv = tmp_path / "esm.tsv"
    tsv.write_text(
        "query_id\ttarget_id\tcosine_score\trank\tquery_length\ttarget_length\ttarget_description\n"
        "q\tf1\t0.93\t1\t100\t110\tsome domain\n"
    )
    hits = read_hits_tsv(
        tsv,
        header=True,
        query_column="query_id",
        target_column="target_id",
        score_column="cosine_score",
    )
    assert hits == [Hit("q", "f1", 0.93)]
    with pytest.raises(HitsFormatError, match="column missing"):
        read_hits_tsv(tsv, header=True, score_column="evalue")
    bad = tmp_path / "bad.tsv"
    bad.write_text("q\tf1\tnot-a-number\n")
    with pytest.raises(HitsFormatError, match="row 1"):
        read_hits_tsv(bad)
