"""The report of a study: pareto.json, the plots and report.md, from a hand-made study (no training),
and the report/export commands' one-line errors."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from sparsesearch import report, search
from sparsesearch.cli import app

PLANS = {
    0: ({"0": {"type": "filter", "rate": 0.3}, "3": {"type": "filter", "rate": 0.3}}, 99.4, 1.3, "filter=0.3"),
    1: ({"0": {"type": "filter", "rate": 0.5}, "3": {"type": "filter", "rate": 0.5}}, 98.1, 1.6, "filter=0.5"),
    2: ({"3": {"type": "shape", "rate": 0.6}, "7": {"type": "irregular", "rate": 0.8}}, 99.3, 1.8, None),
    3: ({"0": {"type": "filter", "rate": 0.7}}, 90.0, 2.2, None),
}


def _study(storage: str) -> optuna.Study:
    study = optuna.create_study(study_name="made", storage=storage, directions=["maximize", "maximize"])
    study.set_user_attr("config", {"model": "digits-cnn", "dataset": "digits", "max_acc_drop": 1.0,
                                   "types": ["filter", "shape", "irregular"], "admm_epochs": 1, "retrain_epochs": 3,
                                   "batch_size": 1, "sampler": "tpe"})
    study.set_user_attr("dense", {"val": 99.7, "test": 98.9})
    study.set_user_attr("setting", {"device": "cpu", "device_name": "Test CPU", "batch_size": 1, "threads": 2})
    study.set_user_attr("layers", ["0", "3", "7", "12", "14"])
    for number, (plan, acc, speedup, baseline) in PLANS.items():
        attrs = {"plan": plan, "val_acc": acc, "test_acc": acc - 0.5, "acc_drop": 99.7 - acc,
                 "feasible": 99.7 - acc <= 1.0, "predicted_speedup": speedup, "predicted_ms": 0.2 / speedup,
                 "train_seconds": 10.0}
        if baseline:
            attrs["baseline"] = baseline
        study.add_trial(optuna.trial.create_trial(values=[acc, speedup], user_attrs=attrs,
                                                  system_attrs={"constraints:accuracy_drop": 99.7 - acc - 1.0}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={
        "plan": {}, "rejected": "predicted slower than the dense model (0.90x)"}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={
        "plan": {"3": {"type": "filter", "rate": 0.9}}, "predicted_speedup": 1.5, "train_seconds": 2.0,
        "rungs": [{"step": 3, "of": 27, "phase": "admm", "acc": 50.0}], "pruned": "stopped at 3/27 steps: ..."}))
    study.set_user_attr("measured", {str(n): {"measured_speedup": s * 1.1, "latency_ms": {"dense": 0.2, "compacted": 0.2 / s},
                                              "macs": {"dense": 100, "compacted": 40}, "params": {"dense": 10, "compacted": 5}}
                                     for n, (_, _, s, _) in PLANS.items() if n != 3})
    return study


def test_front_holds_feasible_pareto_trials_only(tmp_path: Path) -> None:
    study = _study(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert [t.number for t in report.front(study)] == [0, 2]
    assert [t.number for t in report.baselines(study)] == [0, 1]


def test_once_full_runs_raised_the_trial_limit_the_front_holds_the_plans_within_it(tmp_path: Path) -> None:
    """A calibrated study's fastest plans lost more in their trials than the user's limit: the
    front the report measures holds them, Pareto-optimal among the trials judged promising."""
    study = _study(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.set_user_attr(report.export_key(study, 3, "4+2"), {  # lost 9.7 in its trial, 0.2 retrained
        "val_drop": 0.2, "val_drop_se": 0.1, "test_drop": 0.2, "speedup": 2.0, "epochs": "4+2"})
    assert search.trial_limit(study, 1.0) == pytest.approx(9.7)
    assert [t.number for t in report.front(study)] == [0, 2, 3], "trial 1 is dominated by trial 2"


def test_best_within_picks_the_fastest_measured_row_inside_the_drop(tmp_path: Path) -> None:
    data = report.pareto(_study(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    assert report.best_within(data["pareto"], 0.5)["trial"] == 2
    assert report.best_within(data["baselines"], 1.0)["trial"] == 0
    assert report.best_within(data["baselines"], 0.1) is None


def test_write_produces_the_json_the_plots_and_the_markdown(tmp_path: Path) -> None:
    study = _study(f"sqlite:///{tmp_path / 'db.sqlite'}")
    paths = report.write(study, tmp_path / "out")
    assert [p.name for p in paths] == ["pareto.json", "pareto.png", "predicted_vs_measured.png", "layers.png", "report.md"]
    for png in paths[1:4]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| 2 |" in text and "1.98x" in text, "the Pareto table shows the measured speedup"
    assert "best uniform baseline: 1.43x (filter=0.3)" in text
    assert "stopped 1 at rung 1; trials trained 8 s on average, 10 s those run to the end" in text, \
        "what the fidelity ladder saved"


@pytest.mark.parametrize("n_layers", [5, 22, 60])
def test_the_layers_plot_keeps_each_layer_readable(n_layers: int, tmp_path: Path) -> None:
    """Up to 12 layers run across; more run down, one row each: at every size a layer's row or
    column stays at least 30 px and the text 8 pt at 120 dpi."""
    import matplotlib
    from matplotlib.image import imread

    matplotlib.use("Agg")
    names = [f"stage{i // 10}.block{i % 10}.conv" for i in range(n_layers)]
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_user_attr("layers", names)
    for i, rate in enumerate([0.3, 0.5, 0.7]):
        study.add_trial(optuna.trial.create_trial(values=[99.0 - i, 1.2 + i], user_attrs={
            "plan": {n: {"type": "filter", "rate": rate} for n in names}, "val_acc": 99.0 - i, "feasible": True,
            "baseline": f"filter={rate}"}))
    height, width = imread(report.plot_layers(study, tmp_path / "layers.png")).shape[:2]
    along = height if n_layers > 12 else width
    assert along / n_layers >= 30, (height, width)
    assert (height > width) == (n_layers > 12)


def test_a_deep_plan_reads_as_its_types_and_rates_with_layer_counts() -> None:
    """A few layers are spelled out; 55 would make a table cell of 2,000 characters."""
    few = {"0": {"type": "filter", "rate": 0.3}, "3": {"type": "shape", "rate": 0.5}}
    assert report._plan_text(few) == "0: filter 0.30, 3: shape 0.50"
    deep = {f"layer{i}": {"type": "filter", "rate": 0.45 if i < 19 else 0.1} for i in range(54)}
    deep["linear"] = {"type": "channel", "rate": 0.3}
    assert report._plan_text(deep) == "filter 0.10 ×35, filter 0.45 ×19, channel 0.30 ×1 (layers.png)"
    assert report._plan_text({}) == "dense"


def test_the_report_sets_exported_drops_beside_their_trials(tmp_path: Path) -> None:
    """How strict a limit at trial fidelity is on the shipped model: the median ratio of the drops,
    over the trials that lost enough to divide by; a study attr naming no trial of it is ignored."""
    study = _study(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for number, val_drop in ((0, 0.06), (2, 0.12), (1, 0.4), (9, 5.0)):
        study.set_user_attr(f"{report.EXPORTED}{number}", {"val_drop": val_drop, "test_drop": 0.1, "speedup": 1.5,
                                                           "epochs": "10+5"})
    assert [r["trial"] for r in report.exported(study)] == [0, 1, 2]
    text = report.markdown(study)
    assert "| 2 | 0.40 | 0.12 | 0.10 | 10+5 | 1.50x |" in text
    assert "drops are 0.25x their drops at trial fidelity (median over the 3 whose trial lost at least" in text


def test_the_report_says_which_plan_finalize_ships_or_that_none_is_within_the_limit_yet(tmp_path: Path) -> None:
    study = _study(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for number, val_drop in ((0, 0.2), (1, 0.9)):
        study.set_user_attr(f"{report.EXPORTED}{number}", {"val_drop": val_drop, "val_drop_se": 0.1, "test_drop": 0.1,
                                                           "speedup": 1.5 + number, "epochs": "4+2"})
    study.set_user_attr(report.FINALIZED, {"limit": 0.5, "epochs": "4+2", "front": [0, 2, 1], "retrained": [0, 1],
                                           "best": 0, "settled": False})
    text = report.markdown(study)
    assert "Bisecting the 3 plans of the trials' front" in text and "with 2 full runs of 4+2 epochs" in text
    assert ("**Ship trial 0**: retrained 0.20 ± 0.10 points below the dense model (100% sure within 0.5; asked: "
            "50%), measured 1.50x") in text
    assert "not settled" in text
    study.set_user_attr(report.FINALIZED, {"limit": 0.1, "epochs": "4+2", "front": [0, 2, 1], "retrained": [0, 1],
                                           "best": None, "settled": True})
    text = report.markdown(study)
    assert "No plan of the front is within 0.1 points retrained yet." in text and "not settled" not in text


def test_report_of_an_unknown_study_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "nope"])
    assert result.exit_code == 2
    assert "no study 'nope'" in result.output and "Traceback" not in result.output


def test_export_of_a_trial_not_in_the_study_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    _study(storage)
    result = CliRunner().invoke(app, ["export", "made", "--trial", "42", "--storage", storage])
    assert result.exit_code == 2 and "has no trial 42" in result.output
    result = CliRunner().invoke(app, ["export", "made", "--trial", "3", "--storage", storage])
    assert result.exit_code == 2 and "not feasible" in result.output


def test_finalize_of_an_unknown_study_or_a_negative_run_count_is_one_line(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["finalize", "nope"])
    assert result.exit_code == 2 and "no study 'nope'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["finalize", "nope", "--retrains", "-1"])
    assert result.exit_code == 2 and "--retrains must be a finite number >= 0" in result.output


def test_report_command_writes_into_the_study_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    _study(storage)
    result = CliRunner().invoke(app, ["report", "made", "--storage", storage])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "studies" / "made" / "report.md").is_file()
    assert "not measured yet" not in result.output
