"""SD3's KL autoencoder: images in [-1, 1] <-> 16-channel latents at 1/8 of the resolution.

The encoder maps an image to a diagonal Gaussian posterior (mean, logvar); `encode` returns its
mean (or a sample) in SD3's model space, z = (mean - shift_factor) * scaling_factor, which is what
the MMDiT is trained on. `decode` undoes that affine map and runs the decoder.

Parameter names equal those of diffusers' `AutoencoderKL` (SD3 has no quant_conv or
post_quant_conv), so its state dicts load with `load_state_dict(strict=True)` and no mapping code.

References: Rombach et al. 2022 (LDM, the KL autoencoder); Esser et al. 2024 (SD3, 16 latent
channels, shift and scale of the latents).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6  # every GroupNorm of the autoencoder


@dataclass
class VAEConfig:
    """Sizes of the autoencoder; field names are diffusers' config keys. Defaults: SD3."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple = (128, 256, 512, 512)  # encoder widths per level; decoder reversed
    layers_per_block: int = 2  # resnets per encoder level; the decoder has one more per level
    norm_num_groups: int = 32
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} not divisible by norm_num_groups "
                             f"({self.norm_num_groups})")


def group_norm(channels, groups):
    """The autoencoder's GroupNorm (eps 1e-6, learned affine)."""
    return nn.GroupNorm(groups, channels, eps=EPS)


class ResnetBlock(nn.Module):
    """GN - SiLU - conv3x3 - GN - SiLU - conv3x3, plus the input (through a 1x1 conv when the
    channel count changes)."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):  # x (B, cin, H, W) -> (B, cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual. The GroupNorm is
    applied to the input before q, k and v (pre-norm); the residual adds the un-normalised input."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # `to_out.0`, diffusers' name

    def forward(self, x):  # x (B, C, H, W)
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)  # (B, H*W, C) each
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H*W, C), one head: scale 1/sqrt(C)
        o = self.to_out[0](o).transpose(1, 2).reshape(B, C, H, W)
        return x + o


class MidBlock(nn.Module):
    """resnet - attention - resnet at the lowest resolution (same layout in encoder and decoder)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)])

    def forward(self, x):  # x (B, C, H, W)
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then conv3x3 stride 2 without padding
    (the original LDM layout the weights were trained with, not a symmetric padding=1 conv)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):  # x (B, C, H, W) -> (B, C, H // 2, W // 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then conv3x3."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # x (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def resnet_stack(cin, cout, n, groups):
    """`n` resnets of one level; the first changes the width cin -> cout."""
    return nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])


class DownBlock(nn.Module):
    """An encoder level: resnets, then a Downsample unless it is the last level."""

    def __init__(self, cin, cout, n, groups, downsample):
        super().__init__()
        self.resnets = resnet_stack(cin, cout, n, groups)
        self.downsamplers = nn.ModuleList([Downsample(cout)] if downsample else [])  # empty: none

    def forward(self, x):  # x (B, cin, H, W) -> (B, cout, H/2, W/2), or (B, cout, H, W) if last
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    """A decoder level: resnets, then an Upsample unless it is the last level."""

    def __init__(self, cin, cout, n, groups, upsample):
        super().__init__()
        self.resnets = resnet_stack(cin, cout, n, groups)
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])  # empty: none

    def forward(self, x):  # x (B, cin, H, W) -> (B, cout, 2H, 2W), or (B, cout, H, W) if last
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> posterior parameters (B, 2 * latent_channels, H/f, W/f),
    f = 2^(levels - 1); the first half of the channels is the mean, the second the log-variance."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        cins = (ch[0],) + ch[:-1]
        self.down_blocks = nn.ModuleList([
            DownBlock(cin, cout, n, g, downsample=i < len(ch) - 1)
            for i, (cin, cout) in enumerate(zip(cins, ch))])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):  # x (B, 3, H, W)
        h = self.conv_in(x)  # (B, ch[0], H, W)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)  # (B, ch[-1], H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2 * latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f); the encoder's
    levels in reverse, each with layers_per_block + 1 resnets."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.layers_per_block + 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        cins = (ch[0],) + ch[:-1]
        self.up_blocks = nn.ModuleList([
            UpBlock(cin, cout, n, g, upsample=i < len(ch) - 1)
            for i, (cin, cout) in enumerate(zip(cins, ch))])
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):  # z (B, latent, h, w)
        h = self.mid_block(self.conv_in(z))  # (B, ch[-1] of the encoder, h, w)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 3, h*f, w*f)


class VAE(nn.Module):
    """SD3's autoencoder with latents in model space: z = (mean - shift_factor) * scaling_factor."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def posterior(self, x):
        """Mean and log-variance (clamped to [-30, 20], as LDM does, so exp stays finite) of the
        raw posterior, before the model-space scaling. x (B, 3, H, W) -> 2 x (B, latent, h, w)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x, sample=False, generator=None):
        """Images in [-1, 1] (B, 3, H, W) -> model-space latents (B, latent, H/8, W/8) for SD3's
        4 levels. The posterior mean, or with sample=True a draw mean + std * N(0, I) from
        `generator` (which must live on x's device)."""
        mean, logvar = self.posterior(x)
        latent = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device,
                                dtype=mean.dtype)  # (B, latent, h, w)
            latent = mean + torch.exp(0.5 * logvar) * noise
        return (latent - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode(self, z):
        """Model-space latents (B, latent, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1] but
        not clamped."""
        return self.decoder(z / self.cfg.scaling_factor + self.cfg.shift_factor)
