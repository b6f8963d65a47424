"""sd3/tiny.py's model folder and sd3/prompt.py's TextEncoders against diffusers.

The tiny folder is the shared ground: diffusers' StableDiffusion3Pipeline.from_pretrained loads it
(so its layout, configs and tokenizer files are real), and our loader loads the same files. Then
prompt encoding (prompt and negative "" embeddings, with and without T5), the transformer and
the VAE are compared in float32 within 1e-4 of the reference's scale.
"""

import os

import pytest
import torch
from conftest import assert_close_to_reference, oracle

from tinyteef.sd3.loader import load_transformer, load_vae
from tinyteef.sd3.prompt import TextEncoders
from tinyteef.sd3.tiny import SIZES, write_tiny_sd3

# No leading or trailing spaces: transformers 5's T5Tokenizer rebuilds tokenizer.json's pipeline
# with a WhitespaceSplit that drops them, where tokenizer.json itself (and our T5Tokenizer, and
# transformers 4's T5TokenizerFast) give a "▁" token for a trailing space.
PROMPTS = [
    "a photo of a cat",
    "A red Robot, riding 2 zebras at sunset: 4k (35mm)!!",  # capitals, unknown word, digits, "!" = pad of tokenizer_2
    ", ".join(["a beautiful detailed oil painting of an old man sitting with a small black cat under the "
               "golden sunset light by the river"] * 4),  # > 75 CLIP tokens, < 255 T5 tokens
]


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no_t5"])
def tiny(request, tmp_path_factory):
    """(folder, diffusers' pipeline, our TextEncoders) for a tiny model with or without T5."""
    diffusers = oracle("diffusers")
    oracle("transformers")
    folder = write_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"), seed=0, t5=request.param)
    # without T5, diffusers (whose own save_pretrained writes the [null, null] entries) must be
    # told so, as its documentation does for SD3 without T5
    no_t5 = {} if request.param else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, **no_t5)
    return folder, pipe, TextEncoders.load(folder)


def test_diffusers_loads_the_tiny_folder(tiny):
    """Every component loads in diffusers with the classes SD3 uses; ours agrees on the sizes;
    the whole folder is under 2 MB."""
    folder, pipe, ours = tiny
    t5 = ours.text_encoder_3 is not None
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel" and type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert (pipe.text_encoder_3 is None) == (pipe.tokenizer_3 is None) == (not t5)
    assert pipe.scheduler.config.shift == 3.0 and pipe.scheduler.config.num_train_timesteps == 1000
    assert ours.joint_dim == pipe.transformer.config.joint_attention_dim == SIZES["transformer"]["joint_attention_dim"]
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels
    # CLIP pools at argmax(ids) (SD3's legacy eos_token_id 2): EOS must be the largest id
    assert ours.tokenizer.eos_id == max(ours.tokenizer.vocab.values()) == pipe.tokenizer.eos_token_id
    assert ours.tokenizer_2.pad_id == 0 and ours.tokenizer.pad_id == ours.tokenizer.eos_id
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    assert size < 2 * 2 ** 20


def test_tokenizers_match(tiny):
    """Our tokenizers give diffusers' ids on the test prompts (as the pipeline asks for them)."""
    _, pipe, ours = tiny
    for hf, mine, n in ((pipe.tokenizer, ours.tokenizer, 77), (pipe.tokenizer_2, ours.tokenizer_2, 77),
                        (pipe.tokenizer_3, ours.tokenizer_3, 256)):
        if mine is None:
            continue
        ref = hf(PROMPTS + [""], padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        assert mine(PROMPTS + [""]).tolist() == ref.tolist()
    assert len(ours.tokenizer.encode(PROMPTS[2])) > 75  # CLIP truncates it
    if ours.tokenizer_3 is not None:
        assert 75 < len(ours.tokenizer_3.encode(PROMPTS[2])) < 255  # T5 does not


def test_encode_prompt_matches_diffusers(tiny):
    """prompt_embeds, pooled and the negative ("" encoded normally) equal diffusers' encode_prompt;
    without T5 its part is zeros, with T5 it is not; ∅ is not zeros."""
    _, pipe, ours = tiny
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu", num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=256)
    c, u = ours(PROMPTS), ours([""])
    B, L, D = len(PROMPTS), 77 + 256, SIZES["transformer"]["joint_attention_dim"]
    assert c.tokens.shape == (B, L, D) and c.pooled.shape == (B, SIZES["transformer"]["pooled_projection_dim"])
    assert c.tokens.dtype == torch.float32
    # the CLIP rows (:77) and the T5 rows (77:) are two encoders' outputs of different sizes:
    # each is held to its own scale, so the smaller cannot hide under the larger
    for rows, name in ((slice(None, 77), "CLIP"), (slice(77, None), "T5")):
        assert_close_to_reference(c.tokens[:, rows], embeds[:, rows], what=f"prompt_embeds ({name} rows)")
        assert_close_to_reference(u.tokens.expand(B, -1, -1)[:, rows], neg_embeds[:, rows],
                                  what=f"negative prompt_embeds ({name} rows)")
    assert_close_to_reference(c.pooled, pooled, what="pooled_prompt_embeds")
    assert_close_to_reference(u.pooled.expand(B, -1), neg_pooled, what="negative pooled_prompt_embeds")
    clip_width = SIZES["clip_l"]["hidden_size"] + SIZES["clip_g"]["hidden_size"]
    assert (c.tokens[:, :77, clip_width:] == 0).all()  # zero padding to joint_dim
    assert ((c.tokens[:, 77:] == 0).all()) == (ours.text_encoder_3 is None)
    assert u.tokens[:, :77].abs().sum() > 0 and u.pooled.abs().sum() > 0


def test_transformer_and_vae_match_diffusers(tiny):
    """load_transformer and load_vae read the tiny folder into modules that compute what
    diffusers' loaded SD3Transformer2DModel and AutoencoderKL compute."""
    folder, pipe, ours = tiny
    model, H = load_transformer(folder)
    vae = load_vae(folder).eval()
    assert H is None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)  # latents
    t = torch.tensor([0.3, 0.8])
    c = ours(PROMPTS[:2])
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        v = model(x, t, c.tokens, c.pooled)
        v_ref = pipe.transformer(hidden_states=x, encoder_hidden_states=c.tokens, pooled_projections=c.pooled,
                                 timestep=t * 1000).sample
        mean, _ = vae.posterior(image)
        mean_ref = pipe.vae.encode(image).latent_dist.mean
        z = torch.randn(1, 16, 4, 4, generator=g)
        decoded = vae.decode(z)
        decoded_ref = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    assert v.abs().mean() > 0.1  # redrawn weights: not DiT's zero output
    assert_close_to_reference(v, v_ref, what="transformer velocity")
    assert_close_to_reference(mean, mean_ref, what="VAE posterior mean")
    assert_close_to_reference(decoded, decoded_ref, what="VAE decoded image")


def test_joint_dim_is_checked(tiny):
    """A joint_dim that the two CLIP widths exceed, or that is not T5's width, is refused."""
    folder, _, ours = tiny
    with pytest.raises(ValueError, match="CLIP widths"):
        TextEncoders.load(folder, joint_dim=32)
    if ours.text_encoder_3 is not None:
        with pytest.raises(ValueError, match="d_model"):
            TextEncoders.load(folder, joint_dim=96)


def test_write_tiny_sd3_is_deterministic(tmp_path):
    """One seed, one model (byte for byte, with or without T5); another seed, other weights; the
    global RNG is untouched."""
    state = torch.random.get_rng_state()
    a, b, c = (write_tiny_sd3(tmp_path / name, seed=seed, t5=t5)
               for name, seed, t5 in (("a", 0, True), ("b", 0, False), ("c", 1, True)))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not os.path.exists(os.path.join(b, "text_encoder_3"))
    weights = [open(os.path.join(f, "transformer", "diffusion_pytorch_model.safetensors"), "rb").read()
               for f in (a, b, c)]
    assert weights[0] == weights[1] != weights[2]
