"""Our header parser and streaming writer against the safetensors library, byte for byte."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from rslora_tools.errors import InputError
from rslora_tools.safetensors_file import StreamingWriter, read_header, read_tensor


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 2, generator=g),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "scalar": torch.tensor(1.5),
    }


def test_read_matches_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), path, metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    with open(path, "rb") as f, safe_open(path, "pt") as st:
        for name in st.keys():
            assert torch.equal(read_tensor(f, header, name), st.get_tensor(name))


def test_streaming_writer_is_readable_by_safetensors(tmp_path):
    tensors = _tensors()
    path = tmp_path / "out.safetensors"
    entries = [(k, {torch.bfloat16: "BF16", torch.int64: "I64", torch.float32: "F32", torch.float16: "F16"}[v.dtype], tuple(v.shape))
               for k, v in tensors.items()]
    w = StreamingWriter(path, entries, {"format": "pt"})
    for k, v in tensors.items():
        w.write_tensor(k, v)
    w.close()
    with safe_open(path, "pt") as st:
        assert st.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            assert torch.equal(st.get_tensor(k), v)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0


def test_raw_copy(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({"x": torch.arange(1000, dtype=torch.float32)}, src)
    header = read_header(src)
    info = header.tensors["x"]
    out = tmp_path / "dst.safetensors"
    w = StreamingWriter(out, [("x", "F32", (1000,))], None)
    with open(src, "rb") as f:
        w.copy_raw("x", f.fileno(), header.data_start + info.begin)
    w.close()
    with safe_open(out, "pt") as st:
        assert torch.equal(st.get_tensor("x"), torch.arange(1000, dtype=torch.float32))


def _write_raw(path, header: dict, data: bytes, n: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


@pytest.mark.parametrize(
    "header,data,n,message",
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**9, "exceeds the 100 MB limit"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**6, "runs past the end"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "truncated or corrupt"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12, None, "need 8 bytes"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "leave a hole"),
        ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
        ({"x": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\0" * 8, None, "invalid shape"),
        ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
    ],
)
def test_corrupt_headers_get_clear_errors(tmp_path, header, data, n, message):
    path = _write_raw(tmp_path / "bad.safetensors", header, data, n)
    with pytest.raises(InputError, match=message):
        read_header(path)


def test_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(InputError, match="not valid UTF-8 JSON"):
        read_header(path)


def test_roundtrip_bytes_identical_to_library_for_same_order(tmp_path):
    t = {"w": torch.ones(4, 4, dtype=torch.bfloat16)}
    ours = tmp_path / "ours.safetensors"
    w = StreamingWriter(ours, [("w", "BF16", (4, 4))], {"format": "pt"})
    w.write_tensor("w", t["w"])
    w.close()
    assert ours.read_bytes() == save(t, metadata={"format": "pt"})


@pytest.mark.parametrize("buffer_bytes", [4096, 3 * 4096, 1 << 20])
def test_direct_io_sink_writes_the_same_bytes(tmp_path, buffer_bytes):
    """O_DIRECT output (staging buffer flushed many times, padded tail truncated) equals buffered output."""
    import os

    from rslora_tools.safetensors_file import _BufferedSink, _DirectSink

    g = torch.Generator().manual_seed(1)
    src = tmp_path / "src.bin"
    src_bytes = torch.randint(0, 255, (50_001,), generator=g, dtype=torch.uint8)
    src.write_bytes(bytes(src_bytes.tolist()))
    chunks = [bytes(torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8).tolist()) for n in (5, 4096, 9000, 1, 70_000)]

    def fill(sink):
        fd = os.open(src, os.O_RDONLY)
        try:
            for i, chunk in enumerate(chunks):
                sink.write(chunk)
                sink.copy_from(fd, i * 7, 10_000 + i)
        finally:
            os.close(fd)
        sink.close()

    try:
        direct = _DirectSink(tmp_path / "direct.bin", buffer_bytes)
    except OSError:
        pytest.skip("this file system does not take O_DIRECT")
    fill(direct)
    fill(_BufferedSink(tmp_path / "buffered.bin"))
    assert (tmp_path / "direct.bin").read_bytes() == (tmp_path / "buffered.bin").read_bytes()


def test_direct_writer_output_is_readable(tmp_path):
    tensors = _tensors()
    path = tmp_path / "out.safetensors"
    entries = [(k, {torch.bfloat16: "BF16", torch.int64: "I64", torch.float32: "F32", torch.float16: "F16"}[v.dtype], tuple(v.shape))
               for k, v in tensors.items()]
    w = StreamingWriter(path, entries, {"format": "pt"}, direct=True)
    for k, v in tensors.items():
        w.write_tensor(k, v)
    w.close()
    with safe_open(path, "pt") as st:
        for k, v in tensors.items():
            assert torch.equal(st.get_tensor(k), v)
