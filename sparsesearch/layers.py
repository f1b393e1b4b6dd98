"""The prunable layers of a model, with the shapes and MACs one traced forward reveals.

The hooks used for tracing live only inside `trace`: a hook left on a model slows every later
forward, which would poison any latency measured afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .sparsity import SparsityType, applicable_types


@dataclass(frozen=True)
class Layer:
    """One prunable Conv2d or Linear as the model runs it."""

    name: str
    kind: str  # "conv" or "linear"
    weight_shape: tuple[int, ...]
    in_shape: tuple[int, ...]  # one sample, without batch
    out_shape: tuple[int, ...]
    groups: int
    types: tuple[SparsityType, ...]  # applicable sparsity types, output layer excluded from filter
    is_output: bool  # the last prunable layer: its rows are the classes

    @property
    def positions(self) -> int:
        """Output positions each weight is applied at: H_out*W_out for convs; for a Linear, every
        vector it is applied to (a transformer's tokens), 1 after a flatten."""
        spatial = self.out_shape[1:] if self.kind == "conv" else self.out_shape[:-1]
        return int(torch.Size(spatial).numel())

    @property
    def macs(self) -> int:
        """Multiply-accumulates per sample of the dense layer."""
        return self.positions * int(torch.Size(self.weight_shape).numel())

    def macs_with(self, weight: Tensor, kind: SparsityType) -> int:
        """MACs per sample of this layer compacted for `kind`: a dense GEMM over the live rows and
        columns for structured types, one MAC per non-zero for irregular and nm (sparse kernels).
        Counts only this layer's own weights, not channels its pruning frees in its consumers."""
        rows = weight.reshape(weight.shape[0], -1).ne(0)
        if kind in (SparsityType.IRREGULAR, SparsityType.NM):
            return self.positions * int(rows.sum())
        return self.positions * int(rows.any(1).sum()) * int(rows.any(0).sum())


def prunable(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear modules by qualified name, in definition order."""
    return {name: m for name, m in model.named_modules() if applicable_types(m)}


def trace(model: nn.Module, input_shape: tuple[int, ...]) -> list[Layer]:
    """Run one forward on zeros (eval mode, no grad) and describe each prunable layer in call order."""
    modules = prunable(model)
    seen: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def record(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            seen.setdefault(name, (tuple(args[0].shape[1:]), tuple(out.shape[1:])))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in modules.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    order = list(seen)
    layers = []
    for name in order:
        m, (ins, outs) = modules[name], seen[name]
        is_output = name == order[-1]
        types = tuple(t for t in applicable_types(m) if not (is_output and t == SparsityType.FILTER))
        layers.append(Layer(name, "conv" if isinstance(m, nn.Conv2d) else "linear", tuple(m.weight.shape),
                            ins, outs, getattr(m, "groups", 1), types, is_output))
    return layers
