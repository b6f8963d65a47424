"""flow.py against hand-computed values, closed forms, and diffusers' scheduler (within 1e-4 of the
reference's scale)."""

import math

import pytest
import torch

from conftest import assert_close_to_reference, oracle
from tinyteef.flow import (T_DISTS, euler_invert, euler_step, interpolate, next_t, sample_t, sample_t_logit_normal,
                           shift, time_grid, unshift, velocity_target)
from tinyteef.guidance import Text
from tinyteef.samplers import euler


def test_interpolation_and_velocity_by_hand():
    x0, eps = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), -1.0)
    # (1 - t) * 2 + t * (-1) at t = 0.25 and t = 1
    assert torch.allclose(interpolate(x0, eps, torch.tensor([0.25, 1.0])).flatten(), torch.tensor([1.25, -1.0]))
    assert interpolate(x0, eps, 0.0).flatten().tolist() == [2.0, 2.0]
    assert velocity_target(x0, eps).flatten().tolist() == [-3.0, -3.0]


def test_shift_by_hand():
    # s = 3: t' = 3t / (1 + 2t); 0.5 -> 1.5 / 2 = 0.75; the ends stay put
    assert shift(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist() == [0.0, 0.75, 1.0]
    assert abs(unshift(0.75, 3.0) - 0.5) < 1e-12
    assert shift(0.3, 1.0) == 0.3


def test_uniform_grid_by_hand():
    assert time_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    # s = 3: shift(0.5) = 0.75
    assert time_grid(2, 3.0).tolist() == [1.0, 0.75, 0.0]


def test_sd3_grid_equals_diffusers_scheduler():
    diffusers = oracle("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(28)
    ours = time_grid(28, 3.0, tau_last=shift(1e-3, 3.0))
    assert_close_to_reference(ours, sched.sigmas, what="sigmas")


def test_next_t_by_hand():
    # s = 3, N = 4: unshift(0.75) = 0.5, minus 1/4 = 0.25, shift(0.25) = 0.75 / 1.5 = 0.5
    assert abs(float(next_t(torch.tensor(0.75), 4, 3.0)) - 0.5) < 1e-6
    # uniform grid: one step of 1/4 below 0.6 is 0.35; below the first step it clamps to 0
    assert torch.allclose(next_t(torch.tensor([0.6, 0.1]), 4), torch.tensor([0.35, 0.0]))


def test_logit_normal_quantiles():
    # t = sigmoid(u), u ~ N(m, s^2): P(t < sigmoid(m + s)) = Phi(1) = 0.8413, median sigmoid(m)
    g = torch.Generator().manual_seed(0)
    t = sample_t_logit_normal(200_000, mean=1.0, std=0.5, generator=g)
    assert abs(t.median().item() - 1 / (1 + math.exp(-1.0))) < 3e-3
    frac = (t < 1 / (1 + math.exp(-1.5))).float().mean().item()
    assert abs(frac - 0.5 * (1 + math.erf(1 / math.sqrt(2)))) < 3e-3
    assert t.min() > 0 and t.max() < 1


def ks_distance(draws, cdf):
    """Kolmogorov-Smirnov statistic: sup over t of |empirical CDF - cdf(t)|."""
    x = draws.double().sort().values
    n = len(x)
    F = cdf(x)
    return max((torch.arange(1, n + 1) / n - F).max().item(), (F - torch.arange(n) / n).max().item())


def test_t_draws_follow_their_closed_form_cdfs():
    # Alg. 1's U[0, 1] has CDF t; the logit-normal's is Phi((logit t - m) / s). Kolmogorov-Smirnov
    # at n = 20,000: the 0.1% critical distance is 1.95 / sqrt(n) = 0.0138.
    n, crit = 20_000, 1.95 / math.sqrt(20_000)
    phi = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    cdfs = {"uniform": lambda t: t, "logit-normal": lambda t: phi((torch.log(t / (1 - t)) - 0.5) / 1.5)}
    draws = {d: sample_t(n, d, mean=0.5, std=1.5, generator=torch.Generator().manual_seed(1)) for d in T_DISTS}
    for d in T_DISTS:
        assert ks_distance(draws[d], cdfs[d]) < crit, d
        assert draws[d].min() > 0 and draws[d].max() <= 1
    # each is far from the other's CDF: the test tells them apart
    assert ks_distance(draws["uniform"], cdfs["logit-normal"]) > 5 * crit
    assert ks_distance(draws["logit-normal"], cdfs["uniform"]) > 5 * crit
    with pytest.raises(ValueError, match="unknown t distribution 'beta'"):
        sample_t(4, "beta")


def test_sd3_grid_mass_above_three_quarters():
    # The 14 of 28 steps of SD3's shift-3 grid above t = 0.75 (shift(0.5, 3) = 0.75): 25% of U[0, 1]
    # and P(sigmoid(u) > 0.75) = 1 - Phi(ln 3) = 13.6% of the standard logit-normal.
    ts = time_grid(28, 3.0)
    assert (ts[:-1] > 0.75).sum() == 14 and abs(ts[14].item() - 0.75) < 1e-6
    g = torch.Generator().manual_seed(0)
    assert abs((sample_t(200_000, "uniform", generator=g) > 0.75).float().mean().item() - 0.25) < 3e-3
    expected = 1 - 0.5 * (1 + math.erf(math.log(3) / math.sqrt(2)))
    assert abs(expected - 0.136) < 1e-3
    assert abs((sample_t(200_000, "logit-normal", generator=g) > 0.75).float().mean().item() - expected) < 3e-3


def test_euler_on_linear_field_closed_form():
    # dx/dt = a x integrated by N Euler steps of -1/N from t = 1 to 0: x_N = (1 - a / N)^N x_0
    a, N = 0.7, 5
    x0 = torch.tensor([[1.0, -2.0]])
    no_text = Text(torch.zeros(1, 1, 1), torch.zeros(1, 1))  # the field ignores it
    x = euler(lambda x, t, tokens, pooled: a * x, x0, time_grid(N), no_text).x
    assert torch.allclose(x, x0 * (1 - a / N) ** N)


def test_inversion_undoes_a_step_on_a_constant_field():
    x = torch.randn(3, 2, 4, 4)
    v = torch.randn(3, 2, 4, 4)  # a constant field: the same v at every point
    t, t_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.7, 0.25, 0.0])
    x_next = euler_step(x, v, t, t_next)
    assert torch.allclose(x_next, x - (t - t_next).view(-1, 1, 1, 1) * v)  # by hand
    assert torch.allclose(euler_invert(x_next, v, t_next, t), x, atol=1e-6)
