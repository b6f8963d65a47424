"""Fig. 5b in small: how the students distilled from W2SD+CFG get better with distillation steps.
TeEFusion's and DistillCFG's weights are kept at the preset's `curve` steps while they train
(OUT/curve/step_N.pt), then each kept student is scored at the table's w like the final ones:
prompt accuracy, Fréchet distance and the RMS distance to its teacher's sample (same prompts and
noise). The paper's curve (SD3, HPS and loss) rises fast below 5k steps and is flat after about
10k; where the toy's flattens says how long its students must train."""

import copy
import os

from tinyteef import checkpoint

from . import plot
from .data import to_float, to_uint8
from .fast import compiled
from .methods import student_method

CURVE_STUDENTS = ("TeEFusion from W2SD+CFG", "DistillCFG from W2SD+CFG")


def path(out, step):
    return os.path.join(out, "curve", f"step_{step:06d}.pt")


def keep(out, step, steps, names, students):
    """After distillation step `step` (counted from 1): at one of `steps`, save the weights of the
    CURVE_STUDENTS among `names` / `students` (a no-op for the other stages)."""
    if step not in steps:
        return
    kept = {n: s.state_dict() for n, s in zip(names, students) if n in CURVE_STUDENTS}
    if kept:
        checkpoint.save(kept, path(out, step))


def measure(scorer, out, steps, students, mode, w, teacher_x):
    """Score each kept student of CURVE_STUDENTS at guidance w. students {name: guidance.Student}
    (the plain modules: a copy of each is loaded with every kept state, in place, so that its
    compiled form `mode` is made once); teacher_x: the W2SD+CFG teacher's samples (uint8), for the
    RMS distance. Returns {name: [(step, {"accuracy", "fd", "rms"}), ...]}; a step whose weights
    were not kept (a run cached before this stage existed) is left out."""
    result = {}
    for name in CURVE_STUDENTS:
        s = copy.deepcopy(students[name])
        fast, result[name] = compiled(s, mode), []
        for step in steps:
            if not os.path.exists(path(out, step)):
                continue
            s.load_state_dict(checkpoint.load(path(out, step))[name])
            row, x = scorer.score(student_method(fast, w), timing=False)
            rms = (to_float(to_uint8(x)) - to_float(teacher_x)).square().mean().sqrt().item()  # as the table's
            result[name].append((step, {"accuracy": row["accuracy"], "fd": row["fd"], "rms": rms}))
    return result


def section(out, curve, teacher):
    """The curve as a table and curve.png (Fréchet distance, prompt accuracy, RMS to the teacher's
    sample against steps; the teacher's values dashed). teacher: the W2SD+CFG row. Returns (title, lines)."""
    lines = ["TeEFusion and DistillCFG from W2SD+CFG, kept at these distillation steps and scored at the table's w "
             "on the same prompts and noise (the paper's Fig. 5b: SD3 flattens after about 10k steps).", "",
             "| step | " + " | ".join(f"{n}: accuracy | FD | RMS to teacher" for n in curve) + " |",
             "|---|" + "---|---|---|" * len(curve)]
    steps = sorted({step for points in curve.values() for step, _ in points})
    for step in steps:
        cells = []
        for points in curve.values():
            r = dict(points).get(step)
            cells.append("— | — | —" if r is None
                         else f"{100 * r['accuracy']:.1f}% | {r['fd']:.3f} | {r['rms']:.3f}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    panels = [plot.line_panel({n: ([p[0] for p in pts], [p[1][k] * scale for p in pts]) for n, pts in curve.items()},
                              title, "distillation step", unit, hlines=hline)
              for k, scale, title, unit, hline in (
                  ("fd", 1, "Fréchet distance", "FD", {"W2SD+CFG teacher": teacher["fd"]}),
                  ("accuracy", 100, "prompt accuracy", "%", {"W2SD+CFG teacher": 100 * teacher["accuracy"]}),
                  ("rms", 1, "RMS to the teacher's sample", "RMS", None))]
    plot.save_panels(panels, os.path.join(out, "curve.png"), 3)
    return "Distillation curve (Fig. 5b in small)", lines + ["", "![distillation curve](curve.png)"]
