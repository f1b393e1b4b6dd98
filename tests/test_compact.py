from __future__ import annotations

import pytest
import torch

from sparsesearch.admm import prune_masks
from sparsesearch.compact import couplings, dependencies
from sparsesearch.errors import UserError
from sparsesearch.layers import trace
from sparsesearch.models import create
from sparsesearch.plan import LayerSparsity, Plan
from sparsesearch.sparsity import SparsityType as T

RESNET20_GROUPS = [
    ["stem.0", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"],
    ["layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"],
    ["layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2", "layer3.2.conv2"],
]


@pytest.fixture(scope="module")
def resnet20() -> tuple[torch.nn.Module, list, list[list[str]]]:
    torch.manual_seed(0)
    model = create("resnet20")
    return model, trace(model, (3, 32, 32)), couplings(model, (3, 32, 32))


def test_layers_feeding_one_residual_sum_are_coupled(resnet20) -> None:  # noqa: ANN001
    assert resnet20[2] == RESNET20_GROUPS


def test_depthwise_conv_is_coupled_with_its_producer() -> None:
    assert ["features.2.conv.0.0", "features.2.conv.1.0"] in couplings(create("tv:mobilenet_v2"), (3, 32, 32))


def test_plain_chain_has_no_couplings() -> None:
    assert couplings(create("digits-cnn", in_channels=1), (1, 8, 8)) == []


def test_coupled_layers_keep_the_same_filters_under_a_uniform_plan(resnet20) -> None:  # noqa: ANN001
    model, layers, groups = resnet20
    plan = Plan.parse("filter=0.5", layers, groups)
    masks = prune_masks(model, plan, dependencies(model, (3, 32, 32)))
    for group in groups:
        kept = [masks[f"{n}.weight"].flatten(1).any(1) for n in group]
        assert all(torch.equal(kept[0], k) for k in kept) and int(kept[0].sum()) == len(kept[0]) // 2


def test_different_filter_rates_in_a_coupled_group_are_refused(resnet20) -> None:  # noqa: ANN001
    _, layers, groups = resnet20
    plan = Plan({"stem.0": LayerSparsity(T.FILTER, 0.5), "layer1.0.conv2": LayerSparsity(T.FILTER, 0.3)})
    with pytest.raises(UserError, match=r"stem.0, layer1.0.conv2, layer1.1.conv2, layer1.2.conv2 share their output"):
        plan.validate(layers, groups)


def test_other_types_in_a_coupled_group_need_no_agreement(resnet20) -> None:  # noqa: ANN001
    _, layers, groups = resnet20
    Plan({"stem.0": LayerSparsity(T.SHAPE, 0.5), "layer1.0.conv2": LayerSparsity(T.IRREGULAR, 0.3)}).validate(layers, groups)


def test_batchnorms_follow_the_layer_they_normalise(resnet20) -> None:  # noqa: ANN001
    followers = dependencies(resnet20[0], (3, 32, 32)).followers
    assert followers["layer1.0.conv1"] == ["layer1.0.bn1"]
    assert set(followers["layer2.0.shortcut.0"]) == {"layer2.0.bn2", "layer2.0.shortcut.1", "layer2.1.bn2", "layer2.2.bn2"}
