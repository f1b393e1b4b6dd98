from __future__ import annotations

import json
from dataclasses import replace
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sparsesearch.admm import (CALIBRATION_IMAGES, ADMMConfig, ADMMState, Iteration, Rung, apply_masks, dead_channels,
                               layer_report, masked_hooks, open_identity_paths, projected_accuracy, prune_masks,
                               resume_files, run_admm, run_key)
from sparsesearch.compact import slimmed
from sparsesearch.graph import Coupling, Dependencies, dependencies
from sparsesearch.cli import app
from sparsesearch.layers import trace
from sparsesearch.plan import LayerSparsity, Plan
from sparsesearch.sparsity import SparsityType as T
from sparsesearch.sparsity import achieved_rate, keep_count, num_groups, project
from sparsesearch.train import DenseResult, TrainConfig, fit, prepare, refreshed_batchnorm

CPU = torch.device("cpu")
SHORT = ADMMConfig(admm_epochs=0.5, admm_interval=0.25, retrain_epochs=0.5)
MIXED = {"0": LayerSparsity(T.SHAPE, 0.3), "3": LayerSparsity(T.FILTER, 0.5), "7": LayerSparsity(T.CHANNEL, 0.7),
         "12": LayerSparsity(T.IRREGULAR, 0.9), "14": LayerSparsity(T.NM, 0.5)}


def _digits(baseline: DenseResult):  # noqa: ANN202
    return prepare("digits-cnn", "digits", weights=baseline.checkpoint)


def test_rho_grows_by_its_factor_at_each_update_and_is_capped() -> None:
    config = ADMMConfig(rho0=1e-3, rho_factor=1.3, rho_max=2e-3)
    assert [config.rho(i) for i in range(4)] == pytest.approx([1e-3, 1.3e-3, 1.69e-3, 2e-3])


def test_budget_is_split_into_admm_periods() -> None:
    assert ADMMConfig(admm_epochs=1, admm_interval=0.3).iterations() == pytest.approx([0.3, 0.3, 0.3, 0.1])
    assert ADMMConfig(admm_epochs=0).iterations() == []


def test_penalty_is_half_rho_squared_frobenius_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    state = ADMMState(model, Plan({"0": LayerSparsity(T.FILTER, 0.5)}))
    state.set_rho(0.2)
    state.U[0][0].normal_()
    w, z, u = model[0].weight, state.Z[0][0], state.U[0][0]
    assert state.penalty().item() == pytest.approx(0.1 * ((w - z + u) ** 2).sum().item())


def test_z_is_the_projection_of_w_plus_u_and_u_accumulates_w_minus_z() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    state = ADMMState(model, Plan({"0": LayerSparsity(T.SHAPE, 0.5)}))
    state.U[0][0].normal_()
    w, u_before = model[0].weight.detach().clone(), state.U[0][0].clone()
    residual = state.update()
    z = project([w + u_before], T.SHAPE, 0.5)[0]
    assert torch.equal(state.Z[0][0], z)
    assert torch.allclose(state.U[0][0], u_before + w - z, atol=1e-6)
    assert residual == pytest.approx(((w - z).norm() / w.norm()).item())


def _reader_behind_pruned_filters(kind: T) -> tuple[nn.Module, Plan, Dependencies]:
    """Linear a (16 filters, the last 12 weakest) -> ReLU -> Linear b whose strongest weights read
    exactly those 12: a projection blind to a's pruning would spend b's budget on them."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.rand(16, 8) + torch.linspace(4, 0.1, 16)[:, None])
        model[0].bias.fill_(0.1)
        model[2].weight.copy_(torch.rand(4, 16) * torch.linspace(0.1, 4, 16))
    plan = Plan({"0": LayerSparsity(T.FILTER, 0.75), "2": LayerSparsity(kind, 0.5)})
    return model, plan, dependencies(model, (8,))


@pytest.mark.parametrize("kind", [T.SHAPE, T.IRREGULAR, T.CHANNEL])
def test_a_reader_keeps_the_inputs_that_pruned_filters_leave_alive(kind: T) -> None:
    torch.manual_seed(0)
    model, plan, deps = _reader_behind_pruned_filters(kind)
    masks = prune_masks(model, plan, deps)
    alive = masks["0.weight"].any(1)
    assert alive.tolist() == [True] * 4 + [False] * 12
    assert masks["2.weight"][:, alive].all()  # every weight reading a live input kept (8 per row allowed)


def test_admm_targets_the_live_inputs_too() -> None:
    torch.manual_seed(0)
    model, plan, deps = _reader_behind_pruned_filters(T.SHAPE)
    state = ADMMState(model, plan, deps)
    assert state.Z[1][0][:, :4].ne(0).all()
    state.update()
    assert state.Z[1][0][:, :4].ne(0).all()


def test_a_removed_layer_in_a_plain_chain_is_projected_onto_its_identity_path() -> None:
    """Rate 1 on a conv no shortcut bypasses, which keeps its input's shape: ADMM pulls it toward its
    identity path (each filter's own channel at the centre tap), and only at the channels the filters
    before it keep; the others go with their BatchNorm entries, so nothing leaves a constant."""
    from sparsesearch.sparsity import REMOVED

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([4.0, 0.1, 3.0, 0.2]).view(4, 1, 1, 1))  # filters 1 and 3 the weakest
    deps = dependencies(model, (1, 4, 4))
    assert deps.collapsible == {"3"}
    plan = Plan({"0": LayerSparsity(T.FILTER, 0.5), "3": LayerSparsity(T.FILTER, REMOVED)})
    masks = prune_masks(model, plan, deps)
    expected = torch.zeros(4, 4, 3, 3, dtype=torch.bool)
    expected[[0, 2], [0, 2], 1, 1] = True
    assert torch.equal(masks["3.weight"], expected)
    assert masks["4.weight"].tolist() == masks["4.bias"].tolist() == masks["3.bias"].tolist() == [True, False] * 2
    state = ADMMState(model, plan, deps)
    state.U[1][0].normal_()
    state.update()
    assert torch.equal(state.Z[1][0].ne(0), expected)
    apply_masks(model, masks)
    row = next(r for r in layer_report(model, trace(model, (1, 4, 4)), plan) if r["layer"] == "3")
    assert (row["achieved"], row["macs_compacted"]) == (REMOVED, 16 * 2)  # 4x4 positions, 2 channels
    open_identity_paths(model, plan, deps, masks)  # retraining starts from the network without the layer
    x = torch.randn(5, 1, 4, 4)
    without = nn.Sequential(*model[:3], *model[5:])
    assert torch.allclose(model(x), without(x), atol=1e-6) and not model[4].bias.any()


def test_changing_rho_keeps_the_dual_rho_times_u() -> None:
    model = nn.Sequential(nn.Linear(6, 4))
    state = ADMMState(model, Plan({"0": LayerSparsity(T.FILTER, 0.5)}))
    state.set_rho(0.1)
    state.U[0][0].fill_(1.0)
    state.set_rho(0.4)
    assert torch.allclose(state.rho * state.U[0][0], torch.full_like(state.U[0][0], 0.1))


def test_coupled_layers_keep_the_same_filters() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Conv2d(3, 8, 3), "b": nn.Conv2d(3, 8, 1)})
    plan = Plan({"a": LayerSparsity(T.FILTER, 0.5), "b": LayerSparsity(T.FILTER, 0.5)})
    masks = prune_masks(model, plan, Dependencies([Coupling({"a": list(range(8)), "b": list(range(8))})]))
    kept_a, kept_b = (masks[f"{n}.weight"].flatten(1).any(1) for n in "ab")
    assert torch.equal(kept_a, kept_b) and int(kept_a.sum()) == 4
    assert torch.equal(masks["a.bias"], kept_a)  # a pruned filter takes its bias with it


def test_concatenated_producers_keep_the_channels_their_coupled_reader_keeps() -> None:
    """cat([a, b]) added to c's output: a's filter k sits at c's channel k, b's at 4 + k."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Conv2d(3, 4, 1), "b": nn.Conv2d(3, 4, 1), "c": nn.Conv2d(3, 8, 1),
                           "bn": nn.BatchNorm2d(8)})
    with torch.no_grad():
        model["b"].weight.mul_(10)  # b's filters dominate the joint norms
    spec = LayerSparsity(T.FILTER, 0.5)
    coupling = Coupling({"a": [0, 1, 2, 3], "b": [4, 5, 6, 7], "c": list(range(8))},
                        {"bn": (list(range(8)), list(range(8)))})
    masks = prune_masks(model, Plan({n: spec for n in "abc"}), Dependencies([coupling]))
    kept = {n: masks[f"{n}.weight"].flatten(1).any(1) for n in "abc"}
    assert torch.equal(torch.cat([kept["a"], kept["b"]]), kept["c"]) and torch.equal(masks["bn.weight"], kept["c"])
    assert kept["b"].all() and int(kept["a"].sum()) == 1  # half the positions are b's; a keeps its best filter


def test_a_batchnorm_channel_silenced_while_its_input_lives_is_reported() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    right = {"0.weight": torch.tensor([True, False, True, True]).view(4, 1, 1, 1).expand(4, 1, 3, 3),
             "0.bias": torch.tensor([True, False, True, True]), "1.weight": torch.tensor([True, False, True, True])}
    right["1.bias"] = right["1.weight"]
    apply_masks(model, right)
    assert dead_channels(model, right, (1, 8, 8)) == {}
    wrong = {**right, "1.weight": torch.tensor([False, True, True, True])}  # channel 0 lives, 1 is pruned
    assert dead_channels(model, wrong, (1, 8, 8)) == {"1": 1}


def test_pruned_filters_leave_no_ghost_channel_after_batchnorm(digits_baseline: DenseResult) -> None:
    model, data = _digits(digits_baseline)
    plan = Plan({"3": LayerSparsity(T.FILTER, 0.5)})
    masks = prune_masks(model, plan, dependencies(model, data.input_shape))
    apply_masks(model, masks)
    pruned = ~masks["3.weight"].flatten(1).any(1)
    x, _ = next(data.test.batches(16))
    after_bn = model[:6].eval()(x)  # conv 3 -> BatchNorm 4 -> ReLU 5
    assert int(pruned.sum()) == 32 and after_bn[:, pruned].abs().max() == 0
    assert torch.equal(masks["4.weight"], ~pruned) and torch.equal(masks["4.bias"], ~pruned)


def test_prune_achieves_the_plan_and_retraining_keeps_it(digits_baseline: DenseResult) -> None:
    model, data = _digits(digits_baseline)
    plan = Plan(dict(MIXED))
    plan.validate(trace(model, data.input_shape))
    result = run_admm(model, data, plan, SHORT, CPU, dependencies(model, data.input_shape))
    modules = dict(model.named_modules())
    for name, spec in plan.layers.items():
        w = modules[name].weight.detach()
        if spec.type == T.NM:
            assert achieved_rate(w, T.NM) == pytest.approx(0.5)
        else:
            n = num_groups(w, spec.type)
            assert achieved_rate(w, spec.type) == (n - keep_count(n, spec.rate)) / n
        assert torch.equal(w != 0, result.masks[f"{name}.weight"])  # retraining revived nothing
    assert result.accuracy["final"] > result.accuracy["hard_pruned"]


def test_retraining_the_slim_model_is_retraining_the_masked_one(digits_baseline: DenseResult) -> None:
    """Retraining runs on the model with its pruned filters and channels removed, at that model's
    cost: its result is what masked retraining of the whole model gives, to float rounding."""
    plan = Plan(dict(MIXED))
    model, data = _digits(digits_baseline)
    run_admm(model, data, plan, SHORT, CPU)
    masked, _ = _digits(digits_baseline)
    pruned = run_admm(masked, data, plan, replace(SHORT, retrain_epochs=0), CPU)
    slim = slimmed(masked, plan, data.input_shape)
    assert slim is not None and len(slim.model.state_dict()["3.weight"]) < len(masked.state_dict()["3.weight"])
    fit(masked, data, TrainConfig(SHORT.retrain_epochs, SHORT.batch_size, SHORT.retrain_lr, 0.9, SHORT.weight_decay,
                                  SHORT.seed + len(SHORT.iterations())), CPU, masked_hooks(masked, pruned.masks))
    slim_held, masked_held = slim.take(model.state_dict()), slim.take(masked.state_dict())
    assert all(torch.allclose(v.float(), masked_held[k].float(), rtol=1e-3, atol=1e-5) for k, v in slim_held.items())
    x = next(data.val.batches(256))[0]
    assert torch.allclose(model.eval()(x), masked.eval()(x), rtol=1e-3, atol=1e-4)


def test_admm_reports_every_iteration(digits_baseline: DenseResult) -> None:
    model, data = _digits(digits_baseline)
    seen: list[Iteration] = []
    config = ADMMConfig(admm_epochs=1, admm_interval=0.25, retrain_epochs=0)
    run_admm(model, data, Plan({"3": LayerSparsity(T.FILTER, 0.5)}), config, CPU, on_iteration=seen.append)
    assert [i.index for i in seen] == [1, 2, 3, 4] and all(i.total == 4 for i in seen)
    assert [i.rho for i in seen] == pytest.approx([config.rho(k) for k in range(4)])
    assert all(0 <= i.projected_acc <= 100 and i.residual >= 0 for i in seen)


def test_rungs_report_what_the_run_would_end_with_at_each_fraction_of_its_steps(digits_baseline: DenseResult) -> None:
    model, data = _digits(digits_baseline)
    config = ADMMConfig(admm_epochs=1, admm_interval=0.25, retrain_epochs=4, rungs=(1 / 9, 1 / 3, 1.0))
    iterations: list[Iteration] = []
    rungs: list[Rung] = []
    result = run_admm(model, data, Plan({"3": LayerSparsity(T.FILTER, 0.5)}), config, CPU,
                      on_iteration=iterations.append, on_rung=rungs.append)
    total = config.steps(len(data.train))
    assert replace(config, retrain_epochs=0).steps(len(data.train)) < total / 3, "the second rung falls in retraining"
    assert [r.index for r in rungs] == [0, 1, 2] and all(r.total == total for r in rungs)
    first, second, last = rungs
    assert first.phase == "admm" and first.step >= total / 9, "in ADMM: at the iteration that reaches the rung"
    assert first.acc in [i.projected_acc for i in iterations], "the projection, as hard pruning would make it"
    assert second.phase == "retrain" and second.step == math.ceil(total / 3), "in retraining: at its very step"
    assert last.step == total and last.acc == pytest.approx(result.accuracy["final_val"]), \
        "the last rung is the trial's own result"


def test_batchnorm_is_re_estimated_on_the_calibration_images_and_restored_after(digits_baseline: DenseResult) -> None:
    """Inside the block a BatchNorm layer holds the mean and variance of its input over the
    calibration images (eval mode everywhere); after it, the dense statistics, momentum and modes."""
    model, data = _digits(digits_baseline)
    model.train()
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    calibration, seen = data.train.sized(512), []
    handle = norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with refreshed_batchnorm(model, calibration, CPU, batch_size=64):
        handle.remove()
        assert not any(m.training for m in model.modules())
        x = torch.cat(seen).transpose(0, 1).flatten(1)
        assert x.shape[1] == len(calibration) * seen[0].shape[2] * seen[0].shape[3]
        assert torch.allclose(norm.running_mean, x.mean(1), atol=1e-5)
        batch_vars = torch.stack([b.transpose(0, 1).flatten(1).var(1) for b in seen])  # unbiased, per batch
        assert torch.allclose(norm.running_var, batch_vars.mean(0), rtol=1e-4)
    assert all(m.training for m in model.modules()) and norm.momentum == 0.1
    assert all(torch.equal(v, before[k]) for k, v in norm.state_dict().items())


def test_a_projection_of_a_deep_batchnorm_net_is_scored_with_its_statistics_re_estimated(fashion_dir: Path) -> None:
    """The committed dense resnet56 with every conv at filter 30%: with the dense statistics the
    projection scores near chance (so rungs and the sensitivity scan could not rank plans); with
    statistics re-estimated on 512 training images, as retraining would, far above it."""
    checkpoint = Path(__file__).parents[1] / "bench/checkpoints/resnet56-fashion-mnist/dense.pt"
    model, data = prepare("resnet56", "fashion-mnist", fashion_dir, weights=checkpoint)
    plan = Plan({layer.name: LayerSparsity(T.FILTER, 0.3) for layer in trace(model, data.input_shape)
                 if layer.kind == "conv"})
    probe, deps = data.val.sized(500), dependencies(model, data.input_shape)
    stale = projected_accuracy(model, probe, plan, deps, CPU)
    refreshed = projected_accuracy(model, probe, plan, deps, CPU, data.train.sized(CALIBRATION_IMAGES))
    assert stale < 30 and refreshed > stale + 30, (stale, refreshed)


def test_admm_is_deterministic_with_a_seed(digits_baseline: DenseResult) -> None:
    states = []
    for _ in range(2):
        model, data = _digits(digits_baseline)
        run_admm(model, data, Plan(dict(MIXED)), SHORT, CPU)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


RESUMABLE = ADMMConfig(admm_epochs=0.75, admm_interval=0.25, retrain_epochs=2)


class _Cut(Exception):
    """Stands for Ctrl-C at a chosen point of a run."""


def _cut_at(phase: str, iteration: int = 0, epoch: int = 0) -> dict:
    """run_admm callbacks that stop the run after ADMM `iteration` or after retraining `epoch`."""
    def on_iteration(i: Iteration) -> None:
        if phase == "admm" and i.index == iteration:
            raise _Cut

    def on_progress(p) -> None:  # noqa: ANN001
        if phase == "retrain" and p.phase == "retrain" and p.epoch > epoch:
            raise _Cut
    return {"on_iteration": on_iteration, "on_progress": on_progress}


@pytest.mark.parametrize("phase", ["admm", "retrain", "done"])
def test_an_interrupted_admm_run_continues_to_the_result_of_an_uninterrupted_one(
        digits_baseline: DenseResult, tmp_path: Path, phase: str) -> None:
    """Cut after ADMM iteration 2, after retraining epoch 1, or after the run returned (its caller
    died before saving): the same call continues where it stopped and ends with the weights, masks,
    accuracies and iterations of a run never interrupted."""
    model, data = _digits(digits_baseline)
    whole = run_admm(model, data, Plan(dict(MIXED)), RESUMABLE, CPU)
    resume = tmp_path / "admm.resume.pt"
    cut, _ = _digits(digits_baseline)
    if phase == "done":
        run_admm(cut, data, Plan(dict(MIXED)), RESUMABLE, CPU, resume=resume)
    else:
        with pytest.raises(_Cut):
            run_admm(cut, data, Plan(dict(MIXED)), RESUMABLE, CPU, resume=resume, **_cut_at(phase, 2, 1))
    assert resume.is_file()
    if phase == "retrain":
        assert resume_files(resume)[1].is_file(), "retraining keeps its epochs beside the run's state"
    again, _ = _digits(digits_baseline)
    seen: list[Iteration] = []
    resumed = run_admm(again, data, Plan(dict(MIXED)), RESUMABLE, CPU, on_iteration=seen.append, resume=resume)
    steps, total = RESUMABLE.admm_steps(len(data.train)), RESUMABLE.steps(len(data.train))
    assert resumed.resumed_at == {"admm": 2 * steps // 3, "retrain": steps, "done": total}[phase]
    assert [i.index for i in seen] == ([3] if phase == "admm" else []), "finished iterations are not run again"
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(m, resumed.masks[k]) for k, m in whole.masks.items())
    assert resumed.accuracy == whole.accuracy and resumed.iterations == whole.iterations
    assert torch.equal(resumed.val_correct, whole.val_correct)
    assert not resume_files(resume)[1].exists(), "a finished run leaves only its own state for its caller to delete"


def test_a_resume_file_of_another_run_is_ignored(digits_baseline: DenseResult, tmp_path: Path) -> None:
    """Other starting weights, another plan or another config: the run starts from its first iteration."""
    resume = tmp_path / "admm.resume.pt"
    mixed = Plan(dict(MIXED))

    def first_iteration(plan: Plan, config: ADMMConfig, scale: float = 1.0) -> int:
        model, data = _digits(digits_baseline)
        with torch.no_grad():
            next(model.parameters()).mul_(scale)
        seen: list[Iteration] = []
        with pytest.raises(_Cut):
            run_admm(model, data, plan, config, CPU, resume=resume,
                     on_iteration=lambda i: (seen.append(i), _cut_at("admm", i.index)["on_iteration"](i)))
        return seen[0].index

    assert first_iteration(mixed, RESUMABLE) == 1
    assert first_iteration(mixed, RESUMABLE) == 2, "the same run goes on"
    for plan, config, scale in [(Plan({"3": LayerSparsity(T.FILTER, 0.5)}), RESUMABLE, 1.0),
                                (mixed, replace(RESUMABLE, lr=0.02), 1.0), (mixed, RESUMABLE, 1.01),
                                (mixed, replace(RESUMABLE, precision="bfloat16"), 1.0)]:
        first_iteration(mixed, RESUMABLE)  # the file holds the original run again
        assert first_iteration(plan, config, scale) == 1
    model, data = _digits(digits_baseline)
    assert "precision" not in run_key(model, data, mixed, RESUMABLE)["config"], \
        "a float32 run keeps the key it had before precision was a setting: its resume files stay valid"


def test_half_the_filters_cost_at_most_one_point_on_digits(digits_baseline: DenseResult) -> None:
    model, data = _digits(digits_baseline)
    plan = Plan.uniform([layer for layer in trace(model, data.input_shape) if layer.kind == "conv"], T.FILTER, 0.5)
    result = run_admm(model, data, plan, ADMMConfig(), CPU)
    assert result.accuracy["final"] >= digits_baseline.test_acc - 1.0


def test_prune_command_writes_weights_plan_and_metrics(digits_baseline: DenseResult, tmp_path: Path) -> None:
    # no --model/--dataset: the checkpoint's sidecar says digits-cnn on digits
    args = ["prune", "--checkpoint", str(digits_baseline.checkpoint), "--plan", "shape=0.5",
            "--admm-epochs", "0.5", "--retrain-epochs", "0.5", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "pruned.json").read_text())
    assert Plan.load(tmp_path / "plan.json") == Plan.parse("shape=0.5", trace(*_model_and_shape(digits_baseline)))
    assert {r["layer"]: r["achieved"] for r in meta["layers"]}["3"] == 0.5
    assert meta["macs"]["compacted"] < meta["macs"]["dense"] and len(meta["admm_iterations"]) == 2
    assert set(meta["accuracy"]) >= {"dense", "hard_pruned", "final"}
    assert not list(tmp_path.glob("*resume*")), "a finished prune leaves no resume state behind"


def _model_and_shape(baseline: DenseResult):  # noqa: ANN202
    model, data = _digits(baseline)
    return model, data.input_shape


def test_prune_with_a_bad_plan_is_one_line(digits_baseline: DenseResult, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["prune", "--checkpoint", str(digits_baseline.checkpoint),
                                      "--plan", "fliter=0.5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip() == "error: unknown sparsity type 'fliter': did you mean filter? in --plan"
    assert not any(tmp_path.iterdir())  # nothing written


def test_prune_refuses_a_model_that_contradicts_the_sidecar(digits_baseline: DenseResult, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["prune", "--checkpoint", str(digits_baseline.checkpoint), "--plan", "filter=0.5",
                                      "--model", "lenet5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip() == ("error: --model lenet5 contradicts dense.json, which records model digits-cnn; "
                                     "drop --model or pass the checkpoint trained with it")
    assert not any(tmp_path.iterdir())


def test_compact_command_measures_the_pruned_model(digits_baseline: DenseResult, tmp_path: Path) -> None:
    runner = CliRunner()
    pruned = runner.invoke(app, ["prune", "--checkpoint", str(digits_baseline.checkpoint), "--plan", "filter=0.5",
                                 "--admm-epochs", "0.25", "--retrain-epochs", "0.25", "--out", str(tmp_path)])
    assert pruned.exit_code == 0, pruned.output
    result = runner.invoke(app, ["compact", "--checkpoint", str(tmp_path / "pruned.pt"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "159,850" in out and "40,506" in out and "speedup" in out and "filters-removed: 4" in out
    import sparsesearch

    loaded = sparsesearch.load(tmp_path / "compacted" / "model.pt")  # the written model, without the plan
    assert sum(p.numel() for p in loaded.parameters()) == 40_506
    assert (tmp_path / "compacted" / "model.torchscript.pt").exists()
    last = runner.invoke(app, ["compact", "--checkpoint", str(tmp_path / "pruned.pt"), "--threads", "1",
                               "--channels-last", "--out", str(tmp_path / "cl")])
    assert last.exit_code == 0, last.output
    assert "channels-last" in last.stdout
    assert json.loads((tmp_path / "cl" / "model.json").read_text())["measured"]["layout"] == "channels-last"


def test_compact_refuses_a_dense_checkpoint(digits_baseline: DenseResult) -> None:
    result = CliRunner().invoke(app, ["compact", "--checkpoint", str(digits_baseline.checkpoint)])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: ") and "compact the output of `sparsesearch prune`" in result.stderr
