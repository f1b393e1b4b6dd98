"""Measured speedups (batch 1 and 8, 1 thread, beside dense) of resnet56 depth+width plans and uniform ones."""
import sys, tempfile, json, torch, optuna
sys.path.insert(0, "/work/main/bench"); sys.path.insert(0, "/work/main")
from sparsesearch.runtime import set_threads
set_threads(1)
from sparsesearch import search, seeds
from arms import predicted, dense_checkpoint, plan_timed
optuna.logging.set_verbosity(optuna.logging.WARNING)
from optuna.trial import FixedTrial
config = search.SearchConfig(model="resnet56", dataset="fashion-mnist", checkpoint=dense_checkpoint("resnet56", "fashion-mnist"), trial_data=0.1)
v2 = optuna.load_study(study_name="resnet56-fashion-mnist-2h-v2", storage="sqlite:////work/main/bench/runs/optimize-resnet56-fashion-mnist-2h-v2/study.db")
found = seeds.Scan.from_attrs(v2.user_attrs["sensitivity"])
out = {}
with tempfile.TemporaryDirectory() as tmp:
    built = search.build(config, torch.device("cpu"), tmp, notify=lambda *a: None)
    search.record(optuna.create_study(directions=["maximize", "maximize"]), built)
    sp = built.space
    sp.robustness = seeds.robustness(found); sp.removal_drop = found.removed
    for spec in sys.argv[1:]:
        if spec.startswith("uniform"):
            params = sp.uniform_params(built.baseline_kind, float(spec.split(":")[1]))
        elif spec.startswith("seed"):
            params = seeds.seeded_params(sp, found, float(spec.split(":")[1]))
        else:
            rem, rates, lean = spec.split(":")[:3]
            params = sp.even() | {"lean": float(lean)}
            for unit, n in zip(sp.removable, map(int, rem.split("/"))):
                params[f"remove:{unit}"] = n
            for stage, r in zip(sp.stages, map(float, rates.split("/"))):
                params[f"type:{stage}"] = "filter" if "filter" in sp.choices(stage) else sp.choices(stage)[0]
                params[f"rate:{stage}"] = r
        plan = sp.suggest(FixedTrial(params))
        out[spec] = {"predicted": predicted(built, plan), **plan_timed(built, plan)}
        print(spec, {k: round(v, 2) for k, v in out[spec].items()}, flush=True)
print(json.dumps(out))
