"""save_pretrained / from_pretrained: identical models for every preset, clear errors for damaged folders."""

import json
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sashimi
from sashimi.models.autoregressive import PRESETS, WaveformAR
from sashimi.models.pretrained import CONFIG_NAME, WEIGHTS_NAME, PretrainedError, read_pretrained_config
from s4lib import SSMKernelDPLR

BACKEND = "naive"


def small_config(name):
    """The preset itself for `tiny`; for the paper's presets the same layout (pool, expand, ff,
    quantisation, unet) at a size whose HiPPO init and first kernel are quick on a CPU."""
    preset = PRESETS[name]
    if name == "tiny":
        return preset.replace(backend=BACKEND)
    return preset.replace(d_state=8, n_layers=min(preset.n_layers, 2), sample_len=64, init="dplr-random",
                          backend=BACKEND)


def kernel_lengths(model):
    return [m._l_kernel_int for m in model.modules() if isinstance(m, SSMKernelDPLR)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_gives_identical_outputs(name, tmp_path):
    torch.manual_seed(0)
    model = sashimi.build_model(small_config(name)).eval()
    tokens = torch.randint(0, model.config.n_classes, (2, 64))
    with torch.no_grad():
        model(tokens)
        model(torch.randint(0, model.config.n_classes, (1, 128)))  # attunes each S4 kernel to a longer length
        expected = model(tokens)
    lengths = kernel_lengths(model)
    assert lengths and all(n >= 128 // 16 for n in lengths)
    folder = model.save_pretrained(str(tmp_path / name))
    assert sorted(os.listdir(folder)) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = sashimi.from_pretrained(folder)
    assert isinstance(loaded, WaveformAR) and not loaded.training
    assert loaded.config == model.config
    assert kernel_lengths(loaded) == lengths  # the Python-int copy of l_kernel is synced on load
    own, other = model.state_dict(), loaded.state_dict()
    assert own.keys() == other.keys() and all(torch.equal(own[k], other[k]) for k in own)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected)
    assert kernel_lengths(loaded) == lengths  # no re-attuning happened


def test_step_mode_after_loading_matches(tmp_path):
    torch.manual_seed(1)
    model = sashimi.build_model(small_config("tiny")).eval()
    model.save_pretrained(str(tmp_path / "m"))
    loaded = WaveformAR.from_pretrained(str(tmp_path / "m"))
    outputs = []
    for m in (model, loaded):
        m.setup_step()
        state = m.default_state(2)
        tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            outputs.append(torch.stack([m.step(tokens[:, t], state)[0] for t in range(20)], 1))
    assert torch.equal(*outputs)


def test_config_json_contents_and_no_pickle(tmp_path):
    from safetensors import safe_open

    model = sashimi.build_model(small_config("tiny"))
    model.save_pretrained(str(tmp_path / "m"), info={"source": "test", "weights": "raw"})
    meta = read_pretrained_config(str(tmp_path / "m"))
    assert meta["format_version"] == 1 and meta["family"] == "autoregressive"
    assert meta["config"]["family"] == "autoregressive" and meta["model_class"] == "WaveformAR"
    assert meta["info"] == {"source": "test", "weights": "raw"}
    assert meta["weights"]["parameters"] == sum(p.numel() for p in model.parameters())
    with safe_open(str(tmp_path / "m" / WEIGHTS_NAME), framework="pt") as f:
        assert f.metadata()["family"] == "autoregressive"
        assert set(f.keys()) == set(model.state_dict())
    data = open(tmp_path / "m" / WEIGHTS_NAME, "rb").read()
    assert data[8:9] == b"{"  # an 8-byte header size, then JSON: no pickle stream anywhere
    with pytest.raises(PretrainedError, match="JSON-able"):
        model.save_pretrained(str(tmp_path / "n"), info={"bad": object()})


def test_float64_model_keeps_its_dtype(tmp_path):
    model = sashimi.build_model(small_config("tiny")).double().eval()
    model.save_pretrained(str(tmp_path / "m"))
    loaded = sashimi.from_pretrained(str(tmp_path / "m"))
    assert loaded.head.weight.dtype == torch.float64
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pretrained") / "tiny")
    sashimi.build_model(small_config("tiny")).save_pretrained(folder)
    return folder


def copy_folder(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


def edit_config(folder, change):
    path = os.path.join(folder, CONFIG_NAME)
    meta = json.load(open(path))
    change(meta)
    json.dump(meta, open(path, "w"))


def test_tampered_or_truncated_weights(saved, tmp_path):
    weights = os.path.join(saved, WEIGHTS_NAME)
    data = open(weights, "rb").read()
    # one byte of a tensor changed: only the digest can tell
    flipped = copy_folder(saved, str(tmp_path / "flipped"))
    changed = bytearray(data)
    changed[-5] ^= 0xFF
    open(os.path.join(flipped, WEIGHTS_NAME), "wb").write(bytes(changed))
    with pytest.raises(PretrainedError, match=rf"{WEIGHTS_NAME} does not match the SHA-256 recorded in config.json"):
        sashimi.from_pretrained(flipped)
    sashimi.from_pretrained(flipped, verify=False)  # explicitly unchecked: loads
    # truncated: the digest, and without it safetensors' own header check, say so
    cut = copy_folder(saved, str(tmp_path / "cut"))
    open(os.path.join(cut, WEIGHTS_NAME), "wb").write(data[: len(data) // 2])
    with pytest.raises(PretrainedError, match=rf"{WEIGHTS_NAME} does not match.*{len(data) // 2} bytes, "
                                              rf"config.json says {len(data)}"):
        sashimi.from_pretrained(cut)
    with pytest.raises(PretrainedError, match=rf"cannot read .*{WEIGHTS_NAME} as safetensors.*truncated"):
        sashimi.from_pretrained(cut, verify=False)
    # a damaged header
    header = copy_folder(saved, str(tmp_path / "header"))
    open(os.path.join(header, WEIGHTS_NAME), "wb").write(data[:8] + b"#" + data[9:])
    with pytest.raises(PretrainedError, match=rf"cannot read .*{WEIGHTS_NAME} as safetensors"):
        sashimi.from_pretrained(header, verify=False)


def test_unknown_family(saved, tmp_path):
    folder = copy_folder(saved, str(tmp_path / "m"))
    edit_config(folder, lambda m: m.update(family="martian"))
    with pytest.raises(PretrainedError, match=rf"{CONFIG_NAME}: unknown model family 'martian'; known families: "
                                              r"\[.*'autoregressive'"):
        sashimi.from_pretrained(folder)
    edit_config(folder, lambda m: m.update(family="autoregressive") or m["config"].update(family="waveflow"))
    with pytest.raises(PretrainedError, match="family 'autoregressive' but its config says 'waveflow'"):
        sashimi.from_pretrained(folder)


def test_shapes_that_do_not_match_the_weights(saved, tmp_path):
    folder = copy_folder(saved, str(tmp_path / "m"))
    edit_config(folder, lambda m: m["config"].update(d_model=48))
    with pytest.raises(PretrainedError, match=rf"weights in .*{WEIGHTS_NAME} do not fit the model .*{CONFIG_NAME} "
                                              r"describes: \d+ shape mismatches \(backbone\.\S+: file \(1, 128\) vs config \(1, 192\)"):
        sashimi.from_pretrained(folder)
    folder = copy_folder(saved, str(tmp_path / "n"))
    edit_config(folder, lambda m: m["config"].update(n_layers=3))
    with pytest.raises(PretrainedError, match=r"do not fit .* missing \(backbone\."):
        sashimi.from_pretrained(folder)
    folder = copy_folder(saved, str(tmp_path / "o"))
    edit_config(folder, lambda m: m["config"].update(n_layers=1))
    with pytest.raises(PretrainedError, match=r"do not fit .* unexpected \(backbone\."):
        sashimi.from_pretrained(folder)
    folder = copy_folder(saved, str(tmp_path / "p"))
    edit_config(folder, lambda m: m["config"].update(d_model=0))
    with pytest.raises(PretrainedError, match=rf"{CONFIG_NAME}: invalid autoregressive configuration \(d_model"):
        sashimi.from_pretrained(folder)


def test_folder_and_config_errors(saved, tmp_path):
    with pytest.raises(PretrainedError, match="is not a folder"):
        sashimi.from_pretrained(str(tmp_path / "missing"))
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(PretrainedError, match=rf"{CONFIG_NAME} does not exist"):
        sashimi.from_pretrained(empty)
    folder = copy_folder(saved, str(tmp_path / "noweights"))
    os.unlink(os.path.join(folder, WEIGHTS_NAME))
    with pytest.raises(PretrainedError, match=rf"{WEIGHTS_NAME} does not exist"):
        sashimi.from_pretrained(folder)
    folder = copy_folder(saved, str(tmp_path / "json"))
    open(os.path.join(folder, CONFIG_NAME), "w").write("{not json")
    with pytest.raises(PretrainedError, match=rf"{CONFIG_NAME}: cannot read it as JSON"):
        sashimi.from_pretrained(folder)
    folder = copy_folder(saved, str(tmp_path / "newer"))
    edit_config(folder, lambda m: m.update(format_version=99))
    with pytest.raises(PretrainedError, match="format version 99; this version of sashimi reads up to 1"):
        sashimi.from_pretrained(folder)
    folder = copy_folder(saved, str(tmp_path / "other"))
    edit_config(folder, lambda m: m.pop("format"))
    with pytest.raises(PretrainedError, match="is not a sashimi model config"):
        sashimi.from_pretrained(folder)


def test_overrides_and_saving_again(saved, tmp_path):
    model = sashimi.from_pretrained(saved, backend=None)
    assert model.config.backend is None
    folder = copy_folder(saved, str(tmp_path / "again"))
    model.save_pretrained(folder)  # overwrites in place
    assert sashimi.from_pretrained(folder).config.backend is None
    with pytest.raises(PretrainedError, match=r"describes with the overrides \{'d_model': 16\}: \d+ shape"):
        sashimi.from_pretrained(saved, d_model=16)


@settings(max_examples=8, deadline=None)
@given(d_model=st.sampled_from([4, 8]), n_layers=st.integers(0, 2), pool=st.sampled_from([(2,), (2, 2), (4, 2)]),
       expand=st.integers(1, 2), ff=st.integers(0, 2), mode=st.sampled_from(["dplr", "diag"]), unet=st.booleans(),
       bits=st.sampled_from([4, 8]), block_norm=st.sampled_from(["layer", "scalar"]), seed=st.integers(0, 2**16))
def test_round_trip_over_architectures(tmp_path_factory, d_model, n_layers, pool, expand, ff, mode, unet, bits,
                                       block_norm, seed):
    torch.manual_seed(seed)
    config = sashimi.ModelConfig(d_model=d_model, n_layers=n_layers, pool=pool, expand=expand, ff=ff, mode=mode,
                                 unet=unet, bits=bits, block_norm=block_norm, d_state=4, sample_len=16,
                                 init="dplr-random" if mode == "dplr" else None, backend=BACKEND)
    model = sashimi.build_model(config).eval()
    tokens = torch.randint(0, 2**bits, (1, 16))
    with torch.no_grad():
        expected = model(tokens)
    folder = model.save_pretrained(str(tmp_path_factory.mktemp("arch") / "m"))
    loaded = sashimi.from_pretrained(folder)
    assert loaded.config == config
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected)


def test_tied_weights_and_extra_state_of_a_registered_family(tmp_path):
    """Shared tensors are stored once each (safetensors refuses aliases); JSON extra state round-trips."""
    import dataclasses

    import torch.nn as nn

    from sashimi.models import registry
    from sashimi.models.config import ConfigMixin
    from sashimi.models.pretrained import PretrainedMixin

    @dataclasses.dataclass
    class TiedConfig(ConfigMixin):
        family: str = "tied-test"
        width: int = 3

    class TiedModel(PretrainedMixin, nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.a = nn.Linear(config.width, config.width)
            self.b = nn.Linear(config.width, config.width)
            self.b.weight = self.a.weight  # tied
            self.counter = 0

        def get_extra_state(self):
            return {"counter": self.counter}

        def set_extra_state(self, state):
            self.counter = state["counter"]

    saved = dict(registry._FAMILIES)
    try:
        registry.register_family("tied-test", TiedConfig, TiedModel)
        model = TiedModel(TiedConfig())
        model.counter = 7
        model.save_pretrained(str(tmp_path / "m"))
        loaded = TiedModel.from_pretrained(str(tmp_path / "m"))
        assert loaded.counter == 7 and loaded.b.weight is loaded.a.weight
        assert torch.equal(loaded.a.weight, model.a.weight) and torch.equal(loaded.b.bias, model.b.bias)
        with pytest.raises(PretrainedError, match="holds a TiedModel .* not a WaveformAR"):
            WaveformAR.from_pretrained(str(tmp_path / "m"))
    finally:
        registry._FAMILIES.clear()
        registry._FAMILIES.update(saved)
