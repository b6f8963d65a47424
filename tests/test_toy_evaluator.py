"""toy/evaluator.py: Fréchet distance against closed forms and scipy's sqrtm (within 1e-4 of the
reference's scale), and a classifier that learns attributes separable by construction. The data
are built here (not by toy/data.py), small enough for the CPU."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import assert_close_to_reference, oracle
from toy.evaluator import Evaluator, features, frechet_distance, predict, prompt_accuracy, train_evaluator

QUADRANTS, CHANNELS = 4, 3  # attribute 0: which quadrant is bright; attribute 1: in which channel


def hadamard(n):
    """Sylvester's n x n Hadamard matrix (n a power of 2): entries +-1, orthogonal columns, and every
    column but the first sums to 0."""
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h


def random_orthogonal(n, seed):
    """An n x n orthogonal matrix (the Q of a random matrix's QR)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q


def quadrant_images(n, generator):
    """n uint8 images (n, 3, 32, 32) of noise in [0, 60), one quadrant of one channel lifted to
    [200, 240), and their labels (n, 2): (quadrant, channel)."""
    y = torch.stack([torch.randint(QUADRANTS, (n,), generator=generator),
                     torch.randint(CHANNELS, (n,), generator=generator)], dim=1)  # (n, 2)
    x = torch.randint(60, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    bright = torch.randint(200, 240, (n, 16, 16), generator=generator, dtype=torch.uint8)
    for i, (q, c) in enumerate(y.tolist()):
        r, s = 16 * (q // 2), 16 * (q % 2)
        x[i, c, r:r + 16, s:s + 16] = bright[i]
    return x, y


@pytest.fixture(scope="module")
def quadrants():
    """1,000 train and 200 test images of the quadrant x channel world, in toy/data.py's layout."""
    g = torch.Generator().manual_seed(0)
    train_x, train_y = quadrant_images(1000, g)
    test_x, test_y = quadrant_images(200, g)
    return SimpleNamespace(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                           channels=3, classes=[QUADRANTS, CHANNELS])


@pytest.fixture(scope="module")
def trained(quadrants):
    """A narrow evaluator trained briefly on the quadrant world, and its reported scores."""
    return train_evaluator(quadrants, steps=150, batch_size=64, seed=0, progress=False, width=8)


def test_frechet_identical_sets_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 8)) @ np.random.default_rng(1).normal(size=(8, 8))
    assert abs(frechet_distance(f, f)) < 1e-6


def test_frechet_shifted_copy_is_squared_shift():
    # Equal covariances cancel in the trace term: the distance is ||m||^2 exactly.
    f1 = np.random.default_rng(0).normal(size=(400, 6)) * np.arange(1, 7)
    m = np.array([0.5, -1.0, 2.0, 0.0, 3.0, -0.25])
    assert frechet_distance(f1, f1 + m) == pytest.approx(float(m @ m), rel=1e-9, abs=1e-8)


@pytest.mark.parametrize("rotate", [False, True])
def test_frechet_diagonal_covariances_by_hand(rotate):
    # Columns 1..5 of a 16 x 16 Hadamard matrix have mean 0 and are orthogonal, so a * H has the
    # exact unbiased covariance diag(a^2 * 16 / 15). Commuting covariances give
    # Tr(S1 + S2 - 2 (S1 S2)^(1/2)) = sum_i (sqrt(v1_i) - sqrt(v2_i))^2. The same rotation of both
    # sets leaves the distance unchanged but makes the covariances full.
    h = hadamard(16)[:, 1:6]  # (16, 5)
    a, b = np.array([1.0, 2.0, 0.5, 3.0, 1.5]), np.array([2.0, 2.0, 1.0, 0.1, 4.0])
    mu1, mu2 = np.array([0.0, 1.0, 0.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0, 0.0])
    f1, f2 = h * a + mu1, h * b + mu2
    v1, v2 = a ** 2 * 16 / 15, b ** 2 * 16 / 15
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    if rotate:
        q = random_orthogonal(5, seed=3)
        f1, f2 = f1 @ q, f2 @ q
    assert frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-9)


def test_frechet_two_dimensional_closed_form():
    # For 2 x 2 M = S1 S2 with eigenvalues l1, l2 >= 0: (Tr M^(1/2))^2 = (sqrt l1 + sqrt l2)^2
    # = Tr M + 2 sqrt(det M). Moments from numpy's own mean and cov (ddof 1).
    rng = np.random.default_rng(5)
    f1 = rng.normal(size=(300, 2)) @ np.array([[1.0, 0.8], [0.0, 0.6]]) + [1.0, -1.0]
    f2 = rng.normal(size=(200, 2)) @ np.array([[0.3, -0.5], [1.2, 0.4]])
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    m = s1 @ s2
    trace_sqrt = np.sqrt(np.trace(m) + 2.0 * np.sqrt(np.linalg.det(m)))
    dmu = f1.mean(axis=0) - f2.mean(axis=0)
    expected = dmu @ dmu + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt
    assert frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_scipy_sqrtm():
    linalg = oracle("scipy.linalg")
    rng = np.random.default_rng(7)
    f1 = rng.normal(size=(400, 10)) @ rng.normal(size=(10, 10))
    f2 = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) + 0.3
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    dmu = f1.mean(axis=0) - f2.mean(axis=0)
    expected = dmu @ dmu + np.trace(s1 + s2 - 2.0 * linalg.sqrtm(s1 @ s2).real)
    assert_close_to_reference(frechet_distance(f1, f2), expected, what="Fréchet distance")


def test_no_batchnorm_anywhere():
    model = Evaluator(3, [6, 3, 5])
    kinds = [type(m) for m in model.modules()]
    assert not any(issubclass(k, torch.nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert torch.nn.GroupNorm in kinds


def test_output_shapes_and_dtypes(quadrants):
    torch.manual_seed(0)
    model = Evaluator(3, [QUADRANTS, CHANNELS], width=8).eval()
    x = quadrants.test_x[:50]
    logits = model(x.float() / 127.5 - 1.0)
    assert [tuple(l.shape) for l in logits] == [(50, QUADRANTS), (50, CHANNELS)]
    p = predict(model, x, batch_size=16)
    assert p.shape == (50, 2) and p.dtype == torch.int64
    f = features(model, x, batch_size=16)
    assert f.shape == (50, 32) and f.dtype == torch.float64


def test_uint8_and_float_inputs_agree(trained, quadrants):
    model, _ = trained
    x = quadrants.test_x
    as_float = x.float() / 127.5 - 1.0  # the [-1, 1] convention, written out here
    assert torch.equal(predict(model, x), predict(model, as_float, batch_size=64))
    expected = torch.stack([l.argmax(dim=1) for l in model(as_float)], dim=1)
    assert torch.equal(predict(model, x, batch_size=7), expected)
    assert torch.allclose(features(model, x), features(model, as_float, batch_size=33))


def test_learns_separable_attributes(trained):
    model, scores = trained
    assert not model.training
    assert scores["accuracy"] >= 0.95
    assert len(scores["accuracy_per_attribute"]) == 2
    # every attribute is right at least as often as all of them together
    assert min(scores["accuracy_per_attribute"]) >= scores["accuracy"]


def test_reported_accuracy_needs_every_attribute(quadrants):
    # The same training run, scored against test labels whose channel is wrong in the first 50
    # rows: a (near) perfect model gets attribute 0 right everywhere, attribute 1 in 150 of 200
    # rows, and all attributes in those 150 only.
    y = quadrants.test_y.clone()
    y[:50, 1] = (y[:50, 1] + 1) % CHANNELS
    data = SimpleNamespace(**{**vars(quadrants), "test_y": y})
    model, scores = train_evaluator(data, steps=150, batch_size=64, seed=0, progress=False, width=8)
    right = predict(model, quadrants.test_x) == y  # (200, 2)
    assert scores["accuracy"] == pytest.approx(right.all(dim=1).double().mean().item())
    assert scores["accuracy_per_attribute"] == pytest.approx(right.double().mean(dim=0).tolist())
    assert scores["accuracy_per_attribute"][0] >= 0.95
    assert scores["accuracy"] == pytest.approx(0.75, abs=0.05)


def test_prompt_accuracy_true_wrong_and_shuffled_labels(trained, quadrants):
    model, scores = trained
    x, y = quadrants.test_x, quadrants.test_y
    hits = 0
    for row, label in zip(predict(model, x).tolist(), y.tolist()):
        hits += row == label
    assert prompt_accuracy(model, x, y) == pytest.approx(hits / len(y)) == pytest.approx(scores["accuracy"])
    # Labels changed in every row can only match where the prediction was already wrong.
    wrong = (y + 1) % torch.tensor([QUADRANTS, CHANNELS])
    assert prompt_accuracy(model, x, wrong) <= 1.0 - scores["accuracy"] + 1e-9
    # A random permutation of the labels: with nearly correct predictions, a row matches with
    # probability about sum_k p_k^2 over the 12 (quadrant, channel) pairs, ~ 1/12 when balanced.
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    pairs = torch.bincount(y[:, 0] * CHANNELS + y[:, 1], minlength=12).double() / len(y)
    chance = float((pairs ** 2).sum())
    assert chance < 0.12
    assert prompt_accuracy(model, x, shuffled) < chance + 0.1


def test_loss_curve_is_kept(trained):
    # logged every 10 of the 150 steps. The first is the untrained model's summed cross-entropy,
    # near ln 4 + ln 3 (about uniform over 4 quadrants and 3 channels); training lowers it.
    _, scores = trained
    assert [step for step, _ in scores["losses"]] == list(range(0, 150, 10))
    first, last = scores["losses"][0][1], scores["losses"][-1][1]
    assert first == pytest.approx(math.log(4) + math.log(3), abs=0.3)
    assert last < first / 4, (first, last)
