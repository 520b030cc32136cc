"""Significance of hits: E-values from a per-query extreme-value fit to decoy scores.

A cosine score alone does not say whether a hit is real: mean-pooled ESM-2 cosines
of unrelated proteins are often high, and how high depends on the query (its length
and composition). Like BLAST, HMMER and Foldseek for their alignment scores,
esmsearch turns each hit's score into an **E-value**: the expected number of
database sequences *unrelated to the query* that score at least as high against it.
E-values are >= 0, lower is more significant; E <= 0.01 is a common cut-off.

Method
------
**Decoys (build time).** A seeded sample of ``count`` database sequences (about
:data:`DEFAULT_DECOYS`, or every sequence of a smaller database) is drawn without
replacement and the residues of each are shuffled (same length and composition,
no homology left: the "shuffled sequence" null of sequence-comparison statistics,
e.g. Pearson 1998, J Mol Biol 276:71-84). The decoys are embedded by the indexer
with the model, layer, pooling and precision of the index and stored in the index
directory (``decoys.npy``, float32 ``[count, dim]``, L2-normalised, in a random
order); the manifest records :class:`DecoySettings`.

**Per-query null (search time).** For a query embedding ``q`` the cosine scores
against all decoys are one matrix product, ``s_j = q . d_j`` (``j = 1..M``). Each is
mapped to ``u = -ln(1 - s)`` (:func:`tail_transform`; a cosine is at most 1, and
near that bound the null scores thin out like a power of ``1 - s``, which this maps
to an exponential tail, the domain of the Gumbel law). The ``u`` are cut into
``M // B`` consecutive blocks of ``B`` decoys (:attr:`DecoySettings.block_size`,
:data:`DEFAULT_BLOCK_SIZE` = 100; a remainder is left out), and the block maxima
are described by a generalised extreme value (GEV) distribution,

    P(max of B decoy scores has u' < u) = exp(-t(u)),
    t(u) = (1 + xi (u - mu) / sigma) ** (-1 / xi)      (t = exp(-(u - mu) / sigma) if xi = 0),

whose location ``mu`` and scale ``sigma`` are fitted per query from the first two
L-moments of its block maxima (:func:`fit_gev`; Hosking, Wallis & Wood 1985), and
whose shape ``xi`` is one number per index (:attr:`DecoySettings.shape`), estimated
at build time by the regional L-moment algorithm (:func:`regional_shape`; Hosking &
Wallis 1997) from the block maxima of a sample of database sequences scored as
pseudo-queries against the decoys (each without the decoy made from itself). The
GEV family is max-stable: the maximum of ``n`` such scores is GEV with the same
shape, so one unrelated database sequence exceeds ``u`` with probability

    p(u) = 1 - exp(-t(u) / B),

and among ``N`` database sequences (the index's count) the expected number that do is

    E(s) = N p(u(s))  ~=  (N / B) t(u(s))   for small E,

which for ``xi = 0`` is Karlin & Altschul's ``E = K m n exp(-lambda S)`` with
``S = u``, ``lambda = 1 / sigma`` and ``K m n = (N / B) exp(mu / sigma)``. Doubling the
database doubles every E-value, and ``E <= N`` always. With ``xi < 0`` the GEV has an
upper end point ``mu - sigma / xi``; scores beyond it (a self-hit, ``s = 1``) get E = 0,
as BLAST reports 0.0 for the strongest alignments.

Why not a Gumbel fitted to the raw cosines, as for alignment scores? Measured on
held-out null sequences (``benchmarks/evalue_calibration.py``: 200 yeast queries
against 20,000 shuffled *E. coli* sequences, random-weight ``esm2_t6_8M``), the raw
cosines of one query are strongly left-skewed with a short upper tail (skewness
-3.4), outside the Gumbel domain: a Gumbel fitted to maxima of 100 decoys and scaled
to 20,000 sequences gave 0.35 hits per query with E <= 10 and 0.015 with E <= 1 (3x
and 67x too few). Gumbel on ``u`` gave 0.96, 0.49 and 0.15 times the expected hits at
E <= 10, 1 and 0.1, still 7x too few at 0.1; a GEV with a free shape per query fitted an end point below the null's
largest scores, so null hits got E = 0. One shape per index, location and scale per
query, came within a factor of 2 at E = 0.01 .. 100 (table in the README).

Sources: Karlin S, Altschul SF (1990) PNAS 87:2264-8 (E-value of a score,
``E = K m n exp(-lambda S)``, ``P = 1 - exp(-E)``); Eddy SR (2008) PLoS Comput Biol
4:e1000069 (HMMER: extreme-value location fitted per model to scores of random
sequences, ``E = N P(S > s)`` over the ``N`` target sequences); van Kempen M et al.
(2023) Nat Biotechnol 42:243-6 (Foldseek: ``P = 1 - exp(-exp(-lambda (S - mu)))``
with per-query ``mu`` and ``lambda``, predicted by a small network from the query's
composition and length, scaled to the database size); Hosking JRM, Wallis JR, Wood
EF (1985) Technometrics 27:251-61 (GEV by probability-weighted moments, the shape
from the L-skewness); Hosking JRM, Wallis JR (1997) Regional Frequency Analysis: an
Approach Based on L-Moments, Cambridge University Press (one shape for many sites,
each with its own location and scale); Hosking JRM (1990) J R Stat Soc B 52:105-24
(L-moments). Where Foldseek predicts per-query parameters, esmsearch measures them
on the query's own decoy scores.

Scores keep their meaning (cosine in [-1, 1], higher = closer) and results stay
sorted by cosine score: for one query the E-value never rises as the score rises.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from esmsearch.errors import ConfigError, IndexFormatError

__all__ = [
    "DECOYS_FILE",
    "DECOY_METHOD",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_DECOYS",
    "DEFAULT_DECOY_SEED",
    "MAX_SHAPE",
    "MIN_BLOCKS",
    "MIN_SHAPE",
    "PSEUDO_QUERIES",
    "DecoyNull",
    "DecoySettings",
    "GevFit",
    "block_maxima",
    "block_size_for",
    "check_decoy_vectors",
    "decoy_sequences",
    "evalues_from_fit",
    "fit_gev",
    "l_moments",
    "pseudo_query_rows",
    "regional_shape",
    "sample_decoy_rows",
    "shape_from_lskewness",
    "shuffle_residues",
    "tail_transform",
]

#: File name of the decoy vectors in an index directory.
DECOYS_FILE: Final = "decoys.npy"
#: The decoy method recorded in manifests: residues of sampled database sequences
#: shuffled by a seeded NumPy PCG64 generator (see :func:`decoy_sequences`), nulls
#: fitted as described in this module.
DECOY_METHOD: Final = "shuffled_database_sample"
#: Default number of decoys (fewer for a smaller database: one per sequence).
DEFAULT_DECOYS: Final = 10_000
#: Default seed of the decoy sample and shuffles.
DEFAULT_DECOY_SEED: Final = 0
#: Default decoys per block whose maximum the extreme-value distribution describes.
DEFAULT_BLOCK_SIZE: Final = 100
#: Fewest blocks a decoy set is cut into (small decoy sets get smaller blocks).
MIN_BLOCKS: Final = 10
#: Database sequences scored as pseudo-queries to estimate an index's shape (fewer
#: in a smaller database).
PSEUDO_QUERIES: Final = 500
#: Range the regional shape is clamped to. Hosking's L-skewness approximation is
#: accurate to about 1e-3 there, and with ``xi >= -0.25`` the GEV end point lies at
#: least 4 scales above the location.
MIN_SHAPE: Final = -0.25
MAX_SHAPE: Final = 0.25
#: Smallest ``1 - s`` used by :func:`tail_transform` (float32 cosines reach 1 + 1e-7).
MIN_DISTANCE: Final = 1e-7
#: Smallest GEV scale used, in ``u`` units (a query whose decoy maxima are all equal).
MIN_SCALE: Final = 1e-9
#: Queries per matrix product against the decoys (bounds memory: QUERY_CHUNK x count floats).
QUERY_CHUNK: Final = 256
#: Euler-Mascheroni constant (the Gumbel mean is mu + EULER * sigma).
EULER: Final = 0.5772156649015329


def block_size_for(count: int, preferred: int = DEFAULT_BLOCK_SIZE) -> int:
    """Decoys per block for a decoy set of ``count``: ``preferred``, or smaller so that
    there are at least :data:`MIN_BLOCKS` blocks (at least 1).

    Raises:
        ConfigError: ``count`` or ``preferred`` below 1.
    """
    if count < 1 or preferred < 1:
        raise ConfigError(f"decoy count and block size must be >= 1, got {count} and {preferred}")
    return max(1, min(preferred, count // MIN_BLOCKS))


@dataclass(frozen=True)
class DecoySettings:
    """The decoy set of an index (``decoys`` in ``manifest.json``).

    Attributes:
        count: number of decoys, >= 3 (rows of ``decoys.npy``).
        seed: seed of the sample of database sequences and of their shuffles, >= 0.
        method: how decoys were made and nulls fitted; :data:`DECOY_METHOD`.
        block_size: decoys per block whose maximum the per-query extreme-value
            distribution describes, 1 .. ``count``; the ``count // block_size``
            blocks must number >= 3 (an L-moment fit needs 3).
        shape: the index's GEV shape ``xi`` of block maxima of ``u = -ln(1 - s)``,
            in [:data:`MIN_SHAPE`, :data:`MAX_SHAPE`] (:meth:`DecoyNull.estimate_shape`).

    Raises:
        ConfigError: a value out of range or an unknown method.
    """

    count: int
    seed: int
    method: str = DECOY_METHOD
    block_size: int = DEFAULT_BLOCK_SIZE
    shape: float = 0.0

    def __post_init__(self) -> None:
        for name in ("count", "seed", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"decoys.{name} must be an integer, got {value!r}")
        if self.count < 3:
            raise ConfigError(f"decoys.count must be >= 3, got {self.count}")
        if self.seed < 0:
            raise ConfigError(f"decoys.seed must be >= 0, got {self.seed}")
        if not 1 <= self.block_size <= self.count:
            raise ConfigError(f"decoys.block_size must be in [1, count={self.count}], got {self.block_size}")
        if self.count // self.block_size < 3:
            raise ConfigError(
                f"{self.count} decoys in blocks of {self.block_size} give fewer than 3 blocks; "
                "the extreme-value fit needs at least 3 block maxima"
            )
        if isinstance(self.shape, bool) or not isinstance(self.shape, int | float):
            raise ConfigError(f"decoys.shape must be a number, got {self.shape!r}")
        if not MIN_SHAPE <= self.shape <= MAX_SHAPE:  # also NaN
            raise ConfigError(f"decoys.shape must be in [{MIN_SHAPE}, {MAX_SHAPE}], got {self.shape!r}")
        if self.method != DECOY_METHOD:
            raise ConfigError(f"unknown decoy method {self.method!r}; this esmsearch makes {DECOY_METHOD!r}")

    @property
    def blocks(self) -> int:
        """Number of block maxima each query's fit uses (``count // block_size``)."""
        return self.count // self.block_size

    def same_decoys(self, other: DecoySettings | None) -> bool:
        """Whether ``other`` names the same decoy vectors (count, seed, method, block size;
        the shape is estimated from them, so it may differ)."""
        return other is not None and (self.count, self.seed, self.method, self.block_size) == (
            other.count,
            other.seed,
            other.method,
            other.block_size,
        )

    @classmethod
    def for_database(
        cls, n_sequences: int, requested: int = DEFAULT_DECOYS, seed: int = DEFAULT_DECOY_SEED
    ) -> DecoySettings | None:
        """The decoy set a build of ``n_sequences`` makes when ``requested`` decoys are asked for.

        ``count = min(requested, n_sequences)`` (decoys are drawn without replacement);
        ``block_size`` from :func:`block_size_for`.

        Returns:
            The settings (``shape`` 0 until estimated), or ``None`` when ``requested``
            is 0 (no E-values) or the database has fewer than 3 sequences (no fit
            possible).

        Raises:
            ConfigError: ``requested`` or ``seed`` negative.
        """
        if requested < 0:
            raise ConfigError(f"number of decoys must be >= 0 (0 = no E-values), got {requested}")
        if seed < 0:
            raise ConfigError(f"decoy seed must be >= 0, got {seed}")
        count = min(requested, n_sequences)
        if count < 3:
            return None
        return cls(count=count, seed=seed, block_size=block_size_for(count))

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``decoys`` object: ``{"count", "seed", "method", "block_size", "shape"}``."""
        return {
            "count": self.count,
            "seed": self.seed,
            "method": self.method,
            "block_size": self.block_size,
            "shape": self.shape,
        }

    @classmethod
    def from_json(cls, data: object, *, source: str = "manifest") -> DecoySettings:
        """Read a manifest's ``decoys`` object.

        Raises:
            IndexFormatError: not an object, missing or extra keys, or values out of range.
        """
        keys = {"count", "seed", "method", "block_size", "shape"}
        if not isinstance(data, dict) or set(data) != keys:
            raise IndexFormatError(
                f"{source}: 'decoys' must be null or an object with keys {sorted(keys)}, got {data!r}"
            )
        try:
            return cls(**data)
        except ConfigError as exc:
            raise IndexFormatError(f"{source}: bad 'decoys' ({exc})") from exc


# -- decoy sequences ---------------------------------------------------------------------------
def sample_decoy_rows(n_sequences: int, settings: DecoySettings) -> np.ndarray:
    """The database rows whose shuffles become the decoys, in decoy order.

    A seeded draw without replacement (NumPy ``default_rng([seed, 0]).choice``); its
    order is random, so consecutive blocks of decoys are exchangeable even when the
    database is sorted (by length, family, ...).

    Returns:
        int64 ``[settings.count]`` distinct rows in ``[0, n_sequences)``.

    Raises:
        ConfigError: the database has fewer sequences than ``settings.count``.
    """
    if settings.count > n_sequences:
        raise ConfigError(f"{settings.count} decoys cannot be drawn from {n_sequences} database sequences")
    rng = np.random.default_rng([settings.seed, 0])
    rows: np.ndarray = rng.choice(n_sequences, size=settings.count, replace=False).astype(np.int64)
    return rows


def shuffle_residues(sequences: Iterable[str], seed: int) -> list[str]:
    """Shuffle the residues of each sequence (same length and composition).

    Args:
        sequences: validated residue strings (ASCII upper case).
        seed: seed of the shuffles (NumPy ``default_rng([seed, 1])``, one
            permutation per sequence in the order given).

    Returns:
        The shuffled sequences, in input order.
    """
    rng = np.random.default_rng([seed, 1])
    out = []
    for seq in sequences:
        residues = np.frombuffer(seq.encode("ascii"), dtype=np.uint8)
        out.append(rng.permutation(residues).tobytes().decode("ascii"))
    return out


def decoy_sequences(database: Iterable[str], n_sequences: int, settings: DecoySettings) -> list[str]:
    """The decoy sequences of a database: shuffles of a seeded sample of its sequences.

    Args:
        database: the database's residue strings in row order (streamed once; only
            the sampled ones are kept).
        n_sequences: number of database sequences (from validation).
        settings: count and seed (see :func:`sample_decoy_rows`, :func:`shuffle_residues`).

    Returns:
        ``settings.count`` shuffled sequences in decoy order; the same for the same
        database, count and seed.

    Raises:
        ConfigError: the database yields fewer than ``n_sequences`` sequences (it
            changed since it was validated), or fewer than ``settings.count``.
    """
    rows = sample_decoy_rows(n_sequences, settings)
    slot_of = {int(row): i for i, row in enumerate(rows)}
    picked: list[str | None] = [None] * settings.count
    seen = 0
    for row, seq in enumerate(database):
        seen += 1
        slot = slot_of.get(row)
        if slot is not None:
            picked[slot] = seq
    if seen != n_sequences:
        raise ConfigError(f"the database yielded {seen} sequences, {n_sequences} expected (did it change?)")
    return shuffle_residues([s for s in picked if s is not None], settings.seed)


# -- the fit -----------------------------------------------------------------------------------
def tail_transform(scores: np.ndarray) -> np.ndarray:
    """``u = -ln(1 - s)`` of cosine scores, in float64 (``1 - s`` floored at :data:`MIN_DISTANCE`).

    Monotone increasing, so the order of hits is kept; the bound ``s <= 1`` becomes
    ``u <= 16.1`` (``-ln 1e-7``).
    """
    s = np.asarray(scores, dtype=np.float64)
    u: np.ndarray = -np.log(np.maximum(1.0 - s, MIN_DISTANCE))
    return u


def block_maxima(scores: np.ndarray, block_size: int) -> np.ndarray:
    """Maxima of consecutive blocks of ``block_size`` columns.

    Args:
        scores: ``[q, M]`` scores of each query against ``M`` decoys.
        block_size: columns per block, 1 .. M; the last ``M % block_size`` columns
            are left out.

    Returns:
        ``[q, M // block_size]`` block maxima, same dtype as ``scores``.

    Raises:
        ValueError: ``scores`` is not 2-D or ``block_size`` is out of range.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [queries, decoys], got shape {scores.shape}")
    q, m = scores.shape
    if not 1 <= block_size <= m:
        raise ValueError(f"block_size must be in [1, {m}], got {block_size}")
    n_blocks = m // block_size
    maxima: np.ndarray = scores[:, : n_blocks * block_size].reshape(q, n_blocks, block_size).max(axis=2)
    return maxima


def l_moments(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample L-moments of each row: ``(l1, l2, t3)`` = mean, L-scale, L-skewness.

    Unbiased estimators from probability-weighted moments ``b_r`` of the sorted
    sample (Hosking 1990): ``l1 = b0``, ``l2 = 2 b1 - b0``, ``t3 = (6 b2 - 6 b1 + b0) / l2``.

    Args:
        samples: ``[q, n]``, ``n >= 3`` finite samples per row.

    Returns:
        Three float64 ``[q]`` arrays; ``t3`` is 0 for a row whose samples are all equal.

    Raises:
        ValueError: fewer than 3 samples per row, or non-finite samples.
    """
    x = np.sort(np.asarray(samples, dtype=np.float64), axis=1)
    if x.ndim != 2 or x.shape[1] < 3:
        raise ValueError(f"need [rows, n >= 3] samples, got shape {np.shape(samples)}")
    if not np.isfinite(x).all():
        raise ValueError("samples must be finite")
    n = x.shape[1]
    j = np.arange(n, dtype=np.float64)
    b0 = x.mean(axis=1)
    b1 = (x * (j / (n - 1))).mean(axis=1)
    b2 = (x * (j * (j - 1) / ((n - 1) * (n - 2)))).mean(axis=1)
    l2 = 2.0 * b1 - b0
    l3 = 6.0 * b2 - 6.0 * b1 + b0
    with np.errstate(invalid="ignore", divide="ignore"):
        t3 = np.where(l2 > 0, l3 / l2, 0.0)
    return b0, l2, t3


def shape_from_lskewness(t3: float) -> float:
    """GEV shape ``xi`` of an L-skewness ``t3`` (Hosking, Wallis & Wood 1985, eq. 14).

    ``c = 2 / (3 + t3) - ln 2 / ln 3``, ``k = 7.8590 c + 2.9554 c^2`` (accurate to 9e-4
    for ``-0.5 <= t3 <= 0.5``); Hosking's ``k`` is ``-xi`` in this module's sign
    convention (``xi > 0``: heavy upper tail; ``xi < 0``: an upper end point).
    A Gumbel (``xi = 0``) has ``t3 = ln(9/8) / ln 2 = 0.1699``.
    """
    c = 2.0 / (3.0 + t3) - math.log(2.0) / math.log(3.0)
    return -(7.8590 * c + 2.9554 * c * c)


def fit_gev(samples: np.ndarray, shape: float) -> tuple[np.ndarray, np.ndarray]:
    """GEV location and scale of each row of ``samples``, with the shape given.

    From the first two L-moments (Hosking, Wallis & Wood 1985), with ``k = -xi``::

        sigma = l2 k / ((1 - 2^-k) Gamma(1 + k)),   mu = l1 - sigma (1 - Gamma(1 + k)) / k,

    and for ``xi = 0`` (Gumbel) ``sigma = l2 / ln 2``, ``mu = l1 - EULER sigma``.

    Args:
        samples: ``[q, n]`` (``n >= 3``) block maxima, finite.
        shape: the GEV shape ``xi`` (e.g. :func:`regional_shape`).

    Returns:
        ``(mu, sigma)``: float64 ``[q]`` locations and scales (``sigma >= 0``).

    Raises:
        ValueError: see :func:`l_moments`.
    """
    l1, l2, _ = l_moments(samples)
    k = -shape
    if abs(k) < 1e-9:
        sigma = l2 / math.log(2.0)
        return l1 - EULER * sigma, sigma
    g = math.gamma(1.0 + k)
    sigma = l2 * k / ((1.0 - 2.0**-k) * g)
    return l1 - sigma * (1.0 - g) / k, sigma


def regional_shape(samples: np.ndarray) -> float:
    """One GEV shape for many rows ("sites") of block maxima: the regional L-moment algorithm.

    The mean of the rows' sample L-skewnesses is converted to a shape with
    :func:`shape_from_lskewness` (Hosking & Wallis 1997, sect. 6.2, equal record
    lengths), then clamped to [:data:`MIN_SHAPE`, :data:`MAX_SHAPE`].

    Args:
        samples: ``[sites, n]`` (``n >= 3``) block maxima, finite.

    Returns:
        The shape ``xi``.

    Raises:
        ValueError: see :func:`l_moments`.
    """
    _, _, t3 = l_moments(samples)
    return min(MAX_SHAPE, max(MIN_SHAPE, shape_from_lskewness(float(t3.mean()))))


@dataclass(frozen=True)
class GevFit:
    """Per-query null distributions: GEVs of the maxima of blocks of transformed decoy scores.

    Attributes:
        loc: float64 ``[q]`` location ``mu`` of the block maximum of ``u = -ln(1 - s)``.
        scale: float64 ``[q]`` scale ``sigma`` (``u`` units, >= :data:`MIN_SCALE`).
        shape: the index's shape ``xi``.
        block_size: decoys per block ``B``.
    """

    loc: np.ndarray
    scale: np.ndarray
    shape: float
    block_size: int


def evalues_from_fit(scores: np.ndarray, fit: GevFit, db_size: int) -> np.ndarray:
    """E-values of cosine scores: ``E(s) = N (1 - exp(-t(u(s)) / B))`` (see the module docstring).

    Args:
        scores: ``[q, k]`` cosine scores of each query's hits (row i = query i of ``fit``).
        fit: the queries' null fits.
        db_size: ``N``, number of database sequences searched (>= 0).

    Returns:
        float64 ``[q, k]`` E-values in ``[0, N]``, lower = more significant; for one
        query, non-increasing as the score rises.

    Raises:
        ValueError: ``scores`` has another number of rows than ``fit``, or ``db_size`` < 0.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != fit.loc.shape[0]:
        raise ValueError(f"scores must be [{fit.loc.shape[0]}, k], got shape {s.shape}")
    if db_size < 0:
        raise ValueError(f"db_size must be >= 0, got {db_size}")
    z = (tail_transform(s) - fit.loc[:, None]) / fit.scale[:, None]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if fit.shape == 0.0:
            t = np.exp(-z)
        else:
            a = 1.0 + fit.shape * z
            # Beyond the end point (xi < 0) no null block maximum reaches: t = 0. Below the
            # lower bound (xi > 0) every block maximum exceeds: t = inf.
            t = np.where(a > 0, np.power(np.maximum(a, 0.0), -1.0 / fit.shape), 0.0 if fit.shape < 0 else np.inf)
    p_one = -np.expm1(-t / fit.block_size)  # P(one unrelated score >= s)
    evalues: np.ndarray = db_size * p_one
    return evalues


class DecoyNull:
    """The stored decoys of an index and the per-query null fitted to them.

    Args:
        decoys: float32 ``[count, dim]`` L2-normalised decoy embeddings (may be
            memory-mapped), in decoy order.
        settings: the manifest's decoy settings (``count`` rows, ``block_size``, ``shape``).

    Raises:
        IndexFormatError: ``decoys`` is not float32 ``[settings.count, dim]``, or the
            blocks hold fewer than 3 maxima (no L-moment fit).

    Thread-safe: read-only after construction.
    """

    def __init__(self, decoys: np.ndarray, settings: DecoySettings) -> None:
        if decoys.ndim != 2 or decoys.shape[0] != settings.count or decoys.dtype != np.float32:
            raise IndexFormatError(
                f"decoys are {decoys.dtype} {list(decoys.shape)}, expected float32 [{settings.count}, dim]"
            )
        if settings.blocks < 3:
            raise IndexFormatError(f"decoys: {settings.blocks} blocks; the fit needs at least 3")
        self.decoys = decoys
        self.settings = settings

    @property
    def dim(self) -> int:
        return int(self.decoys.shape[1])

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Cosine scores of each query against every decoy: float32 ``[q, count]``.

        Args:
            queries: float32 ``[q, dim]``, L2-normalised.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        out: np.ndarray = q @ self.decoys.T
        return out

    def block_maxima(self, queries: np.ndarray, *, exclude: np.ndarray | None = None) -> np.ndarray:
        """Block maxima of ``u = -ln(1 - s)`` over the decoys, one row per query.

        One matrix product per :data:`QUERY_CHUNK` queries.

        Args:
            queries: float32 ``[q, dim]``, L2-normalised query embeddings.
            exclude: optional int ``[q]``: a decoy column to leave out for each query
                (-1: none), e.g. the decoy made from the query itself. Its score is
                replaced by the query's median decoy score, which leaves the block
                maxima as they would be without it (unless its block has one decoy).

        Returns:
            float64 ``[q, count // block_size]``.

        Raises:
            ValueError: ``queries`` is not ``[q, dim]``.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors must be [q, {self.dim}], got shape {queries.shape}")
        n = queries.shape[0]
        out = np.empty((n, self.settings.blocks), dtype=np.float64)
        for start in range(0, n, QUERY_CHUNK):
            u = tail_transform(self.scores(queries[start : start + QUERY_CHUNK]))
            if exclude is not None:
                part = exclude[start : start + QUERY_CHUNK]
                rows = np.flatnonzero(part >= 0)
                u[rows, part[rows]] = np.median(u[rows], axis=1)
            out[start : start + len(u)] = block_maxima(u, self.settings.block_size)
        return out

    def fit(self, queries: np.ndarray) -> GevFit:
        """Fit each query's null: location and scale of its block maxima at the index's shape.

        Args:
            queries: float32 ``[q, dim]``, L2-normalised query embeddings.

        Returns:
            The per-query fits (scale floored at :data:`MIN_SCALE`).

        Raises:
            ValueError: ``queries`` is not ``[q, dim]``.
        """
        loc, scale = fit_gev(self.block_maxima(queries), self.settings.shape)
        return GevFit(loc, np.maximum(scale, MIN_SCALE), self.settings.shape, self.settings.block_size)

    def evalues(self, queries: np.ndarray, scores: np.ndarray, db_size: int) -> np.ndarray:
        """E-values of hits: fit each query's null, then :func:`evalues_from_fit`.

        Args:
            queries: float32 ``[q, dim]``, L2-normalised query embeddings.
            scores: ``[q, k]`` cosine scores of the queries' hits (any padding columns
                get E-values too; callers drop them).
            db_size: number of database sequences of the index searched.

        Returns:
            float32 ``[q, k]`` E-values in ``[0, db_size]`` (float32, as the API
            carries them: values below ~1.4e-45 are 0).
        """
        fit = self.fit(queries)
        out: np.ndarray = evalues_from_fit(scores, fit, db_size).astype(np.float32)
        return out

    def estimate_shape(self, pseudo_queries: np.ndarray, own_decoys: np.ndarray) -> float:
        """The index's regional shape from pseudo-queries (see :func:`regional_shape`).

        Args:
            pseudo_queries: float32 ``[p, dim]`` embeddings of database sequences
                (:func:`pseudo_query_rows`), ``p >= 1``.
            own_decoys: int ``[p]``: the column of the decoy made from each
                pseudo-query's own sequence, -1 if none. Left out: a shuffle keeps
                composition and length, so it can score far above the query's other
                decoys and would make the tail look heavier than for a query outside
                the database.

        Returns:
            The shape ``xi`` to record as :attr:`DecoySettings.shape`.
        """
        return regional_shape(self.block_maxima(pseudo_queries, exclude=own_decoys))


def pseudo_query_rows(n_sequences: int, seed: int, count: int = PSEUDO_QUERIES) -> np.ndarray:
    """Database rows scored as pseudo-queries for the shape: a seeded sample, sorted.

    Returns:
        int64 ``[min(count, n_sequences)]`` distinct rows (NumPy ``default_rng([seed, 3])``).
    """
    rng = np.random.default_rng([seed, 3])
    rows: np.ndarray = np.sort(rng.choice(n_sequences, size=min(count, n_sequences), replace=False)).astype(np.int64)
    return rows


def check_decoy_vectors(vectors: np.ndarray, settings: DecoySettings, dim: int) -> None:
    """Raise :class:`IndexFormatError` unless ``vectors`` is float32 ``[settings.count, dim]``."""
    if vectors.shape != (settings.count, dim) or vectors.dtype != np.float32:
        raise IndexFormatError(
            f"{DECOYS_FILE} is {vectors.dtype} {list(vectors.shape)}, expected float32 [{settings.count}, {dim}]"
        )
