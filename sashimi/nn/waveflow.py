"""WaveFlow networks: the squeeze, the mel upsampler and one flow's 2-D gated residual network.

Layout: a waveform x (B, n) with n = h·w is squeezed column-major to X (B, 1, h, w), X[i, j] =
x[j·h + i]: a column holds h consecutive samples, a row is a stride-h subsequence. One flow's
network `FlowNet` maps the rows X_0..X_{h-2} (and the condition rows 1..h-1) to (log_s, b) for
rows 1..h-1; it is causal in height (output row i sees input rows <= i) and non-causal in width.
Two width models: "conv" (the paper's 3x3 convolution, dilated in width) and "s4" (a 3x1
height convolution plus a bidirectional s4lib layer running along each row).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from s4lib import FFTConv

# the paper's height dilations for 8 layers, by h (h <= 16 uses dilation 1 throughout)
PAPER_HEIGHT_DILATIONS = {32: (1, 2, 4, 1, 2, 4, 1, 2), 64: (1, 2, 4, 8, 16, 1, 2, 4),
                          128: (1, 2, 4, 8, 16, 32, 64, 1)}
WIDTH_MODELS = ("conv", "s4")


def weight_normed(conv: nn.Module) -> nn.Module:
    """Weight norm on a conv whose direction starts Kaiming-normal (std sqrt(2 / fan_in)), as in the
    public WaveFlow codes: larger than torch's default init, it trains markedly faster early on."""
    nn.init.kaiming_normal_(conv.weight)
    return weight_norm(conv)


def height_receptive_field(dilations, kernel_size: int = 3) -> int:
    """Rows seen by one output row of a stack of causal height convolutions (itself included)."""
    return 1 + (kernel_size - 1) * sum(dilations)


def height_dilations(h: int, n_layers: int, kernel_size: int = 3) -> tuple:
    """Height dilations whose receptive field covers the h - 1 input rows.

    The paper's table for 8 layers and h in {32, 64, 128}; otherwise (any h, any depth): all 1 if
    that already covers h, else the shortest cycle 1, 2, 4, ..., 2^(c-1) repeated over the layers
    that covers h (for 8 layers this gives the paper's choice for 32 and 64). When even doubling at
    every layer does not cover h (e.g. w = 1, where h is the whole clip), the dilations double at
    every layer and the flow sees the last 2^(L+1) - 1 rows only, like a WaveNet's receptive field.
    """
    if n_layers == 8 and kernel_size == 3 and h in PAPER_HEIGHT_DILATIONS:
        return PAPER_HEIGHT_DILATIONS[h]
    for cycle in range(1, n_layers + 1):
        dilations = tuple(2 ** (i % cycle) for i in range(n_layers))
        if height_receptive_field(dilations, kernel_size) >= h:
            return dilations
    return tuple(2 ** i for i in range(n_layers))


def width_dilations(n_layers: int) -> tuple:
    """The paper's width dilations 1, 2, 4, ..., 128, cycling after 8 layers."""
    return tuple(2 ** (i % 8) for i in range(n_layers))


def squeeze(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, C, n) -> (B, C, h, n // h), column-major: out[..., i, j] = x[..., j·h + i]."""
    B, C, n = x.shape
    assert n % h == 0, (n, h)
    return x.reshape(B, C, n // h, h).transpose(2, 3)


def unsqueeze(X: torch.Tensor) -> torch.Tensor:
    """Inverse of squeeze: (B, C, h, w) -> (B, C, h·w)."""
    B, C, h, w = X.shape
    return X.transpose(2, 3).reshape(B, C, h * w)


def upsample_strides(hop_length: int) -> tuple:
    """Two transposed-conv strides whose product is the hop: the most balanced factor pair (16, 16 for 256)."""
    s1 = max(d for d in range(1, math.isqrt(hop_length) + 1) if hop_length % d == 0)
    return (s1, hop_length // s1)


class MelUpsampler(nn.Module):
    """Log-mel (B, n_mels, F) -> (B, n_mels, F·hop): transposed 2-D convs over (mel, time), each with kernel
    (3, 2s), stride (1, s), then leaky ReLU 0.4; cropped so that frame t lands on samples [t·hop, (t+1)·hop)."""

    def __init__(self, strides):
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.convs = nn.ModuleList(weight_normed(nn.ConvTranspose2d(1, 1, (3, 2 * s), stride=(1, s), padding=(1, 0)))
                                   for s in self.strides)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = mel[:, None]
        for s, conv in zip(self.strides, self.convs):
            frames = x.shape[-1]
            # frame t contributes to outputs [t·s, t·s + 2s); centre it on [t·s, (t+1)·s)
            x = conv(x)[..., s // 2: s // 2 + frames * s]
            x = F.leaky_relu(x, 0.4)
        return x[:, 0]


class RowS4(nn.Module):
    """A bidirectional s4lib layer applied to every row of (B, C, H, W) independently, along W."""

    def __init__(self, channels: int, d_state: int = 64, mode: str = "diag", lr: float | None = 1e-3,
                 **kernel_args):
        super().__init__()
        kwargs = {} if lr is None else {"lr": lr}  # None: the kernel's default rate
        self.layer = FFTConv(channels, bidirectional=True, activation=None, mode=mode, d_state=d_state,
                             transposed=True, **kwargs, **kernel_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(B * H, C, W)
        y, _ = self.layer(rows)
        return y.reshape(B, H, C, W).permute(0, 2, 1, 3)

    def row_kernel_spectrum(self, width: int) -> torch.Tensor:
        """rfft of the combined bidirectional kernel for rows of `width` samples, (C, width + 1)
        complex; with D it reproduces forward() on one row (see RowS4.apply_spectrum)."""
        K, _ = self.layer.kernel(L=width)
        K_fwd, K_bwd = K[:1], K[1:]
        K = F.pad(K_fwd, (0, width)) + F.pad(K_bwd.flip(-1), (width, 0))
        return torch.fft.rfft(K[0].to(torch.float64 if K.dtype == torch.float64 else torch.float32), n=2 * width)

    @staticmethod
    def apply_spectrum(u: torch.Tensor, spectrum: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """u (C, N, width) -> (C, N, width): the row convolution with a precomputed kernel spectrum."""
        width = u.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * width) * spectrum[:, None], n=2 * width)[..., :width]
        return y + D[:, None, None] * u


class FlowLayer(nn.Module):
    """One gated residual layer: pre = conv(h) [+ cond proj]; g = tanh(pre_a)·sigmoid(pre_b);
    residual and skip 1x1 convs. Causal in height (padded above by 2·d_h rows)."""

    def __init__(self, channels: int, cond_channels: int, height_dilation: int, width_dilation: int,
                 width_model: str, last: bool, s4: dict | None = None):
        super().__init__()
        r = channels
        self.channels, self.dh, self.dw, self.width_model, self.last = r, height_dilation, width_dilation, width_model, last
        if width_model == "conv":
            self.conv = weight_normed(nn.Conv2d(r, 2 * r, (3, 3), dilation=(height_dilation, width_dilation)))
        else:
            self.conv = weight_normed(nn.Conv2d(r, 2 * r, (3, 1), dilation=(height_dilation, 1)))
            self.row_s4 = RowS4(r, **(s4 or {}))
            self.mix = weight_normed(nn.Conv2d(r, 2 * r, 1, bias=False))
        self.cond = weight_normed(nn.Conv2d(cond_channels, 2 * r, 1)) if cond_channels else None
        self.res_skip = weight_normed(nn.Conv2d(r, r if last else 2 * r, 1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None):
        """x (B, r, H, W), cond (B, C, H, W) or None -> (next x, skip)."""
        pad_w = self.dw if self.width_model == "conv" else 0
        pre = self.conv(F.pad(x, (pad_w, pad_w, 2 * self.dh, 0)))
        if self.width_model == "s4":
            pre = pre + self.mix(self.row_s4(x))
        if self.cond is not None:
            pre = pre + self.cond(cond)
        a, b = pre.chunk(2, dim=1)
        g = torch.tanh(a) * torch.sigmoid(b)
        out = self.res_skip(g)
        if self.last:
            return None, out
        res, skip = out.chunk(2, dim=1)
        return (x + res) * math.sqrt(0.5), skip


class FlowNet(nn.Module):
    """One flow's network: input rows (B, 1, H, w) and condition rows (B, C, H, w) -> (log_s, b), each
    (B, 1, H, w), where output row i depends on input rows <= i only. The output conv starts at zero."""

    def __init__(self, channels: int, n_layers: int, cond_channels: int, height_dilations, width_dilations,
                 width_model: str = "conv", s4: dict | None = None):
        super().__init__()
        if width_model not in WIDTH_MODELS:
            raise ValueError(f"width_model must be one of {WIDTH_MODELS}, got {width_model!r}")
        assert len(height_dilations) == n_layers and len(width_dilations) == n_layers
        self.channels, self.n_layers, self.cond_channels = channels, n_layers, cond_channels
        self.height_dilations, self.width_dilations = tuple(height_dilations), tuple(width_dilations)
        self.width_model = width_model
        self.start = weight_normed(nn.Conv2d(1, channels, 1))
        self.layers = nn.ModuleList(
            FlowLayer(channels, cond_channels, dh, dw, width_model, last=i == n_layers - 1, s4=s4)
            for i, (dh, dw) in enumerate(zip(self.height_dilations, self.width_dilations)))
        self.end = nn.Conv2d(channels, 2, 1)
        nn.init.zeros_(self.end.weight)
        nn.init.zeros_(self.end.bias)
        # the conv width model runs as row-batched GEMMs with a hand-written backward
        # (sashimi.nn.waveflow_train); False runs the modules above, the oracle it is tested against
        self.fused = width_model == "conv"

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None):
        if self.fused:
            from .waveflow_train import flownet_fused
            return flownet_fused(self, x, cond)
        h = self.start(x)
        skip = 0.0
        for layer in self.layers:
            h, s = layer(h, cond)
            skip = skip + s
        out = self.end(skip * math.sqrt(1.0 / self.n_layers))
        log_s, b = out.chunk(2, dim=1)
        return log_s, b
