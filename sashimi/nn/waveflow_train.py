"""Fast FlowNet forward for training: the conv width model as row-batched GEMMs with a hand-written backward.

Layout: every activation is a matrix (channels, N), N = H·B·W, its columns ordered (row, example,
column). A height shift by k rows is then a column offset of k·B·W, so each height tap of the 3x3
convolution is one GEMM on a column range: tap a (reading row i - (2 - a)·d_h) only produces the output
rows it reaches, and a tap that falls entirely in the causal zero padding is skipped. The width taps are
three stacked copies of the layer's input (shifted by -d_w, +d_w and unshifted) that the GEMM reads as
one 3r-row operand. Rewrites, all exact (checked against the module path, `FlowNet.fused = False`):

- weight norm is computed once per call (autograd carries its gradient back to g and v);
- tanh(a)·sigmoid(b) = 2·(sigmoid(2a) - 1/2)·sigmoid(b): one in-place sigmoid over both halves, the
  factors in the weights;
- the residual stream is kept unscaled, u_l = x_l / sqrt(1/2)^l (the factor goes into the weights), so
  the residual update is the GEMM's accumulate;
- the end conv is linear, so it is folded into every layer's skip weights: the skip sum becomes a
  2-row accumulator carried under the residual stream, and one GEMM per layer updates both;
- the start conv (1 -> r) is folded into layer 0, which becomes a 1-channel 3x3 conv (its bias enters
  through in-bounds masks, since the padding is zero after the start conv, not its bias);
- every layer's condition projection and bias in one GEMM per flow with [cond; 1].
The backward reuses the saved stacked inputs, gate sigmoids and gate outputs.
"""

from __future__ import annotations

import math
import threading

import torch
from torch.autograd.function import once_differentiable


def _shift_width(dst: torch.Tensor, src: torch.Tensor, shift: int) -> None:
    """dst[..., j] = src[..., j + shift] where that is inside the row, else 0; both (..., W)."""
    W = src.shape[-1]
    if abs(shift) >= W:
        dst.zero_()
    elif shift > 0:
        dst[..., :W - shift] = src[..., shift:]
        dst[..., W - shift:] = 0
    elif shift < 0:
        dst[..., -shift:] = src[..., :W + shift]
        dst[..., :-shift] = 0
    else:
        dst.copy_(src)


def _unshift_width_add(dst: torch.Tensor, src: torch.Tensor, shift: int) -> None:
    """The adjoint of _shift_width: dst[..., j + shift] += src[..., j] where both are inside the row."""
    W = src.shape[-1]
    if abs(shift) >= W:
        return
    if shift > 0:
        dst[..., shift:] += src[..., :W - shift]
    elif shift < 0:
        dst[..., :W + shift] += src[..., -shift:]
    else:
        dst += src


def _layer0_inputs(x: torch.Tensor, H: int, RW: int, W: int, dh: int, dw: int, out: torch.Tensor) -> torch.Tensor:
    """The 3x3 im2col of the 1-channel input x (N,) and of its in-bounds mask, written to out (18, N): rows
    3a + b hold x at row i - (2 - a)·d_h, column j + (b - 1)·d_w (0 outside), rows 9 + 3a + b the mask."""
    S = out.view(18, H, RW // W, W).zero_()
    x4 = x.view(H, RW // W, W)
    ones = torch.ones_like(x4)
    for a in range(3):
        k = (2 - a) * dh
        if k >= H:
            continue
        for b in range(3):
            _shift_width(S[3 * a + b, k:], x4[:H - k], (b - 1) * dw)
            _shift_width(S[9 + 3 * a + b, k:], ones[:H - k], (b - 1) * dw)
    return S.view(18, -1)


class _BufferPool:
    """Large scratch buffers kept between training steps: a fresh multi-megabyte tensor costs its page faults
    on first touch (here about as much as writing it twice), and a step allocates gigabytes. take() hands
    out a view of a kept buffer that nothing else references (no live view of its storage: not saved by
    a graph that may still run its backward, not held by the caller), else allocates one more. The pool
    holds one column count N at a time; clear_buffers() releases it."""

    def __init__(self):
        self.key, self.buffers = None, {}
        self.lock = threading.Lock()  # two threads must not both take the same idle buffer

    @staticmethod
    def _refs(t: torch.Tensor) -> int:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def claim(self, N: int, like: torch.Tensor) -> "_BufferPool":
        key = (N, like.dtype, like.device)
        with self.lock:
            if key != self.key:
                self.key, self.buffers = key, {}
        return self

    def take(self, shape) -> torch.Tensor:
        shape = tuple(shape)
        with self.lock:
            kept = self.buffers.setdefault(shape, [])
            for base, idle in kept:
                if self._refs(base) == idle:
                    return base.view(shape)
            N, dtype, device = self.key
            base = torch.empty(shape, dtype=dtype, device=device)
            if _POOLING:
                kept.append((base, self._refs(base)))
            return base.view(shape)

    def clear(self) -> None:
        self.key, self.buffers = None, {}


_POOLING = hasattr(torch._C, "_storage_Use_Count")  # else every take allocates
_pool = _BufferPool()


def clear_buffers() -> None:
    """Release the scratch buffers the fused training path keeps between steps."""
    _pool.clear()


class _FusedFlowNet(torch.autograd.Function):
    """(x (N,), cond_aug (C + 1, N), folded weights, meta) -> out (2, N) = (log_s, b); see _folded_weights.
    meta = (H, B·W, W, height dilations, width dilations)."""

    @staticmethod
    def forward(ctx, x, cond_aug, W_cond, V0, taps, W_big, E_last, w_s, b_s, b_end, meta):
        H, RW, W, dhs, dws = meta
        N = x.shape[0]
        L = len(dhs)
        r = w_s.shape[0]
        pool = _pool.claim(N, x)
        pre = pool.take((L, 2 * r, N))  # every layer's condition projection and bias, then its gate sigmoids
        torch.mm(W_cond, cond_aug, out=pre.view(L * 2 * r, N))
        gates = pool.take((L, r + 1, N))  # (sigmoid(2a) - 1/2)·sigmoid(b), and a row of ones (the biases)
        gates[:, r] = 1
        S0 = _layer0_inputs(x, H, RW, W, dhs[0], dws[0], pool.take((18, N)))
        stacks = pool.take((max(L - 1, 1), 3 * r + 2, N))  # layer l >= 1 reads [u(j - d_w); u(j + d_w); u; acc]
        resid0 = pool.take((r + 2, N))  # [start conv; acc = 0]
        torch.addr(b_s[:, None].expand(r, N), w_s, x, out=resid0[:r])
        resid0[r:] = 0
        out = None
        for l in range(L):
            p = pre[l]
            if l == 0:
                p.addmm_(V0, S0)
                resid = resid0
            else:
                S = stacks[l - 1]
                u = S[2 * r:3 * r].view(r, H, RW // W, W)
                _shift_width(S[:r].view_as(u), u, -dws[l])
                _shift_width(S[r:2 * r].view_as(u), u, dws[l])
                for a in range(3):
                    off = (2 - a) * dhs[l] * RW
                    if off < N:
                        p[:, off:].addmm_(taps[l - 1, a], S[:3 * r, :N - off])
                resid = S[2 * r:]
            s = torch.sigmoid_(p)  # kept for the backward
            torch.sub(s[:r], 0.5, out=gates[l, :r]).mul_(s[r:])
            if l < L - 1:
                torch.addmm(resid, W_big[l], gates[l], out=stacks[l][2 * r:])
            else:
                out = torch.addmm(resid[r:], E_last, gates[l]).add_(b_end[:, None])
        ctx.meta = meta
        if any(ctx.needs_input_grad):
            # the intermediates go through save_for_backward too, so activation checkpointing can drop them
            ctx.save_for_backward(x, cond_aug, W_cond, V0, taps, W_big, E_last, w_s, S0, stacks, pre, gates)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        H, RW, W, dhs, dws = ctx.meta
        x, cond_aug, W_cond, V0, taps, W_big, E_last, w_s, S0, stacks, sig, gates = ctx.saved_tensors
        N, L, r = x.shape[0], len(dhs), w_s.shape[0]
        pool = _pool.claim(N, x)
        d_out = d_out.contiguous()
        d_pre = pool.take(sig.shape)  # (L, 2r, N)
        d_resid = pool.take((r + 2, N))  # [d u; d out]
        d_resid[:r] = 0
        d_resid[r:] = d_out
        d_taps = None if taps is None else torch.zeros_like(taps)
        d_W_big = None if W_big is None else torch.empty_like(W_big)
        d_S = pool.take((3 * r, N))
        d_g = pool.take((r, N))
        for l in reversed(range(L)):
            g = gates[l]
            if l == L - 1:
                d_E_last = torch.mm(d_out, g.t())
                torch.mm(E_last[:, :r].t(), d_out, out=d_g)
            else:
                torch.mm(d_resid, g.t(), out=d_W_big[l])
                torch.mm(W_big[l][:, :r].t(), d_resid, out=d_g)
            # gate: g' = (s_a - 1/2)·s_b with s = sigmoid(pre); d pre_a = d g'·s_b·s_a(1 - s_a), d pre_b = d g'·g'·(1 - s_b)
            s_a, s_b = sig[l, :r], sig[l, r:]
            dp = d_pre[l]
            torch.mul(d_g, g[:r], out=dp[r:])
            dp[r:].addcmul_(dp[r:], s_b, value=-1)
            torch.mul(d_g.mul_(s_b), s_a, out=dp[:r])
            dp[:r].addcmul_(dp[:r], s_a, value=-1)
            if l == 0:
                d_V0 = torch.mm(dp, S0.t())
                d_S0 = torch.mm(V0[:, :9].t(), dp).view(9, H, RW // W, W)
                d_x = torch.mv(d_resid[:r].t(), w_s) if L > 1 else x.new_zeros(N)
                d_x4 = d_x.view(H, RW // W, W)
                for a in range(3):
                    k = (2 - a) * dhs[0]
                    if k >= H:
                        continue
                    for b in range(3):
                        _unshift_width_add(d_x4[:H - k], d_S0[3 * a + b, k:], (b - 1) * dws[0])
                d_w_s = torch.mv(d_resid[:r], x) if L > 1 else torch.zeros_like(w_s)
                d_b_s = d_resid[:r].sum(1) if L > 1 else torch.zeros_like(w_s)
            else:
                S = stacks[l - 1]
                first = True
                for a in (2, 1, 0):
                    off = (2 - a) * dhs[l] * RW
                    if off >= N:
                        continue
                    torch.mm(dp[:, off:], S[:3 * r, :N - off].t(), out=d_taps[l - 1, a])
                    if first:
                        torch.mm(taps[l - 1, a].t(), dp, out=d_S)  # off = 0 for a = 2
                        first = False
                    else:
                        d_S[:, :N - off].addmm_(taps[l - 1, a].t(), dp[:, off:])
                du = d_resid[:r]
                du += d_S[2 * r:]
                shape = (r, H, RW // W, W)
                _unshift_width_add(du.view(shape), d_S[:r].view(shape), -dws[l])
                _unshift_width_add(du.view(shape), d_S[r:2 * r].view(shape), dws[l])
        d_pre = d_pre.view(L * 2 * r, N)
        d_W_cond = torch.mm(d_pre, cond_aug.t())
        d_cond = torch.mm(W_cond.t(), d_pre) if ctx.needs_input_grad[1] else None
        return (d_x, d_cond, d_W_cond, d_V0, d_taps, d_W_big, d_E_last, d_w_s, d_b_s, d_out.sum(1), None)


def _folded_weights(net):
    """The FlowNet's weights rewritten for _FusedFlowNet (autograd ops: the gradients flow back to the
    module's parameters, weight norm included)."""
    r, L = net.channels, net.n_layers
    ref = net.end.weight
    gate = torch.cat([ref.new_full((r,), 2.0), ref.new_ones(r)])  # tanh(a) = 2·sigmoid(2a) - 1
    w_s, b_s = net.start.weight[:, 0, 0, 0], net.start.bias
    W_end = net.end.weight[:, :, 0, 0] * math.sqrt(1.0 / L)
    cond_rows, taps, W_big = [], [], []
    E_last = None
    for l, layer in enumerate(net.layers):
        scale = math.sqrt(0.5) ** l  # the layer reads x_l = scale·u_l
        Wc = layer.conv.weight * (scale * gate)[:, None, None, None]  # (2r, r, 3, 3)
        bias = layer.conv.bias
        if layer.cond is not None:
            bias = bias + layer.cond.bias
            cond_rows.append(torch.cat([layer.cond.weight[:, :, 0, 0] * gate[:, None], (bias * gate)[:, None]], 1))
        else:
            cond_rows.append((bias * gate)[:, None])
        if l == 0:  # fold the start conv: a 1-channel 3x3 conv on x, plus the bias where in bounds
            V0 = torch.cat([torch.einsum("oiab,i->oab", Wc, w_s).reshape(2 * r, 9),
                            torch.einsum("oiab,i->oab", Wc, b_s).reshape(2 * r, 9)], 1)
        else:  # columns in the stacked input's order: width tap b = 0 (j - d_w), b = 2 (j + d_w), b = 1
            taps.append(torch.stack([torch.cat([Wc[:, :, a, 0], Wc[:, :, a, 2], Wc[:, :, a, 1]], 1) for a in range(3)]))
        W_rs, b_rs = layer.res_skip.weight[:, :, 0, 0], layer.res_skip.bias
        if layer.last:  # g = 2 g': the factor 2 on the weights, the bias column multiplies the row of ones
            E_last = torch.cat([2 * W_end @ W_rs, (W_end @ b_rs)[:, None]], 1)
        else:
            res = torch.cat([2 * W_rs[:r], b_rs[:r, None]], 1) / scale
            skip = torch.cat([2 * W_end @ W_rs[r:], (W_end @ b_rs[r:])[:, None]], 1)
            W_big.append(torch.cat([res, skip]))
    taps = torch.stack(taps).contiguous() if taps else None
    W_big = torch.stack(W_big).contiguous() if W_big else None
    return (torch.cat(cond_rows).contiguous(), V0.contiguous(), taps, W_big, E_last.contiguous(),
            w_s.contiguous(), b_s.contiguous(), net.end.bias)


def flownet_fused(net, x: torch.Tensor, cond: torch.Tensor | None):
    """FlowNet.forward for the conv width model: x (B, 1, H, W), cond (B, C, H, W) or None -> (log_s, b),
    each (B, 1, H, W); equal to the module path to round-off, gradients included."""
    if net.width_model != "conv":
        raise ValueError(f"the fused FlowNet path is for width_model 'conv', not {net.width_model!r}: set fused = False")
    B, _, H, W = x.shape
    N = H * B * W
    x_flat = x[:, 0].permute(1, 0, 2).reshape(N)
    ones = x.new_ones(1, N)
    cond_aug = ones if cond is None else torch.cat([cond.permute(1, 2, 0, 3).reshape(cond.shape[1], N), ones])
    meta = (H, B * W, W, net.height_dilations, net.width_dilations)
    out = _FusedFlowNet.apply(x_flat, cond_aug, *_folded_weights(net), meta)
    out = out.view(2, H, B, W).permute(2, 0, 1, 3)
    return out[:, :1], out[:, 1:]
