"""Random small convolutional networks, built from the pieces real user networks combine.

`random_net(seed)` draws a stem (one conv, or two whose outputs are concatenated), a few blocks
(residual blocks with identity or 1x1 projection shortcuts, depthwise + pointwise pairs,
squeeze-excitation gates, grouped convs, dense and inception-like concatenations feeding a conv
or a residual addition) and a head (global pooling or a small pooled map flattened into a Linear,
sometimes with a hidden Linear). Most convs are followed by a BatchNorm; a few by a GroupNorm or a
LayerNorm over channels, or by nothing (then the conv has a bias).

The same seed gives the same structure (`random.Random(seed)`) and the same weights
(`torch.manual_seed(seed)`). BatchNorm statistics and every norm's affine parameters are drawn
away from identity, so a ghost or wrongly silenced channel changes the output.

Every class lives at module level, so an exported model names each by its import path.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn

INPUT_SHAPE = (1, 16, 16)  # channels (in_channels), height, width
WIDTHS = (8, 12, 16, 20, 24)  # multiples of 4, so that grouped convs (2 or 4 groups) always fit
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish}


class ChannelsLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's), through a permute to NHWC."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm(kind: str, channels: int) -> nn.Module:
    match kind:
        case "bn":
            return nn.BatchNorm2d(channels)
        case "gn":
            return nn.GroupNorm(1, channels)
        case "ln":
            return ChannelsLayerNorm(channels)
    return nn.Identity()


class ConvNorm(nn.Module):
    """conv -> norm -> activation; without a norm the conv has a bias."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, norm: str = "bn",
                 act: str | None = "relu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=norm == "none")
        self.norm = _norm(norm, cout)
        self.act = ACTIVATIONS[act]() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class Branches(nn.Module):
    """Each branch applied to the input, outputs concatenated along channels; with `keep_input`
    the input itself is the first slice (a DenseNet layer)."""

    def __init__(self, branches: list[nn.Module], keep_input: bool = False) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.keep_input = keep_input

    def forward(self, x: Tensor) -> Tensor:
        outs = [x] if self.keep_input else []
        outs += [branch(x) for branch in self.branches]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class Residual(nn.Module):
    """act(body(x) + shortcut(x)); the shortcut is the identity or a 1x1 projection (conv + BN)."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None, act: str | None = "relu") -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.act = ACTIVATIONS[act]() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class SqueezeExcite(nn.Module):
    """x * sigmoid(up(act(down(mean over positions of x)))), `down`/`up` as 1x1 convs or Linears."""

    def __init__(self, channels: int, hidden: int, linear: bool, act: str = "relu") -> None:
        super().__init__()
        layer = nn.Linear if linear else (lambda cin, cout: nn.Conv2d(cin, cout, 1))
        self.down = layer(channels, hidden)
        self.act = ACTIVATIONS[act]()
        self.up = layer(hidden, channels)
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        squeezed = x.mean((2, 3), keepdim=not self.linear)
        gate = torch.sigmoid(self.up(self.act(self.down(squeezed))))
        return x * (gate.view(*gate.shape, 1, 1) if self.linear else gate)


class Net(nn.Module):
    """stem -> blocks -> head."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class _Draw:
    """The structural choices of one network, from one seeded random.Random."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def width(self) -> int:
        return self.rng.choice(WIDTHS)

    def act(self) -> str:
        return self.rng.choices(list(ACTIVATIONS), weights=(6, 1, 1))[0]

    def norm(self) -> str:
        """Mostly BatchNorm; sometimes a channel-mixing norm, or none."""
        return self.rng.choices(("bn", "gn", "ln", "none"), weights=(40, 1, 1, 2))[0]

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> ConvNorm:
        return ConvNorm(cin, cout, kernel, stride, groups, self.norm(), self.act() if act else None)

    def se(self, channels: int) -> SqueezeExcite:
        return SqueezeExcite(channels, max(4, channels // 4), linear=self.rng.random() < 0.5, act=self.act())

    def groups(self) -> int:
        return self.rng.choice((2, 4))


def _stem(d: _Draw, cin: int) -> tuple[nn.Module, int]:
    if d.rng.random() < 0.5:
        cout = d.width()
        return d.conv(cin, cout, 3), cout
    a, b = d.rng.choice((4, 8, 12)), d.rng.choice((4, 8))
    return Branches([d.conv(cin, a, 3), d.conv(cin, b, d.rng.choice((1, 3, 5)))]), a + b


def _body(d: _Draw, cin: int, cout: int, stride: int) -> nn.Module:
    """A residual body ending without activation, so that the addition comes before it."""
    kind = d.rng.choice(("basic", "bottleneck", "inverted", "dwsep"))
    if kind == "basic":
        layers = [d.conv(cin, cout, 3, stride), d.conv(cout, cout, 3, act=False)]
    elif kind == "bottleneck":
        mid, groups = d.rng.choice((8, 12, 16)), d.groups() if d.rng.random() < 0.4 else 1
        layers = [d.conv(cin, mid, 1), d.conv(mid, mid, 3, stride, groups), d.conv(mid, cout, 1, act=False)]
    elif kind == "inverted":
        mid = cin * d.rng.choice((2, 3))
        layers = [d.conv(cin, mid, 1), d.conv(mid, mid, 3, stride, groups=mid)]
        if d.rng.random() < 0.5:
            layers.append(d.se(mid))
        layers.append(d.conv(mid, cout, 1, act=False))
    else:
        layers = [d.conv(cin, cin, 3, stride, groups=cin), d.conv(cin, cout, 1, act=False)]
    if d.rng.random() < 0.25:
        layers.append(d.se(cout))  # SE-ResNet: the gate before the addition
    return nn.Sequential(*layers)


def _residual(d: _Draw, cin: int, stride: int) -> tuple[nn.Module, int]:
    project = stride > 1 or d.rng.random() < 0.4
    cout = d.width() if project else cin
    shortcut = ConvNorm(cin, cout, 1, stride, norm="bn", act=None) if project else None
    return Residual(_body(d, cin, cout, stride), shortcut, d.act()), cout


def _concat(d: _Draw, cin: int) -> tuple[nn.Module, int]:
    """Dense (input kept) or inception-like branches; their concatenation feeds whatever follows."""
    if d.rng.random() < 0.5:
        growth = d.rng.choice((4, 8))
        branch = nn.Sequential(d.conv(cin, growth * 2, 1), d.conv(growth * 2, growth, 3))
        return Branches([branch], keep_input=True), cin + growth
    branches: list[nn.Module] = [d.conv(cin, d.rng.choice((4, 8)), 1)]
    mid = d.rng.choice((4, 8))
    branches.append(nn.Sequential(d.conv(cin, mid, 1), d.conv(mid, d.rng.choice((4, 8)), 3)))
    if d.rng.random() < 0.5:
        branches.append(nn.Sequential(nn.MaxPool2d(3, 1, 1), d.conv(cin, 4, 1)))
    return Branches(branches), sum(_out_channels(b) for b in branches)


def _out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _block(d: _Draw, cin: int, stride: int, after_concat: bool) -> tuple[nn.Module, int]:
    """One block. Right after a concatenation, half the time an identity residual block, so that
    the concatenated channels feed an addition."""
    if after_concat and stride == 1 and d.rng.random() < 0.5:
        return Residual(_body(d, cin, cin, 1), None, d.act()), cin
    kind = d.rng.choices(("residual", "dwsep", "grouped", "concat", "se", "plain"), weights=(5, 2, 2, 2, 1, 1))[0]
    if kind == "residual" or stride > 1 and kind in ("concat", "se"):
        return _residual(d, cin, stride)
    if kind == "dwsep":
        cout = d.width()
        return nn.Sequential(d.conv(cin, cin, 3, stride, groups=cin), d.conv(cin, cout, 1)), cout
    if kind == "grouped":
        cout = d.width()
        return d.conv(cin, cout, 3, stride, groups=d.groups()), cout
    if kind == "concat":
        return _concat(d, cin)
    if kind == "se":
        return d.se(cin), cin
    cout = d.width()
    return d.conv(cin, cout, 3, stride), cout


def _head(d: _Draw, channels: int, num_classes: int) -> nn.Module:
    pool = d.rng.choice((1, 1, 2))  # 2: a flatten of a 2x2 map into the Linear
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(pool), nn.Flatten()]
    features = channels * pool * pool
    if d.rng.random() < 0.4:
        hidden = d.rng.choice((16, 32))
        layers += [nn.Linear(features, hidden), ACTIVATIONS[d.act()]()]
        features = hidden
    return nn.Sequential(*layers, nn.Linear(features, num_classes))


def random_inputs(n: int, seed: int, in_channels: int = INPUT_SHAPE[0]) -> Tensor:
    """n random images: smooth 4x4 noise upsampled, plus fine noise and a brightness per image.
    Unlike white noise, they differ from each other after a global average pool."""
    g = torch.Generator().manual_seed(seed)
    _, h, w = INPUT_SHAPE
    smooth = nn.functional.interpolate(torch.randn(n, in_channels, 4, 4, generator=g), size=(h, w), mode="bilinear")
    return 2 * smooth + 0.5 * torch.randn(n, in_channels, h, w, generator=g) + torch.randn(n, 1, 1, 1, generator=g)


def calibrate(model: Net, inputs: Tensor, seed: int) -> None:
    """Statistics as training would leave them on `inputs`, then moved a little: BatchNorm means
    and variances measured (then means moved by up to half a standard deviation, variances by
    0.5-2x), and the biases of the head's hidden Linears set so that each unit is centred. The
    model is left in eval mode.

    Measured, so that signals keep their scale through the layers and the output varies with the
    input; moved, so that a ghost channel (BN(0) = beta - gamma*mean/std) shows. A hidden unit
    whose weights are all zero (a pruned filter) keeps its bias."""
    g = torch.Generator().manual_seed(seed)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in batchnorms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: after one batch, its statistics
        model.train()(inputs)
        for m in batchnorms:
            m.momentum = 0.1
            m.running_mean.add_(torch.rand(m.num_features, generator=g).sub(0.5) * m.running_var.sqrt())
            m.running_var.mul_(torch.rand(m.num_features, generator=g).mul(1.5).add(0.5))
            m.num_batches_tracked.zero_()
        for linear in [m for m in model.head if isinstance(m, nn.Linear)][:-1]:
            seen: list[Tensor] = []
            handle = linear.register_forward_hook(lambda _m, _args, out: seen.append(out))
            model.eval()(inputs)
            handle.remove()
            live = linear.weight.ne(0).any(1)
            linear.bias[live] -= seen[0].mean(0)[live]
    model.eval()


def _randomise_affine(model: nn.Module) -> None:
    """Norms' affine parameters away from identity: scales in 0.5-1.5, shifts in -0.5-0.5."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)


def random_net(seed: int, in_channels: int = INPUT_SHAPE[0], num_classes: int = 10) -> nn.Module:
    """A random small conv net for (in_channels, 16, 16) inputs, in eval mode; the same seed gives
    the same network and weights."""
    d = _Draw(random.Random(seed))
    torch.manual_seed(seed)
    stem, channels = _stem(d, in_channels)
    blocks, size, after_concat = [], INPUT_SHAPE[1], isinstance(stem, Branches)
    for _ in range(d.rng.randint(2, 5)):
        stride = 2 if size > 4 and d.rng.random() < 0.4 else 1
        block, channels = _block(d, channels, stride, after_concat)
        blocks.append(block)
        size //= stride
        after_concat = isinstance(block, Branches)
    model = Net(stem, blocks, _head(d, channels, num_classes))
    _randomise_affine(model)
    calibrate(model, random_inputs(64, 0, in_channels), seed)
    return model.eval()
