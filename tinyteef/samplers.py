"""The samplers of the paper, each a loop over the time grid ts that counts its forward passes.

| sampler      | passes per step (nominal) | what a step does                                  |
|--------------|---------------------------|---------------------------------------------------|
| `euler`      | 1                         | Euler on v(x, c)                                  |
| `euler_cfg`  | 2                         | Euler on Eq. 2 (c and ∅ batched in one call)      |
| `naive`      | 1                         | Euler on v(x, c^), c^ of Eq. 5                    |
| `student`    | 1                         | Euler on the student, z^ of Eq. 7 (or a baseline) |
| `z_sampling` | 6 (2 on unreflected steps)| Eq. 3-4 reflection, one model, weaker inversion   |
| `w2sd`       | 6 (2 on unreflected steps)| Eq. 3-4 reflection, weak model inverts            |

Every loop runs i = 0 .. N-1 over ts (N + 1,), from t_0 = 1 (noise) down to t_N = 0 (flow.time_grid),
with t = ts[i], t_next = ts[i + 1], and the paper's symbols: x' is `x_prime`, x~ is `x_tilde`.
Z-Sampling and W2SD share one loop, `reflection_loop`.

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


def steps(ts, progress=False):
    """The step indices i = 0 .. N-1 of the grid ts (N + 1,), with a tqdm bar if `progress`."""
    return tqdm(range(len(ts) - 1), desc="sampling", disable=not progress, leave=False)


def reflected_point(strong, weak, x, t, t_next, c: Text, u: Text, w, w_weak):
    """Eq. 3, the first half of a reflection step from t down to t_next (< t), with v_strong the
    CFG velocity (Eq. 2) of the net `strong` at w and v_weak that of `weak` at w_weak:

        x'  = x  + (t_next - t) v_strong(x, t)        denoise
        x~  = x' + (t - t_next) v_weak(x', t_next)    invert (M_w^inv)

    Returns x~. The inversion evaluates the weak velocity at the less noisy point (x', t_next):
    explicit Euler run upwards (flow.euler_invert), exact on constant fields only. The samplers'
    loop and distill.teacher_target both reflect through here (and `reflect`).
    """
    x_prime = euler_step(x, guided_velocity(strong, x, t, c, u, w), t, t_next)  # (B, C, H, W)
    return euler_invert(x_prime, guided_velocity(weak, x_prime, t_next, c, u, w_weak), t_next, t)


def reflect(strong, weak, x, t, t_next, c: Text, u: Text, w, w_weak):
    """One step with reflection, Eq. 3-4: x~ from Eq. 3 (reflected_point), then denoise again,
    x_next = x~ + (t_next - t) v_strong(x~, t) (Eq. 4). Returns (x~, x_next)."""
    x_tilde = reflected_point(strong, weak, x, t, t_next, c, u, w, w_weak)
    return x_tilde, euler_step(x_tilde, guided_velocity(strong, x_tilde, t, c, u, w), t, t_next)


@torch.no_grad()
def euler(model, x, ts, c: Text, progress=False):
    """No guidance: Euler on v(x, c), one pass per step."""
    N, net = len(ts) - 1, Counter(model, x.shape[0])
    for i in steps(ts, progress):
        t, t_next = ts[i], ts[i + 1]
        v = net(x, t, c.tokens, c.pooled)  # v(x, t, c), (B, C, H, W)
        x = euler_step(x, v, t, t_next)  # x + (t_next - t) v
    return Samples(x, net.passes, N, N)


@torch.no_grad()
def euler_cfg(model, x, ts, c: Text, u: Text, w, progress=False):
    """Euler + CFG (Eq. 2): two passes per step, batched into one call; one where w_i = 0."""
    N, net, ws = len(ts) - 1, Counter(model, x.shape[0]), per_step(w, ts)
    for i in steps(ts, progress):
        t, t_next = ts[i], ts[i + 1]
        v = guided_velocity(net, x, t, c, u, ws[i])  # Eq. 2: (1 + w) v(x, t, c) - w v(x, t, ∅), (B, C, H, W)
        x = euler_step(x, v, t, t_next)  # x + (t_next - t) v
    return Samples(x, net.passes, 2 * N, N)


@torch.no_grad()
def naive(model, x, ts, c: Text, u: Text, w, progress=False):
    """Naive fusion (Eq. 5): one pass of the undistilled model on c^ = c + w (c - ∅), fused on every
    step with that step's w."""
    N, net, ws = len(ts) - 1, Counter(model, x.shape[0]), per_step(w, ts)
    for i in steps(ts, progress):
        t, t_next = ts[i], ts[i + 1]
        c_hat = naive_fusion(c, u, ws[i])  # Eq. 5: c^ = c + w (c - ∅), tokens (B, L, D) and pooled (B, P)
        v = net(x, t, c_hat.tokens, c_hat.pooled)  # v(x, t, c^), (B, C, H, W)
        x = euler_step(x, v, t, t_next)  # x + (t_next - t) v
    return Samples(x, net.passes, N, N)


@torch.no_grad()
def student(s: Student, x, ts, c: Text, u: Text, w, progress=False):
    """A distilled student (guidance.Student): plain Euler on v_S(x, z^), one pass per step, z^ of
    Eq. 7 (or a baseline's term) carrying that step's w. Every step's w must lie in the student's
    trained range: all are checked before the first pass."""
    ws = per_step(w, ts)
    for w_i in ws:
        s.check_w(w_i)
    N, net = len(ts) - 1, Counter(s, x.shape[0])
    for i in steps(ts, progress):
        t, t_next = ts[i], ts[i + 1]
        # w as a float64 tensor: the value psi receives is the same as from the number (mmdit.psi_input
        # rounds it once), and a compiled student (toy/fast.py) is not recompiled for every new w
        w_i = torch.as_tensor(ws[i], dtype=torch.float64, device=x.device)
        v = net(x, t, c, u, w_i)  # v_S(x, t, z^), z^ = G(psi(t)) + F(c) + G(psi(w)) ⊙ F(c - ∅) (Eq. 7)
        x = euler_step(x, v, t, t_next)  # x + (t_next - t) v
    return Samples(x, net.passes, N, N)


def reflection_loop(strong, weak, x, ts, c: Text, u: Text, ws, ws_weak, reflect_steps, progress=False):
    """Eq. 3-4 on the first `reflect_steps` steps, Euler + CFG (Eq. 2) on the others: the loop of
    Z-Sampling (one counted net passed as both) and W2SD. v_strong is CFG at ws[i] with `strong`,
    v_weak CFG at ws_weak[i] with `weak`. Returns x at t = 0, (B, C, H, W)."""
    for i in steps(ts, progress):
        t, t_next = ts[i], ts[i + 1]
        if i < reflect_steps:  # Eq. 3-4: denoise to x', invert to x~, denoise again
            _, x = reflect(strong, weak, x, t, t_next, c, u, ws[i], ws_weak[i])
        else:  # Euler + CFG: x + (t_next - t) v_strong(x, t)
            x = euler_step(x, guided_velocity(strong, x, t, c, u, ws[i]), t, t_next)
    return x


def reflection_nominal(N, reflect_steps):
    """Nominal passes per image of N steps, the first `reflect_steps` reflected: 6 on a reflected
    step (CFG three times), 2 on the others."""
    r = min(reflect_steps, N)
    return 6 * r + 2 * (N - r)


@torch.no_grad()
def z_sampling(model, x, ts, c: Text, u: Text, w, w_inv=-1.0, reflect_steps=None, progress=False):
    """Z-Sampling + CFG: reflection (Eq. 3-4) with one model, denoising at guidance w and
    inverting at the weaker w_inv. Default w_inv = -1 (diffusers' scale 0, the reference code's
    choice): the inversion uses the unconditional prediction alone, so one of the 6 nominal passes
    of a reflected step is skipped. Reflects on the first `reflect_steps` steps (default: all but
    the last)."""
    N = len(ts) - 1
    reflect_steps = N - 1 if reflect_steps is None else reflect_steps
    net = Counter(model, x.shape[0])  # denoises and inverts: one counter, passed as both
    x = reflection_loop(net, net, x, ts, c, u, per_step(w, ts), per_step(w_inv, ts), reflect_steps, progress)
    return Samples(x, net.passes, reflection_nominal(N, reflect_steps), N)


@torch.no_grad()
def w2sd(strong, weak, x, ts, c: Text, u: Text, w, w_weak=None, reflect_steps=None, progress=False):
    """W2SD + CFG: reflection (Eq. 3-4) where a weak model (different weights) inverts.
    Default w_weak = None: the weak model inverts at the strong guidance w itself, CFG on all three
    passes (the paper's "6x", Sec. 3.2); to first order a step is then CFG at w plus the
    strong-minus-weak difference (distill.py derives it). w_weak = 0 (diffusers' scale 1, the W2SD
    reference code's weak guidance) uses the weak model's conditional prediction alone, one pass
    fewer, and is about CFG at 2w. Reflects on the first `reflect_steps` steps (default: all but
    the last)."""
    N = len(ts) - 1
    reflect_steps = N - 1 if reflect_steps is None else reflect_steps
    ws = per_step(w, ts)
    ws_weak = ws if w_weak is None else per_step(w_weak, ts)
    net_strong, net_weak = Counter(strong, x.shape[0]), Counter(weak, x.shape[0])
    x = reflection_loop(net_strong, net_weak, x, ts, c, u, ws, ws_weak, reflect_steps, progress)
    return Samples(x, net_strong.passes + net_weak.passes, reflection_nominal(N, reflect_steps), N)
