"""The profiler: latency table, resumable profiling, fingerprints, the latency model, validation.

Timings on a shared CPU are noise, so nothing here asserts a time: the tests defend what is timed
(the layer compact() builds), how rows are kept, and the latency model's shape.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sparsesearch.admm import apply_masks, prune_masks
from sparsesearch.cli import app
from helpers import with_fingerprint
from sparsesearch.compact import compact
from sparsesearch.graph import dependencies
from sparsesearch.errors import UserError
from sparsesearch.layers import trace
from sparsesearch.profiler import build, measure, predictor, table
from sparsesearch.profiler.timing import compare
from sparsesearch.plan import Plan
from sparsesearch.space import BASELINE_RATES
from sparsesearch.profiler.validate import filter_groups, random_plan, uniform_ladder
from sparsesearch.sparsity import SparsityType, keep_count

FAST = {"rounds": 3, "warmup_s": 0.0, "min_round_s": 0.001, "max_spread": None, "max_rounds": 3}
RATES = (0.0, 0.5)
TYPES = ("filter", "channel", "shape")
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, two spinning threads crawl (timings are not
    asserted, but they should not take minutes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> measure.Target:
    return measure.target("digits-cnn")


PROGRESS: list[tuple[int, int, str]] = []  # what small_profile's progress callback heard


@pytest.fixture(scope="module")
def small_profile(digits: measure.Target, tmp_path_factory: pytest.TempPathFactory) -> measure.ProfileRun:
    """digits-cnn on a two-rate grid, timed with a minimal harness setting."""
    path = tmp_path_factory.mktemp("profile") / "p.json"
    return measure.profile_model(digits, CPU, 1, "float32", RATES, TYPES, path, timing=FAST,
                                 on_progress=lambda *heard: PROGRESS.append(heard))


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


# --- the table --------------------------------------------------------------------------------------


def test_table_round_trips_through_json(small_profile: measure.ProfileRun) -> None:
    loaded = table.Profile.load(small_profile.path)
    assert loaded.rows == small_profile.profile.rows
    assert loaded.rest == small_profile.profile.rest
    assert loaded.fingerprint == small_profile.profile.fingerprint
    raw = json.loads(small_profile.path.read_text())
    assert raw["schema"] == table.SCHEMA
    assert {"device_name", "threads", "batch_size", "dtype", "torch", "cuda", "date"} <= set(raw["fingerprint"])
    row = raw["rows"][0]
    assert {"kind", "in_channels", "out_channels", "kernel", "stride", "padding", "groups", "input_hw"} <= set(row["signature"])
    assert {"type", "rate", "in_keep", "out_keep", "impl", "macs", "median_ms", "spread"} <= set(row)


def test_the_profile_says_which_layer_local_types_pay_on_its_device(small_profile: measure.ProfileRun) -> None:
    """A type that never beats the dense layer (CSR on a CPU) is compression only there, and the
    profile says so; where a type does run faster, it says on how many layer shapes."""
    import dataclasses

    assert json.loads(small_profile.path.read_text())["verdicts"].keys() == {"shape"}  # the one layer-local type profiled
    profile = table.Profile.load(small_profile.path)
    dense = {r.signature.key: r.median_ms for r in profile.rows.values()
             if r.type == "plain" and (r.in_keep, r.out_keep) == (r.signature.in_channels, r.signature.out_channels)}
    shapes = sorted({r.signature.key for r in profile.rows.values() if r.type == "shape"})
    rows = {k: r for k, r in profile.rows.items() if r.type == "shape"}

    def timed(factor: Callable[[table.Row], float]) -> str:
        for key, row in rows.items():
            profile.rows[key] = dataclasses.replace(row, median_ms=dense[row.signature.key] * factor(row))
        return profile.verdicts()["shape"]

    assert timed(lambda r: 0.5 if r.signature.key == shapes[0] else 2.0).startswith(
        f"1.1x faster than the dense layer on 1 of {len(shapes)} layer shapes (best 2.00x")
    assert timed(lambda r: 1 / 1.05).startswith("never 1.1x faster than the dense layer (best 1.05x")  # noise, not a gain
    assert "compression only on this device" in profile.verdicts()["shape"]
    full = next(r for r in rows.values() if r.in_keep == r.signature.in_channels)
    half = dataclasses.replace(full, in_keep=full.in_keep // 2)  # half the inputs kept: their removal, not the pattern
    profile.add(half)
    rows[half.key] = half
    assert timed(lambda r: 0.4 if r.in_keep < r.signature.in_channels else 1.0).startswith("never 1.1x faster")


def test_rows_are_keyed_by_signature_not_model(small_profile: measure.ProfileRun, digits: measure.Target) -> None:
    names = [layer.name for layer in trace(digits.model, digits.input_shape)]
    text = small_profile.path.read_text()
    assert all(f'"{n}"' not in text for n in names if not n.isdigit())
    assert all("model" not in r for r in _rows(small_profile.path))
    assert [v["model"] for v in small_profile.profile.rest.values()] == ["digits-cnn"]


def test_rerun_adds_only_missing_rows(small_profile: measure.ProfileRun, digits: measure.Target, tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    raw = json.loads(small_profile.path.read_text())
    # as if five pruned plain convs had not been measured: not a dense row, nor a pattern's, whose
    # timing decides by the clock whether the pattern is timed at lower rates (the run measured 3)
    pruned = [i for i, r in enumerate(raw["rows"]) if r["type"] == "plain"
              and (r["in_keep"], r["out_keep"]) != (r["signature"]["in_channels"], r["signature"]["out_channels"])][:5]
    raw["rows"] = [r for i, r in enumerate(raw["rows"]) if i not in pruned]
    path.write_text(json.dumps(raw))
    run = measure.profile_model(digits, CPU, 1, "float32", RATES, TYPES, path, timing=FAST)
    assert (run.measured, run.reused) == (5, len(small_profile.profile.rows) - 5)
    again = measure.profile_model(digits, CPU, 1, "float32", RATES, TYPES, path, timing=FAST)
    assert again.measured == 0
    assert len(_rows(path)) == len(small_profile.profile.rows)


@pytest.mark.parametrize("older", ["fewer plans", "other plans"])
def test_rerun_recalibrates_a_network_timed_on_an_older_version_s_calibration_plans(
        small_profile: measure.ProfileRun, digits: measure.Target, tmp_path: Path, older: str) -> None:
    path = tmp_path / "p.json"
    raw = json.loads(small_profile.path.read_text())
    entry = next(iter(raw["rest"].values()))
    if older == "fewer plans":
        entry["calibration"] = entry["calibration"][:16]
    else:  # as before the uniform ladder and the near-dense plans were drawn
        entry["calibration"] = entry["calibration"][::-1]
    path.write_text(json.dumps(raw))
    run = measure.profile_model(digits, CPU, 1, "float32", RATES, TYPES, path, timing=FAST)
    assert run.measured == 0 and len(run.rest["calibration"]) == measure.CALIBRATION_PLANS
    timed = path.read_text()
    measure.profile_model(digits, CPU, 1, "float32", RATES, TYPES, path, timing=FAST)
    assert json.loads(path.read_text())["rest"] == json.loads(timed)["rest"]  # complete now: not timed again


def test_a_rerun_times_anew_the_rows_of_a_changed_kernel_and_the_networks_calibrated_on_them(
        small_profile: measure.ProfileRun, digits: measure.Target, tmp_path: Path) -> None:
    """A profile whose shape rows ran an older reduced-gemm (1.3-2x slower than today's) says so,
    and the next `profile` run times exactly those rows and the whole network again."""
    from sparsesearch.kernels import KERNEL_VERSIONS

    path = tmp_path / "p.json"
    raw = json.loads(small_profile.path.read_text())
    assert raw["kernels"] == KERNEL_VERSIONS
    raw["kernels"] = {**KERNEL_VERSIONS, "reduced-gemm": 1}  # as a profile made before the flat-index im2col
    (entry,) = raw["rest"].values()
    raw["rest"]["another"] = {**entry, "model": "lenet5", "input_shape": [1, 28, 28]}  # calibrated on it too
    path.write_text(json.dumps(raw))
    assert table.Profile.load(path).stale() == ["reduced-gemm"]
    old = [r for r in raw["rows"] if r["impl"] == "reduced-gemm"]
    run = measure.profile_model(digits, CPU, 1, "float32", RATES, TYPES, path, timing=FAST)
    rows = json.loads(path.read_text())["rows"]
    new = [r for r in rows if r["impl"] == "reduced-gemm"]
    assert old and run.refreshed == ["reduced-gemm"] and 0 < run.measured == len(new)
    assert run.dropped == ["lenet5 (1x28x28)"] and "another" not in json.loads(path.read_text())["rest"]
    assert len(rows) == len(raw["rows"]) - len(old) + len(new), "only the changed kernel's rows were timed again"
    assert len(run.rest["calibration"]) == measure.CALIBRATION_PLANS
    assert run.rest["calibration"] != entry["calibration"]  # timed again
    assert table.Profile.load(path).stale() == [] and json.loads(path.read_text())["kernels"] == KERNEL_VERSIONS


def test_interrupted_run_resumes_where_it_stopped(digits: measure.Target, tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    seen = []

    def interrupt(done: int, total: int, status: str) -> None:
        seen.append(done)
        if done > 0 and "yardstick" not in status:  # a layer batch was timed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure.profile_model(digits, CPU, 1, "float32", (0.0,), ("filter",), path, interrupt, timing=FAST)
    kept = len(_rows(path))  # the batch before the interruption was saved, atomically
    assert 0 < kept
    run = measure.profile_model(digits, CPU, 1, "float32", (0.0,), ("filter",), path, timing=FAST)
    assert run.reused == kept and run.measured + kept == len(_rows(path))
    assert not list(tmp_path.glob(".*.tmp"))


# --- fingerprints --------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("device_name", "Some Other CPU"), ("batch_size", 32), ("dtype", "float16"),
                                         ("threads", 64)])
def test_profile_from_another_setting_is_refused_unless_allowed(small_profile: measure.ProfileRun, tmp_path: Path,
                                                                field: str, value: object) -> None:
    foreign = with_fingerprint(small_profile.path, tmp_path / "foreign.json", **{field: value})
    with pytest.raises(UserError, match=f"{field}.*--allow-foreign-profile"):
        table.load_profile(foreign, CPU, 1, "float32")
    assert table.load_profile(foreign, CPU, 1, "float32", allow_foreign=True).rows


def test_profiling_into_a_foreign_profile_is_refused(small_profile: measure.ProfileRun, digits: measure.Target,
                                                     tmp_path: Path) -> None:
    foreign = with_fingerprint(small_profile.path, tmp_path / "foreign.json", device_name="Some Other CPU")
    with pytest.raises(UserError, match="another setting"):
        measure.profile_model(digits, CPU, 1, "float32", RATES, TYPES, foreign, timing=FAST)


def test_find_profile_locates_the_matching_file(small_profile: measure.ProfileRun, tmp_path: Path) -> None:
    here = table.fingerprint(CPU, 1, "float32")
    assert table.find_profile(here, tmp_path) is None
    with_fingerprint(small_profile.path, tmp_path / "renamed.json")
    assert table.find_profile(here, tmp_path) == tmp_path / "renamed.json"
    key = next(iter(small_profile.profile.rest))
    assert table.find_profile(here, tmp_path, network=key) == tmp_path / "renamed.json"
    assert table.find_profile(here, tmp_path, network="a network never profiled") is None
    assert table.find_profile(table.fingerprint(CPU, 32, "float32"), tmp_path) is None
    assert table.profile_name(here).endswith("-b1-float32.json")


def test_profiles_follow_the_working_directory_and_the_shipped_ones_are_never_written(
        small_profile: measure.ProfileRun, digits: measure.Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = table.fingerprint(CPU, 1, "float32")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    with_fingerprint(small_profile.path, shipped / table.profile_name(here))
    before = (shipped / table.profile_name(here)).read_bytes()
    monkeypatch.setattr(table, "SHIPPED_PROFILES", shipped)
    monkeypatch.setattr(measure, "SHIPPED_PROFILES", shipped)
    monkeypatch.chdir(tmp_path)
    assert table.find_profile(here) == shipped / table.profile_name(here)  # read where nothing is local
    run = measure.profile_model(digits, CPU, 1, "float32", RATES, (*TYPES, "irregular"), timing=FAST)
    assert run.path == Path("hardware_profiles") / table.profile_name(here)
    assert run.reused > 0 and run.measured > 0  # the shipped rows are not timed again; the new ones are added
    assert (shipped / table.profile_name(here)).read_bytes() == before
    assert table.find_profile(here) == run.path  # the working directory's copy comes first now


_PROFILE_ONE = """
import sys, torch
from pathlib import Path
from sparsesearch.profiler import measure
torch.set_num_threads(1)
target = measure.target(sys.argv[1])
measure.profile_model(target, torch.device("cpu"), 1, "float32", (0.0, 0.5), ("filter",), Path(sys.argv[-1]),
                      timing={"rounds": 3, "warmup_s": 0.0, "min_round_s": 0.001, "max_spread": None, "max_rounds": 3})
"""


def test_two_runs_writing_one_profile_at_once_keep_each_others_rows(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "shared.json"
    runs = [subprocess.Popen([sys.executable, "-c", _PROFILE_ONE, *args, str(path)], stderr=subprocess.PIPE, text=True)
            for args in (["digits-cnn"], ["lenet5"])]
    assert [r.wait(timeout=600) for r in runs] == [0, 0], [r.stderr.read() for r in runs]
    profile = table.Profile.load(path)
    assert sorted(r["model"] for r in profile.rest.values()) == ["digits-cnn", "lenet5"]
    layers = {r.signature.key.split(" @")[0] for r in profile.rows.values()}
    assert any(k.startswith("conv 1>32") for k in layers) and any(k.startswith("conv 3>6") for k in layers)


# --- the grid and the builder ----------------------------------------------------------------------


def test_grid_takes_kept_inputs_from_the_producers_filters(digits: measure.Target) -> None:
    points, _ = measure.grid(digits, RATES, ["filter"])
    first_linear = {p.in_keep for p in points if p.signature.kind == "linear" and p.signature.in_channels == 512}
    assert first_linear == {512, 4 * keep_count(128, 0.5)}  # 128 filters, each 2x2 positions after flatten


def _builder_args(compacted: nn.Module, name: str, impl: str | None, spec, seen: tuple[int, int]) -> tuple:
    module = compacted.get_submodule(name)
    if type(module) in (nn.Conv2d, nn.Linear):
        kind = {"filters-removed": "filter", "channels-removed": "channel-removed"}.get(impl or "", build.PLAIN)
        dims = measure._channels(module)
        return kind, 0.0, *dims
    return spec.type.value, spec.rate, *seen, build._groups(module)


@pytest.mark.parametrize("model_name,shape", [("digits-cnn", (1, 8, 8)), ("resnet20", (3, 32, 32))])
@pytest.mark.parametrize("seed", [0, 1])
def test_builder_makes_the_layer_compact_makes(model_name: str, shape: tuple, seed: int) -> None:
    """The profiled module of each layer has compact()'s class, impl and weight shapes (exact where
    the pattern is projected on the same dims; a pattern projected before a neighbour removed
    channels keeps about, not exactly, the same weights; an irregular layer keeps exactly as many
    weights, but how many im2col rows they touch depends on where they fall)."""
    from sparsesearch import models

    torch.manual_seed(seed)
    model = models.create(model_name, in_channels=shape[0]).eval()
    deps = dependencies(model, shape)
    layers = trace(model, shape)
    plan = random_plan(layers, deps.couplings, random.Random(seed))
    apply_masks(model, prune_masks(model, plan, deps))
    result = compact(model, plan, shape)
    seen = predictor._seen_channels(result.model, [layer.name for layer in layers], shape)
    for layer in layers:
        real = result.model.get_submodule(layer.name)
        original = model.get_submodule(layer.name)
        kind, rate, in_keep, out_keep, groups = _builder_args(result.model, layer.name, result.impl.get(layer.name),
                                                              plan.layers.get(layer.name), seen[layer.name])
        built, impl = build.build_layer(original, kind, rate, in_keep, out_keep, groups)
        assert type(built) is type(real), layer.name
        assert impl == result.impl.get(layer.name, "dense"), layer.name
        shapes = {k: tuple(v.shape) for k, v in built.state_dict().items()}
        expected = {k: tuple(v.shape) for k, v in real.state_dict().items()}
        assert shapes.keys() == expected.keys(), layer.name
        same_dims = measure._channels(original)[:2] == (in_keep, out_keep)
        if kind == "irregular":  # which im2col rows some weight reads depends on where the zeros fall
            for key in ("im2col.channels", "im2col.rows", "im2col.cols"):
                shapes.pop(key, None), expected.pop(key, None)
        if kind in (build.PLAIN, "filter", "channel-removed") or same_dims:
            assert shapes == expected, layer.name


def test_validation_draws_plans_that_remove_residual_branches_as_the_search_does() -> None:
    """`profile validate` must check the plans the search offers, removed blocks among them: a
    resnet's inner convs are the removable groups (its streams are not), some random plans remove
    some of them and no others while some remove none, compaction drops those branches, and without
    removable groups the same seed draws what it drew before (the profile's calibration plans)."""
    from sparsesearch import models
    from sparsesearch.compact import BRANCH_REMOVED, pruned, removable
    from sparsesearch.profiler.validate import filter_groups
    from sparsesearch.sparsity import REMOVED

    model = models.create("resnet20", in_channels=1).eval()
    shape = (1, 16, 16)
    deps, layers = dependencies(model, shape), trace(model, shape)
    groups = filter_groups(layers, deps.couplings)
    assert all(g in groups for g in map(tuple, deps.couplings))
    branches = removable(model, shape, deps, groups)
    assert branches == [(f"layer{s}.{b}.conv1",) for s in (1, 2, 3) for b in range(3)]
    plans = [random_plan(layers, deps.couplings, random.Random(seed), removable=branches) for seed in range(8)]
    removed = [{n for n, spec in p.layers.items() if spec.rate == REMOVED} for p in plans]
    assert all(names <= {g[0] for g in branches} for names in removed) and any(removed) and not all(removed)
    plan = plans[max(range(len(plans)), key=lambda i: len(removed[i]))]
    impl = pruned(model, plan, shape, deps)[1].impl
    gone = {n for n, kind in impl.items() if kind == BRANCH_REMOVED}  # with the convs inside those branches
    most = max(removed, key=len)
    assert most <= gone and {n.rsplit(".", 1)[0] for n in gone} == {n.rsplit(".", 1)[0] for n in most}
    for seed in range(6):
        without = random_plan(layers, deps.couplings, random.Random(seed))
        assert all(spec.rate < REMOVED for spec in without.layers.values())
        assert without == random_plan(layers, deps.couplings, random.Random(seed), removable=[])


def test_calibration_plans_remove_residual_branches_in_a_few_plans_and_leave_the_rest_as_drawn_before() -> None:
    """The latency model learns what a layer's call costs only from plans with fewer calls: a few
    calibration plans remove a fifth to four fifths of the branches; a network with none removable
    keeps the plans it had (so its profile is not timed again)."""
    from sparsesearch import models
    from sparsesearch.profiler.validate import residual_branches
    from sparsesearch.sparsity import REMOVED

    model = models.create("resnet20", in_channels=1).eval()
    shape = (1, 16, 16)
    deps, layers = dependencies(model, shape), trace(model, shape)
    branches = residual_branches(model, shape, deps, layers)
    assert len(branches) == 9 and residual_branches(model, shape, deps, layers, ["channel"]) == []
    args = (layers, deps.couplings, list(RATES), {"filter", "channel"})
    before = measure.calibration_plans(*args)
    deep = measure.calibration_plans(*args, removable=branches)
    assert before == measure.calibration_plans(*args, removable=[]) and len(deep) == len(before)
    removed = [sum(spec.rate == REMOVED for spec in plan.layers.values()) for plan in deep]
    assert sum(n > 0 for n in removed) == len(measure.DEEP_SHARES) and max(removed) >= 5
    kept = [plan for plan, n in zip(deep, removed) if not n]
    assert kept == before[:len(kept)], "the other plans as drawn before"


def test_table_row_describes_the_compacted_layer_it_stands_for(small_profile: measure.ProfileRun) -> None:
    """A row's description (family, kept dims, weights) is what the latency model reads off the
    compacted model's layer, so the row times the same computation."""
    from sparsesearch import models
    from sparsesearch.plan import LayerSparsity, Plan
    from sparsesearch.sparsity import SparsityType as T

    model = models.create("digits-cnn", in_channels=1).eval()
    shape = (1, 8, 8)
    plan = Plan({"0": LayerSparsity(T.FILTER, 0.5), "7": LayerSparsity(T.SHAPE, 0.5)})
    deps = dependencies(model, shape)
    apply_masks(model, prune_masks(model, plan, deps))
    found = predictor.queries(model, compact(model, plan, shape).model, shape)
    rows = {predictor.Query.of_row(r) for r in small_profile.profile.rows.values()}
    assert found["0"] in rows and found["0"].out_keep == 16 and found["0"].family == "plain"
    assert found["3"] in rows and found["3"].in_keep == 16 and found["3"].family == "plain"  # its producer's filters
    assert found["7"] in rows and found["7"].family == "reduced-gemm"


# --- the latency model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(small_profile: measure.ProfileRun) -> predictor.LatencyModel:
    return predictor.LatencyModel().fit(small_profile.profile)


def test_latency_model_reports_its_cross_validated_error(fitted: predictor.LatencyModel) -> None:
    assert {"mean_abs", "median_abs", "within_10", "rows"} <= set(fitted.cv_error)
    assert fitted.cv_error["rows"] == len(fitted.profile.rows)


@pytest.mark.parametrize("kind", ["filter", "channel"])
def test_latency_model_is_monotone_in_kept_dims(fitted: predictor.LatencyModel, kind: str) -> None:
    sig = next(r.signature for r in fitted.profile.rows.values() if r.signature.in_channels == 64)
    kernel = sig.kernel[0] * sig.kernel[1]

    def plain(i: int, o: int) -> predictor.Query:
        return predictor.Query(sig, build.PLAIN, i, o, 1, i * o * kernel)

    fixed = sig.out_channels if kind == "channel" else sig.in_channels
    grid = range(1, 129)
    queries = [plain(k, fixed) for k in range(1, 65)] if kind == "channel" else [plain(fixed, k) for k in grid]
    ms = fitted.predict(queries)
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    both = fitted.predict([plain(max(1, k // 2), k) for k in grid])
    assert all(a <= b for a, b in zip(both, both[1:]))


def test_prediction_is_the_in_network_fit_of_the_predicted_layers(fitted: predictor.LatencyModel,
                                                                  digits: measure.Target) -> None:
    from sparsesearch.plan import Plan
    from sparsesearch.sparsity import SparsityType as T

    fit = fitted.in_network(digits.model, digits.input_shape)
    assert fit.plans == measure.CALIBRATION_PLANS + 1 and fit.slope > 0  # the calibration plans and the dense net
    dense = predictor.dense_latency(fitted, digits.model, digits.input_shape)
    isolated = predictor.isolated_layers(fitted, digits.model, digits.model, digits.input_shape)
    assert dense.total_ms == pytest.approx(fit.offset + sum(map(fit.cost, isolated.values())))
    assert dense.total_ms == pytest.approx(dense.rest_ms + sum(dense.layers_ms.values()))
    pruned = predictor.predict_latency(fitted, digits.model, digits.input_shape,
                                       Plan.uniform(trace(digits.model, digits.input_shape), T.FILTER, 0.5))
    assert pruned.total_ms < dense.total_ms  # monotone: every kept dim shrank


@pytest.fixture(scope="module")
def on_fit(fitted: predictor.LatencyModel, digits: measure.Target) -> Callable[..., table.Profile]:
    """on_fit(offset, slope, per_mweight=0, per_moutput=0, per_minput=None, per_ms=None): a copy of
    the small profile whose end-to-end timings lie exactly on offset + slope x (layer sum) +
    per_ms[family] x (sum of the layers running it) + per_mweight x (millions of weights kept) +
    per_moutput x (millions of outputs) + per_minput[family] x (millions of inputs of the layers
    running it), for calibration plans of every profiled
    type (the profile's own leave out a type it timed slower than dense at its highest rate, which
    on a busy machine can be any). Each plan is compacted and its layers predicted once, by the
    module's fit of the same rows, for every test that asks for such a copy."""
    import copy

    rng = random.Random(0)
    layers_, couplings = trace(digits.model, digits.input_shape), dependencies(digits.model, digits.input_shape).couplings
    plans = [random_plan(layers_, couplings, rng, RATES, types=TYPES) for _ in range(measure.CALIBRATION_PLANS)]

    def isolated(compacted: nn.Module) -> list[predictor.Isolated]:
        return list(predictor.isolated_layers(fitted, digits.model, compacted, digits.input_shape).values())

    dense = isolated(digits.model)
    found = [isolated(predictor.compacted_copy(digits.model, digits.input_shape, plan)) for plan in plans]

    def make(offset: float, slope: float, per_mweight: float = 0.0, per_moutput: float = 0.0,
             per_minput: dict[str, float] | None = None, per_ms: dict[str, float] | None = None) -> table.Profile:
        def timed(layers: list[predictor.Isolated]) -> float:
            return offset + sum((slope + (per_ms or {}).get(f.family, 0.0)) * f.ms
                                + (per_mweight * f.weights + per_moutput * f.outputs
                                   + (per_minput or {}).get(f.family, 0.0) * f.inputs) / 1e6
                                for f in layers)

        profile = copy.deepcopy(fitted.profile)
        entry = next(iter(profile.rest.values()))
        entry["dense_ms"] = timed(dense)
        entry["calibration"] = [{"plan": plan.to_dict(), "spread": 0.0, "median_ms": timed(layers)}
                                for plan, layers in zip(plans, found)]
        return profile

    return make


def test_the_in_network_fit_reads_the_calibration_plans_as_described_without_compacting_them_again(
        small_profile: measure.ProfileRun, digits: measure.Target, monkeypatch: pytest.MonkeyPatch) -> None:
    import copy

    described = predictor.LatencyModel().fit(small_profile.profile).in_network(digits.model, digits.input_shape)
    older = copy.deepcopy(small_profile.profile)  # as profiled before plans were described: compacted again
    for sample in next(iter(older.rest.values()))["calibration"]:
        del sample["layers"]
    assert predictor.LatencyModel().fit(older).in_network(digits.model, digits.input_shape) == described
    monkeypatch.setattr(predictor, "compacted_copy", None)  # the described profile needs no compaction
    assert predictor.LatencyModel().fit(small_profile.profile).in_network(digits.model, digits.input_shape) == described
    broken = copy.deepcopy(small_profile.profile)
    next(iter(next(iter(broken.rest.values()))["calibration"][0]["layers"].values()))[1] = "sixteen"
    with pytest.raises(UserError, match="malformed layer description"):
        predictor.LatencyModel().fit(broken).in_network(digits.model, digits.input_shape)


def test_in_network_offset_and_slope_are_read_off_the_plans_timed_end_to_end(on_fit: Callable[..., table.Profile],
                                                                             digits: measure.Target) -> None:
    profile = on_fit(0.05, 1.4)
    fit = predictor.LatencyModel().fit(profile).in_network(digits.model, digits.input_shape)
    assert (fit.offset, fit.slope) == (pytest.approx(0.05, rel=1e-3), pytest.approx(1.4, rel=1e-3))
    assert (fit.per_mweight, fit.per_moutput) == (pytest.approx(0, abs=1e-3), pytest.approx(0, abs=1e-3))


def test_in_network_cost_of_weights_that_do_not_stay_in_cache_is_read_off_the_plans(
        on_fit: Callable[..., table.Profile], digits: measure.Target) -> None:
    profile = on_fit(0.05, 1.4, per_mweight=20.0)
    fit = predictor.LatencyModel().fit(profile).in_network(digits.model, digits.input_shape)
    assert (fit.offset, fit.slope, fit.per_mweight) == (pytest.approx(0.05, rel=1e-2), pytest.approx(1.4, rel=1e-2),
                                                          pytest.approx(20.0, rel=1e-2))


def test_in_network_cost_of_what_follows_each_layer_on_its_outputs_is_read_off_the_plans(
        on_fit: Callable[..., table.Profile], digits: measure.Target) -> None:
    profile = on_fit(0.05, 1.4, per_moutput=30.0)  # e.g. BatchNorm and ReLU: filter pruning shrinks them
    fit = predictor.LatencyModel().fit(profile).in_network(digits.model, digits.input_shape)
    assert (fit.offset, fit.slope, fit.per_moutput) == (pytest.approx(0.05, rel=1e-2), pytest.approx(1.4, rel=1e-2),
                                                          pytest.approx(30.0, rel=1e-2))


def test_in_network_cost_per_input_a_kernel_reads_is_read_off_the_plans(on_fit: Callable[..., table.Profile],
                                                                        digits: measure.Target) -> None:
    per_minput = {"channels-gathered": 20.0, "reduced-gemm": 10.0}  # the kernels of the profiled channel and shape
    profile = on_fit(0.05, 1.4, per_minput=per_minput)
    fit = predictor.LatencyModel().fit(profile).in_network(digits.model, digits.input_shape)
    assert fit.per_minput == pytest.approx(per_minput, rel=1e-2)
    assert (fit.offset, fit.slope) == (pytest.approx(0.05, rel=1e-2), pytest.approx(1.4, rel=1e-2))


def test_in_network_kernel_slope_is_read_off_the_plans(on_fit: Callable[..., table.Profile],
                                                        digits: measure.Target) -> None:
    """A kernel layer slows by its own factor inside a network (resnet56: without it, filter-heavy
    random plans were predicted 12-19% fast once the uniform ladder was in the fit)."""
    per_ms = {"channels-gathered": 0.5, "reduced-gemm": 0.8}
    profile = on_fit(0.05, 1.2, per_ms=per_ms)
    fit = predictor.LatencyModel().fit(profile).in_network(digits.model, digits.input_shape)
    assert fit.per_ms == pytest.approx(per_ms, rel=1e-2) and fit.slope == pytest.approx(1.2, rel=1e-2)


def test_in_network_fit_has_no_per_kernel_terms_without_plans_enough_for_them() -> None:
    rng = random.Random(0)
    networks = [[predictor.Isolated(rng.uniform(0.05, 0.2), rng.randrange(10**5), rng.choice(["csr", build.PLAIN]),
                                    rng.randrange(10**4), rng.randrange(10**4)) for _ in range(4)]
                for _ in range(18)]  # 3 plans per coefficient: 15 for the input term, 18 for the slope too
    measured = [0.05 + sum((1.2 + 0.5 * (layer.family == "csr")) * layer.ms
                           + 30 * layer.inputs / 1e6 * (layer.family == "csr") for layer in net)
                for net in networks]
    fit = predictor.InNetwork.fit(networks, measured, 0.05)
    assert (fit.per_minput, fit.per_ms) == ({"csr": pytest.approx(30, rel=1e-2)}, {"csr": pytest.approx(0.5, rel=1e-2)})
    assert predictor.InNetwork.fit(networks[:17], measured[:17], 0.05).per_ms == {}
    assert predictor.InNetwork.fit(networks[:15], measured[:15], 0.05).per_minput != {}
    assert predictor.InNetwork.fit(networks[:14], measured[:14], 0.05).per_minput == {}


def test_in_network_cost_of_each_layer_call_is_read_off_plans_that_remove_branches() -> None:
    """A removed residual branch saves its layers' calls as well as their work (resnet56 with 6 of 9
    blocks per stage removed ran 2.49x, predicted 2.22x without this term). Without plans that
    remove some, the calls are part of the offset and the term stays 0."""
    rng = random.Random(0)
    removed = predictor.Isolated(0.0, 0, predictor.BRANCH_REMOVED, 0, 0)

    def net(gone: int) -> list[predictor.Isolated]:
        return ([predictor.Isolated(rng.uniform(0.05, 0.2), rng.randrange(10**5), build.PLAIN, rng.randrange(10**4), 0)
                 for _ in range(24 - gone)] + [removed] * gone)

    networks = [net(rng.choice([0, 0, 4, 8, 16])) for _ in range(30)]

    def timed(layers: list[predictor.Isolated]) -> float:
        return 0.3 + sum(1.2 * f.ms + 0.02 + 5 * f.outputs / 1e6 for f in layers if f.family == build.PLAIN)

    fit = predictor.InNetwork.fit(networks, [timed(n) for n in networks], 0.3)
    assert (fit.offset, fit.slope, fit.per_call) == (pytest.approx(0.3, rel=1e-2), pytest.approx(1.2, rel=1e-2),
                                                     pytest.approx(0.02, rel=1e-2))
    half = net(12)
    assert fit.offset + sum(map(fit.cost, half)) == pytest.approx(timed(half), rel=1e-3)
    whole = [n for n in networks if removed not in n]
    assert predictor.InNetwork.fit(whole, [timed(n) for n in whole], 0.3).per_call == 0.0


def test_a_collapsed_layer_runs_no_profiled_kernel_and_costs_what_follows_a_layer_on_its_outputs(
        fitted: predictor.LatencyModel) -> None:
    """A collapsed layer (`compact.ChannelAffine`, one multiply-add per element) has no rows of its
    own: it is predicted at no isolated latency, the elements it writes charged as any layer's are,
    and neither a kernel term nor a layer call: a conv and a BatchNorm became one multiply-add (on
    vgg16-bn, charged a call, 8 collapsed convs were predicted 0.82x their measured speedup, 0.92x
    without), and a plan that collapses layers counts as one with fewer calls in the fit."""
    from sparsesearch.compact import COLLAPSED

    sig = next(r.signature for r in fitted.profile.rows.values() if r.signature.kind == "conv")
    layer = fitted.isolated({"c": predictor.Query(sig, COLLAPSED, 8, 8, 1, 0)})["c"]
    assert (layer.ms, layer.family, layer.outputs) == (0.0, COLLAPSED, 8 * sig.positions)
    fit = predictor.InNetwork(0.3, 1.2, 30, per_moutput=5.0, per_ms={COLLAPSED: 9.0}, per_call=0.02)
    assert fit.cost(layer) == pytest.approx(5.0 * layer.outputs / 1e6)
    rng = random.Random(0)

    def net(gone: int) -> list[predictor.Isolated]:
        return [predictor.Isolated(rng.uniform(0.05, 0.2), 0, build.PLAIN, 0, 0) for _ in range(13 - gone)] + [
            predictor.Isolated(0.0, 0, COLLAPSED, 0, 0)] * gone

    networks = [net(rng.choice([0, 0, 4, 8])) for _ in range(30)]
    timed = [0.3 + sum(1.2 * f.ms + 0.02 for f in n if f.family == build.PLAIN) for n in networks]
    assert predictor.InNetwork.fit(networks, timed, 0.3).per_call == pytest.approx(0.02, rel=1e-2)


def test_in_network_fit_holds_to_the_dense_network_that_every_speedup_divides() -> None:
    """Plans that follow another line than the dense network (mixed kernels, timed beside it) must
    not move its prediction: a predicted speedup of the unpruned network is 1."""
    rng = random.Random(0)
    networks = [[predictor.Isolated(rng.uniform(0.05, 0.2), rng.randrange(10**5), build.PLAIN, 0, 0)
                 for _ in range(4)] for _ in range(20)]
    measured = [0.05 + sum(1.2 * layer.ms for layer in net) for net in networks]
    measured[0] *= 0.85  # the dense network runs faster than the plans' line says
    fit = predictor.InNetwork.fit(networks, measured, 0.05)
    assert fit.offset + sum(map(fit.cost, networks[0])) == pytest.approx(measured[0], rel=1e-3)


def test_in_network_fit_weighs_the_fast_plans_as_much_as_the_slow_ones() -> None:
    """Speedups are ratios: a plan of 0.5 ms among plans of 5-12 ms must be fitted as closely, in
    relative terms (fitted in milliseconds, vgg16-bn's uniform filter 90% was predicted 21% slow)."""
    rng = random.Random(0)
    networks = [[predictor.Isolated(rng.uniform(0.7, 3.0) * (0.05 if i >= 20 else 1), 0, build.PLAIN, 0, 0)
                 for _ in range(4)] for i in range(24)]

    def measured(net: list[predictor.Isolated]) -> float:  # the fast plans' rest is smaller than a line says
        ms = sum(layer.ms for layer in net)
        return ms + (0.5 if ms > 1 else 0.25)

    fit = predictor.InNetwork.fit(networks, list(map(measured, networks)), 0.5)
    errors = [(fit.offset + sum(map(fit.cost, net))) / measured(net) - 1 for net in networks]
    assert max(map(abs, errors[20:])) < 0.02 and max(map(abs, errors)) < 0.03


def test_one_calibration_plan_timed_under_load_does_not_tilt_the_fit(on_fit: Callable[..., table.Profile],
                                                                      digits: measure.Target) -> None:
    profile = on_fit(0.05, 1.4)
    next(iter(profile.rest.values()))["calibration"][3]["median_ms"] *= 4  # a burst of load on the machine
    fit = predictor.LatencyModel().fit(profile).in_network(digits.model, digits.input_shape)
    assert fit.slope == pytest.approx(1.4, rel=0.05) and fit.offset == pytest.approx(0.05, rel=0.2)


def test_profile_records_the_machine_speed_it_was_measured_at(small_profile: measure.ProfileRun) -> None:
    stored = json.loads(small_profile.path.read_text())
    assert stored["yardstick_ms"] > 0 and next(iter(stored["rest"].values()))["speed"] > 0
    assert small_profile.speeds and all(s > 0 for s in small_profile.speeds)
    mixed = measure.ProfileRun(small_profile.path, small_profile.profile, 0, 0, 0.0, speeds=[1.0, 1.5, 0.95, 1.02])
    assert mixed.unsteady == pytest.approx(0.25)


def test_profile_records_where_this_devices_latency_steps_and_reads_it_back(small_profile: measure.ProfileRun,
                                                                          tmp_path: Path) -> None:
    from sparsesearch.profiler.steps import PERIODS, WIDTHS

    stored = json.loads(small_profile.path.read_text())["steps"]
    assert stored["out"] in PERIODS and stored["in"] in PERIODS
    assert len(stored["out_ms"]) == len(stored["in_ms"]) == len(WIDTHS) and min(stored["out_ms"]) > 0
    assert table.Profile.load(small_profile.path).steps == stored
    broken = json.loads(small_profile.path.read_text()) | {"steps": {"out": "sixteen"}}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(UserError, match="malformed channel steps"):
        table.Profile.load(tmp_path / "broken.json")


def test_every_phase_of_a_profile_shows_its_own_progress(small_profile: measure.ProfileRun) -> None:
    phases: list[list[tuple[int, int, str]]] = []
    for heard in PROGRESS:  # a new phase: another total, or the count going down (as the CLI's bar reads it)
        if not phases or heard[1] != phases[-1][-1][1] or heard[0] < phases[-1][-1][0]:
            phases.append([])
        phases[-1].append(heard)
    setup, *rows, plans = phases
    assert [d for d, _, _ in setup] == [0, 1] and "yardstick" in setup[0][2]
    assert 1 <= len(rows) <= 2, "the dense layers and each kernel's highest rate; the rest of the grid (if any)"
    assert all(phase[0][0] == 0 and phase[-1][0] == phase[-1][1] for phase in rows), "each from 0 to its end"
    assert sum(phase[-1][1] for phase in rows) == small_profile.measured
    assert [d for d, _, _ in plans] == [*range(0, measure.CALIBRATION_PLANS, measure.GROUP), measure.CALIBRATION_PLANS], \
        "the calibration plans, group by group, with their own total"
    assert {t for _, t, _ in plans} == {measure.CALIBRATION_PLANS}


def test_a_type_no_faster_than_dense_at_its_highest_rate_or_running_the_dense_layer_is_unpaid() -> None:
    sig = table.Signature("conv", 64, 64, (3, 3), (1, 1), (1, 1), input_hw=(8, 8))

    def row(kind: str, rate: float, ms: float, impl: str, in_keep: int = 64) -> table.Row:
        return table.Row(sig, kind, rate, in_keep, 64, 1, 1, impl, 1, ms, 0.0)

    profile = table.Profile({}, path=Path("p.json"))
    for r in (row("plain", 0.0, 1.0, "dense"),
              row("shape", 0.5, 1.3, "reduced-gemm"), row("shape", 0.9, 0.5, "reduced-gemm"),  # pays at 0.9
              row("irregular", 0.9, 1.2, "csr"), row("irregular", 0.5, 0.2, "csr", in_keep=32),  # half the inputs
              row("nm", 0.75, 0.9, "dense-fallback")):  # faster by noise: it runs the dense layer
        profile.add(r)
    assert profile.unpaid() == {(sig.key, "irregular"), (sig.key, "nm")}


def test_filter_rows_fall_on_the_counts_the_search_aligns_to(digits: measure.Target, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the scan finds a step (16 outputs: channels-last on an AVX-512 CPU), the search keeps
    multiples of it in layers MIN_BLOCKS steps wide or wider; the profile times those counts, not the
    ones the rate alone leaves, so that its rows lie where plans do."""
    from sparsesearch.sparsity import MIN_BLOCKS

    monkeypatch.setattr(measure.steps, "scan", lambda *a, **kw: {"out": 16, "in": 1})
    run = measure.profile_model(digits, CPU, 1, "float32", (0.0, 0.3), ["filter"], tmp_path / "p.json", timing=FAST)
    outs = {}
    for row in run.profile.rows.values():
        outs.setdefault(row.signature.out_channels, set()).add(row.out_keep)
    wide = {n: kept for n, kept in outs.items() if n >= MIN_BLOCKS * 16}
    assert wide and all(k % 16 == 0 for kept in wide.values() for k in kept), outs
    assert outs[32] == {32, keep_count(32, 0.3)}, "a layer two steps wide keeps what the rate leaves"
    widths = {layer.name: layer.weight_shape[0] for layer in trace(digits.model, digits.input_shape)}
    calibrated = [(widths[name], spec["rate"]) for sample in run.rest["calibration"]
                  for name, spec in sample["plan"]["layers"].items() if spec["type"] == "filter"]
    assert calibrated and all(keep_count(n, rate) % 16 == 0 for n, rate in calibrated if n >= MIN_BLOCKS * 16)


def test_a_type_that_buys_no_time_is_timed_at_its_highest_rate_only_and_calibrated_without(
        digits: measure.Target, tmp_path: Path) -> None:
    """On a CPU nm runs the dense layer (no 2:4 kernel): one row per layer shape says so, and the
    calibration plans, drawn from what the search can offer, leave it out."""
    run = measure.profile_model(digits, CPU, 1, "float32", RATES, ("filter", "nm"), tmp_path / "p.json", timing=FAST)
    nm = [r for r in run.profile.rows.values() if r.type == "nm"]
    shapes = {r.signature for r in run.profile.rows.values()}
    assert len(nm) == len(shapes) and {(r.rate, r.impl) for r in nm} == {(measure.NM_RATES[-1], "dense-fallback")}
    assert all((r.in_keep, r.out_keep) == (r.signature.in_channels, r.signature.out_channels) for r in nm)
    assert run.skipped > 0 and run.measured + run.skipped + run.reused == len(measure.grid(
        digits, RATES, ("filter", "nm"), run.profile.steps)[0])
    drawn = {spec["type"] for sample in run.rest["calibration"] for spec in sample["plan"]["layers"].values()}
    assert drawn == {"filter"}


def test_calibration_plans_use_only_the_profiled_types_and_rates(small_profile: measure.ProfileRun) -> None:
    entry = next(iter(small_profile.profile.rest.values()))
    assert entry["grid"] == {"rates": list(RATES), "types": sorted(TYPES)}
    assert len(entry["calibration"]) == measure.CALIBRATION_PLANS
    drawn = {(spec["type"], spec["rate"]) for sample in entry["calibration"]
             for spec in sample["plan"]["layers"].values()}
    assert drawn and all(kind in TYPES and rate in RATES for kind, rate in drawn)


def test_the_uniform_ladder_is_the_search_s_baselines_at_the_nearest_profiled_rates(digits: measure.Target) -> None:
    layers = trace(digits.model, digits.input_shape)
    ladder = uniform_ladder(layers, measure.DEFAULT_RATES)
    assert [rate for rate, _ in ladder] == [0.1, *BASELINE_RATES]
    assert all(plan == Plan.uniform(layers, SparsityType.FILTER, rate) for rate, plan in ladder)
    assert [rate for rate, _ in uniform_ladder(layers, (0.0, 0.25, 0.5, 0.75))] == [0.25, 0.5, 0.75]
    assert uniform_ladder(layers, measure.DEFAULT_RATES, ("channel", "shape")) == []


def test_calibration_holds_the_uniform_ladder_and_plans_that_leave_most_layers_dense(digits: measure.Target) -> None:
    """Where the search's baselines and first plans live; random plans prune nearly every layer."""
    layers = trace(digits.model, digits.input_shape)
    deps = dependencies(digits.model, digits.input_shape)
    plans = measure.calibration_plans(layers, deps.couplings, list(measure.DEFAULT_RATES), set(TYPES))
    assert len(plans) == measure.CALIBRATION_PLANS
    assert all(plan in plans for _, plan in uniform_ladder(layers, measure.DEFAULT_RATES))
    prunable = len([layer for layer in layers if layer.types])
    assert sum(len(plan.layers) <= prunable / 2 for plan in plans) >= 2


def test_calibration_holds_plans_with_every_filter_group_heavily_pruned(digits: measure.Target) -> None:
    """The front's fast end: fitted without them, vgg16-bn's uniform filter 90% was predicted 55% slow."""
    layers = trace(digits.model, digits.input_shape)
    deps = dependencies(digits.model, digits.input_shape)
    filterable = {n for group in filter_groups(layers, deps.couplings) for n in group}
    plans = measure.calibration_plans(layers, deps.couplings, list(measure.DEFAULT_RATES), set(TYPES))
    ladder = [plan for _, plan in uniform_ladder(layers, measure.DEFAULT_RATES)]
    heavy = [plan for plan in plans if set(plan.layers) == filterable and plan not in ladder
             and all(s.type == SparsityType.FILTER and s.rate >= 0.5 for s in plan.layers.values())]
    assert len(heavy) == measure.HEAVY_PLANS
    without = measure.calibration_plans(layers, deps.couplings, list(measure.DEFAULT_RATES), set(TYPES) - {"filter"})
    assert not any(s.type == SparsityType.FILTER for plan in without for s in plan.layers.values())


def test_calibration_plans_are_timed_in_small_groups_as_ratios_to_the_dense_net_beside_them(
        digits: measure.Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """As validation and the search's measurement time plans: one run of all 32 put resnet20's
    ratios to the dense net 9% below what groups of 5 measured, and every prediction with them."""
    groups = []

    def spy(dense: nn.Module, group: dict, *args: object) -> dict:
        groups.append((list(group), measure_beside(dense, group, *args)))
        return groups[-1][1]

    measure_beside = measure.beside_dense
    monkeypatch.setattr(measure, "beside_dense", spy)
    plans = measure.network_plans(digits, list(RATES), set(TYPES))
    entry = measure.measure_network(digits, CPU, 1, torch.float32, list(RATES), set(TYPES), 1.0, plans, FAST)
    assert len(groups) == -(-measure.CALIBRATION_PLANS // measure.GROUP)
    assert all(len(names) <= measure.GROUP for names, _ in groups)
    relative = {name: t[name].relative for names, t in groups for name in names}
    stored = [sample["median_ms"] / entry["dense_ms"] for sample in entry["calibration"]]
    assert stored == pytest.approx([relative[str(i)] for i in range(measure.CALIBRATION_PLANS)], rel=1e-9)


def test_unprofiled_network_is_a_clear_error(fitted: predictor.LatencyModel) -> None:
    target = measure.target("resnet20")
    with pytest.raises(UserError, match="has not timed this network .* run `sparsesearch profile --model"):
        predictor.dense_latency(fitted, target.model, target.input_shape)


# --- the harness and the command ---------------------------------------------------------------------


def test_compare_adds_rounds_while_the_spread_is_large() -> None:
    layer, x = nn.Linear(4, 4), torch.randn(1, 4)
    assert compare({"a": layer}, x, rounds=2, warmup_s=0, min_round_s=0.0001, max_spread=-1, max_rounds=5)["a"].rounds == 5
    assert compare({"a": layer}, x, rounds=2, warmup_s=0, min_round_s=0.0001)["a"].rounds == 2


class _Burst(nn.Module):
    """Sleeps 10 ms per call, and 40 ms on every other one of its first `burst` calls: load on the
    machine (long enough that the scheduler's jitter of a busy CI machine is not itself a spread)."""

    def __init__(self, burst: int) -> None:
        super().__init__()
        self.calls, self.burst = 0, burst

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.04 if self.calls <= self.burst and self.calls % 2 else 0.01)
        return x


def test_past_the_minimum_rounds_only_the_unsteady_models_are_timed_on_beside_the_reference() -> None:
    machine = _Machine(steady=True)  # 10/20 ms: a VM's stolen millisecond was 20-50% of 2/4 ms (flaked twice)
    models = {"ref": _Sleeper(machine, 10), "steady": _Sleeper(machine, 20), "noisy": _Burst(burst=100)}
    t = compare(models, torch.zeros(1), rounds=3, warmup_s=0, min_round_s=0, max_spread=0.2, max_rounds=8,
                reference="ref")
    assert (t["steady"].rounds, t["noisy"].rounds, t["ref"].rounds) == (3, 8, 8)
    assert t["steady"].relative == pytest.approx(2, rel=0.1), "paired with the reference's first rounds"


def test_a_model_timed_during_a_burst_is_timed_again_and_keeps_the_steadier_timing() -> None:
    x = torch.zeros(1)
    setting = {"rounds": 6, "warmup_s": 0, "min_round_s": 0, "max_spread": 0.5, "max_rounds": 6}
    once = compare({"a": _Burst(burst=7)}, x, **setting)["a"]  # 1 warm-up call + 6 rounds of 1 call
    assert once.spread > 0.5
    retried = compare({"a": _Burst(burst=7)}, x, **setting, retries=1)["a"]
    assert retried.spread <= 0.5 and retried.median_ms < 20


class _Machine:
    """A machine that runs 3x slower every other two rounds of two calls, as a shared VM changes
    speed every few seconds (rounds last a fraction of a second)."""

    def __init__(self, steady: bool = False) -> None:
        self.calls, self.steady = 0, steady

    def sleep(self, ms: float) -> None:
        """Spins rather than sleeps: a sleep's wake-up on a busy VM overshoots by up to a millisecond
        at random, noise of the test's own that put one ratio's spread at 11%."""
        end = time.perf_counter() + ms / 1000 * (3 if self.calls // 4 % 2 and not self.steady else 1)
        while time.perf_counter() < end:
            pass
        self.calls += 1


class _Sleeper(nn.Module):
    def __init__(self, machine: _Machine, ms: float) -> None:
        super().__init__()
        self.machine, self.ms, self.calls = machine, ms, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.machine.sleep(self.ms)
        return x


def test_timing_against_a_reference_cancels_the_machine_changing_speed() -> None:
    machine = _Machine()  # 10/20 ms: a busy 2-core VM's scheduler jitter is a few % of it, not 10-20% of 1/2 ms
    models = {"a": _Sleeper(machine, 10), "b": _Sleeper(machine, 20)}
    t = compare(models, torch.zeros(1), rounds=12, warmup_s=0, min_round_s=0, reference="a")
    assert t["b"].relative == pytest.approx(2, rel=0.1) and t["b"].relative_spread < 0.1
    assert t["b"].spread > 0.5  # its own milliseconds jump with the machine
    with pytest.raises(ValueError, match="reference"):
        compare(models, torch.zeros(1), rounds=1, reference="c")


def test_latencies_are_scaled_to_the_reference_speed_and_a_slow_machine_is_timed_again() -> None:
    machine = _Machine(steady=True)
    # 10/20 ms, as above: a spin of 2 ms preempted on a busy core once read 2.33 for 2
    yardstick, layer = _Sleeper(machine, 10), _Sleeper(machine, 20)
    setting = {"rounds": 3, "warmup_s": 0, "min_round_s": 0}
    timings, speed = measure._timed({"layer": layer}, torch.zeros(1), yardstick, 5.0, setting)
    assert speed == pytest.approx(2, rel=0.2)  # the yardstick ran at twice its reference time
    assert timings["layer"][0] == pytest.approx(10, rel=0.1)  # so the layer counts half its 20 ms
    assert layer.calls == 2 * (1 + 3)  # slower than SLOW: timed twice (warm-up + 3 rounds each)


@pytest.mark.parametrize(("profiled_dense_ms", "runs"), [(20.0, 1), (10.0, 2)])
def test_plans_are_timed_again_when_the_dense_net_beside_them_is_off_its_profiled_latency(
        profiled_dense_ms: float, runs: int) -> None:
    machine = _Machine(steady=True)  # 20/10 ms: scheduler jitter on a busy 2-core VM is a few % of it, not 10-30%
    dense, plan = _Sleeper(machine, 20), _Sleeper(machine, 10)
    t = measure.beside_dense(dense, {"plan": plan}, torch.zeros(1), profiled_dense_ms,
                             {"rounds": 3, "warmup_s": 0, "min_round_s": 0})
    assert t["plan"].relative == pytest.approx(0.5, rel=0.1)
    assert plan.calls == runs * (1 + 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_profile_on_cuda_without_a_gpu_is_a_one_line_error() -> None:
    result = CliRunner().invoke(app, ["profile", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output


def test_validation_separates_a_machine_running_faster_from_a_wrong_prediction() -> None:
    from sparsesearch.profiler.validate import Sample, Validation

    profiled_dense, predicted = 10.0, [4.0, 5.0, 8.0]
    exact = [2 * p for p in predicted]  # each plan runs at its predicted share of the dense network

    def run(factor: float, measured: list[float]) -> Validation:  # the machine now runs at `factor` x
        dense_now = factor * profiled_dense
        return Validation("m", [Sample({}, p, factor * m / 2, 0.01, profiled_dense, dense_now, 2 * profiled_dense / m)
                                for p, m in zip(predicted, measured)])

    faster = run(0.7, exact)
    assert faster.drift == pytest.approx(0.7) and faster.within_10 == 0
    assert faster.speedup_within_10 == 1 and faster.speedup_mean_abs_error == pytest.approx(0)
    wrong = run(1.0, [exact[0], exact[1], 1.5 * exact[2]])
    assert wrong.drift == pytest.approx(1) and wrong.speedup_within_10 == pytest.approx(2 / 3)
    assert wrong.to_dict()["samples"][2]["speedup_error"] == pytest.approx(0.5)


def test_profile_then_validate_from_the_command_line(small_profile: measure.ProfileRun, tmp_path: Path) -> None:
    profile = tmp_path / "p.json"
    profile.write_text(small_profile.path.read_text())
    runner = CliRunner()
    result = runner.invoke(app, ["profile", "--rates", "0,0.5", "--types", "filter,channel,shape", "--out", str(profile)])
    assert result.exit_code == 0, result.output
    assert "0 rows measured" in result.output and "cross-validated" in result.output
    assert re.search(r"latency steps every \d+ output and every \d+ input channels", " ".join(result.output.split()))
    png = tmp_path / "v.png"
    result = runner.invoke(app, ["profile", "validate", "--samples", "2", "--profile", str(profile), "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert "within ±10%" in result.output and "speedup over the dense network" in result.output
    assert png.stat().st_size > 0
    written = json.loads(png.with_suffix(".json").read_text())
    assert [s["kind"] for s in written["samples"]] == ["random", "random", "uniform filter 0.5"]
    assert {"within_10", "speedup_within_10", "drift"} <= set(written)
    assert "uniform filter ladder, the search's baselines" in " ".join(result.output.split())
    from sparsesearch.plan import Plan

    digits = measure.target("digits-cnn")  # validation predicts what the search predicts for the same plan
    fresh = predictor.LatencyModel().fit(table.Profile.load(profile))
    for sample in written["samples"]:
        plan = Plan.from_dict(sample["plan"], "test")
        expected = predictor.predict_latency(fresh, digits.model, digits.input_shape, plan).total_ms
        assert sample["predicted_ms"] == pytest.approx(expected, rel=1e-6)
    bad = runner.invoke(app, ["profile", "--types", "filters"])
    assert bad.exit_code == 2 and "unknown sparsity type" in bad.output


@pytest.mark.parametrize("block", [8, 16])
def test_the_period_of_a_latency_staircase_is_found_through_noise(block: int) -> None:
    from sparsesearch.profiler.steps import WIDTHS, period

    rng = np.random.default_rng(0)
    widths = list(WIDTHS)
    stairs = [0.1 + 0.02 * math.ceil(w / block) * block + rng.normal(0, 0.01) for w in widths]
    assert period(widths, stairs) == block


def test_the_period_is_found_where_each_bit_of_a_remainder_costs_a_block() -> None:
    """oneDNN's channels-last convs on an AVX-512 CPU: 48 outputs cost 3 blocks of 16, 55 cost 6
    (48 + 4 + 2 + 1), 56 cost 4; the widths to keep are still multiples of 16."""
    from sparsesearch.profiler.steps import WIDTHS, period

    rng = np.random.default_rng(0)
    widths = list(WIDTHS)
    tails = [0.1 + 0.04 * (w // 16 + bin(w % 16).count("1")) + rng.normal(0, 0.005) for w in widths]
    assert period(widths, tails) == 16


def test_no_staircase_means_period_one() -> None:
    from sparsesearch.profiler.steps import WIDTHS, period

    rng = np.random.default_rng(0)
    widths = list(WIDTHS)
    assert period(widths, [0.1 + 0.002 * w + rng.normal(0, 0.005) for w in widths]) == 1, "a line"
    assert period(widths, [0.3 + rng.normal(0, 0.01) for _ in widths]) == 1, "flat noise"


def test_a_channels_last_profile_times_every_network_in_that_layout_and_is_kept_apart(
        small_profile: measure.ProfileRun, digits: measure.Target, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`profile --channels-last`: layers and whole networks run channels-last (input and weights),
    under a name and fingerprint of their own; a contiguous search is refused it, and a profile
    written before layouts counts as contiguous. Validation runs in the profile's layout, and so
    does the scan of this device's channel steps (channels-last convs step where contiguous do not)."""
    from sparsesearch.profiler import steps
    from sparsesearch.profiler import validate as validation

    seen, real = [], measure.compare
    scanned, real_scan = [], steps.compare

    def scan_spy(models: dict, x: torch.Tensor, **kw: object) -> dict:
        scanned.extend(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                       for m in models.values() for t in (m.x, m.conv.weight))
        return real_scan(models, x, **kw)

    def spy(models: dict, x: torch.Tensor, **kw: object) -> dict:
        if x.dim() == 4:  # (all channels-last, any NCHW): of the input and of the convs' weights
            tensors = [x, *(p for name, m in models.items() if name != measure._YARDSTICK  # its own, fixed
                            for p in m.parameters() if p.dim() == 4)]
            seen.append((all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors),
                         any(t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1 and t.is_contiguous() for t in tensors)))
        return real(models, x, **kw)

    monkeypatch.setattr(measure, "compare", spy)
    monkeypatch.setattr(steps, "compare", scan_spy)
    here = table.fingerprint(CPU, 1, "float32", layout="channels-last")
    path = tmp_path / table.profile_name(here)
    run = measure.profile_model(digits, CPU, 1, "float32", RATES, TYPES, path, timing=FAST, layout="channels-last")
    assert path.name.endswith("-float32-channels-last.json") and run.profile.fingerprint["layout"] == "channels-last"
    assert seen and all(cl and not nchw for cl, nchw in seen)  # every 4-D input channels-last, none left NCHW
    assert scanned and all(scanned) and run.profile.steps["layout"] == "channels-last"
    assert run.rest["calibration"]  # the networks were timed too
    with pytest.raises(UserError, match="layout: channels-last \\(profile\\) != contiguous \\(here\\)\\); pass "
                                        "--channels-last, the layout it was measured in"):
        table.load_profile(path, CPU, 1)
    loaded = table.load_profile(path, CPU, 1, layout="channels-last")
    assert table.find_profile(here, tmp_path) == path and table.find_profile(table.fingerprint(CPU, 1, "float32"),
                                                                            tmp_path) is None
    older = json.loads(small_profile.path.read_text())
    del older["fingerprint"]["layout"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert table.load_profile(tmp_path / "older.json", CPU, 1).fingerprint.get("layout") is None
    seen.clear()
    monkeypatch.setattr(validation, "beside_dense", lambda dense, group, x, *a, **kw: spy(
        {"dense": dense, **group}, x, rounds=1, warmup_s=0.0, min_round_s=0.001, reference="dense"))
    result = validation.validate(predictor.LatencyModel().fit(loaded), digits, 2, CPU, 1)
    assert result.setting["layout"] == "channels-last" and seen and all(cl and not nchw for cl, nchw in seen)
