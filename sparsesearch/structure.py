"""A module tree as data: each module's class import path, its plain attributes, the names, shapes
and dtypes of its parameters and buffers, and its children, as JSON; and the tree rebuilt from that
description and a dict of tensors, each module allocated without calling its `__init__`.

This is what lets an exported compacted model load without pickled code and without the plan that
made it. Classes and functions are imported only from trusted packages (`trusted`), so a file
cannot make us import arbitrary code; any module tree whose attributes are data round-trips,
compact kernels included.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserError

_BARE = frozenset(nn.Module().__dict__)  # what nn.Module.__init__ sets: not the module's own state
# the modules whose functions a layer may hold as an attribute (an activation such as F.relu):
# pure tensor operations, none of which loads, compiles or runs anything else
_FUNCTIONS = ("torch.nn.functional",)


def _path_of(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _import(path: str, trusted: tuple[str, ...]) -> Any:
    """The class or function at `module:qualname`, imported only from a trusted package, defined
    there (not reached through one: `torch:os.system` is os's), and, for a function, one of the
    torch functional ops a layer may hold (`_FUNCTIONS`): a file names what it wants, so nothing
    it names may run code the caller did not choose."""
    module_name, _, qualname = path.partition(":")
    package = module_name.split(".")[0]
    if package not in trusted:
        raise UserError(f"{path} is outside the packages an exported model may use ({', '.join(trusted)}); "
                        f"if {package} is your own package, pass it: sparsesearch.load(path, trust=['{package}'])")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
            if isinstance(obj, types.ModuleType):
                raise UserError(f"{path} reaches through the module {obj.__name__}; an exported model names "
                                "classes and functions where they are defined")
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import {path} ({e}); run from the directory that contains the model's "
                        "package, with the versions it was exported with") from e
    owner = getattr(obj, "__module__", None) or ""
    if owner.split(".")[0] not in trusted or getattr(obj, "__qualname__", None) != qualname:
        raise UserError(f"{path} is {owner or 'not'} defined in a trusted package under that name; refused")
    if not isinstance(obj, type) and owner not in _FUNCTIONS:
        raise UserError(f"{path} is a function outside the ones an exported model may hold "
                        f"({', '.join(_FUNCTIONS)}); refused")
    return obj


def _importable(obj: Any, trusted: tuple[str, ...], where: str) -> str:
    """obj's import path, checked now so that we never write a file that cannot be loaded."""
    path = _path_of(obj)
    if "<locals>" in path or obj.__module__ == "__main__" or _import(path, trusted) is not obj:
        raise UserError(f"{where}: {path} cannot be imported by name; define it at the top level of a module")
    return path


def _encode(value: Any, trusted: tuple[str, ...], where: str) -> Any:
    """A module attribute as JSON; only values whose meaning is their data."""
    rec = lambda v: _encode(v, trusted, where)  # noqa: E731
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [rec(v) for v in value]
    if type(value) is tuple:
        return {"tuple": [rec(v) for v in value]}
    if type(value) is torch.Size:
        return {"size": list(value)}
    if type(value) is dict:
        return {"dict": [[rec(k), rec(v)] for k, v in value.items()]}
    if type(value) is slice:
        return {"slice": [rec(value.start), rec(value.stop), rec(value.step)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, enum.Enum):
        return {"enum": _importable(type(value), trusted, where), "value": rec(value.value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"dataclass": _importable(type(value), trusted, where),
                "fields": {f.name: rec(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return {"ref": _importable(value, trusted, where)}  # e.g. torchvision's ResNet._norm_layer
    raise UserError(f"{where} is a {type(value).__name__}, which an export cannot describe as data; "
                    "make it a buffer, or a plain int/float/str/tuple/dataclass")


def _decode(value: Any, trusted: tuple[str, ...]) -> Any:
    rec = lambda v: _decode(v, trusted)  # noqa: E731
    if not isinstance(value, (list, dict)):
        return value
    if isinstance(value, list):
        return [rec(v) for v in value]
    tag, data = next(iter(value.items()))
    if tag == "tuple":
        return tuple(rec(v) for v in data)
    if tag == "size":
        return torch.Size(data)
    if tag == "dict":
        return {rec(k): rec(v) for k, v in data}
    if tag == "slice":
        return slice(*(rec(v) for v in data))
    if tag == "dtype":
        dtype = getattr(torch, data)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"not a dtype: {data}")
        return dtype
    if tag == "ref":
        ref = _import(data, trusted)
        if isinstance(ref, type) and not issubclass(ref, nn.Module):
            raise UserError(f"{data} is a class other than a torch module; an exported model holds none")
        return ref
    cls = _import(data, trusted)
    if tag == "enum" and issubclass(cls, enum.Enum):
        return cls(rec(value["value"]))
    if tag == "dataclass" and dataclasses.is_dataclass(cls):
        obj = object.__new__(cls)  # as the module itself: restore the data, run no constructor
        for name, v in value["fields"].items():
            object.__setattr__(obj, name, rec(v))
        return obj
    raise ValueError(f"unknown value tag {tag!r}")


def stored(tensor: Tensor) -> tuple[Tensor, bool]:
    """The tensor as the weights file holds it: on the CPU, dense; and whether it was densified."""
    sparse = tensor.layout != torch.strided or type(tensor.data) is not Tensor
    tensor = tensor.detach()
    return (tensor.to_dense() if sparse else tensor).cpu(), sparse


@dataclass
class Collected:
    tensors: dict[str, Tensor] = field(default_factory=dict)
    densified: list[str] = field(default_factory=list)
    paths: dict[int, str] = field(default_factory=dict)  # id of a module or tensor -> first name


def describe(module: nn.Module, prefix: str, trusted: tuple[str, ...], out: Collected) -> dict[str, Any]:
    """One module's node; a module or tensor met twice (tied weights) refers to its first name."""
    if id(module) in out.paths:
        return {"same_as": out.paths[id(module)]}
    out.paths[id(module)] = prefix
    where = prefix or "the model"
    hooks = [k for k in _BARE if "hook" in k and getattr(module, k)]
    if hooks:
        raise UserError(f"{where} carries hooks ({', '.join(hooks)}), which are code, not data; remove them "
                        "(e.g. torch.nn.utils.parametrize.remove_parametrizations) before exporting")

    def tensors(items: dict[str, Tensor | None]) -> dict[str, Any]:
        specs: dict[str, Any] = {}
        for name, tensor in items.items():
            key = f"{prefix}.{name}" if prefix else name
            if tensor is None or id(tensor) in out.paths:
                specs[name] = tensor if tensor is None else {"same_as": out.paths[id(tensor)]}
                continue
            out.paths[id(tensor)] = key
            out.tensors[key], sparse = stored(tensor)
            if sparse:
                out.densified.append(key)
            specs[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                           "requires_grad": tensor.requires_grad}
        return specs

    attributes = {k: v for k, v in module.__dict__.items() if k not in _BARE}
    return {
        "class": _importable(type(module), trusted, where),
        "attributes": {k: _encode(v, trusted, f"attribute {k} of {where}") for k, v in attributes.items()},
        "parameters": tensors(module._parameters),
        "buffers": tensors(module._buffers),
        "non_persistent": sorted(module._non_persistent_buffers_set),
        "children": {name: None if child is None else describe(child, f"{prefix}.{name}" if prefix else name,
                                                                 trusted, out)
                     for name, child in module._modules.items()},
    }


def build(node: dict[str, Any], tensors: dict[str, Tensor], trusted: tuple[str, ...],
           built: dict[str, Any], prefix: str = "") -> nn.Module:
    """The module a node describes, allocated without its __init__ and filled from the file."""
    if "same_as" in node:
        return built[node["same_as"]]
    cls = _import(node["class"], trusted)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{node['class']} is not a torch module")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    built[prefix] = module
    for name, value in node["attributes"].items():
        value = _decode(value, trusted)
        if callable(getattr(cls, name, None)) or isinstance(getattr(cls, name, None), property):
            raise ValueError(f"attribute {name} would replace {node['class']}'s own {name}")
        object.__setattr__(module, name, value)

    def tensor(name: str, spec: dict[str, Any] | None) -> Tensor | None:
        if spec is None or "same_as" in spec:
            return spec if spec is None else built[spec["same_as"]]
        key = f"{prefix}.{name}" if prefix else name
        value = tensors[key]
        if list(value.shape) != spec["shape"] or str(value.dtype).removeprefix("torch.") != spec["dtype"]:
            raise ValueError(f"{key} is {tuple(value.shape)} {value.dtype}, described as {spec}")
        built[key] = value
        return value

    for name, spec in node["parameters"].items():
        value = tensor(name, spec)
        if value is not None and not isinstance(value, nn.Parameter):
            value = built[f"{prefix}.{name}" if prefix else name] = nn.Parameter(value, spec["requires_grad"])
        module.register_parameter(name, value)
    for name, spec in node["buffers"].items():
        module.register_buffer(name, tensor(name, spec), persistent=name not in node["non_persistent"])
    for name, child in node["children"].items():
        module.add_module(name, None if child is None else
                          build(child, tensors, trusted, built, f"{prefix}.{name}" if prefix else name))
    return module
