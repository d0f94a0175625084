"""StepGuard: a finite step is exactly AdamW's, a non-finite or overflowing one is undone to the last bit."""

import copy
import math

import pytest
import torch

from sashimi.training.guard import StepGuard


def make(lr=1e-2, shapes=((3, 4), (5,), (0,), (2, 2))):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    optimizer = torch.optim.AdamW([{"params": params[:2], "lr": lr}, {"params": params[2:] + [frozen], "lr": 1e-3}],
                                  weight_decay=0.1)
    return params + [frozen], optimizer


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g)


def snapshot(params, optimizer):
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for name in sa["state"][k]:
            assert torch.equal(sa["state"][k][name], sb["state"][k][name]), (k, name)


def test_finite_steps_are_adamw_steps_bit_for_bit():
    params, optimizer = make()
    plain_params, plain = make()
    guard = StepGuard(params, optimizer)
    for step in range(4):
        set_grads(params, step), set_grads(plain_params, step)
        assert guard.step() is True
        plain.step()
        assert_same(snapshot(params, optimizer), snapshot(plain_params, plain))


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_step_leaving_a_non_finite_weight_is_undone(monkeypatch, first, bad):
    params, optimizer = make()
    guard = StepGuard(params, optimizer)
    if not first:
        set_grads(params, 0)
        assert guard.step()
    before = snapshot(params, optimizer)
    original = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        with torch.no_grad():
            params[3].view(-1)[1] = bad
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    set_grads(params, 1)
    assert guard.step() is False and guard.finite()
    assert_same(snapshot(params, optimizer), before)  # on the first step: no AdamW state left behind either
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    assert guard.step() is True  # and the run goes on from there


def test_an_update_adamw_cannot_represent_is_undone():
    """lr 1e38: AdamW's step size lr / (1 - beta1) overflows float32 and torch raises inside the step."""
    plain_params, plain = make(lr=1e38)
    set_grads(plain_params, 0)
    with pytest.raises(RuntimeError, match="overflow"):
        plain.step()  # what the guard absorbs
    params, optimizer = make(lr=1e38)
    guard = StepGuard(params, optimizer)
    before = snapshot(params, optimizer)
    set_grads(params, 0)
    assert guard.step() is False
    assert_same(snapshot(params, optimizer), before)


def test_other_optimizer_errors_propagate(monkeypatch):
    params, optimizer = make()
    guard = StepGuard(params, optimizer)

    def broken(self, *args, **kwargs):
        raise RuntimeError("something else")
    monkeypatch.setattr(torch.optim.AdamW, "step", broken)
    with pytest.raises(RuntimeError, match="something else"):
        guard.step()


def test_state_replaced_by_load_state_dict_is_followed(monkeypatch):
    params, optimizer = make()
    guard = StepGuard(params, optimizer)
    set_grads(params, 0)
    guard.step()
    saved = copy.deepcopy(optimizer.state_dict())
    set_grads(params, 1)
    guard.step()
    optimizer.load_state_dict(saved)  # new state tensors, as when a run resumes
    before = snapshot(params, optimizer)
    original = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        with torch.no_grad():
            params[0].view(-1)[0] = float("nan")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    set_grads(params, 2)
    assert guard.step() is False
    assert_same(snapshot(params, optimizer), before)


def test_finite_is_one_check_of_all_parameters():
    params, optimizer = make()
    guard = StepGuard(params, optimizer)
    assert guard.finite()
    with torch.no_grad():
        params[1][2] = 3e38  # finite, however large
    assert guard.finite()
    with torch.no_grad():
        params[1][4] = math.nan
    assert not guard.finite()
    assert StepGuard([], optimizer).finite() and StepGuard([torch.nn.Parameter(torch.zeros(0))], optimizer).finite()
