"""schedules.py and per-step guidance in every sampler: values by hand, a constant schedule equal to
the scalar w bit for bit, passes counted inside and outside a guidance interval, and the student
kept inside its trained range."""

import pytest
import torch

from conftest import random_mmdit
from test_samplers import X0, Field, text
from tinyteef import samplers
from tinyteef.flow import time_grid
from tinyteef.guidance import Student, Text, teefusion_term
from tinyteef.schedules import Interval, Ramp, per_step


def test_per_step_values_by_hand():
    ts = time_grid(4)  # steps start at t = 1, 0.75, 0.5, 0.25
    assert per_step(Ramp(2.0, 8.0), ts) == [2.0, 3.5, 5.0, 6.5]  # 2 + 6 (1 - t)
    assert per_step(Ramp(2.0, 8.0, t_start=0.75, t_end=0.25), ts) == [2.0, 2.0, 5.0, 8.0]  # held outside
    assert per_step(Interval(5.0, t_hi=0.8, t_lo=0.3), ts) == [0.0, 5.0, 5.0, 0.0]  # (0.3, 0.8]
    assert per_step(Interval(5.0, t_hi=1.0, t_lo=0.5), ts) == [5.0, 5.0, 0.0, 0.0]  # t_hi included, t_lo not
    assert per_step([1, 2, 3, 4], ts) == [1.0, 2.0, 3.0, 4.0]
    calls = []
    assert per_step(3.0, ts, lambda v: calls.append(v) or 2 * v) == [6.0] * 4
    assert calls == [3.0]  # a constant is mapped once, for all steps
    w = torch.tensor([2.0, 7.0])
    assert all(v is w for v in per_step(w, ts))  # a per-sample tensor is constant over the steps


def test_bad_schedules():
    ts = time_grid(4)
    with pytest.raises(ValueError, match="3 values for 4 steps"):
        per_step([1.0, 2.0, 3.0], ts)
    with pytest.raises(ValueError, match="got str"):
        per_step("5", ts)
    with pytest.raises(ValueError, match="t_start > t_end"):
        Ramp(2.0, 8.0, t_start=0.2, t_end=0.6)
    with pytest.raises(ValueError, match="t_hi > t_lo"):
        Interval(5.0, t_hi=0.3, t_lo=0.8)


def test_per_step_w_on_a_constant_field_by_hand():
    # v(c) = 1, v(∅) = 3: Eq. 2 gives 1 - 2 w_i on step i. Four steps of -0.25 from x:
    # x - 0.25 sum(1 - 2 w_i) = x - 0.25 (4 - 2 * 6) = x + 2 for w = [0, 1, 2, 3]; the step at w = 0
    # needs v(c) only, so 1 + 2 + 2 + 2 = 7 passes are made of the nominal 8
    s = samplers.euler_cfg(Field(), X0, time_grid(4), text(1.0), text(3.0), [0.0, 1.0, 2.0, 3.0])
    assert torch.allclose(s.x, X0 + 2)
    assert (s.passes, s.nominal) == (7, 8)


def test_guidance_interval_counts_passes():
    # 8 steps start at t = 1, 0.875, ..., 0.125; four of them (0.75, 0.625, 0.5, 0.375) lie in
    # (0.3, 0.8]. Euler+CFG: 2 passes on those, 1 (v(c) alone) on the other four.
    ts, c, u = time_grid(8), text(1.0), text(3.0)
    interval = Interval(5.0, t_hi=0.8, t_lo=0.3)
    s = samplers.euler_cfg(Field(), X0, ts, c, u, interval)
    assert (s.passes, s.nominal, s.skipped) == (4 * 2 + 4 * 1, 16, 4)
    # inside v = 1 - 2 * 5 = -9, outside v = 1: x - (4 * -9 + 4 * 1) / 8 = x + 4
    assert torch.allclose(s.x, X0 + 4)
    # Z-Sampling reflects on steps 0-6 and inverts at w_inv = -1 (v(∅), 1 pass). A reflected step
    # makes 2 + 1 + 2 = 5 passes inside the interval and 1 + 1 + 1 = 3 outside; the last step
    # (t = 0.125, outside) 1: 4 * 5 + 3 * 3 + 1 = 30 of the nominal 7 * 6 + 2 = 44
    s = samplers.z_sampling(Field(), X0, ts, c, u, interval)
    assert (s.passes, s.nominal) == (30, 44)


@pytest.fixture(scope="module")
def tiny():
    """A random tiny MMDiT (teacher, student and weak model at once), prompts, ∅ and a noise."""
    g = torch.Generator().manual_seed(0)
    c = Text(torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g))
    u = Text(torch.zeros(1, 5, 12), torch.zeros(1, 10)).expand(2)
    return random_mmdit(), c, u, torch.randn(2, 4, 8, 8, generator=g)


def test_constant_schedule_equals_scalar_bit_for_bit(tiny):
    model, c, u, x = tiny
    ts = time_grid(3)
    runs = {"euler_cfg": lambda w: samplers.euler_cfg(model, x, ts, c, u, w),
            "naive": lambda w: samplers.naive(model, x, ts, c, u, w),
            "z_sampling": lambda w: samplers.z_sampling(model, x, ts, c, u, w),
            "w2sd": lambda w: samplers.w2sd(model, model, x, ts, c, u, w, w_weak=None),
            "student": lambda w: samplers.student(Student(model), x, ts, c, u, w)}
    for name, run in runs.items():
        scalar = run(5.0)
        for spec in ([5.0, 5.0, 5.0], Ramp(5.0, 5.0)):
            s = run(spec)
            assert torch.equal(s.x, scalar.x) and s.passes == scalar.passes, (name, spec)


def test_student_schedule_takes_each_steps_term(tiny, monkeypatch):
    # two Euler steps written out, each with its own Eq. 7 term: w = 2 at t = 1, w = 8 at t = 0.5
    model, c, u, x = tiny
    ts = time_grid(2)
    with torch.no_grad():
        x1 = x + (ts[1] - ts[0]) * model(x, ts[0], c.tokens, c.pooled, teefusion_term(model, 2.0, c, u))
        expected = x1 + (ts[2] - ts[1]) * model(x1, ts[1], c.tokens, c.pooled, teefusion_term(model, 8.0, c, u))
    assert torch.allclose(samplers.student(Student(model), x, ts, c, u, [2.0, 8.0]).x, expected, atol=1e-6)
    # the student's forward computes the term on every step, with that step's w
    calls = []
    term = Student.term
    monkeypatch.setattr(Student, "term", lambda self, w, c, u: calls.append(w) or term(self, w, c, u))
    samplers.student(Student(model), x, time_grid(4), c, u, 5.0)
    assert calls == [5.0] * 4
    calls.clear()
    samplers.student(Student(model), x, time_grid(4), c, u, Ramp(2.0, 8.0))
    assert calls == [2.0, 3.5, 5.0, 6.5]


def test_student_refuses_w_outside_its_trained_range(tiny):
    model, c, u, x = tiny
    ts = time_grid(4)
    with pytest.raises(ValueError, match=r"w = 0 is outside \[2, 14\].*G\(psi\(0\)\) is not zero"):
        samplers.student(Student(model), x, ts, c, u, Interval(5.0, t_hi=0.8, t_lo=0.3))
    with pytest.raises(ValueError, match=r"w = 15 is outside \[2, 14\]"):
        samplers.student(Student(model), x, ts, c, u, torch.tensor([5.0, 15.0]))
    with pytest.raises(ValueError, match=r"w = 1 is outside \[3, 9\]"):
        samplers.student(Student(model, w_range=(3.0, 9.0)), x, ts, c, u, 1.0)
    with pytest.raises(ValueError, match="w_min <= w_max"):
        Student(model, w_range=(9.0, 3.0))
    # the range's ends are inside
    assert samplers.student(Student(model), x, ts, c, u, [2.0, 14.0, 2.0, 14.0]).passes == 4
