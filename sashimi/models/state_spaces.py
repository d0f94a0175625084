"""Import SaShiMi models of state-spaces/s4: its standalone backbone and its training code's audio checkpoints.

    backbone = sashimi.from_state_spaces(torch.load("sashimi.pt", weights_only=True))  # -> SaShiMi
    model = sashimi.from_state_spaces("sashimi_sc09.pt")                               # -> WaveformAR

Two layouts are recognised from the keys (any common prefix, e.g. `model.`, is found):
- the standalone `models/sashimi/sashimi.py` Sashimi backbone: d_layers (DownPool, and the
  U-Net's down blocks), c_layers (centre blocks), u_layers (UpPool + up blocks), norm; its
  pooling and FF linears are Conv1d(kernel_size=1) with weights (out, in, 1). -> `SaShiMi`.
- the training code's SequenceLightningModule state_dict of the audio experiments
  (configs/experiment/audio/sashimi-{sc09,youtubemix,beethoven}): encoder.* (an nn.Embedding),
  model.* (the src backbone: weight-normed pooling linears, TransposedLN residual norms with a
  scalar gain and shift, FFN blocks), decoder.*output_transform (the output head). -> `WaveformAR`
  with block_norm='scalar' (and LayerNorm when the norms are not scalar).

The architecture (d_model, n_layers, pool, expand, ff, d_state, n_ssm, rank, mode, U-Net) is read
from the tensor shapes; the S4 kernels go through s4lib.compat (v4 names; the v3 names that the
reference's checkpoints/convert_v3_to_v4.py renames are renamed the same way first). What the
weights cannot say is an argument: dt_transform ('exp', the standalone's and v3's default, or
'softplus', the training code's v4 layer config) and, for WaveformAR, the audio format
(quantization, sample_rate, sample_len: ModelConfig fields passed as keywords).
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F

from s4lib.compat import load_state_spaces

__all__ = ["from_state_spaces", "StateSpacesImportError", "read_state_dict"]

DT_TRANSFORMS = ("exp", "softplus")


class StateSpacesImportError(ValueError):
    """A state_dict that is not a (supported) state-spaces/s4 SaShiMi model."""


# ----------------------------------------------------------------------------- reading


def read_state_dict(source, source_name: str | None = None) -> dict:
    """A flat {name: tensor} from a path (.pt / Lightning .ckpt, loaded with weights_only=True) or a dict."""
    name = source_name or (source if isinstance(source, (str, os.PathLike)) else "state_dict")
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise StateSpacesImportError(f"{source} does not exist")
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [""])[0]
            raise StateSpacesImportError(
                f"cannot read {name} with torch.load(weights_only=True) ({type(e).__name__}: {reason}). A PyTorch "
                "Lightning .ckpt also pickles its hyperparameters: convert it with the reference's "
                "checkpoints/convert_pl_to_pt.py, or, if you trust the file, pass "
                "torch.load(path, weights_only=False)['state_dict']") from e
    if isinstance(source, dict) and "state_dict" in source and isinstance(source["state_dict"], dict):
        source = source["state_dict"]  # a Lightning checkpoint
    if not isinstance(source, dict) or not source:
        raise StateSpacesImportError(f"{name}: expected a state_dict (a dict of tensors), got {type(source).__name__}")
    bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise StateSpacesImportError(f"{name}: entries that are not tensors: {bad[:4]}")
    return OrderedDict((k, v.detach().cpu()) for k, v in source.items())


def _v3_to_v4(state: dict) -> dict:
    """The renames of the reference's checkpoints/convert_v3_to_v4.py (v3 kept Im A with the other sign)."""
    if not any(re.search(r"(log_dt|inv_w_real|log_w_real|w_imag)$", k) for k in state):
        return state
    out = OrderedDict()
    for key, value in state.items():
        if key.endswith("log_dt"):
            value = value.unsqueeze(-1)
        key = key.replace("log_dt", "inv_dt").replace("inv_w_real", "A_real").replace("log_w_real", "A_real")
        key = key.replace("w_imag", "A_imag")
        if key.endswith("A_imag"):
            value = -value
        key = key.replace("kernel.kernel.L", "kernel.kernel.l_kernel").replace("kernel.kernel", "kernel")
        key = key.replace("layer.kernel", "layer.layer.kernel").replace("layer.D", "layer.layer.D")
        out[key] = value
    return out


# ----------------------------------------------------------------------------- layout


def _backbone_prefix(state: dict) -> str:
    prefixes = {m.group(1) for k in state for m in [re.match(r"^(.*?)c_layers\.\d+\.", k)] if m}
    if len(prefixes) != 1:
        found = "none" if not prefixes else sorted(prefixes)
        raise StateSpacesImportError(f"not a state-spaces/s4 SaShiMi state_dict: expected the backbone's "
                                     f"c_layers.* keys under one prefix, found {found}")
    return prefixes.pop()


def _indices(state: dict, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state for m in [pattern.match(k)] if m})


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _linear_weight(entries: dict, name: str, where: str) -> torch.Tensor:
    """A (possibly weight-normed, possibly Conv1d) linear's weight as (out, in)."""
    if name + ".weight" in entries:
        w = entries[name + ".weight"]
    elif name + ".weight_v" in entries or name + ".parametrizations.weight.original1" in entries:
        g = entries.get(name + ".weight_g", entries.get(name + ".parametrizations.weight.original0"))
        v = entries.get(name + ".weight_v", entries.get(name + ".parametrizations.weight.original1"))
        if g is None or v is None:
            raise StateSpacesImportError(f"{where}{name}: weight norm needs both the gain and the direction")
        norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
        w = g * v / norm  # torch's weight_norm over every dimension but the first
    else:
        raise StateSpacesImportError(f"{where}{name}: no weight (expected {name}.weight or a weight norm)")
    if w.dim() == 3 and w.shape[-1] == 1:  # Conv1d(kernel_size=1)
        w = w[..., 0]
    if w.dim() != 2:
        raise StateSpacesImportError(f"{where}{name}: expected a linear weight, got shape {tuple(w.shape)}")
    return w


def _kind(block: dict) -> str:
    if any(k.startswith("layer.layer.kernel.") for k in block):
        return "s4"
    if any(k.startswith("layer.ff.") for k in block):
        return "ff"
    if any(k.startswith("linear.") for k in block):
        return "pool"
    return "unknown"


def _convert_block(block: dict, where: str) -> tuple[dict, str]:
    """One residual block (S4 or FF) in our names, and its norm kind."""
    out = {}
    if "norm.weight" in block:  # nn.LayerNorm (standalone)
        norm = "layer"
        out["norm.weight"], out["norm.bias"] = block["norm.weight"], block["norm.bias"]
    elif "norm.norm.s" in block:  # Normalization -> TransposedLN(scalar=True)
        norm = "scalar"
        out["norm.s"], out["norm.m"] = block["norm.norm.s"], block["norm.norm.m"]
    elif "norm.norm.ln.weight" in block:  # TransposedLN(scalar=False)
        norm = "layer"
        out["norm.weight"], out["norm.bias"] = block["norm.norm.ln.weight"], block["norm.norm.ln.bias"]
    elif "norm.norm.weight" in block:  # Normalization(transposed=False) -> nn.LayerNorm
        norm = "layer"
        out["norm.weight"], out["norm.bias"] = block["norm.norm.weight"], block["norm.norm.bias"]
    else:
        raise StateSpacesImportError(f"{where}: no supported normalisation (expected norm.weight or norm.norm.s); "
                                     f"keys {sorted(block)[:6]}")
    kind = _kind(block)
    if kind == "s4":
        unsupported = [k for k in block if k.startswith(("layer.input_linear", "layer.input_gate", "layer.output_gate",
                                                         "reverse_layer", "bidirectional_linear"))]
        if unsupported:
            raise StateSpacesImportError(f"{where}: gated / bottleneck / two-layer bidirectional S4 blocks are not "
                                         f"supported ({unsupported[0]})")
        for k, v in block.items():
            if k.startswith("layer."):
                out[k] = v
    elif kind == "ff":
        out["layer.input_linear.weight"] = _linear_weight(block, "layer.ff.0.0", where + ".")
        out["layer.input_linear.bias"] = block["layer.ff.0.0.bias"]
        out["layer.output_linear.weight"] = _linear_weight(block, "layer.ff.2", where + ".")
        out["layer.output_linear.bias"] = block["layer.ff.2.bias"]
    else:
        raise StateSpacesImportError(f"{where}: neither an S4 block nor an FF block; keys {sorted(block)[:6]}")
    return out, norm


def _down_pool(entries: dict, where: str, width: int) -> tuple[dict, int, int]:
    """Reference features (h, s) -> ours (s, h); returns the entries, the pool and the expansion."""
    w = _linear_weight(entries, "linear", where + ".")
    out_features, in_features = w.shape
    if in_features % width or out_features % width:
        raise StateSpacesImportError(f"{where}: DownPool weight {tuple(w.shape)} does not fit the width {width}")
    pool = in_features // width
    w = w.reshape(out_features, width, pool).transpose(1, 2).reshape(out_features, pool * width)
    return {"linear.weight": w, "linear.bias": entries["linear.bias"]}, pool, out_features // width


def _up_pool(entries: dict, where: str, width: int, pool: int) -> dict:
    """Reference outputs (h, s) -> ours (s, h)."""
    w = _linear_weight(entries, "linear", where + ".")
    if w.shape[0] != width * pool:
        raise StateSpacesImportError(f"{where}: UpPool weight {tuple(w.shape)} does not give pool={pool} x width={width}")
    w = w.reshape(width, pool, -1).transpose(0, 1).reshape(width * pool, -1)
    b = entries["linear.bias"].reshape(width, pool).transpose(0, 1).reshape(-1)
    return {"linear.weight": w, "linear.bias": b}


def _convert_backbone(state: dict, prefix: str) -> tuple[dict, dict]:
    """The backbone in SaShiMi's names and the architecture it has (SaShiMi keywords)."""
    norm_key = prefix + "norm.weight"
    if norm_key not in state:
        raise StateSpacesImportError(f"no final norm {norm_key} in the backbone")
    d_model = state[norm_key].shape[0]
    unknown = [k for k in state if k.startswith(prefix) and not k.startswith(("encoder.", "decoder."))
               and not k[len(prefix):].startswith(("d_layers.", "c_layers.", "u_layers.", "norm."))]
    if unknown:  # e.g. the training code's interp_layers
        raise StateSpacesImportError(f"backbone entries that SaShiMi has no counterpart for: {unknown[:4]}")
    out, norms = {}, set()
    # down path: per level, its blocks (U-Net only) then a DownPool
    down_blocks, pools, expands, level, width = [[]], [], [], 0, d_model
    for i in _indices(state, prefix + "d_layers."):
        where = f"{prefix}d_layers.{i}"
        entries = _sub(state, where + ".")
        if _kind(entries) == "pool":
            converted, p, e = _down_pool(entries, where, width)
            out.update({f"down_pools.{level}.{k}": v for k, v in converted.items()})
            pools.append(p)
            expands.append(e)
            level, width = level + 1, width * e
            down_blocks.append([])
        else:
            down_blocks[level].append(_convert_block(entries, where))
    down_blocks.pop()  # the centre has no down blocks
    if not pools:
        raise StateSpacesImportError(f"no DownPool under {prefix}d_layers: a SaShiMi has at least one pooling level")
    if len(set(expands)) != 1:
        raise StateSpacesImportError(f"the levels expand by different factors {expands}; SaShiMi has one expand")
    centre = [_convert_block(_sub(state, f"{prefix}c_layers.{i}."), f"{prefix}c_layers.{i}")
              for i in _indices(state, prefix + "c_layers.")]
    ups = _indices(state, prefix + "u_layers.")
    if len(ups) != len(pools):
        raise StateSpacesImportError(f"{len(pools)} DownPools but {len(ups)} up levels under {prefix}u_layers")
    up_blocks = [None] * len(pools)
    for j in ups:
        level = len(pools) - 1 - j  # u_layers run from the coarsest level up
        width = d_model * expands[0] ** level
        where = f"{prefix}u_layers.{j}"
        out.update({f"up_pools.{level}.{k}": v for k, v in
                    _up_pool(_sub(state, where + ".0."), where + ".0", width, pools[level]).items()})
        up_blocks[level] = [_convert_block(_sub(state, f"{where}.{k}."), f"{where}.{k}")
                            for k in _indices(state, where + ".") if k > 0]
    # block counts and kinds say n_layers and whether there are FF blocks
    kinds = [_kind(_sub(state, f"{prefix}c_layers.{i}.")) for i in _indices(state, prefix + "c_layers.")]
    ff_blocks = kinds.count("ff")
    n_layers = kinds.count("s4")
    if ff_blocks not in (0, n_layers) or (ff_blocks and kinds != ["s4", "ff"] * n_layers):
        raise StateSpacesImportError(f"centre blocks {kinds}: expected n_layers (S4, FF) pairs or S4 blocks only")
    unet = any(down_blocks)
    for group in (centre, *up_blocks, *(down_blocks if unet else [])):
        if len(group) != len(kinds):
            raise StateSpacesImportError(f"levels with different numbers of blocks ({len(group)} vs {len(kinds)} "
                                         "in the centre): SaShiMi has n_layers per level")
    for name, groups in (("center_blocks", [centre]), ("up_blocks", up_blocks), ("down_blocks", down_blocks)):
        for level, group in enumerate(groups):
            for k, (converted, norm) in enumerate(group):
                norms.add(norm)
                base = f"{name}.{k}." if name == "center_blocks" else f"{name}.{level}.{k}."
                out.update({base + key: v for key, v in converted.items()})
    if len(norms) != 1:
        raise StateSpacesImportError(f"blocks with different normalisations {sorted(norms)}")
    ff = 0
    if ff_blocks:
        ff_in = out["center_blocks.1.layer.input_linear.weight"]
        ff = ff_in.shape[0] // ff_in.shape[1]
    arch = dict(d_model=d_model, n_layers=n_layers, pool=tuple(pools), expand=expands[0], ff=ff, unet=unet,
                block_norm=norms.pop())
    arch.update(_s4_settings(out, arch))
    out["norm.weight"], out["norm.bias"] = state[norm_key], state[prefix + "norm.bias"]
    return out, arch


def _s4_settings(converted: dict, arch: dict) -> dict:
    """d_state, mode, rank, n_ssm of the S4 layers (the same in every block), from the kernel shapes."""
    settings, sizes = set(), []
    for key, value in converted.items():
        if not key.endswith("layer.layer.kernel.A_real"):
            continue
        base = key[: -len("A_real")]
        group = key.split(".")
        level = len(arch["pool"]) if group[0] == "center_blocks" else int(group[1])
        width = arch["d_model"] * arch["expand"] ** level
        n_ssm, n = value.shape
        C = converted[base + "C"]
        if C.shape[0] != 1:
            raise StateSpacesImportError(f"{base}C has {C.shape[0]} kernel channels: bidirectional or multi-channel "
                                         "S4 layers are not supported (SaShiMi's causal model has one)")
        P = converted.get(base + "P")
        out_linear = converted.get(key[: -len("layer.kernel.A_real")] + "output_linear.0.weight")
        if out_linear is None or out_linear.shape[0] != 2 * width:
            raise StateSpacesImportError(f"{base[:-len('layer.kernel.')]}: expected the GLU output linear "
                                         "(final_act='glu') of the S4 block")
        settings.add((2 * n, "dplr" if P is not None else "diag", P.shape[0] if P is not None else None))
        sizes.append((n_ssm, width))
    if len(settings) != 1:
        raise StateSpacesImportError(f"S4 layers with different settings (d_state, mode, rank): {sorted(settings)}")
    d_state, mode, rank = settings.pop()
    if all(n_ssm == width for n_ssm, width in sizes):
        n_ssm = None  # every channel its own (A, B), the reference's n_ssm=None
    elif len({n_ssm for n_ssm, _ in sizes}) == 1:
        n_ssm = sizes[0][0]
    else:
        raise StateSpacesImportError(f"S4 layers with different numbers of SSMs {sorted(set(sizes))} (n_ssm, width)")
    out = {"d_state": d_state, "mode": mode, "n_ssm": n_ssm}
    if rank not in (None, 1):
        raise StateSpacesImportError(f"low-rank term of rank {rank}: sashimi's S4 layers use rank 1")
    return out


def _apply_dt_transform(state: dict, dt_transform: str) -> dict:
    """inv_dt under 'softplus' -> the 'exp' parameter s4lib.compat expects (log dt)."""
    if dt_transform not in DT_TRANSFORMS:
        raise StateSpacesImportError(f"dt_transform must be one of {DT_TRANSFORMS}, got {dt_transform!r}")
    if dt_transform == "exp":
        return state
    return {k: (torch.log(F.softplus(v.double())).to(v.dtype) if k.endswith("kernel.inv_dt") else v)
            for k, v in state.items()}


# ----------------------------------------------------------------------------- entry point


def from_state_spaces(source, *, dt_transform: str = "exp", backend: str | None = None, **config):
    """A state-spaces/s4 SaShiMi (path or state_dict) as sashimi.SaShiMi or sashimi.WaveformAR.

    The standalone backbone gives a SaShiMi (final LayerNorm included, as there); a training-code
    checkpoint with its embedding and output head gives a WaveformAR in eval mode. dt_transform:
    how the checkpoint's inv_dt maps to dt ('exp': standalone layer and v3 checkpoints; 'softplus':
    the training code's v4 S4 layer config). config: ModelConfig fields for a WaveformAR that the
    weights do not determine (name, quantization, sample_rate, sample_len; the paper's Beethoven
    model is quantization='linear'). backend: the kernel-op backend of the S4 layers.
    """
    from ..nn.backbone import SaShiMi
    from .autoregressive import ModelConfig, WaveformAR

    state = _v3_to_v4(read_state_dict(source))
    prefix = _backbone_prefix(state)
    backbone_state, arch = _convert_backbone(state, prefix)
    backbone_state = _apply_dt_transform(backbone_state, dt_transform)
    s4 = {"mode": arch.pop("mode"), "d_state": arch.pop("d_state"), "n_ssm": arch.pop("n_ssm"), "backend": backend}
    if s4["mode"] == "dplr":
        s4["hurwitz"] = True
    embedding = [k for k in state if k.startswith("encoder.") and k.endswith(".weight") and state[k].dim() == 2]
    head = [k for k in state if k.startswith("decoder.") and k.endswith("output_transform.weight")]
    if not embedding and not head:
        if config:
            raise StateSpacesImportError(f"a standalone backbone takes no model configuration ({sorted(config)})")
        model = SaShiMi(**arch, bidirectional=False, final_norm=True, **s4)
        load_state_spaces(model, backbone_state)
        return model.eval()
    if len(embedding) != 1 or len(head) != 1:
        raise StateSpacesImportError(f"expected one embedding under encoder.* and one output_transform under "
                                     f"decoder.*, found {embedding} and {head}")
    table, head_w = state[embedding[0]], state[head[0]]
    n_classes = table.shape[0]
    if head_w.shape != (n_classes, arch["d_model"]) or table.shape[1] != arch["d_model"]:
        raise StateSpacesImportError(f"embedding {tuple(table.shape)} and output head {tuple(head_w.shape)} do not "
                                     f"fit a d_model={arch['d_model']} model over the same levels")
    stride = math.prod(arch["pool"])
    bits = int(round(math.log2(n_classes)))
    if 2 ** bits != n_classes:
        raise StateSpacesImportError(f"{n_classes} quantisation levels is not a power of two")
    model_config = ModelConfig(**{"name": "state-spaces", **arch, "mode": s4["mode"], "d_state": s4["d_state"],
                                  "n_ssm": s4["n_ssm"], "backend": backend, "bits": bits,
                                  "sample_len": 16000 if 16000 % stride == 0 else 1000 * stride, **config})
    model = WaveformAR(model_config)
    final_norm = {"norm.weight": backbone_state.pop("norm.weight"), "norm.bias": backbone_state.pop("norm.bias")}
    load_state_spaces(model.backbone, backbone_state)
    model.embedding.weight.data.copy_(table)
    model.norm.load_state_dict({"weight": final_norm["norm.weight"], "bias": final_norm["norm.bias"]})
    model.head.load_state_dict({"weight": head_w, "bias": state[head[0][: -len("weight")] + "bias"]})
    return model.eval()
