"""toy/fidelity.py and toy/colour.py: the heat map's error equals a closed form for a student that
ignores w, and colour statistics by hand."""

import math

import pytest
import torch

import toy.fidelity as fidelity
from conftest import random_mmdit
from tinyteef.distill import DistillConfig
from tinyteef.flow import interpolate
from tinyteef.guidance import DistillCFG, Student, Text
from toy.colour import colour_stats


def test_grid_of_a_student_that_ignores_w_by_hand():
    # A DistillCFG student with its zero-initialised H is the teacher's conditional v(c). Against
    # the Euler+CFG target v(c) + w (v(c) - v(∅)) its error is w^2 mean((v(c) - v(∅))^2) at each t.
    teacher = random_mmdit().requires_grad_(False)
    student = Student(teacher, "distillcfg", DistillCFG(16))
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    c = Text(torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g))
    u = Text(torch.zeros(1, 5, 12), torch.zeros(1, 10))
    ws, ts = (0.0, 2.0, 5.0), (0.3, 0.8)
    grid = fidelity.error_grid([student], teacher, x0, eps, c, u, DistillConfig(teacher="cfg"), ws=ws, ts=ts)[0]
    for i, t in enumerate(ts):
        x_t = interpolate(x0, eps, t)
        with torch.no_grad():
            gap = (teacher(x_t, t, c.tokens, c.pooled) - teacher(x_t, t, u.tokens.expand(2, -1, -1),
                                                                 u.pooled.expand(2, -1))).square().mean().item()
        assert gap > 1e-4
        for j, w in enumerate(ws):
            assert grid[i][j] == pytest.approx(w * w * gap, rel=1e-4, abs=1e-9), (t, w)


def test_colour_stats_by_hand():
    # three pixels on the [0, 1] scale: red (1, 0, 0), grey (0.5, 0.5, 0.5), black (0, 0, 0).
    # Saturation (max - min) / max: 1, 0, and 0 for black; mean 1/3.
    # R: 1, 0.5, 0 -> mean 0.5, std sqrt(1/6); G and B: 0, 0.5, 0 -> mean 1/6, std sqrt(1/18)
    x = torch.tensor([[1.0, 0.0, -1.0], [-1.0, 0.0, -1.0], [-1.0, 0.0, -1.0]])[None, :, None, :]  # (1, 3, 1, 3)
    st = colour_stats(x)
    assert st["saturation"] == pytest.approx(1 / 3)
    assert st["mean"] == pytest.approx([0.5, 1 / 6, 1 / 6])
    assert st["std"] == pytest.approx([math.sqrt(1 / 6), math.sqrt(1 / 18), math.sqrt(1 / 18)])
    # uint8 0 and 255 are 0 and 1 on the same scale; grayscale has no saturation
    assert colour_stats(torch.tensor([[[[255, 0]]]], dtype=torch.uint8)) == {
        "mean": [0.5], "std": [0.5], "saturation": None}
