"""Finite weights only: an optimiser step that leaves a non-finite parameter is undone, and states are checked.

    guard = StepGuard(model.parameters(), optimizer)
    applied = guard.step()        # optimizer.step(); undone (False) if any parameter became inf/NaN

A finite loss and gradient can still give non-finite weights (a huge but finite learning rate, an
overflowing optimiser moment). StepGuard keeps a copy of the parameters and the optimiser's
per-parameter tensors from before the step in preallocated buffers (one extra copy of each, reused
every step) and restores them, so the run continues from the last finite state.
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
    """optimizer.step() that is undone when it leaves any parameter non-finite."""

    def __init__(self, params, optimizer: torch.optim.Optimizer):
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = optimizer
        self._saved: dict[int, list[torch.Tensor]] = {}  # id(param) -> [param copy, state tensor copies...]
        self._had_state: set = set()

    def _tensors(self, p) -> list[torch.Tensor]:
        state = self.optimizer.state.get(p, {})
        return [p.data] + [v for _, v in sorted(state.items()) if isinstance(v, torch.Tensor)]

    @torch.no_grad()
    def _snapshot(self) -> set:
        had_state = set()
        for p in self.params:
            if p in self.optimizer.state and self.optimizer.state[p]:
                had_state.add(id(p))
            current = self._tensors(p)
            saved = self._saved.get(id(p))
            if saved is None or len(saved) != len(current) or any(s.shape != c.shape for s, c in zip(saved, current)):
                saved = self._saved[id(p)] = [c.detach().clone() for c in current]
            else:
                torch._foreach_copy_(saved, current)
        return had_state

    @torch.no_grad()
    def _restore(self, had_state: set) -> None:
        for p in self.params:
            if id(p) not in had_state:  # the step created this state: forget it (and restore the weights)
                p.data.copy_(self._saved[id(p)][0])
                self.optimizer.state.pop(p, None)
                continue
            for target, saved in zip(self._tensors(p), self._saved[id(p)]):
                target.copy_(saved)

    def finite(self) -> bool:
        if not self.params:
            return True
        flags = torch.stack([torch.isfinite(p).all() for p in self.params])
        return bool(flags.all())

    def step(self) -> bool:
        """Run optimizer.step(); True if every parameter is finite after it, else undo it and return False."""
        self._had_state = self._snapshot()
        self.optimizer.step()
        if self.finite():
            return True
        self.undo()
        return False

    def undo(self) -> None:
        """Restore the parameters and optimiser state from before the last step() (e.g. when another process
        of the group had to undo its step)."""
        self._restore(self._had_state)
