"""sd3/data.py on bad data: metadata.jsonl lines are checked one by one, captions must be UTF-8,
and 16-bit grey images are scaled to 8 bits, not clipped."""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tinyteef.sd3.data import list_items, load_image


def folder_with(tmp_path, lines, files=("0.png",)):
    """A data folder holding tiny PNGs `files` and a metadata.jsonl of `lines` (objects or raw text)."""
    for name in files:
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    with open(tmp_path / "metadata.jsonl", "w") as f:
        f.write("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(tmp_path)


@pytest.mark.parametrize("text, shown", [(None, "null"), (3, "3"), (["a"], '["a"]')])
def test_metadata_caption_must_be_a_string(tmp_path, text, shown):
    folder = folder_with(tmp_path, [{"file_name": "0.png", "text": "fine"}, {"file_name": "0.png", "text": text}])
    with pytest.raises(ValueError, match=r'line 2: "text" must be a string \(the caption\), got ' + re.escape(shown)):
        list_items(folder)


def test_metadata_file_must_exist(tmp_path):
    # a misnamed file stops the run at its line instead of shrinking the data
    folder = folder_with(tmp_path, [{"file_name": "0.png", "text": "a"}, "", {"file_name": "1.png", "text": "b"}])
    with pytest.raises(ValueError, match=r'line 3: "file_name" "1.png" is not a file in .*; fix the name'):
        list_items(folder)
    assert list_items(folder_with(tmp_path, [{"file_name": "0.png", "text": "a"}])) == [
        (os.path.join(folder, "0.png"), "a")]


def test_captions_must_be_utf8(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    (tmp_path / "0.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"0\.txt is not UTF-8 text .*save it as UTF-8"):
        list_items(str(tmp_path))


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    # a 0..65535 ramp: each pixel must come out as round(value / 257) on the 8-bit scale, so the
    # ramp stays a ramp (Pillow's own conversion clips 99.6% of it to white)
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "r.png")
    assert Image.open(tmp_path / "r.png").mode == "I;16"
    got = load_image(str(tmp_path / "r.png"), 32)  # (3, 32, 32) in [-1, 1], no resize at this size
    expected = torch.from_numpy(np.round(ramp / 257.0)).float() / 127.5 - 1.0
    assert torch.allclose(got, expected.expand(3, 32, 32), atol=1e-6)
    assert (got == 1).float().mean() < 0.01
