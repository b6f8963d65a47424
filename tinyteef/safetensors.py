"""Reading and writing the safetensors format with torch alone (no `safetensors` package).

A file is: an 8-byte little-endian u64 N, then N bytes of UTF-8 JSON (padded with spaces), then
the data buffer. The JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin,
end]}, offsets relative to the start of the buffer, plus an optional "__metadata__": {str: str}.

Every field of the header is checked before any tensor is built, so a corrupt or truncated file
gives a ValueError that names the file and the problem instead of a crash or a huge allocation.
Tensors are read through a memory map, one at a time, so the whole file is never in memory at once.

Byte order: the format is little-endian and tensors are viewed in the host's byte order, so
big-endian hosts are not supported (every machine torch ships wheels for is little-endian).
"""

import glob
import json
import math
import mmap
import os
from collections import Counter

import torch

from .checkpoint import atomic_write

# The reference implementation's cap: a header this large would be a corrupt length field.
MAX_HEADER_BYTES = 100_000_000

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
# fp8 exists only in newer torch builds: offer it only where this torch can hold it.
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _reject_duplicates(pairs):
    """json object hook: build the dict, but refuse a name that appears twice (json keeps the last)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        dup = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"duplicate name {dup!r}")
    return obj


def _check_entry(path, name, entry, data_size):
    """Validate one tensor entry of the header; return its byte span (begin, end)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ValueError(f"{where} must be an object with dtype, shape and data_offsets; got {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise ValueError(f"{where} has unknown dtype {dtype!r}; this torch supports {', '.join(DTYPES)}")
    # bool is an int subclass in Python; the upper bound keeps every dim inside torch's int64.
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
        raise ValueError(f"{where} has shape {shape!r}; dims must be non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where} has data_offsets {offsets!r}; "
                         "expected [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise ValueError(f"{where} ends at byte {end} of the data but the file holds only {data_size}: "
                         "the file is truncated (download or copy it again)")
    need = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != need:
        raise ValueError(f"{where} spans {end - begin} bytes but shape {shape} of {dtype} needs {need}")
    return begin, end


def _read_header(f, path):
    """Read and validate the header of the open file `f`: (entries, metadata, data_start)."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise ValueError(f"{path} is {size} bytes, too short for a safetensors file (8-byte header length)")
    n = int.from_bytes(f.read(8), "little")
    # Both checks come before the read, so a corrupt length never allocates.
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap; "
                         "the file is corrupt or not safetensors")
    if 8 + n > size:
        raise ValueError(f"{path}: header length {n} runs beyond the end of the {size}-byte file; "
                         "the file is truncated or not safetensors")
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: header is not valid UTF-8 JSON ({e}); the file is corrupt "
                         "or not safetensors") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings, got {metadata!r}")
    data_size = size - 8 - n
    spans = sorted((*_check_entry(path, name, entry, data_size), name) for name, entry in header.items())
    # Sorted by begin, two spans overlap iff one starts before its predecessor ends. Gaps are
    # tolerated: they waste bytes but cannot make a read wrong.
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise ValueError(f"{path}: tensors {prev!r} and {name!r} overlap in the data buffer; "
                             "the file is corrupt")
    return header, metadata, 8 + n


def read_header(path):
    """The validated header of a safetensors file: (entries {name: {dtype, shape, data_offsets}},
    metadata {str: str}). Reads only the header, never the data."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        entries, metadata, _ = _read_header(f, path)
    return entries, metadata


def load_file(path, device="cpu", keys=None):
    """Read the tensors of a safetensors file (only `keys` if given) into {name: tensor} on `device`.

    The file is memory-mapped and each tensor is copied out of the map on its own. Copying (rather
    than returning views of the map) makes the tensors ordinary, writable and independent of the
    file: it can be closed, overwritten or deleted afterwards, and the peak memory is the tensors
    asked for, never the whole file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        entries, _, start = _read_header(f, path)
        names = list(entries) if keys is None else list(keys)
        missing = [k for k in names if k not in entries]
        if missing:
            raise ValueError(f"{path} has no tensor {missing[0]!r} ({len(missing)} of the keys asked for "
                             f"are missing); it holds {len(entries)}, e.g. {sorted(entries)[:5]}")
        # ACCESS_COPY gives a writable (private, copy-on-write) map, which torch.frombuffer accepts
        # without a warning; nothing is ever written to it.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
            return {name: _copy_out(mm, start, entries[name], device) for name in names}


def _copy_out(mm, start, entry, device):
    """One tensor of the map as a fresh tensor on `device`. It must be a copy: closing the map
    unmaps the memory even while a torch.frombuffer view of it is alive."""
    dtype, (begin, end) = DTYPES[entry["dtype"]], entry["data_offsets"]
    if end == begin:  # torch.frombuffer refuses zero bytes
        return torch.empty(entry["shape"], dtype=dtype, device=device)
    raw = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=start + begin)
    # Viewing the raw bytes keeps bf16 and fp8 bit-exact (numpy has neither type).
    return raw.view(dtype).reshape(entry["shape"]).to(device, copy=True)


def load_sharded(folder_or_index, device="cpu"):
    """Load a checkpoint split over shards: a "*.safetensors.index.json" ({"weight_map": {name:
    shard file}}), or a folder holding either one such index or a single *.safetensors file."""
    path = os.fspath(folder_or_index)
    if os.path.isdir(path):
        indexes = glob.glob(os.path.join(glob.escape(path), "*.safetensors.index.json"))
        files = glob.glob(os.path.join(glob.escape(path), "*.safetensors"))
        if len(indexes) == 1:
            path = indexes[0]
        elif not indexes and len(files) == 1:
            return load_file(files[0], device)
        else:
            raise ValueError(f"{path} must hold one *.safetensors.index.json or one *.safetensors file; "
                             f"found {len(indexes)} indexes and {len(files)} files: pass the one to load")
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path} is not a shard index with a 'weight_map' "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path}: weight_map must map tensor names to shard file names")
    by_shard = {}
    for name, shard in weight_map.items():
        # Shards sit beside the index; a path in the map would point anywhere on the disk.
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ValueError(f"{path}: shard {shard!r} of {name!r} must be a file name beside the index")
        by_shard.setdefault(shard, []).append(name)
    folder = os.path.dirname(os.path.abspath(path))
    out = {}
    for shard, names in by_shard.items():
        out.update(load_file(os.path.join(folder, shard), device, keys=names))
    return out


def save_file(tensors, path, metadata=None):
    """Write {name: tensor} (and optional {str: str} metadata) as a safetensors file, atomically.

    Header keys are sorted and the header is padded with spaces to a multiple of 8 bytes. The data
    is laid out largest element size first (then by name), like the reference writer: with the
    buffer 8-byte aligned this leaves every tensor aligned to its element size without gaps.
    """
    path = os.fspath(path)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError(f"metadata for {path} must map strings to strings; convert values with str()")
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} for {path} must be a string other than '__metadata__'")
        if not isinstance(t, torch.Tensor) or t.dtype not in NAMES:
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name!r} for {path} is {kind}; supported dtypes: {', '.join(map(str, NAMES))}")
    order = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.dtype.itemsize
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)

    def write(f):
        f.write(len(text).to_bytes(8, "little") + text)
        for name in order:
            # reshape(-1) makes 0-d tensors viewable as bytes; contiguous() packs strided input.
            flat = tensors[name].detach().cpu().contiguous().reshape(-1)
            f.write(flat.view(torch.uint8).numpy().tobytes())
    atomic_write(path, write)
