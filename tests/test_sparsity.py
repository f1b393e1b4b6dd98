"""Properties of the sparsity projections: exact, structured, deterministic, coupled."""

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from sparsesearch.sparsity import (
    REMOVED,
    SparsityType,
    achieved_rate,
    applicable_types,
    check_applicable,
    group_scores,
    keep_count,
    mask,
    nm_keep,
    num_groups,
    project,
)

GROUPED = [SparsityType.FILTER, SparsityType.CHANNEL, SparsityType.SHAPE, SparsityType.IRREGULAR]
CONV, LINEAR = (3, 2, 2, 2), (4, 3)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Seeded normal weights; float64 so that brute-force distances compare exactly."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def group_ids(shape: tuple[int, ...], kind: SparsityType) -> Tensor:
    """Group index of every weight, from index arithmetic independent of the module's views."""
    pos = torch.arange(math.prod(shape)).reshape(shape)
    per_filter = math.prod(shape[1:])
    if kind == SparsityType.FILTER:
        return pos // per_filter
    if kind == SparsityType.CHANNEL:
        return pos % per_filter // math.prod(shape[2:])
    if kind == SparsityType.SHAPE:
        return pos % per_filter
    return pos


def kept_groups(weight: Tensor, kind: SparsityType) -> set[int]:
    """Indices of the groups holding any non-zero weight."""
    ids = group_ids(tuple(weight.shape), kind)
    return set(ids[weight != 0].tolist())


def best_distance(weights: list[Tensor], kind: SparsityType, k: int) -> float:
    """Smallest joint squared distance to a point with the same k groups kept in every tensor."""
    n = num_groups(weights[0], kind)
    best = math.inf
    for support in itertools.combinations(range(n), k):
        kept = torch.tensor(support)
        dist = sum(
            float((w - w * torch.isin(group_ids(tuple(w.shape), kind), kept)).square().sum())
            for w in weights
        )
        best = min(best, dist)
    return best


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.7])
@pytest.mark.parametrize(
    "kind,shape",
    [(k, s) for k in GROUPED for s in (CONV, LINEAR) if (k, s) != (SparsityType.IRREGULAR, CONV)]
    + [(SparsityType.IRREGULAR, (2, 1, 2, 2))],
    ids=lambda x: x.value if isinstance(x, SparsityType) else "x".join(map(str, x)),
)
def test_projection_is_nearest_feasible_point(kind, shape, rate):
    w = randn(*shape)
    k = keep_count(num_groups(w, kind), rate)
    (z,) = project([w], kind, rate)
    assert len(kept_groups(z, kind)) <= k
    assert float((w - z).square().sum()) <= best_distance([w], kind, k) + 1e-12


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.7])
@pytest.mark.parametrize(
    "kind,shapes",
    [
        (SparsityType.FILTER, [(3, 2, 2, 2), (3, 4, 1, 1)]),  # residual branch and 1x1 shortcut
        (SparsityType.CHANNEL, [(3, 2, 2, 2), (4, 2, 1, 1)]),  # two convs reading one input
        (SparsityType.FILTER, [(3, 2, 2, 2), (3, 5)]),
    ],
    ids=["filter-conv+shortcut", "channel-conv+conv", "filter-conv+linear"],
)
def test_coupled_projection_is_nearest_joint_feasible_point(kind, shapes, rate):
    ws = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    k = keep_count(num_groups(ws[0], kind), rate)
    zs = project(ws, kind, rate)
    assert len({frozenset(kept_groups(z, kind)) for z in zs}) == 1
    dist = sum(float((w - z).square().sum()) for w, z in zip(ws, zs))
    assert dist <= best_distance(ws, kind, k) + 1e-12


def test_coupled_choice_follows_summed_scores_not_each_layer():
    a = torch.tensor([[2.0, 0.0], [1.5, 0.5]])  # alone, row 0 wins (4 > 2.5)
    b = torch.tensor([[0.1, 0.0], [2.0, 1.0]])  # row 1 wins; summed: 4.01 < 7.5, row 1 wins
    assert mask([a], SparsityType.FILTER, 0.5)[0][:, 0].tolist() == [True, False]
    ma, mb = mask([a, b], SparsityType.FILTER, 0.5)
    assert ma[:, 0].tolist() == mb[:, 0].tolist() == [False, True]


def test_coupled_tensors_with_different_group_counts_are_rejected():
    with pytest.raises(ValueError, match=r"equal numbers of filter groups, got \[3, 4\]"):
        mask([randn(3, 2), randn(4, 2)], SparsityType.FILTER, 0.5)


@pytest.mark.parametrize("kind", [SparsityType.SHAPE, SparsityType.IRREGULAR, SparsityType.NM])
def test_shape_irregular_nm_project_coupled_tensors_independently(kind):
    ws = [randn(4, 2, 2, 2, seed=1), randn(4, 8, seed=2)]
    joint = mask(ws, kind, 0.5)
    for w, m in zip(ws, joint):
        assert torch.equal(m, mask([w], kind, 0.5)[0])


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("shape,m", [((2, 3, 3, 3), 4), ((3, 8), 4), ((2, 2, 3, 3), 8)],
                         ids=["conv-partial-block", "linear", "conv-m8"])
def test_nm_keeps_largest_n_of_every_m(shape, m, rate):
    w = randn(*shape)
    n = nm_keep(rate, m)
    keep = mask([w], SparsityType.NM, rate, m=m)[0].reshape(shape[0], -1)
    rows = w.reshape(shape[0], -1)
    for row, row_keep in zip(rows, keep):
        for start in range(0, len(row), m):
            block, kept = row[start:start + m], row_keep[start:start + m]
            assert int(kept.sum()) == min(n, len(block))
            best = max(sum(block[i] ** 2 for i in c)
                       for c in itertools.combinations(range(len(block)), int(kept.sum())))
            assert float(block[kept].square().sum()) == pytest.approx(float(best))


@pytest.mark.parametrize("rate", [0.3, 0.6, 1.0, -0.1])
def test_nm_rate_without_whole_n_names_accepted_rates(rate):
    with pytest.raises(ValueError, match="accepted: 0, 0.25, 0.5, 0.75"):
        nm_keep(rate)


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("kind", GROUPED, ids=lambda k: k.value)
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (10, 20)], ids=["conv", "linear"])
def test_masks_keep_whole_groups_and_keep_count_of_them(shape, kind, rate):
    keep = mask([randn(*shape)], kind, rate)[0]
    ids = group_ids(shape, kind)
    n = int(ids.max()) + 1
    kept = torch.zeros(n, dtype=torch.long).index_add_(0, ids.flatten(), keep.flatten().long())
    sizes = torch.bincount(ids.flatten(), minlength=n)
    assert bool(((kept == 0) | (kept == sizes)).all())
    assert int((kept > 0).sum()) == keep_count(n, rate)


@pytest.mark.parametrize(
    "n,rate,kept",
    [(10, 0.7, 3), (3, 0.5, 2), (5, 0.0, 5), (1, 0.999, 1), (10, 0.3, 7), (10, 0.29, 8),
     (100, 0.999, 1), (3, 0.99, 1), (512, 0.5, 256),
     (100, 0.57, 43), (100, 0.29, 71),  # rate * n falls just below the integer in floats
     (1, 0.9999999, 1), (10, 0.9999999, 1)],  # would remove every group without the clamp
)
def test_keep_count_rounds_removed_groups_down(n, rate, kept):
    assert keep_count(n, rate) == kept


@pytest.mark.parametrize("rate", [1.01, -0.1, math.nan])
def test_keep_count_rejects_rates_outside_unit_interval(rate):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        keep_count(10, rate)


def test_only_rate_one_removes_every_group():
    """Rate 1 (`REMOVED`) keeps nothing, even a member of a concatenation; just below it one group stays."""
    assert keep_count(10, REMOVED) == 0 and keep_count(10, 0.999) == 1
    w = [torch.randn(4, 3, 3, 3), torch.randn(6, 3, 3, 3)]
    positions = [torch.arange(4), torch.arange(4, 10)]
    assert not any(k.any() for k in mask(w, SparsityType.FILTER, REMOVED, positions=positions))
    assert all(k.any() for k in mask(w, SparsityType.FILTER, 0.99, positions=positions))


@pytest.mark.parametrize("kind", GROUPED, ids=lambda k: k.value)
def test_ties_keep_lower_group_index_deterministically(kind):
    w = torch.ones(128, 128, 1, 1)  # >= 100 groups: where an unstable CPU sort reorders ties
    first = mask([w], kind, 0.5)[0]
    assert sorted(kept_groups(w * first, kind)) == list(range(num_groups(w, kind) // 2))
    assert all(torch.equal(first, mask([w], kind, 0.5)[0]) for _ in range(3))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.93])
def test_irregular_keeps_the_largest_weights_and_the_first_of_equal_ones_at_the_cut(rate):
    w = torch.randint(-4, 5, (32, 16, 3, 3), generator=torch.Generator().manual_seed(0)).float()  # many ties
    keep = mask([w], SparsityType.IRREGULAR, rate)[0].flatten()
    order = torch.argsort(w.flatten() ** 2, descending=True, stable=True)  # the definition: a stable ranking
    assert torch.equal(keep, torch.zeros_like(keep).index_fill_(0, order[:keep_count(w.numel(), rate)], True))


def test_nm_ties_keep_first_weights_of_each_block():
    keep = mask([torch.ones(2, 8)], SparsityType.NM, 0.5)[0]
    assert keep.tolist() == [[True, True, False, False] * 2] * 2


@pytest.mark.parametrize(
    "module,types",
    [
        (nn.Conv2d(4, 8, 3), tuple(SparsityType)),
        (nn.Linear(4, 8), tuple(SparsityType)),
        (nn.Conv2d(8, 8, 3, groups=8), (SparsityType.FILTER,)),
        (nn.Conv2d(8, 16, 3, groups=8), (SparsityType.FILTER,)),
        (nn.Conv2d(8, 8, 3, groups=2),
         (SparsityType.FILTER, SparsityType.SHAPE, SparsityType.IRREGULAR, SparsityType.NM)),
        (nn.BatchNorm2d(8), ()),
    ],
    ids=["conv", "linear", "depthwise", "depthwise-x2", "grouped", "batchnorm"],
)
def test_applicable_types_per_layer(module, types):
    assert applicable_types(module) == types
    for kind in types:
        check_applicable(module, kind)


@pytest.mark.parametrize(
    "module,kind,reason",
    [
        (nn.Conv2d(8, 8, 3, groups=8), SparsityType.CHANNEL, "depthwise"),
        (nn.Conv2d(8, 8, 3, groups=8), SparsityType.NM, "depthwise"),
        (nn.Conv2d(8, 8, 3, groups=2), SparsityType.CHANNEL, "grouped conv"),
        (nn.BatchNorm2d(8), SparsityType.FILTER, "BatchNorm2d is neither"),
    ],
    ids=["depthwise-channel", "depthwise-nm", "grouped-channel", "batchnorm-filter"],
)
def test_check_applicable_names_the_reason(module, kind, reason):
    with pytest.raises(ValueError, match=f"{kind.value} sparsity does not apply.*{reason}"):
        check_applicable(module, kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", list(SparsityType), ids=lambda k: k.value)
def test_project_keeps_dtype_and_leaves_input_untouched(kind, dtype):
    w = nn.Parameter(randn(8, 4, 3, 3, dtype=dtype))
    before = w.detach().clone()
    with torch.no_grad():
        (z,) = project([w], kind, 0.5)
    assert torch.equal(w, before)
    assert z.dtype == dtype and z.data_ptr() != w.data_ptr()
    assert torch.equal(z != 0, mask([before.float()], kind, 0.5)[0])


def test_half_precision_scores_do_not_overflow():
    w = torch.tensor([[300.0, 0.0], [250.0, 250.0]], dtype=torch.float16)  # 300**2 > fp16 max
    assert group_scores(w, SparsityType.FILTER).tolist() == [90000.0, 125000.0]
    assert project([w], SparsityType.FILTER, 0.5)[0][0].tolist() == [0.0, 0.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", list(SparsityType), ids=lambda k: k.value)
def test_masks_on_cuda_equal_masks_on_cpu(kind):
    w = randn(16, 8, 3, 3, dtype=torch.float32)
    assert torch.equal(mask([w.cuda()], kind, 0.5)[0].cpu(), mask([w], kind, 0.5)[0])


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("kind", list(SparsityType), ids=lambda k: k.value)
def test_achieved_rate_equals_requested_removal(kind, rate):
    w = randn(8, 4, 3, 3)  # 36 columns: whole nm blocks
    (z,) = project([w], kind, rate)
    if kind == SparsityType.NM:
        assert achieved_rate(z, kind) == rate
    else:
        n = num_groups(w, kind)
        assert achieved_rate(z, kind) == (n - keep_count(n, rate)) / n


@pytest.mark.parametrize("kind", GROUPED, ids=lambda k: k.value)
def test_group_scores_are_squared_group_norms(kind):
    w = randn(3, 2, 2, 2)
    ids = group_ids(tuple(w.shape), kind).flatten()
    expected = torch.zeros(num_groups(w, kind), dtype=w.dtype).index_add_(0, ids, w.flatten() ** 2)
    assert torch.allclose(group_scores(w, kind), expected)


def test_nm_has_no_groups():
    with pytest.raises(ValueError, match="nm"):
        group_scores(randn(4, 4), SparsityType.NM)
