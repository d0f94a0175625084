"""Config helpers and the family registry: value checks, the family key, build_model for any family."""

import dataclasses
import inspect
import json
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import sashimi
from sashimi.models import registry
from sashimi.models.autoregressive import PRESETS, ModelConfig, WaveformAR
from sashimi.checks import check_choice, check_int, check_int_tuple, check_number
from sashimi.models.config import ConfigMixin
from sashimi.models.pretrained import PretrainedMixin


# ----------------------------------------------------------------------------- value checks

@given(st.integers(-50, 50), st.integers(-10, 10), st.integers(0, 20))
def test_check_int_accepts_exactly_the_ints_in_range(value, low, span):
    high = low + span
    if low <= value <= high:
        assert check_int("n", value, low, high) == value
    else:
        with pytest.raises(ValueError, match=rf"n must be an int in \[{low}, {high}\], got {value}"):
            check_int("n", value, low, high)


@pytest.mark.parametrize("bad", [True, False, 2.0, "3", None, [1]])
def test_check_int_rejects_non_ints(bad):
    with pytest.raises(ValueError, match=r"width must be an int >= 1"):
        check_int("width", bad, low=1)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_check_number_bounds_and_finiteness(value):
    inside = math.isfinite(value) and 0 <= value < 1
    if inside:
        assert check_number("p", value, 0, 1, high_open=True) == value
    else:
        with pytest.raises(ValueError, match=r"p must be a finite number >= 0 and < 1"):
            check_number("p", value, 0, 1, high_open=True)


def test_check_number_edges():
    assert check_number("x", None, 0, allow_none=True) is None
    assert check_number("x", 3, 0, low_open=True) == 3
    with pytest.raises(ValueError, match=r"> 0"):
        check_number("x", 0.0, 0, low_open=True)
    with pytest.raises(ValueError, match="finite number"):
        check_number("x", True)
    with pytest.raises(ValueError, match=r"\(or None\)"):
        check_number("x", "1", allow_none=True)
    assert check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\)"):
        check_choice("mode", "c", ("a", "b"))
    assert check_int_tuple("pool", [4, 4]) == (4, 4)
    for bad in ([4, 0], [4, True], "44", 4, [4.0]):
        with pytest.raises(ValueError, match="pool must be a list of ints >= 1"):
            check_int_tuple("pool", bad)
    with pytest.raises(ValueError, match="needs 3 entries"):
        check_int_tuple("pool", [4, 4], length=3)


# ----------------------------------------------------------------------------- the family key

def test_model_config_family_key_round_trip_and_legacy_dicts():
    config = PRESETS["tiny"]
    assert config.family == "autoregressive"
    d = config.to_dict()
    assert d["family"] == "autoregressive" and d["pool"] == [4, 4]
    assert json.loads(json.dumps(d)) == d
    assert ModelConfig.from_dict(d) == config
    legacy = {k: v for k, v in d.items() if k != "family"}  # written before the key existed
    assert ModelConfig.from_dict(legacy) == config
    assert sashimi.build_model(legacy).config == config
    with pytest.raises(ValueError, match="ModelConfig.family must be 'autoregressive'"):
        ModelConfig.from_dict({**d, "family": "waveflow"})
    # positional construction starts as before: family is the last positional field (the S4
    # settings are keyword-only, see tests/models/test_s4_settings.py)
    positional = [p for p, v in inspect.signature(ModelConfig).parameters.items() if v.kind is v.POSITIONAL_OR_KEYWORD]
    assert positional[:2] == ["name", "d_model"] and positional[-1] == "family"


def test_model_config_number_checks():
    for field, value in (("dt_min", 0.0), ("dt_max", 1e-4), ("dropout", 1.0), ("dropout", float("nan")),
                         ("ssm_lr", -1.0), ("bits", 17), ("d_model", True)):
        with pytest.raises(ValueError, match=field):
            ModelConfig(**{field: value})


# ----------------------------------------------------------------------------- the registry

@dataclasses.dataclass
class ToyConfig(ConfigMixin):
    family: str = "toy"
    name: str = "custom"
    width: int = 3

    def __post_init__(self):
        self.check_family("toy", "toy2")
        check_int("width", self.width, 1)


class ToyModel(PretrainedMixin, nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.width, config.width)

    def forward(self, x):
        return self.linear(x)


@pytest.fixture
def toy_family():
    saved = dict(registry._FAMILIES)
    registry.register_family("toy", ToyConfig, ToyModel, {"toy-small": ToyConfig(name="toy-small", width=2)})
    registry.register_family("toy2", ToyConfig, ToyModel, {"toy2-big": ToyConfig(family="toy2", width=8)})
    yield
    registry._FAMILIES.clear()
    registry._FAMILIES.update(saved)


def test_build_model_for_any_family(toy_family):
    assert {"autoregressive", "toy", "toy2"} <= set(sashimi.families())
    assert {"tiny", "sc09", "toy-small", "toy2-big"} <= set(sashimi.preset_names())
    assert registry.preset_names("toy") == ["toy-small"]
    m = sashimi.build_model("toy-small")
    assert isinstance(m, ToyModel) and m.config.width == 2
    assert sashimi.build_model("toy-small", width=5).config.width == 5
    assert registry.get_preset("toy-small").width == 2  # presets are never modified
    assert sashimi.build_model({"family": "toy2", "width": 4}).config.family == "toy2"
    assert sashimi.build_model(ToyConfig(width=6)).linear.in_features == 6
    assert isinstance(sashimi.build_model("tiny", backend="naive"), WaveformAR)
    assert isinstance(sashimi.build_model(PRESETS["tiny"].replace(backend="naive")), WaveformAR)


def test_registry_errors(toy_family):
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; expected one of \[.*'tiny'.*'toy-small'"):
        sashimi.build_model("nope")
    with pytest.raises(registry.UnknownFamilyError, match=r"unknown model family 'martian'; known families: \["):
        sashimi.build_model({"family": "martian"})
    with pytest.raises(ValueError, match=r"unknown ToyConfig fields \['depth'\]"):
        sashimi.build_model("toy-small", depth=3)
    with pytest.raises(ValueError, match="family cannot be overridden"):
        sashimi.build_model("toy-small", family="toy2")
    with pytest.raises(TypeError, match="expected a preset name"):
        sashimi.build_model(3)
    with pytest.raises(ValueError, match="'tiny' is already a preset of family 'autoregressive'"):
        registry.register_family("toy", ToyConfig, ToyModel, {"tiny": ToyConfig()})
    with pytest.raises(ValueError, match="preset 'x' has family 'toy'"):
        registry.register_family("toy2", ToyConfig, ToyModel, {"x": ToyConfig()})
    with pytest.raises(TypeError, match="nn.Module subclass"):
        registry.register_family("toy3", ToyConfig, object)
    with pytest.raises(TypeError, match="dataclass"):
        registry.register_family("toy3", dict, ToyModel)
    with pytest.raises(ValueError, match="unknown model configuration keys"):
        sashimi.build_model({"family": "toy", "depth": 1})


def test_sashimi_presets_are_the_autoregressive_ones():
    assert sashimi.PRESETS is PRESETS
    assert all(isinstance(c, ModelConfig) for c in sashimi.PRESETS.values())
    assert set(PRESETS) <= set(sashimi.preset_names())
    assert torch.is_tensor(sashimi.build_model("tiny", backend="naive").head.weight)
