"""Alg. 1: distilling a teacher's guided sampler into a one-pass student.

    student <- copy of teacher                                         (line 1)
    repeat:
      x0, c ~ data; t ~ U[0, 1]; w ~ U[w_min, w_max]; eps ~ N(0, I)    (lines 3-6)
      x_t = (1 - t) x0 + t eps                                         (line 7)
      target = (1 + w) v_T(x_t, t, c) - w v_T(x_t, t, ∅)               (line 8, Eq. 2)
      if reflection: refine target with Eq. 3-4                        (lines 9-11)
      z^ from Eq. 7; loss = || v_S(x_t, z^) - target ||^2              (lines 12-13)
      optimizer step                                                   (line 14)

The pieces, in the order train_toy.py and train_sd3.py call them in their loops: `sample_training_point`
(lines 3-7), `teacher_target` (lines 8-11), `student_loss` (lines 12-13); the backward pass and the
update (line 14) are the scripts' own, so that a script can accumulate gradients over micro-batches.
Several students may share one teacher target (the toy trains TeEFusion, DistillCFG and the
G(psi(w)) ablation on the same W2SD+CFG targets).

What a reflection target teaches, to first order in the step Δ = t - t_next (a Taylor expansion of
Eq. 3-4 around (x_t, t); v_s is the strong teacher's CFG velocity at w, v_inv the inverter's):

    x'  = x_t - Δ v_s(x_t)                      = x_t - Δ v_s + O(Δ²)
    x~  = x'  + Δ v_inv(x', t - Δ)              = x_t - Δ (v_s - v_inv) + O(Δ²)
    x'' = x~  - Δ v_s(x~)                       = x_t - Δ (2 v_s - v_inv) + O(Δ²)

so the "reach" target (x'' - x_t) / (-Δ) is 2 v_s - v_inv + O(Δ). With v_s = (1 + w) v(c) - w v(∅)
and an inverter guided at a, v_inv = (1 + a) v'(c) - a v'(∅):

    2 v_s - v_inv = CFG at (2w - a) of the strong model + [CFG at a of the strong model - of the inverter].

- Z-Sampling (the inverter is the teacher itself, a = w_inv): the bracket is 0, the target is CFG at
  2w - w_inv; with the reference code's w_inv = -1, CFG at 2w + 1.
- W2SD (the weak model inverts at a = w_weak): with w_weak = w (our default, `None`), CFG at w plus
  the strong-minus-weak difference of their CFG velocities at w; with w_weak = 0 (the W2SD
  reference code's weak guidance scale 1), about CFG at 2w plus the difference of the conditional
  predictions.
- "refined" (the strong velocity at x~ = x_t + O(Δ)): CFG at w, plus O(Δ).
So students of different teachers "at w = 5" learn different guidance; `effective_guidance` says
which, and the toy's report prints it beside every row. (tests/test_distill.py checks the
expansion on a smooth nonlinear field: the gap shrinks linearly with Δ.)
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .flow import T_DISTS, interpolate, next_t, sample_t
from .guidance import PAPER_W_RANGE, Student, Text, guided_velocity
from .samplers import reflect, reflected_point

TEACHERS = ("cfg", "zsampling", "w2sd")
REFLECTION_TARGETS = ("reach", "refined")


@dataclass
class DistillConfig:
    teacher: str = "w2sd"  # the teacher's sampler: cfg | zsampling | w2sd
    w_min: float = PAPER_W_RANGE[0]  # w ~ U[w_min, w_max], paper's convention (Sec. 6.1: [2, 14])
    w_max: float = PAPER_W_RANGE[1]
    w_inv: float = -1.0  # Z-Sampling's inversion guidance (paper's w; -1 = unconditional, its reference code)
    # W2SD's weak-model guidance (paper's w). None = the strong w: CFG on all three passes, the
    # paper's "6x" (Sec. 3.2), and to first order CFG at w plus the strong-minus-weak difference, so
    # w means what it means for Euler+CFG. 0 (the W2SD reference code) is about CFG at 2w.
    w_weak: float | None = None
    sample_steps: int = 28  # the grid the student will sample with: sets the reflection step
    shift: float = 3.0  # ... and its time shift (SD3 at 1024 px: 3; toy: 1)
    reflection_target: str = "reach"  # reach | refined, see teacher_target
    t_dist: str = "uniform"  # p(t) of Alg. 1 line 4: uniform (the paper's) | logit-normal (SD3's pre-training)
    t_mean: float = 0.0  # the logit-normal's parameters (SD3: 0, 1)
    t_std: float = 1.0

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {self.teacher!r}; choose one of {', '.join(TEACHERS)}")
        if self.reflection_target not in REFLECTION_TARGETS:
            raise ValueError(f"unknown reflection_target {self.reflection_target!r}; "
                             f"choose one of {', '.join(REFLECTION_TARGETS)}")
        if self.t_dist not in T_DISTS:
            raise ValueError(f"unknown t_dist {self.t_dist!r}; choose one of {', '.join(T_DISTS)}")
        if not self.w_min <= self.w_max:
            raise ValueError(f"need w_min <= w_max, got {self.w_min} > {self.w_max}")


def reach_inversion(config: DistillConfig):
    """The guidance a of the inversion (Eq. 3's M_w^inv) in a "reach" reflection target, whose step is
    2 v_s - v_inv to first order (Eq. 3-4, this module's docstring), or None where the target is CFG at w itself: a CFG teacher, a
    "refined" target, or W2SD's weak model inverting at the strong w (w_weak None)."""
    a = config.w_inv if config.teacher == "zsampling" else config.w_weak
    return None if config.teacher == "cfg" or config.reflection_target == "refined" else a


def effective_w(config: DistillConfig, w):
    """The guidance weight of the CFG (Eq. 2) that the teacher sampler (and a student distilled from
    it) amounts to at w, to first order in the step: 2w - a for a reach target inverting at a
    (Z-Sampling at a = w_inv = -1: 2w + 1), w otherwise (W2SD: plus its strong-minus-weak bracket)."""
    a = reach_inversion(config)
    return w if a is None else 2 * w - a


def effective_guidance(config: DistillConfig, w=None):
    """effective_w as text for reports and records: "CFG at w = 5", "CFG at 2w + 1 = 11",
    "CFG at w = 5 + (strong - weak)"; without w the formula alone ("CFG at 2w + 1")."""
    a = reach_inversion(config)
    form = "w" if a is None else "2w" if a == 0 else f"2w {'+' if a < 0 else '-'} {abs(a):g}"
    text = f"CFG at {form}" + ("" if w is None else f" = {effective_w(config, w):g}")
    bracket = config.teacher == "w2sd" and config.reflection_target == "reach"  # strong and inverter differ
    return text + (" + (strong - weak)" if bracket else "")


def sample_training_point(x0, config: DistillConfig, generator=None):
    """Alg. 1 lines 4-7: t ~ p(t) (config.t_dist), w ~ U[w_min, w_max], eps ~ N(0, I), x_t on the path.
    x0 (B, C, H, W) -> x_t like x0, t (B,), w (B,)."""
    B, dev = x0.shape[0], x0.device
    t = sample_t(B, config.t_dist, config.t_mean, config.t_std, generator, dev)
    w = config.w_min + (config.w_max - config.w_min) * torch.rand(B, generator=generator, device=dev)
    eps = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    return interpolate(x0, eps, t), t, w


@torch.no_grad()
def teacher_target(teacher, x_t, t, w, c: Text, u: Text, config: DistillConfig, weak=None):
    """Alg. 1 lines 8-11: what the student's one pass must predict at (x_t, t, w).

    cfg:       Eq. 2, (1 + w) v_T(x_t, c) - w v_T(x_t, ∅).
    zsampling: reflection (Eq. 3-4) with the teacher inverting at config.w_inv.
    w2sd:      reflection with `weak` inverting at config.w_weak (None: at w).

    The paper gives no formula for the reflection target and the authors released no training
    code. Default ("reach"): one reflection step takes x_t to the teacher's x_{t-Δ};
    the student takes plain Euler steps of the same size Δ, so its target is the velocity that
    reaches that point in one Euler step, (x_{t-Δ} - x_t) / (-Δ). Δ is the step of the student's
    sampling grid at t (flow.next_t with config.sample_steps, config.shift). Alternative ("refined"):
    the strong teacher's CFG velocity at the reflected point x~, v_T^w(x~, t). To first order in
    Δ, "reach" is CFG at 2w - w_inv (plus, for W2SD, the strong-minus-weak difference) and "refined"
    is CFG at w: the module's docstring derives it, `effective_guidance` names it.
    """
    if config.teacher == "cfg":
        return guided_velocity(teacher, x_t, t, c, u, w)
    if config.teacher == "w2sd" and weak is None:
        raise ValueError("the w2sd teacher needs a weak model to invert with (Eq. 3)")
    inverter, w_inv = (teacher, config.w_inv) if config.teacher == "zsampling" else (weak, config.w_weak)
    w_inv = w if w_inv is None else w_inv
    t_next = next_t(t, config.sample_steps, config.shift)  # (B,), < t
    if config.reflection_target == "refined":  # Eq. 3 only: the second denoising is not needed
        x_tilde = reflected_point(teacher, inverter, x_t, t, t_next, c, u, w, w_inv)
        return guided_velocity(teacher, x_tilde, t, c, u, w)
    _, x_next = reflect(teacher, inverter, x_t, t, t_next, c, u, w, w_inv)
    dt = (t_next - t).reshape(-1, *([1] * (x_t.ndim - 1)))
    return (x_next - x_t) / dt


def student_loss(student: Student, x_t, t, w, c: Text, u: Text, target, per_sample=False):
    """Alg. 1 lines 12-13: the student's one-pass velocity with z^ (Eq. 7, or a baseline's term)
    against the teacher's target, mean squared error in float32. `student` may be a DDP wrapper of
    a guidance.Student: the call runs its forward, term included.

    per_sample=True returns the error of each sample, (B,), instead of the batch's mean: to
    evaluate the loss at chosen points (t, w) batched together. Their mean is the same loss.
    """
    error = (student(x_t, t, c, u, w).float() - target.float()).square()  # (B, C, H, W)
    return error.flatten(1).mean(dim=1) if per_sample else error.mean()


def check_w_range(student, config: DistillConfig):
    """Refuse a student whose recorded w_range is not Alg. 1's U[w_min, w_max]: the range a student
    records, and keeps to at sampling, must be the one it is trained on. `student` may be a DDP
    wrapper of a guidance.Student."""
    w_range = getattr(student, "module", student).w_range  # a DDP wrapper holds the Student as .module
    if tuple(w_range) != (config.w_min, config.w_max):
        raise ValueError(f"a student with w_range {tuple(w_range)} would be distilled on w ~ U[{config.w_min:g}, "
                         f"{config.w_max:g}]: give it w_range=(w_min, w_max) of the DistillConfig")


# A step may at most double the norm of the student's weights. AdamW moves each weight by about lr
# (its update is lr m^ / (sqrt(v^) + eps), |m^ / sqrt(v^)| <~ 1), so ||Δθ|| ~ lr sqrt(N) while
# ||θ|| = rms(θ) sqrt(N): at the paper's lr 5e-6 and SD3's weights (rms ~ 0.02) ||Δθ|| / ||θ|| is
# ~ 1e-4, four orders below the bound. By the triangle inequality a step with ||Δθ|| <= ||θ|| always
# passes and every step with ||Δθ|| > 3 ||θ|| fails: the check needs only the norm before and after
# the update, never a copy of the weights (8 GB at SD3-medium size). --lr 1e30 leaves the weights
# finite (each at ±1e30) and would be saved as a "good" checkpoint without it.
MAX_NORM_GROWTH = 2.0


def weights_norm(module):
    """The L2 norm of all of a module's parameters together (inf when it overflows float32), the
    same number on every process. Under FSDP each process holds a shard of each parameter (a
    DTensor): the squares of the shards' norms, summed over the processes, are the whole's."""
    params = [p.detach() for p in module.parameters()]
    sharded = [p for p in params if isinstance(p, DTensor)]
    total = sum_of_squares([p.to_local() for p in sharded], params[0].device)
    if sharded:  # a collective: every process gets here at each step, as step_problem's decisions are shared
        dist.all_reduce(total, group=sharded[0].device_mesh.get_group())
    whole = sum_of_squares([p for p in params if not isinstance(p, DTensor)], params[0].device)
    return (total + whole).sqrt().float().item()


def sum_of_squares(tensors, device):
    """The sum of the tensors' squared L2 norms, each norm in float32 and the squares in float64
    (no overflow where a float32 norm has none)."""
    norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]  # one each
    if not norms:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(norms).double().square().sum()


def step_problem(step, loss, grad_norm, before=None, after=None):
    """Why optimizer step `step` (counted from 1) must not be kept, in words, or None: a
    non-finite loss or gradient norm (checked before the update), or an update that took the
    weights' norm from `before` to a non-finite `after` or beyond MAX_NORM_GROWTH times `before`."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return (f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step} (log.jsonl's numbering); "
                "stopped before the update")
    if after is not None and not (math.isfinite(after) and after <= MAX_NORM_GROWTH * before):
        return (f"the update of step {step} (log.jsonl's numbering) took the norm of the student's weights from "
                f"{before:.4g} to {after:.4g}, more than {MAX_NORM_GROWTH:g}x in one step: the learning rate is "
                "far too large, lower --lr; stopped before saving it")
    return None
