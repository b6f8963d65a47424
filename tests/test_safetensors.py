"""safetensors.py: files of the reference `safetensors` library read bit-exactly, ours readable by it,
and every corrupt header refused with a ValueError that says what is wrong."""

import json
import os
import struct
import time
import tracemalloc

import pytest
import torch
from conftest import oracle

from tinyteef.safetensors import load_file, load_sharded, read_header, save_file

FP8 = [getattr(torch, a) for a in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, a)]


@pytest.fixture
def ref():
    """The reference library's torch API (the oracle)."""
    return oracle("safetensors.torch")


def random_bits(gen, dtype, *shape):
    """A tensor whose bytes are uniformly random: NaN payloads, infinities and subnormals included,
    so only a bit-exact reader passes."""
    n = torch.Size(shape).numel() * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(dtype).reshape(shape)


def sample_tensors():
    """Every dtype, a 0-d scalar and empty tensors."""
    gen = torch.Generator().manual_seed(0)
    out = {"f32": random_bits(gen, torch.float32, 3, 4), "f64": random_bits(gen, torch.float64, 2),
           "f16": random_bits(gen, torch.float16, 5), "bf16": random_bits(gen, torch.bfloat16, 2, 3),
           "i64": torch.arange(-3, 3) * 2**40, "i32": torch.arange(-2, 2, dtype=torch.int32),
           "i16": torch.tensor([-7, 7], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
           "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
           "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3, dtype=torch.float16),
           "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16)}
    for dtype in FP8:
        out[str(dtype)] = random_bits(gen, dtype, 7)
    return out


def assert_same(got, want):
    """Same dtype, shape and bytes (torch.equal would fail on NaN and cannot compare fp8)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def assert_all_same(got, want):
    """assert_same for every tensor of two dicts with the same names."""
    assert sorted(got) == sorted(want)
    for name in want:
        assert_same(got[name], want[name])


def test_reads_reference_files(tmp_path, ref):
    tensors = sample_tensors()
    ref.save_file(tensors, tmp_path / "ref.safetensors")
    assert_all_same(load_file(tmp_path / "ref.safetensors"), tensors)


def test_reference_reads_ours(tmp_path, ref):
    import safetensors

    base = torch.randn(4, 6)
    tensors = {**sample_tensors(), "transposed": base.t(), "strided": base[::2, 1::2]}
    assert not tensors["transposed"].is_contiguous()  # the reference writer refuses these; ours packs
    metadata = {"format": "pt", "note": "ünïcode"}
    path = tmp_path / "ours.safetensors"
    save_file(tensors, path, metadata)
    assert os.listdir(tmp_path) == ["ours.safetensors"]  # the temporary file was renamed away
    assert_all_same(ref.load_file(path), tensors)
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == metadata
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    assert (8 + n) % 8 == 0
    assert [k for k in header if k != "__metadata__"] == sorted(tensors)
    assert read_header(path)[1] == metadata
    assert_all_same(load_file(path), tensors)


def test_keys_subset(tmp_path, ref):
    tensors = sample_tensors()
    ref.save_file(tensors, tmp_path / "ref.safetensors")
    got = load_file(tmp_path / "ref.safetensors", keys=["bf16", "scalar"])
    assert_all_same(got, {k: tensors[k] for k in ("bf16", "scalar")})
    with pytest.raises(ValueError, match="no tensor 'nope'"):
        load_file(tmp_path / "ref.safetensors", keys=["f32", "nope"])


def test_tensors_are_copies(tmp_path, ref):
    # Overwriting the file in place after loading would show through views of the memory map.
    tensors = {"a": torch.arange(8.0)}
    ref.save_file(tensors, tmp_path / "a.safetensors")
    got = load_file(tmp_path / "a.safetensors")
    with open(tmp_path / "a.safetensors", "r+b") as f:
        f.seek(-32, os.SEEK_END)
        f.write(bytes(32))
    got["a"].add_(0)  # writable
    assert_all_same(got, tensors)


def test_sharded(tmp_path, ref):
    gen = torch.Generator().manual_seed(1)
    one = {"a": torch.randn(3, generator=gen), "b": random_bits(gen, torch.bfloat16, 2, 2)}
    two = {"c": torch.arange(5)}
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    ref.save_file(one, tmp_path / names[0])
    ref.save_file(two, tmp_path / names[1])
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 30},
                                 "weight_map": {"a": names[0], "b": names[0], "c": names[1]}}))
    assert_all_same(load_sharded(tmp_path), {**one, **two})
    assert_all_same(load_sharded(index), {**one, **two})

    single = tmp_path / "single"
    single.mkdir()
    ref.save_file(two, single / "model.safetensors")
    assert_all_same(load_sharded(single), two)

    os.remove(index)  # two shards and no index: ambiguous
    with pytest.raises(ValueError, match="found 0 indexes and 2 files"):
        load_sharded(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "../single/model.safetensors"}}))
    with pytest.raises(ValueError, match="beside the index"):
        load_sharded(index)


def raw_file(path, header, data=b"", length=None):
    """Write a file by hand: u64 header length (the true one unless given), header, data."""
    header = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CORRUPT = {
    "too short": (lambda p: p.write_bytes(b"\x10\x00\x00"), "too short"),
    "huge header length": (lambda p: raw_file(p, b"{}", length=2**60), "exceeds"),
    "header beyond file": (lambda p: raw_file(p, b"{}", length=1000), "beyond the end"),
    "invalid json": (lambda p: raw_file(p, b'{"a": '), "not valid UTF-8 JSON"),
    "not an object": (lambda p: raw_file(p, b"[1, 2]"), "must be a JSON object"),
    "duplicate name": (lambda p: raw_file(p, b'{"a": 1, "a": 2}'), "duplicate name 'a'"),
    "missing fields": (lambda p: raw_file(p, {"a": {"dtype": "F32"}}), "dtype, shape and data_offsets"),
    "unknown dtype": (lambda p: raw_file(p, {"a": {**F32x2, "dtype": "F7"}}, bytes(8)), "unknown dtype 'F7'"),
    "negative dim": (lambda p: raw_file(p, {"a": {**F32x2, "shape": [-2]}}, bytes(8)), "non-negative"),
    "reversed offsets": (lambda p: raw_file(p, {"a": {**F32x2, "data_offsets": [8, 0]}}, bytes(8)),
                         "begin <= end"),
    "byte length mismatch": (lambda p: raw_file(p, {"a": {**F32x2, "shape": [3]}}, bytes(8)), "needs 12"),
    "overlap": (lambda p: raw_file(p, {"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)),
                "'a' and 'b' overlap"),
    "bad metadata": (lambda p: raw_file(p, {"__metadata__": {"k": 1}}), "__metadata__ must map"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_headers(tmp_path, case):
    make, message = CORRUPT[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    for read in (load_file, read_header):
        with pytest.raises(ValueError, match=message) as e:
            read(path)
        assert str(path) in str(e.value)  # the message names the file


def test_truncated_file(tmp_path, ref):
    ref.save_file({"a": torch.arange(6.0), "b": torch.ones(4)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_file(tmp_path / "cut.safetensors")


def test_huge_header_length_fails_fast(tmp_path):
    path = raw_file(tmp_path / "huge.safetensors", b"{}", length=2**60)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ValueError):
        load_file(path)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 2**20  # nothing near 2**60 bytes was asked for


def test_save_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="supported dtypes"):
        save_file({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")
    with pytest.raises(ValueError, match="metadata"):
        save_file({"a": torch.zeros(2)}, tmp_path / "a.safetensors", metadata={"step": 3})
    assert os.listdir(tmp_path) == []
