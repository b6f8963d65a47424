"""toy/negative.py: the prompt and ∅ swap places, attribute appearance counted by hand, and the
report's chance rates."""

from types import SimpleNamespace

import torch
import torch.nn as nn

from toy import negative


class PixelEvaluator(nn.Module):
    """Predicts attribute a from pixel (0, a) of channel 0, whose value is the class index."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes
        self.unused = nn.Parameter(torch.zeros(1))  # predict() reads the device from a parameter

    def forward(self, x):
        return [nn.functional.one_hot(x[:, 0, 0, a].round().long(), k).float() for a, k in enumerate(self.classes)]


def test_negated_and_empty_only_swap_the_texts():
    calls = []

    def method(x, ts, c, u):
        calls.append((c, u))
    negative.negated(method)("x", "ts", "prompt", "∅")
    negative.empty_only(method)("x", "ts", "prompt", "∅")
    assert calls == [("∅", "prompt"), ("∅", "∅")]


def test_appearance_counted_by_hand():
    # 4 images, 2 attributes; the negated labels y = (0, 1) everywhere. Predicted attribute 0:
    # 0, 0, 1, 2 -> 2 of 4 match; attribute 1: 1, 0, 1, 1 -> 3 of 4; both at once: images 0 only
    x = torch.zeros(4, 1, 1, 2)
    x[:, 0, 0, 0] = torch.tensor([0.0, 0.0, 1.0, 2.0])
    x[:, 0, 0, 1] = torch.tensor([1.0, 0.0, 1.0, 1.0])
    y = torch.tensor([[0, 1]] * 4)
    assert negative.appearance(PixelEvaluator([3, 2]), x, y) == [0.5, 0.75, 0.25]


def test_measure_and_section():
    # a "sampler" that ignores its prompt and draws what its negative text names (class 2 of 3 for
    # ∅): with ∅ in both places the negated labels y never appear, with y as the negative always
    y = torch.tensor([[0], [0], [1]])

    def method(x, ts, c, u):
        out = torch.zeros(len(x), 1, 1, 1)
        out[:, 0, 0, 0] = torch.full((len(x),), 2.0) if isinstance(u, str) else u.float()[:, 0]
        return SimpleNamespace(x=out)

    scorer = SimpleNamespace(evaluator=PixelEvaluator([3]), y=y,
                             generate=lambda m: (m(torch.zeros(3), None, y, "∅").x, None))
    assert negative.measure(scorer, {"fake": method}) == {"fake": {"empty": [0.0, 0.0], "negative": [1.0, 1.0]}}
    title, lines = negative.section({"teacher": {"empty": [0.2, 0.5, 0.1], "negative": [0.05, 0.25, 0.0]}},
                                    [("colour", list("abcdef")), ("shape", list("xyz"))], 5.0)
    assert title == "Negative prompts"
    assert "colour (chance 16.7%) | shape (chance 33.3%) | all at once (chance 5.6%)" in lines[2]
    assert lines[-1] == "| teacher | 20.0% → 5.0% | 50.0% → 25.0% | 10.0% → 0.0% |"
    # one attribute (fashion-mnist's class): no "all at once" column, which would repeat it
    _, lines = negative.section({"teacher": {"empty": [0.1, 0.1], "negative": [0.02, 0.02]}},
                                [("class", list("abcdefghij"))], 5.0)
    assert lines[2] == "| sampler | class (chance 10.0%) |" and lines[-1] == "| teacher | 10.0% → 2.0% |"
