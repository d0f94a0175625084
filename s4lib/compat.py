"""Load checkpoints saved from state-spaces/s4's standalone S4Block / FFTConv (v4 key names).

    block = s4lib.S4Block(d_model, mode='dplr', d_state=64, ...)   # same architecture
    s4lib.compat.load_state_spaces(block, torch.load(path, weights_only=True))

v4 stores, per SSM kernel: inv_dt (H, 1) with dt = exp(inv_dt) (dt_transform='exp', the
default); A_real (S, n) with Re A = -exp(A_real) (real_transform='exp'); A_imag (S, n) with
Im A = -A_imag; B (1, S, n, 2), C (channels, H, n, 2), P (rank, S, n, 2) as real views of
complex tensors; and the buffer l_kernel (C holds C~ when l_kernel > 0, as here). v4 keeps
the eigenvalues with negative imaginary part; s4lib keeps the conjugates, so Lambda, B, C
and P are conjugated (the real system, and so every output, is unchanged). Keys that are
not SSM-kernel keys (D, output_linear.0.weight, ...) are the same in both.
"""

from __future__ import annotations

import torch
import torch.nn as nn

KERNEL_KEYS = ("inv_dt", "A_real", "A_imag", "B", "C", "P")


def _conj_view(t: torch.Tensor) -> torch.Tensor:
    """Conjugate a real view (..., 2) of a complex tensor."""
    if t.shape[-1] != 2:
        raise ValueError(f"expected a real view of a complex tensor with last dimension 2, got {tuple(t.shape)}")
    return torch.stack([t[..., 0], -t[..., 1]], dim=-1)


def is_state_spaces_state_dict(state_dict: dict) -> bool:
    return any(k.endswith("kernel.inv_dt") or k.endswith("kernel.A_real") for k in state_dict)


def convert_state_spaces_state_dict(state_dict: dict) -> dict:
    """Rename and convert v4 SSM-kernel entries to s4lib's; everything else passes through."""
    out = {}
    for key, value in state_dict.items():
        prefix, _, name = key.rpartition(".")
        if not prefix.endswith("kernel") or name not in KERNEL_KEYS:
            out[key] = value
            continue
        p = prefix + "."
        if name == "inv_dt":
            if value.dim() == 2 and value.shape[-1] != 1:
                raise ValueError(f"{key}: untied dt (shape {tuple(value.shape)}, dt_tie=False) is not supported")
            out[p + "log_dt"] = value.reshape(-1)
        elif name == "A_real":
            out[p + "Lambda_re"] = value
        elif name == "A_imag":
            out[p + "Lambda_im"] = value  # Im(conj A) = -Im A = A_imag
        elif name == "B":
            out[p + "B"] = _conj_view(value.squeeze(0) if value.dim() == 4 else value)
        elif name in ("C", "P"):
            out[p + name] = _conj_view(value)
        else:
            out[key] = value
    return out


def load_state_spaces(module: nn.Module, state_dict: dict, strict: bool = True):
    """Load a state-spaces/s4 v4 state_dict into the matching s4lib module (in place); returns the module.

    The s4lib module must be built with the same architecture (d_model, d_state, channels,
    mode, rank, n_ssm, bidirectional, final_act, ...) and real_transform='exp'.
    """
    converted = convert_state_spaces_state_dict(state_dict)
    own = module.state_dict()
    for key, value in converted.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"checkpoint entry {key} has shape {tuple(value.shape)} but the module expects "
                             f"{tuple(own[key].shape)}: build the s4lib module with the checkpoint's architecture")
    for key, sub in module.named_modules():
        if hasattr(sub, "real_transform") and sub.real_transform != "exp":
            raise ValueError(f"{key}: v4 checkpoints use real_transform='exp', module has {sub.real_transform!r}")
    module.load_state_dict(converted, strict=strict)
    return module
