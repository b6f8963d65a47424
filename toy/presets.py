"""Sizes and steps of the toy run (`train_toy.py --preset`): smoke for CPUs and CI, quick for a
first look on a GPU, full for the figures of docs/toy-results.md. Method hyper-parameters follow
the paper: w ~ U[2, 14], t ~ U[0, 1], w = 5 for the tables, Eq. 7 as written (divisor 1; see
docs/toy-results.md for why not 256)."""

import dataclasses
from dataclasses import dataclass

from tinyteef.distill import DistillConfig
from tinyteef.mmdit import MMDiTConfig


@dataclass
class Preset:
    """One preset; the distillation lr is ours (the paper's 5e-6 is for a 2 B model over ~10k steps)."""

    limit: tuple | None  # (train, test) images kept, None = all
    eval_steps: int  # evaluator training steps
    width: int  # MMDiT hidden size (heads of 64, or of width / 2 below 128)
    layers: int
    text_width: int
    text_layers: int
    teacher_steps: int
    batch: int
    lr: float
    sample_steps: int  # Euler steps N of every sampler, and the student's grid in Alg. 1
    n_eval: int  # images per scored method
    distill_steps: int
    distill_batch: int
    distill_lr: float
    sweep: tuple  # w values of the sweep; the paper's range [2, 14]
    save_every: int  # steps between resumable checkpoints
    time_batch: int  # batch size at which ms / image is measured
    text_len: int = 16
    w: float = 5.0  # the table's w: the paper's best (Fig. 5a)
    w_min: float = DistillConfig.w_min  # Alg. 1's w ~ U[w_min, w_max], the paper's range
    w_max: float = DistillConfig.w_max
    t_dist: str = DistillConfig.t_dist  # p(t) of Alg. 1 line 4: the paper's U[0, 1]
    drop: float = 0.1  # empty-prompt rate while training the teacher (CFG needs v(∅))
    # Eq. 7's term is divided by this: 1 is the paper's equation; the authors' SD3 code uses 256
    # (guidance.TEEFUSION_DIVISOR), which leaves the term about 1e-4 of z in a model this small
    # (docs/toy-results.md)
    teefusion_divisor: float = 1.0
    ema: float = 0.999
    eval_width: int = 32  # the evaluator's first stage width (then 2x, 4x): toy/evaluator.py
    eval_batch: int = 256  # the evaluator's training batch
    # Fig. 5b in small: the distillation steps at which TeEFusion and DistillCFG from W2SD+CFG are
    # kept and scored (each at most distill_steps)
    curve: tuple = ()
    seeds: tuple = (0,)  # a run without --seed or --seeds: these seeds, each the whole pipeline


PRESETS = {
    # every stage and report section, tiny, on a CPU in about 35 s on 2 cores (CI runs it): its
    # numbers only show that each stage ran. A half-width evaluator (a quarter of the convolutions'
    # work); 16 scored images, ms / image from the second batch of 8; students at batch 4, so the
    # fidelity grid uses 2 images per cell; the teacher at batch 16 still falls to the loss of 32
    "smoke": Preset(limit=(1000, 200), eval_steps=60, width=64, layers=2, text_width=32, text_layers=1,
                    teacher_steps=120, batch=16, lr=1e-3, sample_steps=4, n_eval=16, distill_steps=20,
                    distill_batch=4, distill_lr=1e-4, sweep=(2.0, 8.0, 14.0), save_every=50, time_batch=8,
                    eval_width=16, eval_batch=64, curve=(10, 20)),
    # a first look on a GPU in a few minutes
    "quick": Preset(limit=None, eval_steps=800, width=256, layers=4, text_width=128, text_layers=2,
                    teacher_steps=1500, batch=256, lr=3e-4, sample_steps=16, n_eval=500, distill_steps=200,
                    distill_batch=128, distill_lr=1e-4, sweep=(2.0, 5.0, 8.0, 11.0, 14.0), save_every=500,
                    time_batch=500, curve=(50, 100, 200)),
    # the reproduction: three seeds; the students distilled for 2,000 steps, with Fig. 5b's curve
    # to 2,000 (docs/toy-results.md's single-seed figures used 500 steps)
    "full": Preset(limit=None, eval_steps=1500, width=256, layers=6, text_width=128, text_layers=2,
                   teacher_steps=3500, batch=256, lr=3e-4, sample_steps=32, n_eval=1000, distill_steps=2000,
                   distill_batch=128, distill_lr=1e-4, sweep=(2.0, 4.0, 6.0, 8.0, 11.0, 14.0), save_every=250,
                   time_batch=500, curve=(250, 500, 1000, 2000), seeds=(0, 1, 2)),
}


def with_defaults(stored):
    """A run's preset as its config.json stores it, with the fields added since it was written at
    their defaults (what that run used), so that an older run's folder stays valid."""
    return {**{f.name: f.default for f in dataclasses.fields(Preset) if f.default is not dataclasses.MISSING},
            **stored}


def mmdit_config(data, P):
    """The toy MMDiT: SD3's architecture at P.width x P.layers, patch 2 on 32 x 32 images, heads
    of 64 (at least 2), text widths from the tiny text encoder."""
    heads = max(P.width // 64, 2)
    return MMDiTConfig(sample_size=32, patch_size=2, in_channels=data.channels, out_channels=data.channels,
                       num_layers=P.layers, attention_head_dim=P.width // heads, num_attention_heads=heads,
                       joint_attention_dim=P.text_width, caption_projection_dim=P.width,
                       pooled_projection_dim=P.text_width, pos_embed_max_size=16)
