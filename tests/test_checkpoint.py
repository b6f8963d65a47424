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


def test_written_files_get_the_usual_permissions(tmp_path):
    """A saved file is readable by others like any file the user writes (0666 less the umask;
    the temporary file's own mode is 0600), here under umask 022: 0644."""
    old = os.umask(0o022)
    try:
        checkpoint.save({"x": torch.zeros(1)}, tmp_path / "a.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644
