from __future__ import annotations

import copy
import json
import re
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import torch

from sparsesearch.admm import apply_masks, prune_masks
from sparsesearch.compact import Reference, Slim, Unverifiable, compact, pruned, removable, slimmed, verified_compact
from sparsesearch.graph import couplings, dependencies
from sparsesearch.errors import UserError
from sparsesearch.layers import trace
from sparsesearch.models import TV_PREFIX, create, spec, torchvision_names
from sparsesearch.plan import LayerSparsity, Plan
from sparsesearch.sparsity import REMOVED
from sparsesearch.sparsity import SparsityType as T

from helpers import lively, masked_sgd_steps, restat

RESNET20_GROUPS = [
    ["stem.0", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"],
    ["layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"],
    ["layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2", "layer3.2.conv2"],
]


@pytest.fixture(scope="module")
def resnet20() -> tuple[torch.nn.Module, list, list[list[str]]]:
    torch.manual_seed(0)
    model = create("resnet20")
    return model, trace(model, (3, 32, 32)), couplings(model, (3, 32, 32))


def test_layers_feeding_one_residual_sum_are_coupled(resnet20) -> None:  # noqa: ANN001
    assert resnet20[2] == RESNET20_GROUPS


def test_depthwise_conv_is_coupled_with_its_producer() -> None:
    assert ["features.2.conv.0.0", "features.2.conv.1.0"] in couplings(create("tv:mobilenet_v2"), (3, 32, 32))


def test_plain_chain_has_no_couplings() -> None:
    assert couplings(create("digits-cnn", in_channels=1), (1, 8, 8)) == []


def test_coupled_layers_keep_the_same_filters_under_a_uniform_plan(resnet20) -> None:  # noqa: ANN001
    model, layers, groups = resnet20
    plan = Plan.parse("filter=0.5", layers, groups)
    masks = prune_masks(model, plan, dependencies(model, (3, 32, 32)))
    for group in groups:
        kept = [masks[f"{n}.weight"].flatten(1).any(1) for n in group]
        assert all(torch.equal(kept[0], k) for k in kept) and int(kept[0].sum()) == len(kept[0]) // 2


def test_different_filter_rates_in_a_coupled_group_are_refused(resnet20) -> None:  # noqa: ANN001
    _, layers, groups = resnet20
    plan = Plan({"stem.0": LayerSparsity(T.FILTER, 0.5), "layer1.0.conv2": LayerSparsity(T.FILTER, 0.3)})
    with pytest.raises(UserError, match=r"stem.0, layer1.0.conv2, layer1.1.conv2, layer1.2.conv2 share their output"):
        plan.validate(layers, groups)


def test_other_types_in_a_coupled_group_need_no_agreement(resnet20) -> None:  # noqa: ANN001
    _, layers, groups = resnet20
    Plan({"stem.0": LayerSparsity(T.SHAPE, 0.5), "layer1.0.conv2": LayerSparsity(T.IRREGULAR, 0.3)}).validate(layers, groups)


def test_batchnorms_follow_the_layer_they_normalise(resnet20) -> None:  # noqa: ANN001
    deps = dependencies(resnet20[0], (3, 32, 32))
    assert deps.space("layer1.0.conv1").norms == {"layer1.0.bn1": (list(range(16)), list(range(16)))}
    shortcut = deps.space("layer2.0.shortcut.0")
    assert set(shortcut.norms) == {"layer2.0.bn2", "layer2.0.shortcut.1", "layer2.1.bn2", "layer2.2.bn2"}
    assert all(channels == positions for channels, positions in shortcut.norms.values())


class _ConcatIntoResidual(torch.nn.Module):
    """Two stem convs concatenated, then added to a block's output: Torch-Pruning's groups overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(1, 4, 5, padding=2)
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.a(x), self.b(x)], 1)
        return self.head((self.block(x) + x).mean((2, 3)))


def test_a_concatenation_feeding_a_residual_sum_makes_one_channel_space_with_slices() -> None:
    space = dependencies(_ConcatIntoResidual(), (1, 8, 8)).space("a")
    assert space.layers == {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7], "block.0": list(range(8))}
    assert space.norms == {"block.1": (list(range(8)), list(range(8)))}


def _random_plan(layers: list, groups: list[list[str]], seed: int) -> Plan:
    """Random types and rates per layer; a coupling group draws one spec when it draws filter."""
    import random

    rng = random.Random(seed)

    def draw(types: tuple) -> LayerSparsity:
        kind = rng.choice(types)
        return LayerSparsity(kind, 0.5 if kind == T.NM else rng.choice([0.1, 0.3, 0.5, 0.7, 0.9]))

    by_name = {layer.name: layer for layer in layers}
    specs: dict[str, LayerSparsity] = {}
    for group in groups:
        # in the layers' own order: a set's order follows PYTHONHASHSEED, and the plan with it
        common = tuple(t for t in by_name[group[0]].types if all(t in by_name[n].types for n in group))
        spec = draw(common)
        for n in group:
            specs[n] = spec if spec.type == T.FILTER else draw(tuple(t for t in by_name[n].types if t != T.FILTER))
    for layer in layers:
        if layer.name not in specs and rng.random() < 0.8:
            specs[layer.name] = draw(layer.types)
    return Plan(specs)


_DENSE: dict[tuple, tuple] = {}  # the last dense model _masked built: its plans are tested one after another


@pytest.fixture(scope="module", autouse=True)
def _forget_the_last_dense_model() -> Iterator[None]:
    yield
    _DENSE.clear()  # tv:vgg11_bn alone holds 0.5 GB


def _dense(name: str, shape: tuple[int, int, int]) -> tuple:
    """A lively dense `name` (a copy), its dependencies and layers; built once for all its plans
    (tv:densenet121's dependency graph alone takes seconds)."""
    if (name, shape) not in _DENSE:
        _DENSE.clear()
        torch.manual_seed(0)
        model = lively(create(name, in_channels=shape[0]), shape)  # a ghost channel would show
        _DENSE[name, shape] = model, dependencies(model, shape), trace(model, shape)
    model, deps, layers = _DENSE[name, shape]
    return copy.deepcopy(model), deps, layers


def _masked(name: str, shape: tuple[int, int, int], plan_of) -> tuple:  # noqa: ANN001
    model, deps, layers = _dense(name, shape)
    plan = plan_of(layers, deps.couplings)
    plan.validate(layers, deps.couplings)
    apply_masks(model, prune_masks(model, plan, deps))
    return model, plan, deps


SMALL = {"digits-cnn": (1, 8, 8), "lenet5": (1, 28, 28), "vgg16-bn": (3, 32, 32), "resnet20": (3, 32, 32),
         "resnet56": (3, 32, 32), "tv:resnet18": (3, 32, 32), "tv:mobilenet_v2": (3, 32, 32),
         "timm:resnet10t": (3, 32, 32), "timm:mobilenetv3_small_050": (3, 32, 32)}
# torchvision classifiers no one tuned for: bottlenecks, SE blocks, inception branches, concatenations,
# grouped convs (RegNet), channel shuffles (ShuffleNet), LayerNorm (ConvNeXt)
LARGE = {name: (3, max(32, spec(name).min_size), max(32, spec(name).min_size)) for name in (
    "tv:resnet50", "tv:densenet121", "tv:efficientnet_b0", "tv:regnet_x_400mf", "tv:shufflenet_v2_x1_0",
    "tv:googlenet", "tv:alexnet", "tv:vgg11_bn", "tv:convnext_tiny")}
PLANS = {
    "filter": lambda layers, groups: Plan.uniform(layers, T.FILTER, 0.5),
    "channel": lambda layers, groups: Plan.uniform(layers, T.CHANNEL, 0.5),
    "shape": lambda layers, groups: Plan.uniform(layers, T.SHAPE, 0.7),
    "random0": lambda layers, groups: _random_plan(layers, groups, 0),
    "random1": lambda layers, groups: _random_plan(layers, groups, 1),
}


# A large model's uniform plans run in the slow suite (test_zoo_compacts_with_equal_outputs runs them on
# every torchvision classifier): by default each large model meets the two random plans, whose layers mix
# all five types, and the small models and the generated networks (test_generated.py) every uniform plan.
EQUAL_OUTPUT_CASES = [pytest.param(model, plan, id=f"{model}-{plan}",
                                   marks=[pytest.mark.slow] if model in LARGE and not plan.startswith("random") else [])
                      for model in [*SMALL, *LARGE] for plan in PLANS]


@pytest.mark.parametrize(("model_name", "plan_name"), EQUAL_OUTPUT_CASES)
def test_compacted_output_equals_masked_output(model_name: str, plan_name: str) -> None:
    shape = {**SMALL, **LARGE}[model_name]
    model, plan, deps = _masked(model_name, shape, PLANS[plan_name])
    compacted = compact(model, plan, shape)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    # on the output, or where it is one constant (alexnet-shape cuts every path), on the activations
    # that still vary: never a comparison that cannot fail
    assert Reference(model, x).error(compacted.model) <= 1e-4
    assert set(compacted.impl) == set(plan.layers)
    assert {n for n, i in compacted.impl.items() if i == "dense-fallback"} == set(compacted.left_dense)
    if plan_name == "filter" and not compacted.left_dense:
        params = sum(p.numel() for p in compacted.model.parameters())
        assert params < 0.5 * sum(p.numel() for p in model.parameters())  # really removed, not masked


@pytest.mark.parametrize(("model_name", "plan_name"), [
    *[(model, plan) for model in SMALL for plan in ("filter", "channel", "random0", "random1")],
    *[pytest.param(model, "random1", marks=[] if model in ("tv:resnet50", "tv:googlenet") else [pytest.mark.slow])
      for model in LARGE]])
def test_what_the_slim_model_learns_the_masked_model_computes(model_name: str, plan_name: str) -> None:
    """Retraining runs on the slim copy (the filters and channels compaction removes, removed):
    whatever it learns within its masks, written back, the masked model computes, masks intact."""
    shape = {**SMALL, **LARGE}[model_name]
    model, plan, deps = _masked(model_name, shape, PLANS[plan_name])
    masks = prune_masks(model, plan, deps)
    slim = slimmed(model, plan, shape)
    if slim is None:
        removed = {"filters-removed", "channels-removed"} & set(compact(model, plan, shape).impl.values())
        assert not removed, "a model compaction makes smaller trains slim"
        return
    assert sum(p.numel() for p in slim.model.parameters()) < sum(p.numel() for p in model.parameters())
    kept = slim.masks(masks)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in slim.model.named_parameters():
            p.add_(0.1 * p.abs().mean() * torch.randn_like(p) * kept.get(name, 1))
    slim.write_back(model)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    expected = slim.model.eval()(x)
    assert ((model.eval()(x) - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    params = dict(model.named_parameters())
    assert all(not params[n][~m].any() for n, m in masks.items()), "no pruned weight came back"


@pytest.mark.parametrize(("model_name", "reason"), [
    ("tv:convnext_tiny", r"\(LayerNorm\) normalises across channels"),
    ("tv:regnet_x_400mf", r"is a grouped conv \(groups=\d+\)"),
    ("tv:shufflenet_v2_x1_0", r"Torch-Pruning cannot build the dependency graph \(ZeroDivisionError"),
])
def test_filters_that_cannot_be_removed_exactly_stay_with_the_reason(model_name: str, reason: str) -> None:
    shape = LARGE[model_name]
    model, plan, deps = _masked(model_name, shape, PLANS["filter"])
    compacted = compact(model, plan, shape)
    assert any(re.search(reason, why) for why in compacted.left_dense.values())
    assert all(compacted.impl[n] == "dense-fallback" for n in compacted.left_dense)


def test_channels_no_other_layer_reads_are_removed_at_their_producer() -> None:
    shape = (3, 32, 32)
    model, plan, deps = _masked("resnet20", shape, PLANS["channel"])
    compacted = compact(model, plan, shape)
    assert compacted.impl["layer1.0.conv2"] == "channels-removed"  # reads only conv1: conv1 loses filters
    assert compacted.model.get_submodule("layer1.0.conv1").weight.shape[0] == 8
    assert compacted.impl["layer1.1.conv1"] == "channels-gathered"  # the residual stream feeds other layers too
    assert compacted.impl["stem.0"] == "channels-gathered"  # the image's channels stay


def test_macs_count_producer_filters_freed_by_channel_pruning() -> None:
    shape = (3, 32, 32)
    model, plan, deps = _masked("vgg16-bn", shape, PLANS["channel"])
    compacted = compact(model, plan, shape)
    dense = sum(layer.macs for layer in trace(model, shape))
    assert 0.24 < sum(compacted.macs.values()) / dense < 0.27  # half the inputs of half the filters


def test_counts_describe_what_runs_irregular_values_and_nm_fallbacks() -> None:
    from sparsesearch.kernels import stored_weights

    shape = (1, 8, 8)
    model, plan, deps = _masked("digits-cnn", shape, lambda layers, groups: Plan.uniform(layers, T.IRREGULAR, 0.8))
    compacted = compact(model, plan, shape)
    weights = [model.get_submodule(n).weight for n in plan.layers]
    dense = sum(p.numel() for p in model.parameters())
    assert stored_weights(compacted.model) == dense - sum(w.numel() for w in weights) + sum(int(w.ne(0).sum()) for w in weights)
    model, plan, deps = _masked("digits-cnn", shape, lambda layers, groups: Plan.uniform(layers, T.NM, 0.5))
    compacted = compact(model, plan, shape)  # no 2:4 kernel on a CPU: every layer runs dense, and says why
    assert set(compacted.left_dense) == set(plan.layers) and "no 2:4 kernel on cpu" in compacted.left_dense["3"]
    assert compacted.macs == {layer.name: layer.macs for layer in trace(model, shape)}


class _ZeroHead(torch.nn.Module):
    """Like a fresh ViT: a zero-initialised head, so every output is the same."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
        self.head = torch.nn.Linear(8, 3)
        torch.nn.init.zeros_(self.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def test_a_constant_output_is_not_taken_as_proof_of_equality(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsesearch import compact as compact_module

    torch.manual_seed(0)
    model, shape = _ZeroHead().eval(), (1, 8, 8)
    plan = Plan.uniform(trace(model, shape), T.SHAPE, 0.5)
    apply_masks(model, prune_masks(model, plan))
    compact_module.verified_compact(model, plan, shape, "zero-head")  # equal: checked on the body's activations
    real = compact_module.compact

    def wrong(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - a compactor with a bug the output cannot show
        result = real(*args, **kwargs)
        with torch.no_grad():
            result.model.body[0].bias.add_(0.1)
        return result

    monkeypatch.setattr(compact_module, "compact", wrong)
    with pytest.raises(UserError, match=r"compacted zero-head differs from the pruned model"):
        compact_module.verified_compact(model, plan, shape, "zero-head")
    monkeypatch.setattr(compact_module, "compact", real)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with pytest.raises(UserError, match=r"cannot verify the compacted zero-head: its output and every activation"):
        compact_module.verified_compact(model, plan, shape, "zero-head")


class _HeadSplit(torch.nn.Module):
    """Self-attention on a channels-last map: the head split is a reshape Torch-Pruning 1.6 (on
    torch 2.x) maps as a flatten, as it does in swin and maxvit."""

    def __init__(self, c: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, torch.nn.Linear(c, 3 * c), torch.nn.Linear(c, c)
        self.stem, self.head = torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)
        n, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(n, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(n, h, w, c)
        return self.head((x + self.proj(attended)).mean((1, 2)))


def test_a_layer_whose_channels_reach_a_mis_mapped_reshape_stays_dense_with_the_reason() -> None:
    torch.manual_seed(0)
    model, shape = _HeadSplit().eval(), (1, 8, 8)
    deps = dependencies(model, shape)
    assert set(deps.fixed) == {"qkv"} and "grow without bound" in deps.fixed["qkv"]
    plan = Plan.uniform(trace(model, shape), T.FILTER, 0.5)
    plan.validate(trace(model, shape), deps.couplings)
    apply_masks(model, prune_masks(model, plan, deps))
    compacted = compact(model, plan, shape)  # Torch-Pruning cannot cut the head split either: stem, proj stay
    assert compacted.left_dense["qkv"] == deps.fixed["qkv"] and set(compacted.left_dense) == {"qkv", "stem", "proj"}
    assert Reference(model, torch.randn(4, *shape)).error(compacted.model) <= 1e-4


class _PartialResidual(torch.nn.Module):
    """RexNet's block: the shortcut is added to the first channels of a wider output only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.expand = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 12, 3, padding=1)
        self.head = torch.nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x).relu()
        y = self.expand(s)
        return self.head(torch.cat([y[:, :8] + s, y[:, 8:]], dim=1)).mean((2, 3))


def test_a_partial_channel_residual_is_left_dense_in_a_second_not_traversed_for_minutes() -> None:
    torch.manual_seed(0)
    model, shape = _PartialResidual().eval(), (1, 8, 8)
    start = time.perf_counter()
    deps = dependencies(model, shape)
    assert {"stem", "expand"} <= set(deps.fixed) and "split by channel slices" in deps.fixed["expand"]
    plan = Plan.uniform(trace(model, shape), T.FILTER, 0.5)
    apply_masks(model, prune_masks(model, plan, deps))
    compacted = verified_compact(model, plan, shape, "partial-residual")
    assert time.perf_counter() - start < 60  # before the guard: get_pruning_group did not return
    assert "split by channel slices" in compacted.left_dense["expand"]


class _PositionBias(torch.nn.Module):
    """Swin V2's continuous position bias: an MLP on a buffer of coordinates whose first Linear is
    followed by an in-place ReLU, so Torch-Pruning's trace never maps that Linear to a node."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bias_mlp = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 8))
        self.head = torch.nn.Linear(8, 3)
        self.register_buffer("coords", torch.randn(1, 3, 3, 2))  # a table, as swin's relative_coords_table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).relu() + self.bias_mlp(self.coords).mean((0, 1, 2))[None, :, None, None]
        return self.head(self.body(y).relu().mean((2, 3)))


def test_a_layer_the_trace_never_reaches_does_not_send_channel_compaction_one_cut_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Swin V2's channel plans took minutes: the position-bias MLP raised inside the all-at-once
    pass, and every cut was then redone and checked alone (41 checks, 14 graph builds)."""
    from sparsesearch import compact as compact_module

    torch.manual_seed(0)
    model, shape = _PositionBias().eval(), (1, 8, 8)
    plan = Plan.uniform(trace(model, shape), T.CHANNEL, 0.5)
    apply_masks(model, prune_masks(model, plan, dependencies(model, shape)))
    builds = []
    real = compact_module.build_graph
    monkeypatch.setattr(compact_module, "build_graph", lambda *a: builds.append(1) or real(*a))
    compacted = verified_compact(model, plan, shape, "position-bias")
    assert len(builds) == 1 and compacted.impl["body"] == "channels-removed"


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tv:swin_t", "tv:maxvit_t"])
def test_attention_reshapes_leave_layers_dense_instead_of_exhausting_memory(model_name: str) -> None:
    """Before the guard: swin_t grew past 5 GB cutting features.6.reduction, maxvit_t's dependencies
    past 10 GB; with it, about 25 s and under 2 GB each on the 2-core CI machine."""
    shape = (3, spec(model_name).min_size, spec(model_name).min_size)
    model, plan, deps = _masked(model_name, shape, PLANS["filter"])
    assert any("grow without bound" in why for why in deps.fixed.values())
    compacted = compact(model, plan, shape)
    assert "filters-removed" in compacted.impl.values()
    assert any("grow without bound" in why for why in compacted.left_dense.values())


def test_a_compaction_that_would_change_outputs_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsesearch import compact as compact_module

    shape = (1, 8, 8)
    model, plan, deps = _masked("digits-cnn", shape, PLANS["filter"])
    real = compact_module.compact

    def wrong(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - a compactor with a bug
        result = real(*args, **kwargs)
        with torch.no_grad():
            next(result.model.parameters()).add_(0.1)
        return result

    monkeypatch.setattr(compact_module, "compact", wrong)
    with pytest.raises(UserError, match=r"compacted digits-cnn differs from the pruned model \(relative error"):
        compact_module.verified_compact(model, plan, shape, "digits-cnn")


# timm families whose ops differ: bottlenecks and grouped convs (resnext), SE and depthwise
# (efficientnet, mobilenetv3), ghost modules' concatenations, Y-blocks (regnet), LayerNorm
# (convnext), deep aggregation and dual paths (dla, dpn), cross-stage partials, multi-resolution
# fusion (hrnet), attention (deit), partial-channel residuals (rexnet).
TIMM = ["timm:resnet18", "timm:resnext26ts", "timm:efficientnet_b0", "timm:mobilenetv3_large_100",
        "timm:regnety_002", "timm:convnext_atto", "timm:ghostnet_100", "timm:dla34",
        "timm:dpn48b", "timm:cspresnet50", "timm:hrnet_w18_small", "timm:deit_tiny_patch16_224",
        "timm:rexnet_100"]
# every torchvision classifier; bench/zoo.py runs this test pinned to one core and reports the times
ZOO = [TV_PREFIX + n for n in torchvision_names()] + TIMM


@pytest.mark.slow
@pytest.mark.parametrize("plan_name", ["filter", "channel", "shape"])
@pytest.mark.parametrize("model_name", ZOO)
def test_zoo_compacts_with_equal_outputs(model_name: str, plan_name: str, record_property) -> None:  # noqa: ANN001
    side = max(32, spec(model_name).min_size)
    shape = (3, side, side)
    model, plan, _ = _masked(model_name, shape, PLANS[plan_name])
    start = time.perf_counter()
    compacted = verified_compact(model, plan, shape, model_name)  # the equality check users get
    record_property("compact_s", round(time.perf_counter() - start, 1))
    record_property("side", side)
    record_property("impl", json.dumps(Counter(compacted.impl.values())))
    record_property("left_dense", json.dumps(compacted.left_dense))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    assert Reference(model, x).error(compacted.model) <= 1e-4
    assert {n for n, i in compacted.impl.items() if i == "dense-fallback"} == set(compacted.left_dense)


def test_measure_times_both_models_in_the_layout_asked_and_hands_them_back_contiguous(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`compact --channels-last`: dense and compacted both run channels-last (weights and input), the
    speedup is of one over the other in it, and the models come back in the default layout."""
    from sparsesearch import compact as compact_module
    from sparsesearch.profiler import timing

    torch.manual_seed(0)
    model, shape = create("resnet20").eval(), (3, 32, 32)
    plan = Plan.parse("shape=0.5", trace(model, shape), couplings(model, shape))
    masked = copy.deepcopy(model)
    apply_masks(masked, prune_masks(masked, plan, dependencies(masked, shape)))
    seen, compare = [], timing.compare

    def spy(models: dict, x: torch.Tensor, **kw: object) -> dict:
        convs = [m.weight for model in models.values() for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        seen.append((x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                     all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)))
        return compare(models, x, **kw)
    monkeypatch.setattr(timing, "compare", spy)
    for channels_last in (False, True):
        measured = compact_module.measure(copy.deepcopy(masked), plan, shape, "resnet20", torch.device("cpu"), 2,
                                          channels_last)
        assert measured.setting["layout"] == ("channels-last" if channels_last else "contiguous")
        assert measured.speedup > 0
        assert all(p.is_contiguous() for p in measured.compacted.model.parameters())
    assert [s[0] for s in seen] == [False, True] and seen[1][1]


@pytest.mark.parametrize(("way", "faulty"), [("eager", "_pixel_product"), ("fused", "_compiled")])
def test_compaction_is_verified_on_a_channels_last_input_too(way: str, faulty: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Shape-wise layers take other paths for a channels-last input (eager, and the compiled kernel): a
    fault there is refused at compaction, not found by a deployment that runs the model channels-last."""
    from sparsesearch import kernels
    from sparsesearch.kernels import ShapeConv2d

    monkeypatch.setattr(kernels, "_fastest", lambda ways, x: way)
    torch.manual_seed(0)
    shape = (3, 32, 32)
    model = lively(create("resnet20"), shape)
    plan = Plan.parse("shape=0.5", trace(model, shape), couplings(model, shape))
    masked = copy.deepcopy(model)
    apply_masks(masked, prune_masks(masked, plan, dependencies(masked, shape)))
    verified_compact(masked, plan, shape, "resnet20")
    right = getattr(ShapeConv2d, faulty)  # `_compiled` returns the prepared call: its output is zeroed
    zeroed = (lambda out: out * 0) if faulty != "_compiled" else (lambda call: lambda x: call(x) * 0)
    monkeypatch.setattr(ShapeConv2d, faulty, lambda *args, **kwargs: zeroed(right(*args, **kwargs)))
    with pytest.raises(UserError, match="compacted resnet20 differs from the pruned model"):
        verified_compact(masked, plan, shape, "resnet20")


REMOVING = {  # slots of their own inside residual blocks and inception or dense branches
    "resnet20": ["layer1.1.conv1", "layer2.0.conv1", "layer3.2.conv1"],
    "tv:resnet18": ["layer1.1.conv1", "layer3.0.conv1"],
    "tv:resnet50": ["layer2.1.conv1", "layer3.0.conv2"],  # a bottleneck's first and middle convs
    "tv:mobilenet_v2": ["features.3.conv.0.0", "features.3.conv.1.0"],  # expansion + depthwise: one group
    "tv:googlenet": ["inception3a.branch2.0.conv", "inception4b.branch1.conv"],  # into a concatenation
    "tv:densenet121": ["features.denseblock1.denselayer2.conv1", "features.denseblock3.denselayer5.conv2"],
}


@pytest.mark.parametrize("model_name", REMOVING)
def test_a_removed_residual_branch_becomes_the_constant_it_leaves(model_name: str) -> None:
    """Rate 1 empties a layer; where a residual addition (or a concatenation) joins its branch to a
    live path, the branch runs as the constant it leaves, equal to the masked model on both layouts,
    its layers gone (no MACs, no weights); in-place additions (torchvision's) included."""
    from sparsesearch.compact import BRANCH_REMOVED, Constant

    shape = {**SMALL, **LARGE}[model_name]
    model, plan, deps = _masked(model_name, shape, lambda layers, groups: Plan(
        {n: LayerSparsity(T.FILTER, REMOVED) for n in REMOVING[model_name]}))
    result = verified_compact(model, plan, shape, model_name)  # equal outputs, NCHW and channels-last
    removed = [n for n, i in result.impl.items() if i == BRANCH_REMOVED]
    assert removed == REMOVING[model_name] and not result.left_dense
    assert all(result.macs[n] == 0 for n in removed)
    assert not any(isinstance(result.model.get_submodule(n), torch.nn.Conv2d) for n in removed)
    assert sum(isinstance(m, Constant) for m in result.model.modules()) >= 1
    params = sum(p.numel() for p in result.model.parameters())
    assert params < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_name", [pytest.param(m, marks=[pytest.mark.slow] if m in LARGE else [])
                                        for m in REMOVING])
def test_the_slim_model_skips_removed_branches_and_trains_as_the_masked_one(model_name: str) -> None:
    """A removed branch's layers compute zeros in the masked model, so the slim model a plan retrains
    on replaces them (`Zeros`: no MACs, no weights); a few training steps on it, written back, give
    what the same steps give the masked model: BatchNorm batch statistics, running statistics and
    the shift the branch leaves included."""
    from sparsesearch.compact import Zeros

    shape = {**SMALL, **LARGE}[model_name]
    model, plan, deps = _masked(model_name, shape, lambda layers, groups: Plan(
        {n: LayerSparsity(T.FILTER, REMOVED) for n in REMOVING[model_name]}))
    masks = prune_masks(model, plan, deps)
    slim = slimmed(model, plan, shape)
    assert slim is not None
    zeros = {n for n, m in slim.model.named_modules() if isinstance(m, Zeros)}
    assert set(REMOVING[model_name]) <= zeros
    assert sum(p.numel() for p in slim.model.parameters()) < sum(p.numel() for p in model.parameters())
    first = slim.model.get_submodule(REMOVING[model_name][0])
    plane = torch.randn(2, 5, 8, 8).contiguous(memory_format=torch.channels_last)
    assert first(plane).is_contiguous(memory_format=torch.channels_last), "a channels-last run stays channels-last"
    x, expected = _stepped_alike(model, slim, masks, shape)
    assert ((slim.model.eval()(x) - expected).abs().max() / expected.abs().max()).item() <= 1e-4


def _stepped_alike(model: torch.nn.Module, slim: Slim, masks: dict, shape: tuple) -> tuple:
    """The same masked SGD steps on `slim` (written back into `model`) and on a twin of `model`, which
    `model` must then compute: the input and the twin's output."""
    twin = copy.deepcopy(model)
    masked_sgd_steps(slim.model, slim.masks(masks), shape)
    masked_sgd_steps(twin, masks, shape)
    slim.write_back(model)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    expected = twin.eval()(x)
    assert ((model.eval()(x) - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    params = dict(model.named_parameters())
    assert all(not params[n][~m].any() for n, m in masks.items()), "no pruned weight came back"
    return x, expected


def test_rate_one_on_a_layer_no_residual_path_bypasses_is_refused_with_the_reason() -> None:
    """In a plain chain a layer that changes the width, emptied, leaves the output the same for every
    input: the error says so, instead of a compaction checked only on the layers before it."""
    shape = SMALL["vgg16-bn"]
    model, plan, deps = _masked("vgg16-bn", shape, lambda layers, groups: Plan(
        {"0.7": LayerSparsity(T.FILTER, REMOVED)}))
    with pytest.raises(UserError, match=r"empties 0\.7, and no residual path bypasses it"):
        verified_compact(model, plan, shape, "vgg16-bn")


def test_layers_collapse_only_where_they_keep_the_shape_and_no_shortcut_bypasses_them() -> None:
    """vgg16-bn's 3x3 convs that keep their width collapse (not those that widen); no conv of a
    ResNet does (its blocks' first convs are bypassed: removed, the block goes; the others feed an
    addition); square Linears in a plain head do, the classifier (which changes the width) not."""
    vgg = create("vgg16-bn", in_channels=1)
    assert dependencies(vgg, (1, 32, 32)).collapsible == {
        "0.3", "0.10", "0.17", "0.20", "0.27", "0.30", "0.34", "0.37", "0.40"}
    assert not dependencies(create("resnet20"), (3, 32, 32)).collapsible
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 6), torch.nn.ReLU(),
                              torch.nn.Linear(6, 3))
    assert dependencies(mlp, (6,)).collapsible == {"0", "2"}


COLLAPSING = {"0.0": 0.25, "0.3": REMOVED, "0.7": 0.5, "0.10": REMOVED, "0.14": 0.3, "0.17": REMOVED,
              "0.20": REMOVED, "0.34": REMOVED}  # 0.17 and 0.20 in a row: the second sees the first's channels


def _collapsed_vgg() -> tuple:
    """vgg16-bn masked by COLLAPSING, its BatchNorm statistics measured again: collapsed layers move
    the activations so far that under the dense statistics every output is the same (then only
    activations, not the output, could be compared)."""
    shape = SMALL["vgg16-bn"]
    model, plan, deps = _masked("vgg16-bn", shape, lambda layers, groups: Plan(
        {n: LayerSparsity(T.FILTER, r) for n, r in COLLAPSING.items()}))
    return restat(model, shape), plan, deps


def test_a_removed_layer_no_shortcut_bypasses_collapses_to_one_multiply_add_per_channel() -> None:
    """Rate 1 on a layer that keeps its input's shape in a plain chain leaves its identity path: each
    filter's own channel at the centre tap, the BatchNorm after it folded in, one `ChannelAffine`
    where a conv and a BatchNorm ran, equal to the masked model on both layouts. Its channels are the
    ones the filters before it kept (a collapsed layer after another too), so it stays square."""
    from sparsesearch.compact import COLLAPSED, ChannelAffine

    shape = SMALL["vgg16-bn"]
    model, plan, deps = _collapsed_vgg()
    weight = model.get_submodule("0.10").weight
    assert int(weight.ne(0).sum()) == 64 and weight.reshape(128, -1).ne(0).any(1).sum() == 64  # 0.7 kept 64
    assert Reference(model, torch.randn(3, *shape)).expected.keys() == {""}, "the output itself is compared"
    result = verified_compact(model, plan, shape, "vgg16-bn")  # equal outputs, NCHW and channels-last
    collapsed = sorted(n for n, i in result.impl.items() if i == COLLAPSED)
    assert collapsed == ["0.10", "0.17", "0.20", "0.3", "0.34"] and not result.left_dense
    kept = {"0.3": 48, "0.10": 64, "0.17": 180, "0.20": 180, "0.34": 512}
    for name in collapsed:
        module = result.model.get_submodule(name)
        assert isinstance(module, ChannelAffine) and module.scale.shape == (kept[name], 1, 1)
        after = result.model.get_submodule(f"0.{int(name.split('.')[1]) + 1}")
        assert isinstance(after, torch.nn.Identity), "its BatchNorm is folded in"
    layers = {layer.name: layer for layer in trace(model, shape)}
    assert result.macs["0.17"] == layers["0.17"].positions * 180
    gone = sum(model.get_submodule(n).weight.numel() for n in collapsed)  # their 3x3 kernels, whole
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters()) - gone


@pytest.mark.parametrize("model_name", ["tv:alexnet", pytest.param("tv:vgg11_bn", marks=pytest.mark.slow)])
def test_torchvision_plain_nets_collapse_their_square_layers_exactly(model_name: str) -> None:
    """A user's plain network, as torchvision builds it: its square convs and its classifier's square
    Linear collapse (a 2-D `ChannelAffine` behind a dropout), the rest filter-pruned, exact."""
    from sparsesearch.admm import open_identity_paths

    shape = LARGE[model_name]
    model, deps, layers = _dense(model_name, shape)
    assert {n.split(".")[0] for n in deps.collapsible} == {"features", "classifier"}
    plan = Plan({layer.name: LayerSparsity(T.FILTER, REMOVED if layer.name in deps.collapsible else 0.5)
                 for layer in layers if T.FILTER in layer.types})
    masks = prune_masks(model, plan, deps)
    apply_masks(model, masks)
    open_identity_paths(model, plan, deps, masks)
    result = verified_compact(model, plan, shape, model_name)
    assert {n for n, i in result.impl.items() if i == "collapsed"} == deps.collapsible and not result.left_dense


def test_a_collapsed_layer_keeps_the_channels_a_random_probe_finds_dead() -> None:
    """Which input channels a collapsed layer keeps is read off the masks, not off activations on a
    random probe: a kept channel whose ReLU is zero on the probe (a BatchNorm shift far below zero, as
    training leaves some) stays, and the layer stays square and exact."""
    shape = SMALL["vgg16-bn"]
    model, deps, _ = _dense("vgg16-bn", shape)
    with torch.no_grad():
        model.get_submodule("0.8").bias[:8] = -1e3  # channels 0-7 after 0.7: dead on any input here
    plan = Plan({"0.7": LayerSparsity(T.FILTER, 0.0), "0.10": LayerSparsity(T.FILTER, REMOVED)})
    masks = prune_masks(model, plan, deps)
    assert masks["0.10.weight"].reshape(128, -1).any(1).all()
    apply_masks(model, masks)
    result = verified_compact(model, plan, shape, "vgg16-bn")
    assert result.impl["0.10"] == "collapsed" and result.model.get_submodule("0.10").scale.shape[0] == 128


def test_the_slim_model_of_a_plan_that_collapses_layers_trains_as_the_masked_one() -> None:
    """Retraining runs slim with collapsed layers too: the masked model's identity-path weights, as
    trained on the slim copy and written back, compute what the same steps give the masked model."""
    shape = SMALL["vgg16-bn"]
    model, plan, deps = _collapsed_vgg()
    masks = prune_masks(model, plan, deps)
    slim = slimmed(model, plan, shape)
    assert slim is not None
    _stepped_alike(model, slim, masks, shape)
    assert verified_compact(model, plan, shape, "vgg16-bn").impl["0.17"] == "collapsed"


def test_removable_branches_are_found_among_layers_that_cannot_be_lost() -> None:
    """`compact.removable` (what the search offers to remove, what `profile validate` draws): all of a
    net's one-layer groups removed at once leave a constant when one of them carries the only path,
    and the groups that can still go are found around it; a block right on the network's input too
    (its addition reads a tensor the dependency graph has no node for)."""
    from sparsesearch.models import BasicBlock
    from sparsesearch.profiler.validate import filter_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                BasicBlock(8, 8, 1), BasicBlock(8, 8, 1), torch.nn.Conv2d(8, 16, 1),
                                torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    shape = (3, 8, 8)
    deps, layers = dependencies(model, shape), trace(model, shape)
    groups = filter_groups(layers, deps.couplings)
    assert ("5",) in groups  # the head conv: every path runs through it, and it widens (no collapse)
    assert removable(model, shape, deps, groups) == [("3.conv1",), ("4.conv1",)]
    on_input = torch.nn.Sequential(*list(model)[3:]).eval()  # the first block adds the network's input itself
    deps, layers = dependencies(on_input, (8, 8, 8)), trace(on_input, (8, 8, 8))
    found = removable(on_input, (8, 8, 8), deps, filter_groups(layers, deps.couplings))
    assert found == [("0.conv2", "1.conv2"), ("0.conv1",), ("1.conv1",)]  # both blocks' ends only add to the input


class _TwoPaths(torch.nn.Module):
    """A stem, then the sum of two branches with no identity path: each branch can go, not both."""

    def __init__(self) -> None:
        super().__init__()

        def branch() -> torch.nn.Sequential:
            return torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                                       torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                       torch.nn.BatchNorm2d(8))

        self.stem, self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), branch(), branch()
        self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                        torch.nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(self.a(x) + self.b(x))


def test_the_removable_branches_a_search_offers_can_all_go_at_once() -> None:
    """Two branches that are each removable but are all the paths there: `removable` offers one, so
    no plan the search draws removes both (it trained masked to a constant and export refused it)."""
    from sparsesearch.profiler.validate import filter_groups

    torch.manual_seed(0)
    model, shape = _TwoPaths().eval(), (3, 8, 8)
    deps, layers = dependencies(model, shape), trace(model, shape)
    groups = filter_groups(layers, deps.couplings)
    for one in ("a.0", "b.0"):
        pruned(model, Plan({one: LayerSparsity(T.FILTER, REMOVED)}), shape, deps)  # each alone can go
    with pytest.raises((UserError, Unverifiable)):
        pruned(model, Plan({"a.0": LayerSparsity(T.FILTER, REMOVED), "b.0": LayerSparsity(T.FILTER, REMOVED)}),
               shape, deps)
    found = removable(model, shape, deps, groups)
    assert found == [("a.0",)]
    pruned(model, Plan({n: LayerSparsity(T.FILTER, REMOVED) for g in found for n in g}), shape, deps)
