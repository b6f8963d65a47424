"""Guidance: CFG (Eq. 2), naive embedding fusion (Eq. 5), and the students' guidance terms:
TeEFusion (Eq. 7), DistillCFG (Meng et al. 2023) and the G(psi(w)) ablation (Table 3).

Convention: `w` is the paper's guidance weight, v = (1 + w) v(c) - w v(∅). diffusers'
`guidance_scale` is w + 1 (`w_from_guidance_scale`). Every w below may be a Python number or a
(B,) tensor (one w per sample, as Alg. 1 draws them).

A "net" is anything called as net(x, t, tokens, pooled) -> v: an MMDiT or the pass counter of
samplers.py. A student (`Student`) reads G and F from its model and builds Eq. 7's z^ in `z_hat`.

Negative prompts: wherever ∅ (`u`) appears below, a negative prompt's encoding may take its place.
CFG then pushes away from it, (1 + w) v(c) - w v(neg), and the student's Eq. 7 term becomes
G(psi(w)) ⊙ F(pooled(c) - pooled(neg)) while the attention still sees c's tokens only. The paper's
students were distilled with ∅ alone, so for them this is an experiment (see docs/toy-results.md).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from .flow import per_sample
from .mmdit import PSI_DIM, W_ROUNDINGS, MLPEmbedder

# The authors' released code divides the product G(psi(w)) * F(c - ∅) by 256 before adding it to
# z (AIDC-AI/TeEFusion, pipelines/sd3_model.py). The paper's Eq. 7 omits it. We keep it so that
# their released student and ours are interchangeable; it keeps the new term small next to
# G(psi(t)) + F(c) when distillation starts from the teacher.
TEEFUSION_DIVISOR = 256.0

STUDENT_KINDS = ("teefusion", "distillcfg", "gpsi_ablation")

PAPER_W_RANGE = (2.0, 14.0)  # Alg. 1 draws w ~ U[2, 14] (Sec. 6.1): the range a student knows


@dataclass
class Text:
    """A text condition in SD3's two parts: c (a prompt), ∅ (the empty prompt), or a negative prompt
    used in ∅'s place."""

    tokens: torch.Tensor  # (B, L, joint_attention_dim), what the joint attention sees
    pooled: torch.Tensor  # (B, pooled_projection_dim), what drives adaLN through F

    def expand(self, B):
        """The same condition for B samples (∅ is usually encoded once, with batch 1)."""
        return Text(self.tokens.expand(B, -1, -1), self.pooled.expand(B, -1))


def w_from_guidance_scale(guidance_scale):
    """diffusers' guidance_scale s (v = v_u + s (v_c - v_u)) -> the paper's w = s - 1."""
    return guidance_scale - 1.0


def cfg(v_c, v_u, w):
    """Eq. 2: (1 + w) v(x_t, c) - w v(x_t, ∅)."""
    w = per_sample(w, v_c)
    return (1 + w) * v_c - w * v_u


def guided_velocity(net, x, t, c: Text, u: Text, w):
    """Eq. 2 with a model: the conditional and unconditional passes run as one batch of 2B.
    u is ∅, or a negative prompt in its place.

    When w is the number 0 the result is v(c) alone, and when it is -1 it is v(∅) alone
    (diffusers' guidance scale 1 and 0, W2SD's weak and Z-Sampling's inversion defaults): then
    only that one pass runs. The samplers report such a skipped pass (samplers.Samples).
    """
    B = x.shape[0]
    t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(B)
    if not torch.is_tensor(w) and w == 0:
        return net(x, t, c.tokens, c.pooled)
    if not torch.is_tensor(w) and w == -1:
        return net(x, t, u.tokens, u.pooled)
    v_c, v_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c.tokens, u.tokens]),
                   torch.cat([c.pooled, u.pooled])).chunk(2)
    return cfg(v_c, v_u, w)


def naive_fusion(c: Text, u: Text, w):
    """Eq. 5: c^ = c + w (c - ∅), on the token embeddings and the pooled vector alike, for one pass
    of the undistilled model. Its variance grows as O(w^2) (Sec. 5), which is why it breaks at
    large w and why Eq. 7 moves w into a sinusoidal embedding instead."""
    wt = per_sample(w, c.tokens)
    wp = per_sample(w, c.pooled)
    return Text(c.tokens + wt * (c.tokens - u.tokens), c.pooled + wp * (c.pooled - u.pooled))


class DistillCFG(MLPEmbedder):
    """The DistillCFG baseline (Meng et al. 2023; FLUX.1-dev's guidance embedding): z += H(psi(w)),
    H a new MLP shaped like G (this module), reading psi(1000 w) (Student.z_hat). The authors' code
    names it `guidance_in`, with `linear_1` and `linear_2` as here, so saved under the prefix
    `guidance_in.` its keys match. Our choice: H's last layer starts at zero, so the student starts
    equal to the teacher."""

    def __init__(self, dim):
        super().__init__(PSI_DIM, dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)


class Student(nn.Module):
    """A one-pass student and how the guidance weight w enters its conditioning z (Eq. 6-7; the
    DistillCFG and G(psi(w)) baselines of Table 3).

    kind: "teefusion" (Eq. 7), "distillcfg" (H(psi(w)), H a new MLP, given as `H`) or
    "gpsi_ablation" (G(psi(w)), Table 3). `divisor` divides the TeEFusion term and the ablation's
    alike. `w_range`: the [w_min, w_max] of Alg. 1 it was distilled on (default the paper's), which
    sampling keeps to. `w_rounding`: how 1000 w is built before psi, for every kind: "float32"
    (ours) or "authors-bf16" (rounded in bf16 as the authors' pipeline does, for their released
    student; mmdit.psi_input). Their model's forward reads guidance_in's w through the same
    time_proj as TeEFusion's, so DistillCFG takes the same rounding (their released pipeline
    builds only TeEFusion's value).
    A module holding the model and H, so that one DDP wrapper around it sees every trained
    parameter, those used by the term included, inside its forward.
    """

    def __init__(self, model: nn.Module, kind="teefusion", H: nn.Module | None = None,
                 divisor=TEEFUSION_DIVISOR, w_range=PAPER_W_RANGE, w_rounding="float32"):
        super().__init__()
        if kind not in STUDENT_KINDS:
            raise ValueError(f"unknown student kind {kind!r}; choose one of {', '.join(STUDENT_KINDS)}")
        if kind == "distillcfg" and H is None:
            raise ValueError("a distillcfg student needs its guidance MLP H (guidance.DistillCFG)")
        if not w_range[0] <= w_range[1]:
            raise ValueError(f"w_range must be (w_min, w_max) with w_min <= w_max, got {tuple(w_range)}")
        if w_rounding not in W_ROUNDINGS:
            raise ValueError(f"unknown w_rounding {w_rounding!r}; choose one of {', '.join(W_ROUNDINGS)}")
        self.model, self.kind, self.H, self.divisor, self.w_range = model, kind, H, divisor, tuple(w_range)
        self.w_rounding = w_rounding

    def check_w(self, w):
        """Refuse a guidance weight (a number or a (B,) tensor) outside the trained w_range.

        We refuse rather than clamp: clamping would sample at another w than the one asked for,
        silently. Outside the range the term is a function of w that training never fitted, and
        w = 0 in particular is not "no guidance" for a student: G(psi(0)) (and H(psi(0))) is not
        zero, so the term still moves z. A schedule for a student must stay inside the range.
        """
        lo, hi = self.w_range
        values = w.flatten().tolist() if torch.is_tensor(w) else [float(w)]
        bad = [v for v in values if not lo <= v <= hi]
        if bad:
            raise ValueError(f"w = {bad[0]:g} is outside [{lo:g}, {hi:g}], the range this student was distilled "
                             f"on; w = 0 is not 'no guidance' for a student (G(psi(0)) is not zero, so its term "
                             f"still acts): use a w inside the range, and a schedule that stays inside it "
                             f"(a Ramp, not an Interval)")

    def z_hat(self, t, w, c: Text, u: Text):
        """Eq. 7, the student's conditioning vector, as the authors' released code computes it:

            z^ = G(psi(t)) + F(c) + G(psi(w)) ⊙ F(c - ∅) / divisor

        - G and psi are the model's own timestep MLP and sinusoid (Eq. 6), and w is scaled by 1000
          exactly like t (`MMDiT.psi`); 1000 w is built as `w_rounding` says;
        - F is the model's own pooled-text MLP, applied to the difference of the pooled vectors
          (difference first, then F: "c - ∅ is computed after projection to the text embedding
          space" means F's input space, the pooled vector); with a negative prompt as u, F's input
          is pooled(c) - pooled(neg), as in the authors' pipeline;
        - the divisor is 256 in the authors' SD3 code (TEEFUSION_DIVISOR) and absent (1) in the
          paper's Eq. 7; it sets the term's size next to z, which depends on the model.
        The baselines of Table 3 change the last term: G(psi(w)) / divisor (the ablation, divided
        like the TeEFusion term it is compared with), or H(psi(w)) (DistillCFG, H a new MLP).
        t, w: numbers or (B,); c (B, ...), u (B or 1, ...). Returns (B, D).
        """
        G, F = self.model.G, self.model.F
        z = G(self.model.psi(t)) + F(c.pooled)  # Eq. 6: the teacher's z_{t,c}, (B, D)
        psi_w = self.model.psi(w, self.w_rounding)  # psi(1000 w), (B or 1, 256)
        if self.kind == "teefusion":
            return z + G(psi_w) * F(c.pooled - u.pooled) / self.divisor  # Eq. 7
        if self.kind == "gpsi_ablation":
            return z + G(psi_w) / self.divisor  # Table 3: G(psi(w)) alone
        return z + self.H(psi_w)  # DistillCFG: H(psi(w))

    def forward(self, x, t, c: Text, u: Text, w):
        """v_S(x_t, z^), one forward pass (Alg. 1 line 13, and every step of the student's sampler):
        w enters through z^ (Eq. 7); the attention sees the conditional tokens only."""
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])  # (B,)
        return self.model(x, t, c.tokens, c.pooled, z=self.z_hat(t, w, c, u))
