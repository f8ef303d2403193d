"""The paper's U-Net epsilon-network (Ho et al. 2020, appendix B; diffusion_tf/models/unet.py).

Written to export cleanly to ONNX and TensorRT: attention is explicit matmul + softmax,
normalisation is nn.GroupNorm, there is no Python control flow on tensor values, and the
sinusoidal embedding is computed inside ``forward`` from the float32 timestep input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def timestep_embedding(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Transformer sinusoidal embedding of float timesteps [B] -> [B, 2 * len(freqs)]."""
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm, swish, conv3x3, + Dense(temb), GroupNorm, swish, dropout, conv3x3 (zero init)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = _norm(out_ch, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # A 1x1 "network in network" shortcut only where the width changes.
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual (zero-init proj)."""

    def __init__(self, ch: int, num_groups: int):
        super().__init__()
        self.norm = _norm(ch, num_groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)
        self.scale = ch**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q = self.q(h).flatten(2)  # [B, C, N]
        k = self.k(h).flatten(2)
        v = self.v(h).flatten(2)
        w = torch.softmax(torch.matmul(q.transpose(1, 2), k) * self.scale, dim=-1)  # [B, N, N]
        h = torch.matmul(v, w.transpose(1, 2)).reshape(x.shape)  # out[:, :, i] = sum_j w_ij v_j
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Strided 3x3 convolution: H, W -> H/2, W/2."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): x float32 [B, C, H, W], t float32 [B] (original step index) -> eps."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        ch, groups, dropout = config.ch, config.num_groups, config.dropout
        temb_ch = 4 * ch
        half = ch // 2
        # exp(-log(10000) * i / (half - 1)), as the reference; a buffer, not a weight.
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32)
                          / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.temb = nn.Sequential(nn.Linear(2 * half, temb_ch), nn.SiLU(),
                                  nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        # Down path: remember every output's width for the skip connections.
        self.down = nn.ModuleList()
        skip_chs = [ch]
        cur = ch
        for level, (mult, res) in enumerate(zip(config.ch_mult, config.resolutions, strict=True)):
            for _ in range(config.num_res_blocks):
                out = ch * mult
                self.down.append(self._block(cur, out, temb_ch, dropout, groups,
                                             res in config.attn_resolutions))
                cur = out
                skip_chs.append(cur)
            if level != len(config.ch_mult) - 1:
                self.down.append(Downsample(cur))
                skip_chs.append(cur)

        self.mid = nn.ModuleList([
            ResBlock(cur, cur, temb_ch, dropout, groups),
            AttnBlock(cur, groups),
            ResBlock(cur, cur, temb_ch, dropout, groups),
        ])

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip.
        self.up = nn.ModuleList()
        levels = list(zip(config.ch_mult, config.resolutions, strict=True))
        for level in reversed(range(len(levels))):
            mult, res = levels[level]
            for _ in range(config.num_res_blocks + 1):
                out = ch * mult
                self.up.append(self._block(cur + skip_chs.pop(), out, temb_ch, dropout, groups,
                                           res in config.attn_resolutions))
                cur = out
            if level != 0:
                self.up.append(Upsample(cur))
        assert not skip_chs, "every skip connection is consumed"

        self.norm_out = _norm(cur, groups)
        self.conv_out = nn.Conv2d(cur, config.in_channels, 3, padding=1)
        self._init_weights()

    @staticmethod
    def _block(in_ch, out_ch, temb_ch, dropout, groups, attn: bool) -> nn.Module:
        block = nn.ModuleDict({"res": ResBlock(in_ch, out_ch, temb_ch, dropout, groups)})
        if attn:
            block["attn"] = AttnBlock(out_ch, groups)
        return block

    def _init_weights(self) -> None:
        # The reference's variance_scaling(1, "fan_avg", "uniform") = Xavier uniform, zero
        # biases; the last layer of every residual branch and the output start at zero,
        # so each block starts as the identity and the network as eps = 0.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, AttnBlock):
                nn.init.zeros_(m.proj_out.weight)
        nn.init.zeros_(self.conv_out.weight)

    @staticmethod
    def _run_block(block: nn.Module, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if isinstance(block, nn.ModuleDict):
            h = block["res"](h, temb)
            if "attn" in block:
                h = block["attn"](h)
            return h
        return block(h)  # Downsample / Upsample

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.freqs))
        hs = [self.conv_in(x)]
        for block in self.down:
            hs.append(self._run_block(block, hs[-1], temb))
        h = hs[-1]
        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)
        for block in self.up:
            if isinstance(block, nn.ModuleDict):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run_block(block, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
