"""Many workers on one study, on this machine: trials per hour with 1 and 2 `sparsesearch optimize`
workers sharing one study (SQLite and PostgreSQL), and what SIGKILLing workers mid-trial costs.

Each worker is the CLI as a subprocess, single-threaded and pinned to its own core with taskset
(1 worker: core 1; 2 workers: cores 0 and 1), started in a temporary project folder that holds a
dense digits-cnn checkpoint and this machine's 1-thread latency profile, so no worker trains or
profiles. PostgreSQL is a throwaway server (tests/postgres.py); where it cannot run, its rows say
why and the kill test runs on SQLite.

Run alone (`make bench`): another busy process on these 2 cores slows the workers.
Usage: python bench/scale.py [--budget N] [--trial-epochs A+R] [--kills K] [--kill-budget N] [--quick]
(--quick: a smoke run at a tiny budget, written to results/scale-quick.md instead.)
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import record  # noqa: E402
from postgres import Unavailable, throwaway_cluster  # noqa: E402

from sparsesearch import report, search  # noqa: E402
from sparsesearch.profiler.measure import Target, profile_model  # noqa: E402
from sparsesearch.profiler.table import fingerprint, profile_name  # noqa: E402
from sparsesearch.train import TrainConfig, prepare, train_dense  # noqa: E402

CPU = torch.device("cpu")
CLI = Path(sys.executable).parent / "sparsesearch"
MODEL, DATASET, TYPES, RATES = "digits-cnn", "digits", ["filter", "shape"], [0, 0.3, 0.5, 0.7]
OPTIONS = ["--threads", "1", "--types", ",".join(TYPES), "--max-acc-drop", "20"]
# The tests' coarse timing: the default one took 571 s for this profile (its 32 calibration plans timed
# beside the dense net) in a smoke run on a busy machine. The profile only prices candidates; every
# number here is timed on trials, and the Pareto front is measured by compacting, whatever the profile.
PROFILE_TIMING = {"rounds": 3, "warmup_s": 0.005, "min_round_s": 0.002, "max_rounds": 3}
STALE_AFTER_S = 5
QUICK = {"budget": 4, "kills": 1, "kill_budget": 5}
COLUMNS = ["storage", "workers", "cores", "budget", "trained", "trained = budget", "baselines trained",
           "rejected", "wall (s)", "trials/h (wall)", "steady span (s)", "trials/h (steady)", "steady vs 1 worker",
           "load avg before", "note"]


class Project:
    """The temporary working folder every worker starts in, and how to start one there."""

    def __init__(self, root: Path, epochs: str) -> None:
        self.root, self.epochs, self.logs = root, epochs, root / "logs"
        self.logs.mkdir(parents=True)
        self.checkpoint = root / "dense.pt"

    def prepare(self, core: int) -> dict[str, float]:
        """Train the dense checkpoint, then profile digits-cnn at 1 thread on `core` (the single
        worker's), into hardware_profiles/ where a worker started here with --threads 1 finds it.
        Returns the seconds each took."""
        start = time.perf_counter()
        train_dense(MODEL, DATASET, TrainConfig(), CPU, self.checkpoint)
        seconds = {"train": time.perf_counter() - start}
        threads, cores = torch.get_num_threads(), os.sched_getaffinity(0)
        torch.set_num_threads(1)
        os.sched_setaffinity(0, {core})
        try:
            model, data = prepare(MODEL, DATASET, weights=self.checkpoint)
            out = self.root / "hardware_profiles" / profile_name(fingerprint(CPU, 1, "float32"))
            start = time.perf_counter()
            profile_model(Target(MODEL, model.eval(), data.input_shape), CPU, 1, rates=RATES, types=TYPES, out=out,
                          timing=PROFILE_TIMING)
            seconds["profile"] = time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)
            os.sched_setaffinity(0, cores)
        return seconds

    def command(self, study: str, url: str, budget: int, *extra: str) -> list[str]:
        return [str(CLI), "optimize", "--study", study, "--storage", url, "--budget", str(budget),
                "--checkpoint", str(self.checkpoint), "--artifacts", str(self.root / "artifacts" / study),
                "--trial-epochs", self.epochs, *OPTIONS, *extra]

    def worker(self, core: int, log: str, study: str, url: str, budget: int, *extra: str) -> subprocess.Popen:
        """A worker pinned to `core` (taskset execs it: its pid is the worker's), output to logs/LOG."""
        with (self.logs / log).open("w") as out:
            return subprocess.Popen(["taskset", "-c", str(core), *self.command(study, url, budget, *extra)],
                                    cwd=self.root, stdout=out, stderr=subprocess.STDOUT)

    def failure(self, log: str) -> str:
        """A failed worker's last line for the results (its output's end goes to stdout)."""
        text = (self.logs / log).read_text(errors="replace")
        print(f"--- the end of {log} ---\n{text[-4000:]}")
        return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")


# --- reading a study ------------------------------------------------------------------------------


def baseline_counts(study: optuna.Study) -> dict[str, int]:
    """How many times each uniform baseline the study enqueued was trained."""
    labels = {t.user_attrs["baseline"] for t in study.get_trials(False) if "baseline" in t.user_attrs}
    trained = collections.Counter(t.user_attrs.get("baseline") for t in search.trained_trials(study))
    return {label: trained[label] for label in sorted(labels)}


def baselines_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{label} x{n}" for label, n in counts.items()) or "none enqueued"


def steady_span_s(trained: list[FrozenTrial]) -> float:
    """First trained trial's start to last trained trial's completion, in seconds."""
    return (max(t.datetime_complete for t in trained) - min(t.datetime_start for t in trained)).total_seconds()


def worker_pid(trial: FrozenTrial) -> int | None:
    pid = str(trial.user_attrs.get("worker", "")).rpartition(":")[2]
    return int(pid) if pid.isdigit() else None


# --- throughput -----------------------------------------------------------------------------------


def throughput(project: Project, storage: str, url: str, cores: list[int], budget: int) -> dict[str, Any]:
    """All workers started together on a fresh study; the row once every one of them has exited."""
    study, load = f"{storage}-{len(cores)}w", os.getloadavg()[0]
    logs = [f"{study}-{i}.log" for i in range(len(cores))]
    start = time.perf_counter()
    workers = [project.worker(core, log, study, url, budget) for core, log in zip(cores, logs)]
    codes = [w.wait() for w in workers]
    wall = time.perf_counter() - start
    note = "; ".join(f"worker on core {c} exited {code}: {project.failure(log)}"
                     for c, code, log in zip(cores, codes, logs) if code != 0)
    row = dict.fromkeys(COLUMNS) | {"storage": storage, "workers": len(cores), "cores": ",".join(map(str, cores)),
                                    "budget": budget, "wall (s)": wall, "load avg before": load, "note": note}
    try:
        loaded = optuna.load_study(study_name=study, storage=url)
    except KeyError:
        return row | {"note": note or "no study was created"}
    trained = search.trained_trials(loaded)
    counts = baseline_counts(loaded)
    row |= {"trained": len(trained), "trained = budget": len(trained) == budget,
            "baselines trained": baselines_text(counts) + ("" if _each_once(counts) else " (NOT each once)"),
            "rejected": sum("rejected" in t.user_attrs for t in loaded.get_trials(False)),
            "trials/h (wall)": 3600 * len(trained) / wall}
    if trained:
        span = steady_span_s(trained)
        row |= {"steady span (s)": span, "trials/h (steady)": 3600 * len(trained) / span}
    return row


def _each_once(counts: dict[str, int]) -> bool:
    return len(counts) == 3 and set(counts.values()) == {1}


def skipped(storage: str, cores: list[int], budget: int, reason: str) -> dict[str, Any]:
    return dict.fromkeys(COLUMNS) | {"storage": storage, "workers": len(cores), "cores": ",".join(map(str, cores)),
                                     "budget": budget, "note": f"skipped: {reason}"}


def compare_to_one_worker(rows: list[dict[str, Any]]) -> None:
    """Each row's steady rate over the 1-worker row's of the same storage."""
    single = {r["storage"]: r["trials/h (steady)"] for r in rows if r["workers"] == 1}
    for r in rows:
        if r["trials/h (steady)"] and single.get(r["storage"]):
            r["steady vs 1 worker"] = r["trials/h (steady)"] / single[r["storage"]]


# --- the kill test --------------------------------------------------------------------------------


def training_trial(study: str, url: str, workers: dict[int, subprocess.Popen], since: float,
                   timeout_s: float = 900) -> tuple[int, int, set[int]] | None:
    """The first RUNNING trial seen with a `claimed` attr (it is training) newer than `since`, whose
    worker is one of ours and alive: its number, that worker's core, and the numbers of the finished
    (COMPLETE/PRUNED) trials in the same read. None once every worker has exited."""
    deadline, loaded = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline and any(w.poll() is None for w in workers.values()):
        try:
            loaded = loaded or optuna.load_study(study_name=study, storage=url)
            trials = loaded.get_trials(False)
        except Exception:  # noqa: BLE001 - no worker has created the study (or its tables) yet
            trials = []
        alive = {w.pid: core for core, w in workers.items() if w.poll() is None}
        for t in trials:
            if t.state == TrialState.RUNNING and t.user_attrs.get("claimed", 0) > since and worker_pid(t) in alive:
                return t.number, alive[worker_pid(t)], {f.number for f in trials if f.state in search.FINISHED}
        time.sleep(0.2)
    return None


def kill_test(project: Project, storage: str, url: str, cores: list[int], budget: int, kills: int) -> dict[str, Any]:
    """Two workers with --stale-after 5; `kills` times, SIGKILL the worker of a trial seen training
    (each time one claimed after the previous kill) and start a replacement on its core."""
    study, stale = "kill", ("--stale-after", str(STALE_AFTER_S))
    logs: list[str] = []

    def start(core: int) -> subprocess.Popen:
        logs.append(f"kill-{len(logs)}-core{core}.log")
        return project.worker(core, logs[-1], study, url, budget, *stale)

    begun = time.perf_counter()
    workers = {core: start(core) for core in cores}
    targets: list[int] = []
    snapshot: set[int] = set()
    since = 0.0
    try:
        for _ in range(kills):
            found = training_trial(study, url, workers, since)
            if found is None:
                break
            number, core, finished = found
            snapshot |= finished
            workers[core].kill()  # SIGKILL
            workers[core].wait()
            since = time.time()
            targets.append(number)
            workers[core] = start(core)
        codes = {log: w.wait(timeout=1800) for log, w in zip(last_logs(logs, workers), workers.values())}
    finally:
        for w in workers.values():
            w.kill()
    seconds = time.perf_counter() - begun
    return inspect_after_kills(optuna.load_study(study_name=study, storage=url), project, storage, budget, kills,
                               targets, snapshot, codes, seconds)


def last_logs(logs: list[str], workers: dict[int, subprocess.Popen]) -> list[str]:
    """The log of the worker now on each core (the last one started there)."""
    return [next(log for log in reversed(logs) if log.endswith(f"-core{core}.log")) for core in workers]


def inspect_after_kills(study: optuna.Study, project: Project, storage: str, budget: int, asked: int,
                        targets: list[int], snapshot: set[int], codes: dict[str, int], seconds: float) -> dict[str, Any]:
    trials = study.get_trials(False)
    state = {t.number: t.state for t in trials}
    trained = search.trained_trials(study)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    out = {
        "storage": storage, "budget": budget, "kills asked": asked, "kills done": len(targets),
        "killed trials": targets,
        "kills that hit a training trial": [n for n in targets if state[n] == TrialState.FAIL],
        "finished trials snapshotted": len(snapshot),
        "finished trials lost": sorted(n for n in snapshot if state[n] not in search.FINISHED),
        "left RUNNING": [t.number for t in trials if t.state == TrialState.RUNNING],
        "left WAITING": [t.number for t in waiting],
        "WAITING retries left because the budget was reached": [
            t.number for t in waiting if "failed_trial" in t.system_attrs and len(trained) >= budget],
        "FAIL trials": sorted(n for n, s in state.items() if s == TrialState.FAIL),
        "retries (retry: failed trial)": {t.number: t.system_attrs["failed_trial"] for t in trials
                                          if "failed_trial" in t.system_attrs},
        "trained": len(trained),
        "baselines trained": baseline_counts(study),
        "front measured (plans)": len(study.user_attrs.get("measured") or {}),
        "measuring lease released": study.user_attrs.get(report.MEASURING) is None,
        "exit codes": codes,
        "seconds": round(seconds, 1),
    }
    out["problems"] = kill_problems(out, {log: project.failure(log) for log, code in codes.items() if code != 0})
    return out


def kill_problems(k: dict[str, Any], failed_logs: dict[str, str]) -> list[str]:
    """What the kill test must leave, as a list of what it did not."""
    problems = [f"{log} exited {k['exit codes'][log]}: {text}" for log, text in failed_logs.items()]
    waiting_ok = set(k["WAITING retries left because the budget was reached"])
    checks = {
        "finished trials were lost": k["finished trials lost"],
        "trials were left RUNNING": k["left RUNNING"],
        "trials were left WAITING (not retries after the budget was reached)":
            [n for n in k["left WAITING"] if n not in waiting_ok],
        "FAIL trials are not the killed ones": sorted(set(k["FAIL trials"]) ^ set(k["kills that hit a training trial"])),
        "not every failed trial was retried exactly once (a retry that fails is not retried again)":
            collections.Counter(k["retries (retry: failed trial)"].values())
            != dict.fromkeys([n for n in k["FAIL trials"] if n not in k["retries (retry: failed trial)"]], 1),
        f"trained {k['trained']} != budget {k['budget']}": k["trained"] != k["budget"],
        "a baseline was not trained exactly once": not _each_once(k["baselines trained"]),
        "the front was not measured": not k["front measured (plans)"],
        "the measuring lease was not released": not k["measuring lease released"],
    }
    return problems + [what for what, bad in checks.items() if bad]


# --- the results file ------------------------------------------------------------------------------


def listed(numbers: list[int]) -> str:
    """`2 (trials 3, 5)`, or `0`."""
    return f"{len(numbers)}" + (f" (trials {', '.join(map(str, numbers))})" if numbers else "")


def kill_text(k: dict[str, Any], why: str) -> str:
    retries = ", ".join(f"{r} retries {f}" for r, f in k["retries (retry: failed trial)"].items()) or "none"
    late = k["WAITING retries left because the budget was reached"]
    short = ("" if k["kills done"] == k["kills asked"] else
             "; no more trial was seen training before every worker had exited (the budget was reached)")
    return "\n".join([
        f"**Kill test** ({k['storage']}{why}; 2 workers, one per core, `--stale-after {STALE_AFTER_S}`, budget "
        f"{k['budget']}): wait until a RUNNING trial has the user attr `claimed` (it is training), claimed after the "
        "previous kill, by one of our live workers (`worker` attr `host:pid`); snapshot the COMPLETE/PRUNED trials; "
        "SIGKILL that worker; start a replacement on its core. Then wait for every worker to exit. "
        f"{k['seconds']:.1f} s in all.",
        "",
        f"- kills done: {k['kills done']} of {k['kills asked']}{short}; killed trials: {k['killed trials']}",
        f"- kills that hit a training trial (the trial ended FAIL, not finished before the signal landed): "
        f"{listed(k['kills that hit a training trial'])}",
        f"- finished trials lost (snapshotted COMPLETE/PRUNED before a kill, not COMPLETE/PRUNED at the end; must "
        f"be 0): {listed(k['finished trials lost'])}, of {k['finished trials snapshotted']} snapshotted",
        f"- left RUNNING (must be 0): {listed(k['left RUNNING'])}; left WAITING (must be 0 unless a retry came "
        f"after the budget was reached): {listed(k['left WAITING'])}"
        + (f", of which such retries: {listed(late)}" if k["left WAITING"] else ""),
        f"- FAIL trials (must be the killed ones): {listed(k['FAIL trials'])}",
        f"- retries (trials with the system attr `failed_trial`, Optuna's number of the original trial; each "
        f"failed original must be retried once, and a retry that fails is not retried again: max_retry=1; a "
        f"baseline whose retry failed too is enqueued anew, as a fresh trial): "
        f"{len(k['retries (retry: failed trial)'])} ({retries})",
        f"- trained (COMPLETE/PRUNED without `rejected`): {k['trained']} of budget {k['budget']}; baselines trained: "
        f"{baselines_text(k['baselines trained'])}",
        f"- front measured (study user attr `measured`): {k['front measured (plans)']} plans; measuring lease "
        f"released (user attr `measuring` is None): {'yes' if k['measuring lease released'] else 'no'}",
        f"- exit codes of the workers not killed (must be 0): {k['exit codes']}",
        f"- **{'all checks hold' if not k['problems'] else 'problems: ' + '; '.join(k['problems'])}**",
    ])


def summary_text(args: argparse.Namespace, setup_s: dict[str, float], command: list[str], kill: str,
                 pg_reason: str | None) -> str:
    smoke = ("**SMOKE RUN (`--quick`): a check that the benchmark works end to end, not a measurement.**\n\n"
             if args.quick else "")
    return (
        f"{smoke}What many workers on one study give on this machine (digits-cnn on digits, trial epochs "
        f"{args.trial_epochs} ADMM+retrain, types {','.join(TYPES)}, max accuracy drop 20 points so most trials "
        f"are feasible). Each worker is the CLI as a subprocess, single-threaded and pinned to its own core with "
        f"`taskset -c CORE`, started in one temporary project folder:\n\n`{' '.join(command)}`\n\n"
        f"Set up once before: the dense checkpoint (`train_dense`, default TrainConfig: {setup_s['train']:.0f} s) "
        f"and this machine's latency profile of digits-cnn at 1 thread (types {','.join(TYPES)}, rates "
        f"{RATES}, the tests' coarse timing {PROFILE_TIMING}, pinned to the single worker's core: "
        f"{setup_s['profile']:.0f} s; the default timing took 571 s in a smoke run on a busy machine), which the "
        f"workers find; no worker trains or profiles. PostgreSQL: a throwaway server (tests/postgres.py, unix "
        f"socket, fsync off){'' if pg_reason is None else ' - unavailable: ' + pg_reason}; its server processes "
        f"are not pinned and share the workers' cores.\n\n{kill}\n\n"
        "**Throughput** (table below): per cell, a fresh study and storage (a new SQLite file, a new PostgreSQL "
        f"database), budget {args.budget} trials shared by its workers (sparsesearch's claim protocol), all workers "
        "started together. *trained*: finished (COMPLETE or PRUNED) trials without a `rejected` user attr; "
        "*trained = budget*: the workers together trained exactly the budget; *baselines trained*: how many times "
        "each uniform baseline (user attr `baseline`) was trained (each must be x1); *rejected*: candidates "
        "rejected before training (free). *wall*: seconds from starting the first worker to the last one exiting "
        "(worker start-up, the trials, the Pareto front's measurement and the report included); *trials/h (wall)* "
        "= 3600 x trained / wall. *steady span*: seconds from the first trained trial's `datetime_start` to the last "
        "trained trial's `datetime_complete` (start-up, front measurement and report excluded); *trials/h (steady)* "
        "= 3600 x trained / steady span. With w workers the span holds trained/w trials back to back per worker "
        "(with the sampling and rejected candidates between them), so this is the rate while all workers are "
        "busy (once the budget is taken, a worker with nothing left to train waits inside the span for the "
        "other's last trial). *steady vs 1 worker*: the steady rate "
        "over the 1-worker cell's on the same storage (2.0 would be perfect scaling). *load avg before*: the "
        "1-minute load average when the cell started (anything above ~0 is another process on these cores)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Trials per hour with 1 and 2 workers on one study (SQLite, "
                                     "PostgreSQL), and a kill test; writes results/scale.md.")
    parser.add_argument("--budget", type=int, default=60, help="trials per throughput cell (default 60)")
    parser.add_argument("--trial-epochs", default="1+3", help="ADMM+retrain epochs per trial (default 1+3)")
    parser.add_argument("--kills", type=int, default=5, help="workers SIGKILLed in the kill test (default 5)")
    parser.add_argument("--kill-budget", type=int, default=12, help="the kill test's budget (default 12)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK}, written to results/scale-quick.md")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit(f"bench/scale.py needs 2 cores to pin 2 workers to; this process may use {cores}")
    cells = [[cores[1]], cores[:2]]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="sparsesearch-scale-") as tmp:
        project = Project(Path(tmp), args.trial_epochs)
        setup_s = project.prepare(cells[0][0])
        print(f"set up in {setup_s}")
        rows = [throughput(project, "sqlite", f"sqlite:///{project.root / f'sqlite-{len(c)}w.db'}", c, args.budget)
                for c in cells]
        for row in rows:
            print(row)
        try:
            with throwaway_cluster() as cluster:
                pg_reason = None
                for c in cells:
                    rows.append(throughput(project, "postgresql", cluster.create_database(f"scale_{len(c)}w"), c,
                                           args.budget))
                    print(rows[-1])
                kill = kill_test(project, "postgresql", cluster.create_database("kill"), cores[:2], args.kill_budget,
                                 args.kills)
        except Unavailable as e:
            pg_reason = str(e)
            rows += [skipped("postgresql", c, args.budget, pg_reason) for c in cells]
            kill = kill_test(project, "sqlite", f"sqlite:///{project.root / 'kill.db'}", cores[:2], args.kill_budget,
                             args.kills)
        print(kill)
        compare_to_one_worker(rows)
        command = ["taskset", "-c", "CORE", *project.command("STUDY", "URL", args.budget)]
        command = [a.replace(tmp, "PROJECT") for a in command]
        why = "" if pg_reason is None else ", because PostgreSQL is unavailable"
        summary = summary_text(args, setup_s, command, kill_text(kill, why), pg_reason)
    print(record("scale-quick" if args.quick else "scale", rows, summary).read_text())


if __name__ == "__main__":
    main()
