"""Negative prompts in the toy: how often an attribute that a negative prompt names still appears.

The toy's text encoder and teacher were trained on two kinds of text only: full prompts (every
attribute named, e.g. "a red circle at the left") and ∅. The experiment stays inside them: the
prompt is ∅ and the negative prompt a full prompt. For each attribute we count the samples in
which the evaluator sees the value the negative prompt names (red; circle; left), and compare with
the same sampler, from the same noise, given ∅ in both places: how often that value appears
anyway (about 1 / the number of values).

- CFG teacher (Eq. 2 with the negative prompt in ∅'s place): (1 + w) v(∅) - w v(neg).
- TeEFusion student (Eq. 7 likewise): the attention sees ∅'s tokens and z gets
  G(psi(w)) ⊙ F(pooled(∅) - pooled(neg)), a term it never met in training (distilled with
  F(pooled(c) - pooled(∅)) only). Its baseline, ∅ in both places, still carries G(psi(w)) ⊙ F(0).
"""

import math

from .evaluator import predict


def negated(method):
    """A sampler method(x, ts, c, u) run with ∅ as the prompt and the prompt c as the negative."""
    return lambda x, ts, c, u: method(x, ts, u, c)


def empty_only(method):
    """The same sampler with ∅ as the prompt and as the negative: the baseline."""
    return lambda x, ts, c, u: method(x, ts, u, u)


def appearance(evaluator, x, y):
    """The fraction of images x (N, C, H, W) in which the evaluator sees y's (N, A) value of each
    attribute, and of every attribute at once: a list of A + 1 floats."""
    hit = predict(evaluator, x) == y.cpu()  # (N, A)
    return hit.float().mean(dim=0).tolist() + [hit.all(dim=1).float().mean().item()]


def measure(scorer, methods):
    """For each sampler {name: method}: the appearance of the negated attributes among samples of ∅
    alone ("empty") and of ∅ with the negative prompt ("negative"), on the scorer's prompts and
    noise (the prompts become the negative prompts)."""
    result = {}
    for name, method in methods.items():
        empty, _ = scorer.generate(empty_only(method))
        neg, _ = scorer.generate(negated(method))
        result[name] = {"empty": appearance(scorer.evaluator, empty, scorer.y),
                        "negative": appearance(scorer.evaluator, neg, scorer.y)}
    return result


def section(result, attributes, w):
    """report.md's section: per sampler and attribute, how often the negated value appears with ∅
    alone and with the negative prompt. attributes: the dataset's [(name, values)]. Returns
    (title, lines)."""
    names = [name for name, _ in attributes]
    chance = [1 / len(values) for _, values in attributes]
    if len(attributes) > 1:  # with one attribute (a class) "all at once" would repeat its column
        names.append("all at once")
        chance.append(math.prod(chance))  # were the attributes independent and uniform
    lines = [f"The prompt is ∅ and the negative prompt a full prompt (every attribute named), at w = {w:g}. "
             "Each cell: how often the evaluator sees the value the negative prompt names, with ∅ in both "
             "places → with the negative prompt (same noise). Lower on the right means the negative prompt "
             "works. The students were distilled with ∅ only.", "",
             "| sampler | " + " | ".join(f"{n} (chance {100 * p:.1f}%)" for n, p in zip(names, chance)) + " |",
             "|---|" + "---|" * len(names)]
    for name, r in result.items():
        cells = [f"{100 * a:.1f}% → {100 * b:.1f}%" for a, b in zip(r["empty"][:len(names)], r["negative"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "Negative prompts", lines
