"""Checkpoints that are written atomically and read without unpickling code.

`save` writes to a temporary file beside the target and renames it into place, so a run stopped
mid-write leaves the previous checkpoint intact. `load` uses torch.load(weights_only=True), which
reads tensors and plain containers only and refuses arbitrary pickled objects. A folder (the
diffusers-layout student, a sharded checkpoint) is swapped in whole: `next_version`, `swap_in`.
"""

import json
import os
import re
import shutil
import tempfile

import torch


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Recording:
    """A file whose write() remembers the OSError it raised. torch.save turns a failed write (a full
    disk) into a RuntimeError of its C++ writer ("unexpected pos ..."), naming neither the file nor
    the cause; atomic_write raises the recorded OSError instead."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def atomic_write(path, write):
    """Call write(f) on a temporary file beside `path`, then rename it into place: a reader sees
    the old file or the whole new one, never a part. The file gets the usual permissions (0666
    less the umask; mkstemp's own are 0600). A write that fails for the file system's sake (a full
    disk, a read-only folder) raises an OSError naming `path` (not the temporary file, which is
    removed)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from e
    f = None
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _Recording(raw)
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else getattr(f, "error", None) if isinstance(e, Exception) else None
        if cause is not None:
            raise OSError(cause.errno, cause.strerror, path) from e
        raise


def save(obj, path):
    """torch.save(obj) to `path`, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path, map_location="cpu", mmap=False, hint="delete it to recompute that stage"):
    """Read a checkpoint written by `save`: tensors, numbers, strings, lists and dicts only. With
    mmap=True the tensors stay in the file, mapped, until used (a cheap check that it reads).
    An unreadable file raises a ValueError naming it, followed by `hint`: what to do."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; check the path (or delete the folder to start over)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); {hint}") from e


def _versions(path):
    """The version folders PATH.N beside `path`: {N: name}."""
    parent, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(name) + r"\.(\d+)")
    return {int(m[1]): v for v in os.listdir(parent) if (m := pattern.fullmatch(v))}


def next_version(path):
    """Where to write a new version of the folder `path`: PATH.N beside it, N above every version
    there (those a stopped save left included), for `swap_in` to make current."""
    return f"{os.path.abspath(path)}.{max(_versions(path), default=0) + 1}"


def swap_in(path, version):
    """Make `path` a symbolic link to the folder `version` (from `next_version`) and delete the
    other versions. The link is replaced in one rename (os.replace of a new link over the old one
    is atomic on POSIX), so `path` is a complete folder at every instant and a save stopped anywhere
    leaves the previous one. (Two renames of directories, old away and new in, would leave an
    instant with no `path`.) A `path` written as a plain directory before versions existed is moved
    aside once, the only swap with an instant without it."""
    parent, name = os.path.split(os.path.abspath(path))
    path, new, link = os.path.join(parent, name), os.path.basename(version), os.path.join(parent, f".tmp-{name}.link")
    if os.path.isdir(path) and not os.path.islink(path):
        os.replace(path, os.path.join(parent, f"{name}.0"))
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(new, link, target_is_directory=True)  # relative: the run's folder may be moved
    os.replace(link, path)
    for v in _versions(path).values():
        if v != new:
            shutil.rmtree(os.path.join(parent, v))


def remove_stale_temps(folder):
    """Delete the temporary files that `atomic_write` calls killed before their rename left in
    `folder` (a kill -9 runs no cleanup; at SD3-medium size each is a 24 GB checkpoint). Only ours:
    names starting with ".tmp-". Call it when no other process of the run is writing there."""
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith(".tmp-") and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def open_log(path, step):
    """Open a JSON-lines log for appending, first dropping the records of steps after `step`: a
    resumed run repeats the steps after its checkpoint, and the log should hold each step once."""
    if os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if _step_of(line) is not None and _step_of(line) <= step]
        atomic_write(path, lambda f: f.write("".join(kept).encode()))
    return open(path, "a")


def _step_of(line):
    """The "step" of one JSON-lines record, or None for a blank line or a record a killed run left
    half-written (dropped with the steps after the checkpoint)."""
    try:
        return json.loads(line).get("step", 0) if line.strip() else None
    except json.JSONDecodeError:
        return None
