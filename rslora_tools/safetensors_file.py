"""Read and write single safetensors files, one tensor at a time.

Reading parses the header ourselves (so that every defect gets a clear message) and reads
each tensor with `os.pread`, so that nothing is memory-mapped and memory never grows with the
file. Writing lays out the whole header first (a merge knows every name, dtype and shape in
advance) and then streams tensor bytes after it, so no shard is ever held in memory.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import InputError

MAX_HEADER_SIZE = 100_000_000  # the Rust reader's limit

# safetensors dtype name -> bits per element
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}

_TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "C64": "complex64", "F64": "float64", "I64": "int64", "U64": "uint64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
TORCH_TO_ST: dict[torch.dtype, str] = {}
ST_TO_TORCH: dict[str, torch.dtype] = {}
for _name, _attr in _TORCH_DTYPES.items():
    if hasattr(torch, _attr):
        ST_TO_TORCH[_name] = getattr(torch, _attr)
        TORCH_TO_ST[getattr(torch, _attr)] = _name

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset of the first byte, relative to the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    """The parsed header of one file: tensors in file order, metadata, data start."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    return (bits + 7) // 8


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file; raise InputError naming the defect."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_SIZE:
                raise InputError(f"{path}: corrupt safetensors header (header length {n} exceeds the 100 MB limit)")
            if 8 + n > size:
                raise InputError(
                    f"{path}: truncated or corrupt safetensors file (header length {n} runs past the end "
                    f"of the {size}-byte file); download it again"
                )
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: corrupt safetensors header (not valid UTF-8 JSON: {e})") from e
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    infos = []
    for name, entry in header.items():
        infos.append(_parse_entry(path, name, entry))
    infos.sort(key=lambda t: (t.begin, t.end))
    position = 0
    for info in infos:
        if info.begin != position:
            what = "overlap" if info.begin < position else "leave a hole"
            raise InputError(f"{path}: corrupt safetensors header (offsets of tensor {info.name!r} {what})")
        position = info.end
    if 8 + n + position != size:
        raise InputError(
            f"{path}: truncated or corrupt safetensors file (header describes {8 + n + position} bytes, "
            f"file has {size}); download it again"
        )
    return SafetensorsHeader(path, {t.name: t for t in infos}, metadata, 8 + n)


def _parse_entry(path: Path, name: str, entry: object) -> TensorInfo:
    bad = f"{path}: corrupt safetensors header (tensor {name!r}"
    if not isinstance(entry, dict):
        raise InputError(f"{bad} is not an object)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InputError(f"{bad} has unknown dtype {dtype!r})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"{bad} has an invalid shape {shape!r})")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InputError(f"{bad} has invalid data_offsets {offsets!r})")
    expected = tensor_nbytes(dtype, tuple(shape))
    if offsets[1] - offsets[0] != expected:
        raise InputError(
            f"{bad}: dtype {dtype} and shape {shape} need {expected} bytes, offsets give {offsets[1] - offsets[0]})"
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def read_tensor(f: BinaryIO | int, header: SafetensorsHeader, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor with pread: a writable CPU tensor (`out`, a reused buffer of the right size, or a new one)."""
    info = header.tensors[name]
    torch_dtype = ST_TO_TORCH.get(info.dtype)
    if torch_dtype is None:
        raise InputError(f"{header.path}: tensor {name!r} has dtype {info.dtype}, which this torch cannot compute with")
    if out is None:
        out = torch.empty(info.shape, dtype=torch_dtype)  # uninitialized: no memset before the read
    else:
        out = out.view(torch.uint8)[: info.nbytes].view(torch_dtype).view(info.shape)
    if info.nbytes == 0:
        return out
    fd = f if isinstance(f, int) else f.fileno()
    view, offset, done = tensor_bytes(out), header.data_start + info.begin, 0
    while done < info.nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise InputError(f"{header.path}: unexpected end of file while reading tensor {name!r}")
        done += n
    return out


def read_bytes(f: BinaryIO | int, offset: int, length: int) -> bytearray:
    fd = f if isinstance(f, int) else f.fileno()
    buf = bytearray(length)
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise InputError(f"unexpected end of file while reading {length} bytes at offset {offset}")
        done += n
    return buf


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, zero-copy (no numpy needed).

    The caller keeps `t` alive while the view is used.
    """
    assert t.is_contiguous() and t.device.type == "cpu"
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, list[TensorInfo]]:
    """Serialize a header for tensors laid out in the given order; return its bytes and offsets."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    infos = []
    position = 0
    for name, dtype, shape in entries:
        size = tensor_nbytes(dtype, shape)
        infos.append(TensorInfo(name, dtype, shape, position, position + size))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + size]}
        position += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so that the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, infos


class _BufferedSink:
    """Appends to a file through the page cache; raw copies stay in the kernel (copy_file_range)."""

    def __init__(self, path: Path, fd: int | None = None, offset: int = 0):
        self.fd = fd if fd is not None else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.offset = offset

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, self.offset)
            self.offset += n
            view = view[n:]

    def copy_from(self, source_fd: int, offset: int, length: int) -> None:
        while length > 0:
            try:
                n = os.copy_file_range(source_fd, self.fd, length, offset, self.offset)
            except OSError:
                n = 0
            if n <= 0:  # not supported here (or EOF): a plain copy through user space
                chunk = read_bytes(source_fd, offset, min(length, 64 << 20))
                self.write(chunk)
                n = len(chunk)
            else:
                self.offset += n
            length -= n
            offset += n

    def close(self) -> None:
        os.close(self.fd)

    def abort(self) -> None:
        self.close()


class _DirectSink:
    """Appends to a file with O_DIRECT through an aligned staging buffer: no page-cache copy.

    Writing fresh data through the page cache costs a kernel copy into newly allocated pages,
    which is slow and CPU-bound on many machines; O_DIRECT lets the disk DMA from one reused,
    page-aligned buffer instead. The tail is padded to the alignment and truncated at close.
    Falls back to buffered writes when the file system refuses O_DIRECT.
    """

    ALIGN = 4096

    def __init__(self, path: Path, buffer_bytes: int):
        import mmap

        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        self._map: mmap.mmap | None = mmap.mmap(-1, buffer_bytes)  # page-aligned
        self._buf = memoryview(self._map)
        self._used = 0
        self.offset = 0  # bytes written to the file so far (always a multiple of the buffer size)
        self.fallback: _BufferedSink | None = None

    def write(self, data: memoryview | bytes) -> None:
        if self.fallback is not None:
            return self.fallback.write(data)
        view = memoryview(data).cast("B")
        while view:
            n = min(len(view), len(self._buf) - self._used)
            self._buf[self._used:self._used + n] = view[:n]
            self._used += n
            view = view[n:]
            if self._used == len(self._buf):
                self._flush(self._used)

    def copy_from(self, source_fd: int, offset: int, length: int) -> None:
        if self.fallback is not None:
            return self.fallback.copy_from(source_fd, offset, length)
        while length > 0:
            room = self._buf[self._used:self._used + min(length, len(self._buf) - self._used)]
            n = os.preadv(source_fd, [room], offset)
            if n <= 0:
                raise InputError(f"unexpected end of file while copying {length} bytes at offset {offset}")
            self._used += n
            offset += n
            length -= n
            if self._used == len(self._buf):
                self._flush(self._used)

    def _flush(self, size: int) -> None:
        padded = -(-size // self.ALIGN) * self.ALIGN
        try:
            done = 0
            while done < padded:  # a short write happens when the disk fills up; the next one raises ENOSPC
                n = os.pwrite(self.fd, self._buf[done:padded], self.offset + done)
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError as e:
            if e.errno != errno.EINVAL or done:  # EINVAL first: this file system does not take O_DIRECT writes
                raise
            os.close(self.fd)
            self.fallback = _BufferedSink(self.path, os.open(self.path, os.O_WRONLY), self.offset)
            self.fallback.write(self._buf[:size])
            self._used = 0
            return
        self.offset += size
        self._used = 0

    def close(self) -> None:
        try:
            if self.fallback is None and self._used:
                self._flush(self._used)  # writes the padded tail
                if self.fallback is None:
                    os.ftruncate(self.fd, self.offset)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file without writing what is buffered (the caller removes the file)."""
        if self.fallback is not None:
            self.fallback.close()
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
        if self._map is not None:
            self._buf.release()
            self._map.close()
            self._map = None


DIRECT_BUFFER_BYTES = 32 << 20  # the O_DIRECT staging buffer of one open writer


def open_sink(path: Path, direct: bool) -> _BufferedSink | _DirectSink:
    """A direct-I/O sink where the file system supports it (and `direct`), else a buffered one."""
    if direct and hasattr(os, "O_DIRECT") and os.environ.get("RSLORA_TOOLS_DIRECT_IO", "1") != "0":
        try:
            return _DirectSink(path, DIRECT_BUFFER_BYTES)
        except OSError:  # e.g. tmpfs: O_DIRECT not supported
            pass
    return _BufferedSink(path)


class StreamingWriter:
    """Writes one safetensors file whose header is known up front, tensor by tensor, in order.

    With `direct`, data goes to disk with O_DIRECT where the file system allows it (see _DirectSink).
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None,
                 *, direct: bool = False):
        self.path = path
        header, self.infos = build_header(entries, metadata)
        self._next = 0
        self._sink = open_sink(path, direct)
        self._closed = False
        self._sink.write(header)

    def _expect(self, name: str) -> TensorInfo:
        info = self.infos[self._next]
        if info.name != name:
            raise RuntimeError(f"writer expected tensor {info.name!r}, got {name!r}")
        self._next += 1
        return info

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        info = self._expect(name)
        if TORCH_TO_ST.get(tensor.dtype) != info.dtype or tuple(tensor.shape) != info.shape:
            raise RuntimeError(f"tensor {name!r} is {tensor.dtype}{tuple(tensor.shape)}, header says {info.dtype}{info.shape}")
        tensor = tensor.contiguous()
        self._sink.write(tensor_bytes(tensor))

    def copy_raw(self, name: str, source_fd: int, source_offset: int) -> None:
        """Copy a tensor's bytes from another file without decoding them."""
        info = self._expect(name)
        self._sink.copy_from(source_fd, source_offset, info.nbytes)

    def close(self) -> None:
        if self._next != len(self.infos):
            missing = self.infos[self._next].name
            self.abort()
            raise RuntimeError(f"{self.path}: tensor {missing!r} was never written")
        if not self._closed:
            self._closed = True
            self._sink.close()

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._sink.abort()
