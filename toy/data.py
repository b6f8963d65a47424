"""The datasets of the toy world: 32 x 32 images whose labels become text prompts.

Each dataset has one or more attributes (CIFAR-10 and Fashion-MNIST: the class; shapes: colour,
shape and position), and a few prompt templates whose str.format fields are the attribute names.
A label row y (A,) picks one value per attribute; `prompts` fills a random template with them, so
the text model sees several phrasings of the same content.

Nothing here unpickles: Fashion-MNIST is read from its idx files and CIFAR-10 from its binary
version (torchvision's CIFAR10 class would unpickle the python version's batch files).
"""

import gzip
import itertools
import math
import os
import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("cifar10", "fashion-mnist", "shapes")

OBJECT_TEMPLATES = ["a photo of a {class}", "a picture of a {class}", "an image of a {class}", "a {class}"]

COLOURS = {"red": (224, 0, 0), "green": (0, 224, 0), "blue": (0, 0, 224),
           "yellow": (224, 224, 0), "magenta": (224, 0, 224), "cyan": (0, 224, 224)}
SHAPES = ["circle", "square", "triangle"]
# Centres (x, y) in pixels, 9 px apart: with radius <= 6 and jitter <= 1 px, a shape stays in the
# image and its region can be told from its centroid.
POSITIONS = {"left": (7.0, 16.0), "right": (25.0, 16.0), "top": (16.0, 7.0),
             "bottom": (16.0, 25.0), "centre": (16.0, 16.0)}
SHAPE_TEMPLATES = ["a {colour} {shape} at the {position}", "a {shape} in {colour} at the {position} of the image",
                   "{position}: a {colour} {shape}", "a {colour} {shape}, {position}"]

FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FASHION_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_CACHE_ROOT = os.path.expanduser("~/.cache/tinyteef/fashion-mnist")

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_ROOT = os.path.expanduser("~/.cache/tinyteef/cifar10")
CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the R, G and B planes
OFFLINE_HINT = ("offline? use --data shapes (needs nothing) or --data fashion-mnist --data-root DIR, "
                "or put cifar-10-batches-bin/ under --data-root")


@dataclass
class ToyData:
    """Images with attribute labels, and the prompt templates that turn labels into text."""

    name: str
    attributes: list[tuple[str, list[str]]]
    templates: list[str]
    train_x: torch.Tensor  # (N, C, 32, 32) uint8
    train_y: torch.Tensor  # (N, A) int64
    test_x: torch.Tensor  # (M, C, 32, 32) uint8
    test_y: torch.Tensor  # (M, A) int64

    @property
    def channels(self):
        """Image channels: 3 (RGB) or 1 (grayscale)."""
        return self.train_x.shape[1]

    @property
    def classes(self):
        """The number of values of each attribute, in column order of y."""
        return [len(values) for _, values in self.attributes]

    def fill(self, template, y_row):
        """The template with each attribute field replaced by the value name that y_row picks."""
        return template.format(**{name: values[int(i)] for (name, values), i in zip(self.attributes, y_row)})

    def prompts(self, y, generator=None):
        """One prompt per label row of y (B, A), each from a template drawn at random."""
        pick = torch.randint(len(self.templates), (len(y),), generator=generator)  # (B,)
        return [self.fill(self.templates[k], row) for k, row in zip(pick.tolist(), y.tolist())]

    def caption(self, y_row):
        """The prompt of the first template: deterministic, for labelling figures."""
        return self.fill(self.templates[0], torch.as_tensor(y_row).tolist())

    def vocabulary(self):
        """Every word any prompt can contain, sorted. It enumerates all prompts (a few hundred at
        most), so a field glued to letters in a template still yields exactly the words seen."""
        labels = itertools.product(*[range(n) for n in self.classes])
        texts = [self.fill(t, row) for row in labels for t in self.templates]
        return sorted({w for text in texts for w in words(text)})


def words(text):
    """The tokenisation rule: lowercase runs of letters, digits, hyphens and slashes."""
    return re.findall(r"[a-z0-9/-]+", text.lower())


def to_float(x):
    """uint8 images (B, C, H, W) -> float32 in [-1, 1]; float images (already in [-1, 1]) stay as
    they are, in float32."""
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()


def to_uint8(x):
    """Float images in [-1, 1] -> uint8, clamped and rounded."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def random_rows(g, n, size):
    """`size` random indices below n, drawn from the generator g (on its device): batches drawn with
    replacement from one seeded stream, so that a resumed stage draws what it would have drawn."""
    return torch.randint(n, (size,), generator=g, device=g.device)


def shape_images(n, generator, chunk=5000):
    """n random images of one filled shape on faint noise, and their labels (n, 3).

    Each image draws a colour, shape and position, a radius in [4.5, 6] px and a jitter of the
    centre in [-1, 1] px. Every shape fills part of the box [cx +- r, cy +- r]: the whole box
    (square), the inscribed disc (circle), or the triangle with its apex at the top middle and its
    base along the bottom. Built in chunks to bound the memory of the float masks.
    """
    n_positions = len(POSITIONS)
    y = torch.stack([torch.randint(k, (n,), generator=generator)
                     for k in (len(COLOURS), len(SHAPES), n_positions)], dim=1)  # (n, 3)
    radius = 4.5 + 1.5 * torch.rand(n, generator=generator)  # (n,)
    jitter = 2.0 * torch.rand(n, 2, generator=generator) - 1.0  # (n, 2)
    centre = torch.tensor(list(POSITIONS.values()))[y[:, 2]] + jitter  # (n, 2) x, y in pixels
    rgb = torch.tensor(list(COLOURS.values()), dtype=torch.uint8)[y[:, 0]]  # (n, 3)
    grid = torch.arange(32, dtype=torch.float32) + 0.5  # pixel centres; the image spans [0, 32]
    images = []
    for s in range(0, n, chunk):
        r = radius[s:s + chunk, None, None]  # (b, 1, 1)
        dx = grid[None, None, :] - centre[s:s + chunk, 0, None, None]  # (b, 1, 32)
        dy = grid[None, :, None] - centre[s:s + chunk, 1, None, None]  # (b, 32, 1)
        square = (dx.abs() <= r) & (dy.abs() <= r)  # (b, 32, 32)
        circle = dx ** 2 + dy ** 2 <= r ** 2
        triangle = (dy <= r) & (dx.abs() <= (dy + r) / 2)  # half-width grows from 0 at the apex to r
        kind = y[s:s + chunk, 1, None, None]  # (b, 1, 1)
        mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))  # (b, 32, 32)
        # Faint noise keeps the background from being one exact value the model could memorise.
        noise = torch.randint(16, (len(mask), 3, 32, 32), generator=generator, dtype=torch.uint8)
        images.append(mask[:, None] * rgb[s:s + chunk, :, None, None] + noise)  # (b, 3, 32, 32)
    return torch.cat(images), y


def read_idx(path, dims):
    """Read an idx file of unsigned bytes with `dims` dimensions (3: images, 1: labels)."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:  # a truncated .gz (EOFError) or not gzip at all (BadGzipFile)
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); delete it and fetch it again") from e
    # Magic number: two zero bytes, type 0x08 (unsigned byte), then the number of dimensions.
    if len(raw) < 4 + 4 * dims or raw[:4] != bytes([0, 0, 8, dims]):
        raise ValueError(f"{path} is not an idx file of {dims}-d unsigned bytes; delete it and fetch it again")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]  # big-endian int32 sizes
    body = raw[4 + 4 * dims:]
    if len(body) != math.prod(shape):
        raise ValueError(f"{path} holds {len(body)} bytes, its header says {shape}; it is truncated, fetch it again")
    return torch.from_numpy(np.frombuffer(body, dtype=np.uint8).reshape(shape).copy())


def find_idx(folders, stem):
    """The path of idx file `stem` (plain or .gz) in the first folder that has it, or None."""
    for folder in folders:
        for path in (os.path.join(folder, stem), os.path.join(folder, stem + ".gz")):
            if os.path.isfile(path):
                return path
    return None


def load_fashion_mnist(root, download):
    """Fashion-MNIST from its idx files in root or root/FashionMNIST/raw (torchvision's layout).

    With root None it looks in Debian's folder and in the user cache, and downloads into the cache.
    Images are padded from 28 to 32 px with 2 px of background on each side.
    """
    roots = [root] if root is not None else [FASHION_DEBIAN_ROOT, FASHION_CACHE_ROOT]
    folders = [f for r in roots for f in (str(r), os.path.join(r, "FashionMNIST", "raw"))]
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [find_idx(folders, stem) for stem in stems]
    if None in paths and download:
        import torchvision  # only needed to fetch the files

        try:
            for train in (True, False):
                torchvision.datasets.FashionMNIST(str(roots[-1]), train=train, download=True)
        except Exception as e:
            raise RuntimeError(f"could not download Fashion-MNIST ({type(e).__name__}: {e}): offline? "
                               f"use --data shapes (needs nothing) or --data-root DIR holding the idx files") from e
        paths = [find_idx(folders, stem) for stem in stems]
    if None in paths:
        raise RuntimeError(f"no Fashion-MNIST idx files in {folders}: use --data shapes (needs nothing) "
                           "or --data-root DIR holding train-images-idx3-ubyte(.gz) and the other three")
    train_x, train_y, test_x, test_y = [read_idx(p, 3 if "images" in p else 1) for p in paths]
    for x, y, path in ((train_x, train_y, paths[0]), (test_x, test_y, paths[2])):
        if x.shape[1:] != (28, 28) or len(x) != len(y):
            raise ValueError(f"{path} holds images {tuple(x.shape)} for {len(y)} labels, expected (N, 28, 28) "
                             "for N labels; fetch the four files again")
    return [pad28(train_x), train_y, pad28(test_x), test_y]


def pad28(x):
    """(N, 28, 28) grayscale -> (N, 1, 32, 32), with 2 px of zeros (the background) on each side."""
    return torch.nn.functional.pad(x[:, None], (2, 2, 2, 2))


def read_cifar_bin(path):
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one CIFAR-10 binary batch file."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % CIFAR_RECORD or raw.size == 0:
        raise ValueError(f"{path} has {raw.size} bytes, not a positive multiple of {CIFAR_RECORD}; "
                         "it is truncated, delete cifar-10-batches-bin/ and fetch it again")
    records = torch.from_numpy(raw.reshape(-1, CIFAR_RECORD))  # (N, 3073)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].long()


def load_cifar10(root, download):
    """CIFAR-10 from root/cifar-10-batches-bin/, downloading the binary version if asked."""
    root = CIFAR_ROOT if root is None else str(root)
    folder = os.path.join(root, "cifar-10-batches-bin")
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    paths = [os.path.join(folder, n) for n in names]
    if not all(os.path.isfile(p) for p in paths):
        if not download:
            raise RuntimeError(f"CIFAR-10 binary files missing in {folder} (download disabled): {OFFLINE_HINT}")
        from torchvision.datasets.utils import download_and_extract_archive  # only needed to fetch

        try:
            download_and_extract_archive(CIFAR_URL, root, md5=CIFAR_MD5)
        except Exception as e:
            raise RuntimeError(f"could not download CIFAR-10 ({type(e).__name__}: {e}): {OFFLINE_HINT}") from e
    batches = [read_cifar_bin(p) for p in paths]
    train_x, train_y = torch.cat([x for x, _ in batches[:5]]), torch.cat([y for _, y in batches[:5]])
    return [train_x, train_y, *batches[5]]


def load(name, root=None, download=True, seed=0, limit=None):
    """Load dataset `name` (one of DATASETS); limit=(n_train, n_test) keeps the first n of each split.

    `seed` only matters for "shapes", whose train and test splits come from the generator streams
    2 seed and 2 seed + 1 (different for every seed and split). `root` is the data folder of the
    downloaded datasets (None: a default per dataset).
    """
    n_train, n_test = limit if limit is not None else (50_000, 10_000)
    if name == "shapes":
        train = shape_images(n_train, torch.Generator().manual_seed(2 * seed))
        test = shape_images(n_test, torch.Generator().manual_seed(2 * seed + 1))
        attributes = [("colour", list(COLOURS)), ("shape", SHAPES), ("position", list(POSITIONS))]
        return ToyData(name, attributes, SHAPE_TEMPLATES, *train, *test)
    if name == "fashion-mnist":
        splits, attributes = load_fashion_mnist(root, download), [("class", FASHION_CLASSES)]
    elif name == "cifar10":
        splits, attributes = load_cifar10(root, download), [("class", CIFAR_CLASSES)]
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    train_x, train_y, test_x, test_y = splits
    if max(train_y.max(), test_y.max()) >= 10:
        raise ValueError(f"{name} labels go beyond the 10 classes; the label files are corrupt, fetch them again")
    if limit is not None:
        train_x, train_y, test_x, test_y = train_x[:n_train], train_y[:n_train], test_x[:n_test], test_y[:n_test]
    # .clone() so that a limited split does not keep the whole file's memory alive
    return ToyData(name, attributes, OBJECT_TEMPLATES, train_x.clone(), train_y.long()[:, None].clone(),
                   test_x.clone(), test_y.long()[:, None].clone())
