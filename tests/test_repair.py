"""Statistics repair: after it, every corrected trunk tensor has, channel by channel, the mean and standard
deviation of the average of the source channels it stands for (REPAIR's target), on the calibration data."""

import numpy as np
import pytest

from onnxzip.calibration import FeatureRequest, calibration_from_arrays, collect_stats, input_specs
from onnxzip.graph import analyse, match, trunk_nodes
from onnxzip.repair import repair, repair_points, target_requests
from onnxzip.solver import solve
from onnxzip.surgery import ZipPlan, build, merge_points, zipped_spaces

import fixtures as F


def plan_for(a_model, b_model, data, method, stop_at=None, fold_batchnorm=True):
    a, b = analyse(a_model, fold_batchnorm), analyse(b_model, fold_batchnorm)
    corr = match(a, b)
    trunk = trunk_nodes(a, stop_at)
    plan = ZipPlan([a, b], [None, corr], trunk, {})
    requests = []
    for sid, names in merge_points(a, trunk).items():
        for name in names:
            ts = a.tensor_spaces[name]
            requests.append(FeatureRequest(f"space:{sid}", [name, corr.tensors[name]], ts.axis, ts.expand))
    stats = collect_stats([a.model, b.model], requests, data)
    for sid in zipped_spaces(a, trunk):
        plan.matchings[sid] = solve(method, stats[f"space:{sid}"].correlation(), a.spaces[sid].width)
    return plan, stats


def merged_moments(surgery, point, data):
    ts = point.space
    req = FeatureRequest("m", [surgery.trunk_tensors[point.tensor]], ts.axis, ts.expand, full=False)
    st = collect_stats([surgery.model], [req], data)["m"]
    return st.mean, st.std()


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "per-layer"])
@pytest.mark.parametrize("method", ["zip", "average"])
@pytest.mark.parametrize("arch", ["vgg", "resnet", "mlp"])
def test_repair_matches_target_statistics(arch, method, one_pass):
    (a_model, _), (b_model, _) = F.random_pair(arch, seed=3)
    data = calibration_from_arrays(F.calib(a_model, 256, seed=1), input_specs(a_model))
    plan, stats = plan_for(a_model, b_model, data, method)
    surgery = build(plan)
    points = repair_points(plan.a, plan.trunk)
    assert points, "the fixture has weighted trunk layers"
    before = [merged_moments(surgery, p, data) for p in points]
    summary = repair(plan, surgery, data, [plan.a.model, plan.analyses[1].model], max_batch_bytes=(2 << 30) if one_pass else 0)
    stats = collect_stats([plan.a.model, plan.analyses[1].model], target_requests(plan, points), data)
    assert summary["layers"] == len(points) and not summary["unshifted"]
    assert summary["passes"] == (1 if one_pass else len(points))
    for p, (mu0, sd0) in zip(points, before):
        width = plan.a.spaces[p.space.space].width
        src = stats[p.key]
        m = plan.matching(p.space.space)
        mu_t = sum(m.merge[k] @ src.mean[k * width:(k + 1) * width] for k in range(2))
        sd_t = sum(m.merge[k] @ src.std()[k * width:(k + 1) * width] for k in range(2))
        mu, sd = merged_moments(surgery, p, data)
        np.testing.assert_allclose(mu, mu_t, atol=1e-4, rtol=1e-4, err_msg=f"mean at {p.tensor}")
        np.testing.assert_allclose(sd, sd_t, atol=1e-4, rtol=1e-3, err_msg=f"std at {p.tensor}")
    # and it changed something: averaging different models shrinks the features
    assert any(not np.allclose(sd0, merged_moments(surgery, p, data)[1], rtol=1e-3) for p, (_, sd0) in
               zip(points, before))


def test_bn_kept_is_repaired_in_the_bn_node():
    (a_model, _), (b_model, _) = F.random_pair("vgg", seed=4)
    data = calibration_from_arrays(F.calib(a_model, 128, seed=2), input_specs(a_model))
    plan, _ = plan_for(a_model, b_model, data, "zip", fold_batchnorm=False)
    ops = {plan.a.nodes[p.chain[-1]].op_type for p in repair_points(plan.a, plan.trunk)}
    assert "BatchNormalization" in ops and "Conv" in ops  # conv2 is followed by a BN node, conv1 is not
    plan, _ = plan_for(a_model, b_model, data, "zip")  # by default the BN is folded into conv2 before merging
    assert "BatchNormalization" not in {plan.a.nodes[p.chain[-1]].op_type for p in repair_points(plan.a, plan.trunk)}


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_partial_zip_repairs_each_models_layers_after_the_stop_point(arch):
    """The paper resets every BatchNorm of the merged model: layers after the stop point, which now read unmerged
    features, get back their own model's per-channel statistics."""
    from onnxzip.repair import merged_tensor

    (a_model, _), (b_model, _) = F.random_pair(arch, seed=5)
    data = calibration_from_arrays(F.calib(a_model, 256, seed=3), input_specs(a_model))
    plan, _ = plan_for(a_model, b_model, data, "zip", stop_at=1)
    a, b, trunk = plan.a, plan.analyses[1], plan.trunk
    surgery = build(plan)
    summary = repair(plan, surgery, data, [a.model, b.model])
    branch = [p for p in repair_points(a, trunk, branches=True) if p.model is not None]
    assert branch and summary["branch_layers"] == len(branch)
    targets = collect_stats([a.model, b.model], target_requests(plan, branch), data)
    for p in branch:
        width = a.spaces[p.space.space].width
        want_mu = targets[p.key].mean[p.model * width:(p.model + 1) * width]
        want_sd = targets[p.key].std()[p.model * width:(p.model + 1) * width]
        req = FeatureRequest("m", [merged_tensor(plan, surgery, p)], p.space.axis, p.space.expand, full=False)
        got = collect_stats([surgery.model], [req], data)["m"]
        np.testing.assert_allclose(got.mean, want_mu, atol=1e-4, rtol=1e-4, err_msg=f"mean of {p.tensor} ({p.model})")
        np.testing.assert_allclose(got.std(), want_sd, atol=1e-4, rtol=1e-3, err_msg=f"std of {p.tensor} ({p.model})")


@pytest.mark.parametrize("name", ["bert_layer_ts", "bert_layer_dynamo"])
def test_embedding_tables_are_repaired_in_the_table(name):
    """An embedding (Gather from a table) has no bias: the correction's scale and shift fold into every row of its
    table (TorchScript: nothing follows the lookup on its own) or into the table and the constant added after it
    (dynamo: the position embedding, folded to a constant, is the lookup's bias). Two unrelated BERTs: B is A with
    noise on every weight."""
    import os

    import onnx

    data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)
    a_model = onnx.load(os.path.join(data_dir, "a.onnx"))
    b_model = onnx.load(os.path.join(data_dir, "b.onnx"))
    rng = np.random.RandomState(2)
    F.perturb(b_model, 0.5, rng)
    ids = rng.randint(0, 50, (256, 6)).astype(np.int64)
    data = calibration_from_arrays({a_model.graph.input[0].name: ids}, input_specs(a_model))
    plan, _ = plan_for(a_model, b_model, data, "zip")
    surgery = build(plan)
    points = [p for p in repair_points(plan.a, plan.trunk) if plan.a.nodes[p.layer].op_type == "Gather"]
    assert len(points) == (3 if name.endswith("_ts") else 2)
    repair(plan, surgery, data, [plan.a.model, plan.analyses[1].model])
    stats = collect_stats([plan.a.model, plan.analyses[1].model], target_requests(plan, points), data)
    for p in points:
        width = plan.a.spaces[p.space.space].width
        src, m = stats[p.key], plan.matching(p.space.space)
        mu_t = sum(m.merge[k] @ src.mean[k * width:(k + 1) * width] for k in range(2))
        sd_t = sum(m.merge[k] @ src.std()[k * width:(k + 1) * width] for k in range(2))
        mu, sd = merged_moments(surgery, p, data)
        np.testing.assert_allclose(mu, mu_t, atol=1e-4, rtol=1e-4, err_msg=f"mean at {p.tensor}")
        np.testing.assert_allclose(sd, sd_t, atol=1e-4, rtol=1e-3, err_msg=f"std at {p.tensor}")
