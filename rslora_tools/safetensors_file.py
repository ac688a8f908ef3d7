"""Stage 1, formats: read and write single safetensors files, one tensor at a time.

Reading parses the header ourselves (so that every defect gets a clear message) and reads
each tensor with `os.pread`, so that nothing is memory-mapped and memory never grows with the
file. Writing lays out the whole header first (a merge knows every name, dtype and shape in
advance); tensor bytes then go to their offsets, in any order and from several threads, so no
shard is ever held in memory. torch is imported only by the functions that return tensors.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .errors import InputError

if TYPE_CHECKING:
    import torch

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


_torch_maps: tuple[dict[str, torch.dtype], dict[torch.dtype, str]] | None = None


def _maps() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    """safetensors dtype <-> torch dtype, built (importing torch) on first use."""
    global _torch_maps
    if _torch_maps is None:
        import torch

        st_to_torch = {k: getattr(torch, v) for k, v in _TORCH_DTYPES.items() if hasattr(torch, v)}
        _torch_maps = (st_to_torch, {v: k for k, v in st_to_torch.items()})
    return _torch_maps


def torch_dtype_name(dtype: str) -> str:
    """The name torch gives a safetensors dtype ("BF16" -> "bfloat16"), without importing torch."""
    return _TORCH_DTYPES.get(dtype, dtype)


def has_torch_dtype(dtype: str) -> bool:
    """Whether this torch can hold tensors of the safetensors dtype (F4/F6 and some F8 formats it cannot)."""
    return dtype in _TORCH_DTYPES and dtype in _maps()[0]


def safetensors_to_torch_dtype(dtype: str) -> torch.dtype:
    return _maps()[0][dtype]


def torch_to_safetensors_dtype(dtype: torch.dtype) -> str:
    return _maps()[1].get(dtype, str(dtype))


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


@dataclass(frozen=True, slots=True)
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


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file; raise InputError naming the defect.

    Only regular files are read (a FIFO or device would block or never end), and each tensor's
    entry is kept as a small tuple while parsing, so that a header of many tensors costs a few
    hundred bytes per tensor.
    """
    path = Path(path)
    raw, n, size = _read_prefix_and_header(path)
    return parse_header(path, raw, n, size)


def header_length(path: Path, prefix: bytes, size: int) -> int:
    """The header length the first 8 bytes of a `size`-byte safetensors file give; InputError when impossible."""
    if len(prefix) < 8:
        raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_SIZE:
        raise InputError(f"{path}: corrupt safetensors header (header length {n} exceeds the 100 MB limit)")
    if 8 + n > size:
        raise InputError(
            f"{path}: truncated or corrupt safetensors file (header length {n} runs past the end "
            f"of the {size}-byte file); download it again"
        )
    return int(n)


def parse_header(path: Path, raw: bytes | bytearray, n: int, size: int) -> SafetensorsHeader:
    """Parse and validate header bytes `raw` (length `n`) of a `size`-byte file at `path` (read, or still remote)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_compact_entry)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: corrupt safetensors header (not valid UTF-8 JSON: {e})") from e
    except RecursionError as e:
        raise InputError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from e
    del raw
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if isinstance(metadata, tuple):  # an object with the keys of a tensor entry
        metadata = dict(zip(("dtype", "shape", "data_offsets"), metadata))
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    infos = [_parse_entry(path, name, entry) for name, entry in header.items()]
    del header
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


def _read_prefix_and_header(path: Path) -> tuple[bytearray, int, int]:
    """The header bytes, their length and the file size, from a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            what = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO, socket or device"
            raise InputError(f"{path}: not a regular file ({what}); a safetensors file is expected")
        size = info.st_size
        n = header_length(path, os.pread(fd, 8, 0), size)
        return read_bytes(fd, 8, n), n, size
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
    finally:
        os.close(fd)


_ENTRY_KEYS = ("data_offsets", "dtype", "shape")


def _compact_entry(pairs: list[tuple[str, object]]) -> object:
    """A JSON object as parsed: a tensor entry as the tuple (dtype, shape, offsets), anything else as a dict."""
    if len(pairs) == 3 and tuple(sorted(k for k, _ in pairs)) == _ENTRY_KEYS:
        entry = dict(pairs)
        shape, offsets = entry["shape"], entry["data_offsets"]
        return (entry["dtype"], tuple(shape) if isinstance(shape, list) else shape,
                tuple(offsets) if isinstance(offsets, list) else offsets)
    return dict(pairs)


def _parse_entry(path: Path, name: str, entry: object) -> TensorInfo:
    if type(entry) is tuple:  # the usual case, checked fast: str dtype, tuples of non-negative ints
        dtype, shape, offsets = entry
        if (type(dtype) is str and dtype in DTYPE_BITS and type(shape) is tuple and type(offsets) is tuple
                and len(offsets) == 2 and all(type(d) is int and d >= 0 for d in (*shape, *offsets))
                and offsets[0] <= offsets[1] and offsets[1] - offsets[0] == tensor_nbytes(dtype, shape)):
            return TensorInfo(name, sys.intern(dtype), shape, offsets[0], offsets[1])
    return _checked_entry(path, name, entry)


def _checked_entry(path: Path, name: str, entry: object) -> TensorInfo:
    """An entry the fast path did not take: the same checks, one at a time, to name the defect."""
    bad = f"{path}: corrupt safetensors header (tensor {name!r}"
    if isinstance(entry, dict):  # an object with other keys than a tensor entry's
        entry = tuple(tuple(v) if isinstance(v, list) else v
                      for v in (entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")))
    if not isinstance(entry, tuple):
        raise InputError(f"{bad} is not an object)")
    dtype, shape, offsets = entry
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InputError(f"{bad} has unknown dtype {dtype!r})")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"{bad} has an invalid shape {_as_json(shape)!r})")
    if (
        not isinstance(offsets, tuple)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InputError(f"{bad} has invalid data_offsets {_as_json(offsets)!r})")
    expected = tensor_nbytes(dtype, shape)
    if offsets[1] - offsets[0] != expected:
        raise InputError(
            f"{bad}: dtype {dtype} and shape {list(shape)} need {expected} bytes, offsets give {offsets[1] - offsets[0]})"
        )
    return TensorInfo(name, sys.intern(dtype), shape, offsets[0], offsets[1])


def _as_json(value: object) -> object:
    """A parsed value as it was written (tuples back to lists), for messages."""
    return list(value) if isinstance(value, tuple) else value


def torch_dtype(header: SafetensorsHeader, name: str) -> torch.dtype:
    """The torch dtype of a tensor in the file; InputError when this torch has none for it."""
    dtype = header.tensors[name].dtype
    if not has_torch_dtype(dtype):
        raise InputError(f"{header.path}: tensor {name!r} has dtype {dtype}, which this torch cannot compute with")
    return safetensors_to_torch_dtype(dtype)


def read_tensor(f: BinaryIO | int, header: SafetensorsHeader, name: str) -> torch.Tensor:
    """Read one tensor with pread into a new, writable CPU tensor."""
    import torch

    info = header.tensors[name]
    out = torch.empty(info.shape, dtype=torch_dtype(header, name))  # uninitialized: no memset before the read
    if info.nbytes == 0:
        return out
    fd = f if isinstance(f, int) else f.fileno()
    read_into(fd, header.data_start + info.begin, tensor_bytes(out), f"{header.path}: tensor {name!r}")
    return out


def read_bytes(f: BinaryIO | int, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    read_into(f if isinstance(f, int) else f.fileno(), offset, memoryview(buf), f"{length} bytes at offset {offset}")
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
    """Serialize a header for tensors laid out in the given order; return its bytes and offsets.

    The JSON is what `json.dumps(header, separators=(",", ":"))` writes, built entry by entry.
    """
    parts = [f'"__metadata__":{json.dumps(metadata, separators=(",", ":"))}'] if metadata is not None else []
    infos = []
    position = 0
    for name, dtype, shape in entries:
        end = position + tensor_nbytes(dtype, shape)
        infos.append(TensorInfo(name, dtype, shape, position, end))
        parts.append(f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":[{",".join(map(str, shape))}],'
                     f'"data_offsets":[{position},{end}]}}')
        position = end
    raw = ("{" + ",".join(parts) + "}").encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so that the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, infos


def read_into(fd: int, offset: int, view: memoryview, what: str) -> None:
    """Fill `view` from `fd` at `offset` (pread until done)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise InputError(f"unexpected end of file while reading {what}")
        done += n


def write_at(fd: int, offset: int, data: memoryview | bytes | bytearray) -> None:
    """Write all of `data` at `offset` (pwrite until done); thread-safe."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]


def copy_range(source_fd: int, source_offset: int, fd: int, offset: int, length: int) -> None:
    """Copy bytes between files in the kernel (copy_file_range), or through user space where it is refused."""
    in_kernel = hasattr(os, "copy_file_range")  # Linux
    while length > 0:
        n = 0
        if in_kernel:
            try:
                n = os.copy_file_range(source_fd, fd, min(length, 1 << 30), source_offset, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                    raise  # ENOSPC, EIO: real failures
                in_kernel = False
        if n <= 0:  # not supported between these files: a plain copy
            n = min(length, 16 << 20)
            chunk = memoryview(bytearray(n))
            read_into(source_fd, source_offset, chunk, f"{length} bytes at offset {source_offset}")
            write_at(fd, offset, chunk)
        length -= n
        source_offset += n
        offset += n


def preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks up front: a full disk fails now, and writes need no block allocation.

    Uses Linux fallocate(2); where it is missing or refused, nothing happens (no zero-filling emulation).
    """
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, os.strerror(err))


class SafetensorsWriter:
    """Writes one safetensors file whose header is known up front.

    The header is written at once and the file preallocated; each tensor's bytes then go to its
    own offset (`offset(name)`), in any order and from any thread.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None):
        self.path = path
        header, infos = build_header(entries, metadata)
        self.infos = {info.name: info for info in infos}
        self.data_start = len(header)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            preallocate(self.fd, self.data_start + (infos[-1].end if infos else 0))
            write_at(self.fd, 0, header)
        except BaseException:
            self.close()
            raise

    def offset(self, name: str) -> int:
        """Where the bytes of tensor `name` start in the file."""
        return self.data_start + self.infos[name].begin

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        info = self.infos[name]
        if torch_to_safetensors_dtype(tensor.dtype) != info.dtype or tuple(tensor.shape) != info.shape:
            raise RuntimeError(f"tensor {name!r} is {tensor.dtype}{tuple(tensor.shape)}, header says {info.dtype}{info.shape}")
        write_at(self.fd, self.offset(name), tensor_bytes(tensor.contiguous()))

    def copy_raw(self, name: str, source_fd: int, source_offset: int) -> None:
        """Copy a tensor's bytes from another file without decoding them."""
        copy_range(source_fd, source_offset, self.fd, self.offset(name), self.infos[name].nbytes)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
