"""The S4 settings every family's config shares: checks, layer kwargs, and saved configs of both field orders."""

import dataclasses
import inspect
import json
import os

import pytest
import torch

from sashimi.models.autoregressive import ModelConfig
from sashimi.models.config import S4Settings
from sashimi.models.flow_config import FlowConfig
from sashimi.models.registry import build_model, resolve_config
from sashimi.models.waveflow import WaveFlowConfig

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
SAVED = json.load(open(os.path.join(FIXTURES, "saved_configs_format1.json")))["configs"]
S4_FIELDS = [f.name for f in dataclasses.fields(S4Settings)]
CONFIGS = [ModelConfig, FlowConfig, WaveFlowConfig]


def test_one_set_of_s4_fields_keyword_only_in_every_family():
    assert S4_FIELDS == ["mode", "hurwitz", "d_state", "n_ssm", "init", "dt_min", "dt_max", "ssm_lr", "backend"]
    for cls in CONFIGS:
        assert issubclass(cls, S4Settings)
        params = inspect.signature(cls).parameters
        assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in S4_FIELDS), cls
    # positional construction of the other fields is as before the shared settings
    positional = [p for p, v in inspect.signature(ModelConfig).parameters.items() if v.kind is v.POSITIONAL_OR_KEYWORD]
    assert positional[:2] == ["name", "d_model"] and positional[-1] == "family"


@pytest.mark.parametrize("cls", CONFIGS)
@pytest.mark.parametrize("change, message", [
    (dict(mode="s5"), "mode must be one of"),
    (dict(d_state=7), "d_state must be even"),
    (dict(d_state=0), "d_state must be an int >= 2"),
    (dict(hurwitz="yes"), "hurwitz must be True or False"),
    (dict(n_ssm=0), "n_ssm must be an int >= 1"),
    (dict(init=3), "init must be a name"),
    (dict(backend=1), "backend must be a name"),
    (dict(dt_min=0.0), "dt_min must be a finite number > 0"),
    (dict(dt_min=0.1, dt_max=0.01), "dt_max must be a finite number >= 0.1"),
    (dict(ssm_lr=-1.0), "ssm_lr must be a finite number >= 0"),
    (dict(ssm_lr=float("nan")), "ssm_lr must be a finite number >= 0"),
])
def test_every_family_checks_the_s4_settings_alike(cls, change, message):
    with pytest.raises(ValueError, match=message):
        cls(**change)


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_family_gives_its_layers_the_same_kwargs(cls):
    settings = dict(mode="dplr", hurwitz=False, d_state=8, n_ssm=2, init="legs", dt_min=2e-3, dt_max=5e-2,
                    ssm_lr=None, backend="chunked")
    assert cls(**settings).s4_kwargs() == S4Settings(**settings).s4_kwargs() == {
        "mode": "dplr", "hurwitz": False, "d_state": 8, "n_ssm": 2, "init": "legs", "dt_min": 2e-3,
        "dt_max": 5e-2, "lr": None, "backend": "chunked"}
    diag = cls(mode="diag").s4_kwargs()
    assert "hurwitz" not in diag and "init" not in diag  # the mode's own default init
    assert cls(ssm_lr={"A": 1e-3, "dt": 1e-2}).s4_kwargs()["lr"] == {"A": 1e-3, "dt": 1e-2}  # per parameter


def test_mode_defaults_per_family():
    assert ModelConfig().mode == FlowConfig().mode == "dplr" and WaveFlowConfig().mode == "diag"


@pytest.mark.parametrize("family", ["autoregressive", "rectified_flow", "diffwave"])
def test_configs_saved_before_the_shared_settings_load_unchanged(family):
    saved = SAVED[family]
    config = resolve_config(saved)
    assert config.family == family and config.to_dict() == saved  # the same keys and values
    # the field order of config.json changed (the S4 settings come first now): both orders load
    # keyword by keyword, in this code and in the code that wrote the fixture (same key set)
    assert list(config.to_dict()) != list(saved) and set(config.to_dict()) == set(saved)
    assert resolve_config(dict(reversed(list(saved.items())))) == config
    assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_waveflow_config_with_the_older_mode_key_loads():
    saved = SAVED["waveflow"]
    assert "s4_mode" in saved and "mode" not in saved
    config = resolve_config(saved)
    assert config.mode == "dplr" and config.d_state == 8 and config.ssm_lr == 5e-4 and config.width_model == "s4"
    today = config.to_dict()
    assert {k: v for k, v in today.items() if k not in S4_FIELDS} == \
        {k: v for k, v in saved.items() if k not in S4_FIELDS and k != "s4_mode"}
    assert resolve_config(today) == config
    with pytest.raises(ValueError, match="names the S4 mode twice"):
        WaveFlowConfig.from_dict({**saved, "mode": "diag"})


def test_pretrained_folder_with_a_config_in_the_older_field_order_loads(tmp_path):
    import sashimi

    saved = {**SAVED["rectified_flow"], "d_model": 8, "n_layers": 1, "d_embed": 16, "d_sinusoid": 8,
             "text_d_model": 8, "sample_len": 64, "pool": [2, 2], "d_state": 4}
    torch.manual_seed(0)
    model = build_model(saved).eval()
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "config.json"
    meta = json.loads(path.read_text())
    meta["config"] = saved  # the key order that code before the shared settings wrote
    path.write_text(json.dumps(meta, indent=2))
    loaded = sashimi.from_pretrained(str(tmp_path)).eval()
    assert loaded.config == model.config
    x, t = torch.randn(2, 64, 1), torch.rand(2)
    cond = model.condition(prompts=["a", "b"])
    torch.testing.assert_close(loaded(x, t, loaded.condition(prompts=["a", "b"])), model(x, t, cond))
