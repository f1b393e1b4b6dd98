"""Trial-fidelity drops of removal-heavy resnet56 plans (depth seeds?), beside their predicted speedups."""
import sys, tempfile, json, torch, optuna
sys.path.insert(0, "/work/main/bench"); sys.path.insert(0, "/work/main")
from sparsesearch.runtime import set_threads
set_threads(1)
from sparsesearch import search, storage, seeds
from arms import predicted, dense_checkpoint, RUNS
from recipes import trained
optuna.logging.set_verbosity(optuna.logging.WARNING)
from optuna.trial import FixedTrial
config = search.SearchConfig(model="resnet56", dataset="fashion-mnist", checkpoint=dense_checkpoint("resnet56", "fashion-mnist"), trial_data=0.1)
v2 = optuna.load_study(study_name="resnet56-fashion-mnist-2h-v2", storage="sqlite:////work/main/bench/runs/optimize-resnet56-fashion-mnist-2h-v2/study.db")
found = seeds.Scan.from_attrs(v2.user_attrs["sensitivity"])
with tempfile.TemporaryDirectory() as tmp:
    built = search.build(config, torch.device("cpu"), tmp, notify=lambda *a: None)
    search.record(optuna.create_study(directions=["maximize", "maximize"]), built)
    sp = built.space
    sp.robustness = seeds.robustness(found); sp.removal_drop = found.removed
    print({u: [(s.name, round(found.removed[s.name], 2)) for s in slots] for u, slots in sp.removable.items()}, flush=True)
    holder = storage.open_study("control", f"journal:///{RUNS / 'arms-resnet56-fashion-mnist' / 'control.journal'}", True)
    search.control(built, holder, wait=True)
    for spec in sys.argv[1:]:
        rem, rates, lean, epochs = (spec.split(":") + ["0+4"])[:4]
        params = sp.even() | {"lean": float(lean)}
        for unit, n in zip(sp.removable, map(int, rem.split("/"))):
            params[f"remove:{unit}"] = n
        for stage, r in zip(sp.stages, map(float, rates.split("/"))):
            params[f"type:{stage}"] = "filter" if "filter" in sp.choices(stage) else sp.choices(stage)[0]
            params[f"rate:{stage}"] = r
        plan = sp.suggest(FixedTrial(params))
        sp_ = predicted(built, plan)
        if len(sys.argv) > 1 and spec.endswith("!"):
            pass
        full = epochs != "0+4"
        row = trained(built, plan, epochs, full, RUNS / f"depth-{spec.replace(':', '-').replace('/', '_')}.resume.pt" if full else None)
        print(spec, "pred %.2f" % sp_, {k: round(v, 2) for k, v in row.items()}, flush=True)
