from __future__ import annotations

import json
import subprocess
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsesearch import export
from sparsesearch.admm import apply_masks, prune_masks
from sparsesearch.compact import Compacted, compact
from sparsesearch.graph import dependencies
from sparsesearch.errors import UserError
from sparsesearch.files import sha256
from sparsesearch.layers import trace
from sparsesearch.models import create
from sparsesearch.plan import LayerSparsity, Plan
from sparsesearch.sparsity import SparsityType as T

from helpers import assert_same_outputs, lively

MODELS = {"digits-cnn": (1, 8, 8), "resnet20": (3, 32, 32), "tv:mobilenet_v2": (3, 32, 32)}
CYCLE = (T.IRREGULAR, T.NM, T.SHAPE, T.CHANNEL, T.FILTER)


def _mixed(layers: list, groups: list[list[str]]) -> Plan:
    """Every type in turn over the uncoupled layers (irregular and nm surely among them); coupled
    groups share one filter rate, as a valid plan must."""
    specs = {name: LayerSparsity(T.FILTER, 0.5) for group in groups for name in group}
    free = [layer for layer in layers if layer.name not in specs]
    for i, layer in enumerate(free):
        kind = next(k for k in CYCLE[i % len(CYCLE):] + CYCLE if k in layer.types)
        specs[layer.name] = LayerSparsity(kind, 0.5 if kind == T.NM else 0.7)
    return Plan(specs)


PLANS = {
    "filter": lambda layers, groups: Plan.uniform(layers, T.FILTER, 0.5),
    "shape": lambda layers, groups: Plan.uniform(layers, T.SHAPE, 0.7),
    "mixed": _mixed,
}
SLOW = {"resnet20-shape", "tv:mobilenet_v2-filter", "tv:mobilenet_v2-shape"}  # compaction alone takes 3-8 s
SLOW_TRACE = SLOW | {"tv:mobilenet_v2-mixed"}  # tracing 5 s more
# ONNX goes through torch.export and the ONNX optimizer: 4-50 s each; kept fast: the one with CSR layers
SLOW_ONNX = {f"{m}-{p}" for m in MODELS for p in PLANS} - {"digits-cnn-mixed"}


def _cases(slow: set[str]) -> list:
    return [pytest.param(m, p, id=f"{m}-{p}", marks=[pytest.mark.slow] if f"{m}-{p}" in slow else [])
            for m in MODELS for p in PLANS]


@cache
def _compacted(model_name: str, plan_name: str) -> Compacted:
    shape = MODELS[model_name]
    torch.manual_seed(0)
    model = lively(create(model_name, in_channels=shape[0]), shape)  # a lost buffer would show
    deps = dependencies(model, shape)
    layers = trace(model, shape)
    plan = PLANS[plan_name](layers, deps.couplings)
    plan.validate(layers, deps.couplings)
    apply_masks(model, prune_masks(model, plan, deps))
    return compact(model, plan, shape)


def _x(model_name: str, batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *MODELS[model_name], generator=torch.Generator().manual_seed(seed))


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch.jit.load is deprecated in torch 2.9+, still works
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Compacted]:
    """digits-cnn under the mixed plan, saved once for the tests that damage or reload a file."""
    compacted = _compacted("digits-cnn", "mixed")
    path = tmp_path_factory.mktemp("saved") / "model.pt"
    export.save(path, compacted.model, {"model": "digits-cnn"}, _x("digits-cnn", 2))
    return path, compacted


# --- save and load --------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_name", "plan_name"), _cases(SLOW))
def test_loaded_model_equals_saved(model_name: str, plan_name: str, tmp_path: Path) -> None:
    compacted = _compacted(model_name, plan_name)
    export.save(tmp_path / "model.pt", compacted.model, {"model": model_name}, _x(model_name, 2))
    loaded = export.load(tmp_path / "model.pt")
    x = _x(model_name, 3, seed=2)
    assert all(torch.equal(w, compacted.model.state_dict()[k]) for k, w in loaded.state_dict().items())
    assert loaded.state_dict().keys() == compacted.model.state_dict().keys()
    with torch.inference_mode():
        assert_same_outputs(loaded(x), compacted.model(x))
    assert not loaded.training
    assert [type(m) for m in loaded.modules()] == [type(m) for m in compacted.model.modules()]
    assert {n: getattr(m, "impl", None) for n, m in loaded.named_modules()} == \
           {n: getattr(m, "impl", None) for n, m in compacted.model.named_modules()}


def test_load_in_a_fresh_process_needs_neither_plan_nor_compaction(saved, tmp_path: Path) -> None:  # noqa: ANN001
    path, compacted = saved
    x = _x("digits-cnn", 4)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch, sparsesearch; m = sparsesearch.load(sys.argv[1]); "
              "torch.save(m(torch.load(sys.argv[2])), sys.argv[3]); "
              "assert 'torch_pruning' not in sys.modules and 'sparsesearch.compact' not in sys.modules")
    subprocess.run([sys.executable, "-c", script, str(path.with_suffix(".json")), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, cwd=tmp_path)
    with torch.inference_mode():
        assert_same_outputs(torch.load(tmp_path / "y.pt"), compacted.model(x))


def test_truncated_weights_file_is_a_user_error(saved, tmp_path: Path) -> None:  # noqa: ANN001
    path, _ = saved
    (tmp_path / "model.json").write_text(path.with_suffix(".json").read_text())
    (tmp_path / "model.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"is not the file model.json describes \(truncated"):
        export.load(tmp_path / "model.pt")


@pytest.mark.parametrize("damage", [
    pytest.param(lambda text: text[: len(text) // 2], id="truncated-json"),
    pytest.param(lambda text: text.replace('"children"', '"kids"', 1), id="missing-key"),
    pytest.param(lambda text: text.replace('"shape": [', '"shape": [7, ', 1), id="wrong-shape"),
    pytest.param(lambda text: text.replace("torch.nn.modules.container:Sequential", "torch:Tensor", 1), id="not-a-module"),
    pytest.param(lambda text: text.replace('"kind": "compacted"', '"kind": "dense"', 1), id="not-an-export"),
])
def test_corrupt_description_is_a_user_error(saved, tmp_path: Path, damage) -> None:  # noqa: ANN001
    path, _ = saved
    (tmp_path / "model.pt").write_bytes(path.read_bytes())
    (tmp_path / "model.json").write_text(damage(path.with_suffix(".json").read_text()))
    with pytest.raises(UserError):
        export.load(tmp_path)


def test_missing_export_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        export.load(tmp_path / "nothing.pt")


def test_class_outside_the_allowlist_is_refused_without_importing_it(saved, tmp_path: Path) -> None:  # noqa: ANN001
    path, _ = saved
    description = json.loads(path.with_suffix(".json").read_text())
    description["root"]["class"] = "evil_module_never_imported:Payload"
    (tmp_path / "model.pt").write_bytes(path.read_bytes())
    (tmp_path / "model.json").write_text(json.dumps(description))
    with pytest.raises(UserError, match="outside the packages an exported model may use"):
        export.load(tmp_path)
    assert "evil_module_never_imported" not in sys.modules


def test_changed_kernel_code_is_caught_by_the_stored_probe(saved, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    path, compacted = saved
    kernel = next(type(m) for m in compacted.model.modules() if type(m).__module__ == "sparsesearch.kernels")
    forward = kernel.forward
    monkeypatch.setattr(kernel, "forward", lambda self, x: forward(self, x) * 1.5)
    with pytest.raises(UserError, match="does not reproduce its saved output"):
        export.load(path)


USER_PACKAGE = '''
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.scale = 2.0
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, num_classes))

    def forward(self, x):
        return self.body(x) * self.scale

def build(num_classes=10):
    return Net(num_classes)
'''


def test_user_factory_classes_load_from_their_own_package_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "export_test_nets").mkdir()
    (tmp_path / "export_test_nets" / "__init__.py").write_text(USER_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create("export_test_nets:build").eval()
    with pytest.raises(UserError, match="export_test_nets:Net is outside the packages"):
        export.save(tmp_path / "anonymous.pt", model, {})
    export.save(tmp_path / "model.pt", model, {"model": "export_test_nets:build"})
    with pytest.raises(UserError, match=r"pass it: sparsesearch.load\(path, trust=\['export_test_nets'\]\)"):
        export.load(tmp_path)  # the file names its package; only the caller may trust it
    x = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(export.load(tmp_path, trust=["export_test_nets"])(x), model(x))


EVIL = '''
from pathlib import Path
Path("IMPORTED").write_text("the module's top-level code ran")
from torch import nn

class Net(nn.Module):
    def forward(self, x):
        return x
'''


def _tampered(saved, tmp_path: Path, edit, probe_input=None) -> Path:  # noqa: ANN001
    """A copy of a saved export whose description `edit` changed (its SHA-256 kept consistent, as an
    attacker would), and whose probe input is replaced when given."""
    path, _ = saved
    weights = torch.load(path, weights_only=True)
    if probe_input is not None:
        weights["probe"]["input"] = probe_input
    torch.save(weights, tmp_path / "model.pt")
    description = json.loads(path.with_suffix(".json").read_text())
    edit(description)
    description["weights_sha256"] = sha256(tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps(description))
    return tmp_path


def test_a_package_named_by_the_file_is_never_imported(saved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    (tmp_path / "evilmod.py").write_text(EVIL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def edit(d: dict) -> None:
        d["model"], d["root"]["class"] = "evilmod:build", "evilmod:Net"

    with pytest.raises(UserError, match="evilmod:Net is outside the packages"):
        export.load(_tampered(saved, tmp_path, edit))
    assert "evilmod" not in sys.modules and not (tmp_path / "IMPORTED").exists()


def test_a_function_reached_through_a_trusted_package_is_refused(saved, tmp_path: Path) -> None:  # noqa: ANN001
    def edit(d: dict) -> None:
        d["root"]["attributes"]["forward"] = {"ref": "torch:os.system"}

    with pytest.raises(UserError, match="reaches through the module os"):
        export.load(_tampered(saved, tmp_path, edit, probe_input="touch PWNED"))
    assert not Path("PWNED").exists()


@pytest.mark.parametrize("ref", ["torch.hub:load", "torch:load", "torch.serialization:load"])
def test_only_functional_ops_may_be_held_as_functions(saved, tmp_path: Path, ref: str) -> None:  # noqa: ANN001
    def edit(d: dict) -> None:
        d["root"]["attributes"]["helper"] = {"ref": ref}

    with pytest.raises(UserError, match=r"refused"):
        export.load(_tampered(saved, tmp_path, edit))


def test_a_stored_attribute_never_replaces_a_method(saved, tmp_path: Path) -> None:  # noqa: ANN001
    def edit(d: dict) -> None:
        d["root"]["attributes"]["forward"] = {"ref": "torch.nn.functional:relu"}

    with pytest.raises(UserError, match="would replace .*forward"):
        export.load(_tampered(saved, tmp_path, edit))


def test_a_probe_that_is_not_a_tensor_is_refused(saved, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(UserError, match="its probe is not a pair of tensors"):
        export.load(_tampered(saved, tmp_path, lambda d: None, probe_input="touch PWNED"))


def test_tied_modules_and_weights_stay_tied(tmp_path: Path) -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 4))
    model[3].weight = shared.weight
    export.save(tmp_path / "model.pt", model, {})
    loaded = export.load(tmp_path)
    assert loaded[0] is loaded[2] and loaded[3].weight is loaded[0].weight


def test_sparse_tensors_are_stored_dense_and_listed(tmp_path: Path) -> None:
    model = nn.Linear(8, 4)
    dense = model.weight.detach() * (torch.rand(4, 8) > 0.5)
    model.weight = nn.Parameter(dense.to_sparse(), requires_grad=False)
    assert export.save(tmp_path / "model.pt", model, {}) == ["weight"]
    loaded = export.load(tmp_path)
    assert loaded.weight.layout == torch.strided and torch.equal(loaded.weight, dense)
    assert json.loads((tmp_path / "model.json").read_text())["densified"] == ["weight"]


def test_hooks_are_refused_as_code(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].register_forward_hook(lambda *args: None)
    with pytest.raises(UserError, match="0 carries hooks"):
        export.save(tmp_path / "model.pt", model, {})


def test_attribute_that_is_not_data_is_refused(tmp_path: Path) -> None:
    model = nn.Linear(4, 4)
    model.activation = lambda x: x
    with pytest.raises(UserError, match="attribute activation of the model"):
        export.save(tmp_path / "model.pt", model, {})


# --- TorchScript ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_name", "plan_name"), _cases(SLOW_TRACE))
def test_torchscript_equals_model_at_any_batch_size(model_name: str, plan_name: str, tmp_path: Path) -> None:
    compacted = _compacted(model_name, plan_name)
    assert export.to_torchscript(compacted.model, _x(model_name, 2), tmp_path / "m.pt") == []
    scripted = _jit_load(tmp_path / "m.pt")
    for batch in (2, 5):
        x = _x(model_name, batch, seed=batch)
        with torch.inference_mode():
            assert _relative_error(scripted(x), compacted.model(x)) <= 1e-6


# --- ONNX -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("model_name", "plan_name"), _cases(SLOW_ONNX))
def test_onnx_passes_the_checker_and_matches_torch(model_name: str, plan_name: str, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    compacted = _compacted(model_name, plan_name)
    densified = export.to_onnx(compacted.model, _x(model_name, 1), tmp_path / "m.onnx", {"model": model_name})
    assert sorted(densified) == sorted(name for name, impl in compacted.impl.items() if impl == "csr")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    props = json.loads({p.key: p.value for p in proto.metadata_props}["sparsesearch"])
    assert props == {"model": model_name, "densified": densified}
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = _x(model_name, 5)
    with torch.inference_mode():
        assert _relative_error(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), compacted.model(x)) <= 1e-4


def test_a_model_with_collapsed_layers_saves_loads_scripts_and_exports_to_onnx(tmp_path: Path) -> None:
    """`ChannelAffine`, what a collapsed layer becomes, is data like any compact layer: it loads in
    the allowlist, scripts, and runs in ONNX Runtime as in torch."""
    from sparsesearch.sparsity import REMOVED

    torch.manual_seed(0)
    shape = (1, 32, 32)
    model = lively(create("vgg11-bn", in_channels=1), shape)
    deps = dependencies(model, shape)
    plan = Plan({n: LayerSparsity(T.FILTER, REMOVED if n in deps.collapsible else 0.5)
                 for n in ("0.0", "0.4", "0.8", "0.11", "0.15", "0.18", "0.22", "0.25")})
    apply_masks(model, prune_masks(model, plan, deps))
    compacted = compact(model, plan, shape)
    assert sorted(n for n, i in compacted.impl.items() if i == "collapsed") == sorted(deps.collapsible)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    export.save(tmp_path / "model.pt", compacted.model, {"model": "vgg11-bn"}, x[:2])
    assert export.to_torchscript(compacted.model, x[:2], tmp_path / "m.ts") == []
    with torch.inference_mode():
        expected = compacted.model(x)
        assert_same_outputs(export.load(tmp_path / "model.pt")(x), expected)
        assert _relative_error(_jit_load(tmp_path / "m.ts")(x), expected) <= 1e-6
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    export.to_onnx(compacted.model, x[:1], tmp_path / "m.onnx", {"model": "vgg11-bn"})
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert _relative_error(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), expected) <= 1e-4


# --- everything at once ---------------------------------------------------------------------------


def test_write_all_fills_a_folder_that_load_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "onnx_missing", lambda: "onnx not installed (pip install 'sparsesearch[export]')")
    compacted = _compacted("digits-cnn", "filter")
    done = export.write_all(tmp_path, compacted, _x("digits-cnn", 1), {"model": "digits-cnn", "dataset": "digits"})
    assert set(done.files) == {"state", "torchscript"} and all(p.is_file() for p in done.files.values())
    assert done.skipped == {"onnx": "onnx not installed (pip install 'sparsesearch[export]')"}
    description = json.loads((tmp_path / "model.json").read_text())
    assert description["impl"] == compacted.impl and description["input_shape"] == [1, 8, 8]
    x = _x("digits-cnn", 3)
    with torch.inference_mode():
        assert_same_outputs(export.load(tmp_path)(x), compacted.model(x))


def test_onnx_export_without_onnx_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "onnx_missing", lambda: "onnxscript not installed (pip install 'sparsesearch[export]')")
    with pytest.raises(UserError, match=r"cannot export to ONNX: onnxscript not installed \(pip install"):
        export.to_onnx(nn.Linear(2, 2), torch.zeros(2, 2), tmp_path / "m.onnx")
