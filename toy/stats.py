"""Statistics over seeds: a mean with its 95% confidence interval (Student's t), and the paired
difference of two methods run on the same seeds (same teacher, prompts and noise within a seed),
which is what a claim "A beats B" rests on: held when the interval excludes 0, "not separated"
otherwise. One seed gives a value, not an interval."""

import math

# t_{0.975} with df = 1 .. 30 degrees of freedom (two-sided 95%); beyond, the Cornish-Fisher series
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)
Z975 = 1.959964  # the normal distribution's 97.5% quantile


def t_quantile(df):
    """Student's t 97.5% quantile with df >= 1 degrees of freedom: the table to 30, then the
    Cornish-Fisher expansion in 1/df around the normal quantile (error < 1e-4 there)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df = {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def interval(values):
    """(mean, half-width of its 95% interval) of a list of per-seed values; half-width None for one
    value. mean ± t_{0.975, n-1} s / sqrt(n), s the sample standard deviation."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(n - 1) * s / math.sqrt(n)


def paired(a, b):
    """The paired difference a - b over seeds (same seed: same teacher, prompts and noise), as
    (mean, half-width of its 95% interval, sign): sign +1 or -1 when the interval excludes 0 (a
    difference that is held), 0 when it holds 0 or there is one seed ("not separated")."""
    mean, half = interval([x - y for x, y in zip(a, b, strict=True)])
    if half is None or abs(mean) <= half:
        return mean, half, 0
    return mean, half, 1 if mean > 0 else -1


def fmt(mean, half, spec=".3f"):
    """'mean ± half' (or the mean alone for one seed)."""
    return format(mean, spec) if half is None else f"{mean:{spec}} ± {half:{spec}}"
