"""Physical compaction. This first part finds the coupling groups: prunable layers whose output
channels are tied together (the convs feeding one residual addition, a depthwise conv and its
producer), so filter pruning must keep the same indices in all of them or nothing can be removed.

The dependency graph is Torch-Pruning's: it follows every operator of a traced forward, so a
sparsity type never needs to know about residual blocks.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .layers import prunable


def couplings(model: nn.Module, input_shape: tuple[int, ...]) -> list[list[str]]:
    """Groups (two or more layers, in definition order) whose output channels must be pruned together."""
    import torch_pruning as tp

    modules = prunable(model)
    names = {m: n for n, m in modules.items()}
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():  # Torch-Pruning warns about ops it treats as element-wise
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.zeros(1, *input_shape, device=next(model.parameters()).device))
            groups = list(graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))
    finally:
        model.train(was_training)
    order = list(modules)
    found = []
    for group in groups:
        members = {names[dep.target.module] for dep, _ in group
                   if dep.target.module in names and getattr(dep.handler, "__name__", "") == "prune_out_channels"}
        if len(members) > 1:
            found.append(sorted(members, key=order.index))
    return sorted(found, key=lambda g: order.index(g[0]))
