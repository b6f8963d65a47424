"""Scoring a sampler in the toy world: the same prompts and noises for every method, prompt
accuracy and Fréchet distance from the evaluator, and wall time per image at a fixed batch; each
scored method cached in OUT/scores/ with a grid of its samples (stage 3 and later), and the sweep
over w (Fig. 5a and Fig. 4 in small)."""

import os
import re
import time

import torch
from tqdm.auto import tqdm

from tinyteef.bench import timed
from tinyteef.flow import time_grid
from tinyteef.guidance import Text

from .colour import colour_stats
from .data import to_float, to_uint8
from .evaluator import features, frechet_distance, prompt_accuracy
from .report import save_grid, save_w_grid
from .staging import staged


def autocast(device):
    """bf16 autocast on a GPU; fp32 on the CPU (bf16 matmuls there are slow)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def spread(x, k):
    """k rows spread evenly over x (the scored prompts run through the label combinations in
    order, so the first k would all share their first attributes)."""
    return x[:: max(len(x) // k, 1)][:k]


class Scorer:
    """Generates images for a fixed set of prompts and noises, and scores them."""

    def __init__(self, data, P, device, evaluator, text, bank, seed):
        self.P, self.device, self.evaluator = P, device, evaluator
        K = bank.ids.shape[0]
        combo = torch.arange(P.n_eval) % K  # every label combination, in turn
        self.y = torch.stack([combo // r % n for r, n in zip(bank.radix.cpu(), data.classes)], dim=1)  # (n, A)
        g = torch.Generator(device).manual_seed(seed + 1)
        with torch.no_grad():
            self.c = text(bank.sample(self.y.to(device), g))
            self.u = text(bank.empty)
        self.noise = torch.randn(P.n_eval, data.channels, 32, 32, generator=g, device=device)
        self.ts = time_grid(P.sample_steps).to(device)
        self.real = features(evaluator, data.test_x)

    def generate(self, method, n=None, seconds=None):
        """method(x, ts, c, u) -> Samples, on the first n prompts and noises, in batches of
        time_batch. With a list `seconds`, the wall time of every full batch after the first (which
        warms up: compiling, recording CUDA graphs) is appended to it: ms / image from the scoring
        run itself, with no batch sampled only to be timed."""
        n = n or self.P.n_eval
        images, s, B = [], None, self.P.time_batch
        for i in tqdm(range(0, n, B), desc="sampling", leave=False):
            j = min(i + B, n)
            c = Text(self.c.tokens[i:j], self.c.pooled[i:j])
            start = time.perf_counter()
            with autocast(self.device):
                s = method(self.noise[i:j], self.ts, c, self.u.expand(j - i))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if seconds is not None and i > 0 and j - i == B:
                seconds.append(time.perf_counter() - start)
            images.append(s.x.float().clamp(-1, 1).cpu())
        return torch.cat(images), s

    def ms_per_image(self, method, repeats=3):
        """Wall time of a batch of `time_batch` images, per image: the median of `repeats` timed
        batches after a warm-up batch (bench.timed). For scoring runs of a single batch."""
        B = min(self.P.time_batch, self.P.n_eval)
        c = Text(self.c.tokens[:B], self.c.pooled[:B])

        def one_batch():
            with autocast(self.device):
                return method(self.noise[:B], self.ts, c, self.u.expand(B))
        return 1000 * timed(one_batch, self.device, repeats)[0] / B

    def score(self, method, n=None, timing=True):
        """Prompt accuracy, Fréchet distance, colour statistics and passes per step (made and
        nominal) of the method's samples, and with `timing` its ms per image. Returns (row, samples)."""
        seconds = []
        x, s = self.generate(method, n, seconds)
        r = {"accuracy": prompt_accuracy(self.evaluator, x, self.y[: len(x)]),
             "fd": frechet_distance(features(self.evaluator, x), self.real), "colour": colour_stats(x),
             "passes": s.passes / s.steps, "nominal": s.nominal / s.steps}
        if timing:  # the median full batch after the first, or batches of their own when there is one
            B = min(self.P.time_batch, self.P.n_eval)
            r["ms"] = 1000 * sorted(seconds)[len(seconds) // 2] / B if seconds else self.ms_per_image(method)
        return r, x


def score(scorer, out, name, method, teacher_x=None, timing=True):
    """Score one method (cached in OUT/scores/), save its grid of samples, return its table row;
    with `teacher_x`, the samples of the teacher row it imitates, also the RMS distance to them."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")

    def compute():  # samples, prompt accuracy, Fréchet distance, passes and (with timing) ms / image
        r, x = scorer.score(method, timing=timing)
        save_grid(spread(x, 64), os.path.join(out, f"{slug}.png"))
        return {**r, "x": to_uint8(x)}
    r = staged(os.path.join(out, "scores", f"{slug}.pt"), compute)
    if teacher_x is not None:  # the same prompts and noise as the teacher row: how far the student lands
        diff = to_float(r["x"]) - to_float(teacher_x)
        r["rms"] = diff.square().mean().sqrt().item()
    return {**r, "grid": f"{slug}.png"}


def stage_sweep(scorer, P, out, methods):
    """Fig. 5a and Fig. 4 in small: every method of `methods` ({name: method as a function of w})
    scored at each w of P.sweep, and grid_w.png (rows w, blocks methods, same prompts and noise)."""
    def compute():
        rows, grid = {}, {}
        for w in tqdm(P.sweep, desc="w sweep"):
            rows[w], grid[w] = {}, {}
            for m, make in methods.items():
                r, x = scorer.score(make(w), n=max(P.n_eval // 2, 8), timing=False)
                rows[w][m], grid[w][m] = r, spread(x, 8)
        save_w_grid(grid, os.path.join(out, "grid_w.png"))
        return {"rows": rows}
    return staged(os.path.join(out, "sweep.pt"), compute)
