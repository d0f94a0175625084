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
from .waveflow_train import _shift_width


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
        if not self.s4:
            # the conv path's ring slots hold [u(j - d_w); u(j + d_w); u; acc]: per height tap a one (2r, 3r)
            # block over the first 3r rows, and one GEMM [res; skip] @ [g; 1] for the update of [u; acc]
            self.W_taps = [torch.cat([W[:, :, a, 0], W[:, :, a, 2], W[:, :, a, 1]], dim=1).contiguous() for a in range(3)]
            self.W_big = torch.cat([self.W_out, self.b_out], dim=1).contiguous()  # (r + 2 or 2, r + 1)


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
        self.end_bias = net.end.bias.detach()[:, None]  # the conv path's W_big carry the skip biases
        self.b_end = self.end_bias + sum(fl.b_out[-2:] for fl in self.layers)
        for fl in self.layers:
            fl.b_out = fl.b_out[:-2] if not fl.last else None

    def invert(self, Z: torch.Tensor, cond: torch.Tensor | None, batch: int, width: int) -> torch.Tensor:
        """Z (h, N) with N = batch·width, cond (h, C + 1, N) already in this flow's row order, its last
        channel all ones (the bias), -> (X (h, N), Σ log_s per example (batch,))."""
        if not self.layers[0].s4:
            return self._invert_conv(Z, cond, batch, width)
        h, N = Z.shape
        r = self.r
        caches = [Z.new_zeros(2 * fl.ring if fl.doubled else fl.ring, r, N) for fl in self.layers]
        log_s_sum = Z.new_zeros(batch)  # Σ log_s per example: log p(x) = log N(z) + Σ log_s
        # every product writes into a buffer kept for the whole flow: a fresh multi-megabyte output per
        # row would cost its page faults each time (the condition product is L·2r rows of N)
        stack = Z.new_empty(4 * r, N)
        pre_all = Z.new_empty(self.n_layers, 2 * r, N)
        sides_buf = Z.new_empty(2, 2 * r, N)
        res_buf = Z.new_empty(r, N)
        out_acc = Z.new_empty(2, N)
        rows = [Z[0]]
        for i in range(1, h):
            j = i - 1
            # each layer's input row is written straight into its ring slot (rows before 0 stay zero)
            u = torch.addmm(self.b_start, self.w_start, rows[j][None], out=caches[0][j % self.layers[0].ring])
            torch.mm(self.W_cond, cond[i], out=pre_all.view(self.n_layers * 2 * r, N))  # added to in place below
            out_acc.copy_(self.b_end.expand(2, N))
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
                        sides = torch.mm(fl.W_sides, rows3, out=sides_buf.view(4 * r, N)).view(2, 2 * r, batch, width)
                        pre3 = pre.view(2 * r, batch, width)
                        pre3[..., dw:] += sides[0, ..., :-dw]
                        pre3[..., :-dw] += sides[1, ..., dw:]
                s = torch.sigmoid_(pre)
                g = s[:r].sub_(0.5).mul_(s[r:])
                if fl.last:
                    out_acc.addmm_(fl.W_out, g)
                else:
                    out = torch.addmm(fl.b_out, fl.W_out[:r], g, out=res_buf)
                    u = torch.add(u, out, out=caches[l + 1][j % self.layers[l + 1].ring])
                    out_acc.addmm_(fl.W_out[r:], g)
            log_s, b = out_acc
            log_s_sum += log_s.view(batch, width).sum(1)
            rows.append((Z[i] - b) * torch.exp(-log_s))
        return torch.stack(rows), log_s_sum

    def _invert_conv(self, Z: torch.Tensor, cond: torch.Tensor, batch: int, width: int) -> torch.Tensor:
        """invert() for the conv width model. Layer l keeps a ring of 2·d_h + 1 slots, one per input row,
        each [u(j - d_w); u(j + d_w); u; acc] (3r + 2 rows of N): the width-shifted copies are written once
        per row, so each height tap is one GEMM over a slot's first 3r rows, and a tap reaching above row 0
        is skipped (it reads the zero padding). The residual GEMM writes [u; acc] of the next layer's slot."""
        h, N = Z.shape
        r, L = self.r, self.n_layers
        rings = [Z.new_empty(fl.ring, 3 * r + 2, N) for fl in self.layers]
        pre_all = Z.new_empty(L, 2 * r, N)
        gate = Z.new_empty(r + 1, N)  # [(sigmoid(2a) - 1/2)·sigmoid(b); 1]
        gate[r] = 1
        log_s_sum = Z.new_zeros(batch)  # Σ log_s per example: log p(x) = log N(z) + Σ log_s
        rows = [Z[0]]
        for i in range(1, h):
            j = i - 1
            first = rings[0][j % self.layers[0].ring]
            torch.addmm(self.b_start, self.w_start, rows[j][None], out=first[2 * r:3 * r])
            first[3 * r:] = self.end_bias
            torch.mm(self.W_cond, cond[i], out=pre_all.view(L * 2 * r, N))  # added to in place below
            for l, (fl, ring, pre) in enumerate(zip(self.layers, rings, pre_all)):
                slot = ring[j % fl.ring]
                u = slot[2 * r:3 * r].view(r, batch, width)
                _shift_width(slot[:r].view(r, batch, width), u, -fl.dw)
                _shift_width(slot[r:2 * r].view(r, batch, width), u, fl.dw)
                for a in range(3):
                    k = (2 - a) * fl.dh
                    if k <= j:
                        pre.addmm_(fl.W_taps[a], ring[(j - k) % fl.ring][:3 * r])
                s = torch.sigmoid_(pre)
                torch.sub(s[:r], 0.5, out=gate[:r]).mul_(s[r:])
                if fl.last:
                    log_s, b = torch.addmm(slot[3 * r:], fl.W_big, gate)
                else:
                    nxt = rings[l + 1][j % self.layers[l + 1].ring]
                    torch.addmm(slot[2 * r:], fl.W_big, gate, out=nxt[2 * r:])
            log_s_sum += log_s.view(batch, width).sum(1)
            rows.append((Z[i] - b) * torch.exp(-log_s))
        return torch.stack(rows), log_s_sum


class FastInverse:
    """A WaveFlow's inverse with folded weights and per-layer row caches; built per call (cheap) so
    it always reflects the model's current weights.

    The examples of a batch are independent, so a batch is inverted in chunks of about
    `chunk_columns` columns (whole examples): a row step's working set then stays in the cache, where
    one (L·2r) x (batch·w) product per row would not. With two or more threads and two or more chunks,
    two chunks run at a time, one per thread (each on a single-threaded torch), instead of splitting
    every small product between the threads."""

    def __init__(self, model, chunk_columns: int = 2048):
        self.model = model
        self.chunk_columns = chunk_columns

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None, return_log_s: bool = False):
        """z (B, n), cond (B, C, h, w) from model.condition_rows (or None) -> x (B, n); with return_log_s
        also Σ log_s per example (B,), so that log p(x) = log N(z; 0, sigma²) + Σ log_s."""
        model = self.model
        B, n = z.shape
        w = n // model.h
        flows = [_FoldedFlow(net, w) for net in model.flows]
        threads = torch.get_num_threads()
        n_chunks = min(B, max(1, round(B * w / self.chunk_columns)))
        if threads >= 2 and B >= 2:
            n_chunks = min(B, max(2, n_chunks + n_chunks % 2))  # an even count keeps both threads busy
        per_chunk = math.ceil(B / n_chunks)
        chunks = [slice(i, min(i + per_chunk, B)) for i in range(0, B, per_chunk)]
        run = lambda c: self._invert_chunk(flows, z[c], None if cond is None else cond[c])
        if threads >= 2 and len(chunks) >= 2:
            from concurrent.futures import ThreadPoolExecutor
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(2) as pool:
                    results = list(pool.map(run, chunks))
            finally:
                torch.set_num_threads(threads)
        else:
            results = [run(c) for c in chunks]
        x = torch.cat([r[0] for r in results])
        return (x, torch.cat([r[1] for r in results])) if return_log_s else x

    @torch.no_grad()  # grad mode is per thread: the worker threads need it set too
    def _invert_chunk(self, flows, z: torch.Tensor, cond: torch.Tensor | None):
        model = self.model
        h = model.h
        B, n = z.shape
        w = n // h
        X = squeeze(z[:, None], h)[:, 0].permute(1, 0, 2).reshape(h, B * w)  # (h, B·w)
        # (h, C + 1, B·w): each row's condition is one contiguous slice, with a row of ones for the biases
        C = 0 if cond is None else cond.shape[1]
        cond_t = z.new_ones(h, C + 1, B * w)
        if cond is not None:
            cond_t[:, :C] = cond.permute(2, 1, 0, 3).reshape(h, C, B * w)
        n_flows = len(flows)
        log_s_sum = z.new_zeros(B)
        for k in reversed(range(n_flows)):
            if k < n_flows - 1:
                X = X[torch.argsort(model.perms[k])]
            cond_k = cond_t[model.cond_rows[k]] if C else cond_t
            X, flow_log_s = flows[k].invert(X, cond_k, B, w)
            log_s_sum += flow_log_s
        x = unsqueeze(X.view(h, B, 1, w).permute(1, 2, 0, 3))[:, 0]
        return x, log_s_sum


def inverse_flops_per_sample(config, folded: bool = False) -> float:
    """Floating-point operations (multiply-add = 2) per generated sample of an inversion, counting the
    matrix products and the S4 rows' FFTs; elementwise work (gate, adds) is left out.

    folded=False counts the network as defined (per layer and row: the 3x3 conv, the condition
    projection, the r -> 2r residual/skip conv, then the end conv), the work of any implementation
    that runs it as written; folded=True counts what the fast inverse runs for the conv width model
    (the end conv folded into the skips, the biases as one more GEMM column, height taps that reach
    above row 0 skipped). The S4 width model counts the same either way."""
    r, L, C, h = config.residual_channels, config.n_layers, config.cond_channels, config.h
    if folded and config.width_model == "conv":
        dilations = config.resolved_height_dilations()
        total = 0
        for j in range(h - 1):  # row step j computes row j + 1 from rows <= j
            total += 2 * r + 2 * (L * 2 * r) * (C + 1)  # start conv, every layer's condition and bias
            for l, d in enumerate(dilations):
                taps = sum((2 - a) * d <= j for a in range(3))
                total += 2 * (2 * r) * (3 * r) * taps + 2 * (2 if l == L - 1 else r + 2) * (r + 1)
        flows = config.n_flows * total / h
    else:
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
