"""The SD3 sampling CLI: every sampler writes an image; Euler+CFG and our student sampler land where
diffusers' pipeline and the authors' loop land (within 1e-4 of the reference's scale); bad input
gets one clear message."""

import pytest

from tinyteef.sd3.sample import parse_args


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    base = ["--model", str(tmp_path), "--prompt", "a cat"]
    assert "invalid choice: 'ddim'" in error_of(base + ["--sampler", "ddim"], capsys)
    err = error_of(base + ["--sampler", "w2sd"], capsys)
    assert "--sampler w2sd needs --weak-model DIR" in err and "--sampler zsampling" in err
    assert "no such folder" in error_of(["--model", str(tmp_path / "nope"), "--prompt", "a"], capsys)
    assert "multiples of 16" in error_of(base + ["--height", "1000"], capsys)
    assert parse_args(base + ["--sampler", "teefusion"]).teefusion_divisor is None  # the student's record decides
    assert "--negative-prompt needs a guided sampler" in error_of(
        base + ["--sampler", "euler", "--negative-prompt", "a dog"], capsys)
    assert parse_args(base + ["--sampler", "euler", "--negative-prompt", ""]).negative_prompt == ""


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from tinyteef.sd3.tiny import write_tiny_sd3
    return write_tiny_sd3(tmp_path_factory.mktemp("sd3"))


@pytest.mark.parametrize("sampler", ["euler", "cfg", "naive", "zsampling", "w2sd", "teefusion"])
def test_every_sampler_writes_an_image(tiny_sd3, tmp_path, sampler, capsys):
    import numpy as np
    from PIL import Image
    from tinyteef.sd3.sample import main

    def sample(name, extra=()):
        out = tmp_path / name
        main(["--model", str(tiny_sd3), "--prompt", "a red cat", "--sampler", sampler, "--steps", "3",
              "--height", "48", "--width", "32", "--device", "cpu", "--out", str(out), *extra]
             + (["--weak-model", str(tiny_sd3)] if sampler == "w2sd" else []))
        return np.asarray(Image.open(out))

    image = sample("default.png")
    assert image.shape == (48, 32, 3)
    # passes per step over 3 steps: Z-Sampling skips one pass of each of its 2 reflected steps
    # (w_inv = -1), W2SD one (w_weak = 0): (5 + 5 + 2) / 3 = 4
    expected = {"euler": "1", "cfg": "2", "naive": "1", "zsampling": "4", "w2sd": "4", "teefusion": "1"}
    assert f"{sampler}: {expected[sampler]} forward passes per step" in capsys.readouterr().out
    if sampler != "euler":  # euler never uses ∅; the others guide away from the negative prompt
        assert not np.array_equal(sample("negative.png", ["--negative-prompt", "a blue dog"]), image)


@pytest.mark.parametrize("negative", ["", "a blue dog"])
def test_euler_cfg_image_equals_diffusers_pipeline(tiny_sd3, negative):
    """One whole Euler+CFG sample from the same initial latent: ours vs diffusers'
    StableDiffusion3Pipeline on the same folder (guidance_scale = w + 1), with ∅ and with a
    negative prompt encoded in ∅'s place."""
    import torch
    from conftest import assert_close_to_reference, oracle
    from tinyteef import samplers
    from tinyteef.flow import shift, time_grid
    from tinyteef.sd3.loader import load_transformer, load_vae
    from tinyteef.sd3.prompt import TextEncoders
    from tinyteef.sd3.sample import SD3_T_MIN
    diffusers = oracle("diffusers")
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    w, steps = 4.0, 6
    latents = torch.randn(1, 16, 6, 4, generator=torch.Generator().manual_seed(0))
    expected = pipe(prompt="a red cat on a table", negative_prompt=negative, guidance_scale=w + 1,
                    num_inference_steps=steps, latents=latents.clone(), height=48, width=32,
                    output_type="latent").images
    enc = TextEncoders.load(tiny_sd3)
    model, _ = load_transformer(tiny_sd3)
    ts = time_grid(steps, 3.0, u_last=shift(SD3_T_MIN, 3.0))
    got = samplers.euler_cfg(model, latents, ts, enc(["a red cat on a table"]), enc([negative]), w).x
    assert expected.abs().mean() > 0.1
    assert_close_to_reference(got, expected, what="sampled latent")
    vae = load_vae(tiny_sd3)
    with torch.no_grad():
        image = vae.decode(got)
        ref = pipe.vae.decode(expected / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    assert_close_to_reference(image, ref, what="decoded image")


@pytest.mark.parametrize("negative", ["", "a blue dog"])
def test_authors_student_loop_equals_our_teefusion_sampler(tiny_sd3, negative):
    """The authors' TeEFusion pipeline (AIDC-AI/TeEFusion, pipelines/sd3_teefusion_pipeline.py),
    written out on diffusers' modules: per step, temb gets G(psi(1000 w)) * F(pooled_c - pooled_∅) / 256,
    the attention sees the prompt's tokens only, and diffusers' scheduler takes the Euler step.
    Our `student` sampler on the same folder and latent must land on the same latent; with a
    negative prompt, diffusers' encoding of it takes pooled_∅'s place in both."""
    import torch
    from conftest import assert_close_to_reference, oracle
    from tinyteef import samplers
    from tinyteef.flow import shift, time_grid
    from tinyteef.guidance import Student
    from tinyteef.sd3.loader import load_transformer
    from tinyteef.sd3.prompt import TextEncoders
    from tinyteef.sd3.sample import SD3_T_MIN
    diffusers = oracle("diffusers")
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    w, steps = 5.0, 5
    latents = torch.randn(1, 16, 6, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        c_tok, _, c_pool, u_pool = pipe.encode_prompt(prompt="a red cat", prompt_2=None, prompt_3=None,
                                                      device="cpu", do_classifier_free_guidance=True,
                                                      negative_prompt=negative)
        tr, sched = pipe.transformer, pipe.scheduler
        sched.set_timesteps(steps)
        x = latents.clone()
        for t in sched.timesteps:
            tte = tr.time_text_embed
            temb = tte(t.reshape(1), c_pool) + tte.timestep_embedder(
                tte.time_proj(torch.tensor([w]) * 1000.0)) * tte.text_embedder(c_pool - u_pool) / 256.0
            h, ctx = tr.pos_embed(x), tr.context_embedder(c_tok)
            for block in tr.transformer_blocks:
                ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb)
            h = tr.proj_out(tr.norm_out(h, temb)).reshape(1, 3, 2, 2, 2, 16)
            v = torch.einsum("nhwpqc->nchpwq", h).reshape(1, 16, 6, 4)
            x = sched.step(v, t, x).prev_sample
    enc = TextEncoders.load(tiny_sd3)
    model, _ = load_transformer(tiny_sd3)
    ts = time_grid(steps, 3.0, u_last=shift(SD3_T_MIN, 3.0))
    got = samplers.student(Student(model), latents, ts, enc(["a red cat"]), enc([negative]), w)
    assert got.passes == steps
    assert x.abs().mean() > 0.1
    assert_close_to_reference(got.x, x, what="sampled latent")


def test_student_w_outside_its_range_is_refused(tiny_sd3, tmp_path):
    from tinyteef.sd3.sample import main
    with pytest.raises(SystemExit, match=r"error: --w: w = 1 is outside \[2, 14\]"):
        main(["--model", str(tiny_sd3), "--prompt", "a cat", "--sampler", "teefusion", "--w", "1", "--steps", "2",
              "--height", "32", "--width", "32", "--device", "cpu", "--out", str(tmp_path / "x.png")])
