"""Tests of onnxzip.solver: invariants of the merge/unmerge matrices and of the ZipIt! greedy matching."""

import numpy as np
import pytest

from onnxzip.solver import (
    Matching,
    average_match,
    contract,
    identity_match,
    matching_from_clusters,
    permute_match,
    solve,
    zip_match,
)
from onnxzip.stats import FeatureStats


def _features(rng, samples, width, rank=None):
    """Random correlated features (a low-rank mixing keeps correlations away from 0)."""
    rank = rank or width
    return rng.normal(size=(samples, rank)) @ rng.normal(size=(rank, width)) + 0.3 * rng.normal(size=(samples, width))


def _stacked_corr(*models):
    stacked = np.hstack(models)
    return FeatureStats(stacked.shape[1]).update(stacked).correlation()


def _random_corr(seed, width, num_models=2, samples=400):
    rng = np.random.default_rng(seed)
    return _stacked_corr(*[_features(rng, samples, width, rank=max(2, width // 2)) for _ in range(num_models)])


def _permuted_copy(seed, width, samples=400):
    """Model B computes model A's features in another channel order: b[:, k] = a[:, perm[k]]."""
    rng = np.random.default_rng(seed)
    a = _features(rng, samples, width)
    perm = rng.permutation(width)
    return _stacked_corr(a, a[:, perm]), perm


def _check_invariants(matching: Matching, width: int, num_models: int, merged_width: int):
    assert len(matching.merge) == len(matching.unmerge) == num_models
    assert matching.width == width and matching.merged_width == merged_width
    clusters = matching.clusters
    assert clusters.shape == (num_models * width,)
    assert np.issubdtype(clusters.dtype, np.integer)
    assert clusters.min() >= 0 and clusters.max() < merged_width
    assert set(clusters.tolist()) == set(range(merged_width))  # no empty cluster
    for m in range(num_models):
        merge, unmerge = matching.merge[m], matching.unmerge[m]
        assert merge.shape == (merged_width, width) and merge.dtype == np.float64
        assert unmerge.shape == (width, merged_width) and unmerge.dtype == np.float64
        # Unmerge is a 0/1 copy matrix: a single 1 per row, at the feature's cluster.
        assert set(np.unique(unmerge).tolist()) <= {0.0, 1.0}
        np.testing.assert_array_equal(unmerge.sum(axis=1), np.ones(width))
        np.testing.assert_array_equal(np.argmax(unmerge, axis=1), matching.unmerge_index(m))
        np.testing.assert_array_equal(matching.unmerge_index(m), clusters[m * width:(m + 1) * width])
    stacked_merge = np.hstack(matching.merge)
    stacked_unmerge = np.vstack(matching.unmerge)
    # Every stacked feature is in exactly one cluster.
    np.testing.assert_array_equal(stacked_unmerge.sum(axis=1), np.ones(num_models * width))
    np.testing.assert_array_equal(np.argmax(stacked_unmerge, axis=1), clusters)
    # A merged feature is the average of its members.
    np.testing.assert_allclose(stacked_merge.sum(axis=1), np.ones(merged_width), rtol=1e-12)
    sizes = np.bincount(clusters, minlength=merged_width)
    np.testing.assert_allclose(stacked_merge, (stacked_unmerge / sizes).T, rtol=1e-12)
    # Merging what was unmerged gives back the merged features: Σ_m M_m U_m = I.
    np.testing.assert_allclose(
        sum(matching.merge[m] @ matching.unmerge[m] for m in range(num_models)), np.eye(merged_width), atol=1e-12
    )


def _naive_zip(corr, num_models, alpha, beta, target):
    """Straightforward reference of the semantics zip_match documents: rescan the whole matrix every merge."""
    n = corr.shape[0]
    width = n // num_models
    sim = corr.astype(np.float64).copy()
    np.fill_diagonal(sim, -np.inf)
    contains = [{k // width} for k in range(n)]
    members = [[k] for k in range(n)]
    alive = [True] * n
    budget = [int(np.floor(beta * (n - target) / num_models + 1e-9))] * num_models
    exhausted = [b <= 0 for b in budget]
    within = [0] * num_models
    cross = 0

    def allowed(p, q):
        shared = contains[p] & contains[q]
        if any(exhausted[m] for m in shared):
            return False
        return True

    link = sim.copy()  # complete linkage without prohibitions, for the fallback
    for p in range(n):
        for q in range(n):
            if not allowed(p, q):
                sim[p, q] = -np.inf
    forced = 0
    for _ in range(n - target):
        if np.max(sim) == -np.inf:
            sim = link
        if sim is link:
            forced += 1
        flat = int(np.argmax(sim))
        i, j = sorted(divmod(flat, n))
        assert sim[i, j] > -np.inf
        shared = contains[i] & contains[j]
        for m in shared:
            within[m] += 1
            budget[m] -= 1
            exhausted[m] = exhausted[m] or budget[m] <= 0
        if not shared:
            cross += 1
        row = np.minimum(sim[i], sim[j])
        if alpha > 0:
            row *= alpha
        contains[i] |= contains[j]
        members[i] += members[j]
        alive[j] = False
        if sim is not link:
            link_row = np.minimum(link[i], link[j]) * (alpha if alpha > 0 else 1.0)
            link[j, :] = link[:, j] = -np.inf
            link[i, :] = link[:, i] = link_row
            link[i, i] = -np.inf
        sim[j, :] = sim[:, j] = -np.inf
        sim[i, :] = sim[:, i] = row
        sim[i, i] = -np.inf
        if sim is link:
            continue
        for p in range(n):
            for q in range(n):
                if not (alive[p] and alive[q]) or not allowed(p, q):
                    sim[p, q] = -np.inf
                elif alpha <= 0 and i in (p, q) and contains[p] & contains[q]:
                    sim[p, q] = -np.inf
    clusters = np.empty(n, dtype=np.int64)
    for c, k in enumerate(k for k in range(n) if alive[k]):
        clusters[members[k]] = c
    return clusters, cross, within, forced


# --- baselines ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_models", [1, 2, 3])
def test_average_is_identity_matching(num_models):
    matching = average_match(7, num_models)
    _check_invariants(matching, 7, num_models, 7)
    for m in range(num_models):
        np.testing.assert_array_equal(matching.unmerge_index(m), np.arange(7))
        np.testing.assert_allclose(matching.merge[m], np.eye(7) / num_models)
    assert identity_match(7, num_models).clusters.tolist() == matching.clusters.tolist()


def test_permute_gives_a_permutation():
    corr = _random_corr(0, 16)
    matching = permute_match(corr)
    _check_invariants(matching, 16, 2, 16)
    np.testing.assert_array_equal(matching.unmerge_index(0), np.arange(16))
    assert sorted(matching.unmerge_index(1).tolist()) == list(range(16))
    assert matching.cross_merges == 16 and matching.within_merges == [0, 0]


def test_permute_maximises_total_correlation_on_small_case():
    from itertools import permutations

    corr = _random_corr(1, 5)
    matching = permute_match(corr)
    best = max(sum(corr[a, 5 + b] for a, b in enumerate(p)) for p in permutations(range(5)))
    index_b = matching.unmerge_index(1)
    # index_b[k] is the model-0 feature that model-1 feature k was matched to.
    got = sum(corr[index_b[k], 5 + k] for k in range(5))
    assert got == pytest.approx(best)
    assert matching.mean_merge_correlation == pytest.approx(best / 5)


def test_permute_recovers_a_permuted_copy():
    corr, perm = _permuted_copy(2, 24)
    matching = permute_match(corr)
    # Feature k of B is feature perm[k] of A: both must share a cluster.
    np.testing.assert_array_equal(matching.unmerge_index(1), matching.unmerge_index(0)[perm])
    assert matching.mean_merge_correlation == pytest.approx(1.0)


def test_permute_three_models_matches_each_to_model_zero():
    rng = np.random.default_rng(3)
    a = _features(rng, 400, 10)
    p1, p2 = rng.permutation(10), rng.permutation(10)
    matching = permute_match(_stacked_corr(a, a[:, p1], a[:, p2]), num_models=3)
    _check_invariants(matching, 10, 3, 10)
    np.testing.assert_array_equal(matching.unmerge_index(1), p1)
    np.testing.assert_array_equal(matching.unmerge_index(2), p2)


# --- zip -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.125), (0.3, 0.0), (0.0, 0.125), (-1.0, 0.5), (1.0, 1.0), (0.5, 0.3)])
def test_zip_invariants_and_reference(seed, alpha, beta):
    width = 12
    corr = _random_corr(seed, width)
    matching = zip_match(corr, alpha=alpha, beta=beta)
    _check_invariants(matching, width, 2, width)
    clusters, cross, within, forced = _naive_zip(corr, 2, alpha, beta, width)
    np.testing.assert_array_equal(matching.clusters, clusters)
    assert matching.cross_merges == cross
    assert matching.within_merges == within
    assert matching.forced_merges == forced == 0  # two models reduced to F never need the fallback


@pytest.mark.parametrize("num_models", [2, 3])
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.2), (0.0, 0.5), (0.3, 1.0)])
@pytest.mark.parametrize("target", [1, 5, 12, 20, 24, 36])
def test_zip_other_targets_and_more_models(num_models, alpha, beta, target):
    width = 12
    target = min(target, num_models * width)
    corr = _random_corr(7, width, num_models=num_models)
    matching = zip_match(corr, num_models=num_models, alpha=alpha, beta=beta, target_width=target)
    _check_invariants(matching, width, num_models, target)
    clusters, cross, within, forced = _naive_zip(corr, num_models, alpha, beta, target)
    np.testing.assert_array_equal(matching.clusters, clusters)
    assert (matching.cross_merges, matching.within_merges, matching.forced_merges) == (cross, within, forced)
    if num_models == 2 and target >= width:
        assert forced == 0  # two models down to F or more never exhaust the allowed pairs
    budget = int(np.floor(beta * (num_models * width - target) / num_models + 1e-9))
    if forced == 0:
        assert max(within) <= budget
    if target == 36:
        assert np.isnan(matching.mean_merge_correlation)
        assert matching.cross_merges == 0


def test_zip_beta_zero_recovers_a_permuted_copy():
    corr, perm = _permuted_copy(8, 32)
    matching = zip_match(corr, alpha=0.3, beta=0.0)
    np.testing.assert_array_equal(matching.unmerge_index(1), matching.unmerge_index(0)[perm])
    assert matching.within_merges == [0, 0] and matching.cross_merges == 32
    assert matching.mean_merge_correlation == pytest.approx(1.0)


@pytest.mark.parametrize("alpha", [0.3, 0.0])
def test_zip_beta_zero_makes_only_cross_merges(alpha):
    corr = _random_corr(9, 20)
    matching = zip_match(corr, alpha=alpha, beta=0.0)
    assert matching.within_merges == [0, 0]
    assert matching.cross_merges == 20
    # Only cross merges from 2F to F: every cluster is one feature of each model.
    for m in range(2):
        assert sorted(matching.unmerge_index(m).tolist()) == list(range(20))


def test_zip_within_model_merges_respect_budget_and_happen_for_duplicates():
    rng = np.random.default_rng(10)
    width, duplicates = 32, 6
    a, b = _features(rng, 500, width), _features(rng, 500, width)
    # Model A carries near-copies of some of its own features: the best pairs are within A.
    a[:, width - duplicates:] = a[:, :duplicates] + 1e-3 * rng.normal(size=(500, duplicates))
    corr = _stacked_corr(a, b)
    beta = 0.25
    budget = int(np.floor(beta * width / 2))  # features to remove = 2F - F = F
    matching = zip_match(corr, alpha=0.3, beta=beta)
    _check_invariants(matching, width, 2, width)
    assert all(w <= budget for w in matching.within_merges)
    assert matching.within_merges[0] == min(budget, duplicates)
    index_a = matching.unmerge_index(0)
    merged_dups = sum(index_a[k] == index_a[width - duplicates + k] for k in range(duplicates))
    assert merged_dups == min(budget, duplicates)
    # Without a budget the duplicates stay apart.
    assert zip_match(corr, alpha=0.3, beta=0.0).within_merges == [0, 0]


def test_zip_alpha_nonpositive_never_regrows_a_cluster_with_a_model_it_holds():
    rng = np.random.default_rng(11)
    width = 24
    a, b = _features(rng, 500, width, rank=3), _features(rng, 500, width, rank=3)
    corr = _stacked_corr(a, b)
    beta = 0.5
    matching = zip_match(corr, alpha=0.0, beta=beta)
    _check_invariants(matching, width, 2, width)
    # With alpha <= 0 a cluster that already holds a model's feature never takes another one of that model, except
    # through a same-model merge of two singletons; so a cluster has at most 2 features of a model, and only when
    # it came from one of the budgeted same-model merges.
    counts = np.stack([np.bincount(matching.unmerge_index(m), minlength=width) for m in range(2)])
    assert counts.max() <= 2
    assert list((counts == 2).sum(axis=1)) == matching.within_merges
    # A cluster is at most one same-model pair plus one feature (or pair) of the other model.
    assert counts.sum(axis=0).max() <= 4
    assert all(w <= int(beta * width / 2) for w in matching.within_merges)
    assert matching.forced_merges == 0
    # With alpha > 0 nothing stops a cluster from taking more features of a model it already holds.
    loose = np.stack([np.bincount(zip_match(corr, alpha=1.0, beta=beta).unmerge_index(m), minlength=width)
                      for m in range(2)])
    assert loose.max() > 2


def test_zip_deterministic_with_ties():
    # All-equal off-diagonal similarities: only tie-breaking decides, by lowest flat index.
    corr = np.full((8, 8), 0.5)
    np.fill_diagonal(corr, 1.0)
    first = zip_match(corr, beta=0.0)
    second = zip_match(corr.copy(), beta=0.0)
    np.testing.assert_array_equal(first.clusters, second.clusters)
    # Lowest flat index first: (0, 4), then (1, 5), ... (cross-model only with beta = 0).
    np.testing.assert_array_equal(first.clusters, [0, 1, 2, 3, 0, 1, 2, 3])
    clusters, *_ = _naive_zip(corr, 2, 0.3, 0.125, 4)
    np.testing.assert_array_equal(zip_match(corr).clusters, clusters)


def test_zip_does_not_modify_its_input():
    corr = _random_corr(12, 10)
    before = corr.copy()
    zip_match(corr)
    np.testing.assert_array_equal(corr, before)


def test_zip_large_runs():
    rng = np.random.default_rng(13)
    width = 1024
    x = rng.normal(size=(2 * width, 64)).astype(np.float64)
    corr = np.corrcoef(x)  # 2048 × 2048
    matching = zip_match(corr)
    assert matching.clusters.shape == (2 * width,)
    assert np.bincount(matching.clusters).size == width
    assert matching.merge[0].shape == (width, width)


def test_zip_falls_back_when_every_pair_is_forbidden():
    # Three models, alpha <= 0, beta = 0: a cluster {A, B} may only take C features, {A, C} only B ... so a single
    # cluster cannot be reached within the rules; the last merges are forced and reported.
    corr = _random_corr(14, 3, num_models=3)
    matching = zip_match(corr, num_models=3, alpha=0.0, beta=0.0, target_width=1)
    _check_invariants(matching, 3, 3, 1)
    assert matching.forced_merges > 0
    assert matching.cross_merges + sum(matching.within_merges) >= 8  # forced merges are counted too
    clusters, _, _, forced = _naive_zip(corr, 3, 0.0, 0.0, 1)
    np.testing.assert_array_equal(matching.clusters, clusters)
    assert matching.forced_merges == forced


# --- solve and validation ------------------------------------------------------------------------------------------

def test_solve_dispatches():
    corr = _random_corr(15, 8)
    np.testing.assert_array_equal(solve("zip", corr, 8).clusters, zip_match(corr).clusters)
    np.testing.assert_array_equal(
        solve("zip", corr, 8, alpha=0.5, beta=0.0).clusters, zip_match(corr, alpha=0.5, beta=0.0).clusters
    )
    np.testing.assert_array_equal(solve("permute", corr, 8).clusters, permute_match(corr).clusters)
    np.testing.assert_array_equal(solve("average", None, 8).clusters, average_match(8).clusters)
    averaged = solve("average", corr, 8)
    assert averaged.mean_merge_correlation == pytest.approx(np.mean([corr[k, 8 + k] for k in range(8)]))


@pytest.mark.parametrize("tile", [5, 7, 24, 256])
def test_check_corr_in_tiles_is_the_mean_with_the_transpose(monkeypatch, tile):
    """The tiled check gives (C + Cᵀ) / 2 bit for bit, finds an asymmetry or a NaN wherever it lies (below the
    diagonal too: those entries are only ever read as a mirror tile), and counts every non-finite value."""
    from onnxzip import solver

    monkeypatch.setattr(solver, "_TILE", tile)
    rng = np.random.default_rng(3)
    c = rng.uniform(-1, 1, (24, 24))
    c = (c + c.T) / 2 + rng.uniform(-1e-9, 1e-9, (24, 24))
    out = solver._check_corr(c, 2, 12)
    assert np.array_equal(out, (c + c.T) * 0.5) and np.array_equal(out, out.T)
    for i, j in ((20, 1), (1, 20), (6, 5)):
        asym = c.copy()
        asym[i, j] += 0.1
        with pytest.raises(ValueError, match="not symmetric"):
            solver._check_corr(asym, 2)
    bad = c.copy()
    bad[20, 1] = np.nan  # below the diagonal, in a mirror tile
    bad[3, 3] = np.inf
    bad[0, 23] = -np.inf
    with pytest.raises(ValueError, match="3 non-finite"):
        solver._check_corr(bad, 2)


def test_solve_rejects_bad_input():
    corr = _random_corr(16, 6)
    with pytest.raises(ValueError, match="unknown matching method"):
        solve("ensemble", corr, 6)
    with pytest.raises(ValueError, match="needs a correlation"):
        solve("zip", None, 6)
    with pytest.raises(ValueError, match="12×12"):
        solve("zip", corr, 5)
    with pytest.raises(ValueError, match="square"):
        solve("permute", corr[:, :11], 6)
    asym = corr.copy()
    asym[0, 1] += 0.1
    with pytest.raises(ValueError, match="symmetric"):
        solve("zip", asym, 6)
    nonfinite = corr.copy()
    nonfinite[2, 3] = nonfinite[3, 2] = np.nan
    with pytest.raises(ValueError, match="2 non-finite"):
        solve("permute", nonfinite, 6)
    with pytest.raises(ValueError, match="target_width"):
        zip_match(corr, target_width=13)
    with pytest.raises(ValueError, match="beta"):
        zip_match(corr, beta=-0.1)
    with pytest.raises(ValueError, match="out of range"):
        average_match(3).unmerge_index(2)


def test_solve_blocks_keeps_every_cluster_inside_one_block():
    """Features 0-3 and 4-7 of each model are two blocks (a grouped layer's groups). The correlation pairs every
    feature of A with B's feature in the *other* block; matching must still stay inside the blocks, and equal the
    blocks solved one by one."""
    from onnxzip.solver import solve_blocks
    rng = np.random.RandomState(4)
    x = rng.randn(400, 8)
    y = np.concatenate([x[:, 4:], x[:, :4]], axis=1) + 0.1 * rng.randn(400, 8)
    corr = np.corrcoef(np.concatenate([x, y], axis=1).T)
    for method in ("zip", "permute", "average"):
        m = solve_blocks(method, corr, 8, 2)
        block_of = np.concatenate([np.arange(8) // 4, np.arange(8) // 4])
        for c in range(m.merged_width):
            assert len(set(block_of[m.clusters == c])) == 1, (method, c)
        first = solve(method, corr[np.ix_([0, 1, 2, 3, 8, 9, 10, 11], [0, 1, 2, 3, 8, 9, 10, 11])], 4)
        np.testing.assert_array_equal(m.merge[0][:4, :4], first.merge[0])
        np.testing.assert_array_equal(m.merge[0][:4, 4:], 0)
    # without blocks, the same correlation pairs across the blocks
    assert (solve("permute", corr, 8).unmerge_index(1)[:4] >= 4).all()
    with pytest.raises(ValueError):
        solve_blocks("zip", corr, 8, 3)


def test_solve_blocks_with_a_partition_numbers_each_block_by_its_positions():
    """Blocks {0, 2, 5} and {1, 3, 4} (the channels a slice keeps after a shuffle): every cluster stays inside a
    block, and a block's merged features sit at its own positions, so a view of whole blocks holds exactly its own
    merged features (view_matching); a view of part of a block is refused."""
    from onnxzip.solver import solve_blocks, view_matching
    rng = np.random.RandomState(7)
    x = rng.randn(300, 6)
    y = x[:, [3, 0, 5, 1, 2, 4]] + 0.1 * rng.randn(300, 6)  # B's feature k is A's [3, 0, 5, 1, 2, 4][k]
    corr = np.corrcoef(np.concatenate([x, y], axis=1).T)
    labels = [0, 1, 0, 1, 1, 0]
    m = solve_blocks("permute", corr, 6, labels)
    for model in range(2):
        for c, k in enumerate(m.unmerge_index(model)):
            assert labels[c] == labels[k], (model, c, k)
    view = view_matching([(9, 5), (9, 0), (9, 2)], {9: m})  # block 0 in another order
    assert view.width == 3 and view.merged_width == 3
    with pytest.raises(ValueError):
        view_matching([(9, 0), (9, 1)], {9: m})
    unrestricted = solve("permute", corr, 6)
    assert any(labels[c] != labels[k] for c, k in enumerate(unrestricted.unmerge_index(1)))


def _within_cluster_total(c, clusters, n):
    width = len(clusters) // n
    total = 0.0
    for p in range(n):
        for q in range(p + 1, n):
            for i in range(width):
                j = int(np.flatnonzero(clusters[q * width:(q + 1) * width] == clusters[p * width + i])[0])
                total += c[p * width + i, q * width + j]
    return total


def test_permute_many_recovers_planted_permutations_and_beats_the_star_start():
    from onnxzip import solver

    rng = np.random.default_rng(3)
    width, n = 12, 4
    base = rng.normal(size=(600, width))
    perms = [np.arange(width)] + [rng.permutation(width) for _ in range(n - 1)]
    feats = np.concatenate([base[:, p] + 0.4 * rng.normal(size=(600, width)) for p in perms], axis=1)
    m = solver.permute_match(np.corrcoef(feats.T), n)
    for k in range(n):  # model k's feature i is the base feature perms[k][i]: cluster perms[k][i]
        assert np.array_equal(m.unmerge_index(k), perms[k])
    # on an unstructured correlation the coordinate ascent never ends below the star start (all matched to model 0)
    for seed in range(5):
        x = np.random.default_rng(seed).normal(size=(40, n * 6))
        c = np.corrcoef(x.T)
        got = solver.permute_match(c, n)
        rounds, solver.PERMUTE_ROUNDS = solver.PERMUTE_ROUNDS, 0
        try:
            star = solver.permute_match(c, n)
        finally:
            solver.PERMUTE_ROUNDS = rounds
        assert _within_cluster_total(c, got.clusters, n) >= _within_cluster_total(c, star.clusters, n) - 1e-12
        assert np.array_equal(got.unmerge_index(0), np.arange(6))


# ---------------------------------------------------------------------------------------------------------------
# Whole blocks matched across positions (a grouped layer's groups)
# ---------------------------------------------------------------------------------------------------------------

def _block_swapped_copy(seed, width, blocks, samples=600):
    """Model B is model A with its blocks in another order (`order`: B's block k is A's block order[k]) and the
    features inside every block permuted: b[:, k] = a[:, perm[k]]."""
    rng = np.random.default_rng(seed)
    a = _features(rng, samples, width)
    size = width // blocks
    order = rng.permutation(blocks)
    while np.array_equal(order, np.arange(blocks)):
        order = rng.permutation(blocks)
    perm = np.concatenate([order[k] * size + rng.permutation(size) for k in range(blocks)])
    return a, a[:, perm], order, perm


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_match_blocks_recovers_swapped_blocks_and_solve_blocks_then_the_features(method):
    from onnxzip.solver import match_blocks, solve_blocks

    width, blocks = 16, 4
    a, b, order, perm = _block_swapped_copy(0, width, blocks)
    corr = _stacked_corr(a, b)
    found = match_blocks([(corr, width)], blocks)
    # block k of A is matched with the block of B that holds it: B's block j with order[j] = k
    assert np.array_equal(found[0], np.arange(blocks)) and np.array_equal(order[found[1]], np.arange(blocks))
    labels = np.arange(width) // (width // blocks)
    m = solve_blocks(method, corr, width, labels, beta=0.0, block_order=found)
    # B's feature k is A's feature perm[k]: both land in A's feature's cluster
    assert np.array_equal(m.unmerge_index(1), m.unmerge_index(0)[perm])
    assert np.array_equal(m.unmerge_index(0) // 4, labels), "merged block k holds A's block k"
    # position by position (the default), the same correlation cannot be matched exactly
    plain = solve_blocks(method, corr, width, labels, beta=0.0)
    assert not np.array_equal(plain.unmerge_index(1), plain.unmerge_index(0)[perm])


def test_match_blocks_sums_linked_spaces_and_matches_every_model_to_model_zero():
    from onnxzip.solver import match_blocks

    width, blocks = 12, 3
    rng = np.random.default_rng(5)
    a1, a2 = _features(rng, 500, width), _features(rng, 500, width)
    order = np.array([2, 0, 1])
    size = width // blocks
    perm = np.concatenate([order[k] * size + np.arange(size) for k in range(blocks)])
    # one space says nothing (B's features are noise there), the linked one carries the match
    noise = _features(rng, 500, width)
    spaces = [(_stacked_corr(a1, noise, a1[:, perm]), width), (_stacked_corr(a2, a2[:, perm], a2[:, perm]), width)]
    found = match_blocks(spaces, blocks, num_models=3)
    assert np.array_equal(found[0], np.arange(blocks))
    assert np.array_equal(order[found[1]], np.arange(blocks)) and np.array_equal(order[found[2]], np.arange(blocks))


def test_solve_blocks_refuses_a_block_order_that_is_no_permutation():
    from onnxzip.solver import solve_blocks

    with pytest.raises(ValueError, match="one permutation"):
        solve_blocks("permute", np.eye(16), 8, np.arange(8) // 4, block_order=[[0, 1], [1, 1]])


def _solved_noisy_permutations(rng, method: str, width: int = 24):
    """A matching solved by `method` on noisy permuted copies of one set of features (3 models for zip, else 2)."""
    num_models = 3 if method == "zip" else 2
    feats = rng.standard_normal((400, width))
    stacked = np.concatenate([feats[:, rng.permutation(width)] + 0.3 * rng.standard_normal((400, width))
                              for _ in range(num_models)], axis=1)
    return solve(method, np.corrcoef(stacked.T), width, num_models=num_models), width, num_models


@pytest.mark.parametrize("method", ["zip", "permute", "average"])
def test_contract_applies_merge_and_unmerge_matrices_as_their_dense_products(method):
    rng = np.random.default_rng(3)
    matching, width, num_models = _solved_noisy_permutations(rng, method)
    for m in range(num_models):
        for matrix in (matching.merge[m], matching.unmerge[m].T):
            for shape, axis in (((width,), 0), ((width, 7), 0), ((5, width), 1), ((2, width, 3), 1)):
                x = rng.standard_normal(shape)
                dense = np.moveaxis(np.tensordot(matrix, x, axes=([1], [axis])), 0, axis)
                got = contract(matrix, x, axis)
                assert got.shape == dense.shape and got.dtype == np.float64
                np.testing.assert_allclose(got, dense, rtol=1e-14, atol=1e-14)
            # float32 values take the matrix's float64, as the dense product does
            x32 = rng.standard_normal((width, 4)).astype(np.float32)
            assert contract(matrix, x32).dtype == np.float64
            np.testing.assert_allclose(contract(matrix, x32), matrix @ x32.astype(np.float64), rtol=1e-14)


@pytest.mark.parametrize("method", ["zip", "permute", "average"])
def test_merge_features_is_the_sum_of_each_models_merge_matrix_product(method):
    rng = np.random.default_rng(5)
    solved, width, num_models = _solved_noisy_permutations(rng, method)
    # and by hand: clusters with several features of one model, and clusters with none of a model
    by_hand = matching_from_clusters(np.r_[0, 0, 1, 2, 3, 3, 4, 5, 5, 5, 1, 2], 2, 6)
    for matching in (solved, by_hand):
        xs = [rng.standard_normal((9, matching.width)).astype(np.float32) for _ in range(matching.num_models)]
        want = sum(x.astype(np.float64) @ matching.merge[m].T for m, x in enumerate(xs))
        got = matching.merge_features(xs)
        assert got.shape == (9, matching.merged_width) and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)
    matching = solved
    xs = [rng.standard_normal((9, width)).astype(np.float32) for _ in range(num_models)]
    assert matching.merge_features([x[:0] for x in xs]).shape == (0, matching.merged_width)
    with pytest.raises(ValueError, match="one feature array per model"):
        matching.merge_features(xs[:1])
    with pytest.raises(ValueError, match="with the same rows"):
        matching.merge_features([x[:, 1:] for x in xs])
    with pytest.raises(ValueError, match="with the same rows"):
        matching.merge_features([xs[0][:3]] + xs[1:])


def test_contract_leaves_rows_without_members_zero_and_takes_a_dense_product_otherwise():
    rng = np.random.default_rng(4)
    sparse = np.zeros((6, 5))
    sparse[[4, 0, 4, 2], [0, 1, 3, 4]] = [0.5, 2.0, -1.5, 1.0]  # column 2 and rows 1, 3, 5 are empty
    dense = rng.standard_normal((6, 5))  # many nonzeros a column: the general product
    for matrix in (sparse, dense, np.zeros((3, 5))):
        x = rng.standard_normal((4, 5, 2))
        want = np.einsum("ij,kjl->kil", matrix, x)
        np.testing.assert_allclose(contract(matrix, x, axis=1), want, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="cannot be applied along axis 0"):
        contract(sparse, np.ones((6, 5)))
