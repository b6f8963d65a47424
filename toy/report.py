"""What the toy run shows a reader: PNG grids of samples and report.md with the paper's tables in
small (Tables 1/3/4: cost, prompt accuracy, Fréchet distance; Fig. 5a: a sweep over w; Fig. 4: a
grid of samples, rows w, columns methods), and the sections and figures a user compares a run
with: a guidance schedule against the constant w, negative prompts, the student's velocity error
over (w, t), colour statistics across w, and the loss curves of every training stage."""

import os

import torch
from torchvision.utils import make_grid, save_image

from tinyteef.checkpoint import atomic_write

from . import plot
from .data import to_uint8


def save_grid(images, path, nrow=8):
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid."""
    save_image(to_uint8(images.cpu()).float() / 255, path, nrow=nrow, padding=1, pad_value=0.5)


def save_w_grid(rows, path):
    """Fig. 4 in small: rows {w: {method: images (k, C, H, W)}} -> one PNG, a row per w, the
    methods side by side (k images each, the same prompts and noise everywhere)."""
    lines = []
    for by_method in rows.values():
        blocks = [make_grid(to_uint8(x.cpu()).float() / 255, nrow=len(x), padding=1, pad_value=0.5)
                  for x in by_method.values()]
        gap = torch.ones(blocks[0].shape[0], blocks[0].shape[1], 4)  # white gap between methods
        lines.append(torch.cat([b if i == 0 else torch.cat([gap, b], dim=2) for i, b in enumerate(blocks)], dim=2))
    save_image(torch.cat(lines, dim=1), path)  # (C, H', W') in [0, 1]


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def schedule_section(rows, ramp, w):
    """A guidance schedule against the constant w, per sampler, at equal cost: the ramp changes w,
    not the passes per step. rows {sampler: {"constant": scored row, "schedule": scored row}};
    ramp: the schedules.Ramp used. Returns (title, lines)."""
    lines = [f"w ramps linearly in t from {ramp.w_start:g} at t = 1 (noise) to {ramp.w_end:g} at t = 0 "
             f"(mean {w:g} over t, inside the students' trained range), against w = {w:g} on every step; "
             "same prompts and noise, same passes per step.", "",
             "| sampler | passes / step (constant / ramp) | constant: prompt accuracy | FD | ramp: prompt accuracy "
             "| FD |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        a, b = r["constant"], r["schedule"]
        lines.append(f"| {name} | {a['passes']:.3g} / {b['passes']:.3g} | {100 * a['accuracy']:.1f}% | "
                     f"{a['fd']:.3f} | {100 * b['accuracy']:.1f}% | {b['fd']:.3f} |")
    return f"Guidance schedule against the constant w = {w:g}, at equal cost", lines


def fidelity_section(out, fidelity, w_range):
    """The velocity-error heat maps (fidelity.png: one panel per student on one log colour scale,
    the trained w range boxed in white) and their mean over t per w as a table. Returns (title, lines)."""
    ws, ts, errors = fidelity["ws"], fidelity["ts"], fidelity["errors"]
    lo, hi = plot.finite_range([v for grid in errors.values() for row in grid for v in row], log=True)
    inside = [j for j, w in enumerate(ws) if w_range[0] <= w <= w_range[1]]
    box = (inside[0], inside[-1]) if inside else None
    panels = [plot.heatmap_panel(grid, ws, ts, name, "w", "t", lo, hi, outline=box)
              for name, grid in errors.items()]
    plot.save_panels(panels + [plot.colour_bar(lo, hi, True, "MSE")], os.path.join(out, "fidelity.png"), 4)
    lines = ["Mean squared error between each student's one-pass velocity and its teacher sampler's target "
             "(`distill.teacher_target`, the code Alg. 1 trains with), on fixed held-out images, prompts and "
             f"noise, for w (columns) and t (rows). Inside the white box, the trained range w in "
             f"[{w_range[0]:g}, {w_range[1]:g}], a cell is the distillation loss at that point; outside it "
             "the student was never trained. Errors are absolute and the target's size grows with w, so compare a "
             "column with the same column of another run. Mean over t:", "",
             "| student | " + " | ".join(f"w = {w:g}" for w in ws) + " |", "|---|" + "---|" * len(ws)]
    for name, grid in errors.items():
        means = [sum(row[j] for row in grid) / len(ts) for j in range(len(ws))]
        lines.append(f"| {name} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    lines += ["", "![velocity error over (w, t)](fidelity.png)"]
    return "Fidelity: each student's velocity error against its teacher's target", lines


def colour_section(out, rows, methods, real):
    """Colour statistics across w (colour_w.png: saturation, and the mean and std over channels,
    against w, the real data dashed) and the table of per-channel values. rows {w: {method: scored
    row with "colour"}}; real: the held-out data's statistics (colour.colour_stats). Returns (title, lines)."""
    def row(name, w, st):
        sat = "—" if st["saturation"] is None else f"{st['saturation']:.3f}"
        return (f"| {w} | {name} | {sat} | {', '.join(f'{v:.3f}' for v in st['mean'])} | "
                f"{', '.join(f'{v:.3f}' for v in st['std'])} |")
    lines = ["Samples of the w sweep on a [0, 1] scale: mean HSV saturation, and per-channel mean and "
             "standard deviation over all pixels, against the held-out real images. A student that "
             "over-saturates has a higher saturation than its teacher at the same w.", "",
             "| w | samples | saturation | mean per channel | std per channel |", "|---|---|---|---|---|",
             row("real data (held out)", "—", real)]
    lines += [row(m, f"{w:g}", by[m]["colour"]) for w, by in rows.items() for m in methods if "colour" in by[m]]
    stats = {"saturation": lambda st: st["saturation"],
             "mean over channels": lambda st: sum(st["mean"]) / len(st["mean"]),
             "std over channels": lambda st: sum(st["std"]) / len(st["std"])}
    panels = []
    for title, get in stats.items():
        if get(real) is None:  # grayscale data: no saturation
            continue
        series = {m: (list(rows), [get(by[m]["colour"]) for by in rows.values()]) for m in methods
                  if all("colour" in by[m] for by in rows.values())}  # a sweep cached before it kept them: none
        panels.append(plot.line_panel(series, title, "w", title, hlines={"real data": get(real)}))
    plot.save_panels(panels, os.path.join(out, "colour_w.png"), 3)
    return "Colour across w", lines + ["", "![colour statistics across w](colour_w.png)"]


def curve_section(out, curves):
    """The loss curves of every training stage (losses.png, one panel per stage, log scale) and a
    table of where each began and ended. curves {stage: {curve: [(step, loss), ...]}}. Returns (title, lines)."""
    lines = ["Training losses logged every 10 steps (one batch each, so noisy). Compare a run with these: "
             "a curve that does not fall, or ends far above, points at a problem.", "",
             "| stage | curve | first logged loss | mean of the last tenth of the logged losses |", "|---|---|---|---|"]
    panels = []
    for stage, by_name in curves.items():
        series = {name: ([p[0] for p in pts], [p[1] for p in pts]) for name, pts in by_name.items() if pts}
        if not series:  # a stage cached by an older version, before it kept its losses
            continue
        panels.append(plot.line_panel(series, stage, "step", "loss", log_y=True))
        for name, (_, ys) in series.items():
            tail = ys[-max(len(ys) // 10, 1):]
            lines.append(f"| {stage} | {name} | {ys[0]:.4f} | {sum(tail) / len(tail):.4f} |")
    if panels:
        plot.save_panels(panels, os.path.join(out, "losses.png"), 3)
        lines += ["", "![loss curves](losses.png)"]
    return "Loss curves of every training stage", lines


def run_facts(data, preset, P, device_name, accuracy, teacher, table, invocation_s, total_s):
    """The run's facts for report.md's head: device, evaluator accuracy, the sizes and steps of the
    teacher, students and sampling, the wall time, and the student's speed against its teacher."""
    w2sd_ms, student_ms = table["Teacher W2SD+CFG"]["ms"], table["TeEFusion from W2SD+CFG"]["ms"]
    return {"data": data, "preset": preset, "w": P.w, "facts": {
        "device": device_name,
        "evaluator held-out accuracy (all attributes)": f"{100 * accuracy:.1f}%",
        "teacher": f"MMDiT {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f} M parameters, "
                   f"{P.layers} blocks of width {P.width}, {P.teacher_steps} steps at batch {P.batch}",
        "students": f"{P.distill_steps} steps at batch {P.distill_batch}, AdamW lr {P.distill_lr}, "
                    f"w ~ U[{P.w_min}, {P.w_max}], t ~ {P.t_dist}",
        "sampling": f"{P.sample_steps} Euler steps, shift 1; scores over {P.n_eval} images "
                    f"(sweep: {max(P.n_eval // 2, 8)}); ms / image at batch {min(P.time_batch, P.n_eval)}",
        "wall time": f"{invocation_s:.0f} s this invocation, {total_s:.0f} s "
                     "since the first began (with any pause between invocations)"},
        "speed_line": f"Student (TeEFusion from W2SD+CFG) vs its W2SD+CFG teacher, same device and batch: "
                      f"{w2sd_ms / student_ms:.2f}x faster in wall time."}


def write_report(out, info, table, sweep, grid_methods, grid_ws, sections=()):
    """report.md in `out`: run facts, the main table, the w sweep, the extra `sections` (pairs of a
    title and its lines), and links to the grids."""
    lines = [f"# Toy run: {info['data']}, preset {info['preset']}", ""]
    lines += [f"- {k}: {v}" for k, v in info["facts"].items()]
    lines += ["", f"## Samplers and students at w = {info['w']} (paper's convention)", "",
              "| method | effective guidance (first order) | forward passes / step (made) | nominal | ms / image | "
              "prompt accuracy | Fréchet distance | RMS to its teacher's sample |", "|---" * 8 + "|"]
    for name, r in table.items():
        lines.append(f"| {name} | {r.get('guidance', '—')} | {r['passes']:.3g} | {r['nominal']:.3g} | "
                     f"{r['ms']:.3f} | {100 * r['accuracy']:.1f}% | {r['fd']:.3f} | {_fmt(r.get('rms'), '.3f')} |")
    lines += ["", info["speed_line"], "",
              "Effective guidance: what a step of the sampler (and a student distilled from it) amounts to, "
              "to first order in the step size (tinyteef/distill.py derives it): a reflection step is "
              "2 v_strong - v_inversion, so Z-Sampling (inverting at w = -1) is CFG at 2w + 1 and W2SD "
              "(the weak model inverting at w) is CFG at w plus the strong-minus-weak difference. Rows of "
              "different effective guidance are not compared at the same w. "
              "Prompt accuracy: the evaluator's prediction matches every attribute of the prompt. "
              "Fréchet distance: between the evaluator's features of the samples and of the held-out "
              "real images. RMS to its teacher's sample: per-pixel distance (images in [-1, 1]) between "
              "a student's sample and its teacher sampler's sample from the same noise and prompt.", "",
              "## Sweep over w (Fig. 5a in small)", "",
              "| w | " + " | ".join(f"{m} accuracy | {m} FD" for m in sweep["methods"]) + " |",
              "|---|" + "---|---|" * len(sweep["methods"])]
    for w, row in sweep["rows"].items():
        lines.append(f"| {w:g} | " + " | ".join(f"{100 * row[m]['accuracy']:.1f}% | {row[m]['fd']:.3f}"
                                                 for m in sweep["methods"]) + " |")
    for title, body in sections:
        lines += ["", f"## {title}", "", *body]
    lines += ["", "## Samples", "",
              f"Rows w = {', '.join(f'{w:g}' for w in grid_ws)}; columns, left to right: "
              f"{', '.join(grid_methods)} (same prompts and noise in every block).", "",
              "![w grid](grid_w.png)", ""]
    lines += [f"- {name}: ![{name}]({r['grid']})" for name, r in table.items()]
    text = ("\n".join(lines) + "\n").encode()
    atomic_write(os.path.join(out, "report.md"), lambda f: f.write(text))
