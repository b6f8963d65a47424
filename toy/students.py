"""Stage 4 of the toy run: Alg. 1, the students distilled from the frozen teacher, one stage per
teacher sampler and p(t) (toy/methods.py's STAGES), each cached in OUT/students_STAGE.pt and
resumable. The stages are independent (each reads the teacher, none another stage), so with several
workers (GPUs) `spread` trains them at once, one `train_toy.py --only-students STAGE` process each."""

import copy
import os

import torch
from tqdm.auto import tqdm

from tinyteef import checkpoint
from tinyteef.distill import check_w_range, sample_training_point, student_loss, teacher_target
from tinyteef.guidance import DistillCFG, Student

from . import curve, workers
from . import data as toydata
from .fast import adamw, compiled
from .methods import STAGES, STUDENTS, distill_config
from .scoring import autocast


def result_path(out, stage):
    """Where a finished stage's students are cached."""
    return os.path.join(out, f"students_{stage}.pt")


def stage_students(data, P, device, out, seed, teacher, weak, text, bank, stage, mode):
    """Alg. 1 for one stage of toy/methods.py's STAGES (a teacher sampler and p(t)): every student
    of STUDENTS in it, trained on the same targets (one teacher target per batch, several students).
    `mode`: toy/fast.py's compile mode, for the frozen teacher and weak model and the students.
    Returns ({name: Student}, their loss curves {name: [(step, loss)]})."""
    names = [n for n, spec in STUDENTS.items() if spec.stage == stage]
    fast_teacher, fast_weak = compiled(teacher, mode), compiled(weak, mode)  # for the targets
    torch.manual_seed(seed)  # DistillCFG's H starts the same whichever stages ran before
    # one AdamW per student; all of them read the teacher's target of the same batch, which is
    # computed once (a W2SD+CFG target costs 6 teacher passes per sample)
    students = []
    for n in names:  # Alg. 1 line 1: each student starts as a copy of the teacher
        spec = STUDENTS[n]
        H = DistillCFG(teacher.config.hidden_size).to(device) if spec.kind == "distillcfg" else None
        students.append(Student(copy.deepcopy(teacher).requires_grad_(True).train(), spec.kind, H,
                                P.teefusion_divisor if spec.divisor is None else spec.divisor, (P.w_min, P.w_max)))
    path, partial = result_path(out, stage), os.path.join(out, f"students_{stage}.partial.pt")
    opts = [adamw(s.parameters(), P.distill_lr, fused=mode != "off") for s in students]
    fast_students = [compiled(s, mode) for s in students]
    if not os.path.exists(path):
        config = distill_config(P, STAGES[stage].teacher, STAGES[stage].t_dist)
        for s in students:
            check_w_range(s, config)
        g = torch.Generator(device).manual_seed(seed + 2)  # every draw of this stage: data, t, w, noise
        state = {"step": 0, "losses": []}
        if os.path.exists(partial):  # resume: weights, optimizers, the generator and the curve
            state = checkpoint.load(partial)
            for s, o, st in zip(students, opts, state["students"]):
                s.load_state_dict(st["student"])  # the model and, for DistillCFG, H
                o.load_state_dict(st["opt"])
            g.set_state(state["rng"].to(torch.uint8))
        x_all, y_all = data.train_x.to(device), data.train_y.to(device)
        with torch.no_grad():
            u = text(bank.empty).expand(P.distill_batch)  # ∅, the empty prompt's encoding, per sample
        bar = tqdm(range(state["step"], P.distill_steps), desc=f"students ({stage})", initial=state["step"],
                   total=P.distill_steps)
        for step in bar:
            # Alg. 1 line 3: x0, c ~ D (an image and a prompt naming its class or attributes)
            rows = toydata.random_rows(g, len(x_all), P.distill_batch)
            with torch.no_grad():
                c = text(bank.sample(y_all[rows], g))
            with autocast(device):
                # lines 4-7: t ~ p(t), w ~ U[w_min, w_max], eps ~ N(0, I); x_t = (1 - t) x0 + t eps
                x_t, t, w = sample_training_point(toydata.to_float(x_all[rows]), config, g)
                # lines 8-11: the teacher sampler's velocity at (x_t, t, w), once for all its students
                target = teacher_target(fast_teacher, x_t, t, w, c, u, config, fast_weak)
                losses = []
                for s, o in zip(fast_students, opts):
                    # lines 12-13: the student's one pass with z^ (Eq. 7 or a baseline's), MSE
                    loss = student_loss(s, x_t, t, w, c, u, target)
                    loss.backward()
                    o.step()  # line 14: the update (the students are independent: each as it is ready)
                    o.zero_grad(set_to_none=True)
                    losses.append(loss.detach())
                losses = [v.item() for v in losses]  # one wait for the GPU per step, not one per student
            curve.keep(out, step + 1, P.curve, names, students)  # Fig. 5b: weights at the curve's steps
            if step % 10 == 0:
                state["losses"].append((step, *losses))
                bar.set_postfix(loss=" ".join(f"{v:.4f}" for v in losses))
            if (step + 1) % P.save_every == 0 and step + 1 < P.distill_steps:
                checkpoint.save({"step": step + 1, "losses": state["losses"], "rng": g.get_state(), "students": [
                    {"student": s.state_dict(), "opt": o.state_dict()} for s, o in zip(students, opts)]}, partial)
        checkpoint.save({"losses": state["losses"], "students": [s.state_dict() for s in students]}, path)
        if os.path.exists(partial):
            os.remove(partial)
    result = checkpoint.load(path)
    for s, st in zip(students, result["students"]):
        s.load_state_dict(st)
        s.requires_grad_(False).eval()
    curves = {n: [(row[0], row[1 + k]) for row in result["losses"]] for k, n in enumerate(names)}
    return dict(zip(names, students)), curves


def spread(script, argv, out, n, device_type):
    """Train the stages not yet cached in `out` at once, in `n` processes on `device_type` (one per
    GPU, see toy/workers.py), each `script` (train_toy.py) with the coordinator's flags `argv` and
    --only-students STAGE; the stage with the most students first, so that it does not start last.
    The run then loads them from the cache as if it had trained them. Raises SystemExit naming a
    failed process (the stages that finished stay cached)."""
    todo = [s for s in STAGES if not os.path.exists(result_path(out, s))]
    todo.sort(key=lambda s: -sum(spec.stage == s for spec in STUDENTS.values()))
    try:
        workers.run_all([workers.command(script, [*argv, "--only-students", s]) for s in todo],
                        workers.slots(device_type, n))
    except RuntimeError as e:
        raise SystemExit(f"error: {e}")
