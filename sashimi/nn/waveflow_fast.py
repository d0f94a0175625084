"""Fast WaveFlow inversion: one row at a time, each layer keeping only the 1 + (k-1)·d_h rows it needs.

Row step i of a flow (network position j = i - 1) computes only the new row: the start conv on
row x_j, then per layer the 3-tap height convolution over the cached rows j, j - d, j - 2d of that
layer's input (a ring buffer of 2d + 1 rows: rows before 0 are the zero padding), the width taps as
one matmul of the three stacked rows followed by shifted adds, the condition projections of all
layers as one matmul, the gate, and the residual/skip matmul. Weight norm is folded into plain
weight tensors once (FastInverse), and every tensor is laid out (channels, batch·width) so each
product is a single 2-D GEMM. The S4 width model runs its bidirectional layer in convolution mode
along the new row with the kernel's spectrum computed once per width.
The model's `inverse(..., method="plain")` is the oracle this must equal.
"""

from __future__ import annotations

import math

import torch

from .waveflow import RowS4, squeeze, unsqueeze


class _FoldedLayer:
    """One FlowLayer's weights as plain tensors, arranged for the row step."""

    def __init__(self, layer, width: int):
        r = layer.channels
        self.r, self.dh, self.dw, self.last = r, layer.dh, layer.dw, layer.last
        self.ring = 2 * layer.dh + 1
        W = layer.conv.weight.detach()  # (2r, r, 3, kw), weight norm folded
        self.s4 = layer.width_model == "s4"
        if self.s4:
            # pre = [W_h(a=0) | W_h(a=1) | W_h(a=2) | W_mix] @ [x_{j-2d}; x_{j-d}; x_j; S4(x_j)]
            mix = layer.mix.weight.detach()[:, :, 0, 0]
            self.W = torch.cat([W[:, :, a, 0] for a in range(3)] + [mix], dim=1).contiguous()
            self.spectrum = layer.row_s4.row_kernel_spectrum(width).detach()
            self.D = layer.row_s4.layer.D.detach()[0].to(W.dtype)
        else:
            # rows: width tap b (blocks of 2r); columns: height tap a (blocks of r)
            self.W = torch.cat([torch.cat([W[:, :, a, b] for a in range(3)], dim=1) for b in range(3)],
                               dim=0).contiguous()
        self.bias = layer.conv.bias.detach().clone()
        if layer.cond is not None:
            self.bias += layer.cond.bias.detach()
        self.W_res_skip = layer.res_skip.weight.detach()[:, :, 0, 0].contiguous()
        self.b_res_skip = layer.res_skip.bias.detach()[:, None]


class _FoldedFlow:
    """One FlowNet folded for row steps over rows of `width` columns."""

    def __init__(self, net, width: int):
        self.r, self.n_layers = net.channels, net.n_layers
        self.w_start = net.start.weight.detach()[:, 0, 0]  # (r, 1, 1, 1) -> (r, 1)
        self.b_start = net.start.bias.detach()[:, None]
        self.layers = [_FoldedLayer(layer, width) for layer in net.layers]
        if net.cond_channels:
            self.W_cond = torch.cat([layer.cond.weight.detach()[:, :, 0, 0] for layer in net.layers]).contiguous()
        else:
            self.W_cond = None
        self.bias_pre = torch.stack([fl.bias for fl in self.layers])[:, :, None]  # (L, 2r, 1)
        scale = math.sqrt(1.0 / net.n_layers)
        self.W_end = (net.end.weight.detach()[:, :, 0, 0] * scale).contiguous()  # (2, r)
        self.b_end = net.end.bias.detach()[:, None]

    def invert(self, Z: torch.Tensor, cond: torch.Tensor | None, batch: int, width: int) -> torch.Tensor:
        """Z (h, N) with N = batch·width, cond (h, C, N) already in this flow's row order -> X (h, N)."""
        h, N = Z.shape
        r = self.r
        caches = [Z.new_zeros(fl.ring, r, N) for fl in self.layers]
        rows = [Z[0]]
        sqrt_half = math.sqrt(0.5)
        for i in range(1, h):
            j = i - 1
            x = torch.addmm(self.b_start, self.w_start, rows[j][None])  # (r, N)
            if self.W_cond is not None:
                pre_all = torch.mm(self.W_cond, cond[i]).view(self.n_layers, 2 * r, N) + self.bias_pre
            else:
                pre_all = self.bias_pre.expand(self.n_layers, 2 * r, N)
            skip = None
            for fl, cache, pre_c in zip(self.layers, caches, pre_all):
                cache[j % fl.ring] = x
                d = fl.dh
                stack = [cache[(j - 2 * d) % fl.ring], cache[(j - d) % fl.ring], x]
                if fl.s4:
                    stack.append(RowS4.apply_spectrum(x.view(r, batch, width), fl.spectrum, fl.D).view(r, N))
                    pre = torch.addmm(pre_c, fl.W, torch.cat(stack))
                else:
                    P = torch.mm(fl.W, torch.cat(stack)).view(3, 2 * r, batch, width)
                    pre = P[1] + pre_c.view(2 * r, batch, width)
                    dw = fl.dw
                    if dw < width:
                        pre[..., dw:] += P[0, ..., :-dw]
                        pre[..., :-dw] += P[2, ..., dw:]
                    pre = pre.view(2 * r, N)
                g = torch.tanh(pre[:r]) * torch.sigmoid(pre[r:])
                out = torch.addmm(fl.b_res_skip, fl.W_res_skip, g)
                if fl.last:
                    s = out
                else:
                    x = (x + out[:r]) * sqrt_half
                    s = out[r:]
                skip = s if skip is None else skip + s
            log_s, b = torch.addmm(self.b_end, self.W_end, skip)
            rows.append((Z[i] - b) * torch.exp(-log_s))
        return torch.stack(rows)


class FastInverse:
    """A WaveFlow's inverse with folded weights and per-layer row caches; built per call (cheap) so
    it always reflects the model's current weights."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """z (B, n), cond (B, C, h, w) from model.condition_rows (or None) -> x (B, n)."""
        model = self.model
        h = model.h
        B, n = z.shape
        w = n // h
        flows = [_FoldedFlow(net, w) for net in model.flows]
        X = squeeze(z[:, None], h)[:, 0].permute(1, 0, 2).reshape(h, B * w)  # (h, B·w)
        cond_t = None
        if cond is not None:  # (h, C, B·w): each row's condition is one contiguous (C, B·w) slice
            cond_t = cond.permute(2, 1, 0, 3).reshape(h, cond.shape[1], B * w)
        n_flows = len(flows)
        for k in reversed(range(n_flows)):
            if k < n_flows - 1:
                X = X[torch.argsort(model.perms[k])]
            cond_k = None if cond_t is None else cond_t[model.cond_rows[k]]
            X = flows[k].invert(X, cond_k, B, w)
        return unsqueeze(X.view(h, B, 1, w).permute(1, 2, 0, 3))[:, 0]


def inverse_flops_per_sample(config) -> float:
    """Floating-point operations (multiply-add = 2) per generated sample of the fast inverse, counting
    the matrix products and the S4 rows' FFTs; elementwise work (gate, adds) is left out."""
    r, L, C, h = config.residual_channels, config.n_layers, config.cond_channels, config.h
    per_layer = 2 * (2 * r) * C + 2 * (2 * r) * r  # condition projection + residual/skip
    if config.width_model == "conv":
        per_layer += 2 * (3 * 2 * r) * (3 * r)
    else:
        width = max(config.sample_len // h, 2)
        fft = 2 * 2.5 * (2 * width) * math.log2(2 * width) / width  # rfft + irfft of 2w points, per column
        per_layer += 2 * (2 * r) * (4 * r) + r * (fft + 8)
    per_row_sample = 2 * r + L * per_layer - 2 * r * r + 2 * 2 * r  # start, layers (the last has no residual), end
    flows = config.n_flows * per_row_sample * (h - 1) / h
    upsample = 0.0
    if C:
        s1, s2 = config.resolved_upsample_strides()
        upsample = 2 * 6 * C * (1 / s2 + 1)  # kernel 3 x 2s: 6s MACs per input, C·n/s2 and C·n/(s1·s2)·s1 inputs
    return flows + upsample
