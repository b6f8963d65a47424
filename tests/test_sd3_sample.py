"""The SD3 sampling CLI: bad input gets one clear message; Euler+CFG and our student sampler land
where diffusers' pipeline and the authors' loop land (within 1e-4 of the reference's scale), and
in bf16 a record-less student follows the authors' bf16 loop."""

import pytest
import torch

from conftest import assert_close_to_reference, oracle, random_mmdit
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
    # bad numbers and a bad --out are refused before anything loads
    for flags, message in ((["--w", "nan"], "--w must be a finite number"),
                           (["--shift", "nan"], "--shift must be a finite number above 0"),
                           (["--shift", "0"], "--shift must be a finite number above 0"),
                           (["--steps", "0"], "--steps must be at least 1"),
                           (["--height", "0"], "positive multiples of 16"), (["--width", "-16"], "positive multiples"),
                           (["--out", str(tmp_path / "no" / "x.png")], "does not exist; create it"),
                           (["--out", str(tmp_path / "x.txt")], "must end in one of .png")):
        assert message in error_of(base + flags, capsys), flags
    assert parse_args(base + ["--sampler", "teefusion"]).teefusion_divisor is None  # the student's record decides
    assert "--negative-prompt needs a guided sampler" in error_of(
        base + ["--sampler", "euler", "--negative-prompt", "a dog"], capsys)
    assert parse_args(base + ["--sampler", "euler", "--negative-prompt", ""]).negative_prompt == ""
    assert parse_args(base + ["--sampler", "teefusion"]).w_rounding is None  # the student's folder decides
    assert parse_args(base + ["--sampler", "teefusion", "--w-rounding", "float32"]).w_rounding == "float32"
    assert "invalid choice: 'bf16'" in error_of(base + ["--sampler", "teefusion", "--w-rounding", "bf16"], capsys)
    assert "--w-rounding applies to a distilled student only" in error_of(base + ["--w-rounding", "float32"], capsys)


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
    # (w_inv = -1): (5 + 5 + 2) / 3 = 4; W2SD inverts with CFG at w (w_weak = None): (6 + 6 + 2) / 3
    expected = {"euler": "1", "cfg": "2", "naive": "1", "zsampling": "4", "w2sd": "4.66667", "teefusion": "1"}
    assert f"{sampler}: {expected[sampler]} forward passes per step" in capsys.readouterr().out
    if sampler != "euler":  # euler never uses ∅; the others guide away from the negative prompt
        assert not np.array_equal(sample("negative.png", ["--negative-prompt", "a blue dog"]), image)


@pytest.mark.parametrize("negative", ["", "a blue dog"])
def test_euler_cfg_image_equals_diffusers_pipeline(tiny_sd3, negative):
    """One whole Euler+CFG sample from the same initial latent: ours vs diffusers'
    StableDiffusion3Pipeline on the same folder (guidance_scale = w + 1), with ∅ and with a
    negative prompt encoded in ∅'s place."""
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
    ts = time_grid(steps, 3.0, tau_last=shift(SD3_T_MIN, 3.0))
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
    ts = time_grid(steps, 3.0, tau_last=shift(SD3_T_MIN, 3.0))
    got = samplers.student(Student(model), latents, ts, enc(["a red cat"]), enc([negative]), w)
    assert got.passes == steps
    assert x.abs().mean() > 0.1
    assert_close_to_reference(got.x, x, what="sampled latent")


def test_cli_prints_the_w_rounding_it_used(tiny_sd3, tmp_path, capsys):
    """The tiny folder has no tinyteef record, like the authors' release: w = 5 enters psi as 4992
    (bf16 rounding, by hand) unless --w-rounding float32 overrides it."""
    from tinyteef.sd3.sample import main
    base = ["--model", str(tiny_sd3), "--prompt", "a cat", "--sampler", "teefusion", "--w", "5", "--steps", "1",
            "--height", "32", "--width", "32", "--device", "cpu", "--out", str(tmp_path / "x.png")]
    main(base)
    assert "w rounding: authors-bf16 (from the student's folder): 1000 w = 4992 enters psi" in capsys.readouterr().out
    main(base + ["--w-rounding", "float32"])
    assert "w rounding: float32 (from --w-rounding): 1000 w = 5000 enters psi" in capsys.readouterr().out


def test_non_finite_sample_stops_with_an_error(tiny_sd3, tmp_path):
    """A NaN in the weights gives a NaN sample: an error naming the model, no black image written."""
    import shutil
    from tinyteef.safetensors import load_file, save_file
    from tinyteef.sd3.sample import main
    folder = tmp_path / "nan_model"
    shutil.copytree(tiny_sd3, folder, symlinks=True)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["proj_out.bias"] = torch.full_like(state["proj_out.bias"], float("nan"))
    save_file(state, str(weights))
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit, match="the sample turned non-finite .*--model"):
        main(["--model", str(folder), "--prompt", "a cat", "--sampler", "cfg", "--steps", "2", "--height", "32",
              "--width", "32", "--device", "cpu", "--out", str(out)])
    assert not out.exists()


def test_student_w_outside_its_range_is_refused(tiny_sd3, tmp_path):
    from tinyteef.sd3.sample import main
    with pytest.raises(SystemExit, match=r"error: --w: w = 1 is outside \[2, 14\]"):
        main(["--model", str(tiny_sd3), "--prompt", "a cat", "--sampler", "teefusion", "--w", "1", "--steps", "2",
              "--height", "32", "--width", "32", "--device", "cpu", "--out", str(tmp_path / "x.png")])


def authors_student_folder(folder):
    """A record-less student folder, as the authors released theirs: a tiny random MMDiT whose G and F
    outputs are scaled by 256, so that the Eq. 7 term G(psi(1000 w)) * F(c - ∅) / 256 weighs as much
    in z as G(psi(t)) + F(c) (with fan-in weights it would be 1/256 of it, and w's rounding would
    vanish in bf16's own noise); the adaLN weights are scaled down by 256 to keep modulations O(1)."""
    from tinyteef.mmdit import AdaLinear
    from tinyteef.sd3.loader import save_transformer
    model = random_mmdit(std=0.2)
    with torch.no_grad():
        for mlp in (model.G, model.F):
            mlp.linear_2.weight.mul_(256.0)
            mlp.linear_2.bias.mul_(256.0)
        for m in model.modules():
            if isinstance(m, AdaLinear):
                m.linear.weight.div_(256.0)
    save_transformer(folder, model, extra_config={"guidance": False, "txt_align_guidance": True})
    return folder


def test_authors_bf16_student_equals_the_authors_bf16_loop(tmp_path):
    """The authors' TeEFusion pipeline in bf16 (AIDC-AI/TeEFusion, pipelines/sd3_teefusion_pipeline.py
    and pipelines/sd3_model.py), written out on diffusers' modules with their dtypes: weights, latent
    and text in bf16; the guidance value torch.tensor((w,), dtype=bf16) * 1000. (4992 for w = 5);
    time_proj in float32, cast to the pooled dtype before the timestep MLP; the scheduler's step in
    float32, cast back to bf16. Our student sampler on the same record-less folder (so w_rounding
    "authors-bf16"), bf16 weights under autocast as the CLI runs them on a GPU, must match per step:
    the term it adds to z and the velocity. With w_rounding "float32" it must not."""
    diffusers = oracle("diffusers")
    from tinyteef import samplers
    from tinyteef.flow import shift, time_grid
    from tinyteef.guidance import Text
    from tinyteef.sd3.loader import load_student
    from tinyteef.sd3.sample import SD3_T_MIN
    bf16, w, steps = torch.bfloat16, 5.0, 4
    folder = authors_student_folder(tmp_path / "student")
    g = torch.Generator().manual_seed(0)
    c = Text(torch.randn(1, 5, 12, generator=g).to(bf16), torch.randn(1, 10, generator=g).to(bf16))
    u = Text(torch.randn(1, 5, 12, generator=g).to(bf16), torch.randn(1, 10, generator=g).to(bf16))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=bf16)  # their get_noise

    tr = diffusers.SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").to(bf16)
    tte, sched = tr.time_text_embed, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    tembs, velocities, x = [], [], noise
    with torch.no_grad():
        for t in sched.timesteps:
            guidance = torch.tensor((w,), dtype=tr.dtype) * 1000.0
            term = tte.timestep_embedder(tte.time_proj(guidance).to(dtype=c.pooled.dtype)) * tte.text_embedder(
                c.pooled - u.pooled) / 256.0
            temb = tte(t.reshape(1), c.pooled) + term
            h, ctx = tr.pos_embed(x), tr.context_embedder(c.tokens)
            for block in tr.transformer_blocks:
                ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb)
            h = tr.proj_out(tr.norm_out(h, temb)).reshape(1, 4, 4, 2, 2, 4)
            v = torch.einsum("nhwpqc->nchpwq", h).reshape(1, 4, 8, 8)
            tembs.append(temb)
            velocities.append(v)
            x = sched.step(v, t, x, return_dict=False)[0]
    assert x.dtype == bf16

    def ours(w_rounding=None):
        """(z^, velocity) per step of our student sampler; w_rounding None: the folder's default."""
        student = load_student(folder, dtype=bf16, w_rounding=w_rounding)
        seen = []
        hook = student.model.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs["z"], out)),
                                                   with_kwargs=True)
        with torch.autocast("cpu", dtype=bf16):
            samplers.student(student, noise.float(), time_grid(steps, 3.0, tau_last=shift(SD3_T_MIN, 3.0)), c, u, w)
        hook.remove()
        return student.w_rounding, seen

    # Why rtol 2e-2: bf16 keeps 8 significant bits (unit roundoff 2^-9, 2e-3). The first two steps
    # agree bit for bit; after them their latent is rounded to bf16 at every step while ours stays
    # float32 (the one dtype difference left), which moves a velocity of this small random model by
    # up to 1e-2 of its scale. float32 rounding of 1000 w moves every step's term by 0.65 of its
    # scale and every velocity by 0.15 to 0.3: more than 5 x rtol, asserted below.
    rtol = 2e-2
    rounding, seen = ours()
    assert rounding == "authors-bf16"  # a folder without our record is the authors' release
    for i, ((our_z, our_v), temb, v) in enumerate(zip(seen, tembs, velocities)):
        assert_close_to_reference(our_z, temb, rtol=rtol, what=f"step {i}: z^ (their temb)")
        assert_close_to_reference(our_v, v, rtol=rtol, what=f"step {i}: velocity")
    rounding, seen = ours("float32")
    assert rounding == "float32"
    for (our_z, our_v), temb, v in zip(seen, tembs, velocities):
        assert (our_z.double() - temb.double()).abs().max() > 5 * rtol * temb.double().abs().max()
        assert (our_v.double() - v.double()).abs().max() > 5 * rtol * v.double().abs().max()
