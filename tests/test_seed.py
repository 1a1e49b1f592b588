"""--seed picks the calibration subset when --num-samples is below what the data holds."""

import onnxzip

import fixtures as F


def test_seed_picks_the_calibration_subset():
    (a, _), (b, _) = F.random_pair("vgg", seed=7)
    data = F.calib(a, 300, seed=4)

    def model_bytes(seed, n=120):
        return onnxzip.merge(a, b, data, num_samples=n, seed=seed, verify=False).model.graph.SerializeToString()

    assert model_bytes(0) == model_bytes(0)  # the same seed: the same samples, the same graph
    assert model_bytes(0) != model_bytes(1)  # another seed: other samples
    assert model_bytes(0, n=None) == model_bytes(1, n=None)  # all samples used: the seed changes nothing
