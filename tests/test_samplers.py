"""samplers.py: closed forms on fields whose flow is known, identities between the reflection
samplers, and forward-pass counts."""

import pytest
import torch

from conftest import random_mmdit
from tinyteef import samplers
from tinyteef.flow import time_grid
from tinyteef.guidance import Student, Text
from tinyteef.samplers import reflect


class Field:
    """v(x, t, c) = a(c) * x + b(c), with a = pooled[:, 1] and b = pooled[:, 0]; counts rows."""

    def __init__(self):
        self.rows = 0

    def __call__(self, x, t, tokens, pooled):
        self.rows += x.shape[0]
        return pooled[:, 1, None, None, None] * x + pooled[:, 0, None, None, None]


def text(b, a=0.0, B=2):
    pooled = torch.tensor([b, a, 0.0]).expand(B, 3).clone()
    return Text(torch.full((B, 2, 4), float(b)), pooled)


X0 = torch.arange(8.0).reshape(2, 1, 2, 2)


def test_euler_constant_and_linear_fields():
    # constant v = 2 from t = 1 to 0: x - 2; linear v = 0.5 x with 4 steps: (1 - 0.5 / 4)^4 x
    assert torch.allclose(samplers.euler(Field(), X0, time_grid(4), text(2.0)).x, X0 - 2)
    assert torch.allclose(samplers.euler(Field(), X0, time_grid(4), text(0.0, a=0.5)).x, X0 * 0.875 ** 4)


def test_euler_cfg_and_naive_by_hand():
    c, u = text(1.0), text(3.0)
    # Eq. 2 on constants: 3 * 1 - 2 * 3 = -3 everywhere, so x_0 = x_1 + 3
    assert torch.allclose(samplers.euler_cfg(Field(), X0, time_grid(3), c, u, 2.0).x, X0 + 3)
    # Eq. 5: b^ = 1 + 2 (1 - 3) = -3, the same constant field here
    assert torch.allclose(samplers.naive(Field(), X0, time_grid(3), c, u, 2.0).x, X0 + 3)


def test_one_reflection_step_by_hand():
    # v_strong = x, v_weak = 3x, t = 1 -> 0.5:
    # x' = x - 0.5 x = 0.5 x; x~ = 0.5x + 0.5 * 3 * 0.5x = 1.25 x; x'' = 1.25x - 0.5 * 1.25x = 0.625 x
    # (at w = 0 a CFG velocity is the conditional prediction alone: here the net itself)
    strong, weak = (lambda x, t, tokens, pooled: x), (lambda x, t, tokens, pooled: 3 * x)
    x_tilde, x_next = reflect(strong, weak, X0, 1.0, 0.5, text(0.0), text(0.0), 0, 0)
    assert torch.allclose(x_tilde, 1.25 * X0) and torch.allclose(x_next, 0.625 * X0)



def test_reflection_loop_by_hand():
    # the same step as above inside the samplers' loop, then one plain Euler step 0.5 -> 0:
    # 0.625 x - 0.5 * 0.625 x = 0.3125 x. Z-Sampling: v_strong = v(c) = x at w = 0, v_weak = v(∅) = 3x
    # at w_inv = -1; W2SD: the weak model's v(c) = 3x at w_weak = 0. One pass per velocity: 3 on the
    # reflected step, 1 on the last, of the nominal 6 + 2.
    c, u, ts = text(0.0, a=1.0), text(0.0, a=3.0), time_grid(2)
    z = samplers.z_sampling(Field(), X0, ts, c, u, 0.0, w_inv=-1.0, reflect_steps=1)
    weak = lambda x, t, tokens, pooled: 3 * x
    w2sd = samplers.w2sd(Field(), weak, X0, ts, c, u, 0.0, w_weak=0.0, reflect_steps=1)
    for s in (z, w2sd):
        assert torch.allclose(s.x, 0.3125 * X0)
        assert (s.passes, s.nominal, s.skipped) == (4, 8, 4)


def test_z_sampling_with_equal_guidance_on_constant_field_equals_euler_cfg():
    # inverting with the same constant velocity undoes the denoising exactly, so each reflected
    # step lands where one Euler step would
    c, u, ts = text(1.0), text(3.0), time_grid(5)
    z = samplers.z_sampling(Field(), X0, ts, c, u, 2.0, w_inv=2.0)
    assert torch.allclose(z.x, samplers.euler_cfg(Field(), X0, ts, c, u, 2.0).x)
    assert torch.allclose(z.x, X0 + 3)


def test_w2sd_with_weak_equal_strong_equals_z_sampling():
    # on a field that is not constant, so that reflection moves the sample
    c, u, ts = text(1.0, a=0.6), text(-1.0, a=-0.3), time_grid(6)
    w2sd = samplers.w2sd(Field(), Field(), X0, ts, c, u, 3.0, w_weak=1.5)
    z = samplers.z_sampling(Field(), X0, ts, c, u, 3.0, w_inv=1.5)
    euler = samplers.euler_cfg(Field(), X0, ts, c, u, 3.0)
    assert torch.allclose(w2sd.x, z.x)
    assert not torch.allclose(z.x, euler.x)
    # w_weak = None inverts at the strong w: equal to w_weak = 3.0, with all 6 passes made
    same = samplers.w2sd(Field(), Field(), X0, ts, c, u, 3.0, w_weak=None)
    assert torch.equal(same.x, samplers.w2sd(Field(), Field(), X0, ts, c, u, 3.0, w_weak=3.0).x)
    assert same.skipped == 0


@pytest.mark.parametrize("N", [1, 4])
def test_forward_pass_counts(N):
    c, u, ts = text(1.0), text(3.0), time_grid(N)
    model = random_mmdit()
    mc = Text(torch.randn(2, 5, 12), torch.randn(2, 10))
    mu = Text(torch.zeros(2, 5, 12), torch.zeros(2, 10))
    x = torch.randn(2, 4, 8, 8)
    runs = {  # name: (Samples, passes per step on reflected steps, on the last step)
        "euler": (samplers.euler(Field(), X0, ts, c), 1, 1),
        "euler_cfg": (samplers.euler_cfg(Field(), X0, ts, c, u, 2.0), 2, 2),
        "naive": (samplers.naive(Field(), X0, ts, c, u, 2.0), 1, 1),
        "student": (samplers.student(Student(model), x, ts, mc, mu, 2.0), 1, 1),
        "z_sampling": (samplers.z_sampling(Field(), X0, ts, c, u, 2.0, w_inv=0.5), 6, 2),
        "w2sd": (samplers.w2sd(Field(), Field(), X0, ts, c, u, 2.0, w_weak=0.5), 6, 2),
    }
    for name, (s, per_step, last) in runs.items():
        expected = per_step * (N - 1) + last if name in ("z_sampling", "w2sd") else per_step * N
        assert (s.passes, s.nominal, s.skipped, s.steps) == (expected, expected, 0, N), name


def test_default_inversion_guidance_skips_one_pass_per_reflected_step():
    # Z-Sampling's default w_inv = -1 needs v(∅) only; W2SD with w_weak = 0 needs v(c) only:
    # 5 passes made on each of the 3 reflected steps, 2 on the last; nominal 6 * 3 + 2. W2SD's
    # default w_weak = None inverts with CFG at w: all 6 passes made.
    c, u, ts = text(1.0), text(3.0), time_grid(4)
    for s in (samplers.z_sampling(Field(), X0, ts, c, u, 2.0),
              samplers.w2sd(Field(), Field(), X0, ts, c, u, 2.0, w_weak=0.0)):
        assert (s.passes, s.nominal, s.skipped) == (17, 20, 3)
    assert samplers.w2sd(Field(), Field(), X0, ts, c, u, 2.0).passes == 20
    # reflect_steps = 1: one reflected step (5 passes), three plain CFG steps (2 each)
    s = samplers.z_sampling(Field(), X0, ts, c, u, 2.0, reflect_steps=1)
    assert (s.passes, s.nominal) == (11, 12)


def test_negative_prompt_in_place_of_empty_by_hand():
    # v(c) = 1 and v(neg) = -2: Eq. 2 gives (1 + w) + 2 w = 7 at w = 2, and Eq. 5 the same constant
    # b^ = 1 + 2 (1 - (-2)); three steps from t = 1 to 0 add -7
    c, neg, ts = text(1.0), text(-2.0), time_grid(3)
    assert torch.allclose(samplers.euler_cfg(Field(), X0, ts, c, neg, 2.0).x, X0 - 7)
    assert torch.allclose(samplers.naive(Field(), X0, ts, c, neg, 2.0).x, X0 - 7)
    # reflecting with equal guidance on a constant field lands where Euler does
    assert torch.allclose(samplers.z_sampling(Field(), X0, ts, c, neg, 2.0, w_inv=2.0).x, X0 - 7)
    assert torch.allclose(samplers.w2sd(Field(), Field(), X0, ts, c, neg, 2.0, w_weak=None).x, X0 - 7)


def test_student_with_negative_prompt_by_hand():
    # one Euler step from t = 1 to 0, written out: the attention sees c's tokens, z gets
    # G(psi(1000 w)) * F(pooled(c) - pooled(neg)) / 256 (G, F and psi of the model, Eq. 7)
    from tinyteef.mmdit import psi
    model = random_mmdit()
    g = torch.Generator().manual_seed(3)
    c, neg = (Text(torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)) for _ in range(2))
    empty = Text(torch.zeros(2, 5, 12), torch.zeros(2, 10))
    x, w = torch.randn(2, 4, 8, 8, generator=g), 6.0
    tte = model.time_text_embed
    with torch.no_grad():
        term = tte.timestep_embedder(psi(torch.tensor([1000 * w]))) * tte.text_embedder(c.pooled - neg.pooled) / 256
        z = tte.timestep_embedder(psi(torch.ones(2) * 1000)) + tte.text_embedder(c.pooled) + term  # Eq. 7
        expected = x - model(x, torch.ones(2), c.tokens, c.pooled, z=z)
        got = samplers.student(Student(model), x, time_grid(1), c, neg, w).x
        with_empty = samplers.student(Student(model), x, time_grid(1), c, empty, w).x
    assert torch.allclose(got, expected, atol=1e-6)
    assert (got - with_empty).abs().max() > 1e-3  # the negative prompt changes the sample
