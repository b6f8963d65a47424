"""Benchmark (not a test): the student's forward and backward alone, as train_sd3.py runs it (float32
weights under bf16 autocast, gradients accumulating in float32), at SD3-medium size, 1024 x 1024
(128 x 128 latents), 333 text tokens, random weights and inputs. It gives the model-FLOPs
utilisation the student step would reach with no teacher, data or optimizer around it.

    python tests/bench_student_step.py --batch 4 --compile --no-gradient-checkpointing
    python tests/bench_student_step.py --batch 4 --compile --no-gradient-checkpointing --profile
    python tests/bench_student_step.py --batch 4 --compile --no-gradient-checkpointing --weights bf16

The weights are drawn as train_sd3.py --random-init draws them (sd3.tiny.randomize), not with
MMDiT's own initialisation: that one zeroes the adaLN modulation and the output projection (DiT's
init), so most gradients are zeros, and on it the same computation took 259.7 ms per forward and
backward on an H100 instead of 280.0 ms, a speed that weights like a trained model's do not give.

--weights bf16 measures the alternative to train_sd3.py's float32 weights under autocast: the
weights are stored in bf16, and each gradient is added into a float32 buffer as it arrives (mixed-
precision training with float32 master weights; the master copy, which only the optimizer touches,
is left out). It saves the float32 -> bf16 cast of every weight in each forward, and in each
backward it adds the bf16 gradient into the float32 buffer in one pass instead of first writing a
float32 copy of it and then adding that.

The student's TeEFusion term is not added: it is a (B, D) vector, far below the noise of this timing.
"""

import argparse
import time

import torch

from tinyteef.mmdit import MMDiT, MMDiTConfig
from tinyteef.sd3.tiny import randomize

H100_BF16_TFLOPS = 989  # dense bf16 peak of an H100 SXM


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="samples per forward and backward (train_sd3's --micro-batch)")
    p.add_argument("--latent", type=int, default=128, help="latent side (1024 px: 128)")
    p.add_argument("--text-len", type=int, default=333, help="text tokens (SD3: 77 CLIP + 256 T5)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps, after 3 warm-up steps")
    p.add_argument("--compile", action="store_true", help="MMDiT.compile_blocks, as train_sd3.py --compile")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep activations instead of recomputing them, as train_sd3.py --no-gradient-checkpointing")
    p.add_argument("--weights", choices=["fp32", "bf16"], default="fp32",
                   help="fp32: float32 weights under bf16 autocast, as train_sd3.py; bf16: a bf16 copy computes and "
                        "gradients accumulate in float32 buffers (default fp32)")
    p.add_argument("--profile", action="store_true",
                   help="also print the 22 longest CUDA kernels of 2 steps and the GPU time by kernel family")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")

    with torch.device("cuda"):
        model = randomize(MMDiT(MMDiTConfig()), torch.Generator("cuda").manual_seed(0)).train()
    if args.weights == "bf16":
        model.to(torch.bfloat16)
        master_grads = {}  # parameter -> its float32 gradient, summed over the steps

        def accumulate(p):
            if p in master_grads:
                master_grads[p].add_(p.grad)
            else:
                master_grads[p] = p.grad.float()
            p.grad = None  # the bf16 gradient is folded in; the next backward starts afresh

        for param in model.parameters():
            param.register_post_accumulate_grad_hook(accumulate)
    model.gradient_checkpointing = not args.no_gradient_checkpointing
    if args.compile:
        model.compile_blocks()
    B, n, cfg = args.batch, args.latent, model.config
    x = torch.randn(B, cfg.in_channels, n, n, device="cuda")  # (B, C, H, W)
    tokens = torch.randn(B, args.text_len, cfg.joint_attention_dim, device="cuda")  # (B, L, 4096)
    pooled = torch.randn(B, cfg.pooled_projection_dim, device="cuda")  # (B, 2048)
    t = torch.full((B,), 0.5, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v = model(x, t, tokens, pooled)  # (B, C, H, W)
        v.float().square().mean().backward()  # accumulates float32 gradients, as gradient accumulation does

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.repeats):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / args.repeats
    flops = 3 * model.flops_per_forward(B, n, n, args.text_len)  # forward + backward, no recompute
    print(f"{torch.cuda.get_device_name()}, batch {B}, weights {args.weights}, compile {args.compile}, gradient "
          f"checkpointing {model.gradient_checkpointing}: {dt * 1e3:.1f} ms per forward and backward, "
          f"{flops / dt / 1e12:.1f} model TFLOP/s, {flops / dt / 1e12 / H100_BF16_TFLOPS:.1%} of an H100's "
          f"{H100_BF16_TFLOPS}, peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=22, max_name_column_width=70))
        families = {}  # kernel family -> GPU ms per forward and backward
        for e in prof.events():
            if e.device_type.name == "CUDA":
                families[family(e.name)] = families.get(family(e.name), 0.0) + e.device_time / 2 / 1e3
        print("GPU time per forward and backward by kernel family: " + ", ".join(
            f"{k} {v:.1f} ms" for k, v in sorted(families.items(), key=lambda kv: -kv[1])) + f"; wall {dt * 1e3:.1f} ms")


def family(kernel):
    """A coarse kind of a CUDA kernel, from its name (the attention kernels, cuBLAS's nvjet/gemm, Inductor's
    Triton kernels, PyTorch's own elementwise kernels)."""
    if kernel.startswith("triton"):
        return "fused elementwise (Triton)"
    if any(k in kernel for k in ("sdpa", "cudnn::fusion", "flash", "fmha")):  # cuDNN, flash, memory-efficient
        backward = any(k in kernel for k in ("bprop", "dot_do_o", "dq", "bwd", "backward", "cutlassB"))
        return "attention backward" if backward else "attention forward"
    if "nvjet" in kernel or "gemm" in kernel.lower():
        return "matrix products"
    return "other (PyTorch elementwise, reductions, memsets)"


if __name__ == "__main__":
    main()
