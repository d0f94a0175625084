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
    """One FlowLayer's weights as plain tensors, arranged and rescaled for the row step.

    Three exact rewrites (checked by the fast == plain tests): (1) tanh(v) = 2·sigmoid(2v) - 1, so the
    tanh half of the pre-activation weights is doubled, one sigmoid serves both halves (torch's CPU
    sigmoid is several times faster than its tanh) and the remaining factor 2 goes into the output
    weights: g = tanh(a)·sigmoid(b) = 2·(sigmoid(2a) - 1/2)·sigmoid(b); (2) the residual stream is kept unscaled, u_l =
    x_l / a_l with a_l = sqrt(1/2)^l, so the conv weights take the factor a_l and the residual weights
    1/a_l; (3) the output conv is linear, so each layer's skip weights are premultiplied by it and
    the skip sum becomes a (2, N) accumulator of (log_s, b)."""

    def __init__(self, layer, width: int, scale: float, W_end: torch.Tensor):
        r = layer.channels
        self.r, self.dh, self.dw, self.last = r, layer.dh, layer.dw, layer.last
        self.ring = 2 * layer.dh + 1
        # with d_h = 1 the ring is stored twice over (slots s and s + 3), so rows j-2, j-1, j are always
        # three adjacent slots: the GEMM reads them in place instead of from a stacked copy
        self.doubled = layer.dh == 1 and layer.width_model == "conv"
        gate = torch.ones(2 * r, 1, dtype=W_end.dtype)
        gate[:r] = 2.0
        W = layer.conv.weight.detach() * scale * gate[:, :, None, None]  # (2r, r, 3, kw), weight norm folded
        self.s4 = layer.width_model == "s4"
        if self.s4:
            # pre = [W_h(a=0) | W_h(a=1) | W_h(a=2) | W_mix] @ [u_{j-2d}; u_{j-d}; u_j; S4(u_j)]
            mix = layer.mix.weight.detach()[:, :, 0, 0] * scale * gate
            self.W_centre = torch.cat([W[:, :, a, 0] for a in range(3)] + [mix], dim=1).contiguous()
            self.W_sides = None
            self.spectrum = layer.row_s4.row_kernel_spectrum(width).detach()
            self.D = layer.row_s4.layer.D.detach()[0].to(W.dtype)
        else:
            # columns: height taps a = 0, 1, 2 (rows j - 2d, j - d, j); the centre width tap b = 1 alone,
            # the two side taps stacked (b = 0 over b = 2)
            self.W_centre = torch.cat([W[:, :, a, 1] for a in range(3)], dim=1).contiguous()
            self.W_sides = torch.cat([torch.cat([W[:, :, a, b] for a in range(3)], dim=1) for b in (0, 2)]).contiguous()
        self.bias = layer.conv.bias.detach().clone()
        if layer.cond is not None:
            self.bias += layer.cond.bias.detach()
        self.bias *= gate[:, 0]
        W_rs = layer.res_skip.weight.detach()[:, :, 0, 0] * 2.0  # the factor 2 of the gate
        b_rs = layer.res_skip.bias.detach()
        W_skip, b_skip = (W_rs, b_rs) if layer.last else (W_rs[r:], b_rs[r:])
        rows = [W_end @ W_skip]
        bias = [W_end @ b_skip]
        if not layer.last:  # u_{l+1} = u_l + res_l / a_l
            rows.insert(0, W_rs[:r] / scale)
            bias.insert(0, b_rs[:r] / scale)
        self.W_out = torch.cat(rows).contiguous()  # (r + 2, r), or (2, r) for the last layer
        self.b_out = torch.cat(bias)[:, None]


class _FoldedFlow:
    """One FlowNet folded for row steps over rows of `width` columns."""

    def __init__(self, net, width: int):
        self.r, self.n_layers = net.channels, net.n_layers
        self.w_start = net.start.weight.detach()[:, 0, 0]  # (r, 1, 1, 1) -> (r, 1)
        self.b_start = net.start.bias.detach()[:, None]
        W_end = net.end.weight.detach()[:, :, 0, 0] * math.sqrt(1.0 / net.n_layers)  # (2, r)
        scales = [math.sqrt(0.5) ** i for i in range(net.n_layers)]
        self.layers = [_FoldedLayer(layer, width, a, W_end) for layer, a in zip(net.layers, scales)]
        r = self.r
        gate = torch.ones(2 * r, 1, dtype=W_end.dtype)
        gate[:r] = 2.0
        # every layer's condition projection and pre-activation bias in one product with [cond; 1]
        bias = torch.cat([fl.bias for fl in self.layers])[:, None]  # (L·2r, 1)
        if net.cond_channels:
            W_cond = torch.cat([layer.cond.weight.detach()[:, :, 0, 0] * gate for layer in net.layers])
            self.W_cond = torch.cat([W_cond, bias], dim=1).contiguous()
        else:
            self.W_cond = bias.contiguous()
        self.b_end = net.end.bias.detach()[:, None] + sum(fl.b_out[-2:] for fl in self.layers)
        for fl in self.layers:
            fl.b_out = fl.b_out[:-2] if not fl.last else None

    def invert(self, Z: torch.Tensor, cond: torch.Tensor | None, batch: int, width: int) -> torch.Tensor:
        """Z (h, N) with N = batch·width, cond (h, C + 1, N) already in this flow's row order, its last
        channel all ones (the bias), -> X (h, N)."""
        h, N = Z.shape
        r = self.r
        caches = [Z.new_zeros(2 * fl.ring if fl.doubled else fl.ring, r, N) for fl in self.layers]
        self.log_s_sum = Z.new_zeros(batch)  # Σ log_s per example: log p(x) = log N(z) + Σ log_s
        stack = Z.new_empty(4 * r, N)
        rows = [Z[0]]
        for i in range(1, h):
            j = i - 1
            # each layer's input row is written straight into its ring slot (rows before 0 stay zero)
            u = torch.addmm(self.b_start, self.w_start, rows[j][None], out=caches[0][j % self.layers[0].ring])
            pre_all = torch.mm(self.W_cond, cond[i]).view(self.n_layers, 2 * r, N)  # written in place below
            out_acc = self.b_end.expand(2, N)
            for l, (fl, cache, pre_c) in enumerate(zip(self.layers, caches, pre_all)):
                d = fl.dh
                if fl.doubled:
                    slot = j % 3
                    cache[slot + 3] = u
                    rows3 = cache[slot + 1:slot + 4].view(3 * r, N)
                else:
                    torch.cat([cache[(j - 2 * d) % fl.ring], cache[(j - d) % fl.ring], u], out=stack[:3 * r])
                    rows3 = stack[:3 * r]
                if fl.s4:
                    stack[3 * r:] = RowS4.apply_spectrum(u.view(r, batch, width), fl.spectrum, fl.D).view(r, N)
                    pre = pre_c.addmm_(fl.W_centre, stack)
                else:
                    pre = pre_c.addmm_(fl.W_centre, rows3)
                    dw = fl.dw
                    if dw < width:
                        sides = torch.mm(fl.W_sides, rows3).view(2, 2 * r, batch, width)
                        pre3 = pre.view(2 * r, batch, width)
                        pre3[..., dw:] += sides[0, ..., :-dw]
                        pre3[..., :-dw] += sides[1, ..., dw:]
                s = torch.sigmoid_(pre)
                g = s[:r].sub_(0.5).mul_(s[r:])
                if fl.last:
                    out_acc = torch.addmm(out_acc, fl.W_out, g)
                else:
                    out = torch.addmm(fl.b_out, fl.W_out[:r], g)
                    u = torch.add(u, out, out=caches[l + 1][j % self.layers[l + 1].ring])
                    out_acc = torch.addmm(out_acc, fl.W_out[r:], g)
            log_s, b = out_acc
            self.log_s_sum += log_s.view(batch, width).sum(1)
            rows.append((Z[i] - b) * torch.exp(-log_s))
        return torch.stack(rows)


class FastInverse:
    """A WaveFlow's inverse with folded weights and per-layer row caches; built per call (cheap) so
    it always reflects the model's current weights."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None, return_log_s: bool = False):
        """z (B, n), cond (B, C, h, w) from model.condition_rows (or None) -> x (B, n); with return_log_s
        also Σ log_s per example (B,), so that log p(x) = log N(z; 0, sigma²) + Σ log_s."""
        model = self.model
        h = model.h
        B, n = z.shape
        w = n // h
        flows = [_FoldedFlow(net, w) for net in model.flows]
        X = squeeze(z[:, None], h)[:, 0].permute(1, 0, 2).reshape(h, B * w)  # (h, B·w)
        # (h, C + 1, B·w): each row's condition is one contiguous slice, with a row of ones for the biases
        C = 0 if cond is None else cond.shape[1]
        cond_t = z.new_ones(h, C + 1, B * w)
        if cond is not None:
            cond_t[:, :C] = cond.permute(2, 1, 0, 3).reshape(h, C, B * w)
        n_flows = len(flows)
        for k in reversed(range(n_flows)):
            if k < n_flows - 1:
                X = X[torch.argsort(model.perms[k])]
            cond_k = cond_t[model.cond_rows[k]] if C else cond_t
            X = flows[k].invert(X, cond_k, B, w)
        x = unsqueeze(X.view(h, B, 1, w).permute(1, 2, 0, 3))[:, 0]
        return (x, sum(f.log_s_sum for f in flows)) if return_log_s else x


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
