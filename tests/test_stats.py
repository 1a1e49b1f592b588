"""Tests of onnxzip.stats.FeatureStats against numpy's one-shot estimators."""

import numpy as np
import pytest

from onnxzip.stats import FeatureStats


def _random_features(seed=0, samples=1000, width=12):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(width, width))
    return (rng.normal(size=(samples, width)) @ mixing + rng.normal(size=width) * 3).astype(np.float32)


def _fed_in_batches(x, sizes=(1, 7, 300, 0, 150)):
    stats = FeatureStats(x.shape[1])
    start = 0
    for size in sizes:
        stats.update(x[start:start + size])
        start += size
    stats.update(x[start:])
    return stats


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batched_moments_match_numpy(dtype):
    x = _random_features().astype(dtype)
    stats = _fed_in_batches(x)
    x64 = x.astype(np.float64)
    tol = 1e-9
    assert stats.count == len(x)
    np.testing.assert_allclose(stats.mean, x64.mean(axis=0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(stats.variance(), x64.var(axis=0), rtol=tol)
    np.testing.assert_allclose(stats.std(), x64.std(axis=0), rtol=tol)
    cov = np.cov(x64, rowvar=False, bias=True)
    np.testing.assert_allclose(stats.covariance(), cov, rtol=tol, atol=tol * np.abs(cov).max())
    np.testing.assert_allclose(stats.correlation(), np.corrcoef(x64, rowvar=False), rtol=tol, atol=tol)


def test_large_mean_small_spread_keeps_its_variance():
    """Raw sums (E[x²] - E[x]²) lose a variance 1e-8 of the squared mean; shifting by the batch mean does not."""
    rng = np.random.default_rng(7)
    x = 1e4 + rng.normal(size=(20000, 3)) * [1.0, 0.5, 2.0]
    x[:, 1] += 0.8 * x[:, 0]
    for dtype in (np.float64, np.float32):
        xs = x.astype(dtype)
        stats = _fed_in_batches(xs, sizes=(5000, 5000, 5000))
        x64 = xs.astype(np.float64)
        np.testing.assert_allclose(stats.variance(), x64.var(axis=0), rtol=1e-9)
        np.testing.assert_allclose(stats.correlation(), np.corrcoef(x64, rowvar=False), atol=1e-9)


def test_merge_from_equals_one_shot():
    x = _random_features(seed=1)
    one_shot = FeatureStats(x.shape[1]).update(x)
    first = FeatureStats(x.shape[1]).update(x[:400])
    second = FeatureStats(x.shape[1]).update(x[400:])
    merged = first.merge_from(second)
    assert merged is first
    assert merged.count == one_shot.count
    np.testing.assert_allclose(merged.mean, one_shot.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.variance(), one_shot.variance(), rtol=1e-12)
    np.testing.assert_allclose(merged.covariance(), one_shot.covariance(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.correlation(), one_shot.correlation(), rtol=1e-10, atol=1e-12)
    # in float64, splitting the samples changes nothing but rounding
    x64 = x.astype(np.float64)
    halves = FeatureStats(x.shape[1]).update(x64[:400]).merge_from(FeatureStats(x.shape[1]).update(x64[400:]))
    np.testing.assert_allclose(halves.covariance(), FeatureStats(x.shape[1]).update(x64).covariance(), rtol=1e-12,
                               atol=1e-12)


def test_diagonal_only_stats():
    x = _random_features(seed=2)
    stats = FeatureStats(x.shape[1], full=False).update(x)
    assert stats.m2 is None
    np.testing.assert_allclose(stats.variance(), x.astype(np.float64).var(axis=0), rtol=1e-9)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(FeatureStats(x.shape[1], full=False).update(x64).variance(), x64.var(axis=0),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="full=True"):
        stats.covariance()
    with pytest.raises(ValueError, match="full=True"):
        stats.correlation()
    # A diagonal-only accumulator can absorb a full one, not the other way round.
    stats.merge_from(FeatureStats(x.shape[1]).update(x))
    assert stats.count == 2 * len(x)
    with pytest.raises(ValueError):
        FeatureStats(x.shape[1]).merge_from(stats)


@pytest.mark.parametrize("constant", [0.0, 3.7, -1234.5])
def test_constant_feature_gives_finite_correlation(constant):
    x = _random_features(seed=3, width=5).astype(np.float64)
    x[:, 2] = constant
    stats = _fed_in_batches(x)
    corr = stats.correlation()
    assert np.all(np.isfinite(corr))
    np.testing.assert_array_equal(corr, corr.T)
    assert corr.min() >= -1.0 and corr.max() <= 1.0
    np.testing.assert_array_equal(np.diag(corr), np.ones(5))
    np.testing.assert_array_equal(np.delete(corr[2], 2), np.zeros(4))
    # The other features are unaffected.
    keep = [0, 1, 3, 4]
    np.testing.assert_allclose(corr[np.ix_(keep, keep)], np.corrcoef(x[:, keep], rowvar=False), atol=1e-9)


@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1e6])
def test_correlation_does_not_depend_on_the_features_scale(scale):
    # randomly initialised deep networks carry features of std 1e-8 and less: they are not constants
    x = _random_features(seed=5, width=6).astype(np.float64)
    np.testing.assert_allclose(_fed_in_batches(x * scale).correlation(), _fed_in_batches(x).correlation(),
                               rtol=1e-9, atol=1e-12)


def test_identical_features_correlate_exactly_one():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(500, 1))
    stats = FeatureStats(3).update(np.hstack([a, a, -a]))
    corr = stats.correlation()
    np.testing.assert_allclose(corr, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-12)


def test_input_errors():
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match="no samples"):
        stats.mean
    with pytest.raises(ValueError, match="4 features"):
        stats.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="2-D"):
        stats.update(np.zeros(4))
    with pytest.raises(ValueError, match="2-D"):
        stats.update(np.zeros((2, 3, 4)))
    bad = np.zeros((3, 4))
    bad[0, 1] = np.nan
    bad[2, 3] = np.inf
    with pytest.raises(ValueError, match="2 non-finite"):
        stats.update(bad)
    assert stats.count == 0  # a rejected batch leaves the sums untouched
    with pytest.raises(ValueError, match="width"):
        stats.merge_from(FeatureStats(5))
    with pytest.raises(ValueError):
        FeatureStats(0)


def test_accepts_any_float_dtype():
    x = _random_features(seed=5, samples=64, width=3)
    for dtype in (np.float16, np.float32, np.float64):
        stats = FeatureStats(3).update(x.astype(dtype))
        assert stats.mean.dtype == np.float64 and stats.m2.dtype == np.float64
        np.testing.assert_allclose(stats.mean, x.astype(dtype).astype(np.float64).mean(axis=0), rtol=1e-12)


def test_blocks_in_either_order_handed_over_to_be_overwritten_give_the_same_sums():
    """update(x, overwrite=True) shifts a float64 block in place, in C or Fortran order (calibration writes a
    convolution's features channel by channel and hands over the transpose): the same statistics as a copy."""
    x = _random_features(seed=6, samples=300, width=9).astype(np.float64)
    want = _fed_in_batches(x)
    for order in ("C", "F"):
        got = FeatureStats(x.shape[1])
        start = 0
        for size in (1, 7, 300, 0, 150):
            block = np.array(x[start:start + size], order=order)
            got.update(block, overwrite=True)
            start += size
        assert got.count == want.count
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12)
        np.testing.assert_allclose(got.covariance(), want.covariance(), rtol=1e-10, atol=1e-12)
    kept = x.copy()
    FeatureStats(x.shape[1]).update(kept)  # without overwrite the caller's array is untouched
    np.testing.assert_array_equal(kept, x)
