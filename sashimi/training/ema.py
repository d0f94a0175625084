"""The exponential moving average of a model's weights, kept as a copy of the model's whole state.

    ema_model = copy.deepcopy(model).eval()
    update_ema(ema_model, model, decay=0.999, step=step)      # after each applied optimiser step

The whole state means: floating-point parameters and buffers averaged, other buffers copied, and
the plain Python attributes that define a module's computation (numbers, strings, flags) copied.
S4 (DPLR) kernels store C~ for an attuned kernel length, a buffer (l_kernel) plus a Python int
that forward() reads; when the model's length changes, the EMA's C is first attuned to the same
length in its own coordinates, so the average is taken between like quantities and the EMA never
attunes (transforms C) a second time when it is first evaluated.
"""

from __future__ import annotations

import torch

__all__ = ["update_ema", "copy_module_attributes"]

_PRIMITIVES = (bool, int, float, str, type(None))
_NOT_COPIED = {"training"}  # the EMA stays in eval mode


def copy_module_attributes(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Copy the primitive Python attributes of every submodule of source onto the matching one of target."""
    for t, s in zip(target.modules(), source.modules()):
        for name, value in vars(s).items():
            if name not in _NOT_COPIED and isinstance(value, _PRIMITIVES) and vars(t).get(name, object()) != value:
                setattr(t, name, value)


@torch.no_grad()
def _align_attuned_lengths(ema_model: torch.nn.Module, model: torch.nn.Module) -> None:
    for e, m in zip(ema_model.modules(), model.modules()):
        target = getattr(m, "_l_kernel_int", None)
        if target is None or not hasattr(e, "_attune_C"):
            continue
        while e._l_kernel_int < target:  # the first attunement jumps to target, later ones double
            e._attune_C(target)


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema = d * ema + (1 - d) * weights, with d ramped up as min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1 + step) / (10 + step))
    _align_attuned_lengths(ema_model, model)
    for e, p in zip(ema_model.state_dict().values(), model.state_dict().values()):
        if e.is_floating_point() or e.is_complex():
            e.mul_(d).add_(p, alpha=1 - d)
        else:
            e.copy_(p)
    copy_module_attributes(ema_model, model)
