"""E-values: the fit on known distributions, decoys, the indexer stage, the server, client and CLI.

The statistics are tested on samples from known distributions (seeded); the
plumbing on the tiny random-weight model of ``conftest.py``, whose E-values mean
nothing biologically but follow the same code path as a real model's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from esmsearch.client import FailedPreconditionError, SearchClient
from esmsearch.embedding import Embedder
from esmsearch.errors import ConfigError, EvaluesUnavailableError, IndexFormatError
from esmsearch.indexer import build_index, build_version
from esmsearch.sequences import read_fasta
from esmsearch.server import ServerConfig, create_server
from esmsearch.server.admission import Admission
from esmsearch.server.batcher import BatchingConfig, DynamicBatcher
from esmsearch.server.engine import SearchEngine
from esmsearch.significance import (
    DECOY_METHOD,
    MAX_SHAPE,
    MIN_EVALUE_F32,
    MIN_SHAPE,
    TAIL_JOIN_SCALE,
    DecoyNull,
    DecoySettings,
    GevFit,
    block_maxima,
    block_size_for,
    decoy_sequences,
    evalues_from_fit,
    fit_gev,
    l_moments,
    pseudo_query_rows,
    regional_shape,
    sample_decoy_rows,
    shape_from_lskewness,
    shuffle_residues,
    tail_join,
    tail_transform,
)
from esmsearch.store import DATA_FILES, DECOYS_FILE, MANIFEST, Index, IndexWriter, Manifest
from esmsearch.v1 import search_pb2, search_pb2_grpc

EULER = 0.5772156649015329


def _gev_samples(rng: np.random.Generator, shape: tuple[int, int], mu: float, sigma: float, xi: float) -> np.ndarray:
    """Samples of a GEV(mu, sigma, xi) (maximum convention) by inverting its CDF."""
    e = -np.log(rng.random(shape))  # Exp(1); F(x) = exp(-t(x)), so t(X) ~ Exp(1)
    if xi == 0.0:
        return mu - sigma * np.log(e)
    return mu + sigma * (e**-xi - 1.0) / xi


# -- the fit on known distributions ----------------------------------------------------------


def test_l_moments_of_a_known_sample_are_exact() -> None:
    # 0, 1, ..., n-1: unbiased sample L-moments are exactly l1 = (n-1)/2, l2 = (n+1)/6, t3 = 0.
    n = 101
    l1, l2, t3 = l_moments(np.arange(n, dtype=float)[None, ::-1])
    assert l1[0] == pytest.approx((n - 1) / 2)
    assert l2[0] == pytest.approx((n + 1) / 6)
    assert t3[0] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="n >= 3"):
        l_moments(np.ones((1, 2)))
    with pytest.raises(ValueError, match="finite"):
        l_moments(np.array([[0.0, 1.0, np.nan]]))


@pytest.mark.parametrize("xi", [-0.2, -0.1, 0.0, 0.1, 0.2])
def test_shape_from_lskewness_inverts_the_gev_lskewness(xi: float) -> None:
    # Population L-skewness of a GEV (Hosking 1990): 2 (1 - 3^-k) / (1 - 2^-k) - 3, k = -xi;
    # ln(9/8) / ln 2 for the Gumbel. Hosking's approximation is accurate to 1e-3 here.
    k = -xi
    t3 = math.log(9 / 8) / math.log(2) if xi == 0 else 2 * (1 - 3**-k) / (1 - 2**-k) - 3
    assert shape_from_lskewness(t3) == pytest.approx(xi, abs=1e-3)


@pytest.mark.parametrize(("mu", "sigma", "xi"), [(0.9, 0.01, 0.0), (2.0, 0.3, -0.1), (3.0, 0.5, 0.15)])
def test_fit_recovers_known_gev_parameters(mu: float, sigma: float, xi: float) -> None:
    """400 "queries" of 100 block maxima each, drawn from a known GEV (xi = 0: a Gumbel).

    Stated tolerances: the regional shape within 0.03 of xi (its standard error is about
    0.005 here); per query, location and scale within 3.5 standard errors of the truth
    on average (each estimate's error is ~0.1 sigma), and 95% of the queries within
    0.3 sigma (location) and 35% (scale) of the truth (measured: 0.19-0.22 and 0.15-0.25).
    """
    rng = np.random.default_rng(20261130)
    samples = _gev_samples(rng, (400, 100), mu, sigma, xi)
    shape = regional_shape(samples)
    assert shape == pytest.approx(xi, abs=0.03)
    loc, scale = fit_gev(samples, shape)
    loc_err = (loc - mu) / sigma
    scale_err = scale / sigma - 1.0
    assert abs(loc_err.mean()) < 3.5 * loc_err.std() / math.sqrt(len(loc))
    assert abs(scale_err.mean()) < 3.5 * scale_err.std() / math.sqrt(len(scale)) + 0.01
    assert np.quantile(np.abs(loc_err), 0.95) < 0.3
    assert np.quantile(np.abs(scale_err), 0.95) < 0.35
    assert 0.05 < loc_err.std() < 0.15  # ~1.05 / sqrt(100) for a Gumbel's location


def test_gumbel_fit_matches_its_closed_form() -> None:
    # For xi = 0 the L-moment fit is sigma = l2 / ln 2, mu = l1 - EULER sigma exactly.
    x = np.random.default_rng(3).gumbel(1.0, 0.2, size=(5, 100))
    l1, l2, _ = l_moments(x)
    mu, sigma = fit_gev(x, 0.0)
    np.testing.assert_allclose(sigma, l2 / math.log(2))
    np.testing.assert_allclose(mu, l1 - EULER * sigma)


def test_regional_shape_is_clamped() -> None:
    rng = np.random.default_rng(4)
    assert regional_shape(_gev_samples(rng, (50, 100), 0.0, 1.0, 0.6)) == MAX_SHAPE
    assert regional_shape(_gev_samples(rng, (50, 100), 0.0, 1.0, -0.6)) == MIN_SHAPE


def test_calibration_when_the_null_is_exactly_max_stable() -> None:
    """Scores whose u = -ln(1 - s) is Gumbel: the mean number of null hits with E <= x
    is x (within the sampling error of 300 queries; tolerance a factor 1.5)."""
    rng = np.random.default_rng(5)
    q, m, n = 300, 10_000, 20_000
    u_decoys = rng.gumbel(3.0, 0.4, size=(q, m))
    u_db = rng.gumbel(3.0, 0.4, size=(q, n))
    decoys, db = -np.expm1(-u_decoys), -np.expm1(-u_db)  # s = 1 - exp(-u)
    maxima = block_maxima(tail_transform(decoys), 100)
    shape = regional_shape(maxima)
    loc, scale = fit_gev(maxima, shape)
    evalues = evalues_from_fit(db, GevFit(loc, scale, shape, 100), n)
    for x in (0.1, 1.0, 10.0):
        observed = (evalues <= x).sum(axis=1).mean()
        assert x / 1.5 < observed < 1.5 * x, (x, observed)


def test_evalues_double_with_the_database_and_never_rise_with_the_score() -> None:
    fit = GevFit(np.array([2.0, 3.0]), np.array([0.3, 0.5]), -0.08, 100)
    scores = np.sort(np.random.default_rng(6).uniform(0.5, 1.0, size=(2, 50)), axis=1)[:, ::-1]
    e1 = evalues_from_fit(scores, fit, 10_000)
    e2 = evalues_from_fit(scores, fit, 20_000)
    np.testing.assert_allclose(e2, 2 * e1, rtol=1e-12)  # a database twice the size doubles E
    assert np.all(np.diff(e1, axis=1) >= 0)  # descending scores -> non-decreasing E-values
    assert np.all((e1 >= 0) & (e1 <= 10_000))
    # far below the null every database sequence scores higher: E = N
    assert evalues_from_fit(np.array([[-1.0]]), GevFit(np.array([3.0]), np.array([0.1]), 0.0, 100), 500)[0, 0] == 500
    # beyond the end point of a bounded (xi < 0) null, and for a cosine of 1: small, never 0
    end = GevFit(np.array([2.0]), np.array([0.1]), -0.2, 100)
    beyond = evalues_from_fit(np.array([[1.0 - math.exp(-2.5), 1.0 - math.exp(-2.6)]]), end, 1000)[0]
    assert 0.0 < beyond[1] < beyond[0] < 0.01  # u = 2.5 is the GEV's end point
    bounded = GevFit(np.array([2.0]), np.array([0.3]), -0.08, 100)
    assert 0.0 < evalues_from_fit(np.array([[1.0000001]]), bounded, 1000)[0, 0] < 1e-6  # float32 cosine over 1


# -- the tail beyond the GEV (issue 18 part 4) -------------------------------------------------
def _u_to_s(u: np.ndarray) -> np.ndarray:
    return -np.expm1(-np.asarray(u, dtype=np.float64))  # s = 1 - exp(-u)


@pytest.mark.parametrize("xi", [-0.25, -0.072, -0.01])
def test_no_evalue_is_zero_far_above_the_decoys(xi: float) -> None:
    """Scores from the GEV's end point up to a cosine of 1 get finite, positive E-values that
    keep falling: the old fit gave every one of them E = 0."""
    fit = GevFit(np.array([2.0, 1.0]), np.array([0.1, 0.3]), xi, 100)
    end = fit.loc - fit.scale / xi  # the GEV's upper end point per query
    u = np.stack([np.linspace(min(e, 14.0), 16.0, 200) for e in end])  # u <= 16.1: cosine 1 - 1e-7
    e = evalues_from_fit(_u_to_s(u), fit, 1_000_000)
    assert np.all(e > 0) and np.all(np.isfinite(e))
    assert np.all(np.diff(e, axis=1) < 0)  # strictly decreasing beyond the end point
    # a self-hit (cosine 1, or a float32 cosine just over 1) is not 0 either
    assert np.all(evalues_from_fit(np.array([[1.0], [1.0000001]]), fit, 1_000_000) > 0)


def test_tail_joins_the_gev_continuously_with_its_slope() -> None:
    """At the join point E-values and their log-slope in u match from both sides; below it
    they are exactly the GEV's, beyond it the tail lies above the GEV (conservative)."""
    xi, mu, sigma, b, n = -0.072, 2.0, 0.1, 100, 1_000_000
    fit = GevFit(np.array([mu]), np.array([sigma]), xi, b)
    join = tail_join(fit)
    assert join is not None
    u_join, log_t_join, scale = (float(a[0]) for a in join)
    assert scale == pytest.approx(TAIL_JOIN_SCALE * sigma)
    assert u_join == pytest.approx(mu + sigma * (1 - TAIL_JOIN_SCALE) / -xi)

    def gev_e(u: np.ndarray) -> np.ndarray:
        t = (1.0 + xi * (u - mu) / sigma) ** (-1.0 / xi)
        return -n * np.expm1(-t / b)

    h = 1e-6
    below, at, above = evalues_from_fit(_u_to_s(np.array([[u_join - h, u_join, u_join + h]])), fit, n)[0]
    assert at == pytest.approx(-n * math.expm1(-math.exp(log_t_join) / b), rel=1e-9)
    assert above == pytest.approx(at, rel=1e-4) and below == pytest.approx(at, rel=1e-4)
    slope_left = (math.log(at) - math.log(below)) / h
    slope_right = (math.log(above) - math.log(at)) / h
    assert slope_left == pytest.approx(-1.0 / scale, rel=1e-3)
    assert slope_right == pytest.approx(-1.0 / scale, rel=1e-3)
    u_below = np.linspace(mu - 0.3, u_join, 50)
    np.testing.assert_allclose(evalues_from_fit(_u_to_s(u_below[None]), fit, n)[0], gev_e(u_below), rtol=1e-6)
    u_beyond = np.linspace(u_join + 0.01, mu - sigma / xi - 1e-3, 50)  # still below the GEV's end point
    assert np.all(evalues_from_fit(_u_to_s(u_beyond[None]), fit, n)[0] > gev_e(u_beyond))


def test_tail_evalues_scale_with_the_database_size() -> None:
    fit = GevFit(np.array([2.0]), np.array([0.1]), -0.1, 100)
    s = _u_to_s(np.array([[2.5, 4.0, 8.0, 12.0]]))  # GEV range, join, beyond the end point
    e1 = evalues_from_fit(s, fit, 1_000)
    np.testing.assert_allclose(evalues_from_fit(s, fit, 100_000_000), 1e5 * e1, rtol=1e-9)


def test_float32_evalues_are_floored_not_flushed_to_zero() -> None:
    """A self-hit against a very narrow null: its E-value underflows float32 (and float64's
    normal range) but is sent as the smallest positive float32, never as 0."""
    rng = np.random.default_rng(11)
    dim = 16
    decoys = rng.standard_normal((300, dim)).astype(np.float32)
    decoys /= np.linalg.norm(decoys, axis=1, keepdims=True)
    null = DecoyNull(decoys, DecoySettings(count=300, seed=0, block_size=30, shape=-0.2))
    query = decoys[:1] * 0 + np.float32(1 / math.sqrt(dim))  # unit vector, far from most decoys
    scores = np.array([[1.0, 0.9999, 0.99, 0.9]], dtype=np.float32)
    e = null.evalues(query, scores, 10_000_000)
    assert e.dtype == np.float32
    assert np.all(e > 0) and e[0, 0] == np.float32(MIN_EVALUE_F32)
    assert np.all(np.diff(e[0]) >= 0)


def test_self_hit_gets_a_tiny_evalue_and_unrelated_hits_do_not() -> None:
    rng = np.random.default_rng(7)
    dim = 64
    decoys = rng.standard_normal((2000, dim)).astype(np.float32)
    decoys /= np.linalg.norm(decoys, axis=1, keepdims=True)
    null = DecoyNull(decoys, DecoySettings(count=2000, seed=0, block_size=100, shape=-0.05))
    db = rng.standard_normal((1000, dim)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    query = db[:1]
    scores = np.sort(query @ db.T, axis=1)[:, ::-1]  # self-hit first, cosine 1
    evalues = null.evalues(query, scores, 1000)
    assert evalues.dtype == np.float32 and evalues.shape == scores.shape
    assert evalues[0, 0] < 1e-6
    assert evalues[0, 1] > 1e-3  # the best unrelated sequence is not significant


def test_shape_estimate_leaves_out_each_pseudo_querys_own_decoy() -> None:
    """A pseudo-query whose own shuffle is among the decoys (a database sequence) scores it far
    above its other decoys; left in, that one block maximum makes the tail look heavy."""
    rng = np.random.default_rng(8)
    dim = 48
    decoys = rng.standard_normal((3000, dim)).astype(np.float32)
    decoys /= np.linalg.norm(decoys, axis=1, keepdims=True)
    null = DecoyNull(decoys, DecoySettings(count=3000, seed=0, block_size=100))
    own = rng.choice(3000, size=200, replace=False)
    twins = decoys[own] + 0.05 * rng.standard_normal((200, dim)).astype(np.float32)  # near-copies
    twins /= np.linalg.norm(twins, axis=1, keepdims=True)
    strangers = rng.standard_normal((200, dim)).astype(np.float32)
    strangers /= np.linalg.norm(strangers, axis=1, keepdims=True)
    reference = null.estimate_shape(strangers, np.full(200, -1))
    assert null.estimate_shape(twins, own) == pytest.approx(reference, abs=0.03)
    assert null.estimate_shape(twins, np.full(200, -1)) > reference + 0.1


def test_decoy_null_checks_its_vectors() -> None:
    settings = DecoySettings(count=30, seed=0, block_size=10)
    with pytest.raises(IndexFormatError, match="float32"):
        DecoyNull(np.zeros((30, 4)), settings)
    with pytest.raises(IndexFormatError, match=r"\[30, dim\]"):
        DecoyNull(np.zeros((29, 4), dtype=np.float32), settings)
    with pytest.raises(ValueError, match=r"\[q, 4\]"):
        DecoyNull(np.zeros((30, 4), dtype=np.float32), settings).fit(np.zeros((1, 5), dtype=np.float32))


# -- decoys ------------------------------------------------------------------------------------


def test_decoys_are_seeded_shuffles_of_a_sample_of_the_database(ecoli_fasta: Path) -> None:
    db = [r.sequence for r in read_fasta(ecoli_fasta)]
    settings = DecoySettings(count=25, seed=11, block_size=5)
    decoys = decoy_sequences(iter(db), len(db), settings)
    rows = sample_decoy_rows(len(db), settings)
    assert len(decoys) == 25 and len(set(rows.tolist())) == 25
    assert rows.tolist() != sorted(rows.tolist())  # a random order: blocks are exchangeable
    for decoy, row in zip(decoys, rows, strict=True):
        assert sorted(decoy) == sorted(db[row])  # same length and composition
        assert decoy != db[row]
    assert decoy_sequences(iter(db), len(db), settings) == decoys  # seeded
    other = decoy_sequences(iter(db), len(db), dataclasses.replace(settings, seed=12))
    assert other != decoys
    with pytest.raises(ConfigError, match="yielded 39 sequences"):
        decoy_sequences(iter(db[:-1]), len(db), settings)
    assert shuffle_residues(["MKV"], 0) == shuffle_residues(["MKV"], 0)


def test_decoy_settings_validate_themselves_and_round_trip_json() -> None:
    s = DecoySettings.for_database(40, 10_000, seed=3)
    assert s == DecoySettings(count=40, seed=3, method=DECOY_METHOD, block_size=4, shape=0.0)
    assert DecoySettings.for_database(50_000) == DecoySettings(count=10_000, seed=0, block_size=100)
    assert DecoySettings.for_database(40, 0) is None  # --decoys 0: no E-values
    assert DecoySettings.for_database(2) is None  # too small to fit anything
    assert block_size_for(4391) == 100 and block_size_for(500) == 50 and block_size_for(5) == 1
    assert DecoySettings.from_json(s.to_json()) == s
    assert s.same_decoys(dataclasses.replace(s, shape=0.1)) and not s.same_decoys(dataclasses.replace(s, seed=4))
    for bad in (
        {"count": 2},
        {"seed": -1},
        {"block_size": 20},  # 2 blocks of 20 in 40
        {"method": "reversed"},
        {"shape": 0.5},
        {"shape": float("nan")},
        {"count": True},
    ):
        with pytest.raises(ConfigError):
            dataclasses.replace(s, **bad)
    for data in ([], {"count": 40}, {**s.to_json(), "extra": 1}, {**s.to_json(), "count": 1}):
        with pytest.raises(IndexFormatError, match="decoys"):
            DecoySettings.from_json(data, source="m.json")
    with pytest.raises(ConfigError, match=">= 0"):
        DecoySettings.for_database(40, -1)


# -- the index directory -----------------------------------------------------------------------


def test_index_stores_and_verifies_its_decoys(small_index: Path, tmp_path: Path) -> None:
    with Index.open(small_index, verify=True) as index:
        m = index.manifest
        assert m.decoys is not None and index.has_evalues and index.null is not None
        assert set(m.files) == {*DATA_FILES, DECOYS_FILE}
        assert index.null.decoys.shape == (m.decoys.count, m.dim)
        assert MIN_SHAPE <= m.decoys.shape <= MAX_SHAPE
    assert json.loads((small_index / MANIFEST).read_text())["decoys"] == m.decoys.to_json()
    # a changed decoy file fails verification; a missing one fails opening
    bad = tmp_path / "bad"
    shutil.copytree(small_index, bad)
    vectors = np.load(bad / DECOYS_FILE)
    np.save(bad / DECOYS_FILE, vectors[::-1].copy())
    Index.open(bad).close()
    with pytest.raises(IndexFormatError, match=DECOYS_FILE):
        Index.open(bad, verify=True)
    np.save(bad / DECOYS_FILE, vectors[:-1])
    with pytest.raises(IndexFormatError, match=r"decoys.npy is float32 \[39, 32\]"):
        Index.open(bad)
    (bad / DECOYS_FILE).unlink()
    with pytest.raises(IndexFormatError, match="decoys.npy missing"):
        Index.open(bad)


def test_verify_index_refuses_decoys_that_are_not_unit_vectors(small_index: Path, tmp_path: Path) -> None:
    from esmsearch.fsutil import file_sha256
    from esmsearch.versions import verify_index

    bad = tmp_path / "bad"
    shutil.copytree(small_index, bad)
    verify_index(bad)
    vectors = np.load(bad / DECOYS_FILE)
    vectors[7] *= 2.0
    np.save(bad / DECOYS_FILE, vectors)
    data = json.loads((bad / MANIFEST).read_text())
    data["files"][DECOYS_FILE] = file_sha256(bad / DECOYS_FILE)  # checksums agree: only the content is wrong
    (bad / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match="1 decoy vectors are not finite unit vectors .first: decoy 7."):
        verify_index(bad)


def test_writer_refuses_decoys_without_settings_and_the_reverse(tmp_path: Path, small_index: Path) -> None:
    m = Manifest.read(small_index)
    fields = {
        f.name: getattr(m, f.name)
        for f in dataclasses.fields(m)
        if f.name not in {"format_version", "files", "count", "version", "built_at", "decoys"}
    }
    with Index.open(small_index) as index:
        rows = [(rid, desc, n, sha) for _, rid, desc, n, sha in index.iter_metadata()]
        vectors = np.array(index.embeddings())
        faiss_index = index._faiss
    for decoys, write_file, message in ((None, True, "no decoys settings"), (m.decoys, False, "wrote no")):
        with IndexWriter.temporary(tmp_path) as w:
            w.add_metadata(rows)
            w.write_embeddings(vectors)
            w.write_faiss(faiss_index)
            if write_file:
                w.write_decoys(vectors)
            with pytest.raises(IndexFormatError, match=message):
                w.finish(**fields, decoys=decoys)


def _strip_decoys(index: Path, out: Path) -> Path:
    """A copy of ``index`` as an index built before E-values existed: no decoys.npy, no 'decoys' key."""
    shutil.copytree(index, out)
    (out / DECOYS_FILE).unlink()
    data = json.loads((out / MANIFEST).read_text())
    del data["decoys"]
    data["files"].pop(DECOYS_FILE)
    data["version"] += "-old"
    (out / MANIFEST).write_text(json.dumps(data))
    return out


def test_old_manifest_without_decoys_loads(small_index: Path, tmp_path: Path) -> None:
    old = _strip_decoys(small_index, tmp_path / "old")
    with Index.open(old, verify=True) as index:
        assert index.manifest.decoys is None and not index.has_evalues and index.null is None
        vectors = np.array(index.embeddings()[:2])
        scores, _ = index.search(vectors, 3)
        with pytest.raises(EvaluesUnavailableError, match="no decoys"):
            index.evalues(vectors, scores)
    assert Manifest.read(old).data_files == DATA_FILES


# -- the indexer stage -------------------------------------------------------------------------


@pytest.fixture()
def embed_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = Embedder.embed

    def recording(self: Embedder, sequences: Any, **kwargs: Any) -> np.ndarray:
        calls.append(len(sequences))
        return original(self, sequences, **kwargs)

    monkeypatch.setattr(Embedder, "embed", recording)
    return calls


def test_build_embeds_decoys_with_the_index_model(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, small_index: Path
) -> None:
    db = [r.sequence for r in read_fasta(ecoli_fasta)]
    with Index.open(small_index) as index:
        settings = index.manifest.decoys
        assert settings is not None and index.null is not None
        expected = tiny_embedder.embed(decoy_sequences(iter(db), len(db), settings))
        np.testing.assert_allclose(np.array(index.null.decoys), expected, atol=1e-5)
        assert index.manifest.build["decoy_embedded_residues"] == sum(len(s) for s in db)
        # the shape: pseudo-queries from the database, each without the decoy made from itself
        rows = pseudo_query_rows(len(db), settings.seed)
        column_of = {int(r): j for j, r in enumerate(sample_decoy_rows(len(db), settings))}
        own = np.array([column_of[int(r)] for r in rows])  # a small database: every row has a decoy
        pseudo = np.array(index.embeddings())[rows]
        assert settings.shape == pytest.approx(index.null.estimate_shape(pseudo, own), abs=1e-9)
        assert settings.shape != pytest.approx(index.null.estimate_shape(pseudo, np.full(len(rows), -1)))
    # --decoys 0: an index without E-values; another seed: other decoys
    none = build_index(ecoli_fasta, tmp_path / "none", model="unused", embedder=tiny_embedder, decoys=0)
    assert none.manifest.decoys is None and not (tmp_path / "none" / DECOYS_FILE).exists()
    seeded = build_index(ecoli_fasta, tmp_path / "s", model="unused", embedder=tiny_embedder, decoys=20, decoy_seed=5)
    assert seeded.manifest.decoys is not None
    assert (seeded.manifest.decoys.count, seeded.manifest.decoys.seed, seeded.manifest.decoys.block_size) == (20, 5, 2)
    with pytest.raises(ConfigError, match="decoys"):
        build_index(ecoli_fasta, tmp_path / "bad", model="unused", embedder=tiny_embedder, decoys=-1)


def test_rebuild_reuses_decoys_only_with_the_same_settings(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, embed_calls: list[int]
) -> None:
    root = tmp_path / "root"
    first = build_version(ecoli_fasta, root, model="unused", embedder=tiny_embedder)
    embed_calls.clear()
    second = build_version(ecoli_fasta, root, model="unused", embedder=tiny_embedder)
    assert embed_calls == []  # every vector and every decoy copied
    assert second.manifest.build["decoys_reused_from"] == first.manifest.version
    assert second.manifest.decoys == first.manifest.decoys  # the shape is carried over too
    a, b = (root / "versions" / v / DECOYS_FILE for v in (first.manifest.version, second.manifest.version))
    assert a.read_bytes() == b.read_bytes()
    third = build_version(ecoli_fasta, root, model="unused", embedder=tiny_embedder, decoy_seed=1)
    assert sum(embed_calls) == 40  # database reused, 40 new decoys embedded
    assert third.manifest.build["decoys_reused_from"] is None
    assert third.manifest.decoys is not None and third.manifest.decoys.seed == 1
    embed_calls.clear()
    build_version(ecoli_fasta, root, model="unused", embedder=tiny_embedder, decoy_seed=1, reuse=False)
    assert sum(embed_calls) == 80


def test_interrupted_decoy_stage_resumes_after_its_last_chunk(
    tmp_path: Path,
    ecoli_fasta: Path,
    tiny_embedder: Embedder,
    small_index: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = Embedder.embed
    seen: list[int] = []

    def failing(self: Embedder, sequences: Any, **kwargs: Any) -> np.ndarray:
        seen.append(len(sequences))
        if sum(seen) > 40 + 15:  # past the 40 database sequences, after a few decoy chunks
            raise RuntimeError("power cut")
        return original(self, sequences, **kwargs)

    monkeypatch.setattr(Embedder, "embed", failing)
    out = tmp_path / "idx"
    kwargs: dict[str, Any] = {"model": "unused", "embedder": tiny_embedder, "chunk_residues": 500}
    with pytest.raises(RuntimeError, match="power cut"):
        build_index(ecoli_fasta, out, **kwargs)
    done_decoys = sum(seen) - 40 - seen[-1]
    assert done_decoys > 0
    seen.clear()
    monkeypatch.setattr(Embedder, "embed", lambda self, s, **kw: (seen.append(len(s)), original(self, s, **kw))[1])
    result = build_index(ecoli_fasta, out, resume=True, **kwargs)
    assert sum(seen) == 40 - done_decoys  # no database chunk and no finished decoy chunk again
    with Index.open(out, verify=True) as a, Index.open(small_index) as b:
        assert a.null is not None and b.null is not None
        np.testing.assert_allclose(np.array(a.null.decoys), np.array(b.null.decoys), atol=1e-5)
        assert result.manifest.decoys is not None and b.manifest.decoys is not None
        assert result.manifest.decoys.same_decoys(b.manifest.decoys)
        assert result.manifest.decoys.shape == pytest.approx(b.manifest.decoys.shape, abs=1e-4)


# -- serving -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db(ecoli_fasta: Path) -> list:  # type: ignore[type-arg]
    return list(read_fasta(ecoli_fasta))


def test_every_hit_has_an_evalue_and_self_hits_are_the_most_significant(client, db) -> None:  # type: ignore[no-untyped-def]
    results = client.search({r.record_id: r.sequence for r in db}, k=10)
    for rec, res in zip(db, results, strict=True):
        assert res.hits[0].target_id == rec.record_id
        evalues = [h.evalue for h in res.hits]
        assert all(e is not None and 0 < e <= 40 for e in evalues)  # never 0, not even a self-hit's
        assert evalues == sorted(evalues)  # sorted by cosine score, E never falls
        assert evalues[0] < 1e-4  # the self-hit
        assert evalues[1] > evalues[0]


def _pooled_shuffles(db: list, seed: int) -> dict[str, str]:  # type: ignore[type-arg]
    """Queries with the database's lengths cut from all its residues, shuffled: no homolog in it,
    and (unlike the shuffle of one sequence, which a random model cannot tell from its source
    since only composition and length reach it) no sequence of the same composition either."""
    pool = np.frombuffer("".join(r.sequence for r in db).encode("ascii"), dtype=np.uint8)
    residues = np.random.default_rng(seed).permutation(pool).tobytes().decode("ascii")
    queries, at = {}, 0
    for i, rec in enumerate(db):
        queries[f"shuffled_{i}"] = residues[at : at + len(rec.sequence)]
        at += len(rec.sequence)
    return queries


def test_shuffled_queries_rarely_get_significant_hits(client, db) -> None:  # type: ignore[no-untyped-def]
    for seed in (1, 2):
        results = client.search(_pooled_shuffles(db, seed), k=40)
        significant = [r.query_id for r in results if any(h.evalue <= 0.01 for h in r.hits)]
        # calibrated E-values expect 0.4 such hits among 40 queries; allow 2 queries
        assert len(significant) <= 2, significant
        mean_at_10 = np.mean([sum(h.evalue <= 10 for h in r.hits) for r in results])
        assert 3 < mean_at_10 < 30  # and about 10 per query at E <= 10 (40 decoys: rough)


def test_max_evalue_drops_exactly_the_hits_over_it(client, db) -> None:  # type: ignore[no-untyped-def]
    queries = {r.record_id: r.sequence for r in db[:6]}
    full = client.search(queries, k=40)
    for bound in (0.0, 1e-3, 0.5, 2.0, 10.0, float(np.median([h.evalue for h in full[2].hits])), math.inf):
        filtered = client.search(queries, k=40, max_evalue=bound)
        for before, after in zip(full, filtered, strict=True):
            kept = [h for h in before.hits if h.evalue <= bound]
            assert [(h.target_id, h.evalue) for h in after.hits] == [(h.target_id, h.evalue) for h in kept]
            assert [h.rank for h in after.hits] == list(range(1, len(kept) + 1))
    both = client.search(queries, k=40, max_evalue=10.0, min_score=0.9)
    for before, after in zip(full, both, strict=True):
        assert [h.target_id for h in after.hits] == [
            h.target_id for h in before.hits if h.evalue <= 10.0 and h.cosine_score >= np.float32(0.9)
        ]
    # the same filter on precomputed vectors
    emb = client.embed(queries)
    by_vec = client.search_by_embedding(emb.vectors, query_ids=emb.query_ids, k=40, max_evalue=2.0)
    for before, after in zip(full, by_vec, strict=True):
        assert [h.target_id for h in after.hits] == [h.target_id for h in before.hits if h.evalue <= 2.0]
        kept = [h.evalue for h in before.hits if h.evalue <= 2.0]
        np.testing.assert_allclose([h.evalue for h in after.hits], kept, rtol=2e-3)


def test_stream_and_asyncio_clients_carry_max_evalue(client, server, db) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from esmsearch.client import AsyncSearchClient

    queries = {r.record_id: r.sequence for r in db[:4]}
    expected = [[(h.target_id, h.evalue) for h in r.hits if h.evalue <= 2.0] for r in client.search(queries, k=40)]
    [streamed] = list(client.search_stream([queries], k=40, max_evalue=2.0))
    assert [[(h.target_id, h.evalue) for h in r.hits] for r in streamed] == expected

    async def run() -> list:  # type: ignore[type-arg]
        address, _ = server
        async with AsyncSearchClient(address, timeout_s=60.0) as aio:
            plain = await aio.search(queries, k=40, max_evalue=2.0)
            streamed = [batch async for batch in aio.search_stream([queries], k=40, max_evalue=2.0)]
            return [plain, streamed[0]]

    for results in asyncio.run(run()):
        assert [[(h.target_id, h.evalue) for h in r.hits] for r in results] == expected


@pytest.mark.parametrize("bound", [-1e-9, float("nan")])
def test_bad_max_evalue_is_invalid_argument(server, bound: float) -> None:  # type: ignore[no-untyped-def]
    address, _ = server
    with grpc.insecure_channel(address) as channel:
        stub = search_pb2_grpc.HomologSearchStub(channel)
        request = search_pb2.SearchRequest(queries=[search_pb2.Query(query_id="q", sequence="MKV")], k=1)
        request.max_evalue = bound
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_evalue must be an E-value >= 0" in info.value.details()
    with SearchClient(address) as client, pytest.raises(ValueError, match="max_evalue"):
        client.search(["MKV"], max_evalue=bound)


def test_index_info_reports_the_decoys(client, small_index: Path) -> None:  # type: ignore[no-untyped-def]
    info = client.index_info()
    m = Manifest.read(small_index)
    assert info.has_evalues and info.decoys is not None and m.decoys is not None
    assert dataclasses.asdict(info.decoys) == m.decoys.to_json()


@pytest.fixture(scope="module")
def old_server(tmp_path_factory: pytest.TempPathFactory, small_index: Path) -> Iterator[str]:
    old = _strip_decoys(small_index, tmp_path_factory.mktemp("old") / "old_index")
    srv, port = create_server(ServerConfig(index=old, port=0, device="cpu", max_workers=4))
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.stop(1.0)


def test_index_without_decoys_still_serves_and_says_so(old_server: str, db) -> None:  # type: ignore[no-untyped-def]
    with SearchClient(old_server, timeout_s=60.0) as client:
        info = client.index_info()
        assert info.decoys is None and not info.has_evalues
        results = client.search({db[0].record_id: db[0].sequence}, k=5)
        assert results[0].hits[0].target_id == db[0].record_id
        assert all(h.evalue is None for h in results[0].hits)
        for call in (
            lambda: client.search([db[0].sequence], k=5, max_evalue=1.0),
            lambda: client.search_by_embedding(np.ones((1, 32), dtype=np.float32), max_evalue=1.0),
        ):
            with pytest.raises(FailedPreconditionError, match="no decoys"):
                call()


def test_cli_search_max_evalue_and_evalue_column(server, old_server: str, db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.cli import main

    address, _ = server
    fasta = tmp_path / "q.fasta"
    fasta.write_text("".join(f">{r.record_id}\n{r.sequence}\n" for r in db[:3]))
    for extra, keep in (([], lambda e: True), (["-e", "2"], lambda e: e <= 2.0)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["search", str(fasta), "--server", address, "-k", "40", *extra]) == 0
        header, *rows = out.getvalue().splitlines()
        assert header.split("\t")[6] == "evalue"
        values = [row.split("\t")[6] for row in rows]
        assert all(len(v.split("e")[1]) == 3 for v in values)  # "%.2e": 1.23e-05
        assert all(keep(float(v)) for v in values)
        if extra:
            assert len(rows) < 120
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["search", str(fasta), "--server", address, "-k", "2", "--format", "json"]) == 0
    data = json.loads(out.getvalue())
    assert all(isinstance(h["evalue"], float) for q in data for h in q["hits"])
    # an index without decoys: NA in the TSV; -e is refused with one error line
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["search", str(fasta), "--server", old_server, "-k", "2"]) == 0
    assert {row.split("\t")[6] for row in out.getvalue().splitlines()[1:]} == {"NA"}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["search", str(fasta), "--server", old_server, "-e", "1"]) == 1
    assert "no decoys" in err.getvalue() and "Traceback" not in err.getvalue()
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["search", str(fasta), "-e", "-1"]) == 2  # a usage error


def test_cli_index_build_decoys_and_info(tmp_path: Path, ecoli_fasta: Path, tiny_checkpoint: Path) -> None:
    from esmsearch.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        args = ["index", "build", str(ecoli_fasta), "--model", str(tiny_checkpoint), "--device", "cpu"]
        assert main([*args, "-o", str(tmp_path / "a"), "--no-progress", "--decoys", "12", "--decoy-seed", "4"]) == 0
        assert main([*args, "-o", str(tmp_path / "b"), "--no-progress", "--decoys", "0"]) == 0
    assert "decoys: 12 shuffled database sequences" in out.getvalue()
    assert "decoys: none (--decoys 0)" in out.getvalue()
    m = Manifest.read(tmp_path / "a")
    assert m.decoys is not None and (m.decoys.count, m.decoys.seed) == (12, 4)
    assert Manifest.read(tmp_path / "b").decoys is None
    for name, expected in (("a", f"12 ({DECOY_METHOD}, seed 4)"), ("b", "none: hits carry no E-values")):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["index", "info", str(tmp_path / name)]) == 0
        row = next(line for line in out.getvalue().splitlines() if line.startswith("decoys"))
        assert expected in row
    with contextlib.redirect_stderr(io.StringIO()):
        assert main([*args, "-o", str(tmp_path / "c"), "--decoys", "-5"]) == 2


# -- the scheduler and live reloads ------------------------------------------------------------


def test_batched_evalues_equal_unbatched_and_a_bad_request_fails_alone(
    small_index: Path, tmp_path: Path, tiny_embedder: Embedder, db
) -> None:  # type: ignore[no-untyped-def]
    """Several requests in one batch get the E-values each would get alone; a max_evalue request
    that meets an index without decoys (a reload raced its validation) fails alone."""
    import threading

    engine = SearchEngine(Index.open(small_index), tiny_embedder)
    entered, release = threading.Event(), threading.Event()
    original = engine.embed
    calls: list[int] = []

    def gated(sequences: Any) -> Any:
        calls.append(len(sequences))
        entered.set()
        assert release.wait(30)
        return original(sequences)

    engine.embed = gated  # type: ignore[method-assign]
    queued = threading.Semaphore(0)
    batcher = DynamicBatcher(
        engine,
        BatchingConfig(enabled=True, max_wait_ms=0.0, max_batch_toks=100_000),
        admission=Admission(),
        on_enqueue=lambda depth: queued.release(),
    )
    try:
        first = batcher.submit_search([db[0].sequence], k=5)
        assert entered.wait(30)
        futures = [batcher.submit_search([db[i].sequence], k=5) for i in (1, 2, 3)]
        for _ in range(4):
            assert queued.acquire(timeout=30)
        release.set()
        batched = [f.result(timeout=30) for f in futures]
        first.result(timeout=30)
        assert calls == [1, 3]  # the three queued requests ran as one batch
        for i, res in zip((1, 2, 3), batched, strict=True):
            alone = engine.search_vectors(tiny_embedder.embed([db[i].sequence]), 5)
            # equal up to the float32 noise of packed vs single forward passes (~1e-6 in the vectors)
            np.testing.assert_allclose([h.evalue for h in res.hits[0]], [h.evalue for h in alone[0]], rtol=2e-3)
        # swap in an index without decoys, then batch a max_evalue request with a plain one
        engine.swap_index(Index.open(_strip_decoys(small_index, tmp_path / "old")))
        entered.clear()
        release.clear()
        blocker = batcher.submit_search([db[0].sequence], k=1)
        assert entered.wait(30)
        plain = batcher.submit_search([db[4].sequence], k=3)
        filtered = batcher.submit_search([db[5].sequence], k=3, max_evalue=1.0)
        for _ in range(3):
            assert queued.acquire(timeout=30)
        release.set()
        blocker.result(timeout=30)
        assert [h.evalue for h in plain.result(timeout=30).hits[0]] == [None, None, None]
        with pytest.raises(EvaluesUnavailableError, match="no decoys"):
            filtered.result(timeout=30)
    finally:
        release.set()
        batcher.close()
        engine.close()


def test_a_swapped_index_brings_its_own_decoys(
    small_index: Path, tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, db
) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "other"
    build_index(ecoli_fasta, other, model="unused", embedder=tiny_embedder, decoys=20, decoy_seed=9)
    engine = SearchEngine(Index.open(small_index), tiny_embedder)
    try:
        vector = tiny_embedder.embed([db[3].sequence])
        before = engine.search_vectors(vector, 5)[0]
        engine.swap_index(Index.open(other))
        after = engine.search_vectors(vector, 5)[0]
        with Index.open(other) as index:
            scores, _ = index.search(vector, 5)
            expected = index.evalues(vector, scores)[0]
        assert [h.target_id for h in after] == [h.target_id for h in before]  # same database
        np.testing.assert_allclose([h.evalue for h in after], expected, rtol=1e-5)
        assert [h.evalue for h in after] != [h.evalue for h in before]  # other decoys, other E-values
    finally:
        engine.close()


def test_requests_batched_together_each_get_their_own_evalue_db_size(
    small_index: Path, tiny_embedder: Embedder, db
) -> None:  # type: ignore[no-untyped-def]
    """Three requests for the same query in one batch, with N unset (the engine's default 400),
    40 and 4000: E-values 10 x, 1 x and 100 x those at the index's 40 sequences."""
    import threading

    engine = SearchEngine(Index.open(small_index), tiny_embedder, evalue_db_size=400)
    entered, release = threading.Event(), threading.Event()
    original = engine.embed
    calls: list[int] = []

    def gated(sequences: Any) -> Any:
        calls.append(len(sequences))
        entered.set()
        assert release.wait(30)
        return original(sequences)

    engine.embed = gated  # type: ignore[method-assign]
    queued = threading.Semaphore(0)
    batcher = DynamicBatcher(
        engine,
        BatchingConfig(enabled=True, max_wait_ms=0.0, max_batch_toks=100_000),
        admission=Admission(),
        on_enqueue=lambda depth: queued.release(),
    )
    try:
        first = batcher.submit_search([db[0].sequence], k=5)
        assert entered.wait(30)
        sizes = (None, 40, 4000)
        futures = [batcher.submit_search([db[7].sequence], k=5, evalue_db_size=n) for n in sizes]
        for _ in range(4):
            assert queued.acquire(timeout=30)
        release.set()
        first.result(timeout=30)
        got = [[h.evalue for h in f.result(timeout=30).hits[0]] for f in futures]
        assert calls == [1, 3]  # one batch
        with Index.open(small_index) as index:
            vector = tiny_embedder.embed([db[7].sequence])
            base = index.evalues(vector, index.search(vector, 5)[0])[0]  # N = the index's 40
        assert index.count == 40
        for factor, evalues in zip((10, 1, 100), got, strict=True):
            np.testing.assert_allclose(evalues, factor * base, rtol=2e-3)
        with Index.open(small_index) as index, pytest.raises(ConfigError, match="evalue_db_size"):
            SearchEngine(index, tiny_embedder, evalue_db_size=0)
    finally:
        release.set()
        batcher.close()
        engine.close()
