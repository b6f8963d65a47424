"""How faithful a distilled student is to its teacher, in the toy world: its velocity error over a
grid of (w, t).

At each point the teacher's target and the student's one-pass velocity are computed by the code
Alg. 1 trains with (distill.teacher_target, distill.student_loss), evaluated instead of trained: at
a point where the student was trained, the map shows exactly its training loss there, in the loss
curves' units. The grid reaches beyond the trained w range, to show what happens there.
"""

import torch

from tinyteef.distill import student_loss, teacher_target
from tinyteef.flow import interpolate
from tinyteef.guidance import Text

from .data import to_float
from .scoring import autocast

W_GRID = (0.0, 1.0, 2.0, 5.0, 8.0, 11.0, 14.0, 18.0)  # the paper's [2, 14] and beyond it on each side
T_GRID = tuple((k + 0.5) / 8 for k in range(8))  # the midpoints of 8 equal bins of (0, 1)


def velocity_errors(students, teacher, x_t, t, w, c, u, config, weak=None):
    """Alg. 1 lines 8-13 at the given points, without the update: the teacher's target (lines 8-11,
    distill.teacher_target) and each student's squared error against it (lines 12-13,
    distill.student_loss), per sample. x_t (B, C, H, W); t, w (B,); c the B prompts, u ∅ (B rows).
    Returns one (B,) tensor per student; its mean is the student's distillation loss on the batch."""
    target = teacher_target(teacher, x_t, t, w, c, u, config, weak)  # (B, C, H, W)
    with torch.no_grad():
        return [student_loss(s, x_t, t, w, c, u, target, per_sample=True) for s in students]


def error_grid(students, teacher, x0, eps, c, u, config, weak=None, ws=W_GRID, ts=T_GRID):
    """The mean of velocity_errors in every cell (w, t) of the grid, with the same images x0, noise
    eps and prompts c in every cell, so that cells differ by w and t only. The cells of one w run
    as one batch. x0, eps (B, C, H, W); c (B rows); u ∅ (one row). Returns
    errors[k][i][j] for student k at t = ts[i], w = ws[j]."""
    B, T, dev = x0.shape[0], len(ts), x0.device
    t = torch.tensor(ts, device=dev).repeat_interleave(B)  # (T B,): B rows at ts[0], B at ts[1], ...
    x_t = interpolate(x0.repeat(T, 1, 1, 1), eps.repeat(T, 1, 1, 1), t)  # (T B, C, H, W)
    c, u = Text(c.tokens.repeat(T, 1, 1), c.pooled.repeat(T, 1)), u.expand(T * B)
    grid = [[[0.0] * len(ws) for _ in ts] for _ in students]
    for j, w in enumerate(ws):
        # w as a (T B,) tensor, as Alg. 1 draws it: CFG makes both passes even at w = 0
        errors = velocity_errors(students, teacher, x_t, t, torch.full_like(t, w), c, u, config, weak)
        for k, e in enumerate(errors):
            for i, cell in enumerate(e.view(T, B).mean(dim=1).tolist()):
                grid[k][i][j] = cell
    return grid


def measure(students, teacher, weak, text, bank, data, configs, n, device, seed):
    """The velocity-error grid of every student on the first n held-out images, their prompts and
    one fixed noise. students {name: (guidance.Student, its teacher sampler)}; configs {teacher
    sampler: the DistillConfig it was distilled with}. Students of one teacher sampler share its
    targets. Returns {"ws", "ts", "errors": {name: errors[i][j] at t = ts[i], w = ws[j]}}."""
    g = torch.Generator(device).manual_seed(seed)
    y = data.test_y[:n].to(device)  # (n, A)
    x0 = to_float(data.test_x[:n].to(device))  # (n, C, H, W)
    eps = torch.randn(x0.shape, generator=g, device=device)
    with torch.no_grad():
        c, u = text(bank.sample(y, g)), text(bank.empty)
    errors = {}
    for kind, config in configs.items():
        names = [name for name, (_, k) in students.items() if k == kind]
        with autocast(device):
            grids = error_grid([students[name][0] for name in names], teacher, x0, eps, c, u, config, weak)
        errors.update(zip(names, grids))
    return {"ws": list(W_GRID), "ts": list(T_GRID), "errors": errors}
