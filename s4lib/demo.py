"""A one-minute S4 demo: learn a long delay in convolution mode, then run the trained model as an RNN.

    python -m s4lib.demo [--steps 300] [--delay 200] [--mode dplr|diag]

The task: reproduce the input delayed by `delay` steps (a memory task that local models
cannot solve). Training runs the layers as FFT convolutions; generation runs the same
weights one step at a time, and the two must agree.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from . import S4Block, param_groups


class DelayModel(nn.Module):
    def __init__(self, d_model=32, n_layers=2, **s4_kwargs):
        super().__init__()
        self.encoder = nn.Linear(1, d_model)
        self.layers = nn.ModuleList(S4Block(d_model, transposed=False, **s4_kwargs) for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.decoder = nn.Linear(d_model, 1)

    def forward(self, u):  # (B, L, 1) -> (B, L, 1)
        x = self.encoder(u)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))[0]
        return self.decoder(x)

    def setup_step(self):
        for layer in self.layers:
            layer.setup_step()

    def step(self, u_t, states):  # (B, 1) -> (B, 1)
        x = self.encoder(u_t)
        new_states = []
        for layer, norm, state in zip(self.layers, self.norms, states):
            y, state = layer.step(norm(x), state)
            x = x + y
            new_states.append(state)
        return self.decoder(x), new_states


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m s4lib.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--delay", type=int, default=200)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mode", choices=["dplr", "diag"], default="dplr")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.delay < args.length:
        parser.error("need 0 < delay < length")
    torch.manual_seed(args.seed)
    model = DelayModel(mode=args.mode, d_state=32)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.0, lr=3e-3))
    print(f"S4 delay demo: {sum(p.numel() for p in model.parameters()):,} parameters, mode={args.mode}, "
          f"delay={args.delay}, length={args.length}")

    def batch():
        u = torch.randn(args.batch_size, args.length, 1)
        target = torch.zeros_like(u)
        target[:, args.delay:] = u[:, : -args.delay]
        return u, target

    start = time.time()
    for step in range(1, args.steps + 1):
        u, target = batch()
        loss = (model(u) - target)[:, args.delay:].square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == 1:
            print(f"  step {step:4d}  mse {loss.item():.4f}  (predicting zero gives 1.0)  {time.time() - start:.0f}s")

    model.eval()
    u, target = batch()
    u = u[:2]
    with torch.no_grad():
        y_conv = model(u)
        model.setup_step()
        states = [layer.default_state(2) for layer in model.layers]
        t0 = time.time()
        outputs = []
        for t in range(args.length):
            y_t, states = model.step(u[:, t], states)
            outputs.append(y_t)
        elapsed = time.time() - t0
    y_step = torch.stack(outputs, 1)
    gap = (y_conv - y_step).abs().max().item() / y_conv.abs().max().item()
    mse = (y_step - target[:2])[:, args.delay:].square().mean().item()
    print(f"recurrent mode: {args.length} steps in {elapsed:.2f}s ({args.length / elapsed:,.0f} steps/s), "
          f"mse {mse:.4f}, max |conv - step| / max|y| = {gap:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
