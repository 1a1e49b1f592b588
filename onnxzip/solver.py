"""Matching: a correlation matrix goes in, merge/unmerge matrices come out. Pure numpy, knows nothing of ONNX.

For one feature space with F features per model and N models, the stacked correlation matrix C (N·F × N·F,
model-major: model 0's F features, then model 1's, ...) comes from `onnxzip.stats.FeatureStats.correlation`.
Every method here partitions the N·F stacked features into F_out clusters and turns the partition into matrices
(ZIPIT.md, "The zip operation", step 4):

- P, the N·F × F_out membership matrix (P[k, c] = 1 iff feature k is in cluster c);
- unmerge U = P: each original feature is restored as a copy of its cluster's merged value;
- merge M = (P / column sums)ᵀ: a merged feature is the average of its members;
- split by model: ``merge[m]`` = M[:, m·F:(m+1)·F] (F_out × F), ``unmerge[m]`` = U[m·F:(m+1)·F, :] (F × F_out),
  so that Σ_m merge[m] · unmerge[m] = I.

Methods (ZIPIT.md and Stoica, Bolya et al., "ZipIt! Merging Models from Different Tasks without Training",
ICLR 2024): ``zip`` (greedy matching within and across models), ``permute`` (one-to-one linear assignment, the
Git Re-Basin-style baseline) and ``average`` (identity matching: plain weight averaging).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("zip", "permute", "average")


class PerModel:
    """A matching's merge or unmerge matrices, one per model, made when asked for (`Matching.merge`): a matching
    keeps only its partition, as dense matrices of a wide space take hundreds of MB (a 3072-wide pair: 288 MiB)."""

    def __init__(self, matching: "Matching", unmerge: bool):
        self._matching, self._unmerge = matching, unmerge

    def __len__(self) -> int:
        return self._matching.num_models

    def __getitem__(self, m: int) -> np.ndarray:
        if not -len(self) <= m < len(self):
            raise IndexError(f"model index {m} out of range for a matching of {len(self)} models")
        m = m % len(self)
        return self._matching.unmerge_matrix(m) if self._unmerge else self._matching.merge_matrix(m)

    def __iter__(self):
        return (self[m] for m in range(len(self)))


@dataclass
class Matching:
    """The result of matching one feature space of N models: a partition of the N·F stacked features into F_out
    clusters, and what the matcher did.

    Attributes
    ----------
    clusters: (N·F,) int, the cluster in [0, F_out) of each stacked feature, model-major order.
    num_models: N.
    merged_width: F_out, the number of merged features.
    cross_merges: merges of two clusters that had no model in common.
    within_merges: per model, merges of two clusters that both held a feature of that model (same-model merges).
    mean_merge_correlation: mean similarity of the merged pairs at the time they were merged (for zip this
        includes the alpha discount of earlier merges); nan when nothing was merged or no correlation was given.
    forced_merges: zip only: merges made after every pair allowed by alpha/beta was used up (see `zip_match`).

    `merge[m]` is model m's F_out × F merge matrix M_m (rows of the stacked [M_0 | M_1 | ...] sum to 1: each merged
    feature averages its members), `unmerge[m]` its F × F_out unmerge matrix U_m (0/1, a single 1 per row); both
    are made from the partition when asked for.
    """

    clusters: np.ndarray
    num_models: int
    merged_width: int
    cross_merges: int
    within_merges: list[int]
    mean_merge_correlation: float
    forced_merges: int = 0

    @property
    def width(self) -> int:
        """F, the number of features per model."""
        return self.clusters.shape[0] // self.num_models

    @property
    def merge(self) -> PerModel:
        return PerModel(self, unmerge=False)

    @property
    def unmerge(self) -> PerModel:
        return PerModel(self, unmerge=True)

    def sizes(self) -> np.ndarray:
        """(F_out,) float64: the number of stacked features in each cluster."""
        return np.bincount(self.clusters, minlength=self.merged_width).astype(np.float64)

    def merge_matrix(self, m: int) -> np.ndarray:
        """Model m's F_out × F merge matrix: 1 / (its cluster's size) where feature j joins cluster k, else 0."""
        index = self.unmerge_index(m)
        out = np.zeros((self.merged_width, self.width), dtype=np.float64)
        out[index, np.arange(self.width)] = 1.0 / self.sizes()[index]
        return out

    def unmerge_matrix(self, m: int) -> np.ndarray:
        """Model m's F × F_out unmerge (copy) matrix."""
        out = np.zeros((self.width, self.merged_width), dtype=np.float64)
        out[np.arange(self.width), self.unmerge_index(m)] = 1.0
        return out

    def merge_features(self, features: list) -> np.ndarray:
        """Σ_m features[m] M_mᵀ: each model's (rows, F) features merged into (rows, F_out) float64, every merged
        feature the mean of its members.

        Read from the partition itself, not from the merge matrices: the models' features side by side, gathered
        cluster by cluster (members in model-major order), scaled and summed, O(rows · N·F). No dense F_out × F
        matrix is made or searched for its nonzeros (the refit merges each batch's targets; on a ViT-B/16 pair
        making and reading those matrices took half a minute)."""
        if len(features) != self.num_models:
            raise ValueError(f"merge_features needs one feature array per model ({self.num_models}), got "
                             f"{len(features)}")
        shapes = {np.shape(x)[1:] for x in features}
        if shapes != {(self.width,)} or len({np.shape(x)[0] for x in features}) != 1:
            raise ValueError(f"merge_features needs (rows, {self.width}) arrays with the same rows, got shapes "
                             f"{[np.shape(x) for x in features]}")
        order = np.argsort(self.clusters, kind="stable")
        members = self.clusters[order]
        stacked = np.concatenate(features, axis=1, dtype=np.float64)
        picked = np.take(stacked, order, axis=1)
        picked *= 1.0 / self.sizes()[members]
        # every cluster has a member: the sums land on the merged features 0..F_out-1 in order
        return np.add.reduceat(picked, np.flatnonzero(np.r_[True, members[1:] != members[:-1]]), axis=1)

    def unmerge_index(self, m: int) -> np.ndarray:
        """(F,) int: the cluster of each of model m's features. ``unmerge[m]`` is the 0/1 copy matrix whose row k
        has its single 1 at column ``unmerge_index(m)[k]``, so U_m can be applied as a gather along the channel axis."""
        if not 0 <= m < self.num_models:
            raise ValueError(f"model index {m} out of range for a matching of {self.num_models} models")
        return self.clusters[m * self.width:(m + 1) * self.width].copy()


def matching_from_clusters(
    clusters: np.ndarray,
    num_models: int,
    merged_width: int,
    cross_merges: int = 0,
    within_merges: list[int] | None = None,
    mean_merge_correlation: float = float("nan"),
    forced_merges: int = 0,
) -> Matching:
    """The matching of a partition (ZIPIT.md step 4). ``clusters`` is the cluster index of each stacked feature;
    every cluster in [0, merged_width) must be non-empty."""
    clusters = np.asarray(clusters, dtype=np.int64)
    total = clusters.shape[0]
    if clusters.ndim != 1 or total % num_models:
        raise ValueError(f"clusters must be a 1-D array of num_models·F entries, got shape {clusters.shape}")
    if total and (clusters.min() < 0 or clusters.max() >= merged_width):
        raise ValueError(f"cluster indices must lie in [0, {merged_width})")
    empty = int(np.sum(np.bincount(clusters, minlength=merged_width) == 0))
    if empty:
        raise ValueError(f"{empty} cluster(s) have no member")
    return Matching(
        clusters=clusters.copy(),
        num_models=int(num_models),
        merged_width=int(merged_width),
        cross_merges=int(cross_merges),
        within_merges=list(within_merges) if within_merges is not None else [0] * num_models,
        mean_merge_correlation=float(mean_merge_correlation),
        forced_merges=int(forced_merges),
    )


def contract(matrix: np.ndarray, x: np.ndarray, axis: int = 0) -> np.ndarray:
    """`matrix` (F' × F) applied along `axis` of `x` (size F there; size F' in the result): Σ_j matrix[:, j] x[.., j, ..].

    A merge or unmerge matrix has at most one nonzero in each column (a feature belongs to one cluster): then
    the result is a gather of x's slices, scaled, and summed cluster by cluster, O(x.size) instead of a dense
    product's O(F' · x.size) (on a ViT-B/16 pair the dense products of the refit's targets took minutes). The
    same sums, but over the members only and in their order. Any other matrix takes a dense product."""
    matrix = np.asarray(matrix)
    x = np.asarray(x, dtype=np.result_type(matrix, x, np.float32))
    if x.shape[axis] != matrix.shape[1]:
        raise ValueError(f"a {matrix.shape[0]}x{matrix.shape[1]} matrix cannot be applied along axis {axis} of "
                         f"an array of shape {x.shape}")
    nonzero = matrix != 0
    if np.any(np.count_nonzero(nonzero, axis=0) > 1):
        return np.moveaxis(np.tensordot(matrix, x, axes=([1], [axis])), 0, axis)
    cols = np.flatnonzero(nonzero.any(axis=0))
    rows = np.argmax(nonzero[:, cols], axis=0)
    order = np.argsort(rows, kind="stable")
    rows, cols = rows[order], cols[order]
    shape = [1] * x.ndim
    shape[axis] = -1
    picked = np.take(x, cols, axis=axis)
    picked *= matrix[rows, cols].astype(picked.dtype).reshape(shape)
    out_shape = list(x.shape)
    out_shape[axis] = matrix.shape[0]
    if not cols.size:
        return np.zeros(out_shape, dtype=picked.dtype)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    sums = np.add.reduceat(picked, starts, axis=axis)
    if starts.size == matrix.shape[0]:  # every row has a member (a partition's merge and unmerge matrices)
        return sums
    out = np.zeros(out_shape, dtype=picked.dtype)
    where = [slice(None)] * x.ndim
    where[axis] = rows[starts]
    out[tuple(where)] = sums
    return out


def concat_matchings(parts: list) -> Matching:
    """The matching of channels concatenated from several spaces: block-diagonal, each part merged by its own
    matching (a channel Concat moves no feature across parts)."""
    if not parts:
        raise ValueError("concat_matchings needs at least one matching")
    n = parts[0].num_models
    if any(p.num_models != n for p in parts):
        raise ValueError("every part must match the same number of models")
    per_model, offset = [[] for _ in range(n)], 0
    for p in parts:
        for m in range(n):
            per_model[m].append(p.clusters[m * p.width:(m + 1) * p.width] + offset)
        offset += p.merged_width
    clusters = np.concatenate([np.concatenate(c) for c in per_model])
    return matching_from_clusters(
        clusters, n, offset,
        cross_merges=sum(p.cross_merges for p in parts),
        within_merges=[sum(p.within_merges[m] for p in parts) for m in range(n)],
        forced_merges=sum(p.forced_merges for p in parts),
    )


def block_labels(width: int, blocks) -> np.ndarray:
    """(F,) int: the block of each feature. `blocks` is a number of contiguous equal blocks (a grouped layer's
    groups) or already a label per feature (any partition, e.g. the channels a Slice keeps after a shuffle)."""
    if isinstance(blocks, (int, np.integer)):
        if blocks < 1 or width % blocks:
            raise ValueError(f"blocks must be a positive divisor of the width {width}, got {blocks!r}")
        return np.arange(width) // (width // int(blocks))
    labels = np.asarray(blocks, dtype=np.int64)
    if labels.shape != (width,):
        raise ValueError(f"a partition of {width} features needs {width} labels, got shape {labels.shape}")
    return labels


def solve_blocks(
    method: str,
    corr: np.ndarray | None,
    width: int,
    blocks=1,
    num_models: int = 2,
    alpha: float = 0.3,
    beta: float = 0.125,
    target_width: int | None = None,
    alike=(),
    block_order=None,
) -> Matching:
    """Match a space whose F features are partitioned into blocks (`block_labels`: a grouped convolution's groups,
    the channels a Slice keeps): block b of every model is matched on its own, from its own rows and columns of
    the stacked correlation, and its merged features take the positions of its source features (block b's merged
    features are numbered by the positions block b holds in the space). No cluster spans two blocks, every merged
    feature sits at a position of its own block, so a grouped layer stays grouped and a slice of whole blocks holds
    exactly its own merged features; a permutation inside each block is found exactly as for a whole space. By
    default block b of one model is matched with block b of the others (`block_order` changes that).

    target_width (zip only; default F): the number of merged features. With blocks it must split evenly over
    contiguous equal blocks (a grouped layer's groups): block b's merged features are then numbered
    b·T/G … (b+1)·T/G - 1; a partition into other blocks (a slice's channels) keeps T = F.

    `alike`: pairs (p, q) of position lists whose features must be matched alike, feature p[i] as feature q[i] (the
    queries and keys of one attention head cut from one packed projection: their dot product must survive). Each
    block they touch must map onto a whole block; blocks so linked are solved once, from the mean of their
    correlations, and share that matching position for position (at the space's full width).

    `block_order` (N × B, from `match_blocks`; not with `alike`): block b of model 0 is matched with block
    block_order[m][b] of model m, whose features take block b's merged positions (a grouped layer's groups matched
    as wholes across positions). Default: block b with block b."""
    labels = block_labels(width, blocks)
    target = width if target_width is None else target_width
    if block_order is not None:
        return _solve_ordered_blocks(method, corr, width, labels, num_models, alpha, beta, target, block_order)
    if len(np.unique(labels)) == 1 and not alike:
        return solve(method, corr, width, num_models, alpha, beta, target_width=target_width)
    num_models = _check_num_models(num_models)
    c = None if corr is None else _check_corr(corr, num_models, width)
    groups = len(np.unique(labels))
    contiguous = np.array_equal(labels, np.arange(width) // (width // groups)) if width % groups == 0 else False
    if target != width and (not contiguous or target % groups):
        raise ValueError(f"a target width of {target} does not split over the {groups} blocks of this space"
                         + ("" if contiguous else " (its blocks are not contiguous and equal)"))
    per_block = target // groups
    clusters = np.empty(num_models * width, dtype=np.int64)
    parts = []
    if target != width and alike:
        raise ValueError("features matched alike (queries and keys cut from one projection) keep their space's width")
    for b, members in enumerate(_alike_groups(labels, alike)):
        size = members[0].size
        sub = None
        if c is not None:
            indices = [np.concatenate([m * width + positions for m in range(num_models)]) for positions in members]
            sub = sum(c[np.ix_(index, index)] for index in indices) / len(indices)
        part = solve(method, sub, size, num_models, alpha, beta, target_width=None if target == width else per_block)
        if target == width and part.merged_width != size:  # the positions are the merged features' numbering
            raise ValueError(f"a block of {size} features was merged into {part.merged_width}")
        for positions in members:
            numbering = positions if target == width else b * per_block + np.arange(per_block)
            for m in range(num_models):
                clusters[m * width + positions] = numbering[part.clusters[m * size:(m + 1) * size]]
            parts.append(part)
    return _from_parts(clusters, num_models, target, parts)


def _from_parts(clusters: np.ndarray, num_models: int, target: int, parts: list) -> Matching:
    """The matching of a whole space from its clusters, with the merge counts of the blocks' matchings summed."""
    values = [p.mean_merge_correlation for p in parts if np.isfinite(p.mean_merge_correlation)]
    within = np.sum([np.asarray(p.within_merges, dtype=np.int64) for p in parts], axis=0) if parts else \
        np.zeros(num_models, dtype=np.int64)
    return matching_from_clusters(clusters, num_models, target, cross_merges=sum(p.cross_merges for p in parts),
                                  within_merges=[int(x) for x in within],
                                  forced_merges=sum(p.forced_merges for p in parts),
                                  mean_merge_correlation=float(np.mean(values)) if values else float("nan"))


def _solve_ordered_blocks(method, corr, width, labels, num_models, alpha, beta, target, block_order) -> Matching:
    """`solve_blocks` with block b of model 0 matched to block block_order[m][b] of model m: contiguous equal blocks
    (a grouped layer's groups); merged block b is numbered by model 0's block b (or b·T/G … at target width T)."""
    num_models = _check_num_models(num_models)
    c = None if corr is None else _check_corr(corr, num_models, width)
    groups = len(np.unique(labels))
    order = np.asarray(block_order, dtype=np.int64)
    if order.shape != (num_models, groups) or any(sorted(row) != list(range(groups)) for row in order.tolist()):
        raise ValueError(f"block_order must hold one permutation of the {groups} blocks per model")
    if width % groups or not np.array_equal(labels, np.arange(width) // (width // groups)) or target % groups:
        raise ValueError("blocks matched in another order must be contiguous and equal, and the target width split "
                         "over them")
    size, per_block = width // groups, target // groups
    clusters = np.empty(num_models * width, dtype=np.int64)
    parts = []
    for b in range(groups):
        positions = [order[m, b] * size + np.arange(size) for m in range(num_models)]
        index = np.concatenate([m * width + positions[m] for m in range(num_models)])
        sub = None if c is None else c[np.ix_(index, index)]
        part = solve(method, sub, size, num_models, alpha, beta, target_width=None if target == width else per_block)
        numbering = b * per_block + np.arange(part.merged_width)
        for m in range(num_models):
            clusters[m * width + positions[m]] = numbering[part.clusters[m * size:(m + 1) * size]]
        parts.append(part)
    return _from_parts(clusters, num_models, target, parts)


def block_scores(corr: np.ndarray, width: int, blocks: int, num_models: int, m: int) -> np.ndarray:
    """B × B: how well block b of model 0 matches block c of model m, as the total correlation of the best
    one-to-one matching of their features (a linear assignment per pair of blocks: the score the permute method
    would reach inside them). Blocks are contiguous and equal."""
    from scipy.optimize import linear_sum_assignment  # imported when used: scipy.optimize takes a second to load

    c = _check_corr(corr, num_models, width)
    size = width // blocks
    cross = c[:width, m * width:(m + 1) * width]
    cross = np.where(np.isfinite(cross), cross, 0.0)
    scores = np.empty((blocks, blocks))
    for b in range(blocks):
        for k in range(blocks):
            sub = cross[b * size:(b + 1) * size, k * size:(k + 1) * size]
            rows, cols = linear_sum_assignment(sub, maximize=True)
            scores[b, k] = sub[rows, cols].sum()
    return scores


def match_blocks(spaces: list, blocks: int, num_models: int = 2) -> np.ndarray:
    """Which block of every model goes with each block of model 0, for spaces whose blocks move together (a grouped
    layer's input and output): `spaces` lists (stacked correlation, width) per space; model m's blocks are assigned
    to model 0's by linear assignment on the summed `block_scores` of the spaces. Returns N × B, row 0 the
    identity (the permute method's star start, model by model to model 0)."""
    from scipy.optimize import linear_sum_assignment

    num_models = _check_num_models(num_models)
    order = np.tile(np.arange(blocks), (num_models, 1))
    for m in range(1, num_models):
        total = sum(block_scores(corr, width, blocks, num_models, m) for corr, width in spaces)
        rows, cols = linear_sum_assignment(total, maximize=True)
        order[m, rows] = cols
    return order


def _alike_groups(labels: np.ndarray, alike) -> list:
    """The blocks of `labels`, grouped by the `alike` links between them: per group, one position array per block,
    ordered so that position k of every member is matched as position k of the first (its sorted positions)."""
    blocks = {int(label): np.flatnonzero(labels == label) for label in np.unique(labels)}
    links: dict = {label: [] for label in blocks}
    for p, q in alike:
        p, q = np.asarray(p, dtype=np.int64), np.asarray(q, dtype=np.int64)
        if p.shape != q.shape or p.ndim != 1:
            raise ValueError("alike positions must come in pairs of equal-length lists")
        for label in np.unique(labels[p]):
            src, dst = p[labels[p] == label], q[labels[p] == label]
            other = np.unique(labels[dst])
            if len(other) != 1 or src.size != blocks[int(label)].size or dst.size != blocks[int(other[0])].size:
                raise ValueError(f"features matched alike do not map block {int(label)} onto one whole block")
            links[int(label)].append((int(other[0]), dict(zip(src.tolist(), dst.tolist()))))
            links[int(other[0])].append((int(label), dict(zip(dst.tolist(), src.tolist()))))
    order, groups = {}, []
    for label in sorted(blocks):
        if label in order:
            continue
        order[label] = blocks[label]
        group, stack = [label], [label]
        while stack:
            current = stack.pop()
            for other, mapping in links[current]:
                if other not in order:
                    order[other] = np.array([mapping[int(x)] for x in order[current]], dtype=np.int64)
                    group.append(other)
                    stack.append(other)
        groups.append([order[g] for g in group])
    return groups


def view_matching(channels: list, matchings: dict) -> Matching:
    """The matching of a *view*: a tensor whose channel j is channel c_j of space s_j, for `channels` =
    [(s_j, c_j), ...] (a slice, a shuffle, their compositions), from the matchings of the spaces it reads.

    The merged tensor holds merged channel c_j of s_j at position j (the view's operators run on merged tensors
    alike), so each model's channel j is restored from the position that holds its cluster. That position exists
    when every cluster of a feature the view reads lies inside the view (graph analysis partitions each space so
    that views read whole blocks, and `solve_blocks` keeps clusters at their block's positions); ValueError if not.

    A view may read each of its channels the same number of times (grouped-query attention repeats every key and
    value head over its group of query heads): copy k of a channel is restored from copy k of its cluster, so each
    copy stays in its own head."""
    if not channels:
        raise ValueError("a view needs at least one channel")
    n = next(iter(matchings.values())).num_models
    copies: dict = {}  # (space, channel) -> the positions that read it, in order
    copy = []  # position j reads copy copy[j] of its channel
    for j, pair in enumerate(channels):
        copy.append(len(copies.setdefault(pair, [])))
        copies[pair].append(j)
    if len({len(v) for v in copies.values()}) != 1:
        raise ValueError("a view reads some channels more often than others")
    width = len(channels)
    clusters = np.empty(n * width, dtype=np.int64)
    for j, (space, c) in enumerate(channels):
        base = matchings[space]
        if base.merged_width != base.width:
            raise ValueError(f"space {space} is merged into {base.merged_width} of {base.width} features; a view "
                             "needs one merged feature per position")
        for m in range(n):
            cluster = int(base.clusters[m * base.width + c])
            if (space, cluster) not in copies:
                raise ValueError(f"channel {c} of space {space} (model {m}) is merged with features the view does "
                                 "not read")
            clusters[m * width + j] = copies[(space, cluster)][copy[j]]
    return matching_from_clusters(clusters, n, width)


def _check_num_models(num_models: int) -> int:
    if int(num_models) != num_models or num_models < 1:
        raise ValueError(f"num_models must be a positive integer, got {num_models!r}")
    return int(num_models)


# Side of the square tiles a stacked correlation matrix is checked in.
_TILE = 256


def _check_corr(corr: np.ndarray, num_models: int, width: int | None = None) -> np.ndarray:
    """Validate a stacked correlation matrix; return it as a float64, exactly symmetric copy."""
    c = np.asarray(corr, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"correlation matrix must be square, got shape {c.shape}")
    if width is not None and c.shape[0] != num_models * width:
        raise ValueError(
            f"correlation matrix must be {num_models * width}×{num_models * width} "
            f"({num_models} models × {width} features), got {c.shape[0]}×{c.shape[1]}"
        )
    if c.shape[0] == 0 or c.shape[0] % num_models:
        raise ValueError(f"correlation matrix size {c.shape[0]} is not a positive multiple of {num_models} models")
    # Tile (i, j) and its mirror (j, i) at a time, j >= i: one more matrix, not four (a 6144-wide stacked space is
    # 288 MiB a matrix), and both tiles in cache. A band of rows against the transposed band of columns read each
    # column with a stride of a whole row: measured alone, 0.80 s -> 0.51 s for a 6144-wide space, 0.19 s -> 0.13 s
    # for a 3072-wide one, the same values bit for bit.
    out = np.empty_like(c)
    size = c.shape[0]
    bad, asym, largest = 0, 0.0, 0.0
    for lo in range(0, size, _TILE):
        for lo2 in range(lo, size, _TILE):
            tile, mirror = c[lo:lo + _TILE, lo2:lo2 + _TILE], c[lo2:lo2 + _TILE, lo:lo + _TILE].T
            bad += tile.size - int(np.count_nonzero(np.isfinite(tile)))
            if lo2 != lo:
                bad += mirror.size - int(np.count_nonzero(np.isfinite(mirror)))
            if bad:
                continue
            asym = max(asym, float(np.max(np.abs(tile - mirror))))
            largest = max(largest, float(np.max(np.abs(tile))), float(np.max(np.abs(mirror))))
            target = out[lo:lo + _TILE, lo2:lo2 + _TILE]
            np.add(tile, mirror, out=target)
            target *= 0.5
            if lo2 != lo:
                out[lo2:lo2 + _TILE, lo:lo + _TILE] = target.T
    if bad:
        raise ValueError(f"correlation matrix has {bad} non-finite value(s)")
    if asym > 1e-6 * max(1.0, largest):
        raise ValueError(f"correlation matrix is not symmetric (max |C - Cᵀ| = {asym:.3g})")
    # Exact symmetry keeps the greedy matcher's row and column updates consistent.
    return out


def zip_match(
    corr: np.ndarray,
    num_models: int = 2,
    alpha: float = 0.3,
    beta: float = 0.125,
    target_width: int | None = None,
) -> Matching:
    """ZipIt! greedy matching (ZIPIT.md "The zip operation"; paper Sec. 4.1 and Appendix on alpha/beta).

    Starting from one cluster per stacked feature, repeatedly merge the most similar pair of clusters, whether
    they come from different models or the same one, until ``target_width`` clusters remain (default F: N·F → F).

    - Complete linkage: the merged cluster's similarity to every other cluster is the minimum of its two parts',
      multiplied by ``alpha`` so that a cluster that already absorbed features is less attractive. (As in the
      reference code, the multiplication also pulls negative similarities towards 0.)
    - ``alpha <= 0``: no discount; instead a merged cluster may never again merge with a cluster holding a
      feature of any model it already contains.
    - ``beta``: each model may take part in at most ``floor(beta · (N·F - target_width) / N)`` same-model merges
      (a merge of two clusters that both hold a feature of that model); once a model's budget is spent, every
      pair of clusters that both hold one of its features is forbidden. ``beta = 0`` allows only cross-model merges.

    Ties go to the lowest flat index of the (symmetric) similarity matrix; the survivor of a merge is the lower
    index, and clusters are numbered in order of their lowest member. The loop keeps each row's best entry, so a
    merge costs O(N·F) plus a rescan of the few rows whose best entry it touched, not a rescan of the whole
    matrix (the reference implementation's cubic cost, ZIPIT.md "Known limits").

    Two models reduced to F (the default) always reach the target within these rules. With more models, or a
    target below F, every remaining pair can become forbidden first (e.g. two clusters that each hold features of
    models 0 and 1 once both budgets are spent). The remaining merges then ignore the alpha/beta restrictions and
    take the most similar pair by complete linkage alone; they are counted in ``forced_merges`` (and in
    ``within_merges``, which may then exceed the budget) so the caller can report it.

    Raises ValueError on invalid input.
    """
    num_models = _check_num_models(num_models)
    return _zip_match(_check_corr(corr, num_models), num_models, alpha, beta, target_width)


def _zip_match(sim: np.ndarray, num_models: int, alpha: float, beta: float, target_width) -> Matching:
    """`zip_match` on the solver's own checked copy of the correlation matrix (`_check_corr`), which it modifies:
    `solve` checks its input once and calls this (a check is a full copy: seconds on a 6144-wide space)."""
    total = sim.shape[0]
    width = total // num_models
    target = width if target_width is None else target_width
    if int(target) != target or not 1 <= target <= total:
        raise ValueError(f"target_width must be an integer in [1, {total}], got {target_width!r}")
    target = int(target)
    if not np.isfinite(alpha) or not np.isfinite(beta) or beta < 0:
        raise ValueError(f"alpha must be finite and beta finite and >= 0, got alpha={alpha!r}, beta={beta!r}")

    to_remove = total - target
    # The small epsilon keeps e.g. 0.125 · 64 / 2 = 4 from flooring to 3 through rounding.
    budget = np.full(num_models, int(np.floor(beta * to_remove / num_models + 1e-9)), dtype=np.int64)
    exhausted = budget <= 0
    origin = np.repeat(np.arange(num_models), width)
    contains = np.zeros((total, num_models), dtype=bool)  # contains[k, m]: cluster k holds a feature of model m
    contains[np.arange(total), origin] = True
    alive = np.ones(total, dtype=bool)
    owner = np.arange(total)  # surviving cluster index of each stacked feature

    np.fill_diagonal(sim, -np.inf)
    # Complete-linkage similarities without the alpha/beta prohibitions, for the fallback when everything is
    # forbidden before the target is reached.
    linkage = sim.copy()
    relaxed = False
    forced_merges = 0
    for m in np.flatnonzero(exhausted):
        block = slice(m * width, (m + 1) * width)
        sim[block, block] = -np.inf

    rows = np.arange(total)
    best_col = np.argmax(sim, axis=1)
    best_val = sim[rows, best_col]

    cross_merges = 0
    within_merges = np.zeros(num_models, dtype=np.int64)
    merged_values: list[float] = []

    for _ in range(to_remove):
        # np.argmax returns the first maximum: lowest row among equal row-bests, lowest column within a row,
        # i.e. the lowest flat index overall.
        r = int(np.argmax(best_val))
        value = float(best_val[r])
        if value == -np.inf and not relaxed:
            # Stalled: merges only make clusters hold more models and spend more budget, so no pair becomes
            # allowed again; finish on the unrestricted linkage.
            relaxed = True
            sim = linkage
            best_col = np.argmax(sim, axis=1)
            best_val = sim[rows, best_col]
            r = int(np.argmax(best_val))
            value = float(best_val[r])
            if value == -np.inf:  # only if alpha overflowed the similarities
                raise ValueError(f"zip matching failed: no finite similarity left (alpha={alpha!r} too large?)")
        if relaxed:
            forced_merges += 1
        i, j = sorted((r, int(best_col[r])))  # merge j into i

        shared = contains[i] & contains[j]
        if shared.any():
            within_merges[shared] += 1
            budget[shared] -= 1
        else:
            cross_merges += 1
        merged_values.append(value)

        row = np.minimum(sim[i], sim[j])  # complete linkage
        if alpha > 0:
            row *= alpha
        if not relaxed:
            free_row = np.minimum(linkage[i], linkage[j])
            if alpha > 0:
                free_row *= alpha
            free_row[i] = free_row[j] = -np.inf
            linkage[j, :] = linkage[:, j] = -np.inf
            linkage[i, :] = linkage[:, i] = free_row
        contains[i] |= contains[j]
        contains[j] = False
        alive[j] = False
        owner[owner == j] = i
        newly_exhausted = shared & (budget <= 0) & ~exhausted
        exhausted |= newly_exhausted

        # Models the merged cluster may not share with a partner: all of its models when alpha <= 0, otherwise
        # those whose same-model budget is spent.
        no_share = contains[i] if alpha <= 0 else contains[i] & exhausted
        if no_share.any() and not relaxed:
            row[contains[:, no_share].any(axis=1)] = -np.inf
        row[i] = -np.inf
        row[j] = -np.inf
        sim[j, :] = -np.inf
        sim[:, j] = -np.inf
        sim[i, :] = row
        sim[:, i] = row

        # Rows whose best entry was touched must be rescanned; the others can only gain column i.
        stale = (best_col == i) | (best_col == j)
        stale[i] = True
        stale[j] = True
        for m in np.flatnonzero(newly_exhausted & ~relaxed):
            holders = np.flatnonzero(contains[:, m])
            sim[np.ix_(holders, holders)] = -np.inf
            stale[holders] = True
        gains = ~stale & ((row > best_val) | ((row == best_val) & (i < best_col)))
        best_val[gains] = row[gains]
        best_col[gains] = i
        redo = np.flatnonzero(stale)
        sub = sim[redo]
        cols = np.argmax(sub, axis=1)
        best_col[redo] = cols
        best_val[redo] = sub[np.arange(redo.size), cols]

    rank = np.full(total, -1, dtype=np.int64)
    survivors = np.flatnonzero(alive)
    rank[survivors] = np.arange(survivors.size)
    return matching_from_clusters(
        rank[owner],
        num_models,
        target,
        cross_merges=cross_merges,
        within_merges=[int(w) for w in within_merges],
        mean_merge_correlation=float(np.mean(merged_values)) if merged_values else float("nan"),
        forced_merges=forced_merges,
    )


# N >= 3 models: rounds of coordinate ascent after the star start (see `permute_match`).
PERMUTE_ROUNDS = 20


def permute_match(corr: np.ndarray, num_models: int = 2) -> Matching:
    """Permutation baseline (ZIPIT.md "Baselines"): a one-to-one matching of model 0's features to model 1's that
    maximises the total correlation, by linear assignment (``scipy.optimize.linear_sum_assignment`` on -C_01).

    Cluster c holds feature c of model 0 and its match in model 1, so model 0's unmerge is the identity and each
    merged feature averages one matched pair.

    N > 2 models: every cluster holds one feature of each model, and the total correlation of all pairs inside the
    clusters is maximised by coordinate ascent, as Git Re-Basin's MergeMany does with weights (Ainsworth et al.,
    ICLR 2023, Alg. 3) but on feature correlations: start with every model matched to model 0 on its own
    (assignment on -C_0m), then, model by model, re-match model m's features to the clusters by their summed
    correlation with the other models' members (one assignment each), until a round changes nothing (at most
    PERMUTE_ROUNDS rounds). Each step cannot lower the total, so the result is at least as good as the star start.
    Clusters stay numbered by model 0's features.
    """
    from scipy.optimize import linear_sum_assignment  # imported when used: scipy.optimize takes a second to load

    num_models = _check_num_models(num_models)
    c = _check_corr(corr, num_models)
    width = c.shape[0] // num_models
    members = np.empty((num_models, width), dtype=np.int64)  # members[m, j]: model m's feature in cluster j
    members[0] = np.arange(width)
    for m in range(1, num_models):
        rows, cols = linear_sum_assignment(c[:width, m * width:(m + 1) * width], maximize=True)
        members[m, rows] = cols
    if num_models > 2:
        for _ in range(PERMUTE_ROUNDS):
            changed = False
            for m in range(num_models):
                gain = np.zeros((width, width))  # gain[i, j]: model m's feature i in cluster j
                for k in range(num_models):
                    if k != m:
                        gain += c[m * width:(m + 1) * width, k * width + members[k]]
                rows, cols = linear_sum_assignment(gain, maximize=True)
                new = np.empty(width, dtype=np.int64)
                new[cols] = rows
                if not np.array_equal(new, members[m]):
                    members[m], changed = new, True
            if not changed:
                break
        order = np.argsort(members[0])  # renumber: cluster c holds model 0's feature c
        members = members[:, order]
    clusters = np.empty(num_models * width, dtype=np.int64)
    for m in range(num_models):
        clusters[m * width + members[m]] = np.arange(width)
    values = [c[members[p] + p * width, members[q] + q * width]
              for p in range(num_models) for q in range(p + 1, num_models)] if num_models > 2 else \
        [c[np.arange(width), width + members[1]]] if num_models == 2 else []
    values = np.concatenate(values) if values else np.zeros(0)
    return matching_from_clusters(
        clusters,
        num_models,
        width,
        cross_merges=(num_models - 1) * width,
        mean_merge_correlation=float(values.mean()) if values.size else float("nan"),
    )


def average_match(width: int, num_models: int = 2) -> Matching:
    """Weight-averaging baseline (ZIPIT.md "Baselines"): identity matching, feature i of every model in cluster i."""
    num_models = _check_num_models(num_models)
    if int(width) != width or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    width = int(width)
    return matching_from_clusters(
        np.tile(np.arange(width), num_models), num_models, width, cross_merges=(num_models - 1) * width
    )


def identity_match(width: int, num_models: int = 2) -> Matching:
    """Identity matching for spaces every model shares (e.g. the graph input): the same as `average_match`."""
    return average_match(width, num_models)


def solve(
    method: str,
    corr: np.ndarray | None,
    width: int,
    num_models: int = 2,
    alpha: float = 0.3,
    beta: float = 0.125,
    target_width: int | None = None,
) -> Matching:
    """Match one feature space with ``method`` in {'zip', 'permute', 'average'}.

    ``corr`` is the (num_models·width)² stacked correlation matrix; 'average' does not need it (when given, it is
    validated and used only for ``mean_merge_correlation``). ``alpha``, ``beta`` and ``target_width`` apply to
    'zip' only. Raises ValueError on an unknown method or a missing, misshapen, asymmetric or non-finite ``corr``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown matching method {method!r}; choose one of {', '.join(METHODS)}")
    num_models = _check_num_models(num_models)
    if corr is None:
        if method != "average":
            raise ValueError(f"method {method!r} needs a correlation matrix")
        if target_width is not None and target_width != width:
            raise ValueError("method 'average' keeps the width of the space; target_width applies to 'zip' only")
        return average_match(width, num_models)
    c = _check_corr(corr, num_models, width)
    if method == "zip":
        return _zip_match(c, num_models, alpha, beta, target_width)
    if target_width is not None and target_width != width:
        raise ValueError(f"method {method!r} keeps the width of the space; target_width applies to 'zip' only")
    if method == "permute":
        return permute_match(c, num_models)
    matching = average_match(width, num_models)
    idx = np.arange(width)
    pairs = [c[idx, m * width + idx] for m in range(1, num_models)]
    if pairs:
        matching.mean_merge_correlation = float(np.concatenate(pairs).mean())
    return matching
