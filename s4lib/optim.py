"""Optimiser parameter groups from the marks SSM parameters carry (`p._optim = {'lr': ..., 'weight_decay': 0.0}`).

    optimizer = torch.optim.AdamW(s4lib.param_groups(model, lr=1e-2, weight_decay=0.05))

Unmarked parameters form the first group with the optimiser's own settings; parameters
with identical marks share a group. Works with any torch optimiser.
"""

from __future__ import annotations

import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float | None = None, no_decay_1d: bool = False, **defaults) -> list[dict]:
    """Parameter groups for `model`.

    weight_decay: applied to unmarked parameters (marked ones keep their own, usually 0).
    no_decay_1d: also exempt unmarked biases and norm weights (parameters with ndim < 2) from decay.
    defaults: extra keys (e.g. lr) copied into the unmarked groups.
    """
    plain, plain_1d, marked = [], [], {}
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        mark = getattr(p, "_optim", None)
        if mark:
            key = tuple(sorted(mark.items()))
            marked.setdefault(key, []).append(p)
        elif no_decay_1d and p.dim() < 2:
            plain_1d.append(p)
        else:
            plain.append(p)
    groups = []
    base = dict(defaults)
    if weight_decay is not None:
        base["weight_decay"] = weight_decay
    if plain:
        groups.append({"params": plain, **base})
    if plain_1d:
        groups.append({"params": plain_1d, **{**defaults, "weight_decay": 0.0}})
    for key, params in marked.items():
        groups.append({"params": params, **dict(key)})
    return groups
