"""Distil an SD3 teacher's guided sampler into a one-pass TeEFusion student (Alg. 1).

    python train_sd3.py --model SD3_DIR --data DATA_DIR --teacher cfg --out runs/sd3
    python train_sd3.py --model SD3_DIR --weak-model WEAK_DIR --data DATA_DIR --teacher w2sd
    torchrun --nproc_per_node 8 train_sd3.py ...                 (the same flags, on 8 GPUs)
    python train_sd3.py --random-init tiny --teacher zsampling --steps 20   (no download)
    python train_sd3.py --random-init sd3-medium --teacher w2sd --steps 5   (speed and memory)
    torchrun --nproc_per_node 2 train_sd3.py --random-init sd3.5-large --teacher w2sd --fsdp ...

DATA_DIR holds images with captions: NAME.txt beside each image, or a metadata.jsonl with
"file_name" and "text". Stage 1 encodes every image (VAE) and caption (text encoders) once into
OUT/cache and frees the encoders. Stage 2 is Alg. 1: the student starts as a copy of the teacher;
each step draws t ~ U[0, 1] (--t-dist logit-normal: SD3's pre-training draw), w ~ U[w_min, w_max]
and noise for a batch, asks the frozen teacher sampler (CFG, Z-Sampling or W2SD, in bf16) for its
velocity target, and fits the student's one pass with the Eq. 7 term in z. The batch (128, as the
paper) is split into micro-batches, summed by gradient accumulation, and over the processes by DDP,
or with --fsdp by FSDP2, which shards the student over the GPUs (tinyteef/parallel.py).

Every --save-every steps OUT/checkpoint.pt (student, optimizer, step) is written atomically (with
--fsdp the folder OUT/checkpoint of shards: a link to the newest OUT/checkpoint.N, swapped in one
rename), and OUT/student is the student as a diffusers-layout SD3 folder (a link to the newest
OUT/student.N, swapped likewise). Both are complete at every instant: a kill while saving leaves the
last ones.
`--resume` continues a run exactly: every random draw of a step comes from a generator seeded by
(--seed, step, micro-batch), so the step index is the whole random state, for any process count.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from tinyteef import checkpoint, parallel
from tinyteef.bench import PEAK_BF16_TFLOPS, SIZES, Meter
from tinyteef.distill import (REFLECTION_TARGETS, TEACHERS, DistillConfig, check_w_range, effective_guidance,
                              sample_training_point, step_problem, student_loss, teacher_target, weights_norm)
from tinyteef.flow import T_DISTS, shift, time_grid
from tinyteef.guidance import STUDENT_KINDS, TEEFUSION_DIVISOR, DistillCFG, Student
from tinyteef.mmdit import MMDiT, MMDiTConfig
from tinyteef.parallel import barrier, global_rows, micro_batches
from tinyteef.sd3 import cache, checks
from tinyteef.sd3.loader import load_transformer, load_vae, save_student
from tinyteef.sd3.sample import SD3_T_MIN, preview
from tinyteef.sd3.tiny import randomize, write_tiny_sd3

RANDOM_SIZES = checks.RANDOM_SIZES  # --random-init with the transformer alone, at a published size
# The flags that define a run: a --resume with any of them changed is refused. (--compile is not one:
# it changes the results by float rounding only.)
RUN_KEYS = ("model", "weak_model", "random_init", "data", "teacher", "student", "teefusion_divisor",
            "resolution", "batch_size", "lr", "w_min", "w_max", "w_inv", "w_weak", "sample_steps", "shift",
            "reflection_target", "t_dist", "t5_length", "synthetic_size", "seed")


def parse_args(argv=None):
    """The flags, in four groups, and every check that can be made before anything loads: a bad
    flag stops here with one line that says what to do."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the teacher, W2SD's weak model and the data; --random-init tries everything without downloads
    a = p.add_argument_group("models and data")
    a.add_argument("--model", help="the teacher: an SD3 / SD3.5 folder in the diffusers layout")
    a.add_argument("--weak-model", help="W2SD's weak model: a weaker transformer of the same architecture")
    a.add_argument("--random-init", choices=("tiny", *RANDOM_SIZES),
                   help="random weights instead of --model: 'tiny' writes a tiny SD3 folder (all components) "
                        "into OUT; the others build the transformer only, at that model's published size, "
                        "and train on random tensors")
    a.add_argument("--data", help="folder of images with captions (NAME.txt beside each, or metadata.jsonl)")
    a.add_argument("--out", default="runs/sd3", help="output folder: cache, checkpoint, student, previews, log")
    a.add_argument("--resolution", type=int, default=1024, help="square training size in pixels")
    a.add_argument("--t5-length", type=int, default=256, help="T5 tokens of every prompt and of ∅ (SD3: 256)")
    a.add_argument("--synthetic-size", type=int, default=1024, help="samples of random data (no --data)")
    # Alg. 1: which teacher sampler, which student, and the draws of w and t
    m = p.add_argument_group("distillation (Alg. 1)")
    m.add_argument("--teacher", required=True, choices=TEACHERS, help="the teacher's sampler to distil")
    m.add_argument("--student", default="teefusion", choices=STUDENT_KINDS,
                   help="how w enters z: Eq. 7 (default), DistillCFG's new MLP, or the G(psi(w)) ablation")
    m.add_argument("--teefusion-divisor", type=float, default=TEEFUSION_DIVISOR,
                   help="divisor of the Eq. 7 term, and of the G(psi(w)) ablation's (the authors' code: 256; "
                        "the paper: 1)")
    D = DistillConfig  # the defaults of Alg. 1's settings live there, once
    m.add_argument("--w-min", type=float, default=D.w_min)
    m.add_argument("--w-max", type=float, default=D.w_max, help="w ~ U[w-min, w-max] (paper: [2, 14])")
    m.add_argument("--w-inv", type=float, default=D.w_inv, help="Z-Sampling's inversion guidance")
    m.add_argument("--w-weak", type=float, default=D.w_weak,
                   help="W2SD's weak-model guidance (default: the strong w, CFG on all three passes, to first "
                        "order CFG at w plus the strong-minus-weak difference; 0, the W2SD reference code's, "
                        "is about CFG at 2w)")
    m.add_argument("--sample-steps", type=int, default=D.sample_steps, help="the grid the student will sample with")
    m.add_argument("--shift", type=float, default=D.shift, help="... and its time shift (SD3 at 1024 px: 3)")
    m.add_argument("--reflection-target", default=D.reflection_target, choices=REFLECTION_TARGETS,
                   help="reach: the velocity that reaches the teacher's reflected step in one Euler step; "
                        "refined: the teacher's CFG velocity at the reflected point x~")
    m.add_argument("--t-dist", default=D.t_dist, choices=T_DISTS,
                   help="p(t) of Alg. 1: uniform (the paper's t ~ U[0, 1]) or logit-normal (SD3's pre-training)")
    # the paper's optimisation (AdamW, lr 5e-6, batch 128), and what trades memory for speed
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=10000, help="optimizer steps (paper: loss flat after 10k)")
    o.add_argument("--batch-size", type=int, default=128, help="samples per optimizer step, all processes")
    o.add_argument("--micro-batch", type=int, default=4, help="samples per forward pass of one process")
    o.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate (paper: 5e-6)")
    o.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep the student's activations instead of recomputing them in the backward: "
                        "faster, more memory (SD3-medium, 1024 px, --compile, --micro-batch 4: 64.7 GiB peak)")
    o.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block of the student, teacher and weak model (fused "
                        "elementwise kernels: faster steps, same results up to float rounding); the first "
                        "steps are slow while it compiles")
    o.add_argument("--fsdp", action="store_true", help="under torchrun: shard the student, its gradients and "
                   "AdamW's state over the GPUs (FSDP2, per transformer block; default: DDP, a whole copy on each)")
    o.add_argument("--fsdp-frozen", default="whole", choices=parallel.FROZEN,
                   help="with --fsdp: the bf16 teacher and weak model whole on every GPU (default), or sharded too")
    o.add_argument("--fsdp-grad-sync", default="step", choices=parallel.GRAD_SYNCS, help="with --fsdp: reduce-scatter "
                   "once per step (the sum kept unsharded meanwhile: 4 B per parameter), or every micro-batch")
    o.add_argument("--seed", type=int, default=0)
    # what is written to --out, and how often
    s = p.add_argument_group("outputs")
    s.add_argument("--save-every", type=int, default=500,
                   help="steps between checkpoints, one also at the end (0: none, for benchmarks)")
    s.add_argument("--preview-every", type=int, default=500, help="steps between preview grids (0: none)")
    s.add_argument("--preview-w", type=float, default=6.0, help="w of the previews (diffusers' scale 7)")
    s.add_argument("--preview-count", type=int, default=4, help="previews show the first captions of the data")
    s.add_argument("--cache-batch", type=int, default=8, help="images per VAE call in stage 1")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS,
                   help="the GPU's dense bf16 peak, for the MFU in log.jsonl (H100 SXM, H200: 989; A100: 312)")
    args = p.parse_args(argv)
    for flag in ("model", "weak_model", "data"):  # absolute paths: config.json must name the same run
        v = getattr(args, flag)
        if v is not None:
            if not os.path.isdir(v):
                p.error(f"--{flag.replace('_', '-')} {v}: no such folder")
            setattr(args, flag, os.path.abspath(v))
    # what the flags must agree on, among themselves (sizes, ranges, the device) and with the models'
    # config files (resolution and position table, the weak model's inputs): a table in sd3/checks.py
    error = checks.flag_error(args) or checks.model_error(args)
    if error:
        p.error(error)
    return args


def log0(rank, *msg):
    """print, from the first process only."""
    if rank == 0:
        print(*msg, flush=True)


def load_models(args, model_dir, device):
    """Alg. 1 line 1: the frozen teacher (bf16 on a GPU), W2SD's weak model, and the student, a
    float32 copy of the teacher (bf16 autocast runs its matmuls)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frozen = lambda m: m.to(device, dtype).eval().requires_grad_(False)
    # the weights: random at a published size (speed and memory without a download; drawn on the
    # device, the same on every process), or loaded
    g = torch.Generator(device).manual_seed(args.seed)

    def make(folder):
        if args.random_init not in RANDOM_SIZES:
            return load_transformer(folder, device)[0]
        with torch.device(device):
            return randomize(MMDiT(MMDiTConfig(**SIZES[args.random_init])), g)
    teacher = make(model_dir)
    # the student: a float32 copy of the teacher (AdamW's update is too small for bf16 weights at
    # lr 5e-6), recomputing its activations in the backward unless told otherwise. It is copied, and
    # the teacher cast, before the weak model is made: 2 float32 models at a time (SD3.5-large: 60 GiB)
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    model.gradient_checkpointing = not args.no_gradient_checkpointing
    teacher = frozen(teacher)
    weak = frozen(make(args.weak_model)) if args.teacher == "w2sd" else None
    # DistillCFG's new MLP H (zero last layer: the student starts equal to the teacher)
    H = DistillCFG(model.config.hidden_size).to(device) if args.student == "distillcfg" else None
    # regional compilation of every block, in place, before DDP wraps the student (state_dict keys
    # stay the same, so checkpoints and the diffusers export do not change)
    if args.compile:
        for m in filter(None, (teacher, weak, model)):
            m.compile_blocks()
    return teacher, weak, Student(model, args.student, H, args.teefusion_divisor, (args.w_min, args.w_max))


def main(argv=None):
    args = parse_args(argv)
    with parallel.processes(torch.device(args.device)) as (world, rank, device):
        train(args, world, rank, device)


@checks.one_line_errors  # a full disk or a read-only --out: one line naming the file, not a traceback
def train(args, world, rank, device):
    """Alg. 1 in this process of `world` (one, or one per GPU under torchrun)."""
    if args.fsdp and world == 1:
        raise SystemExit("error: --fsdp shards the student over processes: start it with torchrun --nproc_per_node N")
    # every process takes the same number of micro-batches, so that their all-reduces line up
    if (args.batch_size // args.micro_batch) % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} / --micro-batch {args.micro_batch} micro-batches "
                         f"cannot be split over {world} processes; make it a multiple of {world}")
    # The run's folder: its config.json (and checkpoint) define the run, so a --resume that changes it
    # is refused; every check passes (writable, checkpoint readable, data listed) before it is written
    out, ckpt_path = args.out, checks.checkpoint_path(args)  # with --fsdp a folder of shards
    run = {k: getattr(args, k) for k in RUN_KEYS}
    try:
        items = checks.check_run(args, run)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if rank == 0:  # atomically: the other processes may be reading it in check_run right now
        checkpoint.atomic_write(os.path.join(out, "config.json"), lambda f: f.write(json.dumps(run, indent=1).encode()))
        checkpoint.remove_stale_temps(out)  # what saves killed before their rename left behind
    # The teacher's folder: --model, or a tiny random SD3 folder (all components) written into OUT
    model_dir = args.model
    if args.random_init == "tiny":
        model_dir = os.path.join(out, "random-init", "teacher")
        for name, seed in (("teacher", args.seed), ("weak", args.seed + 1)):  # each written atomically
            if rank == 0 and not os.path.isdir(os.path.join(out, "random-init", name)):
                write_tiny_sd3(os.path.join(out, "random-init", name), seed=seed)
        barrier(world)
        args.weak_model = args.weak_model or os.path.join(out, "random-init", "weak")
    # Stage 1, before the models load, so that encoders and models never share the GPU: every image
    # through the VAE and every caption through the three text encoders, once, into OUT/cache
    if args.data is not None:
        try:  # each process encodes its share; the encoders are freed before the models load
            data = cache.build(os.path.join(out, "cache"), model_dir, args.data, args.resolution, args.t5_length,
                               args.cache_batch, device, rank, world, items)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        log0(rank, f"data: {len(data)} images cached in {os.path.join(out, 'cache')}"
                   + (f", {len(data.skipped)} skipped (could not be decoded)" if data.skipped else ""))
    # Alg. 1 line 1: the student starts as a copy of the teacher; teacher and weak model are frozen
    teacher, weak, student = load_models(args, model_dir, device)
    if args.fsdp:  # each process keeps 1/world of the student (per transformer block), before AdamW sees it
        parallel.shard(student, (teacher, weak), device, args.fsdp_frozen == "shard")
    if args.data is None:  # --random-init without --data: random latents and text, for speed and memory
        # of the teacher's input widths: latent channels, pooled and token embedding sizes
        c_ = teacher.config
        data = cache.SyntheticData(args.synthetic_size, c_.in_channels, args.resolution, c_.pooled_projection_dim,
                                   c_.joint_attention_dim, 77 + args.t5_length, args.seed)
    vae = load_vae(model_dir, device).eval() if rank == 0 and args.data is not None else None  # previews only
    # Alg. 1's settings (teacher sampler, w range, inversion guidance, the student's grid, reflection
    # target, p(t)): every field of DistillConfig that a flag sets (t_mean and t_std keep theirs)
    config = DistillConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)
                              if hasattr(args, f.name)})
    log0(rank, f"teacher: {args.teacher}, to first order in the step {effective_guidance(config)} "
               f"(w ~ U[{args.w_min:g}, {args.w_max:g}], t ~ {args.t_dist})")
    # AdamW at the paper's lr (5e-6), constant; no weight decay and no clipping: the paper names none
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    start = 0
    if args.resume and args.fsdp:  # every process reads its shards; a damaged one stops all, in one line
        try:
            start = parallel.load(ckpt_path, student, opt)["step"]
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    elif args.resume:  # the step index is the whole random state (micro_batches), so weights,
        # optimizer state and the step are all a resume needs to continue bit for bit
        state = checkpoint.load(ckpt_path, map_location=device)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    if args.resume:
        log0(rank, f"resuming {out} at step {start}")
    # the student as the loop calls it: DDP over several processes (FSDP's is sharded already), and
    # no_sync(), around every micro-batch but the last: the gradients are reduced once per step
    net, no_sync = parallel.wrap(student, device, world, args.fsdp, args.fsdp_grad_sync)
    # The teacher's passes are counted and timed, to report model FLOPs: one pass per row for the
    # frozen nets, three (forward and backward) for the student.
    teacher_n = Meter(teacher)
    weak_n = Meter(weak) if weak is not None else None
    # one row's forward: a latent of resolution / 8 and SD3's 77 CLIP + t5-length T5 text tokens
    h = args.resolution // 8
    flops_row = teacher.flops_per_forward(1, h, h, 77 + args.t5_length)
    A = args.batch_size // args.micro_batch  # micro-batches per step, all processes
    accum = A // world  # ... of this process: each backward carries 1 / accum of the step's gradient
    check_w_range(student, config)  # the w range the student records is the one it is trained on
    empty = data.empty(device)  # ∅, the encoding of "" (1 row)
    # bf16 autocast on a GPU: the matmuls run in bf16, the student's weights and gradients stay
    # float32; on the CPU (the tests) everything is float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    # log.jsonl: one line per step (loss, gradient norm, speed, memory), from the first process
    log_file = checkpoint.open_log(os.path.join(out, "log.jsonl"), start) if rank == 0 else None
    bar = tqdm(range(start, args.steps), desc="stage 2: distilling", initial=start, total=args.steps,
               disable=rank != 0)
    # Stage 2: Alg. 1, one optimizer step per batch of --batch-size samples (the paper's 128)
    for step in bar:
        t0 = time.perf_counter()
        rows = global_rows(args.seed, step, args.batch_size, len(data))  # the step's samples, all processes
        total = torch.zeros((), device=device)
        # Alg. 1's loop body, micro-batch by micro-batch, gradients accumulating over the batch
        for rows_m, g, sync in micro_batches(no_sync, rows, step, args.seed, args.micro_batch, world, rank, device):
            x0, c = data.get(rows_m, device)  # line 3: x0, c ~ D (VAE latents and text, from the cache)
            u = empty.expand(len(rows_m))  # ∅ for every sample
            with sync, autocast:
                # lines 4-7: t ~ U[0, 1], w ~ U[w_min, w_max], eps ~ N(0, I); x_t = (1 - t) x0 + t eps
                x_t, t, w = sample_training_point(x0, config, g)
                # lines 8-11: the frozen teacher sampler's velocity (Eq. 2; with Eq. 3-4 for reflection)
                target = teacher_target(teacher_n, x_t, t, w, c, u, config, weak_n)
                # lines 12-13: the student's one pass with z^ (Eq. 7), || v_S(x_t, z^) - target ||^2
                loss = student_loss(net, x_t, t, w, c, u, target)
                (loss * (1 / accum)).backward()  # the step's gradient is the mean over its micro-batches
            total += loss.item()  # the mean loss of this micro-batch, before the 1 / accum scaling
        if world > 1:  # the logged loss is the mean over the whole batch, all processes
            dist.all_reduce(total)
        loss = total.item() / A
        # the gradient's norm is logged, not clipped (max_norm inf); a non-finite loss or gradient
        # stops the run before the update, an absurd update (--lr 1e30) before it is saved, so the
        # last checkpoint stays good; every process takes the same decision (the norms are global)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), math.inf)
        grad_norm = (grad_norm.full_tensor() if args.fsdp else grad_norm).item()  # FSDP: a DTensor
        problem = step_problem(step + 1, loss, grad_norm)
        if problem is None:
            before = weights_norm(student)
            opt.step()  # line 14: the AdamW update
            problem = step_problem(step + 1, loss, grad_norm, before, weights_norm(student))
        if problem:
            kept = f"the last good checkpoint in {out} is kept" if os.path.exists(ckpt_path) else "no checkpoint yet"
            raise SystemExit(f"error: {problem}, {kept}")
        # zeroed in place under DDP, so the gradients stay views of DDP's buckets (parallel.wrap)
        opt.zero_grad(set_to_none=net is student)
        if args.fsdp and args.fsdp_frozen == "shard":
            parallel.forget_frozen_passes((teacher, weak))
        # timing and logging: the teacher's and weak model's passes were counted and timed (Meter),
        # so the step's time splits into teacher and student, and model FLOPs give the MFU
        dt = time.perf_counter() - t0
        (rows_t, s_t), (rows_w, s_w) = teacher_n.take(), weak_n.take() if weak_n else (0, 0.0)
        student_s = dt - s_t - s_w  # the student's forward and backward, and the update
        rec = {"step": step + 1, "loss": loss, "grad_norm": grad_norm, "lr": args.lr, "s_per_step": dt,
               "samples_per_s": args.batch_size / dt, "teacher_s": s_t + s_w, "student_s": student_s,
               # model FLOPs per second of this process (GPU): MFU = these / the GPU's peak
               "model_tflops": (rows_t + rows_w + 3 * args.batch_size / world) * flops_row / dt / 1e12,
               "student_model_tflops": 3 * args.batch_size / world * flops_row / student_s / 1e12}
        if device.type == "cuda":
            rec["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            rec["mfu"] = rec["model_tflops"] / args.peak_tflops  # model FLOPs utilisation, whole step
            rec["student_mfu"] = rec["student_model_tflops"] / args.peak_tflops
        bar.set_postfix(loss=f"{loss:.4f}", lr=args.lr, samples_per_s=f"{rec['samples_per_s']:.2f}")
        done = step + 1
        if rank == 0:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
        # checkpoint (atomic: a run killed while saving keeps the previous one) and the student;
        # with --fsdp every process writes its shards, and the first reads the student whole from them
        if args.save_every and (done % args.save_every == 0 or done == args.steps):
            if args.fsdp:
                parallel.save(ckpt_path, student, opt, {"step": done, "config": run})
            elif rank == 0:
                checkpoint.save({"student": student.state_dict(), "optimizer": opt.state_dict(), "step": done,
                                 "config": run}, ckpt_path)
            if rank == 0:  # OUT/student: a diffusers-layout SD3 folder, with a record of how it was distilled
                whole = parallel.read_student(ckpt_path, student) if args.fsdp else student
                save_student(os.path.join(out, "student"), whole, model_dir, {
                    "student_kind": whole.kind, "teefusion_divisor": whole.divisor,
                    "w_range": list(whole.w_range), "w_rounding": whole.w_rounding,
                    "distill": dataclasses.asdict(config), "effective_guidance": effective_guidance(config),
                    "step": done})
        # previews: teacher sampler above, student below, same captions and noise; drawn by the first
        # process (with --fsdp the others run the sharded student's passes with it)
        if args.data is not None and args.preview_every and done % args.preview_every == 0 and (rank == 0 or args.fsdp):
            # the first captions of the data, the same noise every time, the student's own grid
            n = min(args.preview_count, len(data))
            x0, c = data.get(list(range(n)), device)
            noise = torch.randn(x0.shape, generator=torch.Generator(device).manual_seed(args.seed), device=device)
            ts = time_grid(args.sample_steps, args.shift, tau_last=shift(SD3_T_MIN, args.shift)).to(device)
            with autocast:
                preview(os.path.join(out, "previews", f"step_{done:06d}.png"), student, teacher, weak, vae, noise,
                        c, empty.expand(n), args.preview_w, ts, args.teacher, args.w_inv, args.w_weak)
    if log_file:
        log_file.close()
    log0(rank, f"done: {'checkpoint, student and ' if args.save_every else ''}log in {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
