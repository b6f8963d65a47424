"""Benchmark (not a test): the toy's four hot loops at the full preset's sizes, eager against the
fast path (toy/fast.py), on a GPU, with random weights and data (timing does not depend on them).

    python tests/bench_toy.py                      # every compile mode, plain and fused AdamW
    python tests/bench_toy.py --modes off graphs --profile

What it times, each as train_toy.py runs it (bf16 autocast, float32 weights):
  teacher step    flow matching at batch 256: text encoder, MMDiT forward and backward, AdamW, EMA
  W2SD target     Alg. 1 lines 8-11 for batch 128: 3 CFG calls of 256 rows (6 passes per sample)
  4 students      lines 12-14 for the four W2SD+CFG students at batch 128: forward, backward, AdamW
  sampling        32 Euler+CFG steps of 500 images (calls of 1000 rows)
For each: ms, model TFLOP/s (MMDiT.flops_per_forward; a training pass counts 3x) and MFU against
the GPU's dense bf16 peak (--peak-tflops, default an H200's 989). --profile adds the GPU time of
each loop by kernel family.
"""

import argparse
import copy
import time
from types import SimpleNamespace

import torch

from tinyteef.distill import sample_training_point, student_loss, teacher_target
from tinyteef.flow import time_grid
from tinyteef.guidance import DistillCFG, Student, Text
from tinyteef.mmdit import MMDiT
from tinyteef.samplers import euler_cfg
from tinyteef.sd3.tiny import randomize
from toy.fast import COMPILE_MODES, adamw, compiled
from toy.methods import distill_config
from toy.presets import PRESETS, mmdit_config
from toy.scoring import autocast
from toy.text import TextEncoder
from tests.bench_student_step import family
from train_toy import ema_update, teacher_loss


def loops(P, mode, fused, device):
    """{name: (one call, model FLOPs of one call, whether it steps an optimizer)} for the preset P
    under compile `mode`, AdamW fused or not."""
    g = torch.Generator(device).manual_seed(0)
    cfg = mmdit_config(SimpleNamespace(channels=3), P)
    model = randomize(MMDiT(cfg).to(device), g)  # trained-like weights: no zero-initialised layers
    text = TextEncoder(64, P.text_len, P.text_width, P.text_layers, pooled_dim=P.text_width).to(device)
    ema, weak = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(model).requires_grad_(False)
    opt = adamw([*model.parameters(), *text.parameters()], P.lr, fused)
    net, fast_ema, fast_weak = compiled(model, mode), compiled(ema, mode), compiled(weak, mode)
    fast_text = compiled(text, mode)
    ids = torch.randint(4, 64, (P.batch, P.text_len), generator=g, device=device)
    x0 = torch.rand(P.batch, 3, 32, 32, generator=g, device=device) * 2 - 1

    def teacher_step():
        with autocast(device):
            loss = teacher_loss(net, fast_text, x0, ids, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, P.ema)

    B = P.distill_batch
    config = distill_config(P, "w2sd")
    with torch.no_grad():
        c, empty = text(ids[:B]), text(torch.zeros_like(ids[:1]))
    u = empty.expand(B)
    students = [Student(copy.deepcopy(model).requires_grad_(True), kind,
                        DistillCFG(cfg.hidden_size).to(device) if kind == "distillcfg" else None, divisor)
                for kind, divisor in (("teefusion", 1.0), ("teefusion", 256.0), ("distillcfg", 1.0),
                                      ("gpsi_ablation", 1.0))]
    fast_students = [compiled(s, mode) for s in students]
    opts = [adamw(s.parameters(), P.distill_lr, fused) for s in students]
    x_t, t, w = sample_training_point(x0[:B], config, g)

    def target():
        with autocast(device):
            return teacher_target(fast_ema, x_t, t, w, c, u, config, fast_weak)

    y = target()

    def students_step():  # as train_toy.py: each student's update right after its backward
        for s, o in zip(fast_students, opts):
            with autocast(device):
                loss = student_loss(s, x_t, t, w, c, u, y)
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)

    n = 500
    cs = Text(c.tokens[:1].expand(n, -1, -1), c.pooled[:1].expand(n, -1))
    noise, ts = torch.randn(n, 3, 32, 32, generator=g, device=device), time_grid(P.sample_steps).to(device)

    def sample():
        with autocast(device):
            return euler_cfg(fast_ema, noise, ts, cs, empty.expand(n), P.w).x

    f = lambda b: model.flops_per_forward(b, 32, 32, P.text_len)
    return {f"teacher step (batch {P.batch})": (teacher_step, 3 * f(P.batch), True),
            f"W2SD+CFG target (batch {B})": (target, 6 * f(B), False),
            f"4 W2SD students (batch {B})": (students_step, 4 * 3 * f(B), True),
            f"Euler+CFG sampling ({n} images, {P.sample_steps} steps)": (sample, 2 * P.sample_steps * f(n), False)}


def timed(fn, repeats, warmup=3):
    """Median seconds of fn() over `repeats` calls after `warmup` calls (compiling happens there)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def profile(fn):
    """GPU milliseconds of one call of fn by kernel family (bench_student_step.family), and the
    operators that take the most CPU time (a loop whose wall time exceeds its GPU time waits on
    Python and kernel launches)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    families = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            families[family(e.name)] = families.get(family(e.name), 0.0) + e.device_time / 1e3
    cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    return (", ".join(f"{k} {v:.1f}" for k, v in sorted(families.items(), key=lambda kv: -kv[1])) +
            "\n  CPU ms, most self time: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.1f} ({e.count}x)"
                                                      for e in cpu))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="full", help="sizes (default full)")
    p.add_argument("--modes", nargs="+", choices=COMPILE_MODES, default=list(COMPILE_MODES),
                   help="compile modes to time (toy/fast.py; default all)")
    p.add_argument("--loops", nargs="+", default=["teacher", "target", "students", "sampling"],
                   help="which loops to time, by a word of their name (default all four)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per loop (the median is reported)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H200, H100: 989)")
    p.add_argument("--profile", action="store_true", help="GPU time of each loop by kernel family")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    P, device = PRESETS[args.preset], torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, preset {args.preset}")
    print("| loop | compile | AdamW | ms | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        for fused in (False, True):
            torch._dynamo.reset()
            for name, (fn, flops, steps_adamw) in loops(P, mode, fused, device).items():
                if (fused and not steps_adamw) or not any(k in name.lower() for k in args.loops):
                    continue  # no optimizer in this loop (the unfused row says it all), or not asked for
                dt = timed(fn, args.repeats)
                adam = ("fused" if fused else "foreach") if steps_adamw else "—"
                print(f"| {name} | {mode} | {adam} | {dt * 1e3:.1f} | {flops / dt / 1e12:.1f} | "
                      f"{flops / dt / 1e12 / args.peak_tflops:.1%} |", flush=True)
                if args.profile:
                    print(f"  GPU ms by kernel family: {profile(fn)}", flush=True)


if __name__ == "__main__":
    main()
