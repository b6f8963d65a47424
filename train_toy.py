"""The toy world: TeEFusion end to end, in small, on one GPU in minutes.

    python train_toy.py                                    # CIFAR-10 (downloaded on first use)
    python train_toy.py --data shapes                      # generated in code, needs nothing
    python train_toy.py --data fashion-mnist --data-root /usr/share/datasets/fashion-mnist
    python train_toy.py --preset smoke --device cpu        # every stage, tiny, in about 35 s on 2 cores
    python train_toy.py --compile off                      # the eager path on a GPU (default: graphs)

Stages, each cached in --out and skipped when its result is there (a stopped run resumes):
  1. evaluator  a classifier of the real data: prompt accuracy and Fréchet distance of samples
  2. teacher    an MMDiT and a tiny text encoder trained by flow matching with 10% empty prompts,
                with EMA; the text encoder is frozen after 40% of the steps and the EMA at 60% is
                kept as W2SD's weak model (the toy's stand-in for the paper's CHATS pair)
  3. samplers   the teacher's samplers scored: Euler, Euler+CFG, naive Eq. 5, Z-Sampling+CFG, W2SD+CFG
  4. students   Alg. 1 (toy/students.py): TeEFusion from each guided sampler; DistillCFG, the G(psi(w))
                ablation and TeEFusion with logit-normal t from W2SD+CFG; Euler+CFG at Z-Sampling's
                effective w. With several GPUs (--workers) its stages train at once, one process each
  5. schedule   a linear guidance ramp against the constant w, teachers and students, equal cost
  6. negative   negative prompts: how often an attribute the negative prompt names still appears
  7. fidelity   each student's velocity error against its teacher's target over a (w, t) grid; the
                distillation curve (Fig. 5b); what each student adds to z over w (Fig. 6)
  8. report     report.md and PNGs: Tables 1/3/4 and Figs. 4, 5a, 5b, 6 in small, colour across w,
                fidelity maps, loss curves and the seconds of every stage
With several seeds (--seeds; the full preset's default is 0 1 2) each runs all of it in OUT/seed-S.
"""

import argparse
import copy
import dataclasses
import os
import time

import torch
import torch.nn.functional as F_
from tqdm.auto import tqdm

from tinyteef import checkpoint
from tinyteef.flow import interpolate, sample_t_logit_normal, velocity_target
from tinyteef.mmdit import MMDiT
from tinyteef.schedules import Ramp
from toy import data as toydata
from toy import curve, embedding, fidelity, negative, seeds, workers
from toy.colour import colour_stats
from toy.evaluator import Evaluator, train_evaluator
from toy.fast import COMPILE_MODES, adamw, compiled, cpu_threads
from toy.report import (colour_section, curve_section, fidelity_section, run_facts, schedule_section,
                        write_report)
from toy.methods import (PAIRS, STAGES, STUDENTS, SWEEP, distill_config, matched_rows, method_at, row_guidance,
                         student_method, teacher_methods)
from toy.presets import PRESETS, mmdit_config
from toy.scoring import Scorer, autocast, score, stage_sweep
from toy.staging import Clock, check_run, record_run, staged
from toy.students import spread as students_spread
from toy.students import stage_students
from toy.text import PromptBank, TextEncoder, Tokenizer


def parse_args(argv=None):
    """The flags: the dataset, the preset (sizes and steps), the output folder, the device and the
    seed. The method's settings (w range, p(t), sampling grid) are the preset's, from the paper."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=toydata.DATASETS, default="cifar10",
                   help="dataset (default cifar10, downloaded; offline: shapes or fashion-mnist)")
    p.add_argument("--data-root", default=None, help="folder of the dataset's files (default: per dataset)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="sizes and steps (default: full on a GPU, smoke on a CPU)")
    p.add_argument("--out", default=None, help="output folder (default runs/toy-DATA-PRESET)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=None,
                   help="one seed, the run in --out (default: the preset's seeds: 0 for smoke, quick; 0 1 2 for full)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="several seeds, each the whole run in OUT/seed-S, and OUT/report.md over them (means with "
                        "95%% intervals, paired comparisons); replaces --seed")
    p.add_argument("--workers", type=int, default=None,
                   help="processes at once, one per GPU: the seeds of --seeds, or else the student stages of the "
                        "run (default: one per visible GPU; 1 on a CPU)")
    p.add_argument("--only-students", choices=STAGES, default=None,
                   help="train only this stage's students into --out (after its evaluator and teacher, trained "
                        "first if not there) and stop; a run starts one such process per stage itself when --workers "
                        "is above 1")
    p.add_argument("--compile", choices=COMPILE_MODES, default=None,
                   help="the fast path (toy/fast.py): off = eager; fuse = torch.compile; graphs = also CUDA "
                        "graphs, each fixed-shape call recorded once and replayed (default: graphs on a GPU, off "
                        "on a CPU)")
    p.add_argument("--teefusion-divisor", type=float, default=None,
                   help="divide Eq. 7's term by this (default 1, the paper's Eq. 7; the authors' SD3 code: 256)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# helpers


def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter. The teacher is the EMA of
    the trained weights (as SD3's and DiT's released models are): smoother samples at equal steps."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


# ---------------------------------------------------------------------------------------------
# stage 1: the evaluator


def stage_evaluator(data, P, device, out, seed):
    """Stage 1: a classifier of the real images (OUT/evaluator.pt), whose predictions give prompt
    accuracy and whose features give the Fréchet distance. Returns (model, its record)."""
    def compute():
        model, acc = train_evaluator(data, steps=P.eval_steps, batch_size=P.eval_batch, device=device, seed=seed,
                                     width=P.eval_width)
        return {"state": model.state_dict(), "accuracy": acc["accuracy"],
                "per_attribute": acc["accuracy_per_attribute"], "losses": acc["losses"]}
    result = staged(os.path.join(out, "evaluator.pt"), compute)
    model = Evaluator(data.channels, data.classes, P.eval_width).to(device).eval()
    model.load_state_dict(result["state"])
    return model, result


# ---------------------------------------------------------------------------------------------
# stage 2: the teacher (flow matching), with its text encoder and W2SD's weak snapshot


def teacher_loss(model, text, x0, ids, g):
    """Flow matching: || v(x_t, t, c) - (eps - x0) ||^2 with SD3's logit-normal t. This trains the
    toy's teacher (SD3's pre-training, in small); Alg. 1's own t ~ U[0, 1] is the students'."""
    c = text(ids)
    t = sample_t_logit_normal(x0.shape[0], generator=g, device=x0.device)
    eps = torch.randn(x0.shape, generator=g, device=x0.device)
    return F_.mse_loss(model(interpolate(x0, eps, t), t, c.tokens, c.pooled).float(), velocity_target(x0, eps))


def stage_teacher(data, P, device, out, seed, mode):
    """Stage 2: the teacher, an MMDiT trained by flow matching with its tiny text encoder, with EMA;
    the EMA at 60% of the steps is kept as W2SD's weak model. Resumable (OUT/teacher.partial.pt).
    `mode`: toy/fast.py's compile mode.
    Returns (EMA teacher, weak model, text encoder, tokenizer, loss curve)."""
    path, partial = os.path.join(out, "teacher.pt"), os.path.join(out, "teacher.partial.pt")
    torch.manual_seed(seed)  # the same initial weights whichever stages ran before in this process
    # SD3's pieces in small: a word tokenizer and a 2-layer text encoder that give token states and a
    # pooled vector (SD3's three encoders give both), and SD3's MMDiT at the preset's size
    tokenizer = Tokenizer(data.vocabulary(), P.text_len)
    model, text = MMDiT(mmdit_config(data, P)).to(device), TextEncoder(
        len(tokenizer), P.text_len, P.text_width, P.text_layers, pooled_dim=P.text_width).to(device)
    ema, weak = copy.deepcopy(model), copy.deepcopy(model)
    if not os.path.exists(path):
        opt = adamw([*model.parameters(), *text.parameters()], P.lr, fused=mode != "off")
        # the nets as the loop calls them (toy/fast.py); `model` and `text` are what is saved
        net, fast_text = compiled(model, mode), compiled(text, mode)
        g = torch.Generator(device).manual_seed(seed)  # every draw of this stage: data, prompts, t, noise
        state = {"step": 0, "losses": []}
        if os.path.exists(partial):  # resume: weights, EMA, weak snapshot, optimizer and the generator
            state = checkpoint.load(partial)
            for m, k in ((model, "model"), (text, "text"), (ema, "ema"), (weak, "weak"), (opt, "opt")):
                m.load_state_dict(state[k])
            g.set_state(state["rng"].to(torch.uint8))
        bank, x_all, y_all = PromptBank(data, tokenizer, device), data.train_x.to(device), data.train_y.to(device)
        # the text encoder trains with the MMDiT for 40% of the steps, then is frozen (SD3's encoders
        # are pre-trained and frozen); W2SD's weak model is the EMA at 60%
        freeze, snapshot = int(0.4 * P.teacher_steps), int(0.6 * P.teacher_steps)
        bar = tqdm(range(state["step"], P.teacher_steps), desc="teacher", initial=state["step"],
                   total=P.teacher_steps)
        for step in bar:
            text.requires_grad_(step < freeze)  # frozen from here on, like SD3's encoders
            rows = toydata.random_rows(g, len(x_all), P.batch)
            ids = bank.sample(y_all[rows], g)
            drop = torch.rand(P.batch, generator=g, device=device) < P.drop
            ids = torch.where(drop[:, None], bank.empty, ids)  # 10% empty prompts teach v(∅)
            with autocast(device):
                loss = teacher_loss(net, fast_text, toydata.to_float(x_all[rows]), ids, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(ema, model, min(P.ema, (1 + step) / (10 + step)))  # decay warms up to P.ema
            if step + 1 == snapshot:  # the weak model: the same network, less trained
                weak.load_state_dict(ema.state_dict())
            if step % 10 == 0:
                state["losses"].append((step, loss.item()))
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % P.save_every == 0 and step + 1 < P.teacher_steps:
                checkpoint.save({"step": step + 1, "losses": state["losses"], "model": model.state_dict(),
                                 "text": text.state_dict(), "ema": ema.state_dict(), "weak": weak.state_dict(),
                                 "opt": opt.state_dict(), "rng": g.get_state()}, partial)
        checkpoint.save({"ema": ema.state_dict(), "weak": weak.state_dict(), "text": text.state_dict(),
                         "losses": state["losses"]}, path)
        if os.path.exists(partial):
            os.remove(partial)
    result = checkpoint.load(path)
    for m, k in ((ema, "ema"), (weak, "weak"), (text, "text")):
        m.load_state_dict(result[k])
        m.requires_grad_(False).eval()
    return ema, weak, text, tokenizer, result["losses"]


def main(argv=None):
    """The whole toy experiment: stages 1-8 in order, each cached in --out (see the docstring)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    # the preset: sizes and steps (toy/presets.py); the method's settings are the paper's
    args.preset = args.preset or ("full" if device.type == "cuda" else "smoke")
    P = PRESETS[args.preset]
    if args.teefusion_divisor is not None:
        P = dataclasses.replace(P, teefusion_divisor=args.teefusion_divisor)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no GPU; use --device cpu (and --preset smoke)")
    mode = args.compile or ("graphs" if device.type == "cuda" else "off")  # not part of the run: rounding only
    # the run's folder and what defines the run (toy/staging.py's check_run)
    out = args.out or os.path.join("runs", f"toy-{args.data}-{args.preset}")
    if args.seeds and (args.seed is not None or args.only_students):
        raise SystemExit("error: --seeds runs several seeds whole; give it without --seed and --only-students")
    if args.seed is None and args.seeds is None and len(P.seeds) > 1:
        args.seeds = list(P.seeds)
    if args.seeds:  # several seeds: each its own run in OUT/seed-S (toy/seeds.py), then one report
        return seeds.run(os.path.abspath(__file__), args, mode, out)
    args.seed = P.seeds[0] if args.seed is None else args.seed
    preset = {k: v for k, v in dataclasses.asdict(P).items() if k != "seeds"}  # which seeds is not this run's
    run = {"data": args.data, "preset": preset, "seed": args.seed,  # --data-root only when given:
           **({"data_root": os.path.abspath(args.data_root)} if args.data_root else {})}  # older runs stay valid
    check_run(out, run)
    torch.manual_seed(args.seed)
    started = time.time()
    # the dataset: images and the prompts that describe them (class names, or shapes' attributes)
    try:
        data = toydata.load(args.data, root=args.data_root, seed=args.seed, limit=P.limit)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    first = record_run(out, run, started)  # only once the data is there: a failed start leaves nothing
    clock = Clock(None if args.only_students else out)  # each stage's seconds, for the report's timing table
    # stages 1 and 2: the evaluator, then the teacher with its text encoder and W2SD's weak model
    with clock.stage("1 evaluator"):
        evaluator, ev = stage_evaluator(data, P, device, out, args.seed)
    with clock.stage("2 teacher"):
        teacher, weak, text, tokenizer, teacher_losses = stage_teacher(data, P, device, out, args.seed, mode)
    if args.only_students:  # one stage of stage 4 in a process of its own (toy/students.py's spread)
        stage_students(data, P, device, out, args.seed, teacher, weak, text, PromptBank(data, tokenizer, device),
                       args.only_students, mode)
        return
    if workers.count(args) > 1:  # stage 4's stages at once, one process per worker; cached for the loop below
        with clock.stage("4 students, at once in processes of their own"):
            students_spread(os.path.abspath(__file__), [*workers.flags(args, mode), "--seed", str(args.seed), "--out",
                            out], out, workers.count(args), device.type)
    # the frozen nets as every later stage calls them (compiled on the fast path); the plain modules
    # stay for copying into students and for saving
    fast_teacher, fast_weak = compiled(teacher, mode), compiled(weak, mode)
    # every method is scored on the same held-out prompts and noise, so rows compare like with like
    bank = PromptBank(data, tokenizer, device)
    scorer = Scorer(data, P, device, evaluator, text, bank, args.seed)
    # an evaluator cached before it kept its loss curve has none to draw
    curves = {"evaluator (cross-entropy)": {"evaluator": ev.get("losses", [])},
              "teacher (flow matching)": {"teacher": teacher_losses}}

    # stage 3: the teacher's samplers at the table's w
    with clock.stage("3 samplers"):
        table = {name: score(scorer, out, name, m)
                 for name, m in teacher_methods(fast_teacher, fast_weak, P.w).items()}

    # stage 4: Alg. 1 from each guided sampler (and W2SD+CFG with SD3's p(t)), then each student
    # scored beside the row it imitates, and Euler+CFG at the effective guidance of the others
    plain, students = {}, {}
    for stage, spec in STAGES.items():
        label = spec.imitates.removeprefix("Teacher ") + (f", t {spec.t_dist}" if spec.t_dist else "")
        with clock.stage(f"4 students from {label}"):
            found, curves[f"students from {label} (Alg. 1)"] = stage_students(
                data, P, device, out, args.seed, teacher, weak, text, bank, stage, mode)
        plain.update(found)
        students.update({name: compiled(s, mode) for name, s in found.items()})
    with clock.stage("4 students scored"):
        for name, s in students.items():
            table[name] = score(scorer, out, name, student_method(s, P.w), table[STUDENTS[name].imitates]["x"])
        for name, (row, w_eff, matches) in matched_rows(P).items():
            table[name] = {**score(scorer, out, name, method_at(row, students, fast_teacher, fast_weak)(w_eff)),
                           "matches": matches}
    for name, r in table.items():  # what each row amounts to, to first order in the step
        r["guidance"] = row_guidance(name, P)

    # the w sweep (Fig. 5a, Fig. 4): the W2SD+CFG teacher and three of its students, at every w of
    # the preset's sweep over the paper's range [2, 14]: does the student still respond to w?
    sweep_methods = {label: method_at(name, students, fast_teacher, fast_weak) for label, name in SWEEP.items()}
    with clock.stage("w sweep"):
        sweep = stage_sweep(scorer, P, out, sweep_methods)

    # stage 5: a ramp from w_min (noise) to 2 w - w_min (data), mean w, against the constant w, at
    # equal cost (beyond the paper: does a schedule help the teachers and their students alike?)
    ramp = Ramp(P.w_min, 2 * P.w - P.w_min)
    ramp_name = f"w ramp {ramp.w_start:g} → {ramp.w_end:g}"
    pairs = {name: method_at(name, students, fast_teacher, fast_weak) for name in PAIRS}
    with clock.stage("5 schedule"):
        schedule = {name: {"constant": table[name],
                           "schedule": score(scorer, out, f"{name}, {ramp_name}", make(ramp), timing=False)}
                    for name, make in pairs.items()}
    # stage 6: negative prompts, on the same samplers at the table's w: the students were distilled
    # with ∅ only, so this measures what they do with a prompt in ∅'s place
    with clock.stage("6 negative"):
        negated = staged(os.path.join(out, "negative.pt"),
                         lambda: negative.measure(scorer, {name: make(P.w) for name, make in pairs.items()}))
    # stage 7: each student's error against its teacher's target over (w, t), on held-out images:
    # the distillation loss of Alg. 1 evaluated on a grid, inside and outside the trained w range
    with clock.stage("7 fidelity"):
        fid = staged(os.path.join(out, "fidelity.pt"), lambda: fidelity.measure(
            {name: (s, STUDENTS[name].teacher) for name, s in students.items()}, fast_teacher, fast_weak, text,
            bank, data, {kind: distill_config(P, kind) for kind in ("cfg", "zsampling", "w2sd")},
            min(P.distill_batch // 2, 64), device, args.seed + 3))
    # the distillation curve (Fig. 5b): TeEFusion and DistillCFG from W2SD+CFG as they were at the
    # preset's curve steps, scored like the final students
    with clock.stage("distillation curve"):
        fig5b = staged(os.path.join(out, "curve.pt"), lambda: curve.measure(
            scorer, out, P.curve, plain, mode, P.w, table["Teacher W2SD+CFG"]["x"]))
    # Fig. 6 and the appendix's cosines in small: what each W2SD+CFG student adds to z, over w
    with clock.stage("embedding"):
        emb = staged(os.path.join(out, "embedding.pt"), lambda: embedding.measure(
            {name: students[name] for name in embedding.FIG6_STUDENTS}, scorer, n=64, teacher=fast_teacher,
            n_images=min(16, P.n_eval // 16)))

    # stage 8: the report: the main table, the sweep, the other sections and figures, the run's facts
    sections = [schedule_section(schedule, ramp, P.w), negative.section(negated, data.attributes, P.w),
                fidelity_section(out, fid, (P.w_min, P.w_max)), embedding.section(out, emb),
                colour_section(out, sweep["rows"], list(sweep_methods), colour_stats(data.test_x)),
                curve_section(out, curves)]
    sections += [curve.section(out, fig5b, table["Teacher W2SD+CFG"])] if any(fig5b.values()) else []
    sections += [clock.section()]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    info = run_facts(args.data, args.preset, P, device_name, ev["accuracy"], teacher, table,
                     time.time() - started, time.time() - first)
    write_report(out, info, table, {"methods": list(sweep_methods), "rows": sweep["rows"]},
                 list(sweep_methods), list(P.sweep), sections)
    seeds.save_table(out, table)
    print(f"done: report and images in {os.path.abspath(out)}")


if __name__ == "__main__":
    cpu_threads()  # one torch thread on a machine of 2 cores (toy/fast.py says why)
    main()
