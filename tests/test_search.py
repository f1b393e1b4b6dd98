"""The Optuna study: budgets, the search space, rejection and pruning, and a tiny study end to end
on digits (a coarse latency profile, a fraction of an epoch per trial)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import FixedTrial, TrialState
from typer.testing import CliRunner
from helpers import layout_verdict, no_channel_steps

from sparsesearch import finalize as finalizing, models, report, search
from sparsesearch.admm import RESUME
from sparsesearch.cli import app
from sparsesearch import storage as stores
from sparsesearch.errors import UserError
from sparsesearch.graph import dependencies
from sparsesearch.layers import trace
from sparsesearch.plan import LayerSparsity, Plan
from sparsesearch.profiler.measure import Target, profile_model
from sparsesearch.space import MAX_LAYER_SLOTS, LadderPruner, Space, rejection, snap
from sparsesearch.sparsity import REMOVED, SparsityType
from sparsesearch.train import DenseResult, prepare

FAST_TIMING = {"rounds": 3, "warmup_s": 0.005, "min_round_s": 0.002, "max_rounds": 3}
TINY = {"types": ("filter", "shape"), "admm_epochs": 0.25, "retrain_epochs": 0.5, "max_acc_drop": 20.0}


@pytest.mark.parametrize("text,expected", [("20", search.Budget(trials=20)), ("0", search.Budget(trials=0)),
                                           ("30m", search.Budget(seconds=1800)), ("2h", search.Budget(seconds=7200)),
                                           ("1h30m", search.Budget(seconds=5400)), ("90s", search.Budget(seconds=90))])
def test_budget_is_a_trial_count_or_a_duration(text: str, expected: search.Budget) -> None:
    assert search.parse_budget(text) == expected


@pytest.mark.parametrize(("data", "epochs", "full", "share", "expected"), [
    (0.1, "0+4", "0+6", 0.15, (0.25, 0.0, 4.0)),  # resnet56's study: a quarter of the split reaches 15%
    (0.5, "0+4", "0+6", 0.15, (0.5, 0.0, 4.0)),  # already there (33%): nothing changes
    (0.5, "0+1", "", 0.15, (1.0, 0.0, 2.5)),  # the whole split is not enough: epochs too (full 0+15)
])
def test_faithful_config_raises_the_data_share_then_the_epochs(data: float, epochs: str, full: str, share: float,
                                                               expected: tuple[float, float, float]) -> None:
    """What `optimize` advises where trials train too little of a full run (of the study's own
    length, `--full-epochs`) to rank plans as full runs do."""
    admm, retrain = search.parse_epochs(epochs)
    config = search.SearchConfig(model="resnet56", dataset="fashion-mnist", trial_data=data, admm_epochs=admm,
                                 retrain_epochs=retrain, full_epochs=full)
    enough = search.faithful_config(config, share)
    assert (enough.trial_data, enough.admm_epochs, enough.retrain_epochs) == expected
    assert search.trial_share(enough) >= min(share, search.trial_share(config))
    assert search.trial_share(config) == pytest.approx(data * (admm + retrain) / sum(search.full_epochs(config)))


def test_feasibility_confidence_is_a_half_at_the_limit_and_grows_inside_it() -> None:
    assert search.confidence_within(1.0, 0.5, 1.0) == pytest.approx(0.5)
    assert search.confidence_within(0.5, 0.5, 1.0) == pytest.approx(0.8413, abs=1e-4)  # one standard error inside
    assert search.confidence_within(1.5, 0.5, 1.0) == pytest.approx(0.1587, abs=1e-4)
    assert search.confidence_within(2.0, 0.0, 1.0) == 0.0


@pytest.mark.parametrize("text", ["", "ten", "-3", "30x", "m"])
def test_budget_refuses_what_is_neither(text: str) -> None:
    with pytest.raises(UserError, match="--budget"):
        search.parse_budget(text)


def test_trial_epochs_are_admm_plus_retrain() -> None:
    assert search.parse_epochs("1+3") == (1.0, 3.0)
    assert search.parse_epochs("2") == (2.0, 1.0)
    with pytest.raises(UserError, match="ADMM\\+RETRAIN"):
        search.parse_epochs("a+b")


def test_a_full_run_trains_in_the_recipe_of_the_studys_trials_unless_told() -> None:
    """Trials that prune at once (0+N) rank plans by how the pruned network retrains: their full run
    retrains it too, as long as ADMM's would run in all."""
    assert search.full_epochs(search.SearchConfig(admm_epochs=1, retrain_epochs=3)) == search.FULL_EPOCHS
    assert search.full_epochs(search.SearchConfig(admm_epochs=0, retrain_epochs=4)) == (0.0, sum(search.FULL_EPOCHS))
    assert search.full_epochs(search.SearchConfig(admm_epochs=0, retrain_epochs=4), "4+2") == (4.0, 2.0)
    own = search.SearchConfig(full_epochs="0+6")  # the study's --full-epochs: its promoted runs, finalize's, export's
    assert search.full_epochs(own) == (0.0, 6.0) and search.full_epochs(own, "4+2") == (4.0, 2.0)
    with pytest.raises(UserError, match="--epochs"):
        search.full_epochs(search.SearchConfig(), "x")


def test_admm_of_a_short_trial_has_enough_updates_for_rho_to_reach_its_end() -> None:
    config = search.SearchConfig(admm_epochs=0.5).admm()
    assert len(config.iterations()) >= search.ADMM_ITERATIONS
    assert config.rho(len(config.iterations()) - 1) == pytest.approx(search.RHO_END)


def _space(name: str, shape: tuple[int, ...], max_slots: int = MAX_LAYER_SLOTS,
           steps: dict[str, int] | None = None) -> tuple[Space, list]:
    torch.manual_seed(0)
    model = models.create(name, in_channels=shape[0]).eval()
    layers = trace(model, shape)
    couplings = dependencies(model, shape).couplings
    return Space(layers, couplings, tuple(t.value for t in SparsityType),
                 {layer.name: float(i + 1) for i, layer in enumerate(layers)}, max_slots, steps), (layers, couplings)


def test_small_model_gets_a_type_and_rate_per_layer() -> None:
    space, (layers, couplings) = _space("digits-cnn", (1, 8, 8))
    assert space.per_layer and len(space.slots) == len(layers)
    params = {f"type:{s.name}": "shape" for s in space.slots} | {f"rate:{s.name}": 0.4 for s in space.slots}
    plan = space.suggest(FixedTrial(params))
    assert set(plan.layers) == {layer.name for layer in layers}
    plan.validate(layers, couplings)


def test_many_layer_model_gets_stage_parameters_and_still_a_full_valid_per_layer_plan() -> None:
    space, (layers, couplings) = _space("resnet20", (3, 32, 32))
    assert not space.per_layer and len(space.stages) <= 5
    params = space.uniform_params(SparsityType.FILTER, 0.5) | {"alloc": 1.0}
    plan = space.suggest(FixedTrial(params))
    plan.validate(layers, couplings)  # coupled groups share one rate
    rates = {spec.rate for spec in plan.layers.values()}
    assert len(rates) > 1, "alloc=1 spreads the stage rate by predicted latency"
    assert len(plan.layers) > 15


def test_uniform_params_draw_the_uniform_plan() -> None:
    for name, shape, max_slots in [("digits-cnn", (1, 8, 8), 12), ("resnet20", (3, 32, 32), 12)]:
        space, (layers, _) = _space(name, shape, max_slots)
        plan = space.suggest(FixedTrial(space.uniform_params(SparsityType.FILTER, 0.5)))
        assert plan == Plan.uniform(layers, SparsityType.FILTER, 0.5), name


def test_kept_channels_rise_to_the_devices_latency_step() -> None:
    """A count inside a SIMD block costs what the block costs, or more: plans keep whole blocks, in
    layers at least MIN_BLOCKS steps wide; narrower ones keep what the rate leaves (on resnet56 one
    step left them unpruned, and slower)."""
    from sparsesearch.sparsity import MIN_BLOCKS, keep_count

    space, (layers, couplings) = _space("resnet20", (3, 32, 32), steps={"out": 16, "in": 8})
    plain, _ = _space("resnet20", (3, 32, 32))
    widths = {layer.name: layer.weight_shape for layer in layers}
    aligned = space.suggest(FixedTrial(space.uniform_params(SparsityType.FILTER, 0.3)))
    unaligned = plain.suggest(FixedTrial(plain.uniform_params(SparsityType.FILTER, 0.3)))
    aligned.validate(layers, couplings)
    assert aligned.layers.keys() == unaligned.layers.keys()
    for name, spec in aligned.layers.items():
        n, kept, rate_leaves = widths[name][0], keep_count(widths[name][0], spec.rate), keep_count(
            widths[name][0], unaligned.layers[name].rate)
        if n >= MIN_BLOCKS * 16:
            assert kept % 16 == 0 and rate_leaves <= kept < rate_leaves + 16, (name, n, kept)
        else:
            assert kept == rate_leaves, (name, n, kept)
    assert {widths[n][0] for n in aligned.layers} == {16, 32, 64}
    assert {keep_count(widths[n][0], s.rate) for n, s in aligned.layers.items() if widths[n][0] == 64} == {48}
    channel = space.suggest(FixedTrial(space.uniform_params(SparsityType.CHANNEL, 0.5)))
    wide = {n: spec for n, spec in channel.layers.items() if widths[n][1] >= MIN_BLOCKS * 8}
    assert all(keep_count(widths[n][1], spec.rate) % 8 == 0 for n, spec in wide.items()) and len(wide) > 10


def test_nm_rates_snap_to_what_nm_can_take() -> None:
    assert snap(0.3, SparsityType.NM) == 0.25
    assert snap(0.9, SparsityType.NM) == 0.75
    assert snap(0.1, SparsityType.NM) == 0.0
    assert snap(0.33, SparsityType.FILTER) == 0.35


def test_a_sensitivity_scan_prunes_each_unit_alone_and_leaves_the_model_as_it_was(digits_baseline: DenseResult) -> None:
    from sparsesearch import seeds

    model, data = prepare("digits-cnn", "digits", weights=digits_baseline.checkpoint)
    layers, deps = trace(model, data.input_shape), dependencies(model, data.input_shape)
    space = Space(layers, deps.couplings, ("filter", "shape"), {layer.name: 1.0 for layer in layers})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    found = seeds.scan(space, model, deps, data.val, torch.device("cpu"), on_progress=lambda *c: calls.append(c))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert calls == [(i + 1, len(space.slots), s.name) for i, s in enumerate(space.slots)]  # the bar moves per slot
    assert list(found.drop) == [slot.name for slot in space.slots] and found.images == len(data.val) * (len(found.drop) + 1)
    assert found.kinds[space.slots[0].name] == "filter" and found.kinds[space.slots[-1].name] == "shape"  # the classifier
    assert max(found.drop.values()) > 5 > min(found.drop.values())  # units differ: some fragile, some robust


def test_the_scan_also_removes_each_removable_branch_alone() -> None:
    from sparsesearch import seeds

    model, data = prepare("resnet20", "digits", image_size=32)
    shape = data.input_shape
    layers, deps = trace(model, shape), dependencies(model, shape)
    inner = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    space = Space(layers, deps.couplings, ("filter",), {layer.name: 1.0 for layer in layers}, removable=inner)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    found = seeds.scan(space, model, deps, data.val, torch.device("cpu"), on_progress=lambda *c: calls.append(c))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sorted(found.removed) == sorted(inner) and list(found.drop) == [s.name for s in space.slots]
    assert [c[:2] for c in calls] == [(i + 1, len(space.slots) + 9) for i in range(len(space.slots) + 9)]
    assert seeds.Scan.from_attrs(json.loads(json.dumps(found.to_attrs()))) == found  # kept in the study


@pytest.mark.parametrize("name,shape", [("digits-cnn", (1, 8, 8)), ("resnet20", (3, 32, 32))])
def test_seeded_plans_prune_fragile_slots_less_at_the_same_mean_rate(name: str, shape: tuple[int, ...]) -> None:
    from sparsesearch import seeds

    space, (layers, couplings) = _space(name, shape)
    drops = {s.name: 10.0 * i for i, s in enumerate(space.slots)}  # later slots more fragile
    found = seeds.Scan(0.5, {s.name: "filter" if SparsityType.FILTER in s.types else "shape" for s in space.slots},
                       drops, 0.0, 0)
    if not space.per_layer:
        space.robustness = seeds.robustness(found)
    params = seeds.seeded_params(space, found, 0.5)
    units = [s.name for s in space.slots] if space.per_layer else list(space.stages)
    rates = [params[f"rate:{u}"] for u in units]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]
    assert sum(rates) / len(rates) == pytest.approx(0.5, abs=0.06)  # on the 0.05 grid
    plan = space.suggest(FixedTrial(params))
    plan.validate(layers, couplings)
    # inside each stage too, the more fragile a slot the less it is pruned
    for slots in ([] if space.per_layer else space.stages.values()):
        pruned = [plan.layers[s.name].rate if s.name in plan.layers else 0.0 for s in slots]
        assert pruned == sorted(pruned, reverse=True) and (len(slots) == 1 or pruned[0] > pruned[-1])


@pytest.mark.parametrize("max_slots", [4, 100], ids=["per-stage", "per-layer"])
def test_seeded_plans_remove_the_share_of_residual_branches_whose_removal_alone_cost_least(max_slots: int) -> None:
    """Depth with width: at mean rate 0.7 the seed removes 2 of each stage's 3 removable branches in a
    per-stage space (6 of 9 over the network in a per-layer one), the ones the scan found cheapest."""
    from sparsesearch import seeds

    torch.manual_seed(0)
    model = models.create("resnet20", in_channels=1).eval()
    shape = (1, 32, 32)
    layers, deps = trace(model, shape), dependencies(model, shape)
    inner = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    space = Space(layers, deps.couplings, ("filter",), {layer.name: 1.0 for layer in layers}, max_slots,
                  removable=inner)
    cost = {n: 0.1 * ((7 * i) % 9) for i, n in enumerate(inner)}  # what removing each alone lost
    space.removal_drop = cost
    found = seeds.Scan(0.5, {s.name: "filter" for s in space.slots}, {s.name: 1.0 for s in space.slots}, 0.0, 0, cost)
    if not space.per_layer:
        space.robustness = seeds.robustness(found)
    plan = space.suggest(FixedTrial(seeds.seeded_params(space, found, 0.7)))
    removed = {n for n, s in plan.layers.items() if s.rate == REMOVED}
    ranked = sorted(inner, key=cost.get)
    assert space.per_layer == (max_slots == 100)
    if space.per_layer:
        assert removed == set(ranked[:6])
    else:
        assert removed == {n for s in "123" for n in sorted((m for m in inner if m.startswith(f"layer{s}")),
                                                             key=cost.get)[:2]}
    light = seeds.seeded_params(space, found, 0.05)
    assert light == light | space.none_removed(), "a light seed removes nothing"
    plan.validate(layers, deps.couplings)


def test_norm_seeds_prune_where_the_filters_are_weak_and_ignore_a_layers_scale() -> None:
    """The global magnitude allocation: one threshold over all filters, each slot's norms relative to
    their mean, so a layer whose weights are ten times larger is not spared for it."""
    from sparsesearch import seeds

    torch.manual_seed(0)
    model = models.create("digits-cnn", in_channels=1).eval()
    layers, deps = trace(model, (1, 8, 8)), dependencies(model, (1, 8, 8))
    space = Space(layers, deps.couplings, ("filter", "shape"), {layer.name: 1.0 for layer in layers})
    first, second = [s.name for s in space.slots][:2]
    convs = dict(model.named_modules())
    with torch.no_grad():
        convs[first].weight[::2] *= 0.01  # half its filters weak
        convs[second].weight *= 10.0
    before = seeds.norm_rates(space, model, 0.3)
    counts = {s.name: convs[s.name].weight.shape[0] for s in space.slots if s.name in before}
    removed = sum(before[n] * counts[n] for n in counts) / sum(counts.values())
    assert removed == pytest.approx(0.3, abs=1 / sum(counts.values()))
    assert before[first] >= 0.5 and before[first] == max(before.values())
    with torch.no_grad():
        convs[second].weight /= 10.0
    assert seeds.norm_rates(space, model, 0.3) == before
    params = seeds.norm_params(space, model, 0.3)
    plan = space.suggest(FixedTrial(params))
    plan.validate(layers, deps.couplings)
    assert plan.layers[first] == LayerSparsity(SparsityType.FILTER, snap(before[first], SparsityType.FILTER))


def test_norm_seeds_in_a_per_stage_space_set_each_stage_to_its_slots_mean_rate() -> None:
    from sparsesearch import seeds

    torch.manual_seed(0)
    shape = (3, 32, 32)
    model = models.create("resnet20", in_channels=3).eval()
    layers, deps = trace(model, shape), dependencies(model, shape)
    space = Space(layers, deps.couplings, ("filter",), {layer.name: 1.0 for layer in layers}, max_slots=4)
    assert not space.per_layer
    rates = seeds.norm_rates(space, model, 0.5)
    assert set(rates) == {s.name for s in space.slots}  # a coupled residual stream is one slot
    params = seeds.norm_params(space, model, 0.5)
    for stage, slots in space.stages.items():
        mean = sum(rates[s.name] for s in slots) / len(slots)
        assert params[f"rate:{stage}"] == snap(mean, SparsityType.FILTER)
    assert params["alloc"] == 0.0
    space.suggest(FixedTrial(params)).validate(layers, deps.couplings)


def test_drops_within_the_scans_noise_do_not_rank_slots() -> None:
    """resnet56's inner convs scanned from -0.5 to +0.5 points: a coin toss must not prune some twice as hard."""
    from sparsesearch import seeds

    drops = {"gained": -0.5, "a": 0.3, "b": 0.5, "c": 2.0, "d": 8.0}
    found = seeds.Scan(0.5, dict.fromkeys(drops, "filter"), drops, 0.0, 0)
    robust = seeds.robustness(found)
    assert seeds.noise(found) == 0.5
    assert robust["gained"] == robust["a"] == robust["b"] == 1.0 > robust["c"] > robust["d"]
    assert robust["c"] == pytest.approx(1 / (1 + 2 / 5))  # the median of the drops above the noise
    clean = seeds.Scan(0.5, dict.fromkeys(drops, "filter"), drops | {"gained": 0.0}, 0.0, 0)
    assert seeds.noise(clean) == 0.0 and seeds.robustness(clean)["a"] > seeds.robustness(clean)["b"]


def test_lean_spreads_a_stage_rate_by_robustness_and_zero_lean_keeps_the_uniform_plan() -> None:
    space, (layers, couplings) = _space("resnet20", (3, 32, 32))
    space.robustness = {s.name: 1.0 if i % 2 else 0.25 for i, s in enumerate(space.slots)}
    uniform = space.uniform_params(SparsityType.FILTER, 0.4)
    assert uniform["lean"] == 0.0
    assert space.suggest(FixedTrial(uniform)) == Plan.uniform(layers, SparsityType.FILTER, 0.4)
    leaning = space.suggest(FixedTrial(uniform | {"lean": 1.0}))
    leaning.validate(layers, couplings)
    for slots in space.stages.values():
        robust = [s for s in slots if space.robustness[s.name] == 1.0 and s.name in leaning.layers]
        fragile = [s for s in slots if space.robustness[s.name] < 1.0 and s.name in leaning.layers]
        if robust and fragile:
            assert min(leaning.layers[s.name].rate for s in robust) > max(leaning.layers[s.name].rate for s in fragile)


def test_a_stage_removes_the_blocks_whose_removal_cost_least_and_the_uniform_plan_removes_none() -> None:
    torch.manual_seed(0)
    model = models.create("resnet20").eval()
    shape = (3, 32, 32)
    layers, deps = trace(model, shape), dependencies(model, shape)
    inner = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    space = Space(layers, deps.couplings, ("filter",), {layer.name: 1.0 for layer in layers}, max_slots=8,
                  removable=inner)
    assert {f"remove:{stage}" for stage in space.removable} == {k for k in space.even() if k.startswith("remove:")}
    assert sum(len(slots) for slots in space.removable.values()) == 9  # the stream groups are not removable
    space.robustness = {name: 0.5 for name in inner}
    space.removal_drop = {name: 3.0 for name in inner} | {"layer2.2.conv1": 0.1, "layer2.0.conv1": 0.2}
    uniform = space.uniform_params(SparsityType.FILTER, 0.3)
    assert space.suggest(FixedTrial(uniform)) == Plan.uniform(layers, SparsityType.FILTER, 0.3)
    stage = next(stage for stage, slots in space.removable.items() if slots[0].name.startswith("layer2"))
    plan = space.suggest(FixedTrial(uniform | {f"remove:{stage}": 2}))
    plan.validate(layers, deps.couplings)
    assert {n for n, spec in plan.layers.items() if spec.rate == REMOVED} == {"layer2.2.conv1", "layer2.0.conv1"}
    assert plan.layers["layer2.1.conv1"].rate == 0.3
    per_layer = Space(layers, deps.couplings, ("filter",), {layer.name: 1.0 for layer in layers}, removable=inner)
    assert per_layer.per_layer and per_layer.none_removed() == {f"remove:{name}": 0 for name in inner}
    uniform = per_layer.uniform_params(SparsityType.FILTER, 0.3)
    assert per_layer.suggest(FixedTrial(uniform)) == Plan.uniform(layers, SparsityType.FILTER, 0.3)
    assert per_layer.suggest(FixedTrial(uniform | {"remove:layer1.1.conv1": 1})).layers["layer1.1.conv1"].rate == REMOVED


def test_the_search_finds_the_removable_blocks_of_a_resnet_and_the_collapsible_layers_of_a_chain(
        tiny: dict) -> None:
    """Each slot whose emptying `compact` turns into a constant, tried on the dense model: a
    ResNet's inner convs, not its residual streams; in a plain chain the layers that keep their
    input's shape, which collapse (vgg11-bn's second 256 conv and its last three 512 convs), and
    none in digits-cnn's, whose every conv widens."""
    built = copy.copy(tiny["search"])
    assert built.find_removable() == []
    for name, shape, found in (("resnet20", (3, 32, 32), [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]),
                               ("vgg11-bn", (1, 32, 32), ["0.11", "0.18", "0.22", "0.25"])):
        model = models.create(name, in_channels=shape[0]).eval()
        built.model, built.input_shape = model, shape
        built.layers, built.deps = trace(model, shape), dependencies(model, shape)
        built.layers_ms = {layer.name: 1.0 for layer in built.layers}
        built.offer({})
        assert built.find_removable() == found


def _done(number: int, plan: dict, speedup: float, feasible: bool,
          drop: float | None = None) -> optuna.trial.FrozenTrial:
    attrs = {"plan": plan, "predicted_speedup": speedup, "feasible": feasible}
    attrs |= {} if drop is None else {"acc_drop": drop}
    return optuna.trial.create_trial(values=[99.0, speedup], user_attrs=attrs)


def test_rejection_before_training_says_why() -> None:
    light = {"a": {"type": "filter", "rate": 0.3}}
    heavy = {"a": {"type": "filter", "rate": 0.5}, "b": {"type": "shape", "rate": 0.2}}
    assert "slower than the dense" in rejection(heavy, 0.9, [])
    assert "dominated on speed" in rejection(heavy, 1.2, [_done(0, light, 1.3, True)])
    assert rejection(heavy, 1.4, [_done(0, light, 1.3, True)]) == ""
    assert "hopeless" in rejection(heavy, 1.4, [_done(0, light, 1.3, False)])
    other_type = {"a": {"type": "shape", "rate": 0.3}}
    assert rejection(heavy, 1.2, [_done(0, other_type, 1.3, True)]) == ""


def test_rejection_judges_past_trials_at_the_limit_it_is_given() -> None:
    """Full runs may raise the limit trials are judged at (`search.trial_limit`): a plan that prunes
    more than a trial which lost 3 points is hopeless at a limit of 1, worth training at one of 4."""
    light = {"a": {"type": "filter", "rate": 0.3}}
    heavy = {"a": {"type": "filter", "rate": 0.5}}
    lost_3 = _done(0, light, 1.3, False, drop=3.0)
    assert "hopeless" in rejection(heavy, 1.4, [lost_3], limit=1.0)
    assert rejection(heavy, 1.4, [lost_3], limit=4.0) == ""
    assert "dominated on speed" in rejection(heavy, 1.2, [lost_3], limit=4.0)


def _on_ladder(accs: list[float], speedup: float, state: TrialState = TrialState.COMPLETE,
               feasible: bool = True, **attrs: float) -> optuna.trial.FrozenTrial:
    rungs = [{"step": i, "of": 9, "phase": "admm", "acc": a} for i, a in enumerate(accs)]
    values = [99.0, speedup] if state == TrialState.COMPLETE else None
    return optuna.trial.create_trial(state=state, values=values, user_attrs={
        "rungs": rungs, "predicted_speedup": speedup, "feasible": feasible} | attrs)


def test_ladder_pruner_halves_among_plans_at_least_as_fast() -> None:
    study = optuna.create_study(directions=["maximize", "maximize"])
    for acc in (80.0, 85.0, 90.0):
        study.add_trial(_on_ladder([acc], 2.0))
    pruner = LadderPruner(eta=3, band=0.05)

    def stops(acc: float, speedup: float) -> str:
        return pruner.why(study, _on_ladder([acc], speedup, TrialState.RUNNING))

    assert "2 of 3 trials predicted at least as fast" in stops(84.0, 1.5), "trails two of its three faster peers"
    assert stops(86.0, 1.5) == "", "beaten by one of three: in the best 1/3 of 4 (rounded up)"
    assert stops(84.0, 2.5) == "", "its three peers are slower: none would dominate it"
    assert stops(84.0, 2.05) != "", "within the 5% band, a peer counts as at least as fast"
    study.add_trial(_on_ladder([70.0, 60.0], 3.0, TrialState.PRUNED))
    assert stops(75.0, 2.5) == "", "one peer (stopped at a later rung still counts) is fewer than eta"
    assert pruner.why(study, _on_ladder([], 1.0, TrialState.RUNNING)) == "", "no rung reached yet"


def test_ladder_pruner_stops_a_trial_trailing_every_feasible_one_at_least_as_fast() -> None:
    study = optuna.create_study(directions=["maximize", "maximize"])
    for acc in (60.0, 70.0, 80.0):
        study.add_trial(_on_ladder([acc], 1.2))
    pruner = LadderPruner(margin=5.0, min_feasible=3, eta=9)  # a wide band: the margin rule alone
    stops = pruner.why(study, _on_ladder([50.0], 1.1, TrialState.RUNNING))
    assert "every promising trial predicted at least as fast" in stops
    assert pruner.why(study, _on_ladder([56.0], 1.1, TrialState.RUNNING)) == "", "within the margin"
    assert pruner.why(study, _on_ladder([50.0], 9.0, TrialState.RUNNING)) == "", \
        "a faster plan scores lower early whatever it ends with: slower trials do not stop it"
    assert pruner.why(study, _on_ladder([90.0, 10.0], 1.1, TrialState.RUNNING)) == "", \
        "at rung 2 no feasible trial has a value to compare with"


def test_ladder_pruner_compares_with_the_trials_within_the_limit_a_trial_was_given() -> None:
    """A trial judged at a raised limit (`trial_limit`) trails only trials within it, by that limit
    plus the margin and what the limit was raised by: trials that lost 3 points stand beside it at
    a limit of 4, not at one of 1."""
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_user_attr("config", {"max_acc_drop": 1.0})
    for acc in (60.0, 70.0, 80.0):
        study.add_trial(_on_ladder([acc], 1.2, feasible=False, acc_drop=3.0))
    pruner = LadderPruner(margin=5.0, min_feasible=3, eta=9)

    def why(acc: float, limit: float) -> str:
        return pruner.why(study, _on_ladder([acc], 1.1, TrialState.RUNNING, trial_limit=limit))

    assert why(50.0, 1.0) == "", "at a limit of 1 no trial is promising"
    assert "more than 8.00 points" in why(50.0, 4.0)
    assert why(52.0, 4.0) == "", "within the margin plus the raise"


# --- a tiny study, end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(digits_baseline: DenseResult, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A coarse latency profile and a 5-trial study on digits, then resumed to 7 trials."""
    root = tmp_path_factory.mktemp("study")
    profile = root / "profile.json"
    model, data = prepare("digits-cnn", "digits", weights=digits_baseline.checkpoint)
    with no_channel_steps():
        profile_model(Target("digits-cnn", model.eval(), data.input_shape), torch.device("cpu"), 1,
                      rates=[0, 0.3, 0.5, 0.7], types=["filter", "shape"], out=profile, timing=FAST_TIMING)
    config = search.SearchConfig(checkpoint=str(digits_baseline.checkpoint), **TINY)
    built = search.build(config, torch.device("cpu"), str(root / "artifacts"), profile=profile)
    storage = f"sqlite:///{root / 'study.db'}"
    study = stores.open_study("tiny", storage, True, search.make_sampler(config, 0), LadderPruner())
    search.record(study, built)
    first = search.run(built, study, search.Budget(trials=5))
    numbers = [t.number for t in study.get_trials(False)]
    resumed = stores.open_study("tiny", storage, True, search.make_sampler(config, 5), LadderPruner())
    second = search.run(built, resumed, search.Budget(trials=7))
    measured = report.measure_front(built, resumed)
    return {"root": root, "search": built, "storage": storage, "study": resumed, "first": first, "second": second,
            "numbers": numbers, "measured": measured}


def test_a_space_offers_rates_past_0_9_only_where_its_profile_timed_them(tiny: dict, tmp_path: Path) -> None:
    """Torch-Pruning's vgg16-bn at 0.9 prunes its small late layers 94-97%; a space may go to 0.95,
    but only on a profile that timed 0.95 (past its grid a latency model sees no gain). A study
    keeps the range it started with."""
    torch.manual_seed(0)
    model = models.create("resnet20", in_channels=1).eval()
    shape = (1, 32, 32)
    layers, deps = trace(model, shape), dependencies(model, shape)

    def heaviest(max_rate: float | None) -> float:
        space = Space(layers, deps.couplings, ("filter",), {layer.name: 1.0 for layer in layers}, 4,
                      **({"max_rate": max_rate} if max_rate else {}))
        space.robustness = {s.name: 0.2 + 0.8 * (i % 2) for i, s in enumerate(space.slots)}  # robust ones pruned harder
        params = space.even() | {"lean": 1.0} | {f"{key}:{stage}": value for stage in space.stages
                                                 for key, value in (("type", "filter"), ("rate", 0.9))}
        return max(spec.rate for spec in space.suggest(FixedTrial(params)).layers.values())

    assert heaviest(None) == 0.9 and heaviest(0.95) == 0.95 and heaviest(1.0) == 0.95
    assert tiny["search"].max_rate == 0.9 and tiny["study"].user_attrs["max_rate"] == 0.9, "its profile stops at 0.7"
    timed = json.loads(tiny["search"].latency.profile.path.read_text())
    for entry in timed["rest"].values():
        entry["grid"]["rates"].append(0.95)
    (tmp_path / "profile.json").write_text(json.dumps(timed))
    config = search.SearchConfig(checkpoint=tiny["search"].config.checkpoint, **TINY)
    wider = search.build(config, torch.device("cpu"), str(tmp_path / "artifacts"), profile=tmp_path / "profile.json")
    assert wider.max_rate == wider.space.max_rate == 0.95
    search.record(tiny["study"], wider)  # resumed: the study's own range
    assert wider.space.max_rate == 0.9


def test_tiny_study_starts_with_the_uniform_baselines_then_the_sensitivity_seeds(tiny: dict) -> None:
    trials = tiny["study"].get_trials(False)
    baselines = [t for t in trials if "baseline" in t.user_attrs][:4]  # a halfway rung may come after the seeds
    assert [t.user_attrs["baseline"] for t in baselines] == ["filter=0.3", "filter=0.5", "filter=0.7", "filter=0.9"]
    assert [t.number for t in baselines] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in baselines)
    seeded = [t for t in trials if "seeded" in t.user_attrs]
    assert [t.number for t in seeded][:3] == [4, 5, 6] and all(t.state.is_finished() for t in seeded[:3])
    scan = tiny["study"].user_attrs["sensitivity"]
    assert set(scan["drop"]) == {s.name for s in tiny["search"].space.slots} and scan["seconds"] > 0


def test_resuming_adds_trials_to_the_same_study(tiny: dict) -> None:
    assert tiny["first"].trained == 5 and tiny["second"].trained == 2
    trials = tiny["study"].get_trials(False)
    assert [t.number for t in trials][: len(tiny["numbers"])] == tiny["numbers"]
    assert len(search.trained_trials(tiny["study"])) == 7


def test_every_trial_stores_its_full_per_layer_plan(tiny: dict) -> None:
    layers = {layer.name for layer in tiny["search"].layers}
    for t in search.finished_trials(tiny["study"]):
        assert "plan" in t.user_attrs and set(t.user_attrs["plan"]) <= layers
        if t.state == TrialState.PRUNED:
            assert t.user_attrs.get("rejected") or t.user_attrs.get("pruned"), "a pruned trial says why"
    assert tiny["first"].rejected == sum("rejected" in t.user_attrs for t in search.finished_trials(tiny["study"])
                                         if t.number in tiny["numbers"])


def test_constraint_marks_infeasible_trials(tiny: dict) -> None:
    study, drop = tiny["study"], tiny["search"].config.max_acc_drop
    done = study.get_trials(False, states=(TrialState.COMPLETE,))
    for t in done:
        assert t.constraints["accuracy_drop"] == pytest.approx(t.user_attrs["acc_drop"] - drop)
        assert t.user_attrs["feasible"] == (t.user_attrs["acc_drop"] <= drop)
    assert {t.user_attrs["feasible"] for t in done} == {True, False}, "the tiny budget gives both kinds"
    assert all(t.user_attrs["feasible"] for t in study.best_trials), "Optuna's front holds feasible trials only"


def test_pareto_trials_carry_measured_speedups(tiny: dict) -> None:
    front = report.front(tiny["study"])
    assert front
    measured = tiny["study"].user_attrs["measured"]
    for t in front + report.baselines(tiny["study"]):
        m = measured[str(t.number)]
        assert m["measured_speedup"] > 0 and m["latency_ms"]["compacted"] > 0
        assert m["macs"]["compacted"] < m["macs"]["dense"] and m["params"]["compacted"] < m["params"]["dense"]


def test_dense_baseline_is_stored_in_the_study(tiny: dict) -> None:
    attrs = tiny["study"].user_attrs
    assert attrs["dense"]["val"] == pytest.approx(tiny["search"].dense["val"])
    assert attrs["config"]["max_acc_drop"] == TINY["max_acc_drop"]
    assert attrs["layers"] == [layer.name for layer in tiny["search"].layers]
    assert attrs["config"]["image_size"] == 8 and attrs["dense"]["input_shape"] == [1, 8, 8]  # the side it searched at
    assert search.reconcile(tiny["study"], {"image_size": 8}, search.SearchConfig()).image_size == 8
    with pytest.raises(UserError, match="image_size = 8, not 16"):
        search.reconcile(tiny["study"], {"image_size": 16}, search.SearchConfig())


def test_resuming_with_other_settings_is_refused(tiny: dict) -> None:
    with pytest.raises(UserError, match="drop that option"):
        search.reconcile(tiny["study"], {"model": "lenet5"}, search.SearchConfig())
    assert search.reconcile(tiny["study"], {"model": None}, search.SearchConfig()).types == TINY["types"]


def test_a_study_trains_in_the_layout_it_began_with_whatever_a_later_timing_says(
        tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The layouts round differently, so where each run timed its own, one resnet56 plan retrained
    twice lost 0.35 and 0.53 points: a study times it once, on the dense network, and keeps it."""
    stored = search.reconcile(tiny["study"], {}, search.SearchConfig())
    assert stored.train_layout == tiny["search"].config.train_layout in ("contiguous", "channels-last")
    other = "channels-last" if stored.train_layout == "contiguous" else "contiguous"
    layout_verdict(monkeypatch, other)
    profile = tiny["root"] / "profile.json"
    resumed = search.build(stored, torch.device("cpu"), str(tmp_path / "a"), profile=profile)
    assert resumed.config.train_layout == stored.train_layout
    assert resumed.config.admm().layout == resumed.config.admm(0, 15).layout == stored.train_layout
    new = search.build(dataclasses.replace(stored, train_layout=""), torch.device("cpu"), str(tmp_path / "b"),
                       profile=profile)
    assert new.config.train_layout == other, "a new study times its own"


def test_resuming_on_a_dense_checkpoint_that_changed_is_refused(tiny: dict) -> None:
    retrained = dataclasses.replace(tiny["search"], weights_sha256="0" * 64)
    with pytest.raises(UserError, match="dense checkpoint of study 'tiny' changed since the study started"):
        search.record(tiny["study"], retrained)
    search.record(tiny["study"], tiny["search"])  # the same weights resume


def test_a_worker_starting_while_another_records_the_study_does_not_crash(tiny: dict,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers started together: one writes the study's record attr by attr while the next opens it.
    At every point in between, the second worker's record either writes its own or finds a whole one
    (a worker once died with KeyError 'dense', having seen "config" before "dense" was written)."""
    study, write, seen = optuna.create_study(directions=["maximize", "maximize"]), optuna.Study.set_user_attr, []

    def then_another_worker_starts(self: optuna.Study, key: str, value: object) -> None:
        write(self, key, value)
        if self is study:  # the first worker's write; the second's own writes start no third
            seen.append(key)
            search.record(optuna.load_study(study_name=self.study_name, storage=self._storage), tiny["search"])

    monkeypatch.setattr(optuna.Study, "set_user_attr", then_another_worker_starts)
    search.record(study, tiny["search"])
    assert seen[-1] == "config" and study.user_attrs["dense"]["val"] == tiny["search"].dense["val"]


def test_export_refuses_infeasible_and_unknown_trials(tiny: dict) -> None:
    study = tiny["study"]
    infeasible = next(t for t in study.get_trials(False, states=(TrialState.COMPLETE,)) if not t.user_attrs["feasible"])
    with pytest.raises(UserError, match="not feasible"):
        search.chosen(study, infeasible.number)
    with pytest.raises(UserError, match="has no trial 99"):
        search.chosen(study, 99)


def test_export_and_finalize_retrain_only_the_studys_model_from_its_own_dense_weights(tiny: dict,
                                                                                      tmp_path: Path) -> None:
    """Drops are measured from the dense model the trials were pruned from: other weights, missing
    weights (never trained anew) or another --model are refused before any work."""
    storage = f"sqlite:///{tmp_path / 'copy.db'}"
    optuna.copy_study(from_study_name="tiny", from_storage=tiny["storage"], to_storage=storage)
    study = optuna.load_study(study_name="tiny", storage=storage)
    said = CliRunner().invoke(app, ["finalize", "tiny", "--storage", storage, "--model", "lenet5"]).stderr
    assert "study 'tiny' searched the model digits-cnn, not lenet5" in said
    assert search.recorded_dense(study) == Path(study.user_attrs["config"]["checkpoint"])
    study.set_user_attr("dense", {**study.user_attrs["dense"], "weights_sha256": "0" * 64})
    with pytest.raises(UserError, match="changed since the study started"):
        search.recorded_dense(study)
    study.set_user_attr("config", {**study.user_attrs["config"], "checkpoint": str(tmp_path / "gone.pt")})
    with pytest.raises(UserError, match="gone.pt that study 'tiny' was pruned from is not here"):
        search.recorded_dense(study)
    assert not (tmp_path / "gone.pt").exists(), "nothing trained in its place"


def test_export_reruns_a_pareto_plan_and_writes_the_compacted_model(tiny: dict, tmp_path: Path) -> None:
    """And records in the study what the plan lost retrained beside what its trial lost, for the report."""
    storage = f"sqlite:///{tmp_path / 'exported.db'}"
    optuna.copy_study(from_study_name="tiny", from_storage=tiny["storage"], to_storage=storage)
    study = optuna.load_study(study_name="tiny", storage=storage)
    trial = report.front(study)[0]
    result = search.export_trial(tiny["search"], study, trial.number, 0.25, 0.25, tmp_path)
    assert result.files["state"].is_file() and result.metrics.is_file()
    assert result.measured.macs["compacted"] < result.measured.macs["dense"] and result.measured.speedup > 0
    (row,) = report.exported(optuna.load_study(study_name="tiny", storage=storage))
    assert row["trial"] == trial.number and row["acc_drop"] == trial.user_attrs["acc_drop"]
    assert row["val_drop"] == pytest.approx(result.accuracy["dense_val"] - result.accuracy["val"])
    assert row["speedup"] == result.measured.speedup and row["epochs"] == "0.25+0.25"
    assert row["val_drop_se"] > 0, "the retrained drop is paired image by image with the dense model"
    assert f"| {trial.number} | {report.drop_text(row)} | {report.retrained_text(row)} |" in report.markdown(study)
    again = search.export_trial(tiny["search"], study, trial.number, 0.25, 0.25, tmp_path / "r1", replicate=1)
    first, second = report.exported(optuna.load_study(study_name="tiny", storage=storage))
    assert (first["replicate"], second["replicate"]) == (0, 1) and first["path"] != second["path"], "both kept"
    seeds = [json.loads(m.read_text())["admm_config"]["seed"] for m in (result.metrics, again.metrics)]
    assert second["seed"] == seeds[1] == seeds[0] + search.REPLICATE_SEEDS, "a replicate trains at its own seed"
    mean = report.plan_runs([first, second], "0.25+0.25")[trial.number]
    assert mean["val_drop"] == pytest.approx((first["val_drop"] + second["val_drop"]) / 2)
    assert mean["path"] == min(first, second, key=lambda r: r["val_drop"])["path"], "ships the run that lost least"


def test_finalize_retrains_the_front_by_bisection_and_ships_its_fastest_plan_within_the_limit(
        tiny: dict, tmp_path: Path) -> None:
    """Limit 100 points: every full run is within it, so the bisection climbs to the fastest plan of
    the whole front, in at most log2 runs: in one here, as the trials' drops (at most 90 points,
    and the crossing sought at twice the limit before any run) say every plan comes within. A
    settled bisection trains nothing more."""
    storage = f"sqlite:///{tmp_path / 'finalized.db'}"
    optuna.copy_study(from_study_name="tiny", from_storage=tiny["storage"], to_storage=storage)
    study = optuna.load_study(study_name="tiny", storage=storage)
    front = finalizing.candidates(study)
    speedups, accuracies = [t.values[1] for t in front], [t.values[0] for t in front]
    assert speedups == sorted(speedups) and accuracies == sorted(accuracies, reverse=True)
    assert all(any(f.values[0] >= t.values[0] and f.values[1] >= t.values[1] for f in front)
               for t in study.get_trials(False, states=(TrialState.COMPLETE,))), "every trained plan is on or behind it"
    runs: list[int] = []

    def again(retrains: int | None) -> finalizing.Finalized:
        return finalizing.finalize(tiny["search"], study, 100.0, 0.25, 0.25, tmp_path / "export", retrains,
                                   on_run=lambda trial, _now: runs.append(trial))

    first = again(1)
    assert runs == [front[-1].number] and first.retrained.keys() == {runs[0]} and first.next is None
    done = again(None)
    assert done.best == front[-1].number and done.next is None
    assert len(runs) == len(set(runs)) <= math.ceil(math.log2(len(front) + 1))
    shipped = search.export_dir(tmp_path / "export", done.best, "0.25+0.25")
    assert (shipped / "metrics.json").is_file() and done.retrained[done.best]["path"] == str(shipped.resolve())
    assert again(None) == done and len(runs) == len(done.retrained), "a settled bisection trains nothing more"
    assert study.user_attrs[report.FINALIZED]["best"] == done.best
    assert all(study.user_attrs[f"{finalizing.FINALIZING}{n}"] is None for n in runs), "each lease is given back"
    assert f"**Ship trial {done.best}**" in report.markdown(study)


def test_an_interrupted_export_continues_where_it_stopped(tiny: dict, tmp_path: Path) -> None:
    """Ctrl-C in retraining keeps the ADMM periods already trained: the same call goes on from them,
    records where it continued, and leaves no resume state once the model is written."""
    trial = report.front(tiny["study"])[0]

    def stop_in_retraining(step: int, total: int, phase: str) -> None:
        if phase == "retrain":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search.export_trial(tiny["search"], tiny["study"], trial.number, 0.5, 0.25, tmp_path, stop_in_retraining)
    assert (tmp_path / RESUME).is_file() and not (tmp_path / "metrics.json").exists()
    result = search.export_trial(tiny["search"], tiny["study"], trial.number, 0.5, 0.25, tmp_path)
    admm_steps = tiny["search"].config.admm(0.5, 0.25).admm_steps(len(tiny["search"].data.train))
    assert result.resumed_at == admm_steps
    assert json.loads(result.metrics.read_text())["resumed_at_step"] == admm_steps
    assert not list(tmp_path.glob("*resume*"))


def test_unknown_study_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no study 'nope'"):
        stores.open_study("nope", None, create=False)
    with pytest.raises(UserError, match="no study file at"):
        stores.open_study("nope", f"sqlite:///{tmp_path / 'x.db'}", create=False)
    stores.open_study("other", f"sqlite:///{tmp_path / 'x.db'}", create=True)
    with pytest.raises(UserError, match="holds no study 'nope'; check the study's name"):
        stores.open_study("nope", f"sqlite:///{tmp_path / 'x.db'}", create=False)
    with pytest.raises(UserError, match="cannot open study storage"):
        stores.open_study("nope", "postgresql://127.0.0.1:1/none", create=True)


def test_a_mistyped_model_leaves_no_study_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["optimize", "--model", "resnet2O", "--budget", "1"])
    assert result.exit_code == 2 and "did you mean resnet20" in result.stderr
    assert not (tmp_path / "studies").exists()


def test_a_trial_whose_worker_was_killed_is_failed_and_retried(tiny: dict, digits_baseline: DenseResult,
                                                               tmp_path: Path) -> None:
    """A worker SIGKILLed mid-trial leaves its trial RUNNING; once its heartbeat is older than the
    grace period, the next worker fails it and enqueues its plan again (real SQLite, real kill)."""
    import signal
    import subprocess
    import sys
    import time
    import warnings

    # any profile: the test times nothing (the tiny study's few rows fit in 2 s, a shipped
    # profile's thousand in ten); trials of 3+3 epochs train for seconds, long enough to be seen
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "sparsesearch"), "optimize", "--study", "k", "--budget", "3", "--threads", "1",
         "--trial-epochs", "3+3", "--checkpoint", str(digits_baseline.checkpoint),
         "--profile", str(tiny["root"] / "profile.json")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"sqlite:///{tmp_path / 'studies' / 'k' / 'study.db'}"
    deadline, running = time.monotonic() + 300, []
    while not running and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.5)
        try:
            running = [t for t in optuna.load_study(study_name="k", storage=url).get_trials(
                False, states=(TrialState.RUNNING,)) if "claimed" in t.user_attrs]  # training, its plan stored
        except (KeyError, Exception):  # noqa: BLE001 - the worker has not created the study yet
            running = []
    assert running, f"no trial started: {worker.stderr.read() if worker.poll() is not None else 'timeout'}"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    time.sleep(2.5)
    study = stores.open_study("k", url, create=False, grace_s=1)
    with warnings.catch_warnings():  # experimental in Optuna 5, as every worker runs it before a trial
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(False)
    killed = [t for t in trials if t.number == running[0].number]
    retried = [t for t in trials if t.state == TrialState.WAITING and t.system_attrs.get("failed_trial") == running[0].number]
    assert killed[0].state == TrialState.FAIL and len(retried) == 1
    assert retried[0].params == killed[0].params and retried[0].user_attrs["plan"] == killed[0].user_attrs["plan"]


def test_baselines_enqueued_by_two_workers_are_trained_once(tiny: dict, tmp_path: Path) -> None:
    built = tiny["search"]
    study = stores.open_study("twice", f"sqlite:///{tmp_path / 'study.db'}", True, search.make_sampler(built.config, 0),
                              LadderPruner())
    for _worker in range(2):  # both saw no baselines yet, as two workers starting together do
        for label, params in built.baselines():
            study.enqueue_trial(params, user_attrs={"baseline": label})
    search.run(built, study, search.Budget(trials=5), baselines=False)  # the 5th trained trial comes after the copies
    trained = [t.user_attrs["baseline"] for t in search.trained_trials(study) if "baseline" in t.user_attrs]
    assert sorted(trained) == ["filter=0.3", "filter=0.5", "filter=0.7", "filter=0.9"]
    duplicates = [t for t in study.get_trials(False) if "is trial" in t.user_attrs.get("rejected", "")]
    assert len(duplicates) == 4 and all(t.state == TrialState.PRUNED for t in duplicates)


def test_a_study_scanned_per_stage_before_is_scanned_again_per_slot(tiny: dict, tmp_path: Path) -> None:
    """Studies from before kept a scan per stage: its seeds and robustness would not match the slots."""
    built = tiny["search"]
    study = stores.open_study("old-scan", f"sqlite:///{tmp_path / 'study.db'}", True, None, LadderPruner())
    study.set_user_attr("sensitivity", {"rate": 0.5, "kinds": {"conv 8x8": "filter"}, "drop": {"conv 8x8": 44.0},
                                        "seconds": 1.0, "images": 10})
    search._enqueue_ladder(built, study)
    assert set(study.user_attrs["sensitivity"]["drop"]) == {s.name for s in built.space.slots}
    assert {t.user_attrs.get("seeded") for t in study.get_trials(False)} - {None} == {
        f"{family} {r}" for r in search.BASELINE_RATES for family in ("sensitivity at mean rate", "weight norms at rate")}


def _with_baselines(tiny: dict, tmp_path: Path, name: str, feasible: dict[float, bool],
                    seeded: dict[float, bool] | None = None) -> optuna.Study:
    """A study whose uniform baselines at `feasible`'s rates finished, each feasible or not, and its
    sensitivity seeds at `seeded`'s."""
    from sparsesearch import seeds

    built, distributions = tiny["search"], tiny["study"].get_trials(False)[0].distributions
    study = stores.open_study(name, f"sqlite:///{tmp_path / 'study.db'}", True,
                              search.make_sampler(built.config, 0), LadderPruner())
    study.set_user_attr("sensitivity", tiny["study"].user_attrs["sensitivity"])
    scan = seeds.Scan.from_attrs(study.user_attrs["sensitivity"])
    trials = [(params, {"baseline": label}, ok) for (label, params), ok in zip(built.baselines(list(feasible)),
                                                                              feasible.values())]
    trials += [(seeds.seeded_params(built.space, scan, rate), {"seeded": f"sensitivity at mean rate {rate}"}, ok)
               for rate, ok in (seeded or {}).items()]
    for params, attrs, ok in trials:
        study.add_trial(optuna.trial.create_trial(
            values=[90.0, 1.5], params=params, distributions={k: distributions[k] for k in params},
            user_attrs=attrs | {"feasible": ok}))
    return study


def test_a_norm_seed_that_is_a_uniform_plan_of_the_ladder_is_not_trained_again(tiny: dict, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """resnet56's stages, each at its slots' mean rate, come out as the uniform plan: a trial spent twice."""
    from sparsesearch import seeds

    built, norm_params = tiny["search"], seeds.norm_params
    monkeypatch.setattr(seeds, "norm_params", lambda space, model, rate: space.uniform_params(
        built.baseline_kind, rate) if rate != 0.5 else norm_params(space, model, rate))
    study = stores.open_study("norms", f"sqlite:///{tmp_path / 'study.db'}", True, None, LadderPruner())
    search._enqueue_ladder(built, study)
    seeded = {t.user_attrs.get("seeded") for t in study.get_trials(False)}
    assert {label for label in seeded if label and label.startswith("weight norms")} == {"weight norms at rate 0.5"}


def test_the_uniform_ladder_goes_down_while_every_baseline_misses_the_constraint(tiny: dict, tmp_path: Path) -> None:
    """Short trials on a deep net can lose more than the constraint allows even at 30%: the ladder
    then adds half its lowest rate on the grid (15%, then 5%), baseline and seed, until one is
    feasible, and trains them before the sampler's plans."""
    built = tiny["search"]

    def study_of(name: str, rates: list[float]) -> optuna.Study:
        return _with_baselines(tiny, tmp_path, name, dict.fromkeys(rates, False))

    assert built.ladder(study_of("partly", [0.3, 0.5, 0.7])) == [0.3, 0.5, 0.7, 0.9], "filter 90% has not run yet"
    study = study_of("down", [0.3, 0.5, 0.7, 0.9])
    assert built.ladder(study) == [0.3, 0.5, 0.7, 0.9, 0.15]
    search.run(built, study, search.Budget(trials=5))
    (new,) = [t for t in search.trained_trials(study) if t.number >= 4]
    assert new.user_attrs["baseline"] == "filter=0.15"
    assert {(v["type"], v["rate"]) for v in new.user_attrs["plan"].values()} == {("filter", 0.15)}
    waiting = {t.user_attrs.get("seeded") for t in study.get_trials(False, states=(TrialState.WAITING,))}
    assert "sensitivity at mean rate 0.15" in waiting
    assert new.user_attrs["feasible"] and built.ladder(study) == [0.3, 0.5, 0.7, 0.9, 0.15, 0.2], \
        "feasible: no lower, and a rung halfway up to the first one beyond the limit"
    assert built.ladder(study_of("further", [0.3, 0.5, 0.7, 0.9, 0.15])) == [0.3, 0.5, 0.7, 0.9, 0.15, 0.05]
    assert built.ladder(study_of("floor", [0.3, 0.5, 0.7, 0.9, 0.15, 0.05])) == [0.3, 0.5, 0.7, 0.9, 0.15, 0.05], \
        "not below the grid's step"


def test_the_uniform_ladder_adds_a_rung_halfway_where_the_limits_edge_lies(tiny: dict, tmp_path: Path) -> None:
    """The front's fastest plans lie at the limit's edge: between the fastest rung within it and the
    next rung, both finished and more than 0.1 apart, the ladder adds one halfway (baseline and seed)."""
    built = tiny["search"]

    def ladder(name: str, feasible: dict[float, bool]) -> list[float]:
        return built.ladder(_with_baselines(tiny, tmp_path, name, feasible))

    assert ladder("edge", {0.3: True, 0.5: False, 0.7: False, 0.9: False}) == [0.3, 0.5, 0.7, 0.9, 0.4]
    assert ladder("early", {0.3: True, 0.5: False}) == [0.3, 0.5, 0.7, 0.9, 0.4], "known once both rungs finished"
    assert ladder("close", {0.3: True, 0.5: False, 0.7: False, 0.9: False, 0.4: True}) == [0.3, 0.5, 0.7, 0.9, 0.4], \
        "0.1 apart: no further"
    assert ladder("top", {0.3: True, 0.5: True, 0.7: True, 0.9: False}) == [0.3, 0.5, 0.7, 0.9, 0.8]
    assert ladder("all", {0.3: True, 0.5: True, 0.7: True, 0.9: True}) == [0.3, 0.5, 0.7, 0.9]
    study = _with_baselines(tiny, tmp_path, "enqueued", {0.3: True, 0.5: False, 0.7: False, 0.9: False})
    search._enqueue_ladder(built, study)
    waiting = {t.user_attrs.get("baseline") or t.user_attrs.get("seeded")
               for t in study.get_trials(False, states=(TrialState.WAITING,))}
    assert {"filter=0.4", "sensitivity at mean rate 0.4"} <= waiting


def test_the_seeds_are_bisected_at_their_own_edge_down_to_the_grid(tiny: dict, tmp_path: Path) -> None:
    """The sensitivity seeds are the front's fastest plans: between the fastest seed within the limit
    and the next one beyond, the study adds a seed halfway until they are one 0.05 step apart (no
    uniform plan with it: the uniform ladder stops at 0.1)."""
    built = tiny["search"]
    uniform = {0.3: True, 0.5: True, 0.7: False, 0.9: False}

    def seed_rates(name: str, seeded: dict[float, bool]) -> list[float]:
        study = _with_baselines(tiny, tmp_path, name, uniform, seeded)
        return built.seed_rates(study, built.ladder(study))

    assert seed_rates("ladder", {0.3: True, 0.5: True, 0.7: False}) == [0.3, 0.5, 0.7, 0.9, 0.6], \
        "the uniform ladder's rung at 60% is the seeds' halfway too"
    assert seed_rates("edge", {0.3: True, 0.5: True, 0.6: False, 0.7: False}) == [0.3, 0.5, 0.7, 0.9, 0.6, 0.55]
    assert seed_rates("grid", {0.5: True, 0.55: True, 0.6: False}) == [0.3, 0.5, 0.7, 0.9, 0.6, 0.55], \
        "one step apart: no further"
    assert seed_rates("low", {0.3: True, 0.5: False}) == [0.3, 0.5, 0.7, 0.9, 0.6, 0.4]
    study = _with_baselines(tiny, tmp_path, "enqueued", uniform, {0.3: True, 0.5: True, 0.6: False, 0.7: False})
    search._enqueue_ladder(built, study)
    waiting = {t.user_attrs.get("baseline") or t.user_attrs.get("seeded")
               for t in study.get_trials(False, states=(TrialState.WAITING,))}
    assert "sensitivity at mean rate 0.55" in waiting and "filter=0.55" not in waiting
    edge = next(t for t in study.get_trials(False, states=(TrialState.WAITING,))
                if t.user_attrs.get("seeded") == "sensitivity at mean rate 0.55")
    assert not search._off_ladder(built, optuna.Trial(study, edge._trial_id)), "trained when its turn comes"


def test_rungs_a_full_run_made_needless_are_not_trained(tiny: dict, tmp_path: Path) -> None:
    """Every baseline missed the user's limit, so the ladder enqueued filter 15% and its seeds; then
    a full run showed 30% passes, and the trial limit rose past it. The waiting 15% plans are
    rejected at no cost (on resnet56 they took 7 of a 2-hour study's minutes) and the rung at the
    new limit's edge trains instead."""
    built, distributions = tiny["search"], tiny["study"].get_trials(False)[0].distributions
    study = stores.open_study("needless", f"sqlite:///{tmp_path / 'study.db'}", True,
                              search.make_sampler(built.config, 0), LadderPruner())
    search.record(study, built)
    study.set_user_attr("sensitivity", tiny["study"].user_attrs["sensitivity"])
    for (label, params), drop in zip(built.baselines(), (30.0, 40.0, 50.0, 60.0)):
        study.add_trial(optuna.trial.create_trial(
            values=[60.0, 1.5], params=params, distributions={k: distributions[k] for k in params},
            user_attrs={"baseline": label, "acc_drop": drop, "feasible": False, "plan": {}}))
    search._enqueue_ladder(built, study)
    assert built.ladder(study)[-1] == 0.15
    study.set_user_attr(report.export_key(study, 0, "4+2"), {"val_drop": 0.1, "val_drop_se": 0.1, "test_drop": 0.2,
                                                            "speedup": 2.0, "epochs": "4+2"})
    assert search.trial_limit(study, built.config.max_acc_drop) == 30.0 and 0.15 not in built.ladder(study)
    search.run(built, study, search.Budget(trials=14))  # the seeds at 30-90% first, then the ladder's rungs
    labels = {t.number: t.user_attrs.get("baseline") or t.user_attrs.get("seeded") for t in study.get_trials(False)}
    needless = [t for t in study.get_trials(False) if labels[t.number] and labels[t.number].endswith("0.15")]
    assert len(needless) == 3 and all("off the uniform ladder" in t.user_attrs.get("rejected", "") for t in needless)
    assert "filter=0.4" in {labels[t.number] for t in search.trained_trials(study)}, \
        "the rung halfway to the first one beyond the raised limit"


def test_the_retry_of_a_killed_baseline_whose_copy_was_rejected_trains_once(tiny: dict, tmp_path: Path) -> None:
    """Trial 0 (a baseline) was killed; trial 1, a copy another worker enqueued, was rejected as
    trial 0's; trial 2 is trial 0's retry. Before: the retry was rejected as trial 1's, the baseline
    enqueued anew and rejected again, 1,039 times, until the worker gave up."""
    built = tiny["search"]
    study = stores.open_study("retry", f"sqlite:///{tmp_path / 'study.db'}", True, search.make_sampler(built.config, 0),
                              LadderPruner())
    label, params = built.baselines()[0]
    distributions = {k: v for k, v in tiny["study"].get_trials(False)[0].distributions.items() if k in params}
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params=params, distributions=distributions,
                                              user_attrs={"baseline": label}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, params=params, distributions=distributions,
                                              user_attrs={"baseline": label, "rejected": f"baseline {label} is trial 0's",
                                                          "judged": False}))
    study.enqueue_trial(params, user_attrs={"baseline": label})
    search.run(built, study, search.Budget(trials=1), baselines=False)
    trials = study.get_trials(False)
    assert trials[2].state == TrialState.COMPLETE and "rejected" not in trials[2].user_attrs
    assert len(trials) == 3


def test_a_trials_drop_is_paired_with_the_control_trained_once_with_the_trial_recipe(
        tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Short trials cost the unpruned model accuracy too: a drop is taken from the dense model
    trained with the same recipe and nothing pruned, stored in the study and never trained again."""
    study, built = tiny["study"], tiny["search"]
    monkeypatch.setattr(search, "run_admm", lambda *a, **k: pytest.fail("the control was trained again"))
    search.control(built, study)
    found = study.user_attrs[search.CONTROL]
    assert found["seconds"] > 0 and search._unbits(found["correct"], len(built.data.val)).float().mean().item() * 100 \
        == pytest.approx(found["val"])
    for trial in search.trained_trials(study):
        if "acc_drop" in trial.user_attrs:  # stopped on the ladder: no drop
            assert trial.user_attrs["acc_drop"] == pytest.approx(found["val"] - trial.user_attrs["val_acc"], abs=1e-4)
    assert report.pareto(study)["control"] == {"val": found["val"], "seconds": found["seconds"]}
    assert "control, the dense model trained with the trial recipe" in report.markdown(study)


def test_a_study_judged_against_the_dense_model_before_it_had_a_control_keeps_judging_so(
        tiny: dict, tmp_path: Path) -> None:
    built = tiny["search"]
    study = stores.open_study("older", f"sqlite:///{tmp_path / 'study.db'}", True)
    study.add_trial(optuna.trial.create_trial(values=[90.0, 1.5], user_attrs={"acc_drop": 1.2}))
    search.run(built, study, search.Budget(trials=1))
    assert search.CONTROL not in study.user_attrs and built.reference is None
    search.control(built, tiny["study"])  # the shared Search judges the fixture's study again
    assert built.reference is not None


def test_while_another_worker_trains_the_control_a_worker_trains_trials_and_judges_them_against_it(
        tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers starting together train the control once: the one holding the lease trains it (here a
    worker on another machine, storing it a moment after this worker's trial has trained); the
    others train trials meanwhile and wait for it only to judge them."""
    import threading

    built, found = tiny["search"], tiny["study"].user_attrs[search.CONTROL]
    study = stores.open_study("shared", f"sqlite:///{tmp_path / 'study.db'}", True)
    study.set_user_attr(search.TRAINING_CONTROL, {"by": "another-machine:1", "at": time.time()})
    label, params = built.baselines()[0]
    study.enqueue_trial(params, user_attrs={"baseline": label})
    trained, real = [], search.run_admm

    def other_worker_finishes_later(model: Any, data: Any, plan: Plan, *args: Any, **kwargs: Any) -> Any:
        trained.append(plan.layers)
        result = real(model, data, plan, *args, **kwargs)
        threading.Timer(1.5, study.set_user_attr, (search.CONTROL, found)).start()
        return result

    monkeypatch.setattr(search, "run_admm", other_worker_finishes_later)
    search.run(built, study, search.Budget(trials=1), baselines=False)
    trial = search.trained_trials(study)[0]
    assert len(trained) == 1 and trained[0]  # one trial; the control not trained here
    assert trial.user_attrs["acc_drop"] == pytest.approx(found["val"] - trial.user_attrs["val_acc"], abs=1e-4)


def test_a_control_interrupted_or_orphaned_is_trained_by_the_next_worker(tiny: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import subprocess
    import sys

    study = stores.open_study("orphan", f"sqlite:///{tmp_path / 'study.db'}", True)
    with monkeypatch.context() as ctrl_c:
        ctrl_c.setattr(search, "run_admm", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            search.control(tiny["search"], study)
    assert study.user_attrs[search.TRAINING_CONTROL] is None  # released: no worker waits for it to lapse
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    study.set_user_attr(search.TRAINING_CONTROL, {"by": f"{socket.gethostname()}:{ended.pid}", "at": time.time()})
    search.control(tiny["search"], study)
    assert study.user_attrs[search.CONTROL]["seconds"] > 0 and tiny["search"].reference is not None
    assert study.user_attrs[search.TRAINING_CONTROL] is None


def test_a_trial_waits_for_a_claim_that_fills_the_budget_and_yields_to_the_killed_trials_retry(
        tiny: dict, tmp_path: Path) -> None:
    """A trial whose worker was killed holds the budget's last claim. A worker asking then used to
    see the budget taken and stop, leaving the killed plan unretried and the budget one trial short
    (CI: 7 of 8 trained by three PostgreSQL workers). It waits until the claim goes stale, lets the
    retry run first, and the budget is trained exactly."""
    built = tiny["search"]
    study = stores.open_study("wait", f"sqlite:///{tmp_path / 'study.db'}", True, search.make_sampler(built.config, 0),
                              LadderPruner(), grace_s=2)
    study.set_user_attr(search.CONTROL, tiny["study"].user_attrs[search.CONTROL])  # trained, or the claim goes stale first
    label, params = built.baselines()[0]
    distributions = {k: v for k, v in tiny["study"].get_trials(False)[0].distributions.items() if k in params}
    study.enqueue_trial(params, user_attrs={"baseline": label})
    with pytest.warns(UserWarning, match="Heartbeat"):  # a trial asked, not run: as a killed worker's looks
        killed = study.ask(distributions)
    killed.set_user_attr("claimed", time.time())
    study._storage.record_heartbeat(killed._trial_id)
    search.run(built, study, search.Budget(trials=1), baselines=False)
    trials = study.get_trials(False)
    assert trials[0].state == TrialState.FAIL
    assert [t.number for t in trials if "retries a killed trial's plan" in t.user_attrs.get("rejected", "")] \
        == [len(trials) - 2]  # the trial asked while the retry waited
    trained = search.trained_trials(study)
    assert [t.system_attrs.get("failed_trial") for t in trained] == [0] and trained[0].params == params


def test_a_search_on_a_profile_timed_with_an_older_kernel_says_so_and_how_to_time_it_anew(
        tiny: dict, tmp_path: Path) -> None:
    import json

    raw = json.loads((tiny["root"] / "profile.json").read_text())
    raw["kernels"] = {"reduced-gemm": 1}  # its shape rows ran the im2col before the flat index
    (tmp_path / "old.json").write_text(json.dumps(raw))
    heard: list[str] = []
    search.build(tiny["search"].config, torch.device("cpu"), str(tmp_path / "artifacts"), profile=tmp_path / "old.json",
                 notify=heard.append)
    assert [h for h in heard if "timed reduced-gemm before that kernel changed" in h and "sparsesearch profile" in h]


def test_trials_scored_for_a_target_are_measured_there(tiny: dict, digits_baseline: DenseResult, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`optimize --profile target.json` scores trials by another device's profile on purpose: it
    says so and leaves the front unmeasured; `sparsesearch measure` on the target (here: this
    machine, without the dense checkpoint) measures it, and the report names both devices."""
    import shutil

    from typer.testing import CliRunner

    from helpers import with_fingerprint
    from sparsesearch.cli import app
    from sparsesearch.profiler.table import fingerprint

    monkeypatch.chdir(tmp_path)
    target = with_fingerprint(tiny["root"] / "profile.json", tmp_path / "target.json", device_name="Target Board",
                              threads=4)
    checkpoint = tmp_path / "dense.pt"
    shutil.copy(digits_baseline.checkpoint, checkpoint)
    shutil.copy(digits_baseline.checkpoint.with_suffix(".json"), checkpoint.with_suffix(".json"))
    run = CliRunner().invoke(app, ["optimize", "--study", "t", "--budget", "4", "--profile", str(target),
                                   "--checkpoint", str(checkpoint), "--types", "filter,shape", "--max-acc-drop", "20",
                                   "--trial-epochs", "0.25+0.25", "--threads", "1"])
    assert run.exit_code == 0, run.output
    said = " ".join(run.output.split())
    assert "scored by the profile of another device" in said
    assert re.search(r"one trial on 1,078 training images \(3.3% of a full run's\): [\d,]+ training steps \+ 2,101 "
                     r"images evaluated ≤ \d+ s on this device \(timed on a few steps\); 4 more trials ≤ \d+ s",
                     said), said
    assert ("trials may rank plans unlike full training (LeNet-5: Spearman 0.56 at 2.7%, 0.92 at 5.3%); "
            "--trial-epochs 0.5+0.5 trains 6.7%") in said  # 1.5x the epochs: 0.375 each, rounded up to half epochs
    assert re.search(r"search: 4/4 .*, \d+ s/trial", said), said  # the measured pace, once trials finished
    more = CliRunner().invoke(app, ["optimize", "--study", "t", "--budget", "6s", "--profile", str(target),
                                    "--checkpoint", str(checkpoint), "--threads", "1"])
    said = " ".join(more.output.split())
    assert more.exit_code == 0 and re.search(r"the \d+ s left of 0.1 min buy ≥ \d+ trials", said), said
    # a duration's bar counts its minutes
    assert re.search(r"search: 0/1 min; 0 trials, (best|no) feasible", said), said
    done = CliRunner().invoke(app, ["optimize", "--study", "t", "--budget", "2", "--profile", str(target),
                                    "--checkpoint", str(checkpoint), "--threads", "1"])
    said = " ".join(done.output.split())  # a budget the study has reached: nothing to train, no negative counts
    so_far = re.search(r"(\d+) trials so far", said)
    assert done.exit_code == 0 and so_far, said
    assert f"the study already has {so_far[1]} trials (--budget 2); a larger --budget adds more" in said, said
    assert re.search(rf"search: {so_far[1]}/{so_far[1]} .*0 trials trained", said), said
    study = stores.open_study("t", None, create=False)
    assert "measured" not in study.user_attrs
    checkpoint.unlink()
    measured = CliRunner().invoke(app, ["measure", "t", "--threads", "1"])
    assert measured.exit_code == 0, measured.output
    study = stores.open_study("t", None, create=False)
    wanted = {str(t.number) for t in [*report.front(study), *report.baselines(study)]}
    assert wanted and wanted <= set(study.user_attrs["measured"])
    here = fingerprint(torch.device("cpu"), 1, "float32")["device_name"]
    text = " ".join((tmp_path / "studies" / "t" / "report.md").read_text().split())
    assert "scored by the latency profile of Target Board" in text and f"measured on {here}" in text


def test_a_study_whose_disk_fills_up_stops_in_one_line_and_keeps_its_trials(tiny: dict, digits_baseline: DenseResult,
                                                                           tiny_disk: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's "database or disk is full" under a running study: one line, exit 1, the finished
    trials still there and no journal file left behind; freeing space and rerunning resumes."""
    from typer.testing import CliRunner

    from sparsesearch.cli import app

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tiny_disk / 'study.db'}"
    args = ["optimize", "--study", "f", "--storage", url, "--profile", str(tiny["root"] / "profile.json"),
            "--checkpoint", str(digits_baseline.checkpoint), "--artifacts", str(tmp_path / "weights"),
            "--types", "filter,shape", "--max-acc-drop", "20", "--trial-epochs", "0.1+0.1", "--threads", "1"]
    assert CliRunner().invoke(app, [*args, "--budget", "1"]).exit_code == 0
    free = shutil.disk_usage(tiny_disk).free
    (tiny_disk / "filler").write_bytes(b"\0" * (free - 8192))
    full = CliRunner().invoke(app, [*args, "--budget", "100"])
    assert full.exit_code == 1 and "Traceback" not in full.output, full.output
    assert full.stderr.startswith("error: the study storage failed (") and "disk is full" in full.stderr
    assert "free space on its disk, then run the same command" in full.stderr
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "study.db"]
    assert len(search.trained_trials(stores.open_study("f", url, create=False))) >= 1
    (tiny_disk / "filler").unlink()
    assert CliRunner().invoke(app, [*args, "--budget", "2"]).exit_code == 0
    assert len(search.trained_trials(stores.open_study("f", url, create=False))) == 2


def test_a_baseline_whose_retry_failed_too_is_enqueued_again(tiny: dict, tmp_path: Path) -> None:
    """Killed twice, a baseline's retries are spent (a retry is not retried again), but the report
    compares the search with the baselines: the next run enqueues it anew. A held baseline is not."""
    built = tiny["search"]
    study = stores.open_study("again", f"sqlite:///{tmp_path / 'study.db'}", True)
    for label, state, attrs in [("filter=0.3", TrialState.FAIL, {}), ("filter=0.3", TrialState.FAIL, {}),
                                ("filter=0.5", TrialState.COMPLETE, {}),
                                ("filter=0.7", TrialState.FAIL, {}),
                                ("filter=0.7", TrialState.PRUNED,
                                 {"rejected": "baseline filter=0.7 is trial 3's", "judged": False})]:
        study.add_trial(optuna.trial.create_trial(state=state, user_attrs={"baseline": label, **attrs},
                                                  values=[1.0, 1.0] if state == TrialState.COMPLETE else None))
    search.run(built, study, search.Budget(trials=0))
    waiting = [t.user_attrs.get("baseline") for t in study.get_trials(False, states=(TrialState.WAITING,))]
    assert sorted(w for w in waiting if w) == ["filter=0.3", "filter=0.7", "filter=0.9"]


def test_a_judged_seed_is_not_enqueued_again_but_one_an_older_version_found_hopeless_is(
        tiny: dict, tmp_path: Path) -> None:
    """A seeded plan judged (dominated on speed) stays judged: one rejected again on every enqueue
    was once enqueued after every trial, 500 times in a row, until the run gave up 9 minutes into
    its 85 (resnet56). Seeds are now trained where a lighter trial missed the limit, so one that
    an older version rejected as hopeless is enqueued once more."""
    study = stores.open_study("judged", f"sqlite:///{tmp_path / 'study.db'}", True)
    study.set_user_attr("sensitivity", tiny["study"].user_attrs["sensitivity"])
    for rate, why in ((0.5, "dominated on speed: trial 2 prunes no more"), (0.7, "hopeless: trial 3 prunes no more")):
        study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={
            "seeded": f"sensitivity at mean rate {rate}", "rejected": why}))
    search.run(tiny["search"], study, search.Budget(trials=0))
    waiting = {t.user_attrs.get("seeded") for t in study.get_trials(False, states=(TrialState.WAITING,))}
    assert waiting - {None} == {f"sensitivity at mean rate {r}" for r in (0.3, 0.7, 0.9)} | {
        f"weight norms at rate {r}" for r in search.BASELINE_RATES}


def test_a_seed_is_trained_where_a_lighter_trial_missed_the_limit(tiny: dict, tmp_path: Path) -> None:
    """Short trials make heavy plans look hopeless that full runs pass, and `finalize` vouches only
    for trained plans: a seed heavier than a trial beyond the limit is trained; a drawn plan is not."""
    built = tiny["search"]
    study = stores.open_study("seeds", f"sqlite:///{tmp_path / 's.db'}", True, search.make_sampler(built.config, 0),
                              LadderPruner())
    search.record(study, built)

    def params(rate: float) -> dict[str, Any]:
        return built.space.uniform_params(SparsityType.FILTER, rate)

    light = built.space.suggest(optuna.trial.FixedTrial(params(0.3))).to_dict()["layers"]
    study.add_trial(_done(0, light, 1.1, False, drop=30.0))
    study.enqueue_trial(params(0.5), user_attrs={"seeded": "weight norms at rate 0.5"})
    study.enqueue_trial(params(0.7))
    search.run(built, study, search.Budget(trials=3), baselines=False)
    seed, drawn = study.trials[1:3]
    assert seed.state == TrialState.COMPLETE and "rejected" not in seed.user_attrs and "acc_drop" in seed.user_attrs
    assert drawn.state == TrialState.PRUNED and drawn.user_attrs["rejected"].startswith("hopeless: trial 0")


def _get(app: Any, path: str) -> Any:
    """GET `path` from a WSGI app, as JSON (the dashboard's own API, without a server)."""
    import io
    import json
    from wsgiref.util import setup_testing_defaults

    environ: dict[str, Any] = {"PATH_INFO": path.split("?")[0], "QUERY_STRING": path.partition("?")[2]}
    setup_testing_defaults(environ)
    environ["wsgi.input"] = io.BytesIO()
    status: list[str] = []
    body = b"".join(app(environ, lambda s, _headers, _exc=None: status.append(s)))
    assert status[0].startswith("200"), (path, status, body[:300])
    return json.loads(body)


def test_a_study_opens_in_optunas_own_tools(tiny: dict) -> None:
    """Plain `optuna.load_study`, its Pareto plot, and optuna-dashboard's API read a
    study written by the search: named objectives, JSON user attrs, the constraint visible."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    study = optuna.load_study(study_name="tiny", storage=tiny["storage"])
    assert study.metric_names == ["val_acc", "predicted_speedup"]
    ax = optuna.visualization.matplotlib.plot_pareto_front(study)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("val_acc", "predicted_speedup")
    json.dumps(study.user_attrs, allow_nan=False)
    for t in study.trials:
        json.dumps(t.user_attrs, allow_nan=False)
    trained = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert all("constraints:accuracy_drop" in t.system_attrs for t in trained), "the constraint is Optuna's own"
    dashboard = pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (make setup does)")
    app = dashboard.wsgi(tiny["storage"])
    listed = {s["study_name"]: s for s in _get(app, "/api/studies")["study_summaries"]}
    detail = _get(app, f"/api/studies/{listed['tiny']['study_id']}")
    assert detail["objective_names"] == ["val_acc", "predicted_speedup"]
    assert len(detail["trials"]) == len(study.trials)


def test_the_space_offers_a_layer_local_type_only_where_it_is_predicted_and_timed_faster_than_dense(tiny: dict) -> None:
    from sparsesearch.profiler import dense_latency, predict_latency
    from sparsesearch.profiler.table import Signature

    built = tiny["search"]
    dense = dense_latency(built.latency, built.model, built.input_shape).layers_ms
    pruned = predict_latency(built.latency, built.model, built.input_shape,
                             Plan.uniform(built.layers, SparsityType.SHAPE, 0.9)).layers_ms
    unpaid = built.latency.profile.unpaid()  # timed no faster than dense at the highest rate
    timed_slower = {layer.name for layer in built.layers
                    if (Signature.of(built.model.get_submodule(layer.name), layer.in_shape).key, "shape") in unpaid}
    offered = {n: set(slot.types) for slot in built.space.slots for n in slot.layers}
    for name, ms in pruned.items():
        faster = ms < dense[name] and name not in timed_slower
        assert (SparsityType.SHAPE in offered.get(name, set())) == faster, (name, ms, dense[name])
        assert (SparsityType.SHAPE in built.withheld.get(name, set())) == (not faster)


def test_a_withheld_type_is_not_offered_and_a_layer_left_without_one_is_not_a_slot() -> None:
    space, (layers, _) = _space("digits-cnn", (1, 8, 8))
    first, last = layers[0].name, layers[-1].name
    withheld = {first: {SparsityType.SHAPE}, last: set(SparsityType)}
    narrowed = Space(layers, [], ("filter", "shape"), {}, withheld=withheld)
    assert [t for s in narrowed.slots if s.name == first for t in s.types] == [SparsityType.FILTER]
    assert last not in {s.name for s in narrowed.slots} and last in {s.name for s in space.slots}


def test_a_study_resumed_where_the_profile_withholds_other_types_keeps_the_space_it_started_with(
        tiny: dict, tmp_path: Path) -> None:
    """Another machine, or the profile timed anew, may find other layers where a type buys no time;
    the study's parameters keep their choices (Optuna refuses a categorical whose choices changed)."""
    recorded = tiny["study"].user_attrs[search.WITHHELD]
    here = copy.copy(tiny["search"])
    here.offer({} if any(recorded.values()) else {layer.name: {SparsityType.SHAPE} for layer in here.layers})
    storage = f"sqlite:///{tmp_path / 'moved.db'}"
    optuna.copy_study(from_study_name="tiny", from_storage=tiny["storage"], to_storage=storage)
    trained = len(search.trained_trials(tiny["study"]))
    study = stores.open_study("tiny", storage, True, search.make_sampler(here.config, trained), LadderPruner())
    search.record(study, here)
    assert {name: sorted(k.value for k in kinds) for name, kinds in here.withheld.items()} == recorded
    assert search.run(here, study, search.Budget(trials=trained + 1)).trained == 1
    # a study from before the record: its trials' choices say what it withheld
    legacy, elsewhere = optuna.create_study(directions=study.directions), copy.copy(tiny["search"])
    for key in ("dense", "config"):
        legacy.set_user_attr(key, study.user_attrs[key])
    legacy.add_trials(tiny["study"].get_trials(False))
    elsewhere.offer({layer.name: {SparsityType.SHAPE} for layer in here.layers})
    search.record(legacy, elsewhere)
    assert {name: kinds for name, kinds in elsewhere.withheld.items() if kinds} == tiny["search"].withheld


def test_a_study_aligns_to_the_step_it_started_with(tiny: dict, tmp_path: Path) -> None:
    """Counts keep whole blocks of the device's channel step, read from the profile when the study
    starts and recorded with it: resumed where the profile's step differs (another machine, a scan
    anew), a trial's parameters still mean the plan they meant; a study from before the record
    stays unaligned, as its trials were."""
    built = tiny["search"]
    recorded = tiny["study"].user_attrs[search.STEPS]
    assert recorded == built.steps == {side: int(built.latency.profile.steps.get(side, 1)) for side in ("out", "in")}
    assert built.space.steps["out"] == recorded["out"]
    here = copy.copy(built)
    here.steps = {"out": 1 if recorded["out"] > 1 else 16, "in": 1}
    here.offer(built.withheld)
    storage = f"sqlite:///{tmp_path / 'moved.db'}"
    optuna.copy_study(from_study_name="tiny", from_storage=tiny["storage"], to_storage=storage)
    search.record(stores.open_study("tiny", storage, False, None, LadderPruner()), here)
    assert here.steps == recorded and here.space.steps["out"] == recorded["out"]
    legacy, elsewhere = optuna.create_study(directions=tiny["study"].directions), copy.copy(built)
    for key in ("dense", "config"):
        legacy.set_user_attr(key, tiny["study"].user_attrs[key])
    elsewhere.steps = {"out": 16, "in": 1}
    search.record(legacy, elsewhere)
    assert set(elsewhere.space.steps.values()) == {1}


def test_types_the_profile_never_timed_on_the_network_are_not_searched(tiny: dict, tmp_path: Path) -> None:
    """A profile made with fewer --types has no rows of the others' kernels: the regressor would guess
    their latency from other kernels, so they are not offered; a study that offers them is refused."""
    built = tiny["search"]
    wider = dataclasses.replace(built, config=dataclasses.replace(built.config, types=("filter", "shape", "irregular")))
    assert wider.unprofiled == {SparsityType.IRREGULAR}
    assert all(SparsityType.IRREGULAR not in slot.types for slot in wider.space.slots)
    others = {name: kinds - {SparsityType.IRREGULAR} for name, kinds in wider.withheld.items()}
    assert {name: kinds for name, kinds in others.items() if kinds} == built.withheld  # the rest as before
    with pytest.raises(UserError, match="has timed none of irregular.*--types irregular"):
        dataclasses.replace(built, config=dataclasses.replace(built.config, types=("irregular",)))
    narrower = copy.copy(built)
    narrower.latency = copy.deepcopy(built.latency)
    narrower.latency.network(built.model, built.input_shape)["grid"]["types"] = ["filter"]
    storage = f"sqlite:///{tmp_path / 'narrower.db'}"
    optuna.copy_study(from_study_name="tiny", from_storage=tiny["storage"], to_storage=storage)
    # a study whose space offers shape: the tiny one's may withhold it, as its profile's timings fall
    offering = stores.open_study("tiny", storage, True, None, LadderPruner())
    offering.set_user_attr(search.WITHHELD, {})
    with pytest.raises(UserError, match="searches shape, which the latency profile .* has not timed"):
        search.record(offering, narrower)


def test_a_study_promotes_full_runs_between_its_trials_and_judges_the_next_at_the_limit_they_support(
        tiny: dict, tmp_path: Path) -> None:
    """`run` with a promotion: once the uniform ladder's first rates trained, the bisection's plan is
    retrained at the full budget between two trials, recorded as finalize's, and every later trial
    is judged at the limit those runs support; the trial budget is still met."""
    built = tiny["search"]
    study = stores.open_study("promoted", f"sqlite:///{tmp_path / 'p.db'}", True,
                              search.make_sampler(built.config, 0), LadderPruner())
    search.record(study, built)
    waiting: list[int] = []

    def on_done(trial: int, result: object) -> None:
        first = {label for label, _ in built.baselines()}
        waiting.append(sum(t.user_attrs.get("baseline") in first
                           for t in study.get_trials(False, states=(TrialState.WAITING,))))

    limit = built.config.max_acc_drop
    promotion = finalizing.Promotion(built, limit, (0.0, 0.5), tmp_path / "export", share=0.9, cost_s=0.0,
                                     on_done=on_done)
    ran = search.run(built, study, search.Budget(trials=16), promote=promotion)
    runs = [r for r in report.exported(study) if r["epochs"] == "0+0.5"]
    assert ran.stopped == "budget" and len(search.trained_trials(study)) == 16
    assert ran.promoted == promotion.runs == len(runs) >= 1 and waiting == [0] * ran.promoted
    now = finalizing.state(study, limit, "0+0.5")  # how many ran, and when, follows the pace: any count holds
    assert set(now.retrained) == {r["trial"] for r in runs} & set(now.front), "finalize goes on from them"
    assert set(study.user_attrs[report.FINALIZED]["retrained"]) <= {r["trial"] for r in runs}
    last = max(search.trained_trials(study), key=lambda t: t.number)
    assert last.user_attrs["trial_limit"] == search.trial_limit(study, limit)
    assert all((tmp_path / "export" / f"trial-{r['trial']}-0+0.5" / "metrics.json").is_file() for r in runs)


def test_the_sampler_sees_every_plan_within_the_trial_limit_as_accurate_as_its_edge(tmp_path: Path) -> None:
    """Within the limit accuracy buys the user nothing: TPE ranks feasible plans by speed alone,
    while the study keeps each trial's own accuracy for its front and report."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}", directions=["maximize", "maximize"])
    for val, drop, speed in ((93.0, 0.5, 1.2), (92.0, 1.5, 1.6), (90.0, 3.5, 2.0)):  # the reference: 93.5
        study.add_trial(optuna.trial.create_trial(values=[val, speed], user_attrs={"acc_drop": drop},
                                                  system_attrs={search.CONSTRAINT: drop - 0.5}))
    seen = search.AtTrialLimit(study, 2.0).get_trials()
    assert [t.values for t in seen] == [[91.5, 1.2], [91.5, 1.6], [90.0, 2.0]]
    assert [t.constraints["accuracy_drop"] for t in seen] == [-1.5, -0.5, 1.5]
    assert [t.values[0] for t in study.get_trials()] == [93.0, 92.0, 90.0], "the study's own, untouched"


def test_full_runs_that_passed_heavy_trials_let_the_study_judge_its_trials_at_their_drop(tiny: dict,
                                                                                          tmp_path: Path) -> None:
    """A plan that lost 30 points in its trial came within the limit fully trained (finalize): the
    next trials are promising up to 30 points, for the sampler's constraint, the rejection rules and
    the front (which keeps their weights to measure them), while `feasible` still says whether a
    trial met the user's limit itself."""
    built = dataclasses.replace(tiny["search"], config=dataclasses.replace(tiny["search"].config, max_acc_drop=1.0))
    study = stores.open_study("calibrated", f"sqlite:///{tmp_path / 'c.db'}", True,
                              search.make_sampler(built.config, 0), LadderPruner())
    search.record(study, built)
    study.add_trial(optuna.trial.create_trial(values=[69.0, 9.0], user_attrs={"plan": {}, "acc_drop": 30.0},
                                              system_attrs={search.CONSTRAINT: 30.0 - built.config.max_acc_drop}))
    assert not study.sampler._seen(study).get_trials()[0].constraints["accuracy_drop"] <= 0, "judged at the limit"
    study.set_user_attr(report.export_key(study, 0, "4+2"), {"val_drop": 0.1, "val_drop_se": 0.1, "test_drop": 0.2,
                                                            "speedup": 8.0, "epochs": "4+2"})
    study.enqueue_trial(built.space.uniform_params(SparsityType.FILTER, 0.5))
    search.run(built, study, search.Budget(trials=2), baselines=False)
    (trial,) = [t for t in search.trained_trials(study) if t.number > 0]
    drop = trial.user_attrs["acc_drop"]
    assert trial.user_attrs["trial_limit"] == 30.0
    assert trial.constraints == {"accuracy_drop": pytest.approx(drop - 30.0)}
    seen = study.sampler._seen(study).get_trials()  # TPE judges the trial from before the raise anew too
    assert seen[0].constraints == {"accuracy_drop": 0.0} and study.trials[0].constraints["accuracy_drop"] > 0
    assert seen[trial.number].constraints == trial.constraints
    assert 1.0 < drop <= 30.0 and not trial.user_attrs["feasible"], "beyond the user's limit, within the trial limit"
    assert "weights" in trial.user_attrs and trial.number in [t.number for t in report.front(study)]
    assert f"trials judged promising within 30.00 points, not {built.config.max_acc_drop:g}:" in report.markdown(study)


def test_a_trial_trailing_faster_plans_stops_at_the_first_rung_of_the_ladder(tiny: dict, tmp_path: Path) -> None:
    built = tiny["search"]
    study = stores.open_study("ladder", f"sqlite:///{tmp_path / 'l.db'}", True, search.make_sampler(built.config, 0),
                              LadderPruner())
    search.record(study, built)
    for _ in range(3):  # faster plans, perfect at every rung
        study.add_trial(_on_ladder([100.0, 100.0], 50.0))
    study.enqueue_trial(built.space.uniform_params(SparsityType.FILTER, 0.3))
    search.run(built, study, search.Budget(trials=4), baselines=False)
    (trial,) = [t for t in study.get_trials(False) if "plan" in t.user_attrs]
    assert trial.state == TrialState.PRUNED and "stopped at" in trial.user_attrs["pruned"]
    (rung,) = trial.user_attrs["rungs"]
    assert rung["step"] < rung["of"] / 3 and trial.user_attrs["train_seconds"] > 0, "it paid for 1/9 of its training"
    assert "val_acc" not in trial.user_attrs and "weights" not in trial.user_attrs
    assert [c["projected_acc"] is not None for c in trial.user_attrs["admm"]][-1:] == [True], \
        "the projection is evaluated at the rung"
    assert sum(c["projected_acc"] is not None for c in trial.user_attrs["admm"]) == 1, "and nowhere else"


class _Untouchable:
    """A test split the search must never read."""

    def __len__(self) -> int:
        return 100

    def batches(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the search evaluated the test split")


def test_a_trial_trains_on_its_share_of_the_training_split_and_never_sees_the_test_split(
        tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny["search"]
    quarter = dataclasses.replace(base, config=dataclasses.replace(base.config, trial_data=0.25),
                                  data=dataclasses.replace(base.data, test=_Untouchable()))
    trained_on = []
    real = search.run_admm

    def spy(model, data, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        trained_on.append(len(data.train))
        return real(model, data, *args, **kwargs)

    monkeypatch.setattr(search, "run_admm", spy)
    study = stores.open_study("quarter", f"sqlite:///{tmp_path / 'q.db'}", True, search.make_sampler(quarter.config, 0),
                              LadderPruner())
    search.record(study, quarter)
    search.run(quarter, study, search.Budget(trials=1))
    (trial,) = search.trained_trials(study)
    assert trained_on == [round(0.25 * len(base.data.train))] * 2 == [len(quarter.trial_data.train)] * 2  # control, trial
    assert trial.state == TrialState.COMPLETE and "test_acc" not in trial.user_attrs
    assert trial.user_attrs["acc_drop_se"] > 0 and 0 <= trial.user_attrs["feasible_confidence"] <= 1
    cost = search.trial_cost(quarter)
    full = search.trial_cost(base)
    assert cost.steps == quarter.config.admm().steps(len(quarter.trial_data.train)) < full.steps
    assert len(base.data.val) < cost.images <= full.images and cost.seconds > 0  # the whole validation split, always
    retrained = search.full_run_cost(base, 2.0, 1.0)  # `finalize`'s runs: the whole split, tested, no rungs
    assert retrained.steps == base.config.admm(2.0, 1.0).steps(len(base.data.train)) > full.steps
    assert retrained.images == len(base.data.val) + 3 * len(base.data.test) and retrained.seconds > cost.seconds


def test_a_channels_last_search_takes_only_a_channels_last_profile_and_measures_in_that_layout(
        tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`optimize --channels-last`: the profile must have been measured channels-last (a contiguous
    one is refused, saying why), the command that extends it says so, and the front is measured
    channels-last, recorded as such (so a contiguous measurement is not reused for it)."""
    from dataclasses import replace

    from helpers import with_fingerprint
    from sparsesearch import compact

    config = replace(tiny["search"].config, layout="channels-last")
    with pytest.raises(UserError, match="layout: contiguous \\(profile\\) != channels-last \\(here\\)"):
        search.build(config, torch.device("cpu"), str(tmp_path / "a"), profile=tiny["root"] / "profile.json")
    profile = with_fingerprint(tiny["root"] / "profile.json", tmp_path / "cl.json", layout="channels-last")
    built = search.build(config, torch.device("cpu"), str(tiny["root"] / "artifacts"), profile=profile)
    assert "--channels-last" in built.profile_command
    asked, real = [], compact.measure
    monkeypatch.setattr(compact, "measure", lambda *args: asked.append(args[-1]) or real(*args))
    measured = report.measure_front(built, tiny["study"])
    assert measured and asked and all(asked)  # every plan measured again, channels-last
    assert tiny["study"].user_attrs["measured_setting"]["layout"] == "channels-last"
