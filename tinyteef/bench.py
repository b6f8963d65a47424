"""Benchmark: forward passes and wall time per image of every sampler, on an MMDiT of a given size.

    python -m tinyteef.bench                          # tiny model, CPU, a few seconds
    python -m tinyteef.bench --size sd3-medium --device cuda --dtype bf16 --batch 4 --latent 128

Weights are random (timing does not depend on them), so no download is needed. The table it
prints is what the paper's "Cost" column measures: the student is Euler with one pass per step,
Euler+CFG two, Z-Sampling+CFG and W2SD+CFG up to six. `Meter` counts and times the passes of a
net inside a longer computation (train_sd3.py's teacher).
"""

import argparse
import copy
import time

import torch

from .flow import time_grid
from .guidance import Student, Text
from .mmdit import MMDiT, MMDiTConfig
from . import samplers


class Meter:
    """Wraps a frozen net: counts the rows it evaluates and times its calls (CUDA events on a
    GPU, so nothing waits), to split a step's time between the teacher's target and the
    student's forward and backward."""

    def __init__(self, net):
        self.net, self.rows, self.events, self.cpu_seconds = net, 0, [], 0.0

    def __call__(self, x, *args, **kwargs):
        self.rows += x.shape[0]
        if not x.is_cuda:
            start = time.perf_counter()
            v = self.net(x, *args, **kwargs)
            self.cpu_seconds += time.perf_counter() - start
            return v
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        v = self.net(x, *args, **kwargs)
        end.record()
        self.events.append((start, end))
        return v

    def take(self):
        """(rows, seconds) since the last take."""
        if self.events:
            torch.cuda.synchronize()
        seconds = self.cpu_seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1000
        rows, self.rows, self.events, self.cpu_seconds = self.rows, 0, [], 0.0
        return rows, seconds


SIZES = {
    "tiny": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                 caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=16),
    "sd3-medium": {},  # MMDiTConfig's defaults
    # SD3.5's published transformer configs (stabilityai/stable-diffusion-3.5-*/transformer/config.json):
    # MMDiT-X's image self-attention in the first 13 of 24 blocks and a 384 x 384 position table; 38
    # blocks of width 38 x 64 = 2432. Both with qk RMSNorm. 2.24 B and 8.06 B parameters.
    "sd3.5-medium": dict(pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"),
}
PEAK_BF16_TFLOPS = 989  # dense bf16 peak of an H100 SXM and of an H200, for the MFU (model FLOPs / peak)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="tiny", help="model size (default: tiny)")
    p.add_argument("--latent", type=int, default=16, help="side of the square latent (default 16; SD3 at 1024 px: 128)")
    p.add_argument("--text-len", type=int, default=16, help="text tokens (SD3: 333)")
    p.add_argument("--batch", type=int, default=4, help="images per batch")
    p.add_argument("--steps", type=int, default=8, help="sampling steps")
    p.add_argument("--w", type=float, default=5.0, help="guidance weight, paper's convention (diffusers' scale - 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per sampler (the median is reported)")
    return p.parse_args(argv)


def timed(fn, device, repeats):
    """Median wall time of fn() in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no GPU; use --device cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = MMDiTConfig(**SIZES[args.size])
    if args.latent // cfg.patch_size > cfg.pos_embed_max_size:
        raise SystemExit(f"error: --latent {args.latent} is larger than {args.size}'s position table allows "
                         f"({cfg.pos_embed_max_size * cfg.patch_size})")
    torch.manual_seed(0)
    strong = MMDiT(cfg).to(device, dtype).eval()
    weak = copy.deepcopy(strong)
    B, L = args.batch, args.text_len
    # the sample and the Euler updates stay float32 (as SD3's scheduler steps); autocast runs the
    # model in bf16 when asked
    c = Text(torch.randn(B, L, cfg.joint_attention_dim, device=device),
             torch.randn(B, cfg.pooled_projection_dim, device=device))
    u = Text(torch.zeros(1, L, cfg.joint_attention_dim, device=device),
             torch.zeros(1, cfg.pooled_projection_dim, device=device)).expand(B)
    x = torch.randn(B, cfg.in_channels, args.latent, args.latent, device=device)
    ts, w = time_grid(args.steps).to(device), args.w
    runs = {
        "Euler (teacher, no guidance)": lambda: samplers.euler(strong, x, ts, c),
        "Euler+CFG": lambda: samplers.euler_cfg(strong, x, ts, c, u, w),
        "naive fusion (Eq. 5)": lambda: samplers.naive(strong, x, ts, c, u, w),
        "Z-Sampling+CFG": lambda: samplers.z_sampling(strong, x, ts, c, u, w),
        "W2SD+CFG": lambda: samplers.w2sd(strong, weak, x, ts, c, u, w),
        "TeEFusion student (Eq. 7)": lambda: samplers.student(Student(strong), x, ts, c, u, w),
    }
    n_params = sum(p.numel() for p in strong.parameters())
    flops = strong.flops_per_forward(1, args.latent, args.latent, L)
    print(f"MMDiT {args.size}: {n_params / 1e6:.1f} M parameters, {flops / 1e9:.2f} GFLOP per image per pass; "
          f"{args.batch} images of {args.latent}x{args.latent} latents, {args.steps} steps, w = {w}, "
          f"{args.dtype} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    print("| sampler | passes / step (made) | skipped / step | ms / image | x Euler |")
    print("|---|---|---|---|---|")
    base = None
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for name, fn in runs.items():
            seconds, s = timed(fn, device, args.repeats)
            ms = 1000 * seconds / B
            base = base or ms
            print(f"| {name} | {s.passes / s.steps:g} | {s.skipped / s.steps:g} | {ms:.2f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
