"""Guidance schedules: the guidance weight w as a constant or as a function of the sampling step.

A "w spec", accepted by every sampler of samplers.py for its guidance weight, is one of
- a number, or a (B,) tensor (one w per sample): the same w on every step, as in the paper;
- a list or tuple of N numbers: w_i on step i of an N-step grid;
- `Ramp(w_start, w_end, t_start=1, t_end=0)`: w linear in the time t (a linear schedule, Wang et al.
  2024);
- `Interval(w, t_hi, t_lo)`: guidance w on the steps whose time lies in (t_lo, t_hi] and none
  (w = 0) elsewhere (guidance interval, Kynkäänniemi et al. 2024).

`per_step` is the one place that turns a spec into the w of each step. A step's w is read at the
time the step starts from, t_i, the time at which its forward passes evaluate the model.

w = 0 is "no guidance" for a teacher (Eq. 2 reduces to v(c), one pass), not for a distilled
student, whose guidance is a learned function of w inside the range it was distilled on:
guidance.Student refuses a w outside that range.

References: Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight Schedulers" (TMLR);
Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models" (NeurIPS).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ramp:
    """w linear in t: w_start at t >= t_start, w_end at t <= t_end, a straight line between.
    With the defaults the line runs over the whole trajectory, from the noise (t = 1) to the data."""

    w_start: float
    w_end: float
    t_start: float = 1.0
    t_end: float = 0.0

    def __post_init__(self):
        if not self.t_start > self.t_end:
            raise ValueError(f"a Ramp needs t_start > t_end (time runs from 1 down to 0), "
                             f"got {self.t_start} and {self.t_end}")

    def at(self, t):
        """w at time t (a float)."""
        progress = min(max((self.t_start - t) / (self.t_start - self.t_end), 0.0), 1.0)
        return self.w_start + (self.w_end - self.w_start) * progress


@dataclass(frozen=True)
class Interval:
    """Guidance w on the steps that start at a time t in (t_lo, t_hi], none (w = 0) on the others."""

    w: float
    t_hi: float
    t_lo: float

    def __post_init__(self):
        if not self.t_hi > self.t_lo:
            raise ValueError(f"an Interval needs t_hi > t_lo, got t_hi = {self.t_hi} and t_lo = {self.t_lo}")

    def at(self, t):
        """w at time t (a float): self.w inside the interval, 0.0 outside."""
        return self.w if self.t_lo < t <= self.t_hi else 0.0


def is_constant(w):
    """True for a spec that gives every step the same w: a number or a (B,) tensor."""
    return torch.is_tensor(w) or (isinstance(w, (int, float)) and not isinstance(w, bool))


def per_step(w, ts, f=None):
    """The guidance weight of each of the N steps of the grid ts (N + 1,), passed through f.

    f (default: none) maps one step's w to what the sampler needs from it, e.g. the student's Eq. 7
    term. For a constant spec f runs once and every step shares its result, so a constant w costs
    what it cost before schedules existed and gives bit for bit the same samples; otherwise f runs
    once per step. Returns a list of N values.
    """
    f = f or (lambda v: v)
    N = len(ts) - 1
    if is_constant(w):
        return [f(w)] * N
    if isinstance(w, (list, tuple)):
        if len(w) != N:
            raise ValueError(f"a per-step w list needs one value per sampling step: got {len(w)} values "
                             f"for {N} steps")
        return [f(float(v)) for v in w]
    if isinstance(w, (Ramp, Interval)):
        return [f(w.at(float(t))) for t in ts[:-1]]
    raise ValueError(f"w must be a number, a (B,) tensor, a list of per-step values, a Ramp or an Interval; "
                     f"got {type(w).__name__}")
