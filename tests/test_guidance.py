"""guidance.py: Eq. 2 and Eq. 5 by hand, Eq. 7 against the authors' formula on diffusers' modules
(within 1e-4 of the reference's scale)."""

import pytest
import torch

from conftest import PARITY_RTOL, TINY, assert_close_to_reference, oracle, random_mmdit
from tinyteef.guidance import DistillCFG, Student, Text, cfg, guided_velocity, naive_fusion, w_from_guidance_scale


class ConstantNet:
    """v(x, t, c) = the first pooled channel, everywhere; records the rows of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, tokens, pooled):
        self.calls.append(x.shape[0])
        return pooled[:, :1, None, None].expand_as(x).clone()


def text(value, B=2):
    return Text(torch.full((B, 3, 4), float(value)), torch.full((B, 5), float(value)))


def test_eq2_by_hand():
    # (1 + 2) * 1 - 2 * 3 = -3; per sample w = [0, 1]: 1 and 2 * 1 - 3 = -1
    v_c, v_u = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 3.0)
    assert cfg(v_c, v_u, 2.0).eq(-3).all()
    assert cfg(v_c, v_u, torch.tensor([0.0, 1.0])).flatten(1)[:, 0].tolist() == [1.0, -1.0]


def test_guidance_scale_converter():
    # diffusers: v_u + s (v_c - v_u) = (1 + w) v_c - w v_u with w = s - 1
    assert w_from_guidance_scale(7.0) == 6.0
    assert w_from_guidance_scale(1.0) == 0.0 and w_from_guidance_scale(0.0) == -1.0


def test_guided_velocity_batches_and_skips():
    x = torch.zeros(2, 1, 2, 2)
    net = ConstantNet()
    assert guided_velocity(net, x, 0.5, text(1), text(3), 2.0).eq(-3).all()
    assert net.calls == [4]  # c and ∅ in one call of 2B rows
    net = ConstantNet()
    assert guided_velocity(net, x, 0.5, text(1), text(3), 0).eq(1).all() and net.calls == [2]  # v(c) only
    net = ConstantNet()
    assert guided_velocity(net, x, 0.5, text(1), text(3), -1.0).eq(3).all() and net.calls == [2]  # v(∅) only
    net = ConstantNet()  # a tensor w is never skipped, even where it is 0
    assert guided_velocity(net, x, 0.5, text(1), text(3), torch.zeros(2)).eq(1).all() and net.calls == [4]


def test_eq5_naive_fusion_by_hand():
    # c + w (c - ∅) = 2 + 3 * (2 - 1) = 5, on the tokens and the pooled vector
    fused = naive_fusion(text(2), text(1), 3.0)
    assert fused.tokens.eq(5).all() and fused.pooled.eq(5).all()
    fused = naive_fusion(text(2), text(1), torch.tensor([0.0, 1.0]))
    assert fused.pooled[:, 0].tolist() == [2.0, 3.0] and fused.tokens[:, 0, 0].tolist() == [2.0, 3.0]


def _shared_weights():
    """Our MMDiT and diffusers' SD3Transformer2DModel holding the same random weights."""
    diffusers = oracle("diffusers")
    ours = random_mmdit(std=0.2)
    ref = diffusers.SD3Transformer2DModel(**TINY).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def test_eq7_equals_the_authors_formula():
    ours, ref = _shared_weights()
    g = torch.Generator().manual_seed(0)
    c = Text(torch.randn(3, 5, 12, generator=g), torch.randn(3, 10, generator=g))
    u = Text(torch.randn(1, 5, 12, generator=g), torch.randn(1, 10, generator=g)).expand(3)
    w = torch.tensor([2.0, 5.0, 13.5])
    # The authors' code (AIDC-AI/TeEFusion, pipelines/sd3_model.py), written out:
    #   temb + timestep_embedder(time_proj(w * 1000)) * text_embedder(pooled_c - pooled_u) / 256.
    tte = ref.time_text_embed
    expected = tte.timestep_embedder(tte.time_proj(w * 1000.0)) * tte.text_embedder(c.pooled - u.pooled) / 256.0
    with torch.no_grad():
        x, t = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g)
        temb = tte(1000 * t, c.pooled) + expected
        assert_close_to_reference(Student(ours).z_hat(t, w, c, u), temb, what="Eq. 7's z^")
        # ... and the whole student forward: temb gets the term, the attention sees c's tokens only
        h, ctx = ref.pos_embed(x), ref.context_embedder(c.tokens)
        for block in ref.transformer_blocks:
            ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb)
        h = ref.proj_out(ref.norm_out(h, temb)).reshape(3, 4, 4, 2, 2, 4)
        v_authors = torch.einsum("nhwpqc->nchpwq", h).reshape(3, 4, 8, 8)
        v_ours = Student(ours)(x, t, c, u, w)
    assert_close_to_reference(v_ours, v_authors, what="student velocity")
    # the term moves the output 10x past what the parity check tolerates: one without it would fail
    assert (v_ours - ours(x, t, c.tokens, c.pooled)).abs().max() > 10 * PARITY_RTOL * v_authors.abs().max()


@pytest.mark.parametrize("divisor", [1.0, 256.0])
def test_gpsi_ablation_is_G_of_psi_of_w_over_the_teefusion_divisor(divisor):
    # Table 3 compares the ablation with the full term: both are divided by the same divisor
    ours, ref = _shared_weights()
    w, t = torch.tensor([3.0, 9.0]), torch.tensor([0.3, 0.8])
    tte = ref.time_text_embed
    c = Text(torch.randn(2, 5, 12), torch.randn(2, 10))
    u = Text(torch.zeros(1, 5, 12), torch.zeros(1, 10))
    with torch.no_grad():
        expected = tte(1000 * t, c.pooled) + tte.timestep_embedder(tte.time_proj(1000 * w)) / divisor
        assert_close_to_reference(Student(ours, "gpsi_ablation", divisor=divisor).z_hat(t, w, c, u), expected)


@pytest.mark.parametrize("kind", ["teefusion", "gpsi_ablation", "distillcfg"])
def test_authors_bf16_rounding_reaches_every_students_term(kind):
    """With w_rounding "authors-bf16" every kind reads w = 5, 6, 12 as 1000 w = 4992, 6016, 12032
    (by hand: bf16's 8 significant bits), with "float32" as 5000, 6000, 12000: each term against
    diffusers' time_proj and timestep_embedder on those values."""
    ours, ref = _shared_weights()
    H = DistillCFG(16) if kind == "distillcfg" else None
    g = torch.Generator().manual_seed(0)
    if H is not None:
        with torch.no_grad():
            H.linear_2.weight.normal_(generator=g)  # trained away from its zero init
    c = Text(torch.randn(3, 5, 12, generator=g), torch.randn(3, 10, generator=g))
    u = Text(torch.randn(3, 5, 12, generator=g), torch.randn(3, 10, generator=g))
    tte = ref.time_text_embed

    t = torch.tensor([0.2, 0.5, 0.9])

    def expected(values):  # the authors' temb, with 1000 w given as values
        p = tte.time_proj(torch.tensor(values))
        if kind == "distillcfg":
            term = H.linear_2(torch.nn.functional.silu(H.linear_1(p)))
        else:
            G = tte.timestep_embedder(p)
            term = G / 256.0 if kind == "gpsi_ablation" else G * tte.text_embedder(c.pooled - u.pooled) / 256.0
        return tte(1000 * t, c.pooled) + term

    w = torch.tensor([5.0, 6.0, 12.0])
    with torch.no_grad():
        for rounding, values in (("authors-bf16", [4992.0, 6016.0, 12032.0]), ("float32", [5000.0, 6000.0, 12000.0])):
            got = Student(ours, kind, H, w_rounding=rounding).z_hat(t, w, c, u)
            assert_close_to_reference(got, expected(values), what=rounding)
        assert not torch.allclose(Student(ours, kind, H, w_rounding="authors-bf16").z_hat(t, w, c, u),
                                  expected([5000.0, 6000.0, 12000.0]), atol=1e-3)


def test_unknown_w_rounding():
    with pytest.raises(ValueError, match="unknown w_rounding 'bf16'; choose one of float32, authors-bf16"):
        Student(random_mmdit(), w_rounding="bf16")


def test_distillcfg_starts_as_the_teacher():
    model = random_mmdit()
    H = DistillCFG(16)
    assert sorted(H.state_dict()) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    c = Text(torch.randn(2, 5, 12), torch.randn(2, 10))
    u = Text(torch.zeros(2, 5, 12), torch.zeros(2, 10))
    with torch.no_grad():
        assert H(model.psi(torch.tensor([2.0, 14.0]))).eq(0).all()  # zero-initialised last layer
        assert torch.equal(Student(model, "distillcfg", H)(x, t, c, u, 7.0),
                           model(x, t, c.tokens, c.pooled))
    with torch.no_grad():  # once trained, H(psi(1000 w)) depends on w
        H.linear_2.weight.normal_()
        s = Student(model, "distillcfg", H)
        assert not torch.allclose(s.z_hat(t, 2.0, c, u), s.z_hat(t, 3.0, c, u))


def test_unknown_student_kind():
    with pytest.raises(ValueError, match="unknown student kind 'eq7'"):
        Student(random_mmdit(), "eq7")
    with pytest.raises(ValueError, match="needs its guidance MLP H"):
        Student(random_mmdit(), "distillcfg")


def test_divisor_scales_the_term():
    # Eq. 7 as the paper writes it (divisor 1) is 256 times the authors' SD3 term
    # (float64, so that subtracting the shared Eq. 6 part leaves the small term exact enough)
    model = random_mmdit().double()
    c = Text(torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 10, dtype=torch.float64))
    u, t = Text(torch.zeros(2, 5, 12), torch.zeros(2, 10, dtype=torch.float64)), torch.tensor([0.4, 0.7])
    with torch.no_grad():
        z = model.conditioning(t, c.pooled)  # Eq. 6, the part both share
        paper, authors = (Student(model, divisor=d).z_hat(t, 3.0, c, u) - z for d in (1.0, 256.0))
    assert torch.allclose(paper, 256 * authors, rtol=1e-9)
