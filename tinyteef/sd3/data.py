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

from PIL import Image, ImageOps
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
METADATA = "metadata.jsonl"


def _from_metadata(folder, path):
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items.append((os.path.join(folder, row["file_name"]), str(row["text"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path} line {n}: expected a JSON object with \"file_name\" and "
                                 f"\"text\" ({type(e).__name__}: {e})") from e
    return items


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
            with open(caption, encoding="utf-8") as f:
                items.append((os.path.join(root, name), f.read().strip()))
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
        image = TF.pil_to_tensor(ImageOps.exif_transpose(im).convert("RGB"))  # (3, H, W) uint8
    image = TF.resize(image, resolution, interpolation=InterpolationMode.BICUBIC, antialias=True)
    image = TF.center_crop(image, resolution)  # (3, R, R)
    return image.float() / 127.5 - 1.0
