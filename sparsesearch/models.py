"""Model registry: one name -> one factory, for our CIFAR-style nets, torchvision, timm and user code.

`create(name, num_classes=..., in_channels=...)` is the whole interface. `spec(name)` says what input
a model needs (channels, minimum side) so the data layer can adapt images to it instead of every
model growing its own resizing logic.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .errors import UserError, unknown

TV_PREFIX = "tv:"
TIMM_PREFIX = "timm:"
LIBRARIES = (TV_PREFIX, TIMM_PREFIX)  # `prefix:NAME` from a model library, not `package.module:factory`


@dataclass(frozen=True)
class ModelSpec:
    """What a model needs from its input. `in_channels=None` means it adapts to the data's channels."""

    name: str
    summary: str
    in_channels: int | None
    min_size: int


Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, tuple[ModelSpec, Factory]] = {}


def register(name: str, summary: str, min_size: int) -> Callable[[Factory], Factory]:
    """Register a built-in factory taking (num_classes, in_channels)."""

    def add(factory: Factory) -> Factory:
        _REGISTRY[name] = (ModelSpec(name, summary, None, min_size), factory)
        return factory

    return add


# --- built-in models ------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register("digits-cnn", "3-conv BN net for 8x8 digits (default; 2.5 MMACs)", min_size=8)
def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        *_conv_bn(in_channels, 32),
        *_conv_bn(32, 64),
        nn.MaxPool2d(2),
        *_conv_bn(64, 128),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * 2 * 2, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


@register("lenet5", "LeNet-5 (ReLU, max-pool) for 28x28 images", min_size=28)
def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(5),  # identity at 28x28; lets other sizes through
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(inplace=True),
        nn.Linear(120, 84),
        nn.ReLU(inplace=True),
        nn.Linear(84, num_classes),
    )


_VGG_CFG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _vgg(depth: int, num_classes: int, in_channels: int) -> nn.Module:
    layers: list[nn.Module] = []
    cin = in_channels
    for v in _VGG_CFG[depth]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += _conv_bn(cin, int(v))
            cin = int(v)
    model = nn.Sequential(
        nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)
    )
    _kaiming(model)
    return model


@register("vgg11-bn", "CIFAR-style VGG-11 with BatchNorm, 32x32 input", min_size=32)
def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _vgg(11, num_classes, in_channels)


@register("vgg16-bn", "CIFAR-style VGG-16 with BatchNorm (the StructADMM VGG), 32x32 input", min_size=32)
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _vgg(16, num_classes, in_channels)


class BasicBlock(nn.Module):
    """CIFAR ResNet block. Shortcuts that change shape are 1x1 conv + BN (option B), which keeps
    every tensor a real conv output, so structured pruning can follow the residual coupling."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):  # noqa: ANN001, ANN201 - nn.Module convention
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2): three stages of n blocks with 16/32/64 channels."""

    def __init__(self, n: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, 16))
        stages, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = [BasicBlock(cin if j == 0 else width, width, 2 if i > 0 and j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _kaiming(self)

    def forward(self, x):  # noqa: ANN001, ANN201
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


@register("resnet20", "CIFAR ResNet-20 (0.27 M params), 32x32 input", min_size=32)
def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(3, num_classes, in_channels)


@register("resnet56", "CIFAR ResNet-56 (0.85 M params), 32x32 input", min_size=32)
def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(9, num_classes, in_channels)


def _kaiming(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


# --- torchvision and user factories ---------------------------------------------------------------

# Inception-style nets return auxiliary outputs in training mode; a plain classifier is what we prune.
_TV_KWARGS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


# ViTs take exactly their constructor's image size; vit_h_14's metadata names its weights' 518 px,
# but built without weights (as here) it is a 224 px model.
_TV_MIN_SIZE = {"vit_h_14": 224}


def torchvision_names() -> list[str]:
    from torchvision import models as tvm

    return sorted(tvm.list_models(module=tvm))


def _tv_spec(name: str) -> ModelSpec:
    from torchvision import models as tvm

    arch = name[len(TV_PREFIX) :]
    if arch not in torchvision_names():
        raise unknown("torchvision model", name, [TV_PREFIX + n for n in torchvision_names()],
                      "run `sparsesearch models` for the list")
    meta = next(iter(tvm.get_model_weights(arch))).meta
    min_size = _TV_MIN_SIZE.get(arch, int(meta.get("min_size", (1, 1))[0]))
    return ModelSpec(name, f"torchvision {arch}", 3, min_size)


def _tv_create(name: str, num_classes: int) -> nn.Module:
    from torchvision import models as tvm

    arch = name[len(TV_PREFIX) :]
    return tvm.get_model(arch, weights=None, num_classes=num_classes, **_TV_KWARGS.get(arch, {}))


def _timm():  # noqa: ANN202 - the timm module, an optional extra
    try:
        import timm
    except ModuleNotFoundError:
        raise UserError("timm models need timm: pip install 'sparsesearch[timm]'") from None
    return timm


def timm_names() -> list[str]:
    """timm's classifiers, or none where timm is not installed."""
    try:
        return sorted(_timm().list_models())
    except UserError:
        return []


def _timm_spec(name: str) -> ModelSpec:
    """A timm model takes any channels (`in_chans`) and, unless its config says its input size is
    fixed (ViTs, Swin), any side from 32 up: its pretrained config's size is only what it was trained at."""
    arch = name[len(TIMM_PREFIX):]
    known = sorted(_timm().list_models())
    if arch not in known:
        raise unknown("timm model", name, [TIMM_PREFIX + n for n in known], "run `sparsesearch models` for the list")
    cfg = _timm().models.get_pretrained_cfg(arch)
    fixed = cfg is not None and cfg.fixed_input_size
    return ModelSpec(name, f"timm {arch}", None, int(cfg.input_size[-1]) if fixed else 32)


def _user_factory(name: str) -> Factory:
    """Resolve `package.module:factory`, importing from the working directory like `python -m` would."""
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import '{module_name}' for model '{name}' ({e}); "
                        "check the module path or run from the directory that contains it") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"'{module_name}' has no callable '{attr}'; name a factory as package.module:function")
    return factory


def _user_create(name: str, num_classes: int, in_channels: int) -> nn.Module:
    factory = _user_factory(name)
    signature = inspect.signature(factory)
    offered = {"num_classes": num_classes, "in_channels": in_channels}
    kwargs = {k: v for k, v in offered.items() if k in signature.parameters}
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        raise UserError(f"factory '{name}' cannot be called with {kwargs or 'no arguments'} ({e}); "
                        "give its other parameters defaults") from e
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"factory '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


# --- the interface --------------------------------------------------------------------------------


def builtin_specs() -> list[ModelSpec]:
    return [spec for spec, _ in _REGISTRY.values()]


def recorded(name: str, given: str | None, source: str) -> str:
    """The model `name` that a file (`source`: a study, a checkpoint's sidecar) records. Code of the
    user's own (`package.module:factory`) is imported only if the caller named it too: a file handed
    over by someone else must not get a module of its choosing imported."""
    if ":" in name and not name.startswith(LIBRARIES) and given != name:
        raise UserError(f"{source} names the model '{name}', a factory of your own; pass --model {name} "
                        "to import it")
    return name


def spec(name: str) -> ModelSpec:
    """What `name` needs from its input; raises UserError for an unknown name."""
    if name.startswith(TV_PREFIX):
        return _tv_spec(name)
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name)
    if ":" in name:
        _user_factory(name)
        return ModelSpec(name, "user factory", None, 1)
    if name not in _REGISTRY:
        raise unknown("model", name, list(_REGISTRY) + [TV_PREFIX + n for n in torchvision_names()],
                      "run `sparsesearch models` for the list, or pass package.module:factory")
    return _REGISTRY[name][0]


def create(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised model by registry name, `tv:NAME`, `timm:NAME` or `package.module:factory`."""
    model_spec = spec(name)
    if model_spec.in_channels is not None and model_spec.in_channels != in_channels:
        raise UserError(f"model '{name}' takes {model_spec.in_channels}-channel input, not {in_channels}")
    if name.startswith(TV_PREFIX):
        return _tv_create(name, num_classes)
    if name.startswith(TIMM_PREFIX):
        return _timm().create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes,
                                    in_chans=in_channels)
    if ":" in name:
        return _user_create(name, num_classes, in_channels)
    return _REGISTRY[name][1](num_classes=num_classes, in_channels=in_channels)
