"""Significance of hits: E-values from a per-query extreme-value fit to decoy scores.

A cosine score alone does not say whether a hit is real: mean-pooled ESM-2 cosines
of unrelated proteins are often high, and how high depends on the query (its length
and composition). Like BLAST, HMMER and Foldseek for their alignment scores,
esmsearch turns each hit's score into an **E-value**: the expected number of
database sequences *unrelated to the query* that score at least as high against it.
E-values are > 0, lower is more significant; E <= 0.01 is a common cut-off.

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
database doubles every E-value, and ``E <= N`` always. ``N`` is the index's count unless
the caller gives another (``--evalue-db-size`` on ``esmsearch serve``, the
``evalue_db_size`` request field: HMMER's ``-Z``, BLAST's ``-dbsize``), so E-values of
shards, replicas and versions of different sizes can be put on one scale.

**The tail beyond the GEV (no cliff).** With ``xi < 0`` the GEV has an upper end point
``mu - sigma / xi``: above it ``t = 0`` and every score would get E = 0 (a self-hit, and
any strong hit), so E-values would stop ranking the best hits. Near that end point the
GEV's tail is pure extrapolation of one regional shape estimate: its local exponential
scale ``sigma_loc(u) = -1 / (d ln t / du) = sigma + xi (u - mu)`` shrinks linearly to 0
there. esmsearch keeps the GEV only while ``sigma_loc >= f sigma``
(``f`` = :data:`TAIL_JOIN_SCALE` = 1/2), i.e. up to the join point

    u_j = mu + sigma (1 - f) / (-xi),     t(u_j) = f ** (1 / -xi),

and beyond it continues with the exponential (Gumbel-type, GPD shape 0) tail that has
the GEV's value and slope at the join,

    ln t(u) = ln t(u_j) - (u - u_j) / (f sigma)          for u > u_j,

(Coles 2001, sects. 3.1.2 and 4.2: the Gumbel/exponential tail is the ``xi -> 0`` member
of the GEV/GPD families; the same exponential high-score tail HMMER fits to its Forward
scores, Eddy 2008, and Karlin & Altschul's ``exp(-lambda S)``). Because ``ln t`` of a GEV
with ``xi < 0`` is concave in ``u``, this tangent lies above it: E-values beyond the
join are never smaller than the GEV's (conservative), they are finite, positive and
strictly decreasing in the score, and continuous (with their slope) at the join. For
the shape measured on real builds (``xi = -0.072``) the join lies at ``t = 6.6e-5``
per block of 100, i.e. at E = 0.013 for N = 20,000: the GEV is kept over the whole
range in which it was measured calibrated (E = 0.01 .. 100 at N = 20,000, below), and
the tail takes over where it was an untested extrapolation (E <= 1 at N >= 1.5e6).
Whether the null really thins out faster than exponentially that far is measured, not
assumed: ``benchmarks/evalue_calibration.py --null-db N`` (N >= 1e6 short shuffled
sequences) counts null hits at E <= 0.01 .. 10 and re-scores them with the GEV alone,
this tail, an exponential fitted to the top 20% of the block maxima (peaks over a
threshold, Coles 2001 ch. 4) and a Gumbel, and checks which of these predicts the
exceedances of held-out decoy block maxima. The tangent is the default because it
leaves the measured GEV range unchanged and errs on the conservative side beyond it.
For ``xi >= 0`` there is no end point and the GEV is used everywhere. E is computed in
log space in the tail, so it underflows only below the smallest float64
(:data:`MIN_EVALUE`, ~5e-324, the floor); the float32 that the API carries is floored at
its own smallest positive value, :data:`MIN_EVALUE_F32` (~1.4e-45), rather than
flushed to 0 (see :meth:`DecoyNull.evalues`).

Why not a Gumbel fitted to the raw cosines, as for alignment scores? Measured on
held-out null sequences (``benchmarks/evalue_calibration.py``: 200 yeast queries
against 20,000 shuffled *E. coli* sequences, random-weight ``esm2_t6_8M``), the raw
cosines of one query are strongly left-skewed with a short upper tail (skewness
-3.4), outside the Gumbel domain: a Gumbel fitted to maxima of 100 decoys and scaled
to 20,000 sequences gave 0.35 hits per query with E <= 10 and 0.015 with E <= 1 (3x
and 67x too few). Gumbel on ``u`` gave 0.96, 0.49 and 0.15 times the expected hits at
E <= 10, 1 and 0.1, still 7x too few at 0.1; a GEV with a free shape per query fitted an end point below the null's
largest scores, so null hits got E = 0. One shape per index, location and scale per
query, came within a factor of 2 at E = 0.01 .. 100 (table in docs/evalues.md).

Sources: Coles S (2001) An Introduction to Statistical Modeling of Extreme Values,
Springer (GEV and GPD families, the Gumbel/exponential limit ``xi -> 0``, end points of
``xi < 0`` fits); Karlin S, Altschul SF (1990) PNAS 87:2264-8 (E-value of a score,
``E = K m n exp(-lambda S)``, ``P = 1 - exp(-E)``); Eddy SR (2008) PLoS Comput Biol
4:e1000069, "A probabilistic model of local sequence alignment that simplifies
statistical significance estimation" (HMMER: location fitted per model to scores of
random sequences, an exponential high-score tail, ``E = N P(S > s)`` over the ``N``
target sequences, ``-Z`` to set ``N``); van Kempen M et al.
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
    "MIN_EVALUE",
    "MIN_EVALUE_F32",
    "MIN_SHAPE",
    "PSEUDO_QUERIES",
    "TAIL_JOIN_SCALE",
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
    "tail_join",
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
#: Fraction ``f`` of the GEV scale at which its local exponential scale ends the GEV's
#: range and the exponential tail takes over (``xi < 0`` only; see the module docstring).
TAIL_JOIN_SCALE: Final = 0.5
#: Smallest E-value :func:`evalues_from_fit` returns (the smallest positive float64,
#: a subnormal): E-values that underflow float64 are floored here, never 0.
MIN_EVALUE: Final = float(np.finfo(np.float64).smallest_subnormal)
#: Smallest E-value :meth:`DecoyNull.evalues` returns in float32, as ``Hit.evalue``
#: carries it (the smallest positive float32, a subnormal, ~1.4e-45): smaller E-values
#: are floored here rather than flushed to 0. The wire type stays float32 (changing a
#: proto field's type is a breaking change).
MIN_EVALUE_F32: Final = float(np.finfo(np.float32).smallest_subnormal)
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


def tail_join(fit: GevFit) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Where each query's GEV gives way to its exponential tail (see the module docstring).

    Args:
        fit: the queries' null fits.

    Returns:
        ``None`` for ``fit.shape >= 0`` (no end point: the GEV is used everywhere); else
        ``(u_join, log_t_join, tail_scale)``, float64 ``[q]`` each: the join point in
        ``u = -ln(1 - s)`` units, ``ln t`` there (the natural log of the expected number
        of a block's maxima above it), and the exponential tail's scale
        ``f sigma`` (:data:`TAIL_JOIN_SCALE`) in ``u`` units, > 0.
    """
    if fit.shape >= 0.0:
        return None
    f = TAIL_JOIN_SCALE
    u_join = fit.loc + fit.scale * ((1.0 - f) / -fit.shape)
    log_t_join = np.full(fit.loc.shape, math.log(f) / -fit.shape)
    return u_join, log_t_join, f * fit.scale


def _log_t(u: np.ndarray, fit: GevFit) -> np.ndarray:
    """``ln t(u)`` of each row's null: the GEV below its join point, the exponential tail above."""
    z: np.ndarray = (u - fit.loc[:, None]) / fit.scale[:, None]
    if fit.shape == 0.0:
        return -z
    with np.errstate(divide="ignore", invalid="ignore"):
        a = 1.0 + fit.shape * z
        # Below the lower bound (xi > 0) every block maximum exceeds: ln t = +inf. For xi < 0
        # a <= 0 only lies beyond the join point, where the tail below replaces it.
        log_t: np.ndarray = np.where(a > 0, np.log(np.maximum(a, 1e-300)) / -fit.shape, np.inf)
    join = tail_join(fit)
    if join is not None:
        u_join, log_t_join, tail_scale = join
        beyond = u > u_join[:, None]
        tail = log_t_join[:, None] - (u - u_join[:, None]) / tail_scale[:, None]
        log_t = np.where(beyond, tail, log_t)
    return log_t


def evalues_from_fit(scores: np.ndarray, fit: GevFit, db_size: int | np.ndarray) -> np.ndarray:
    """E-values of cosine scores: ``E(s) = N (1 - exp(-t(u(s)) / B))`` (see the module docstring).

    ``t`` is the GEV's up to each query's join point (:func:`tail_join`) and the
    exponential tail's beyond it, so no score gets E = 0.

    Args:
        scores: ``[q, k]`` cosine scores of each query's hits (row i = query i of ``fit``).
        fit: the queries' null fits.
        db_size: ``N``, number of database sequences the E-values are scaled to (the
            index's count, or an override such as ``--evalue-db-size``), >= 0: one
            integer for every query, or int ``[q]``, one per query.

    Returns:
        float64 ``[q, k]`` E-values in ``[MIN_EVALUE, N]`` (0 only where ``N = 0``), lower
        = more significant; for one query, non-increasing as the score rises, and
        strictly decreasing beyond the join point (up to a cosine of ``1 - 1e-7``,
        where :func:`tail_transform` saturates).

    Raises:
        ValueError: ``scores`` has another number of rows than ``fit``, or ``db_size`` is
            negative or has another shape than ``[]`` or ``[q]``.
    """
    s = np.asarray(scores, dtype=np.float64)
    q = fit.loc.shape[0]
    if s.ndim != 2 or s.shape[0] != q:
        raise ValueError(f"scores must be [{q}, k], got shape {s.shape}")
    n = np.asarray(db_size, dtype=np.float64)
    if n.shape not in ((), (q,)):
        raise ValueError(f"db_size must be one number or [{q}], got shape {n.shape}")
    if np.any(n < 0) or np.any(np.isnan(n)):
        raise ValueError(f"db_size must be >= 0, got {db_size}")
    n = n.reshape(-1, 1) if n.ndim == 1 else n
    log_t = _log_t(tail_transform(s), fit)
    log_b = math.log(fit.block_size)
    with np.errstate(over="ignore", under="ignore", divide="ignore"):
        p_one = -np.expm1(-np.exp(log_t) / fit.block_size)  # P(one unrelated score >= s)
        evalues = n * p_one
        # Where t / B < e^-30, p_one = t / B to 1e-13; take E = N t / B in log space there,
        # so that it underflows only below the smallest float64 (then: MIN_EVALUE).
        small = log_t - log_b < -30.0
        tiny = np.exp(np.minimum(np.log(np.maximum(n, 1.0)) + log_t - log_b, 0.0))
        evalues = np.where(small, tiny, evalues)
    out: np.ndarray = np.where(n > 0, np.maximum(evalues, MIN_EVALUE), 0.0)
    return out


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

    def evalues(self, queries: np.ndarray, scores: np.ndarray, db_size: int | np.ndarray) -> np.ndarray:
        """E-values of hits: fit each query's null, then :func:`evalues_from_fit`.

        Args:
            queries: float32 ``[q, dim]``, L2-normalised query embeddings.
            scores: ``[q, k]`` cosine scores of the queries' hits (any padding columns
                get E-values too; callers drop them).
            db_size: number of database sequences the E-values are scaled to (the
                index's count, or an override), >= 0; one for all queries, or int
                ``[q]``, one per query (see :func:`evalues_from_fit`).

        Returns:
            float32 ``[q, k]`` E-values in ``[MIN_EVALUE_F32, db_size]`` (float32, as
            the API carries them; E-values below the smallest positive float32, ~1.4e-45,
            are floored there, not flushed to 0, so none is 0 unless ``db_size`` is).
        """
        fit = self.fit(queries)
        e = evalues_from_fit(scores, fit, db_size)
        out: np.ndarray = np.where(e > 0, np.maximum(e, MIN_EVALUE_F32), 0.0).astype(np.float32)
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
