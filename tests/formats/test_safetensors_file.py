"""Our header parser and streaming writer against the safetensors library, byte for byte."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from rslora_tools.errors import InputError
from rslora_tools.formats.safetensors_file import (
    SafetensorsWriter,
    copy_range,
    read_header,
    read_tensor,
)


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


def test_writer_output_is_readable_by_safetensors(tmp_path):
    tensors = _tensors()
    path = tmp_path / "out.safetensors"
    entries = [
        (
            k,
            {torch.bfloat16: "BF16", torch.int64: "I64", torch.float32: "F32", torch.float16: "F16"}[v.dtype],
            tuple(v.shape),
        )
        for k, v in tensors.items()
    ]
    w = SafetensorsWriter(path, entries, {"format": "pt"})
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
    w = SafetensorsWriter(out, [("x", "F32", (1000,))], None)
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
        (
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
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
    w = SafetensorsWriter(ours, [("w", "BF16", (4, 4))], {"format": "pt"})
    w.write_tensor("w", t["w"])
    w.close()
    assert ours.read_bytes() == save(t, metadata={"format": "pt"})


def test_tensors_written_in_any_order_from_threads(tmp_path):
    """Merge workers fill a file out of order, concurrently: the result is the same file."""
    import threading

    tensors = _tensors()
    entries = [
        (
            k,
            {torch.bfloat16: "BF16", torch.int64: "I64", torch.float32: "F32", torch.float16: "F16"}[v.dtype],
            tuple(v.shape),
        )
        for k, v in tensors.items()
    ]
    in_order = SafetensorsWriter(tmp_path / "a.safetensors", entries, {"format": "pt"})
    for k, v in tensors.items():
        in_order.write_tensor(k, v)
    in_order.close()
    shuffled = SafetensorsWriter(tmp_path / "b.safetensors", entries, {"format": "pt"})
    threads = [threading.Thread(target=shuffled.write_tensor, args=(k, v)) for k, v in reversed(tensors.items())]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shuffled.close()
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_copy_range_across_file_systems(tmp_path):
    """copy_file_range refuses some pairs of files (EXDEV); the copy then goes through user space."""
    import os
    import tempfile

    data = bytes(range(256)) * 40_000
    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as src:
        src.write(data)
        src.flush()
        dst = tmp_path / "dst.bin"
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT)
        try:
            copy_range(src.fileno(), 1000, fd, 7, len(data) - 2000)
        finally:
            os.close(fd)
    assert dst.read_bytes() == b"\0" * 7 + data[1000:-1000]


def _entries_and_layouts():
    from hypothesis import strategies as st

    name = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12)
    entry = st.tuples(
        name, st.sampled_from(["F32", "BF16", "U8", "I64"]), st.lists(st.integers(0, 4), max_size=3).map(tuple)
    )
    return (
        st.lists(entry, max_size=8, unique_by=lambda e: e[0]),
        st.sampled_from([dict(separators=(",", ":")), dict(), dict(indent=2)]),
        st.booleans(),
        st.booleans(),
    )


@pytest.mark.parametrize("seed", range(3))
def test_the_in_place_scan_reads_what_the_json_parser_reads(seed):
    """The fast path (safetensors' own layout, with any JSON whitespace) gives the same table as json.loads."""
    from hypothesis import given, settings

    from rslora_tools.formats.safetensors_file import (
        _ordered_table,
        _parse_json,
        _scan_canonical,
        tensor_nbytes,
    )

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(*_entries_and_layouts())
    def check(entries, dumps, metadata, reverse):
        header, position = {}, 0
        if metadata:
            header["__metadata__"] = {"format": "pt", "note": 'a "quoted" }value{'}
        for key, dtype, shape in entries:
            end = position + tensor_nbytes(dtype, shape)
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, end]}
            position = end
        if reverse:  # header order other than file order
            header = dict(reversed(list(header.items())))
        raw = json.dumps(header, **dumps).encode() + b"  "
        scanned = _scan_canonical(raw)
        parsed = _parse_json(None, raw)
        if scanned is None:  # only __metadata__ elsewhere than first leaves the layout safetensors writes
            assert metadata and reverse and entries
            return
        assert scanned[0] == parsed[0]
        a, b = _ordered_table(None, scanned[1]), _ordered_table(None, parsed[1])
        assert a.end == b.end == position and list(a.table.items()) == list(b.table.items())

    check()
