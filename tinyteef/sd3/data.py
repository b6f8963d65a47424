"""A folder of images with captions, the training data of train_sd3.py.

Two layouts, as in diffusers' and kohya's training scripts:
- `metadata.jsonl` in the folder, one JSON object per line with `file_name` (relative to the
  folder) and `text`;
- otherwise every image `NAME.EXT` with its caption in `NAME.txt` beside it (subfolders too).

Images are decoded with Pillow (which torchvision depends on; torchvision's own decoders are
deprecated since 0.29), turned upright by their EXIF orientation, resized so the shorter side is
the resolution, and centre-cropped to a square.
"""

import json
import os

import numpy as np
from PIL import Image, ImageOps
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
METADATA = "metadata.jsonl"


def _from_metadata(folder, path):
    """Every line checked: a JSON object whose "file_name" names a file of the folder and whose
    "text" is a string. A mistake stops the run at its line (a misnamed file must not silently
    shrink the data, a null caption must not train as the word "None")."""
    items = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {n}: expected a JSON object with \"file_name\" and "
                             f"\"text\" ({type(e).__name__}: {e})") from e
        if not isinstance(text, str):
            raise ValueError(f"{path} line {n}: \"text\" must be a string (the caption), got {json.dumps(text)}")
        if not isinstance(name, str) or not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"{path} line {n}: \"file_name\" {json.dumps(name)} is not a file in {folder}; "
                             f"fix the name, or remove the line")
        items.append((os.path.join(folder, name), text))
    return items


def _read_text(path):
    """A UTF-8 text file's content, or a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from e


def _from_caption_files(folder):
    items, missing = [], []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            caption = os.path.join(root, stem + ".txt")
            if not os.path.isfile(caption):
                missing.append(os.path.join(root, name))
                continue
            items.append((os.path.join(root, name), _read_text(caption).strip()))
    if missing:
        raise ValueError(f"{len(missing)} image(s) in {folder} have no caption, e.g. {missing[0]}: put the "
                         f"caption in a .txt file of the same name beside each image, or list every image "
                         f"in {METADATA} (one {{\"file_name\": ..., \"text\": ...}} per line)")
    return items


def list_items(folder):
    """Every (image path, caption) of a data folder, in a fixed order. Raises a ValueError that says
    what to do when the folder is missing or empty or an image has no caption."""
    if not os.path.isdir(folder):
        raise ValueError(f"--data {folder}: no such folder")
    metadata = os.path.join(folder, METADATA)
    items = _from_metadata(folder, metadata) if os.path.isfile(metadata) else _from_caption_files(folder)
    if not items:
        raise ValueError(f"--data {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) with captions: "
                         f"put NAME.txt beside each image, or a {METADATA} with file_name and text")
    return items


def load_image(path, resolution):
    """Decode an image file -> (3, resolution, resolution) float in [-1, 1]: the shorter side resized
    to `resolution` (bicubic, antialiased), then the centre square. Raises OSError (PIL's
    UnidentifiedImageError is one) or ValueError when the file cannot be read or decoded."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey: Pillow's convert("RGB") clips at 255 (a 0-65535 ramp comes out almost all
            # white); scale 0..65535 to 0..255 instead
            grey = np.asarray(im, dtype=np.float64) / 257.0
            im = Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8), "L")
        image = TF.pil_to_tensor(im.convert("RGB"))  # (3, H, W) uint8
    image = TF.resize(image, resolution, interpolation=InterpolationMode.BICUBIC, antialias=True)
    image = TF.center_crop(image, resolution)  # (3, R, R)
    return image.float() / 127.5 - 1.0
