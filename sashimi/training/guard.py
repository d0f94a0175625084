"""Finite weights only: an optimiser step that leaves a non-finite parameter is undone, and states are checked.

    guard = StepGuard(model.parameters(), optimizer)
    applied = guard.step()        # optimizer.step(); undone (False) if any parameter became inf/NaN

A finite loss and gradient can still give non-finite weights (a huge but finite learning rate, an
overflowing optimiser moment), or an update the optimiser cannot even represent (torch raises
"value cannot be converted to type float without overflow"). StepGuard keeps a copy of the
parameters and the optimiser's per-parameter tensors from before the step in preallocated buffers
(one extra copy of each, reused every step) and restores them, so the run continues from the last
finite state. Its cost per step is two fused calls over all tensors (one copy, one norm) and one
host sync, whatever the number of parameters.
"""

from __future__ import annotations

import torch

__all__ = ["StepGuard", "nonfinite_entries"]


def nonfinite_entries(state: dict | None, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors of a (nested) state dict that hold inf or NaN."""
    bad = []
    if state is None:
        return bad
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            bad += nonfinite_entries(value, name + ".")
        elif isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            if not bool(torch.isfinite(value).all()):
                bad.append(name)
    return bad


class StepGuard:
    """optimizer.step() that is undone when it leaves any parameter non-finite (or overflows inside the optimiser)."""

    def __init__(self, params, optimizer: torch.optim.Optimizer):
        self.params = [p for p in params if p.requires_grad]
        self._checked = [p for p in self.params if p.numel()]
        self.optimizer = optimizer
        self._layout: list = []  # [(param, sorted state keys of its tensors, or None: no state before the step)]
        self._saved: list[torch.Tensor] = []  # the copies: every param, then the state tensors in layout order
        self._mirrored: list[torch.Tensor] = []  # the tensors they are copies of

    def _live(self) -> tuple[list, list[torch.Tensor]]:
        """(layout, tensors) of the parameters and their optimiser state as they are now."""
        layout, state_tensors = [], []
        for p in self.params:
            state = self.optimizer.state.get(p)
            if not state:
                layout.append((p, None))
                continue
            keys = sorted(k for k, v in state.items() if isinstance(v, torch.Tensor))
            layout.append((p, keys))
            state_tensors += [state[k] for k in keys]
        return layout, self.params + state_tensors

    @torch.no_grad()
    def _snapshot(self) -> None:
        self._layout, live = self._live()
        # the same tensor objects as last time (held here, so their ids cannot be reused): reuse the buffers
        if len(live) == len(self._mirrored) and all(a is b for a, b in zip(live, self._mirrored)):
            if live:
                torch._foreach_copy_(self._saved, live)
        else:  # the first step, new optimiser state, or a state loaded with load_state_dict
            self._saved, self._mirrored = [t.detach().clone() for t in live], live

    @torch.no_grad()
    def _restore(self) -> None:
        params, saved_state = self._saved[:len(self.params)], iter(self._saved[len(self.params):])
        torch._foreach_copy_(self.params, params)
        for p, keys in self._layout:
            if keys is None:  # the step created this state: forget it
                self.optimizer.state.pop(p, None)
                continue
            state = self.optimizer.state[p]
            for key in keys:
                state[key].copy_(next(saved_state))
            for key in [k for k, v in state.items() if isinstance(v, torch.Tensor) and k not in keys]:
                del state[key]  # a tensor the step added

    @torch.no_grad()
    def finite(self) -> bool:
        """True when every parameter is finite: one fused L2 norm over all of them and one host sync.

        A finite norm means a finite tensor; a tensor whose norm is not (an inf or NaN inside, or
        entries so large that their squares overflow) is then checked entry by entry.
        """
        if not self._checked:
            return True
        ok = torch.stack(torch._foreach_norm(self._checked)).isfinite()
        if bool(ok.all()):
            return True
        return all(bool(torch.isfinite(p).all()) for p, good in zip(self._checked, ok.tolist()) if not good)

    def step(self) -> bool:
        """Run optimizer.step(); True if every parameter is finite after it, else undo it and return False.

        An update the optimiser cannot represent (torch's "... without overflow" RuntimeError, e.g. a
        learning rate near the float32 maximum) is undone and returns False too.
        """
        self._snapshot()
        try:
            self.optimizer.step()
        except RuntimeError as e:
            if "overflow" not in str(e):
                raise
            self.undo()
            return False
        if self.finite():
            return True
        self.undo()
        return False

    def undo(self) -> None:
        """Restore the parameters and optimiser state from before the last step() (e.g. when another process
        of the group had to undo its step)."""
        self._restore()
