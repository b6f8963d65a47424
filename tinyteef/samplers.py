"""The samplers of the paper, all through one loop (`sample_loop`), each counting its forward passes.

| sampler      | passes per step (nominal) | what a step does                                  |
|--------------|---------------------------|---------------------------------------------------|
| `euler`      | 1                         | Euler on v(x, c)                                  |
| `euler_cfg`  | 2                         | Euler on Eq. 2 (c and ∅ batched in one call)      |
| `naive`      | 1                         | Euler on v(x, c^), c^ of Eq. 5                    |
| `student`    | 1                         | Euler on the student, z^ of Eq. 7 (or a baseline) |
| `z_sampling` | 6 (2 on unreflected steps)| Eq. 3-4 reflection, one model, weaker inversion   |
| `w2sd`       | 6 (2 on unreflected steps)| Eq. 3-4 reflection, weak model inverts            |

Passes are counted per image where they happen (a call on 2B rows for B images counts 2), so a pass
that a guidance weight makes unnecessary (w = 0 or -1, see guidance.guided_velocity) shows as
`skipped` = nominal - made.

Every guidance weight (w, w_inv, w_weak) is a w spec of schedules.py: a constant, or one value per
step (a list, a Ramp, an Interval); `schedules.per_step` resolves it, and step i uses entry i.
Steps outside a guidance interval run at w = 0: one pass for a teacher. A student refuses any w
outside the range it was distilled on (guidance.Student.check_w).

`u` is the empty prompt ∅, or a negative prompt's encoding in its place: the CFG samplers then
guide away from it, naive fusion moves c away from it, and the student's Eq. 7 term becomes
G(psi(w)) ⊙ F(pooled(c) - pooled(neg)) (its attention still sees c's tokens only). Z-Sampling's
default inversion (w_inv = -1) then uses v(neg) alone, as a diffusers pipeline at guidance scale 0
would.

References: Bai et al. 2025, "Zigzag Diffusion Sampling" (Z-Sampling, ICLR 2025); Bai et al. 2025,
"Weak-to-Strong Diffusion with Reflection" (W2SD).
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .flow import euler_invert, euler_step
from .guidance import Student, Text, guided_velocity, naive_fusion
from .schedules import per_step


@dataclass
class Samples:
    x: torch.Tensor  # (B, C, H, W) the sample at t = 0
    passes: float  # forward passes per image actually made
    nominal: float  # passes per image the sampler costs as the paper counts (1x, 2x, 6x per step)
    steps: int

    @property
    def skipped(self):
        """Passes the guidance weights made unnecessary."""
        return self.nominal - self.passes


class Counter:
    """Wraps a net and counts the rows it evaluates; `passes` is rows per image."""

    def __init__(self, net, images):
        self.net, self.images, self.rows = net, images, 0

    def __call__(self, x, *args, **kwargs):
        self.rows += x.shape[0]
        return self.net(x, *args, **kwargs)

    @property
    def passes(self):
        return self.rows / self.images


def sample_loop(x, ts, step, progress=False):
    """The one sampling loop: x <- step(x, t_i, t_{i+1}, i) for i = 0 .. N-1, from ts[0] = 1 down
    to ts[N] = 0. ts: (N + 1,), e.g. flow.time_grid."""
    for i in tqdm(range(len(ts) - 1), desc="sampling", disable=not progress, leave=False):
        x = step(x, ts[i], ts[i + 1], i)
    return x


def euler_sampler(velocity):
    """Plain Euler steps on a velocity function v(x, t, i) (the standard sampler that Sec. 3.2's
    reflection samplers go beyond); i, the step's index, picks that step's guidance weight."""
    return lambda x, t, t_next, i: euler_step(x, velocity(x, t, i), t, t_next)


def reflected_point(x, t, t_next, v_strong, v_weak):
    """Eq. 3, the first half of a reflection step from t down to t_next (< t):

        x'  = x  + (t_next - t) v_strong(x, t)        denoise
        x~  = x' + (t - t_next) v_weak(x', t_next)    invert (M_w^inv)

    Returns x~. The inversion evaluates the weak velocity at the less noisy point (x', t_next):
    explicit Euler run upwards (flow.euler_invert), exact on constant fields only.
    """
    x1 = euler_step(x, v_strong(x, t), t, t_next)
    return euler_invert(x1, v_weak(x1, t_next), t_next, t)


def reflect(x, t, t_next, v_strong, v_weak):
    """One step with reflection, Eq. 3-4: x~ from Eq. 3 (reflected_point), then denoise again,
    x'' = x~ + (t_next - t) v_strong(x~, t) (Eq. 4). Returns (x~, x'')."""
    x_tilde = reflected_point(x, t, t_next, v_strong, v_weak)
    return x_tilde, euler_step(x_tilde, v_strong(x_tilde, t), t, t_next)


def reflection_sampler(v_strong, v_weak, reflect_steps):
    """Reflect (Eq. 3-4) on the first `reflect_steps` steps, plain Euler on v_strong after.
    v_strong and v_weak are v(x, t, i), i the step's index (for per-step guidance weights)."""
    def step(x, t, t_next, i):
        strong = lambda y, s: v_strong(y, s, i)
        if i < reflect_steps:
            return reflect(x, t, t_next, strong, lambda y, s: v_weak(y, s, i))[1]
        return euler_step(x, strong(x, t), t, t_next)
    return step


def _run(nets, x, ts, step_of, nominal_per_step, progress):
    """Count the passes of each distinct net, run the loop, and report."""
    B, N = x.shape[0], len(ts) - 1
    counters = {}
    for n in nets:  # the same model used twice (Z-Sampling) is counted once
        counters.setdefault(id(n), Counter(n, B))
    x = sample_loop(x, ts, step_of(*(counters[id(n)] for n in nets)), progress)
    return Samples(x, sum(c.passes for c in counters.values()), nominal_per_step, N)


@torch.no_grad()
def euler(model, x, ts, c: Text, progress=False):
    """No guidance: v(x, c), one pass per step."""
    return _run([model], x, ts, lambda net: euler_sampler(
        lambda y, t, i: net(y, t, c.tokens, c.pooled)),
        len(ts) - 1, progress)


@torch.no_grad()
def euler_cfg(model, x, ts, c: Text, u: Text, w, progress=False):
    """Euler + CFG (Eq. 2): two passes per step, batched into one call; one where w_i = 0."""
    ws = per_step(w, ts)
    return _run([model], x, ts, lambda net: euler_sampler(
        lambda y, t, i: guided_velocity(net, y, t, c, u, ws[i])), 2 * (len(ts) - 1), progress)


@torch.no_grad()
def naive(model, x, ts, c: Text, u: Text, w, progress=False):
    """Naive fusion (Eq. 5): one pass of the undistilled model on c^ = c + w (c - ∅), fused once
    for a constant w, once per step for a schedule."""
    fused = per_step(w, ts, lambda v: naive_fusion(c, u, v))
    return _run([model], x, ts, lambda net: euler_sampler(
        lambda y, t, i: net(y, t, fused[i].tokens, fused[i].pooled)), len(ts) - 1, progress)


@torch.no_grad()
def student(s: Student, x, ts, c: Text, u: Text, w, progress=False):
    """A distilled student (guidance.Student): plain Euler on v_S(x, z^), one pass per step, z^ of
    Eq. 7 (or a baseline's term) carrying w.
    Each step calls the student itself (Student.forward, the route training takes). Every step's w
    must lie in the student's trained range."""
    ws = per_step(w, ts)
    for v in ws:
        s.check_w(v)
    return _run([s], x, ts, lambda net: euler_sampler(lambda y, t, i: net(y, t, c, u, ws[i])), len(ts) - 1, progress)


def _reflection_nominal(ts, reflect_steps):
    N = len(ts) - 1
    r = min(reflect_steps, N)
    return 6 * r + 2 * (N - r)


@torch.no_grad()
def z_sampling(model, x, ts, c: Text, u: Text, w, w_inv=-1.0, reflect_steps=None, progress=False):
    """Z-Sampling + CFG: reflection (Eq. 3-4) with one model, denoising at guidance w and
    inverting at the weaker w_inv. Default w_inv = -1 (diffusers' scale 0, the reference code's
    choice): the inversion uses the unconditional prediction alone, so one of the 6 nominal passes
    of a reflected step is skipped. Reflects on the first `reflect_steps` steps (default: all but
    the last)."""
    reflect_steps = len(ts) - 2 if reflect_steps is None else reflect_steps
    ws, ws_inv = per_step(w, ts), per_step(w_inv, ts)
    return _run([model, model], x, ts, lambda s, inv: reflection_sampler(
        lambda y, t, i: guided_velocity(s, y, t, c, u, ws[i]),
        lambda y, t, i: guided_velocity(inv, y, t, c, u, ws_inv[i]), reflect_steps),
        _reflection_nominal(ts, reflect_steps), progress)


@torch.no_grad()
def w2sd(strong, weak, x, ts, c: Text, u: Text, w, w_weak=None, reflect_steps=None, progress=False):
    """W2SD + CFG: reflection (Eq. 3-4) where a weak model (different weights) inverts.
    Default w_weak = None: the weak model inverts at the strong guidance w itself, CFG on all three
    passes (the paper's "6x", Sec. 3.2); to first order a step is then CFG at w plus the
    strong-minus-weak difference (distill.py derives it). w_weak = 0 (diffusers' scale 1, the W2SD
    reference code's weak guidance) uses the weak model's conditional prediction alone, one pass
    fewer, and is about CFG at 2w. Reflects on the first `reflect_steps` steps (default: all but
    the last)."""
    reflect_steps = len(ts) - 2 if reflect_steps is None else reflect_steps
    ws = per_step(w, ts)
    ws_weak = ws if w_weak is None else per_step(w_weak, ts)
    return _run([strong, weak], x, ts, lambda s, k: reflection_sampler(
        lambda y, t, i: guided_velocity(s, y, t, c, u, ws[i]),
        lambda y, t, i: guided_velocity(k, y, t, c, u, ws_weak[i]), reflect_steps),
        _reflection_nominal(ts, reflect_steps), progress)
