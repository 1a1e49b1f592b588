"""The calibration pass sharded over a local two-worker Ray cluster (onnxzip.distributed, `merge --ray`): the same
statistics to float64 rounding, the same rows and references, the same merged model."""

import numpy as np
import pytest

import onnxzip
from onnxzip.calibration import (CalibrationData, FeatureRequest, RowRequest, StatsSampling, input_specs,
                                 run_sources)
from onnxzip.distributed import run_sources_sharded, shard_bounds
from onnxzip.errors import InstallError, UsageError

import fixtures as F

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield "auto"  # joins the cluster this process started
    ray.shutdown()


@pytest.fixture(scope="module")
def pair():
    (a, _), (b, _) = F.random_pair("resnet", seed=4)
    return a, b


def _data(model, n, seed):
    x = F.calib(model, n, seed=seed)
    return CalibrationData("x", {input_specs(model)[0].name: x}, input_specs(model))


@pytest.mark.parametrize("bounds", [(100, 2, 16), (64, 2, 64), (5, 4, 2), (1, 3, 64), (300, 7, 16)])
def test_shards_are_whole_batches_covering_every_sample(bounds):
    n, shards, batch = bounds
    cuts = shard_bounds(n, shards, batch)
    assert cuts[0][0] == 0 and cuts[-1][1] == n and len(cuts) <= shards
    for (lo, hi), (nxt, _) in zip(cuts, cuts[1:]):
        assert hi == nxt and lo % batch == 0 and hi % batch == 0 and hi > lo


def test_sharded_pass_equals_one_process(cluster, pair):
    a, b = pair
    fit, held = _data(a, 150, 0), _data(a, 40, 1)
    requests = [FeatureRequest(f"s{k}", [t, t], 1) for k, t in enumerate(_hidden(a))]
    rows = [RowRequest(7, [_hidden(a)[0]] * 2, 1, 0.05), RowRequest(8, [_hidden(a)[-1]] * 2, 1, 1.0)]
    options = dict(rows=rows, held=held, outputs=True, seed=1, sampling=StatsSampling(min_rows=3000,
                                                                                        rows_per_feature=10))
    one = run_sources([a, b], requests, fit, 16, "cpu", **options)
    sharded = run_sources_sharded(cluster, 2, [a, b], requests, fit, 16, "cpu", **options)
    assert set(one.stats) == set(sharded.stats)
    for key, stats in one.stats.items():
        other = sharded.stats[key]
        assert other.count == stats.count
        np.testing.assert_allclose(other.mean, stats.mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(other.covariance(), stats.covariance(), rtol=1e-9,
                                   atol=1e-9 * np.abs(stats.covariance()).max())
    for key in (7, 8):
        for held_part in (False, True):
            got, want = sharded.rows[key][held_part], one.rows[key][held_part]
            assert [(lo, n) for lo, n, _ in got] == [(lo, n) for lo, n, _ in want]
            for (_, _, x), (_, _, y) in zip(got, want):
                for xm, ym in zip(x, y):
                    np.testing.assert_array_equal(xm, ym)
    for m in range(2):
        for name, value in one.outputs[m].items():
            np.testing.assert_array_equal(sharded.outputs[m][name], value)


def test_merge_on_ray_equals_the_single_process_merge(cluster, pair):
    a, b = pair
    data = F.calib(a, 200, seed=2)
    alone = onnxzip.merge(a, b, data, device="cpu")
    sharded = onnxzip.merge(a, b, data, device="cpu", ray=cluster, ray_workers=2)
    spaces = [{k: v for k, v in s.items() if k != "samples"} for s in alone.card["spaces"]]
    assert spaces == [{k: v for k, v in s.items() if k != "samples"} for s in sharded.card["spaces"]]
    assert sharded.card["refit"]["targets_kept_by_calibration"] == len(sharded.card["refit"]["layers"])
    x = F.calib(a, 32, seed=5)
    want, got = F.run(alone.model, x), F.run(sharded.model, x)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5 * np.abs(value).max())


def test_cuda_on_a_cluster_without_a_gpu_is_refused(cluster, pair):
    a, b = pair
    data = _data(a, 40, 0)
    with pytest.raises(UsageError, match="has no GPU"):
        run_sources_sharded(cluster, 2, [a, b], [FeatureRequest("s", [_hidden(a)[0]] * 2, 1)], data, 16, "cuda")


def test_ray_options_are_checked(monkeypatch, pair):
    a, b = pair
    data = F.calib(a, 40, seed=2)
    with pytest.raises(UsageError, match="--ray-workers needs --ray"):
        onnxzip.merge(a, b, data, ray_workers=2)
    with pytest.raises(UsageError, match="--ray-workers"):
        onnxzip.merge(a, b, data, ray="local", ray_workers=0)
    with pytest.raises(UsageError, match="--ray must be"):
        onnxzip.merge(a, b, data, ray="  ")
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kw):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(InstallError, match="onnxzip\\[distributed\\]"):
        onnxzip.merge(a, b, data, ray="local")


def _hidden(model):
    """The Relu outputs of a fixture model (its hidden features)."""
    return [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
