"""from_state_spaces: state-spaces/s4 SaShiMi weights (standalone backbone, training-code checkpoints) give the same outputs.

Fixtures in the reference's layouts are made here from our own randomly perturbed models by an
inverse map written from the reference's code (index loops for its (feature, step) orders,
its weight norm, TransposedLN, Conv1d and Lightning names); when a state-spaces/s4 checkout is
available (S4_REFERENCE_GIT, a git directory), the reference's own code runs in a subprocess
and writes the fixture: its standalone Sashimi, and its training code's backbone with the
embedding and decoder (the modules imported with stubs for hydra / omegaconf / lightning).
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings, strategies as st
import torch.nn.functional as F

import sashimi
from sashimi.models.autoregressive import ModelConfig, WaveformAR
from sashimi.models.state_spaces import StateSpacesImportError, from_state_spaces

BACKEND = "naive"


def perturb(model, seed=0):
    """Every parameter moved off its init (LayerNorm gains, biases, D, ...), S4 parameters kept stable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.05 if ".kernel." in name else 0.2
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# ----------------------------------------------------------------------------- the inverse map


def ref_kernel(ours: dict, dt_transform="exp") -> dict:
    """s4lib kernel entries -> v4 names (the conjugate convention of s4lib.compat's docstring)."""
    def conj(t):
        return torch.stack([t[..., 0], -t[..., 1]], -1)
    out = {}
    for name, v in ours.items():
        if name == "log_dt":
            dt = torch.exp(v.double())
            inv = torch.log(dt) if dt_transform == "exp" else torch.log(torch.expm1(dt))  # softplus^-1
            out["inv_dt"] = inv.float().reshape(-1, 1)
        elif name == "Lambda_re":
            out["A_real"] = v
        elif name == "Lambda_im":
            out["A_imag"] = v
        elif name == "B":
            out["B"] = conj(v).unsqueeze(0)
        elif name in ("C", "P"):
            out[name] = conj(v)
        else:
            out[name] = v
    return out


def ref_linear(w, b, conv1d=False, weight_norm=False):
    if weight_norm:  # store a gain and a direction whose weight_norm product is w
        return {"weight_g": w.norm(dim=1, keepdim=True), "weight_v": 1.5 * w, "bias": b}
    return {"weight": w.unsqueeze(-1) if conv1d else w, "bias": b}


def ref_down_pool(w, width, pool):
    """Ours: input feature s*H + h; reference: h*pool + s."""
    ref = torch.empty_like(w)
    for h in range(width):
        for s in range(pool):
            ref[:, h * pool + s] = w[:, s * width + h]
    return ref


def ref_up_pool(w, b, width, pool):
    """Ours: output feature s*H + h; reference: h*pool + s."""
    rw, rb = torch.empty_like(w), torch.empty_like(b)
    for h in range(width):
        for s in range(pool):
            rw[h * pool + s] = w[s * width + h]
            rb[h * pool + s] = b[s * width + h]
    return rw, rb


def ref_block(block, training_code: bool, dt_transform: str) -> dict:
    out = {}
    norm = block.norm
    if training_code:
        if isinstance(norm, torch.nn.LayerNorm):
            out.update({"norm.norm.ln.weight": norm.weight, "norm.norm.ln.bias": norm.bias})
        else:
            out.update({"norm.norm.m": norm.m, "norm.norm.s": norm.s})
    else:
        out.update({"norm.weight": norm.weight, "norm.bias": norm.bias})
    if block.stateful:
        s4 = block.layer
        out["layer.layer.D"] = s4.layer.D
        kernel = {k: v for k, v in s4.layer.kernel.state_dict().items()}
        out.update({f"layer.layer.kernel.{k}": v for k, v in ref_kernel(kernel, dt_transform).items()})
        out["layer.output_linear.0.weight"] = s4.output_linear[0].weight
        out["layer.output_linear.0.bias"] = s4.output_linear[0].bias
    else:
        ff = block.layer
        for ours, ref in (("input_linear", "ff.0.0"), ("output_linear", "ff.2")):
            lin = getattr(ff, ours)
            for k, v in ref_linear(lin.weight, lin.bias, conv1d=not training_code).items():
                out[f"layer.{ref}.{k}"] = v
    return out


def to_reference(backbone, training_code=False, dt_transform="exp", prefix="") -> dict:
    """Our SaShiMi in the reference's Sashimi names (standalone, or the training code's src backbone)."""
    state, levels = {}, len(backbone.pool)
    d = 0
    for i in range(levels):
        width, p = backbone.widths[i], backbone.pool[i]
        for block in backbone.down_blocks[i]:
            state.update({f"d_layers.{d}.{k}": v for k, v in ref_block(block, training_code, dt_transform).items()})
            d += 1
        lin = backbone.down_pools[i].linear
        w = ref_down_pool(lin.weight.detach(), width, p)
        state.update({f"d_layers.{d}.linear.{k}": v for k, v in
                      ref_linear(w, lin.bias, conv1d=not training_code, weight_norm=training_code).items()})
        d += 1
    for k, block in enumerate(backbone.center_blocks):
        state.update({f"c_layers.{k}.{n}": v for n, v in ref_block(block, training_code, dt_transform).items()})
    for j in range(levels):
        i = levels - 1 - j
        lin = backbone.up_pools[i].linear
        w, b = ref_up_pool(lin.weight.detach(), lin.bias.detach(), backbone.widths[i], backbone.pool[i])
        state.update({f"u_layers.{j}.0.linear.{k}": v for k, v in
                      ref_linear(w, b, conv1d=not training_code, weight_norm=training_code).items()})
        for k, block in enumerate(backbone.up_blocks[i]):
            state.update({f"u_layers.{j}.{k + 1}.{n}": v
                          for n, v in ref_block(block, training_code, dt_transform).items()})
    if not training_code:  # the standalone backbone's own final LayerNorm
        state["norm.weight"], state["norm.bias"] = backbone.norm.weight, backbone.norm.bias
    return {prefix + k: v.detach().clone() for k, v in state.items()}


def lightning_state_dict(model: WaveformAR, dt_transform="exp") -> dict:
    """A SequenceLightningModule state_dict: encoder (embedding), model (src backbone + its final norm), decoder."""
    state = to_reference(model.backbone, training_code=True, dt_transform=dt_transform, prefix="model.")
    state["model.norm.weight"], state["model.norm.bias"] = model.norm.weight.detach(), model.norm.bias.detach()
    state["encoder.1.0.weight"] = model.embedding.weight.detach().clone()
    state["decoder.0.0.output_transform.weight"] = model.head.weight.detach().clone()
    state["decoder.0.0.output_transform.bias"] = model.head.bias.detach().clone()
    return state


# ----------------------------------------------------------------------------- same outputs


@pytest.mark.parametrize("unet", [False, True])
def test_standalone_backbone_layout(unet):
    torch.manual_seed(0)
    ours = perturb(sashimi.SaShiMi(8, 2, (4, 2), 2, 2, bidirectional=False, unet=unet, d_state=8,
                                   backend=BACKEND)).eval()
    x = torch.randn(2, 32, 8)
    with torch.no_grad():
        expected = ours(x)
    state = to_reference(ours)
    assert not any(k.startswith(("down_", "up_", "center")) for k in state)
    model = from_state_spaces(state, backend=BACKEND)
    assert isinstance(model, sashimi.SaShiMi) and model.unet == unet and model.pool == (4, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dt_transform, block_norm", [("exp", "scalar"), ("softplus", "scalar"), ("exp", "layer")])
def test_training_code_checkpoint(tmp_path, dt_transform, block_norm):
    torch.manual_seed(1)
    config = ModelConfig(d_model=8, n_layers=2, pool=(4, 4), d_state=8, n_ssm=1, sample_len=64,
                         block_norm=block_norm, backend=BACKEND)
    ours = perturb(WaveformAR(config)).eval()
    tokens = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        expected = ours(tokens)
    path = str(tmp_path / "sashimi_sc09.pt")
    torch.save(lightning_state_dict(ours, dt_transform), path)
    model = from_state_spaces(path, dt_transform=dt_transform, backend=BACKEND, sample_len=64, name="sc09")
    assert isinstance(model, WaveformAR) and not model.training
    c = model.config
    assert (c.d_model, c.n_layers, c.pool, c.expand, c.ff, c.d_state, c.n_ssm, c.block_norm, c.bits) == \
        (8, 2, (4, 4), 2, 2, 8, 1, block_norm, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)
    # the imported model round-trips through the shareable format
    model.save_pretrained(str(tmp_path / "exported"))
    with torch.no_grad():
        assert torch.equal(sashimi.from_pretrained(str(tmp_path / "exported"))(tokens), model(tokens))
    # a Lightning-style {"state_dict": ...} wrapper of tensors loads too
    wrapped = from_state_spaces({"state_dict": lightning_state_dict(ours, dt_transform)}, dt_transform=dt_transform,
                                backend=BACKEND, sample_len=64)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(tokens), expected, rtol=1e-5, atol=1e-5)


def test_imported_model_steps_like_the_convolution():
    torch.manual_seed(2)
    ours = perturb(WaveformAR(ModelConfig(d_model=8, n_layers=1, pool=(2, 2), d_state=8, sample_len=16,
                                          block_norm="scalar", backend=BACKEND))).eval()
    model = from_state_spaces(lightning_state_dict(ours), backend=BACKEND, sample_len=16)
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        conv = model(tokens)
        model.setup_step()
        state = model.default_state(1)
        steps = torch.stack([model.step(tokens[:, t], state)[0] for t in range(16)], 1)
    torch.testing.assert_close(steps, conv, rtol=1e-4, atol=1e-4)


def test_v3_names():
    """The renames of the reference's convert_v3_to_v4.py, undone: a v3 state_dict imports the same."""
    torch.manual_seed(3)
    ours = perturb(WaveformAR(ModelConfig(d_model=8, n_layers=1, pool=(4,), d_state=8, sample_len=16,
                                          block_norm="scalar", backend=BACKEND))).eval()
    v4 = lightning_state_dict(ours)
    v3 = {}
    for k, v in v4.items():
        if ".layer.layer." in k:
            k = k.replace(".layer.layer.kernel.", ".layer.kernel.kernel.").replace(".layer.layer.D", ".layer.D")
        if k.endswith("kernel.inv_dt"):
            k, v = k.replace("inv_dt", "log_dt"), v.squeeze(-1)
        elif k.endswith("kernel.A_real"):
            k = k.replace("A_real", "log_w_real")
        elif k.endswith("kernel.A_imag"):
            k, v = k.replace("A_imag", "w_imag"), -v
        elif k.endswith("kernel.l_kernel"):
            k = k.replace("l_kernel", "L")
        v3[k] = v
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(from_state_spaces(v3, backend=BACKEND, sample_len=16)(tokens), ours(tokens),
                                   rtol=1e-5, atol=1e-5)


REFERENCE_SCRIPT = textwrap.dedent("""
    import sys, types, torch
    root, out, unet, mode = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
    sys.path.insert(0, root)
    # the standalone S4 file imports one decorator from pytorch_lightning
    pl, ut = types.ModuleType("pytorch_lightning"), types.ModuleType("pytorch_lightning.utilities")
    ut.rank_zero_only = lambda f: f
    pl.utilities = ut
    sys.modules.update({"pytorch_lightning": pl, "pytorch_lightning.utilities": ut})
    sys.modules["pykeops"] = None  # its naive (CPU) Cauchy kernel, not KeOps' GPU one
    from models.sashimi.sashimi import Sashimi
    torch.manual_seed(0)
    m = Sashimi(d_model=8, n_layers=2, pool=[4, 2], expand=2, ff=2, unet=unet, mode=mode).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_((0.05 if ".kernel." in name else 0.2) * torch.randn(p.shape, generator=g))
        x = torch.randn(2, 64, 8, generator=g)
        y, _ = m(x)
    torch.save({"state_dict": m.state_dict(), "x": x, "y": y}, out)
""")


def reference_checkout(tmp_path, paths):
    """The reference's files `paths` (from its git directory) under tmp_path/reference, or skip."""
    git_dir = os.environ.get("S4_REFERENCE_GIT", "/work/.mirror/state-spaces+s4/repo")
    if not os.path.isdir(git_dir):
        pytest.skip("no state-spaces/s4 checkout (set S4_REFERENCE_GIT to its git directory)")
    pytest.importorskip("einops", reason="the reference's modules need einops")
    pytest.importorskip("scipy")
    root = tmp_path / "reference"
    root.mkdir()
    archive = subprocess.run(["git", "--git-dir", git_dir, "archive", "HEAD", *paths], capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=False, capture_output=True)
    if not all((root / p).exists() for p in paths):
        pytest.skip(f"cannot read {paths} from {git_dir}: {archive.stderr.decode()[:200]}")
    return root


def run_reference(script, *args):
    run = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    if run.returncode:
        pytest.fail(f"the reference's code did not run:\n{run.stderr[-2000:]}")


@pytest.mark.parametrize("unet, mode", [(False, "dplr"), (True, "dplr"), (False, "diag")])
def test_the_reference_standalone_sashimi_itself(tmp_path, unet, mode):
    root = reference_checkout(tmp_path, ["models/s4/s4.py", "models/sashimi/sashimi.py"])
    out = tmp_path / "fixture.pt"
    run_reference(REFERENCE_SCRIPT, root, out, "1" if unet else "0", mode)
    fixture = torch.load(out, weights_only=True)
    model = from_state_spaces(fixture["state_dict"], backend=BACKEND)
    assert model.unet == unet and model.d_model == 8 and model.pool == (4, 2)
    from s4lib.fftconv import FFTConv
    assert {m.mode for m in model.modules() if isinstance(m, FFTConv)} == {mode}
    with torch.no_grad():
        y = model(fixture["x"])
    print(f"max |ours - reference| = {(y - fixture['y']).abs().max().item():.2e} (|y| <= {fixture['y'].abs().max():.2f})")
    torch.testing.assert_close(y, fixture["y"], rtol=1e-4, atol=1e-4)


REFERENCE_TRAINING_SCRIPT = textwrap.dedent("""
    import importlib, sys, types, warnings, torch
    root, out = sys.argv[1], sys.argv[2]
    sys.path.insert(0, root)
    open(root + "/src/__init__.py", "a").close()
    # what the modules import from hydra / omegaconf / lightning / rich, as stubs (no training stack needed)
    def stub(name, **attrs):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        return module
    def get_method(path):
        module, _, attr = path.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    stub("hydra").utils = stub("hydra.utils", get_method=get_method, get_class=get_method)
    stub("omegaconf", DictConfig=type("DictConfig", (dict,), {}), ListConfig=type("ListConfig", (list,), {}),
         OmegaConf=object)
    stub("pytorch_lightning", Callback=object).utilities = stub("pytorch_lightning.utilities",
                                                                rank_zero_only=lambda f: f)
    stub("rich").syntax, sys.modules["rich"].tree = stub("rich.syntax"), stub("rich.tree")
    sys.modules["pykeops"] = None
    warnings.simplefilter("ignore")
    from src.models.sequence.backbones.sashimi import Sashimi
    from src.tasks.decoders import SequenceDecoder
    import src.models.nn.utils as U
    # configs/model/sashimi.yaml + configs/model/layer/s4.yaml, as the audio experiments (n_ssm: 1)
    layer = dict(_name_="s4", d_state=64, channels=1, bidirectional=False, gate=None, gate_act="id",
                 bottleneck=None, activation="gelu", mult_act=None, final_act="glu", postact=None, initializer=None,
                 weight_norm=False, tie_dropout=None, layer="fftconv", mode="nplr", init="legs", measure=None, rank=1,
                 dt_min=0.001, dt_max=0.1, dt_transform="softplus", lr=dict(dt=0.001, A=0.001, B=0.001), wd=0.0,
                 n_ssm=1, drop_kernel=0.0, deterministic=False, l_max=None, verbose=False)
    torch.manual_seed(0)
    lm = torch.nn.Module()  # the SequenceLightningModule's three parts, composed as train.py does
    lm.model = Sashimi(d_model=8, n_layers=2, pool=[4, 4], expand=2, ff=2, prenorm=True, dropout=0.0, dropres=0.0,
                       layer=layer, residual="R", norm="layer", initializer=None, transposed=True, interp=0,
                       act_pool=None)
    lm.encoder = U.PassthroughSequential(torch.nn.Identity(), U.PassthroughSequential(torch.nn.Embedding(256, 8)))
    lm.decoder = U.PassthroughSequential(U.PassthroughSequential(SequenceDecoder(8, 256, mode="last")),
                                         torch.nn.Identity())
    lm.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.add_((0.05 if ".kernel." in name else 0.2) * torch.randn(p.shape, generator=g))
        tokens = torch.randint(0, 256, (2, 64), generator=g)
        x, _ = lm.encoder(tokens)
        y, _ = lm.model(x)
        logits, _ = lm.decoder(y)
    torch.save({"state_dict": lm.state_dict(), "tokens": tokens, "logits": logits}, out)
""")


def test_the_reference_training_code_model_itself(tmp_path):
    """The src backbone (weight-normed pools, TransposedLN, FFN, softplus dt) with embedding and decoder."""
    root = reference_checkout(tmp_path, ["src/models", "src/utils", "src/tasks"])
    out = tmp_path / "lightning.pt"
    run_reference(REFERENCE_TRAINING_SCRIPT, root, out)
    fixture = torch.load(out, weights_only=True)
    assert any(k.endswith("linear.weight_g") for k in fixture["state_dict"])
    model = from_state_spaces(out, dt_transform="softplus", backend=BACKEND, sample_len=64)
    assert model.config.block_norm == "scalar" and model.config.n_ssm == 1
    with torch.no_grad():
        logits = model(fixture["tokens"])
    print(f"max |ours - reference| = {(logits - fixture['logits']).abs().max().item():.2e} "
          f"(|logits| <= {fixture['logits'].abs().max():.2f})")
    torch.testing.assert_close(logits, fixture["logits"], rtol=1e-4, atol=1e-4)
    wrong = from_state_spaces(out, dt_transform="exp", backend=BACKEND, sample_len=64)
    with torch.no_grad():  # the dt parameterisation is not in the weights: the wrong one shows
        assert (wrong(fixture["tokens"]) - fixture["logits"]).abs().max() > 1e-2


# ----------------------------------------------------------------------------- bad input


def test_errors(tmp_path):
    with pytest.raises(StateSpacesImportError, match="does not exist"):
        from_state_spaces(str(tmp_path / "missing.pt"))
    with pytest.raises(StateSpacesImportError, match="c_layers"):
        from_state_spaces({"weight": torch.zeros(2)})
    with pytest.raises(StateSpacesImportError, match="a dict of tensors"):
        from_state_spaces([1, 2])
    pickled = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": object()}}, pickled)
    with pytest.raises(StateSpacesImportError, match=r"weights_only=True.*convert_pl_to_pt"):
        from_state_spaces(str(pickled))
    torch.manual_seed(4)
    ours = WaveformAR(ModelConfig(d_model=8, n_layers=1, pool=(4,), d_state=8, sample_len=16, backend=BACKEND))
    state = lightning_state_dict(ours)
    with pytest.raises(StateSpacesImportError, match="dt_transform must be one of"):
        from_state_spaces(state, dt_transform="relu")
    two = dict(state)
    two["model.c_layers.0.layer.layer.kernel.C"] = torch.cat([state["model.c_layers.0.layer.layer.kernel.C"]] * 2)
    with pytest.raises(StateSpacesImportError, match="2 kernel channels: bidirectional"):
        from_state_spaces(two)
    no_norm = {k: v for k, v in state.items() if not k.startswith("model.c_layers.1.norm")}
    with pytest.raises(StateSpacesImportError, match=r"model\.c_layers\.1: no supported normalisation"):
        from_state_spaces(no_norm)
    no_head = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    with pytest.raises(StateSpacesImportError, match="one output_transform under decoder"):
        from_state_spaces(no_head)
    backbone_only = to_reference(sashimi.SaShiMi(8, 1, (4,), d_state=8, backend=BACKEND))
    with pytest.raises(StateSpacesImportError, match="takes no model configuration"):
        from_state_spaces(backbone_only, sample_len=16)
    with pytest.raises(StateSpacesImportError, match=r"no counterpart for: \['model\.interp_layers"):
        from_state_spaces({**state, "model.interp_layers.0.0.norm.weight": torch.ones(8)})
    bad_shape = dict(state)
    bad_shape["model.c_layers.0.layer.layer.D"] = torch.zeros(1, 3)
    with pytest.raises(ValueError, match=r"layer\.layer\.D has shape \(1, 3\)"):
        from_state_spaces(bad_shape)


@settings(max_examples=8, deadline=None)
@given(d_model=st.sampled_from([4, 8]), n_layers=st.integers(1, 2), pool=st.sampled_from([(2,), (2, 2), (4, 2)]),
       expand=st.integers(1, 2), ff=st.integers(0, 2), mode=st.sampled_from(["dplr", "diag"]),
       n_ssm=st.sampled_from([None, 1, 2]), block_norm=st.sampled_from(["layer", "scalar"]),
       dt_transform=st.sampled_from(["exp", "softplus"]), seed=st.integers(0, 2**16))
def test_training_code_layout_over_architectures(d_model, n_layers, pool, expand, ff, mode, n_ssm, block_norm,
                                                 dt_transform, seed):
    torch.manual_seed(seed)
    config = ModelConfig(d_model=d_model, n_layers=n_layers, pool=pool, expand=expand, ff=ff, mode=mode, n_ssm=n_ssm,
                         block_norm=block_norm, d_state=4, sample_len=16, backend=BACKEND,
                         init="dplr-random" if mode == "dplr" else None)
    ours = perturb(WaveformAR(config), seed).eval()
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        expected = ours(tokens)
    model = from_state_spaces(lightning_state_dict(ours, dt_transform), dt_transform=dt_transform, backend=BACKEND,
                              sample_len=16)
    c = model.config
    assert (c.d_model, c.n_layers, c.pool, c.expand, c.ff, c.mode, c.n_ssm, c.block_norm) == \
        (d_model, n_layers, pool, expand, ff, mode, n_ssm, block_norm)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)
