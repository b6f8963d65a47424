"""The MMDiT against diffusers' SD3Transformer2DModel (same random weights; within 1e-4 of the
reference's scale), and its pieces against independent computations."""

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY, assert_close_to_reference, oracle, random_mmdit
from tinyteef.mmdit import MMDiT, MMDiTConfig, psi, psi_input, psi_scaled

VARIANTS = {  # name: (config overrides, latent height, width)
    "sd3": ({}, 8, 8),
    # SD3.5: qk RMSNorm, MMDiT-X dual attention in the first two blocks; a 6 x 10 latent is 3 x 5
    # patches, cropped from the 12 x 12 table at top = 4, left = 3
    "sd35-nonsquare": (dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)), 6, 10),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_with_diffusers(variant):
    diffusers = oracle("diffusers")
    overrides, H, W = VARIANTS[variant]
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(**{**TINY, **overrides}).eval()  # diffusers' random init
    ours = MMDiT(MMDiTConfig(**{**TINY, **overrides})).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, H, W, generator=g), torch.rand(2, generator=g)
    tokens, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                       timestep=1000 * t).sample
        got = ours(x, t, tokens, pooled)
    assert expected.abs().mean() > 0.1  # a nontrivial output
    assert_close_to_reference(got, expected, what="velocity")


def test_position_table_equals_diffusers():
    oracle("diffusers")
    from diffusers.models.embeddings import PatchEmbed
    for sample_size, P, D in [(8, 12, 16), (128, 24, 64)]:
        ref = PatchEmbed(height=sample_size, width=sample_size, patch_size=2, in_channels=4,
                         embed_dim=D, pos_embed_max_size=P)
        ours = MMDiT(MMDiTConfig(**{**TINY, "sample_size": sample_size, "pos_embed_max_size": P,
                                    "num_attention_heads": D // 8, "caption_projection_dim": D}))
        assert_close_to_reference(ours.pos_embed.pos_embed, ref.pos_embed, what=f"{P} x {P} position table")


def test_psi_by_hand_and_against_diffusers():
    e = psi(torch.tensor([0.0]))
    assert e.shape == (1, 256) and e[0, :128].eq(1).all() and e[0, 128:].eq(0).all()  # cos 0, sin 0
    # frequency 0 is 1: the first cos channel is cos(s), the first sin channel sin(s)
    s = torch.tensor([3.0])
    assert torch.allclose(psi(s)[0, [0, 128]], torch.tensor([torch.cos(s), torch.sin(s)]).flatten())
    oracle("diffusers")
    from diffusers.models.embeddings import get_timestep_embedding
    s = torch.tensor([0.5, 17.0, 999.0, 6000.0])
    ref = get_timestep_embedding(s, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert_close_to_reference(psi(s), ref, what="psi")


def test_guidance_scalar_is_not_rounded_in_bf16():
    # bf16 has 8 significant bits: 6 * 1000 stored in bf16 becomes 6016
    assert torch.tensor(6000.0, dtype=torch.bfloat16).item() == 6016.0
    weight = torch.zeros(1, dtype=torch.bfloat16)
    got = psi_scaled(6.0, weight)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, psi(torch.tensor([6000.0])).to(torch.bfloat16))
    assert not torch.equal(got, psi(torch.tensor([6016.0])).to(torch.bfloat16))


def test_authors_bf16_rounding_of_the_guidance_value():
    # By hand: bf16 keeps 8 significant bits, so between 4096 and 8192 it holds multiples of 32 and
    # between 8192 and 16384 multiples of 64; halfway cases go to the even multiple.
    # 5000 = 156.25 * 32 -> 156 * 32 = 4992; 6000 = 187.5 * 32 -> 188 * 32 = 6016;
    # 12000 = 187.5 * 64 -> 188 * 64 = 12032.
    w = torch.tensor([5.0, 6.0, 12.0])
    assert psi_input(w, "cpu", "authors-bf16").tolist() == [4992.0, 6016.0, 12032.0]
    assert psi_input(w, "cpu", "float32").tolist() == [5000.0, 6000.0, 12000.0]
    assert psi_input(5.0, "cpu", "authors-bf16").dtype == torch.float32  # the sinusoid stays float32
    weight = torch.zeros(1)
    assert torch.equal(psi_scaled(w, weight, "authors-bf16"), psi(torch.tensor([4992.0, 6016.0, 12032.0])))
    with pytest.raises(ValueError, match="unknown w rounding 'bf16'; choose one of float32, authors-bf16"):
        psi_input(w, "cpu", "bf16")


def test_token_stream_is_contiguous():
    # The residual stream keeps the layout of the patch embedding's output; a channels-first
    # (B, N, D) view made every block copy before LayerNorm and ran 0.87x of diffusers' speed on an
    # H100 at batch 4 (docs/sd3-performance.md). The stride check is independent of the values.
    model = MMDiT(MMDiTConfig(**TINY))
    tokens = model.pos_embed(torch.randn(3, 4, 8, 8))
    assert tokens.shape == (3, 16, 16) and tokens.stride() == (16 * 16, 16, 1)


def test_zero_initialised_blocks_are_identities():
    # adaLN-zero (DiT): with every gate at zero, a fresh block returns both streams unchanged
    model = MMDiT(MMDiTConfig(**TINY))
    x, c, z = torch.randn(2, 9, 16), torch.randn(2, 5, 16), torch.randn(2, 16)
    x_out, c_out = model.transformer_blocks[0](x, c, z)
    assert torch.equal(x_out, x) and torch.equal(c_out, c)
    assert model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 12), torch.randn(2, 10)).eq(0).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_mmdit(std=0.1)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing = True
    args = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 12), torch.randn(2, 10))
    for m in (model, ckpt):
        m(*args).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_estimate_equals_torch_flop_counter(variant):
    overrides, H, W = VARIANTS[variant]
    model = MMDiT(MMDiTConfig(**{**TINY, **overrides}))
    # the math attention backend runs as matmuls, which torch's FLOP counter sees
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(3, 4, H, W), torch.rand(3), torch.randn(3, 7, 12), torch.randn(3, 10))
    assert model.flops_per_forward(3, H, W, 7) == counter.get_total_flops()


def test_bad_inputs_say_what_to_do():
    model = MMDiT(MMDiTConfig(**TINY))
    text = (torch.randn(1, 5, 12), torch.randn(1, 10))
    with pytest.raises(ValueError, match="exceeds the position table"):
        model(torch.randn(1, 4, 26, 8), torch.rand(1), *text)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(torch.randn(1, 4, 7, 8), torch.rand(1), *text)
    with pytest.raises(ValueError, match="caption_projection_dim"):
        MMDiTConfig(**{**TINY, "caption_projection_dim": 32})
