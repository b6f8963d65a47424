"""Colour statistics of images: mean HSV saturation and per-channel mean and standard deviation.

The toy report sets a sampler's statistics against its teacher's and the real data's across w:
strong guidance pushes samples towards saturated, high-contrast colours, and guidance-distilled
students are known to over-saturate.
"""

import torch

from .data import to_float


def colour_stats(x):
    """Colour statistics of images x (N, C, H, W), uint8 or float in [-1, 1], on a [0, 1] scale:
    "mean" and "std" per channel (over every pixel of every image), and "saturation", the mean of
    HSV's S = (max - min) / max of each pixel's R, G, B (0 for black), or None for grayscale."""
    x01 = to_float(x).cpu().add(1).div(2)  # (N, C, H, W)
    stats = {"mean": x01.mean(dim=(0, 2, 3)).tolist(), "std": x01.std(dim=(0, 2, 3), correction=0).tolist(),
             "saturation": None}
    if x01.shape[1] == 3:
        hi, lo = x01.amax(dim=1), x01.amin(dim=1)  # (N, H, W)
        stats["saturation"] = torch.where(hi > 0, (hi - lo) / hi.clamp(min=1e-12), 0.0).mean().item()
    return stats
