"""The command line as a user meets it: listings, a training run, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparsesearch import cli
from sparsesearch.cli import app
from sparsesearch.train import DenseResult

runner = CliRunner()


def test_models_lists_builtins_torchvision_and_user_factories() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for name in ("digits-cnn", "lenet5", "vgg16-bn", "resnet56", "tv:resnet18", "tv:mobilenet_v2", "package.module:factory"):
        assert name in result.stdout


def test_datasets_lists_every_dataset() -> None:
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 0
    for name in ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH"):
        assert name in result.stdout


def test_train_writes_checkpoint_and_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "run" / "dense.pt"
    result = runner.invoke(app, ["train", "--epochs", "1", "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert "test" in result.stdout and str(out) in result.stdout.replace("\n", "")


def _error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_unknown_model_is_one_line_with_close_matches() -> None:
    assert "did you mean resnet20" in _error(["train", "--model", "resnet-20"])


def test_unknown_dataset_is_one_line_with_close_matches() -> None:
    assert "did you mean cifar10" in _error(["train", "--dataset", "cifar-10"])


def test_missing_data_dir_is_one_line(tmp_path: Path) -> None:
    line = _error(["train", "--model", "lenet5", "--dataset", "mnist", "--data-dir", str(tmp_path / "none")])
    assert "does not exist" in line and "--download" in line


def test_mismatched_checkpoint_is_one_line(digits_baseline: DenseResult) -> None:
    line = _error(["train", "--model", "resnet20", "--checkpoint", str(digits_baseline.checkpoint)])
    assert "does not fit model 'resnet20'" in line


def test_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    assert "checkpoint not found" in _error(["train", "--checkpoint", str(tmp_path / "nope.pt")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_one_line() -> None:
    assert "no CUDA GPU" in _error(["train", "--device", "cuda"])


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--epochs", "nan"], "--epochs must be a finite number > 0, got nan"),
    (["train", "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["train", "--batch-size", "0"], "--batch-size must be a finite number > 0, got 0"),
    (["prune", "--checkpoint", "x.pt", "--plan", "filter=0.5", "--admm-interval", "0"], "--admm-interval must be"),
    (["prune", "--checkpoint", "x.pt", "--plan", "filter=0.5", "--admm-epochs", "-1"], "--admm-epochs must be a finite number >= 0"),
    (["prune", "--checkpoint", "x.pt", "--plan", "filter=0.5", "--rho0", "nan"], "--rho0 must be a finite number > 0"),
    (["compact", "--checkpoint", "x.pt", "--batch-size", "0"], "--batch-size must be"),
    (["profile", "--batch-size", "0"], "--batch-size must be"),
    (["optimize", "--max-acc-drop", "nan"], "--max-acc-drop must be a number of accuracy points from 0 to 100, got"),
    (["optimize", "--max-acc-drop", "-1"], "--max-acc-drop must be a number of accuracy points from 0 to 100"),
    (["finalize", "s", "--max-acc-drop", "1000"], "--max-acc-drop must be a number of accuracy points"),
    (["finalize", "s", "--confidence", "-0.2"], "--confidence must be a probability between 0 and 1"),
    (["finalize", "s", "--replicates", "0"], "--replicates must be a finite number > 0, got 0"),
    (["optimize", "--precision", "float16"], "--precision must be one of float32, bfloat16, got 'float16'"),
    (["optimize", "--full-runs", "1"], "--full-runs must be a share of the run's time in [0, 1), got 1.0"),
    (["optimize", "--full-epochs", "x"], "--full-epochs 'x' must be ADMM+RETRAIN epochs"),
])
def test_a_numeric_option_out_of_range_is_one_line_and_runs_nothing(
        args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert message in _error(args)
    assert not any(tmp_path.iterdir())  # no study, checkpoint or profile started


def test_an_empty_checkpoint_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "is not a readable weights-only torch checkpoint (EOFError)" in _error(
        ["train", "--checkpoint", str(tmp_path / "empty.pt"), "--epochs", "0.01"])


def test_a_diverging_run_stops_in_one_line_and_keeps_the_checkpoint(digits_baseline: DenseResult, tmp_path: Path) -> None:
    out = tmp_path / "dense.pt"
    out.write_bytes(digits_baseline.checkpoint.read_bytes())
    before = out.read_bytes()
    line = _error(["train", "--lr", "1e6", "--epochs", "1", "--out", str(out), "--threads", "1"])
    assert line.startswith("error: training diverged: the loss is nan") and out.read_bytes() == before
    assert not out.with_suffix(".json").exists()  # nothing new written beside it either


@pytest.mark.parametrize("args", [["train", "--epochs", "0.05", "--out", "dense.pt"], ["optimize", "--budget", "1"]])
def test_a_folder_that_cannot_be_written_is_one_line(read_only: Path, monkeypatch: pytest.MonkeyPatch,
                                                       args: list[str]) -> None:
    monkeypatch.chdir(read_only)
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "(Read-only file system); pick a folder you can write or fix its permissions" in result.stderr


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(digits_baseline: DenseResult, tiny_disk: Path) -> None:
    out = tiny_disk / "dense.pt"
    out.write_bytes(digits_baseline.checkpoint.read_bytes())  # 640 kB of the 1 MB: no room for a second copy
    before = out.read_bytes()
    result = runner.invoke(app, ["train", "--epochs", "0.05", "--out", str(out), "--threads", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == (f"error: no space left on the device holding {out}; free some and run again "
                                     "(earlier files are intact)")
    assert out.read_bytes() == before and sorted(p.name for p in tiny_disk.iterdir()) == ["dense.pt"]


def test_export_names_its_own_epochs_option(tmp_path: Path) -> None:
    from sparsesearch.search import parse_epochs
    from sparsesearch.errors import UserError

    with pytest.raises(UserError, match=r"^--epochs 'abc' must be ADMM\+RETRAIN epochs"):
        parse_epochs("abc", "--epochs")
    with pytest.raises(UserError, match="must be ADMM"):
        parse_epochs("nan+1")


def test_a_refused_optimize_leaves_no_study_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert "checkpoint not found: nope.pt" in _error(["optimize", "--study", "s", "--checkpoint", "nope.pt"])
    assert not (tmp_path / "studies" / "s").exists()


def test_sparsesearch_debug_shows_the_whole_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsesearch.errors import UserError

    monkeypatch.setenv("SPARSESEARCH_DEBUG", "1")
    result = runner.invoke(app, ["train", "--model", "resnet-20"])
    assert isinstance(result.exception, UserError) and "did you mean resnet20" in str(result.exception)


def test_a_file_naming_a_factory_of_your_own_does_not_get_it_imported(digits_baseline: DenseResult, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint sidecar or a study from someone else may name `evilmod:net`; with evilmod.py in
    the working directory, no command imports it unless the user names that model themselves."""
    import json
    import shutil

    from sparsesearch import search, storage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "evilmod.py").write_text("open('IMPORTED', 'w').close()\n\ndef net(num_classes=10, in_channels=1):\n"
                                         "    raise SystemExit('ran')\n")
    pruned = tmp_path / "pruned.pt"
    shutil.copy(digits_baseline.checkpoint, pruned)
    meta = json.loads(digits_baseline.checkpoint.with_suffix(".json").read_text())
    pruned.with_suffix(".json").write_text(json.dumps({**meta, "model": "evilmod:net", "kind": "pruned",
                                                       "plan": "plan.json"}))
    study = storage.open_study("s", None, create=True)
    study.set_user_attr("config", search.SearchConfig(model="evilmod:net").to_attrs())
    says = "names the model 'evilmod:net', a factory of your own; pass --model evilmod:net to import it"
    for args in (["prune", "--checkpoint", str(pruned), "--plan", "filter=0.5"],
                 ["compact", "--checkpoint", str(pruned)], ["measure", "s"], ["export", "s", "--trial", "0"],
                 ["finalize", "s"], ["optimize", "--study", "s", "--budget", "1"]):
        assert says in _error(args), args
    assert not (tmp_path / "IMPORTED").exists()


def test_progress_reaches_a_log_file_as_plain_lines(tmp_path: Path) -> None:
    """Output that is not a terminal (here, CliRunner's; in life, a log) gets the bar's progress as
    lines: several along the way with an ETA, and the last one at the end."""
    result = runner.invoke(app, ["train", "--epochs", "1", "--out", str(tmp_path / "dense.pt"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("train: ")]
    assert len(lines) >= 5 and any("ETA" in line for line in lines), lines
    assert lines[-1].startswith("train: 17/17 "), lines[-1]  # ceil(1078 / 64) steps


def test_a_resumed_job_estimates_its_eta_from_the_work_done_since_it_resumed(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A training run resumed at step 900 of 1000 that does 5 steps a second has 10 s left at step
    950, not the 0.5 s that counting its 900 earlier steps as done in this run's time would say."""
    clock = iter([0.0, 0.0, 10.0])
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    update = cli._progress_lines("train", every_s=0)
    update(900, 1000)
    update(950, 1000)
    assert capsys.readouterr().out.splitlines()[-1] == "train: 950/1000 (0:00:10 elapsed, ETA 0:00:10)"


def test_a_new_phase_counts_its_elapsed_time_and_eta_from_its_own_start(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A profile's 100 layer rows took 100 s; its 32 calibration plans then go at their own pace
    (half done 10 s in: 10 s left), not at the rows' pace nor on the rows' clock."""
    clock = iter([0.0, 0.0, 100.0, 100.0, 110.0])
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    update = cli._progress_lines("profile", every_s=0)
    update(0, 100)
    update(100, 100)
    update(0, 32, "calibration plans")
    update(16, 32, "calibration plans")
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "profile: 0/32 calibration plans (0:00:00 elapsed)",
        "profile: 16/32 calibration plans (0:00:10 elapsed, ETA 0:00:10)"]


def test_an_image_folder_is_decoded_once_and_its_side_travels_with_the_checkpoints(tmp_path: Path) -> None:
    import json

    from helpers import image_folder

    dataset = f"imagefolder:{image_folder(tmp_path / 'imgs', per_class=12)}"
    dense = tmp_path / "dense.pt"
    trained = runner.invoke(app, ["train", "--model", "resnet20", "--dataset", dataset, "--image-size", "40",
                                  "--epochs", "0.5", "--out", str(dense), "--threads", "1"])
    assert trained.exit_code == 0, trained.output
    assert "decoding 36 images" in trained.stdout
    assert json.loads(dense.with_suffix(".json").read_text())["input_shape"] == [3, 40, 40]

    listed = runner.invoke(app, ["layers", "--model", "resnet20", "--dataset", dataset, "--image-size", "40"])
    assert listed.exit_code == 0 and "3x40x40 input" in listed.stdout and "decoding" not in listed.stdout

    pruned = runner.invoke(app, ["prune", "--checkpoint", str(dense), "--plan", "filter=0.5", "--admm-epochs", "0.5",
                                 "--retrain-epochs", "0.5", "--threads", "1", "--out", str(tmp_path / "p")])
    assert pruned.exit_code == 0, pruned.output
    assert "decoding" not in pruned.stdout  # read from the cache
    assert json.loads((tmp_path / "p" / "pruned.json").read_text())["input_shape"] == [3, 40, 40]

    compacted = runner.invoke(app, ["compact", "--checkpoint", str(tmp_path / "p" / "pruned.pt"), "--threads", "1"])
    assert compacted.exit_code == 0, compacted.output
    assert json.loads((tmp_path / "p" / "compacted" / "model.json").read_text())["input_shape"] == [3, 40, 40]

    line = _error(["prune", "--checkpoint", str(dense), "--plan", "filter=0.5", "--image-size", "48"])
    assert "--image-size 48 contradicts dense.json, which records 40 px inputs" in line
