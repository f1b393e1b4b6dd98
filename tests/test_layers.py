from __future__ import annotations

import torch

from sparsesearch.layers import trace
from sparsesearch.models import create
from sparsesearch.sparsity import SparsityType as T
from sparsesearch.sparsity import project


def test_trace_finds_shapes_and_macs_of_digits_cnn() -> None:
    layers = trace(create("digits-cnn", in_channels=1), (1, 8, 8))
    assert [(layer.name, layer.in_shape, layer.out_shape) for layer in layers] == [
        ("0", (1, 8, 8), (32, 8, 8)), ("3", (32, 8, 8), (64, 8, 8)), ("7", (64, 4, 4), (128, 4, 4)),
        ("12", (512,), (128,)), ("14", (128,), (10,))]
    assert [layer.macs for layer in layers] == [32 * 9 * 64, 64 * 32 * 9 * 64, 128 * 64 * 9 * 16, 128 * 512, 1280]
    assert layers[-1].is_output and T.FILTER not in layers[-1].types


def test_a_linear_applied_per_token_counts_every_token() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    first, last = trace(model, (197, 8))  # a transformer's MLP over 197 tokens
    assert (first.positions, first.macs, last.macs) == (197, 197 * 8 * 16, 197 * 16 * 4)


def test_trace_leaves_no_hooks_behind() -> None:
    model = create("resnet20")
    trace(model, (3, 32, 32))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_compacted_macs_follow_the_kept_groups() -> None:
    torch.manual_seed(0)
    model = create("digits-cnn", in_channels=1)
    conv = trace(model, (1, 8, 8))[1]
    w = model[3].weight.detach()
    assert conv.macs_with(project([w], T.FILTER, 0.5)[0], T.FILTER) == conv.macs // 2
    assert conv.macs_with(project([w], T.CHANNEL, 0.75)[0], T.CHANNEL) == conv.macs // 4
    assert conv.macs_with(project([w], T.IRREGULAR, 0.9)[0], T.IRREGULAR) == 64 * (w.numel() - int(0.9 * w.numel()))
