"""checkpoint.py: atomic writes, and reading that never runs pickled code."""

import os
import pickle

import pytest
import torch

from tinyteef import checkpoint


class Evil:
    def __reduce__(self):  # unpickling this would call os.system
        return (os.system, ("echo unpickled",))


def test_roundtrip_and_no_leftovers(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    state = {"step": 3, "w": torch.arange(4.0), "names": ["a", "b"]}
    checkpoint.save(state, path)
    got = checkpoint.load(path)
    assert got["step"] == 3 and torch.equal(got["w"], state["w"]) and got["names"] == ["a", "b"]
    assert os.listdir(path.parent) == ["ckpt.pt"]  # the temporary file was renamed away


def test_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "nothing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(pickle.dumps([1, 2])[:5])
    with pytest.raises(ValueError, match="delete it"):
        checkpoint.load(bad)
