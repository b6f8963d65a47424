"""Benchmark (not a test): our MMDiT against diffusers' SD3Transformer2DModel, same weights, same GPU,
same process. Forward time at SD3-medium size, bf16, 1024 x 1024 (128 x 128 latents), 333 text tokens.

    python tests/bench_mmdit_vs_diffusers.py --batch 1 4                  (both eager)
    python tests/bench_mmdit_vs_diffusers.py --batch 1 4 --compile both   (both through torch.compile)

Compare like with like: eager with eager, compiled with compiled. `--compile ours` (ours compiled,
diffusers eager) measures the compiler's gain, not a difference between the two models.

diffusers is a test-only reference here, as everywhere in this project.
"""

import argparse
import time

import torch

from tinyteef.mmdit import MMDiT, MMDiTConfig


def timed_pair(f_a, f_b, repeats):
    """Median seconds of f_a() and of f_b(), interleaved (a b, b a, a b, ...) after warm-up calls,
    so that clock or thermal drift during the measurement does not favour the one timed first."""
    for f in (f_a, f_b, f_a, f_b):
        f()
    times = {f_a: [], f_b: []}
    for i in range(repeats):
        for f in ((f_a, f_b) if i % 2 == 0 else (f_b, f_a)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            f()
            torch.cuda.synchronize()
            times[f].append(time.perf_counter() - start)
    return [sorted(times[f])[repeats // 2] for f in (f_a, f_b)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--latent", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", choices=("none", "ours", "both"), default="none",
                   help="run ours (or both models) through torch.compile; the first calls compile")
    args = p.parse_args()
    from diffusers import SD3Transformer2DModel
    cfg = MMDiTConfig()  # SD3-medium
    with torch.device("cuda"):
        ref = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                    caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                    pos_embed_max_size=192).to(torch.bfloat16).eval()
        ours = MMDiT(cfg).to(torch.bfloat16).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    run_ours = torch.compile(ours) if args.compile != "none" else ours
    run_ref = torch.compile(ref) if args.compile == "both" else ref
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; compiled: {args.compile}; SD3-medium MMDiT, "
          f"{sum(q.numel() for q in ours.parameters()) / 1e9:.2f} B parameters, bf16, latent {args.latent}^2, 333 text tokens")
    print("| batch | diffusers ms | ours ms | diffusers / ours | ours TFLOP/s | max abs diff |")
    print("|---|---|---|---|---|---|")
    for B in args.batch:
        g = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(B, 16, args.latent, args.latent, device="cuda", generator=g, dtype=torch.bfloat16)
        tokens = torch.randn(B, 333, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
        pooled = torch.randn(B, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
        t = torch.rand(B, device="cuda", generator=g)
        with torch.no_grad():
            f_ref = lambda: run_ref(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                                timestep=1000 * t).sample
            f_ours = lambda: run_ours(x, t, tokens, pooled)
            diff = (f_ref().float() - f_ours().float()).abs().max().item()
            t_ref, t_ours = timed_pair(f_ref, f_ours, args.repeats)
        tflops = ours.flops_per_forward(B, args.latent, args.latent, 333) / t_ours / 1e12
        print(f"| {B} | {1000 * t_ref:.1f} | {1000 * t_ours:.1f} | {t_ref / t_ours:.3f} | {tflops:.0f} | {diff:.3g} |")


if __name__ == "__main__":
    main()
