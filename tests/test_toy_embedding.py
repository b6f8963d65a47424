"""toy/embedding.py: the PCA against numpy's eigen-decomposition and a point set with a known
principal plane, the added vector and the cosines against Eq. 5-7 written out by hand on the
model's weights, and the report section's figure and table."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import toy.embedding as emb
from conftest import random_mmdit
from tinyteef import checkpoint
from tinyteef.flow import time_grid
from tinyteef.guidance import DistillCFG, Student, Text
from toy.evaluator import Evaluator
from toy.methods import STUDENTS


def hand_mlp(m, x):
    """Linear - SiLU - Linear from the weights of an MLPEmbedder (G, F or H)."""
    h = x @ m.linear_1.weight.T + m.linear_1.bias
    return (h * torch.sigmoid(h)) @ m.linear_2.weight.T + m.linear_2.bias


def hand_psi(s):
    """SD3's sinusoid of the number s (1000 t or 1000 w): [cos(s f_i) | sin(s f_i)], f_i = 10000^(-i/128),
    in float32 as diffusers' get_timestep_embedding computes it (at s = 18000 the float32 angle is off
    by ~1e-3 rad, which moves G's output by ~1e-5 of its scale: the model's rounding, kept)."""
    f = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    angle = torch.tensor(s, dtype=torch.float32) * f
    return torch.cat([torch.cos(angle), torch.sin(angle)])[None]  # (1, 256)


def tiny_nets(random_h=True):
    """A teacher and its three students (TeEFusion and the ablation with divisor 4), tiny and random."""
    teacher = random_mmdit(seed=1).requires_grad_(False)
    H = DistillCFG(16)
    if random_h:
        with torch.no_grad():
            for p in H.parameters():
                p.normal_(0.0, 0.2)
    students = {"teefusion": Student(teacher, "teefusion", divisor=4.0),
                "distillcfg": Student(teacher, "distillcfg", H),
                "gpsi_ablation": Student(teacher, "gpsi_ablation", divisor=4.0)}
    return teacher, students


def prompts(B=3):
    g = torch.Generator().manual_seed(5)
    return (Text(torch.randn(B, 5, 12, generator=g), torch.randn(B, 10, generator=g)),
            Text(torch.randn(1, 5, 12, generator=g), torch.randn(1, 10, generator=g)))


def close(ours, ref, rtol=1e-5):
    """max |ours - ref| <= rtol * max |ref| (the added vector is z^ - z, rounded at z's scale)."""
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= rtol * ref.abs().max().item()


def test_pca_against_numpy_eigendecomposition_of_the_covariance():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))  # a random rotation
    X = (torch.randn(60, 5, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1])) @ Q.T + 7.0
    xy, explained = emb.pca_2d(X)
    Xn = X.double().numpy()
    lam, V = np.linalg.eigh(np.cov(Xn, rowvar=False))  # ascending
    lam, V = lam[::-1], V[:, ::-1]
    V = V[:, :2] * np.sign(V[np.abs(V[:, :2]).argmax(axis=0), [0, 1]])  # largest loading positive
    ref = (Xn - Xn.mean(axis=0)) @ V  # (60, 2)
    np.testing.assert_allclose(xy.numpy(), ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    np.testing.assert_allclose(explained, lam[:2] / lam.sum(), rtol=1e-9)


def test_pca_of_a_rotated_cross_with_a_known_plane():
    # (±3, 0, 0) and (0, ±1, 0), rotated and moved: variances 9/2 and 1/2 of a total 5 -> 90% and 10%,
    # and the projection gives back the cross (up to each axis' sign)
    cross = torch.tensor([[3.0, 0, 0], [-3, 0, 0], [0, 1, 0], [0, -1, 0]], dtype=torch.float64)
    c, s = math.cos(0.7), math.sin(0.7)
    R = (torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1.0]], dtype=torch.float64)
         @ torch.tensor([[1.0, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64))
    xy, explained = emb.pca_2d(cross @ R.T + torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64))
    assert explained == pytest.approx([0.9, 0.1], abs=1e-12)
    torch.testing.assert_close(xy.abs(), cross[:, :2].abs(), rtol=0, atol=1e-12)
    same, _ = emb.pca_2d(torch.ones(4, 3))
    assert same.abs().max() == 0 and all(math.isnan(f) for f in emb.pca_2d(torch.ones(4, 3))[1])


def test_added_vector_is_eq_7_and_the_baselines_by_hand_at_every_t():
    teacher, students = tiny_nets()
    c, u = prompts()
    ws = (0.0, 3.0, 18.0)
    with torch.no_grad():
        for t in (0.1, 0.9):
            for kind, s in students.items():
                d = emb.added(s, ws, c, u, t)  # (W, B, D)
                for j, w in enumerate(ws):
                    g = hand_mlp(teacher.G, hand_psi(1000 * w))  # (1, D)
                    ref = {"teefusion": g * hand_mlp(teacher.F, c.pooled - u.pooled) / 4.0,
                           "gpsi_ablation": (g / 4.0).expand(3, -1),
                           "distillcfg": hand_mlp(students["distillcfg"].H, hand_psi(1000 * w)).expand(3, -1)}[kind]
                    close(d[j], ref)
            d = emb.added(teacher, ws, c, u, t)  # Eq. 5: F(c + w (c - ∅)) - F(c), 0 at w = 0
            assert d[0].abs().max() == 0
            for j, w in enumerate(ws[1:], 1):
                close(d[j], hand_mlp(teacher.F, c.pooled + w * (c.pooled - u.pooled)) - hand_mlp(teacher.F, c.pooled))


def test_cosines_by_hand():
    a, b = torch.tensor([[1.0, 0.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0], [4.0, 3.0]])
    assert emb.cosine(a, b).tolist() == pytest.approx([1 / math.sqrt(2), 24 / 25])
    teacher, students = tiny_nets()
    c, u = prompts()
    w, ts = 6.0, (0.2, 0.7)
    with torch.no_grad():
        fs = []
        for t in ts:  # cos(z, z^), z = G(psi(1000 t)) + F(c), z^ = z + G(psi(1000 w)) ⊙ F(c - ∅) / 4
            z = hand_mlp(teacher.G, hand_psi(1000 * t)) + hand_mlp(teacher.F, c.pooled)
            zh = z + hand_mlp(teacher.G, hand_psi(1000 * w)) * hand_mlp(teacher.F, c.pooled - u.pooled) / 4.0
            fs += [(z[b] @ zh[b] / (z[b].norm() * zh[b].norm())).item() for b in range(3)]
        ours = emb.text_cosines(students["teefusion"], (w,), c, u, ts)[0]
    assert ours == pytest.approx(sum(fs) / len(fs), rel=1e-5)
    assert 0.0 < ours < 0.999  # the term moves z: the case is not trivial


def test_measure_and_section_write_the_figure_and_a_row_per_w(tmp_path):
    teacher, students = tiny_nets(random_h=False)  # DistillCFG with H = 0 adds nothing: cosines 1
    for s in students.values():
        s.w_range = (2.0, 14.0)
    c, u = prompts(6)
    torch.manual_seed(3)
    scorer = SimpleNamespace(c=c, u=u, noise=torch.randn(6, 4, 8, 8), ts=time_grid(3),
                             evaluator=Evaluator(4, [3], width=8).eval())
    ws = (0.0, 2.0, 9.0, 14.0, 18.0)
    students["teefusion"] = torch.compile(students["teefusion"])  # as train_toy.py holds them (never called)
    result = emb.measure(students, scorer, n=3, ws=ws, teacher=teacher)
    assert result["n"] == 3 and result["ws"] == list(ws)
    e = result["entries"]
    assert list(e) == ["teefusion", "distillcfg", "gpsi_ablation", emb.EQ5]
    assert e["teefusion"]["xy"].shape == (5, 3, 2)
    for name in ("teefusion", "distillcfg", "gpsi_ablation"):  # no sampling outside the trained range
        assert e[name]["cos_img"][0] is None and e[name]["cos_img"][-1] is None
        assert all(v is not None for v in e[name]["cos_img"][1:-1])
        assert e[name]["t_drift"] < 1e-5  # d does not depend on t
    assert e["distillcfg"]["cos_txt"] == pytest.approx([1.0] * 5)
    assert e["distillcfg"]["cos_img"][1:-1] == pytest.approx([1.0] * 3)
    assert all(math.isnan(f) for f in e["distillcfg"]["explained"])
    assert e[emb.EQ5]["cos_txt"][0] == pytest.approx(1.0) and e[emb.EQ5]["cos_img"][0] == pytest.approx(1.0)
    assert sum(e["teefusion"]["explained"]) <= 1 + 1e-9 and e["teefusion"]["cos_txt"][2] < 0.999
    checkpoint.save(result, tmp_path / "embedding.pt")  # as train_toy.py caches a stage's result
    result = checkpoint.load(tmp_path / "embedding.pt")
    title, lines = emb.section(tmp_path, result)
    assert title.startswith("Fig. 6 in small")
    png = Image.open(tmp_path / "embedding.png")
    assert png.width > 4 * 200  # four panels and the colour bar side by side
    rows = [line for line in lines if line.startswith("| ") and line.split(" | ")[0][2:] in {f"{w:g}" for w in ws}]
    assert [r.split(" | ")[0] for r in rows] == [f"| {w:g}" for w in ws]
    assert rows[0].count("—") == 3  # w = 0: no image cosine for the three students
    assert "![the vector each student adds to z, PCA, coloured by w](embedding.png)" in lines


def test_fig6_students_are_the_toy_students_from_w2sd():
    kinds = [(STUDENTS[n].teacher, STUDENTS[n].kind) for n in emb.FIG6_STUDENTS]
    assert kinds == [("w2sd", "teefusion"), ("w2sd", "distillcfg"), ("w2sd", "gpsi_ablation")]


def test_pca_refuses_a_single_row():
    with pytest.raises(ValueError, match="at least 2 rows"):
        emb.pca_2d(torch.ones(1, 3))
