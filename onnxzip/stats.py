"""Running statistics of feature vectors: the input of the solver.

ZIPIT.md, "Statistics": for each feature space, stack the models' features into one vector and collect, over every
calibration sample, the mean and the covariance, from which the correlation matrix the matcher works on follows.
`FeatureStats` keeps only the count, the mean and the co-moment (the sum of outer products of the deviations from
the mean), so memory is O(D²) whatever the number of samples, and batches from several runs (or several tensors of
one space, or several workers) combine exactly (Chan, Golub & LeVeque's pairwise update).

Precision: the mean is summed in float64, and each batch is shifted by its own mean before its outer products
are taken, in float64, so they never cancel (a feature with a large mean and a small spread keeps its variance).
Float64 products are not only about accuracy here: merging permuted twins relies on exact ties (a feature and its
copy correlate exactly 1, in every pair), and float32 products would break those ties at the 1e-7 level and send
the greedy N-model zip down another path. The cost is bounded instead by using fewer rows (`calibration`'s
StatsSampling): a seeded subsample where a space has far more rows than features.
"""

from __future__ import annotations

import numpy as np

# A feature whose variance is below this fraction of its second moment E[x²] carries no more than rounding noise,
# so `correlation` treats it as constant instead of dividing noise by noise.
_RELATIVE_VARIANCE_FLOOR = 1e-10
# Rows of a D×D matrix worked on at a time where a whole temporary would double the memory.
_ROWS_PER_CHUNK = 256


class FeatureStats:
    """Running statistics of D-wide feature vectors, accumulated in float64.

    Parameters
    ----------
    width:
        D, the number of features per sample.
    full:
        Also keep the D×D co-moment, needed for `covariance` and `correlation`. With ``full=False`` only the
        per-feature mean and variance are available (memory O(D)).

    Attributes
    ----------
    count: number of samples seen.
    mean: (D,) the mean (see the property).
    m2_diag: (D,) sum of squared deviations from the mean.
    m2: (D, D) sum of outer products of the deviations from the mean, or None when not ``full``.
    """

    def __init__(self, width: int, full: bool = True):
        if int(width) != width or width < 1:
            raise ValueError(f"FeatureStats width must be a positive integer, got {width!r}")
        self.width = int(width)
        self.full = bool(full)
        self.count = 0
        self._mean = np.zeros(self.width, dtype=np.float64)
        self.m2_diag = np.zeros(self.width, dtype=np.float64)
        self.m2 = np.zeros((self.width, self.width), dtype=np.float64) if self.full else None

    def __repr__(self) -> str:
        return f"FeatureStats(width={self.width}, full={self.full}, count={self.count})"

    def update(self, features: np.ndarray) -> "FeatureStats":
        """Add S samples given as an (S, D) array of any real dtype. Returns self.

        Raises ValueError on a wrong shape or on NaN/inf values (a single one would poison every sum).
        """
        x = np.asarray(features)
        if x.ndim != 2:
            raise ValueError(
                f"FeatureStats.update expects a 2-D (samples, {self.width}) array, got shape {x.shape}; "
                "move the channel axis last and flatten the other axes into samples"
            )
        if x.shape[1] != self.width:
            raise ValueError(
                f"FeatureStats.update expects {self.width} features per sample, got shape {x.shape}"
            )
        x = x.astype(np.float64, copy=False)
        batch_sum = x.sum(axis=0)
        # a NaN or inf anywhere reaches its column's sum: x itself is scanned only when a sum is not finite
        if not np.isfinite(batch_sum).all():
            bad = x.size - int(np.count_nonzero(np.isfinite(x)))
            if bad:
                raise ValueError(
                    f"FeatureStats.update got {bad} non-finite value(s) (NaN or inf) among {x.size}; "
                    "check the calibration inputs and the model's numerics"
                )
        n = x.shape[0]
        if n == 0:
            return self
        batch_mean = batch_sum / n
        # deviations from the batch mean; their own mean `s` (what rounding leaves) is taken out of the co-moment
        xc = x - batch_mean
        s = xc.sum(axis=0) / n
        if self.full:
            batch_m2 = xc.T @ xc - n * np.outer(s, s)
            self._combine(n, batch_mean, np.diag(batch_m2).copy(), batch_m2)
        else:
            self._combine(n, batch_mean, np.einsum("sd,sd->d", xc, xc) - n * s * s, None)
        return self

    def _combine(self, n: int, mean: np.ndarray, m2_diag: np.ndarray, m2: np.ndarray | None) -> None:
        """Add n samples summarised by their mean and co-moments (Chan et al.'s pairwise formula)."""
        total = self.count + n
        delta = mean - self._mean
        weight = self.count * n / total
        self._mean = self._mean + delta * (n / total)
        self.m2_diag = self.m2_diag + m2_diag + weight * delta * delta
        if self.full:
            self.m2 = self.m2 + m2 + weight * np.outer(delta, delta)
        self.count = total

    def merge_from(self, other: "FeatureStats") -> "FeatureStats":
        """Add the samples summarised by another FeatureStats of the same width (e.g. another tensor of the same
        feature space, or another worker's share of the samples). Returns self."""
        if not isinstance(other, FeatureStats):
            raise ValueError(f"FeatureStats.merge_from expects a FeatureStats, got {type(other).__name__}")
        if other.width != self.width:
            raise ValueError(f"cannot merge FeatureStats of width {other.width} into one of width {self.width}")
        if self.full and not other.full:
            raise ValueError("cannot merge a FeatureStats without outer products (full=False) into a full one")
        if other.count:
            self._combine(other.count, other._mean, other.m2_diag, other.m2 if self.full else None)
        return self

    def _require_samples(self) -> None:
        if self.count == 0:
            raise ValueError("FeatureStats has no samples yet; call update() with calibration features first")

    def _require_full(self, what: str) -> None:
        if not self.full:
            raise ValueError(f"{what} needs the outer products; create FeatureStats(width, full=True)")

    @property
    def mean(self) -> np.ndarray:
        """(D,) mean of each feature."""
        self._require_samples()
        return self._mean.copy()

    def second_moment(self) -> np.ndarray:
        """(D,) E[x²] of each feature."""
        return self.variance() + self.mean ** 2

    def variance(self) -> np.ndarray:
        """(D,) population variance, clipped at 0 (rounding can leave a constant's slightly negative)."""
        self._require_samples()
        return np.maximum(self.m2_diag / self.count, 0.0)

    def std(self) -> np.ndarray:
        """(D,) population standard deviation."""
        return np.sqrt(self.variance())

    def covariance(self) -> np.ndarray:
        """(D, D) population covariance, symmetric, diagonal clipped at 0."""
        self._require_full("covariance")
        self._require_samples()
        return self._symmetric_covariance()  # exact symmetry, whatever order the BLAS summed in

    def constant(self, var: np.ndarray | None = None) -> np.ndarray:
        """(D,) bool: the features `correlation` treats as constant (variance zero or below 1e-10 of E[x²])."""
        var = self.variance() if var is None else var
        return (var <= 0.0) | (var <= _RELATIVE_VARIANCE_FLOOR * (var + self.mean ** 2))

    def correlation(self) -> np.ndarray:
        """(D, D) Pearson correlation cov[i, j] / (std_i std_j), as ZIPIT.md "Statistics" defines it.

        A feature is treated as constant when its variance is zero or lost in float64 cancellation noise (below
        1e-10 of its E[x²]). The guard is relative, never an absolute floor on the std: the correlation of
        features of any scale is that of the same features scaled to 1 (randomly initialised deep networks carry
        features of std 1e-8 and less, which an absolute floor of 1e-8 called constant and merged at random).
        A constant feature has correlation 0 with every other feature and 1 with itself, so the result is always
        finite, symmetric, in [-1, 1] with a unit diagonal.
        """
        # One D×D array besides the co-moment at any time, worked on in place (a 6144-wide space is 288 MiB an
        # array): the values are those of covariance() / outer(std, std), bit for bit.
        corr = self._symmetric_covariance()
        var = np.diag(corr).copy()
        constant = self.constant(var)
        std = np.sqrt(np.where(constant, 1.0, var))
        for lo in range(0, self.width, _ROWS_PER_CHUNK):
            corr[lo:lo + _ROWS_PER_CHUNK] /= np.outer(std[lo:lo + _ROWS_PER_CHUNK], std)
        corr[constant, :] = 0.0
        corr[:, constant] = 0.0
        # exactly symmetric already (a symmetric covariance over a symmetric outer product): no second average
        np.clip(corr, -1.0, 1.0, out=corr)
        np.fill_diagonal(corr, 1.0)
        return corr

    def _symmetric_covariance(self) -> np.ndarray:
        """covariance() with one D×D temporary: (m2/n + (m2/n)ᵀ) / 2, the diagonal clipped at 0."""
        self._require_full("covariance")
        self._require_samples()
        cov = np.empty_like(self.m2)
        for lo in range(0, self.width, _ROWS_PER_CHUNK):
            hi = min(lo + _ROWS_PER_CHUNK, self.width)
            np.add(self.m2[lo:hi] / self.count, self.m2[:, lo:hi].T / self.count, out=cov[lo:hi])
        cov *= 0.5
        np.fill_diagonal(cov, np.maximum(np.diag(cov), 0.0))
        return cov
