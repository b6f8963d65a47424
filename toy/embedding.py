"""Fig. 6 and the appendix's cosine table in small: the vector each student adds to its
conditioning vector z, over w, for the held-out prompts.

A student's z^ (guidance.Student.z_hat) is its model's own Eq. 6 conditioning z = G(psi(t)) + F(c)
(MMDiT.conditioning) plus a vector d that carries w:

    TeEFusion (Eq. 7)      d = G(psi(w)) ⊙ F(c - ∅) / divisor
    DistillCFG             d = H(psi(w))
    G(psi(w)) ablation     d = G(psi(w)) / divisor

d does not depend on t: z^ - z cancels G(psi(t)) + F(c), and `measure` checks it over T_GRID (what
differs is float rounding). Only TeEFusion's d depends on the prompt: DistillCFG and the ablation
add one vector per w, the same for every prompt. Eq. 5's naive fusion, run by the teacher, moves z
by F(c^) - F(c), c^ = c + w (c - ∅) (it moves the tokens too, which z does not show); it is drawn
beside the students when the teacher is given.

- Fig. 6 (the paper: t-SNE of the embedded w, w ~ U[2, 14], SD3): here d for every w of W_GRID
  (0 to 18, beyond the trained [2, 14] on both sides: z_hat can be evaluated there, though a student
  refuses to sample there, Student.check_w) and every prompt, projected to 2-D by PCA (`pca_2d`;
  linear, so that distances and the extrapolation stay readable, which t-SNE does not keep).
- The appendix's table (SD3: Cos Sim.txt 0.8073, Cos Sim.img 0.8732), per w:
  txt: cos(z, z^), the original against the fused conditioning vector, averaged over the prompts
       and over the t of T_GRID (z depends on t, so the cosine does);
  img: the cosine between the evaluator's features (the toy's image encoder, the one the Fréchet
       distance reads) of two samples from the same noise and prompt on the scorer's time grid: one
       by the same network with its original z on every step (samplers.euler of the student's
       model; for Eq. 5, of the teacher on c), one with the fused z^ (samplers.student at w; for
       Eq. 5, samplers.naive), averaged over the prompts. Only where a student may sample (w in its
       trained range); None elsewhere.
"""

import math
import os

import torch
import torch.nn.functional as F_

from tinyteef import samplers
from tinyteef.guidance import Student, Text, naive_fusion

from . import plot
from .evaluator import features
from .fidelity import T_GRID
from .scoring import autocast, spread

FIG6_STUDENTS = ("TeEFusion from W2SD+CFG", "DistillCFG from W2SD+CFG", "G(psi(w)) from W2SD+CFG")
EQ5 = "naive fusion (Eq. 5), teacher"
W_GRID = tuple(float(w) for w in range(19))  # 0, 1, ..., 18: the trained [2, 14] and beyond on each side
PCA_T = 0.5  # the t at which d is projected (any t gives the same d)
PAPER_SD3 = (0.8073, 0.8732)  # the appendix's Cos Sim.txt and Cos Sim.img for SD3
ADDS = {"teefusion": "G(ψ(w)) ⊙ F(c − ∅) / {divisor:g}", "distillcfg": "H(ψ(w))",
        "gpsi_ablation": "G(ψ(w)) / {divisor:g}", "eq5": "F(c + w (c − ∅)) − F(c)"}


def plain(module):
    """The module behind torch.compile's wrapper (toy/fast.py), or the module itself: a few prompts
    run eagerly cost less than compiling (and recording CUDA graphs for) a new batch size."""
    return getattr(module, "_orig_mod", module)


def pca_2d(X):
    """PCA of the rows of X (N, D) to 2-D, by the SVD of the centred matrix in float64:
    X - mean = U S V^T; the coordinates are (X - mean) V[:, :2] and component k explains
    S_k^2 / sum S^2 of the variance. An SVD's signs are arbitrary, so each component's sign is
    fixed to make its largest loading positive: one input always draws the same picture.
    Returns (coordinates (N, 2) float64, [fraction explained by component 1, by component 2]);
    the fractions are NaN when every row is the same point."""
    if X.ndim != 2 or min(X.shape) < 2:
        raise ValueError(f"pca_2d needs a matrix of at least 2 rows and 2 columns, got shape {tuple(X.shape)}")
    Xc = X.double() - X.double().mean(dim=0)  # (N, D)
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)  # S (K,), Vh (K, D), K = min(N, D)
    total = S.square().sum()
    if total == 0:
        return torch.zeros(X.shape[0], 2, dtype=torch.float64), [math.nan, math.nan]
    V = Vh[:2]  # (2, D), the principal directions
    top = V.gather(1, V.abs().argmax(dim=1, keepdim=True))  # (2, 1), each direction's largest loading
    V = V * torch.where(top < 0, -1.0, 1.0)
    return Xc @ V.T, (S[:2].square() / total).tolist()


def cosine(a, b):
    """Cosine similarity of matching rows: a, b (..., D) -> (...), in float64."""
    return F_.cosine_similarity(a.double(), b.double(), dim=-1)


@torch.no_grad()
def conditionings(net, t, w, c: Text, u: Text):
    """(z, fused z) (B, D) at t (B,) and the number w: for a guidance.Student its model's Eq. 6 z and
    its z^ (Eq. 7 or a baseline's); for the teacher (an MMDiT) z of c and of Eq. 5's c^."""
    if isinstance(net, Student):
        return net.model.conditioning(t, c.pooled), net.z_hat(t, w, c, u)
    return net.conditioning(t, c.pooled), net.conditioning(t, naive_fusion(c, u, w).pooled)


def added(net, ws, c: Text, u: Text, t):
    """d = fused z - z for every w of ws and every prompt of c, at the time t: (W, B, D) float32."""
    B = c.pooled.shape[0]
    t = torch.full((B,), float(t), device=c.pooled.device)  # (B,)
    return torch.stack([fused - z for z, fused in (conditionings(net, t, w, c, u) for w in ws)])


def text_cosines(net, ws, c: Text, u: Text, ts=T_GRID):
    """Cos Sim.txt per w: cos(z, fused z) averaged over the prompts of c and the times ts."""
    B = c.pooled.shape[0]
    result = []
    for w in ws:
        cos = [cosine(*conditionings(net, torch.full((B,), t, device=c.pooled.device), w, c, u)) for t in ts]
        result.append(torch.stack(cos).mean().item())
    return result


def original_sample(net, x, ts, c: Text):
    """The sample from the noise x with the original conditioning z on every step: the student's
    own model (or the teacher) on c, without a guidance term (the module docstring's Cos Sim.img)."""
    return samplers.euler(net.model if isinstance(net, Student) else net, x, ts, c).x


def fused_sample(net, x, ts, c: Text, u: Text, w):
    """The sample from the same noise with the fused conditioning at w (samplers.student, or for
    the teacher Eq. 5's samplers.naive), or None where a student may not sample at w."""
    if not isinstance(net, Student):
        return samplers.naive(net, x, ts, c, u, w).x
    if not net.w_range[0] <= w <= net.w_range[1]:
        return None
    return samplers.student(net, x, ts, c, u, w).x


@torch.no_grad()
def image_cosines(net, ws, c: Text, u: Text, noise, ts, evaluator):
    """Cos Sim.img per w (None where a student may not sample): the cosine between the evaluator's
    features of the original and of the fused sample from the same noise, averaged over the prompts."""
    def feats(x):  # in float32, as the Scorer reads samples (sampling alone runs under autocast)
        return features(evaluator, x.float().clamp(-1, 1))  # (B, F)
    with autocast(noise.device):
        x0 = original_sample(net, noise, ts, c)
    f0 = feats(x0)
    result = []
    for w in ws:
        with autocast(noise.device):
            x = fused_sample(net, noise, ts, c, u, w)
        result.append(None if x is None else cosine(f0, feats(x)).mean().item())
    return result


def entry(net, ws, c: Text, u: Text):
    """What `measure` records of d for one student or the teacher: d projected to 2-D ("xy" (W, B, 2),
    at PCA_T) with the variance each component explains, the largest change of d over T_GRID
    relative to d's largest entry ("t_drift": float rounding), and Cos Sim.txt per w."""
    d = added(net, ws, c, u, PCA_T)  # (W, B, D)
    drift = max((added(net, ws, c, u, t) - d).abs().max().item() for t in T_GRID)
    xy, explained = pca_2d(d.flatten(0, 1))
    student = isinstance(net, Student)
    return {"kind": net.kind if student else "eq5", "divisor": float(net.divisor) if student else None,
            "w_range": list(net.w_range) if student else None, "xy": xy.float().view(len(ws), -1, 2).cpu(),
            "explained": explained, "t_drift": drift / max(d.abs().max().item(), 1e-30),
            "cos_txt": text_cosines(net, ws, c, u)}


def measure(students, scorer, n=64, ws=W_GRID, teacher=None, n_images=16):
    """Fig. 6's projection and the appendix's cosines for each student {name: guidance.Student,
    torch.compile'd or not} and, with `teacher` (the MMDiT), for Eq. 5's naive fusion; on n of the
    scorer's held-out prompts (spread over them, so every label combination comes in turn), its ∅,
    noise, time grid and evaluator (a toy.scoring.Scorer, or anything with c, u, noise, ts and
    evaluator). Cos Sim.img, the only part that samples (one sample per prompt and w, and one
    original per prompt), uses the first n_images of the n prompts; 0 skips it (None). Deterministic:
    nothing is drawn. Returns {"ws", "n", "n_images", "entries": {name: entry(...) and "cos_img"}}:
    lists and CPU tensors only (checkpoint.save keeps them)."""
    rows = spread(torch.arange(scorer.c.pooled.shape[0]), n)
    c = Text(scorer.c.tokens[rows], scorer.c.pooled[rows])  # (n, L, D), (n, P)
    u = scorer.u.expand(len(rows))
    k = min(n_images, len(rows))
    c_img = Text(c.tokens[:k], c.pooled[:k])
    nets = {name: plain(s) for name, s in students.items()}
    if teacher is not None:
        nets[EQ5] = plain(teacher)
    entries = {}
    for name, net in nets.items():
        entries[name] = entry(net, ws, c, u)
        entries[name]["cos_img"] = [None] * len(ws)
        if k:
            entries[name]["cos_img"] = image_cosines(net, ws, c_img, scorer.u.expand(k), scorer.noise[rows[:k]],
                                                     scorer.ts, scorer.evaluator)
    return {"ws": [float(w) for w in ws], "n": len(rows), "n_images": k, "entries": entries}


def _cell(v):
    return "—" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _percent(f):
    return f"{100 * f:.1f}%" if math.isfinite(f) else "—"


def _mean_inside(values, ws, lo, hi):
    """The mean of values at the w of [lo, hi] (None values left out), or None."""
    kept = [v for v, w in zip(values, ws) if lo <= w <= hi and v is not None]
    return sum(kept) / len(kept) if kept else None


def section(out, result):
    """report.md's section for `measure`'s result: embedding.png (one PCA panel per student, and
    Eq. 5's, points coloured by w, rings where w is outside the student's trained range, and a
    colour bar) and the appendix's cosines, one row per w. Returns (title, lines)."""
    ws, entries = result["ws"], result["entries"]
    panels = []
    for name, e in entries.items():
        lo, hi = e["w_range"] or (-math.inf, math.inf)
        xy = e["xy"]  # (W, n, 2)
        flat = [(x, y, w, not lo <= w <= hi) for w, pts in zip(ws, xy.tolist()) for x, y in pts]
        xs, ys, vs, rings = (list(col) for col in zip(*flat))
        pc = [_percent(f) for f in e["explained"]]
        panels.append(plot.scatter_panel(xs, ys, vs, name, f"PC1 ({pc[0]})", f"PC2 ({pc[1]})", min(ws), max(ws),
                                         rings))
    panels.append(plot.colour_bar(min(ws), max(ws), False, "w", height=panels[0].height))
    plot.save_panels(panels, os.path.join(out, "embedding.png"), len(panels))
    lines = [f"The vector d each student adds to its conditioning z (z^ = z + d, guidance.Student.z_hat), for "
             f"w = {ws[0]:g} … {ws[-1]:g} and {result['n']} held-out prompts, projected to 2-D by PCA (Fig. 6 in "
             "small; the paper draws t-SNE over w in [2, 14]). Filled points: w inside the student's trained "
             "range; rings: outside it, where the student refuses to sample but d can still be evaluated. "
             "DistillCFG's and the ablation's d do not depend on the prompt (one point per w); TeEFusion's "
             "does, through F(c − ∅). d does not depend on t: its largest change over t (last column) is float "
             "rounding. Eq. 5's row is the teacher's naive fusion, for comparison.", "",
             "| | d, what it adds to z | variance explained by PC1 | by PC2 | largest change of d over t "
             "(relative) |", "|---|---|---|---|---|"]
    for name, e in entries.items():
        f1, f2 = (_percent(f) for f in e["explained"])
        lines.append(f"| {name} | {ADDS[e['kind']].format(divisor=e['divisor'] or 1)} | {f1} | {f2} | "
                     f"{e['t_drift']:.1e} |")
    lines += ["", "![the vector each student adds to z, PCA, coloured by w](embedding.png)", "",
              "The appendix's table in small, per w: Cos Sim.txt / Cos Sim.img. txt: cos(z, z^) between the "
              "original and the fused conditioning vector, averaged over the prompts and over t. img: the cosine "
              "between the evaluator's features of two samples from the same noise and prompt, by the same "
              f"network with z and with z^ on every step, over the first {result['n_images']} prompts "
              "(toy/embedding.py); — where the student may not sample. "
              f"SD3 in the paper: {PAPER_SD3[0]} / {PAPER_SD3[1]}.", "",
              "| w | " + " | ".join(entries) + " |", "|---|" + "---|" * len(entries)]
    for j, w in enumerate(ws):
        cells = [f"{_cell(e['cos_txt'][j])} / {_cell(e['cos_img'][j])}" for e in entries.values()]
        lines.append(f"| {w:g} | " + " | ".join(cells) + " |")
    lo, hi = next((e["w_range"] for e in entries.values() if e["w_range"]), (min(ws), max(ws)))
    means = [f"{name} {_cell(_mean_inside(e['cos_txt'], ws, lo, hi))} / "
             f"{_cell(_mean_inside(e['cos_img'], ws, lo, hi))}" for name, e in entries.items()]
    lines += ["", f"Mean over w in [{lo:g}, {hi:g}] (txt / img): " + "; ".join(means) + "."]
    return "Fig. 6 in small: the vector each student adds to z, and its cosine to z", lines
