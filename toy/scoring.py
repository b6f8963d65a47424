"""Scoring a sampler in the toy world: the same prompts and noises for every method, prompt
accuracy and Fréchet distance from the evaluator, and wall time per image at a fixed batch."""

import torch
from tqdm.auto import tqdm

from tinyteef.bench import timed
from tinyteef.flow import time_grid
from tinyteef.guidance import Text

from .colour import colour_stats
from .evaluator import features, frechet_distance, prompt_accuracy


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

    def generate(self, method, n=None):
        """method(x, ts, c, u) -> Samples, on the first n prompts and noises, in batches."""
        n = n or self.P.n_eval
        images, s = [], None
        for i in tqdm(range(0, n, self.P.time_batch), desc="sampling", leave=False):
            j = min(i + self.P.time_batch, n)
            c = Text(self.c.tokens[i:j], self.c.pooled[i:j])
            with autocast(self.device):
                s = method(self.noise[i:j], self.ts, c, self.u.expand(j - i))
            images.append(s.x.float().clamp(-1, 1).cpu())
        return torch.cat(images), s

    def ms_per_image(self, method, repeats=3):
        """Wall time of a batch of `time_batch` images, per image: the median of `repeats` timed
        batches after a warm-up batch (bench.timed)."""
        B = min(self.P.time_batch, self.P.n_eval)
        c = Text(self.c.tokens[:B], self.c.pooled[:B])

        def one_batch():
            with autocast(self.device):
                return method(self.noise[:B], self.ts, c, self.u.expand(B))
        return 1000 * timed(one_batch, self.device, repeats)[0] / B

    def score(self, method, n=None, timing=True):
        """Prompt accuracy, Fréchet distance, colour statistics and passes per step (made and
        nominal) of the method's samples, and with `timing` its ms per image. Returns (row, samples)."""
        x, s = self.generate(method, n)
        r = {"accuracy": prompt_accuracy(self.evaluator, x, self.y[: len(x)]),
             "fd": frechet_distance(features(self.evaluator, x), self.real), "colour": colour_stats(x),
             "passes": s.passes / s.steps, "nominal": s.nominal / s.steps}
        if timing:
            r["ms"] = self.ms_per_image(method)
        return r, x
