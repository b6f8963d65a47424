"""Sample an image from an SD3 model folder with any of the paper's samplers.

    python -m tinyteef.sd3.sample --model DIR --prompt "a cat" --sampler cfg --w 5 --out cat.png
    python -m tinyteef.sd3.sample --model STUDENT_DIR --prompt "a cat" --sampler teefusion --w 5
    python -m tinyteef.sd3.sample --model DIR --weak-model WEAK_DIR --sampler w2sd --prompt "a cat"
    python -m tinyteef.sd3.sample --model DIR --prompt "a cat" --negative-prompt "blurry" --sampler cfg

--w is the paper's guidance weight (diffusers' guidance_scale minus 1). The model runs in bf16 on a
GPU and in float32 on the CPU; the latent and the Euler updates stay float32, on SD3's time grid
(diffusers' FlowMatchEulerDiscreteScheduler, shift 3). A student reads 1000 w as its folder says:
float32 for ours, rounded in bf16 for the authors' released student (--w-rounding overrides).
"""

import argparse
import math
import os

import torch
from torchvision.utils import save_image

from .. import checkpoint, samplers
from ..flow import shift, time_grid
from ..guidance import TEEFUSION_DIVISOR
from ..mmdit import W_ROUNDINGS, psi_input
from .loader import load_student, load_transformer, load_vae
from .prompt import TextEncoders

SAMPLERS = ("euler", "cfg", "naive", "zsampling", "w2sd", "teefusion")
SD3_T_MIN = 1e-3  # the scheduler's smallest unshifted time: 1 / num_train_timesteps
OUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")  # image formats torchvision's save_image writes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="SD3 folder in the diffusers layout (a teacher or a student)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--sampler", choices=SAMPLERS, default="cfg",
                   help="euler (no guidance), cfg, naive (Eq. 5), zsampling, w2sd (teachers); "
                        "teefusion (a distilled student, one pass per step: TeEFusion, or the kind "
                        "train_sd3.py recorded in its config.json)")
    p.add_argument("--negative-prompt", default="",
                   help="text to guide away from, encoded in place of the empty prompt ∅ (default: ∅). "
                        "teefusion takes it as F(pooled(c) - pooled(neg)); its student was distilled with ∅ only")
    p.add_argument("--w", type=float, default=5.0, help="guidance weight, paper's convention (default 5)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--shift", type=float, default=3.0, help="time shift of the grid (SD3: 3)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weak-model", default=None,
                   help="W2SD's weak model: a folder with a weaker transformer of the same architecture")
    p.add_argument("--teefusion-divisor", type=float, default=None,
                   help="divisor of the Eq. 7 term (default: the student's record, else "
                        f"{TEEFUSION_DIVISOR:g} as in the authors' released student)")
    p.add_argument("--w-rounding", choices=W_ROUNDINGS, default=None,
                   help="how the student builds 1000 w before psi: float32 (ours), or authors-bf16 (rounded "
                        "in bf16 as the authors' pipeline does: w = 5 enters as 4992). Default: the student's "
                        "record, else authors-bf16 for a folder without one (the authors' release)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="sample.png", help="output PNG")
    args = p.parse_args(argv)
    if args.sampler == "w2sd" and args.weak_model is None:
        p.error("--sampler w2sd needs --weak-model DIR: a weaker model of the same architecture that inverts "
                "each step (Eq. 3), e.g. an earlier or less trained checkpoint; or use --sampler zsampling, "
                "which reflects with the model itself")
    if args.w_rounding is not None and args.sampler != "teefusion":
        p.error("--w-rounding applies to a distilled student only (--sampler teefusion): "
                "the teachers' samplers never embed w")
    if args.negative_prompt and args.sampler == "euler":
        p.error("--negative-prompt needs a guided sampler (cfg, naive, zsampling, w2sd, teefusion): "
                "euler runs without guidance and never uses ∅")
    # numbers that would run to the end and write a black image: refused before anything loads
    if not math.isfinite(args.w):
        p.error(f"--w must be a finite number, got {args.w}")
    if not (math.isfinite(args.shift) and args.shift > 0):
        p.error(f"--shift must be a finite number above 0 (SD3: 3), got {args.shift}")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.height < 16 or args.width < 16 or args.height % 16 or args.width % 16:
        p.error(f"--height and --width must be positive multiples of 16 (got {args.height}x{args.width})")
    # the output is checked first, so that a bad --out never throws a finished sample away
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out {args.out}: the folder {out_dir} does not exist; create it or choose another path")
    if os.path.splitext(args.out)[1].lower() not in OUT_EXTENSIONS:
        p.error(f"--out {args.out}: the file name must end in one of {', '.join(OUT_EXTENSIONS)}")
    for flag, folder in (("--model", args.model), ("--weak-model", args.weak_model)):
        if folder is not None and not os.path.isdir(folder):
            p.error(f"{flag} {folder}: no such folder")
    return args


def run(sampler, model, x, ts, c, u, w, weak=None, w_inv=-1.0, w_weak=None, progress=True):
    """The sampler of SAMPLERS named `sampler` on the latent x (the names of Alg. 1's teacher
    samplers, cfg, zsampling and w2sd, are among them); for teefusion `model` is a
    guidance.Student. Returns samplers.Samples."""
    if sampler == "euler":
        return samplers.euler(model, x, ts, c, progress=progress)
    if sampler == "cfg":
        return samplers.euler_cfg(model, x, ts, c, u, w, progress=progress)
    if sampler == "naive":
        return samplers.naive(model, x, ts, c, u, w, progress=progress)
    if sampler == "zsampling":
        return samplers.z_sampling(model, x, ts, c, u, w, w_inv=w_inv, progress=progress)
    if sampler == "w2sd":
        return samplers.w2sd(model, weak, x, ts, c, u, w, w_weak=w_weak, progress=progress)
    return samplers.student(model, x, ts, c, u, w, progress=progress)


@torch.no_grad()
def preview(path, student, teacher, weak, vae, x, c, u, w, ts, teacher_sampler, w_inv=-1.0, w_weak=None):
    """One PNG at `path`: the teacher sampler's samples (top row) and the student's (bottom row)
    from the same latents x and prompts c, at guidance w, decoded by the VAE one by one. The
    teacher's row, which never changes during a run, is computed once and kept beside the PNG.
    vae=None samples without decoding or writing: the other processes of a sharded (FSDP) run,
    whose passes the sharded models need."""
    decode = lambda z: torch.cat([(vae.decode(zi[None].float()).clamp(-1, 1) + 1) / 2 for zi in z])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    teacher_path = os.path.join(os.path.dirname(path), "teacher.pt")
    if not os.path.isfile(teacher_path):
        samples = run(teacher_sampler, teacher, x, ts, c, u, w, weak, w_inv, w_weak, progress=False)
        if vae is not None:
            checkpoint.save(decode(samples.x).cpu(), teacher_path)
    mine = samplers.student(student, x, ts, c, u, w).x
    if vae is not None:
        save_image(torch.cat([checkpoint.load(teacher_path), decode(mine).cpu()]), path, nrow=len(x))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoders = TextEncoders.load(args.model, device, dtype)
    c, u = encoders([args.prompt]), encoders([args.negative_prompt])  # u: ∅, or the negative prompt
    del encoders  # the text encoders are not needed any more (T5-XXL alone is 9 GB in bf16)
    if args.sampler == "teefusion":
        model = load_student(args.model, device, dtype, args.teefusion_divisor, args.w_rounding)
        try:
            model.check_w(args.w)
        except ValueError as e:
            raise SystemExit(f"error: --w: {e}")
        source = "--w-rounding" if args.w_rounding else "the student's folder"
        print(f"w rounding: {model.w_rounding} (from {source}): "
              f"1000 w = {psi_input(args.w, 'cpu', model.w_rounding).item():g} enters psi")
    else:
        model, _ = load_transformer(args.model, device, dtype)
    weak = load_transformer(args.weak_model, device, dtype)[0] if args.sampler == "w2sd" else None
    g = torch.Generator(device).manual_seed(args.seed)
    config = (model.model if args.sampler == "teefusion" else model).config
    x = torch.randn(1, config.in_channels, args.height // 8, args.width // 8, generator=g, device=device)
    ts = time_grid(args.steps, args.shift, tau_last=shift(SD3_T_MIN, args.shift)).to(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        s = run(args.sampler, model, x, ts, c, u, args.w, weak)
    if not torch.isfinite(s.x).all():  # NaN or inf weights, or a model that diverges at this w
        raise SystemExit(f"error: the sample turned non-finite (NaN or inf) with --sampler {args.sampler} --w "
                         f"{args.w:g}; check the model's weights (--model {args.model}), or try a smaller --w")
    del model, weak
    vae = load_vae(args.model, device, torch.float32)
    with torch.no_grad():
        image = vae.decode(s.x.float())  # (1, 3, H, W) in [-1, 1]
    save_image((image.clamp(-1, 1) + 1) / 2, args.out)
    print(f"{args.sampler}: {s.passes / s.steps:g} forward passes per step ({s.skipped / s.steps:g} skipped); "
          f"image written to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
