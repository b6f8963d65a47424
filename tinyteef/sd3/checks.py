"""Every check train_sd3.py makes before any work: a bad flag, model, folder or checkpoint stops the
run with one line that names the flag or file and says what to do, before stage 1 spends hours
encoding the data, and before anything is written into --out.

- `flag_error`: the flags on their own (parse_args turns it into argparse's usage error);
- `model_error`: the flags against the models' config files (read, nothing loaded);
- `check_run`: the run's folder: writable, and the run, checkpoint and data it holds or needs;
- `one_line_errors`: what the file system refuses later (a full disk) as one line, not a traceback.
"""

import errno
import functools
import json
import math
import os
import tempfile

import torch

from .. import bench, checkpoint, parallel
from ..mmdit import MMDiTConfig
from .data import list_items
from .loader import config_from_json, read_config
from .tiny import SIZES
from .vae import VAEConfig

POSITIVE_INTS = ("resolution", "batch_size", "micro_batch", "steps", "sample_steps", "t5_length", "synthetic_size",
                 "cache_batch", "preview_count")
POSITIVE_FLOATS = ("lr", "shift", "teefusion_divisor", "peak_tflops")
FINITE_FLOATS = ("w_min", "w_max", "w_inv", "w_weak", "preview_w")
NON_NEGATIVE_INTS = ("save_every", "preview_every")
# what W2SD's weak model must share with the teacher: it takes the same latents and text (the rest,
# its width and depth, may differ)
INTERFACE = ("in_channels", "out_channels", "patch_size", "joint_attention_dim", "pooled_projection_dim")
# --random-init with the transformer alone, at a published size (tinyteef.bench.SIZES), on random tensors
RANDOM_SIZES = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
CHECKPOINTS = ("checkpoint.pt", "checkpoint")  # OUT's checkpoint: one file, or with --fsdp a folder of shards


def flag(name):
    return "--" + name.replace("_", "-")


def flag_error(args):
    """The first thing wrong with the flags of train_sd3.py on their own, in one line that says
    what to do, or None."""
    for k in POSITIVE_INTS:
        if getattr(args, k) < 1:
            return f"{flag(k)} must be at least 1, got {getattr(args, k)}"
    for k in NON_NEGATIVE_INTS:
        if getattr(args, k) < 0:
            return f"{flag(k)} must be 0 (never) or more, got {getattr(args, k)}"
    for k in POSITIVE_FLOATS:
        if not (math.isfinite(getattr(args, k)) and getattr(args, k) > 0):
            return f"{flag(k)} must be a positive number, got {getattr(args, k)}"
    for k in FINITE_FLOATS:
        if getattr(args, k) is not None and not math.isfinite(getattr(args, k)):
            return f"{flag(k)} must be a finite number, got {getattr(args, k)}"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        return f"--device {args.device}: not a device torch knows; use cpu, cuda or cuda:N"
    checks = (
        (args.random_init is None and (args.model is None or args.data is None),
         f"give --model DIR and --data DIR (or --random-init {'|'.join(('tiny',) + RANDOM_SIZES)} to try it without "
         "downloads)"),
        (args.random_init is not None and args.model is not None, "--random-init replaces --model; give one of them"),
        (args.random_init in RANDOM_SIZES and args.data is not None,
         f"--random-init {args.random_init} builds no VAE or text encoders and trains on random tensors: leave out "
         "--data"),
        (args.teacher == "w2sd" and args.weak_model is None and args.random_init is None,
         "--teacher w2sd needs --weak-model DIR: W2SD reflects each step by inverting with a weak model (Eq. 3), a "
         "weaker model of the same architecture, e.g. an earlier or less trained checkpoint of the teacher; or use "
         "--teacher zsampling, which reflects with the teacher itself"),
        (args.w_min > args.w_max, f"--w-min {args.w_min:g} is above --w-max {args.w_max:g}: w ~ U[w-min, w-max]"),
        # a student refuses any w outside the range it is distilled on (guidance.Student.check_w)
        (args.preview_every and args.data is not None and not args.w_min <= args.preview_w <= args.w_max,
         f"--preview-w {args.preview_w:g} must lie in [--w-min, --w-max] = [{args.w_min:g}, {args.w_max:g}], "
         "the range the student is distilled on"),
        (not args.fsdp and (args.fsdp_frozen, args.fsdp_grad_sync) != ("whole", "step"),
         "--fsdp-frozen and --fsdp-grad-sync apply with --fsdp only"),
        (args.batch_size % args.micro_batch,
         f"--batch-size {args.batch_size} must be a multiple of --micro-batch {args.micro_batch}"),
        (device.type == "cuda" and not torch.cuda.is_available(),
         f"--device {args.device}, but torch sees no GPU; use --device cpu"),
    )
    return next((msg for bad, msg in checks if bad), None)


def geometry(model_dir, random_init):
    """(MMDiTConfig, the VAE's downsampling factor) of a model, from its config files (nothing
    loaded), or known for --random-init; None when its transformer has no config.json."""
    if random_init == "tiny":
        return MMDiTConfig(**SIZES["transformer"]), 2 ** (len(SIZES["vae"]["block_out_channels"]) - 1)
    if random_init in RANDOM_SIZES:  # the transformer alone: SD3's VAE (8x) is implied
        return MMDiTConfig(**bench.SIZES[random_init]), 2 ** (len(VAEConfig.block_out_channels) - 1)
    d = read_config(os.path.join(model_dir, "transformer"))
    if d is None:
        return None
    vae = read_config(os.path.join(model_dir, "vae"))
    blocks = (vae or {}).get("block_out_channels", VAEConfig.block_out_channels)
    return config_from_json(MMDiTConfig, d), 2 ** (len(blocks) - 1)


def model_error(args):
    """The first thing wrong with the flags against the teacher's and weak model's config files:
    --resolution a whole number of patches that the position table holds, and a weak model that
    takes the teacher's inputs. One line, or None."""
    try:
        models = {"--model": geometry(args.model, args.random_init)}
        if args.teacher == "w2sd" and args.weak_model is not None:
            models["--weak-model"] = geometry(args.weak_model, None)
    except ValueError as e:  # a config.json that is not JSON
        return str(e)
    for which, g in models.items():
        if g is None:
            continue
        cfg, vae = g
        size = vae * cfg.patch_size  # pixels per patch side
        where = f"--random-init {args.random_init}" if which == "--model" and args.random_init else which
        if args.resolution % size:
            return (f"--resolution {args.resolution} must be a multiple of {size} (the VAE's {vae}x times the "
                    f"patch size {cfg.patch_size} of {where})")
        if cfg.pos_embed_max_size is not None and args.resolution // size > cfg.pos_embed_max_size:
            return (f"--resolution {args.resolution} is beyond the position table of {where} "
                    f"({cfg.pos_embed_max_size} patches of {size} px a side): use at most "
                    f"{cfg.pos_embed_max_size * size}")
    if len(models) == 2 and None not in models.values():
        (teacher, _), (weak, _) = models.values()
        for k in INTERFACE:
            if getattr(teacher, k) != getattr(weak, k):
                return (f"--weak-model {args.weak_model} has {k} {getattr(weak, k)}, the teacher "
                        f"{getattr(teacher, k)}: W2SD's weak model must take the teacher's latents and text; "
                        "use a model of the teacher's family")
    return None


def compare_run(old, run, where, out):
    """Refuse (ValueError) a recorded run `old` that differs from `run` in any flag."""
    for k in run:
        if old.get(k) != run[k]:
            raise ValueError(f"{where} holds a run with {flag(k)} {old.get(k)!r}, this one asks for {run[k]!r}; "
                             f"use another --out, or delete {out} to start over")


def checkpoint_path(args):
    """OUT/checkpoint.pt, or with --fsdp the folder OUT/checkpoint of shards (tinyteef.parallel)."""
    return os.path.join(args.out, CHECKPOINTS[1] if args.fsdp else CHECKPOINTS[0])


def read_checkpoint(path, fsdp):
    """The step and run config of the checkpoint at `path`, after a cheap look that it reads; a
    ValueError naming it, that says what to do, if not."""
    hint = "delete it and run again without --resume: training starts over, the data cache and the rest of the " \
           "folder are kept"
    if fsdp:  # its run.json, and DCP's index of the shards
        state = parallel.read_meta(path, hint)
    else:  # mapped, not read: the pickle's records are read, the tensors only when train_sd3 loads it
        state = checkpoint.load(path, mmap=True, hint=hint)
    if not (isinstance(state, dict) and isinstance(state.get("step"), int)):
        raise ValueError(f"{path} is not a checkpoint of train_sd3.py; delete it or use another --out")
    return state["step"], state.get("config", {})


def check_run(args, run):
    """Everything about the run's folder --out before any work: it is writable; the run it holds
    (config.json) is this one; a checkpoint is there exactly when --resume asks for one, in the
    form of this run (a file, or with --fsdp a folder of shards), reads, and is this run's, before
    --steps; the data folder lists. Raises ValueError (or OSError for an unwritable folder).
    Returns the data's [(image, caption)], or None without --data."""
    out, ckpt_path = args.out, checkpoint_path(args)
    try:  # a folder we cannot write into fails here, not at the first save hours later
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OSError(e.errno, e.strerror, out) from e
    config = os.path.join(out, "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            try:
                old = json.load(f)
            except ValueError as e:
                raise ValueError(f"{config} is not JSON ({e}); delete it (it is written again) or use another --out")
        compare_run(old, run, out, out)
    saved = [name for name in CHECKPOINTS if os.path.exists(os.path.join(out, name))]
    if saved and not args.resume:
        raise ValueError(f"{out} holds a checkpoint; pass --resume to continue it, or use another --out")
    if args.resume:
        name = os.path.basename(ckpt_path)
        if name not in saved:
            how = f" (its {saved[0]} is from a run {'without' if args.fsdp else 'with'} --fsdp: resume it so)"
            raise ValueError(f"--resume: {out} has no {name} to continue" + (how if saved else ""))
        step, old = read_checkpoint(ckpt_path, args.fsdp)
        compare_run(old, run, ckpt_path, out)
        if step >= args.steps:
            raise ValueError(f"{ckpt_path} is at step {step} already: give --steps above it to train on")
    return list_items(args.data) if args.data is not None else None


def one_line_errors(main):
    """`main` with the file system's refusals (OSError: a full disk, a read-only or missing folder,
    a file without permission) as one line that names the file and says what to do."""
    hints = {errno.ENOSPC: "free space on its disk (or use another --out)", errno.EDQUOT: "free space in your quota",
             errno.EFBIG: "the file system refuses a file this large; use another --out",
             errno.EROFS: "it is on a read-only file system; use another --out",
             errno.EACCES: "check its permissions, or use another --out", errno.EPERM: "check its permissions"}

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except OSError as e:
            where = e.filename if e.filename is not None else "a file of the run"
            hint = hints.get(e.errno, "check the path")
            raise SystemExit(f"error: {where}: {e.strerror or e}; {hint}, then run again (add --resume if a "
                             "checkpoint was written: the last one is kept)") from e
    return wrapped
