"""toy/data.py: generated shapes checked by geometry, idx and CIFAR-10 binary readers on files
written here by hand, prompts and the tokenisation rule."""

import gzip
import math
import os
import re

import numpy as np
import pytest
import torch

from toy.data import load, to_float, to_uint8, words

# Which RGB channels each colour name turns on ("pure-ish": on channels bright, off channels dark).
ON_CHANNELS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1),
               "yellow": (1, 1, 0), "magenta": (1, 0, 1), "cyan": (0, 1, 1)}
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def shapes():
    return load("shapes", limit=(5000, 100))


def shape_masks(x):
    """Shape pixels: a bright channel; the background is faint noise well below 100."""
    return x.max(dim=1).values > 100  # (N, 32, 32)


def test_shapes_attributes_and_sizes(shapes):
    assert [name for name, _ in shapes.attributes] == ["colour", "shape", "position"]
    assert shapes.attributes[0][1] == ["red", "green", "blue", "yellow", "magenta", "cyan"]
    assert shapes.attributes[1][1] == ["circle", "square", "triangle"]
    assert sorted(shapes.attributes[2][1]) == ["bottom", "centre", "left", "right", "top"]
    assert shapes.classes == [6, 3, 5] and shapes.channels == 3
    assert shapes.train_x.shape == (5000, 3, 32, 32) and shapes.train_x.dtype == torch.uint8
    assert shapes.train_y.shape == (5000, 3) and shapes.train_y.dtype == torch.int64
    assert shapes.test_x.shape == (100, 3, 32, 32) and shapes.test_y.shape == (100, 3)


def test_shapes_deterministic_per_seed(shapes):
    again, other = load("shapes", limit=(5000, 100)), load("shapes", seed=1, limit=(5000, 100))
    assert torch.equal(again.train_x, shapes.train_x) and torch.equal(again.train_y, shapes.train_y)
    assert torch.equal(again.test_x, shapes.test_x)
    assert not torch.equal(other.train_x, shapes.train_x) and not torch.equal(other.test_y, shapes.test_y)
    # train and test are different streams: the first test image is not the first train image
    assert not torch.equal(shapes.train_x[:100], shapes.test_x)


def test_shape_pixels_have_the_named_colour(shapes):
    names = shapes.attributes[0][1]
    x, mask = shapes.train_x.float(), shape_masks(shapes.train_x)
    for i in range(300):
        mean = x[i][:, mask[i]].mean(dim=1)  # (3,) mean RGB of the shape
        for channel, on in enumerate(ON_CHANNELS[names[shapes.train_y[i, 0]]]):
            assert (mean[channel] > 200) if on else (mean[channel] < 20), (i, mean)


def test_shape_centroid_lies_in_the_named_region(shapes):
    # Regions by hand, in pixel coordinates of a 32 px image (its centre is 16).
    inside = {"left": lambda x, y: x < 12 and 12 < y < 20, "right": lambda x, y: x > 20 and 12 < y < 20,
              "top": lambda x, y: y < 12 and 12 < x < 20, "bottom": lambda x, y: y > 20 and 12 < x < 20,
              "centre": lambda x, y: 12 < x < 20 and 12 < y < 20}
    names, mask = shapes.attributes[2][1], shape_masks(shapes.train_x)
    for i in range(1000):
        rows, cols = torch.nonzero(mask[i], as_tuple=True)
        x, y = cols.float().mean() + 0.5, rows.float().mean() + 0.5  # pixel centres
        assert inside[names[shapes.train_y[i, 2]]](x, y), (i, names[shapes.train_y[i, 2]], x, y)


def test_shape_kind_from_its_fill_of_the_bounding_box(shapes):
    # A filled square fills its bounding box, a disc pi/4 of it, a triangle (apex to base) 1/2.
    expected = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
    names, mask = shapes.attributes[1][1], shape_masks(shapes.train_x)
    fills = {name: [] for name in expected}
    for i in range(len(mask)):
        rows, cols = torch.nonzero(mask[i], as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = len(rows) / box.item()
        fills[names[shapes.train_y[i, 1]]].append(fill)
        nearest = min(expected, key=lambda k: abs(expected[k] - fill))
        assert nearest == names[shapes.train_y[i, 1]], (i, fill)
    # On average within a pixel grid's rounding of the continuous ratios (boxes are ~9-12 px).
    for name, ratio in expected.items():
        assert abs(np.mean(fills[name]) - ratio) < 0.07, (name, np.mean(fills[name]))


def test_shape_labels_are_balanced(shapes):
    for column, k in enumerate([6, 3, 5]):
        counts = torch.bincount(shapes.train_y[:, column], minlength=k)
        assert len(counts) == k and (counts - 5000 / k).abs().max() < 0.2 * 5000 / k, counts


def test_prompts_name_every_label(shapes):
    y = shapes.train_y[:200]
    prompts = shapes.prompts(y, generator=torch.Generator().manual_seed(0))
    assert prompts == shapes.prompts(y, generator=torch.Generator().manual_seed(0))
    assert len(prompts) == 200
    for row, prompt in zip(y.tolist(), prompts):
        for (_, values), i in zip(shapes.attributes, row):
            assert set(words(values[i])) <= set(words(prompt)), (values[i], prompt)
    # every template gets used: each prompt is exactly one template filled with its labels
    used = set()
    for row, prompt in zip(y.tolist(), prompts):
        fields = {name: values[i] for (name, values), i in zip(shapes.attributes, row)}
        used |= {k for k, t in enumerate(shapes.templates) if t.format(**fields) == prompt}
    assert used == set(range(len(shapes.templates)))


def test_caption_uses_the_first_template(shapes):
    position = shapes.attributes[2][1][4]
    expected = shapes.templates[0].format(colour="red", shape="triangle", position=position)
    assert shapes.caption(torch.tensor([0, 2, 4])) == expected
    assert shapes.caption([0, 2, 4]) == expected


def test_vocabulary_covers_prompts_and_follows_words_rule(shapes):
    vocabulary = shapes.vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    g = torch.Generator().manual_seed(1)
    rows = torch.stack([torch.randint(k, (200,), generator=g) for k in shapes.classes], dim=1)
    seen = {w for p in shapes.prompts(rows, generator=g) for w in words(p)}
    assert set(vocabulary) == seen  # 200 rows reach every value and template
    for w in vocabulary:
        assert re.fullmatch(r"[a-z0-9/-]+", w) and words(w) == [w]


def test_words_by_hand():
    assert words("A Red, t-shirt!") == ["a", "red", "t-shirt"]
    assert words("") == []
    assert words("top: 3-d x/y\tBOOT") == ["top", "3-d", "x/y", "boot"]


def test_float_uint8_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_float(x)), x)
    assert to_float(x).dtype == torch.float32
    assert to_float(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
    # float images are already in [-1, 1]: only the dtype changes
    assert to_float(torch.tensor([-1.0, 0.5], dtype=torch.float64)).tolist() == [-1.0, 0.5]
    assert to_float(torch.tensor([0.5], dtype=torch.float64)).dtype == torch.float32
    # clamped, then rounded: 0.5 -> 1.5 * 127.5 = 191.25 -> 191
    assert to_uint8(torch.tensor([-2.0, 2.0, 0.5])).tolist() == [0, 255, 191]


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="cifar10, fashion-mnist, shapes"):
        load("mnist")


# --- Fashion-MNIST: idx files written here ---

def write_idx(path, array, gz):
    """An idx file of unsigned bytes: magic 00 00 08 ndim, big-endian int32 sizes, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fashion_files(folder, gz):
    """5 train and 3 test images, pixel (i, r, c) = (40 i + 3 r + c) % 256 (test: + 100)."""
    os.makedirs(folder, exist_ok=True)
    i, r, c = np.meshgrid(np.arange(5), np.arange(28), np.arange(28), indexing="ij")
    train = (40 * i + 3 * r + c) % 256
    test = (train[:3] + 100) % 256
    write_idx(os.path.join(folder, "train-images-idx3-ubyte"), train, gz)
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte"), np.array([3, 1, 4, 1, 5]), gz)
    write_idx(os.path.join(folder, "t10k-images-idx3-ubyte"), test, gz)
    write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte"), np.array([9, 2, 6]), gz)


@pytest.mark.parametrize("layout, gz", [("", True), ("", False), ("FashionMNIST/raw", False)])
def test_fashion_mnist_reads_idx_files(tmp_path, layout, gz):
    fashion_files(tmp_path / layout, gz)
    d = load("fashion-mnist", root=tmp_path, download=False)
    assert d.train_x.shape == (5, 1, 32, 32) and d.test_x.shape == (3, 1, 32, 32) and d.channels == 1
    assert d.train_y[:, 0].tolist() == [3, 1, 4, 1, 5] and d.test_y[:, 0].tolist() == [9, 2, 6]
    # pixel (r, c) of the 28 px image lands at (r + 2, c + 2); by hand: image 1, r 4, c 7 -> 40 + 12 + 7
    assert d.train_x[1, 0, 6, 9] == 59 and d.train_x[0, 0, 2, 2] == 0 and d.train_x[0, 0, 29, 29] == 108
    assert d.test_x[2, 0, 2, 2] == 180  # 80 + 100
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (d.train_x[:, 0, border] == 0).all() and (d.test_x[:, 0, border] == 0).all()
    assert d.attributes[0][0] == "class" and d.attributes[0][1][9] == "ankle boot" and d.attributes[0][1][0] == "t-shirt"
    assert d.caption([9]) == "a photo of a ankle boot"
    assert d.prompts(torch.tensor([[0]]))[0].endswith("t-shirt")
    limited = load("fashion-mnist", root=tmp_path, download=False, limit=(2, 1))
    assert limited.train_y[:, 0].tolist() == [3, 1] and torch.equal(limited.test_x, d.test_x[:1])


def test_fashion_mnist_bad_magic_and_truncated_file(tmp_path):
    fashion_files(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    write_idx(labels, np.array([[3, 1, 4, 1, 5]]), gz=False)  # 2-d: magic 00 00 08 02, not 01
    with pytest.raises(ValueError, match="not an idx file"):
        load("fashion-mnist", root=tmp_path, download=False)
    fashion_files(tmp_path, gz=False)
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load("fashion-mnist", root=tmp_path, download=False)


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(RuntimeError, match="--data shapes"):
        load("fashion-mnist", root=tmp_path, download=False)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_files():
    d = load("fashion-mnist", limit=(100, 50))
    assert d.train_x.shape == (100, 1, 32, 32) and d.test_x.shape == (50, 1, 32, 32)
    assert d.train_y.shape == (100, 1) and d.train_y.max() <= 9
    full = load("fashion-mnist", root=DEBIAN_FASHION)
    assert full.train_x.shape == (60000, 1, 32, 32) and full.test_x.shape == (10000, 1, 32, 32)
    assert torch.equal(full.train_x[:100], d.train_x)


# --- CIFAR-10: binary batch files written here ---

def cifar_record(label, r, g, b):
    """One record: label byte, then 1024 R, 1024 G, 1024 B bytes; one marked pixel per plane."""
    planes = np.zeros((3, 1024), dtype=np.uint8)
    planes[0], planes[1], planes[2] = r, g, b
    planes[0, 1 * 32 + 2] = 200  # R at row 1, column 2
    planes[1, 5] = 201  # G at row 0, column 5
    planes[2, 31 * 32 + 30] = 202  # B at row 31, column 30
    return bytes([label]) + planes.tobytes()


def cifar_files(root):
    """data_batch_k.bin: labels (k, 9 - k), R fill 10 k + j; test_batch.bin: labels 7, 8, 9, R 100 + j."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir()
    for k in range(1, 6):
        records = [cifar_record(lab, 10 * k + j, 50, 60) for j, lab in enumerate([k, 9 - k])]
        (folder / f"data_batch_{k}.bin").write_bytes(b"".join(records))
    (folder / "test_batch.bin").write_bytes(b"".join(cifar_record(7 + j, 100 + j, 50, 60) for j in range(3)))
    return folder


def test_cifar10_reads_binary_batches(tmp_path):
    cifar_files(tmp_path)
    d = load("cifar10", root=tmp_path, download=False)
    assert d.train_x.shape == (10, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32) and d.channels == 3
    assert d.train_y[:, 0].tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4] and d.test_y[:, 0].tolist() == [7, 8, 9]
    assert d.train_x[:, 0, 0, 0].tolist() == [10, 11, 20, 21, 30, 31, 40, 41, 50, 51]
    assert d.test_x[:, 0, 0, 0].tolist() == [100, 101, 102]
    assert (d.train_x[:, 1, 3, 3] == 50).all() and (d.train_x[:, 2, 3, 3] == 60).all()
    # the marked pixels, planes in R, G, B order and each plane row-major
    assert (d.train_x[:, 0, 1, 2] == 200).all() and (d.train_x[:, 0, 2, 1] != 200).all()
    assert (d.test_x[:, 1, 0, 5] == 201).all() and (d.test_x[:, 1, 5, 0] == 50).all()
    assert (d.train_x[:, 2, 31, 30] == 202).all()
    assert d.attributes == [("class", ["airplane", "automobile", "bird", "cat", "deer",
                                       "dog", "frog", "horse", "ship", "truck"])]
    assert d.caption([3]) == "a photo of a cat"
    limited = load("cifar10", root=tmp_path, download=False, limit=(3, 1))
    assert limited.train_y[:, 0].tolist() == [1, 8, 2] and limited.test_y[:, 0].tolist() == [7]


def test_cifar10_missing_files_name_the_alternatives(tmp_path):
    with pytest.raises(RuntimeError, match="--data shapes") as e:
        load("cifar10", root=tmp_path, download=False)
    assert "--data fashion-mnist" in str(e.value) and "--data-root" in str(e.value)
    assert "\n" not in str(e.value)


def test_cifar10_file_size_not_multiple_of_record(tmp_path):
    folder = cifar_files(tmp_path)
    with open(folder / "data_batch_3.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="multiple of 3073"):
        load("cifar10", root=tmp_path, download=False)


def test_failed_downloads_say_what_to_do(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(RuntimeError, match="could not download CIFAR-10 .*network unreachable.*--data shapes") as e:
        load("cifar10", root=tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(RuntimeError, match="could not download Fashion-MNIST .*--data shapes"):
        load("fashion-mnist", root=tmp_path)
