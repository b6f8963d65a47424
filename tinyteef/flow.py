"""Rectified flow, as SD3 uses it (Esser et al. 2024, below); the paper builds on it without restating it.

Data x0, noise eps ~ N(0, I), time t in [0, 1] with t = 1 pure noise:

    x_t = (1 - t) * x0 + t * eps,        v = dx_t/dt = eps - x0.

The network predicts v (the paper's eps_theta is this velocity: Sec. 3, footnote 1). Sampling integrates from t = 1 to
t = 0 on a decreasing grid with Euler steps; the reflection samplers (Eq. 3-4) also step *up* the
grid with an Euler inversion step.

References: Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis" (SD3): logit-normal t (Sec. 3.1), resolution-dependent time shift (Sec. 5.3.2).
"""

import torch


def per_sample(t, x):
    """Reshape a per-sample value (scalar or (B,)) so that it broadcasts against x (B, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


def interpolate(x0, eps, t):
    """x_t = (1 - t) x0 + t eps: the point on the straight path from data to noise (Alg. 1 line 7)."""
    t = per_sample(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0, eps):
    """v = eps - x0: the time derivative of x_t, what the network learns to predict."""
    return eps - x0


def sample_t_logit_normal(n, mean=0.0, std=1.0, generator=None, device=None):
    """SD3's training-time distribution of t: t = sigmoid(u), u ~ N(mean, std^2).

    It puts more training samples at intermediate t, where the velocity is hardest to predict
    (SD3 paper, Sec. 3.1; SD3 trains with mean 0, std 1). Its CDF is Phi((logit t - mean) / std).
    Returns (n,) float32.
    """
    u = torch.randn(n, generator=generator, device=device) * std + mean
    return torch.sigmoid(u)


def sample_t_uniform(n, generator=None, device=None):
    """Alg. 1 line 4 as the paper writes it: t ~ U[0, 1], drawn in (0, 1] (1 - U[0, 1)) so that
    t = 0, where the data point itself is x_t and a reflection step has size 0, never occurs.
    Its CDF is t. Returns (n,) float32."""
    return 1.0 - torch.rand(n, generator=generator, device=device)


T_DISTS = ("uniform", "logit-normal")  # p(t) of Alg. 1 line 4: the paper's, and SD3's pre-training


def sample_t(n, dist="uniform", mean=0.0, std=1.0, generator=None, device=None):
    """Alg. 1 line 4, t ~ p(t): "uniform" (the paper's U[0, 1]) or "logit-normal" (SD3's
    pre-training, `mean` and `std` of its normal). They differ most where reflection acts most:
    on SD3's 28-step shift-3 grid the 14 steps above t = 0.75 get 25% of the draws under U[0, 1]
    and 13.6% under the standard logit-normal. Returns (n,) float32."""
    if dist == "uniform":
        return sample_t_uniform(n, generator, device)
    if dist == "logit-normal":
        return sample_t_logit_normal(n, mean, std, generator, device)
    raise ValueError(f"unknown t distribution {dist!r}; choose one of {', '.join(T_DISTS)}")


def shift(t, s):
    """SD3's time shift t' = s t / (1 + (s - 1) t): with s > 1 more of the grid sits at high noise,
    which larger images need (s = 3 for SD3 at 1024 px, 1 = no shift)."""
    return s * t / (1 + (s - 1) * t)


def unshift(t, s):
    """The inverse of `shift`: the unwarped time tau such that shift(tau, s) = t."""
    return t / (s - (s - 1) * t)


def time_grid(steps, s=1.0, tau_last=None):
    """The decreasing sampling grid 1 = t_0 > t_1 > ... > t_N = 0, warped by `shift`.

    The unwarped times are tau_i = linspace(1, tau_last, N) followed by 0; tau_last defaults to 1/N,
    which gives the uniform grid linspace(1, 0, N + 1). SD3's scheduler
    (diffusers' FlowMatchEulerDiscreteScheduler) stops its linspace at tau_last = shift(0.001, s)
    instead: pass that to reproduce its sigmas exactly. Returns (N + 1,) float32.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    tau_last = 1.0 / steps if tau_last is None else tau_last
    tau = torch.linspace(1.0, tau_last, steps, dtype=torch.float64)  # (N,) unwarped
    t = shift(tau, s)
    return torch.cat([t, t.new_zeros(1)]).float()


def next_t(t, steps, s=1.0):
    """The grid point one Euler step below t on the uniform N-step grid warped by s:
    shift(unshift(t) - 1/N), clamped at 0. At the points of time_grid(N, s) it returns the next
    point of that grid, so a training-time t drawn anywhere in (0, 1] gets the step size the
    student will take there (used for the reflection target, distill.teacher_target)."""
    tau = unshift(t, s) - 1.0 / steps  # the unwarped time one step below
    return shift(tau.clamp(min=0.0), s)


def euler_step(x, v, t, t_next):
    """One Euler step of dx/dt = v from t to t_next: x + (t_next - t) v.

    Going down the grid (t_next < t) this denoises. Inputs: x (B, ...), v like x, t and t_next
    scalars or (B,).
    """
    return x + (per_sample(t_next, x) - per_sample(t, x)) * v


def euler_invert(x_next, v_next, t_next, t):
    """One Euler inversion step, from the less noisy t_next back up to t (Eq. 3's M_inv).

    x~ = x' + (t - t_next) v(x', t_next): explicit Euler run upwards (`euler_step` from t_next to
    t), evaluating the velocity at the point it starts from. It undoes a down step exactly on
    constant fields only; elsewhere it differs from the exact inverse by O(Δ²) per step. The
    reflection reference codes invert with DDIM at the noisier time label, which differs from this
    by O(Δ²) per step as well.
    """
    return euler_step(x_next, v_next, t_next, t)
