"""Small denoisers for 8x8 digits (each under 1M parameters) and EDM preconditioning.

A network F(x_in, c_noise) is wrapped by Denoiser into D(x, sigma) = c_skip x + c_out F(c_in x,
c_noise) (EDM, Karras et al. 2022, Tab. 1), with sigma_data = 0.5. For consistency models the
skip/output scalings are shifted so that D(x, sigma_min) = x exactly: the boundary condition
f(x, eps) = x of Song et al. 2023 (their Eq. 7 with EDM's scalings), as iCT and ECT use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0


class NoiseEmbedding(nn.Module):
    """c_noise [n] -> [n, dim]: fixed random Fourier features, then a small MLP."""

    def __init__(self, dim: int, num_frequencies: int = 64):
        super().__init__()
        # A buffer, not a parameter: the frequencies are the same in every checkpoint.
        self.register_buffer("frequencies", torch.randn(num_frequencies,
                                                        generator=torch.Generator().manual_seed(0)))
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies, dim), nn.SiLU(),
                                 nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        phase = 2 * math.pi * c_noise[:, None] * self.frequencies[None, :]
        return self.mlp(torch.cat([phase.cos(), phase.sin()], dim=1))


class MLPBlock(nn.Module):
    """Pre-norm residual block whose features are modulated by the noise embedding."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.scale_shift = nn.Linear(width, 2 * width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift(emb).chunk(2, dim=1)
        x = self.norm(h) * (1 + scale) + shift
        x = self.fc2(self.dropout(nn.functional.silu(self.fc1(nn.functional.silu(x)))))
        return h + x


class MLPNet(nn.Module):
    """F(x_in [n, 1, 8, 8], c_noise [n]) -> [n, 1, 8, 8] on the flattened image."""

    def __init__(self, width: int = 256, depth: int = 3, dropout: float = 0.0, pixels: int = 64):
        super().__init__()
        self.embed = NoiseEmbedding(width)
        self.inp = nn.Linear(pixels, width)
        self.blocks = nn.ModuleList(MLPBlock(width, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, pixels)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h))).view_as(x)


class ResBlock(nn.Module):
    """Conv residual block with GroupNorm and the noise embedding added after the first conv."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(nn.functional.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """A two-level U-Net for 8x8 images: 8x8 at `channels`, 4x4 at 2*channels."""

    def __init__(self, channels: int = 32, dropout: float = 0.0, image_channels: int = 1):
        super().__init__()
        c, c2 = channels, 2 * channels
        emb_dim = 4 * channels
        self.embed = NoiseEmbedding(emb_dim)
        self.inp = nn.Conv2d(image_channels, c, 3, padding=1)
        self.down1 = ResBlock(c, c, emb_dim, dropout)
        self.pool = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.down2 = ResBlock(c, c2, emb_dim, dropout)
        self.mid = ResBlock(c2, c2, emb_dim, dropout)
        self.up2 = ResBlock(2 * c2, c2, emb_dim, dropout)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = ResBlock(c2 + c, c, emb_dim, dropout)
        self.out_norm = nn.GroupNorm(8, c)
        self.out = nn.Conv2d(c, image_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise)
        h1 = self.down1(self.inp(x), emb)  # [n, c, 8, 8]
        h2 = self.down2(self.pool(h1), emb)  # [n, 2c, 4, 4]
        h = self.mid(h2, emb)
        h = self.up2(torch.cat([h, h2], dim=1), emb)
        h = self.up1(torch.cat([self.upsample(h), h1], dim=1), emb)
        return self.out(nn.functional.silu(self.out_norm(h)))


class Denoiser(nn.Module):
    """D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, ln(sigma) / 4).

    kind "edm": EDM's scalings, c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2).
    kind "consistency": s replaced by s - sigma_min in c_skip and c_out, so D(x, sigma_min) = x.
    """

    def __init__(self, net: nn.Module, kind: str = "edm", sigma_data: float = SIGMA_DATA,
                 sigma_min: float = SIGMA_MIN):
        super().__init__()
        if kind not in ("edm", "consistency"):
            raise ValueError(f"kind: {kind!r} is not 'edm' or 'consistency'")
        self.net, self.kind = net, kind
        self.sigma_data, self.sigma_min = sigma_data, sigma_min

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        s = sigma[:, None, None, None]
        sd2 = self.sigma_data ** 2
        shifted = s - self.sigma_min if self.kind == "consistency" else s
        c_skip = sd2 / (shifted ** 2 + sd2)
        c_out = shifted * self.sigma_data / (s ** 2 + sd2).sqrt()
        c_in = 1 / (s ** 2 + sd2).sqrt()
        return c_skip * x + c_out * self.net(c_in * x, sigma.log() / 4)


def build_model(arch: str = "mlp", kind: str = "edm", dropout: float = 0.0, **sizes) -> Denoiser:
    """A Denoiser around an "mlp" (width, depth) or "unet" (channels) network."""
    if arch == "mlp":
        net = MLPNet(dropout=dropout, **sizes)
    elif arch == "unet":
        net = UNet(dropout=dropout, **sizes)
    else:
        raise ValueError(f"arch: {arch!r} is not 'mlp' or 'unet'")
    return Denoiser(net, kind)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
