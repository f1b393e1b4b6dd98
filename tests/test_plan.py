from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from sparsesearch.errors import UserError
from sparsesearch.layers import trace
from sparsesearch.models import create
from sparsesearch.plan import LayerSparsity, Plan
from sparsesearch.sparsity import SparsityType as T

DIGITS = trace(create("digits-cnn", in_channels=1), (1, 8, 8))


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_plan_round_trips_through_its_file(tmp_path: Path, suffix: str) -> None:
    plan = Plan({"0": LayerSparsity(T.FILTER, 0.5), "7": LayerSparsity(T.SHAPE, 0.3),
                 "14": LayerSparsity(T.NM, 0.5)})
    plan.save(tmp_path / f"plan{suffix}")
    assert Plan.load(tmp_path / f"plan{suffix}") == plan


def test_uniform_shorthand_covers_every_layer_but_the_classifier_for_filter() -> None:
    plan = Plan.parse("filter=0.5", DIGITS)
    assert sorted(plan.layers) == ["0", "12", "3", "7"]
    assert set(Plan.parse("shape=0.5", DIGITS).layers) == {"0", "3", "7", "12", "14"}


@pytest.mark.parametrize(("layers", "message"), [
    ({"8": {"type": "filter", "rate": 0.5}}, r"unknown layer '8'.*prunable layers: 0, 3, 7, 12, 14"),
    ({"3": {"type": "shape", "rate": 1.0}}, r"rate 1.0 outside \[0, 1\).*filter also takes 1"),
    ({"3": {"type": "filter", "rate": 1.5}}, r"rate 1.5 outside"),
    ({"3": {"type": "filter", "rate": -0.1}}, r"rate -0.1 outside"),
    ({"14": {"type": "filter", "rate": 0.5}}, r"cannot take filter sparsity \(it is the classifier"),
    ({"3": {"type": "nm", "rate": 0.6}}, r"nm rate 0.6 is not 1 - N/4.*accepted"),
    ({"3": {"type": "filters", "rate": 0.5}}, r"unknown sparsity type 'filters'.*did you mean filter"),
    ({"3": {"type": "filter"}}, r"needs a type and a rate"),
    ({"3": {"type": "filter", "rate": "half"}}, r"rate 'half' is not a number"),
    ({}, r"prunes no layer"),
])
def test_invalid_plan_is_refused_with_the_reason(tmp_path: Path, layers: dict, message: str) -> None:
    import json

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"schema": 1, "layers": layers}))
    with pytest.raises(UserError, match=message):
        Plan.parse(str(path), DIGITS)


def test_type_invalid_for_a_depthwise_conv_is_refused() -> None:
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    layers = trace(net, (4, 8, 8))
    with pytest.raises(UserError, match="cannot take channel sparsity; it accepts filter"):
        Plan({"0": LayerSparsity(T.CHANNEL, 0.5)}).validate(layers)


@pytest.mark.parametrize(("text", "message"), [("{not json", "cannot be parsed"), ('[1, 2]', "not a sparsity plan")])
def test_corrupt_plan_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(UserError, match=message):
        Plan.load(tmp_path / "p.json")


def test_missing_plan_file_suggests_the_shorthand(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"plan not found.*TYPE=RATE"):
        Plan.parse(str(tmp_path / "nope.json"), DIGITS)


def test_an_atomically_written_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        Plan({"0": LayerSparsity(T.FILTER, 0.5)}).save(tmp_path / "p.json")
    finally:
        os.umask(umask)
    assert (tmp_path / "p.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600


@pytest.mark.parametrize(("text", "message"), [
    ('{"layers": {"0": {"type": "filter", "rate": 0.5}}}', "has no schema; add schema = 1"),
    ('{"schema": 1, "layers": {"0": {"type": "filter", "rate": true}}}', "rate 'True' is not a number"),
])
def test_a_plan_file_without_schema_or_with_a_boolean_rate_is_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(UserError, match=message):
        Plan.load(tmp_path / "p.json")
