"""Running float64 statistics of feature vectors: the input of the solver.

ZIPIT.md, "Statistics": for each feature space, stack the models' features into one vector and collect, over every
calibration sample, the mean and the covariance, from which the correlation matrix the matcher works on follows.
`FeatureStats` keeps only running sums (count, sum, sum of squares, sum of outer products), so memory is O(D²)
whatever the number of samples, and batches from several runs (or several tensors of one space) can be combined.

Precision: the moments are taken from raw sums, `cov = E[x xᵀ] - E[x] E[x]ᵀ`. This cancels badly when a feature's
mean is large compared to its spread (huge activations): the relative error of a variance is roughly
float64 epsilon × (mean² / variance) × a factor growing with the sample count. Post-activation features of trained
networks are far from that regime; features whose variance is lost in that noise are treated as constant by
`correlation` (see there).
"""

from __future__ import annotations

import numpy as np

# A feature whose variance is below this fraction of its second moment E[x²] is indistinguishable from a constant
# in float64 raw-sum arithmetic (cancellation noise is ~1e-16 × E[x²] per operation, amplified by summation over
# many samples), so `correlation` treats it as constant instead of dividing noise by noise.
_RELATIVE_VARIANCE_FLOOR = 1e-10


class FeatureStats:
    """Running statistics of D-wide feature vectors, accumulated in float64.

    Parameters
    ----------
    width:
        D, the number of features per sample.
    full:
        Also keep the D×D sum of outer products, needed for `covariance` and `correlation`. With ``full=False``
        only the per-feature mean and variance are available (memory O(D)).

    Attributes
    ----------
    count: number of samples seen.
    sum: (D,) sum of samples.
    sum_sq: (D,) sum of squared samples.
    sum_outer: (D, D) sum of outer products ``x xᵀ``, or None when not ``full``.
    """

    def __init__(self, width: int, full: bool = True):
        if int(width) != width or width < 1:
            raise ValueError(f"FeatureStats width must be a positive integer, got {width!r}")
        self.width = int(width)
        self.full = bool(full)
        self.count = 0
        self.sum = np.zeros(self.width, dtype=np.float64)
        self.sum_sq = np.zeros(self.width, dtype=np.float64)
        self.sum_outer = np.zeros((self.width, self.width), dtype=np.float64) if self.full else None

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
        bad = x.size - int(np.count_nonzero(np.isfinite(x)))
        if bad:
            raise ValueError(
                f"FeatureStats.update got {bad} non-finite value(s) (NaN or inf) among {x.size}; "
                "check the calibration inputs and the model's numerics"
            )
        if x.shape[0] == 0:
            return self
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_sq += np.einsum("sd,sd->d", x, x)
        if self.full:
            self.sum_outer += x.T @ x
        return self

    def merge_from(self, other: "FeatureStats") -> "FeatureStats":
        """Add the samples summarised by another FeatureStats of the same width (e.g. another tensor of the same
        feature space). Returns self."""
        if not isinstance(other, FeatureStats):
            raise ValueError(f"FeatureStats.merge_from expects a FeatureStats, got {type(other).__name__}")
        if other.width != self.width:
            raise ValueError(f"cannot merge FeatureStats of width {other.width} into one of width {self.width}")
        if self.full and not other.full:
            raise ValueError("cannot merge a FeatureStats without outer products (full=False) into a full one")
        self.count += other.count
        self.sum += other.sum
        self.sum_sq += other.sum_sq
        if self.full:
            self.sum_outer += other.sum_outer
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
        return self.sum / self.count

    def second_moment(self) -> np.ndarray:
        """(D,) E[x²] of each feature."""
        self._require_samples()
        return self.sum_sq / self.count

    def variance(self) -> np.ndarray:
        """(D,) population variance E[x²] - E[x]², clipped at 0 (cancellation can make it slightly negative)."""
        mean = self.mean
        return np.maximum(self.sum_sq / self.count - mean * mean, 0.0)

    def std(self) -> np.ndarray:
        """(D,) population standard deviation."""
        return np.sqrt(self.variance())

    def covariance(self) -> np.ndarray:
        """(D, D) population covariance E[x xᵀ] - E[x] E[x]ᵀ, symmetric, diagonal clipped at 0."""
        self._require_full("covariance")
        mean = self.mean
        cov = self.sum_outer / self.count - np.outer(mean, mean)
        cov = 0.5 * (cov + cov.T)  # exact symmetry, whatever order the BLAS summed in
        np.fill_diagonal(cov, np.maximum(np.diag(cov), 0.0))
        return cov

    def correlation(self, eps: float = 1e-8) -> np.ndarray:
        """(D, D) Pearson correlation cov[i, j] / (std_i std_j), as ZIPIT.md "Statistics" defines it.

        A feature is treated as constant when its std is at most ``eps`` or its variance is lost in float64
        cancellation noise (below 1e-10 of its E[x²]). A constant feature has correlation 0 with every other
        feature and 1 with itself, so the result is always finite, symmetric, in [-1, 1] with a unit diagonal.
        """
        cov = self.covariance()
        var = np.diag(cov).copy()
        constant = (var <= eps * eps) | (var <= _RELATIVE_VARIANCE_FLOOR * self.second_moment())
        std = np.sqrt(np.where(constant, 1.0, var))
        corr = cov / np.outer(std, std)
        corr[constant, :] = 0.0
        corr[:, constant] = 0.0
        corr = np.clip(0.5 * (corr + corr.T), -1.0, 1.0)
        np.fill_diagonal(corr, 1.0)
        return corr
