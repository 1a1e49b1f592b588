"""Running statistics of feature vectors: the input of the solver.

ZIPIT.md, "Statistics": for each feature space, stack the models' features into one vector and collect, over every
calibration sample, the mean and the covariance, from which the correlation matrix the matcher works on follows.
`FeatureStats` keeps only the count and the sums of the samples and of their outer products, so memory is O(D²)
whatever the number of samples, and batches from several runs (or several tensors of one space, or several
workers) combine exactly.

Precision: the samples are shifted by the first batch's mean before they are summed, in float64, so the co-moment
Σ y yᵀ − (Σ y)(Σ y)ᵀ / n never cancels (a feature with a large mean and a small spread keeps its variance: the
shift takes the large mean out, and what is left of it is within a few spreads of zero).
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
    m2: (D, D) sum of outer products of the deviations from the mean (a new array at each access), or None when not
        ``full``.

    Kept inside: the sums of the samples shifted by the first batch's mean, Σ y and Σ y yᵀ (y = x − shift; the
    latter's upper triangle, added to in place by BLAS's syrk: half the work of a full product, and no D×D temporary
    a batch).
    The co-moment follows as Σ y yᵀ − (Σ y)(Σ y)ᵀ / n. With the shift near the mean, Σ y is small and nothing
    cancels (a feature with a large mean and a small spread keeps its variance).
    """

    def __init__(self, width: int, full: bool = True):
        if int(width) != width or width < 1:
            raise ValueError(f"FeatureStats width must be a positive integer, got {width!r}")
        self.width = int(width)
        self.full = bool(full)
        self.count = 0
        self._shift = np.zeros(self.width, dtype=np.float64)  # the first batch's mean
        self._sum = np.zeros(self.width, dtype=np.float64)  # Σ y
        self._squares = None if self.full else np.zeros(self.width, dtype=np.float64)  # Σ y² (full=False)
        # upper triangle of Σ y yᵀ, Fortran order (BLAS updates it in place); the lower triangle is never read
        self._products = np.zeros((self.width, self.width), dtype=np.float64, order="F") if self.full else None

    def __repr__(self) -> str:
        return f"FeatureStats(width={self.width}, full={self.full}, count={self.count})"

    def update(self, features: np.ndarray, overwrite: bool = False) -> "FeatureStats":
        """Add S samples given as an (S, D) array of any real dtype. Returns self. `overwrite`: a float64 array in C
        or Fortran order may be shifted in place (it is not copied; its values are lost).

        Raises ValueError on a wrong shape or on NaN/inf values (a single one would poison every sum).
        """
        from scipy.linalg.blas import dsyrk
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
        contiguous = x.flags.c_contiguous or x.flags.f_contiguous
        y = x if overwrite and x.dtype == np.float64 and contiguous else np.array(x, np.float64, order="C")
        batch_sum = y.sum(axis=0)
        # a NaN or inf anywhere reaches its column's sum: y itself is scanned only when a sum is not finite
        if not np.isfinite(batch_sum).all():
            bad = y.size - int(np.count_nonzero(np.isfinite(y)))
            if bad:
                raise ValueError(
                    f"FeatureStats.update got {bad} non-finite value(s) (NaN or inf) among {y.size}; "
                    "check the calibration inputs and the model's numerics"
                )
        n = y.shape[0]
        if n == 0:
            return self
        self._own()
        if self.count == 0:
            self._shift = batch_sum / n
        y -= self._shift
        self._sum += y.sum(axis=0)
        if self.full:
            # BLAS reads y without a copy: in C order as yᵀ (Fortran order) times its transpose, else as yᵀ y
            a, trans = (y.T, 0) if y.flags.c_contiguous else (y, 1)
            self._products = dsyrk(1.0, a, beta=1.0, c=self._products, trans=trans, lower=0, overwrite_c=1)
        else:
            self._squares += np.einsum("sd,sd->d", y, y)
        self.count += n
        return self

    def merge_from(self, other: "FeatureStats") -> "FeatureStats":
        """Add the samples summarised by another FeatureStats of the same width (e.g. another tensor of the same
        feature space, or another worker's share of the samples). Returns self."""
        if not isinstance(other, FeatureStats):
            raise ValueError(f"FeatureStats.merge_from expects a FeatureStats, got {type(other).__name__}")
        if other.width != self.width:
            raise ValueError(f"cannot merge FeatureStats of width {other.width} into one of width {self.width}")
        if self.full and not other.full:
            raise ValueError("cannot merge a FeatureStats without outer products (full=False) into a full one")
        if not other.count:
            return self
        self._own()
        if not self.count:
            self._shift = other._shift.copy()
        # the other's samples shifted by this shift: y' = y + delta
        delta = other._shift - self._shift
        n, s = other.count, other._sum
        if self.full:
            self._products += other._products + np.outer(delta, s) + np.outer(s, delta) + n * np.outer(delta, delta)
        else:
            squares = other._squares if not other.full else np.diag(other._products)
            self._squares += squares + 2 * delta * s + n * delta * delta
        self._sum += s + n * delta
        self.count += n
        return self

    def _own(self) -> None:
        """Make the sums writable where they are not (statistics sent back by a Ray worker are read-only views of
        its object store) before they are added to in place."""
        for name in ("_shift", "_sum", "_squares", "_products"):
            value = getattr(self, name)
            if value is not None and not value.flags.writeable:
                setattr(self, name, np.array(value, order="K"))

    @property
    def m2_diag(self) -> np.ndarray:
        squares = np.diag(self._products) if self.full else self._squares
        return squares - self._sum * self._sum / max(self.count, 1)

    @property
    def m2(self) -> np.ndarray | None:
        if not self.full:
            return None
        m2 = np.empty((self.width, self.width))
        for lo in range(0, self.width, _ROWS_PER_CHUNK):
            hi = min(lo + _ROWS_PER_CHUNK, self.width)
            m2[lo:hi] = self._m2_rows(lo, hi)
        return m2

    def _m2_rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo:hi of the co-moment, from the upper triangle of Σ y yᵀ (exactly symmetric: entry (i, j) for
        j < i is read from (j, i), and (Σ y)(Σ y)ᵀ is)."""
        rows = self._products[lo:hi].copy()
        below = np.arange(hi)[None, :] < np.arange(lo, hi)[:, None]  # j < i
        rows[:, :hi][below] = self._products[:hi, lo:hi].T[below]
        rows -= np.outer(self._sum[lo:hi], self._sum) / max(self.count, 1)  # s_i s_j / n: symmetric
        return rows

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
        return self._shift + self._sum / self.count

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
        """covariance(), exactly symmetric, the diagonal clipped at 0, with no D×D temporary."""
        self._require_full("covariance")
        self._require_samples()
        cov = np.empty((self.width, self.width))
        for lo in range(0, self.width, _ROWS_PER_CHUNK):
            hi = min(lo + _ROWS_PER_CHUNK, self.width)
            np.divide(self._m2_rows(lo, hi), self.count, out=cov[lo:hi])
        np.fill_diagonal(cov, np.maximum(np.diag(cov), 0.0))
        return cov
