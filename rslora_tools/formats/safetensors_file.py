"""Read and write single safetensors files, one tensor at a time.

Reading parses the header ourselves (so that every defect gets a clear message) and reads
each tensor with `os.pread`, so that nothing is memory-mapped and memory never grows with the
file. Writing lays out the whole header first (a merge knows every name, dtype and shape in
advance); tensor bytes then go to their offsets, in any order and from several threads, so no
shard is ever held in memory. torch is imported only by the functions that return tensors.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import json
import math
import os
import re
import stat
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import InputError

try:  # CPython's own BLAKE2: `import hashlib` would load OpenSSL, 4 MB of a merge's 30 MB
    from _blake2 import blake2b as _header_hash
except ImportError:  # pragma: no cover - other Pythons
    from hashlib import blake2b as _header_hash

if TYPE_CHECKING:
    import torch

MAX_HEADER_SIZE = 100_000_000  # the Rust reader's limit

# safetensors dtype name -> bits per element
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

_TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
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


_DTYPE_CODES = {name: i for i, name in enumerate(DTYPE_BITS)}
_DTYPE_NAMES = [sys.intern(name) for name in DTYPE_BITS]
_DTYPE_OF_BYTES = {name.encode(): sys.intern(name) for name in DTYPE_BITS}


class TensorTable(Mapping[str, TensorInfo]):
    """name -> TensorInfo for the tensors of one file, in file order, stored compactly.

    A header of many small tensors (hundreds of thousands) would cost a kilobyte per tensor as
    TensorInfo objects in a dict; here a tensor costs its name, one dict slot and a few array
    entries (shapes are shared), and its TensorInfo is made when asked for.
    """

    __slots__ = ("_names", "_index", "_offsets", "_dtypes", "_shapes", "_shape_ids", "_shape_list")

    def __init__(self) -> None:
        self._names: list[str] = []  # in file order
        self._index: dict[str, int] | None = None  # name -> row, made at the first lookup by name
        self._offsets = array("q")  # begin and end of each row
        self._dtypes = bytearray()
        self._shapes = array("I")  # each row's index into _shape_list
        self._shape_ids: dict[tuple[int, ...], int] = {}
        self._shape_list: list[tuple[int, ...]] = []

    def add(self, name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> None:
        """Append a tensor (in file order)."""
        shape_id = self._shape_ids.get(shape)
        if shape_id is None:
            shape_id = self._shape_ids[shape] = len(self._shape_list)
            self._shape_list.append(shape)
        if self._index is not None:
            self._index.setdefault(name, len(self._names))
        self._names.append(name)
        self._offsets.extend((begin, end))
        self._dtypes.append(_DTYPE_CODES[dtype])
        self._shapes.append(shape_id)

    def _by_name(self) -> dict[str, int]:
        if self._index is None:
            index: dict[str, int] = {}
            for row, known in enumerate(self._names):
                index.setdefault(known, row)
            self._index = index
        return self._index

    def row_of(self, name: str) -> int:
        return self._by_name()[name]

    def row(self, row: int) -> TensorInfo:
        return TensorInfo(
            self._names[row],
            _DTYPE_NAMES[self._dtypes[row]],
            self._shape_list[self._shapes[row]],
            self._offsets[2 * row],
            self._offsets[2 * row + 1],
        )

    def __getitem__(self, name: str) -> TensorInfo:
        return self.row(self.row_of(name))

    def __contains__(self, name: object) -> bool:
        return name in self._by_name()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        """The distinct names (a header that names a tensor twice has more rows; it is refused when read)."""
        return len(self._by_name())

    @property
    def rows(self) -> int:
        return len(self._names)

    @classmethod
    def of(cls, infos: Iterable[TensorInfo]) -> TensorTable:
        table = cls()
        for t in infos:
            table.add(t.name, t.dtype, t.shape, t.begin, t.end)
        return table


@dataclass
class SafetensorsHeader:
    """The parsed header of one file: tensors in file order, metadata, data start; and, to recognise the file
    when it is opened again, its size and a BLAKE2b digest of its first `data_start` bytes (`check_unchanged`)."""

    path: Path
    tensors: Mapping[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int
    size: int = 0
    digest: bytes = b""


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
    """Parse and validate header bytes `raw` (length `n`) of a `size`-byte file at `path` (read, or still remote).

    The header as safetensors writers lay it out is scanned in place (`_scan_canonical`): no
    decoded copy of it and no JSON object per tensor, so a header of a million tensors costs
    little more than its own bytes while it is read. Any other layout, and every defect, goes
    through the JSON parser, whose messages name the defect.
    """
    digest = _header_hash(struct.pack("<Q", n))
    digest.update(raw)
    scanned = _scan_canonical(raw)
    if scanned is not None:
        metadata, rows = scanned
    else:
        metadata, rows = _parse_json(path, raw)
    del raw
    table = _ordered_table(path, rows)
    position = table.end
    if 8 + n + position != size:
        raise InputError(
            f"{path}: truncated or corrupt safetensors file (header describes {8 + n + position} bytes, "
            f"file has {size}); download it again"
        )
    return SafetensorsHeader(path, table.table, metadata, 8 + n, size, digest.digest())


class _Rows:
    """Tensor entries as parsed, in header order, compactly (names; dtype codes; shape ids; begin/end pairs)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.dtypes = bytearray()
        self.shapes = array("I")
        self.shape_list: list[tuple[int, ...]] = []
        self.shape_ids: dict[object, int] = {}  # a shape (or its JSON bytes) -> its id
        self.offsets = array("q")

    def add(
        self, name: str, dtype: str, shape_key: object, shape: tuple[int, ...] | None, begin: int, end: int
    ) -> None:
        shape_id = self.shape_ids.get(shape_key)
        if shape_id is None:
            assert shape is not None
            shape_id = self.shape_ids[shape_key] = len(self.shape_list)
            self.shape_list.append(shape)
        self.names.append(name)
        self.dtypes.append(_DTYPE_CODES[dtype])
        self.shapes.append(shape_id)
        self.offsets.extend((begin, end))


def _parse_json(path: Path, raw: bytes | bytearray) -> tuple[dict[str, str] | None, _Rows]:
    """The header through json.loads, every entry checked (the messages name the defect)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_compact_entry)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: corrupt safetensors header (not valid UTF-8 JSON: {e})") from e
    except RecursionError as e:
        raise InputError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from e
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if isinstance(metadata, tuple):  # an object with the keys of a tensor entry
        metadata = dict(zip(("dtype", "shape", "data_offsets"), metadata))
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    rows = _Rows()
    for name, entry in header.items():
        info = _parse_entry(path, name, entry)
        rows.add(name, info.dtype, info.shape, info.shape, info.begin, info.end)
    return metadata, rows


_W = rb"[ \t\n\r]*"  # JSON whitespace, allowed between any two tokens
_STRING = rb'"((?:[^"\\\x00-\x1f]|\\.)*)"'
_NUMBER = rb"(?:0|[1-9][0-9]*)"
_NUMBERS = rb"((?:" + _W + _NUMBER + _W + rb"(?:," + _W + _NUMBER + _W + rb")*)?)"
_ENTRY = re.compile(
    _W
    + _STRING
    + _W
    + rb":"
    + _W
    + rb"\{"
    + _W
    + rb'"dtype"'
    + _W
    + rb":"
    + _W
    + rb'"([A-Z0-9_]+)"'
    + _W
    + rb","
    + _W
    + rb'"shape"'
    + _W
    + rb":"
    + _W
    + rb"\["
    + _NUMBERS
    + rb"\]"
    + _W
    + rb","
    + _W
    + rb'"data_offsets"'
    + _W
    + rb":"
    + _W
    + rb"\["
    + _W
    + rb"("
    + _NUMBER
    + rb")"
    + _W
    + rb","
    + _W
    + rb"("
    + _NUMBER
    + rb")"
    + _W
    + rb"\]"
    + _W
    + rb"\}"
    + _W
    + rb"([,}])"
)
_PAIR = _W + _STRING.replace(b"(", b"(?:", 1) + _W + b":" + _W + _STRING.replace(b"(", b"(?:", 1) + _W
_METADATA = re.compile(
    _W
    + rb"\{"
    + _W
    + rb'"__metadata__"'
    + _W
    + rb":"
    + _W
    + rb"(\{(?:"
    + _PAIR
    + rb"(?:,"
    + _PAIR
    + rb")*|"
    + _W
    + rb")\})"
    + _W
    + rb"([,}])"
)


def _scan_canonical(raw: bytes | bytearray) -> tuple[dict[str, str] | None, _Rows] | None:
    """The header in the layout safetensors writers use, scanned entry by entry with checks; None for anything else
    (another layout, or a defect: the JSON path then parses it and names the defect)."""
    metadata = None
    opening = re.compile(_W + rb"\{" + _W).match(raw, 0)
    if opening is None:
        return None
    pos, last = opening.end(), b","
    found = _METADATA.match(raw, 0)
    if found is not None:
        try:
            metadata = json.loads(found.group(1))
        except ValueError:  # not UTF-8, a bad escape: the JSON path names it
            return None
        pos, last = found.end(), found.group(2)
    elif raw[pos : pos + 1] == b"}":
        pos, last = pos + 1, b"}"
    rows = _Rows()
    while last == b",":
        m = _ENTRY.match(raw, pos)
        if m is None:
            return None
        quoted, dtype_bytes, shape_bytes, begin, end, last = m.groups()
        try:
            name = json.loads(b'"' + quoted + b'"') if b"\\" in quoted else quoted.decode("utf-8")
        except ValueError:
            return None
        dtype = _DTYPE_OF_BYTES.get(dtype_bytes)
        shape = None
        if shape_bytes not in rows.shape_ids:
            shape = tuple(int(d) for d in shape_bytes.split(b",")) if shape_bytes.strip(b" \t\n\r") else ()
        first, stop = int(begin), int(end)
        if (
            dtype is None
            or first > stop
            or name == "__metadata__"
            or stop - first
            != tensor_nbytes(dtype, shape if shape is not None else rows.shape_list[rows.shape_ids[shape_bytes]])
        ):
            return None
        rows.add(name, dtype, shape_bytes, shape, first, stop)
        pos = m.end()
    if raw[pos:].strip(b" \t\r\n"):
        return None
    return metadata, rows


@dataclass
class _Ordered:
    table: TensorTable
    end: int  # where the data section ends (the sum of the tensors' sizes)


def _ordered_table(path: Path, rows: _Rows) -> _Ordered:
    """The rows in file order as a TensorTable; offsets that overlap or leave a hole, and names listed twice, are
    refused."""
    offsets = rows.offsets
    count = len(rows.names)

    def key(i: int) -> int:  # by offset; an empty tensor before a non-empty one at the same offset
        return 2 * offsets[2 * i] + (offsets[2 * i + 1] > offsets[2 * i])

    ordered = all(key(i) <= key(i + 1) for i in range(count - 1))  # writers usually lay them out so
    order: Iterable[int] = range(count) if ordered else sorted(range(count), key=key)
    table = TensorTable()
    position = 0
    for i in order:
        begin, end = offsets[2 * i], offsets[2 * i + 1]
        name = rows.names[i]
        if begin != position:
            what = "overlap" if begin < position else "leave a hole"
            raise InputError(f"{path}: corrupt safetensors header (offsets of tensor {name!r} {what})")
        table.add(name, _DTYPE_NAMES[rows.dtypes[i]], rows.shape_list[rows.shapes[i]], begin, end)
        position = end
    if len(table) != table.rows:
        twice = next(n for n, c in collections.Counter(rows.names).items() if c > 1)
        raise InputError(f"{path}: corrupt safetensors header (tensor {twice!r} is listed twice)")
    return _Ordered(table, position)


def check_unchanged(fd: int, header: SafetensorsHeader) -> None:
    """The file open at `fd` is the one `header` was read from (size and header bytes); InputError otherwise.

    Planning reads headers first and tensors come later (a streamed merge: minutes later, from a
    shard downloaded meanwhile); a file replaced or served differently in between would give a
    model scrambled from two files.
    """
    size = os.fstat(fd).st_size
    digest = _header_hash()
    for start in range(0, min(header.data_start, size), 1 << 20):
        digest.update(os.pread(fd, min(1 << 20, header.data_start - start), start))
    if size != header.size or digest.digest() != header.digest:
        what = f"now {size} bytes, planned {header.size}" if size != header.size else "its header differs"
        raise InputError(
            f"{header.path}: changed since the merge was planned ({what}); nothing was written from it. "
            "Run the command again"
        )


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
        return (
            entry["dtype"],
            tuple(shape) if isinstance(shape, list) else shape,
            tuple(offsets) if isinstance(offsets, list) else offsets,
        )
    return dict(pairs)


def _parse_entry(path: Path, name: str, entry: object) -> TensorInfo:
    if type(entry) is tuple:  # the usual case, checked fast: str dtype, tuples of non-negative ints
        dtype, shape, offsets = entry
        if (
            type(dtype) is str
            and dtype in DTYPE_BITS
            and type(shape) is tuple
            and type(offsets) is tuple
            and len(offsets) == 2
            and all(type(d) is int and d >= 0 for d in (*shape, *offsets))
            and offsets[0] <= offsets[1]
            and offsets[1] - offsets[0] == tensor_nbytes(dtype, shape)
        ):
            return TensorInfo(name, sys.intern(dtype), shape, offsets[0], offsets[1])
    return _checked_entry(path, name, entry)


def _checked_entry(path: Path, name: str, entry: object) -> TensorInfo:
    """An entry the fast path did not take: the same checks, one at a time, to name the defect."""
    bad = f"{path}: corrupt safetensors header (tensor {name!r}"
    if isinstance(entry, dict):  # an object with other keys than a tensor entry's
        entry = tuple(
            tuple(v) if isinstance(v, list) else v
            for v in (entry.get("dtype"), entry.get("shape"), entry.get("data_offsets"))
        )
    if not isinstance(entry, tuple):
        raise InputError(f"{bad} is not an object)")
    dtype, shape, offsets = entry
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InputError(f"{bad} has unknown dtype {dtype!r})")
    if not isinstance(shape, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
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
            f"{bad}: dtype {dtype} and shape {list(shape)} need {expected} bytes, offsets give "
            f"{offsets[1] - offsets[0]})"
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
    """The raw little-endian bytes of a contiguous CPU tensor, zero-copy (no numpy needed). The view keeps `t` alive
    (`tensor_bytes(x.contiguous())` is safe)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    raw = (ctypes.c_char * n).from_address(t.data_ptr())
    raw._tensor = t  # type: ignore[attr-defined]  # the memory stays while the view (and so `raw`) lives
    return memoryview(raw).cast("B")


class HeaderLayout:
    """The header of a file whose tensors are laid out in the given order: its length, the tensors' offsets (a
    TensorTable), and its bytes, produced a megabyte at a time (`chunks`), never whole in memory.

    The JSON is what `json.dumps(header, separators=(",", ":"))` writes, padded with spaces so that the
    data section starts 8-byte aligned.
    """

    def __init__(self, entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None):
        self.metadata = metadata
        self.table = TensorTable()
        pieces = [len(self._metadata_part().encode("utf-8"))] if metadata is not None else []
        position = 0
        for name, dtype, shape in entries:
            end = position + tensor_nbytes(dtype, shape)
            self.table.add(name, dtype, shape, position, end)
            pieces.append(len(_entry_json(name, dtype, shape, position, end).encode("utf-8")))
            position = end
        length = 2 + sum(pieces) + max(0, len(pieces) - 1)  # "{", the pieces with commas between, "}"
        self.data_size = position
        self.raw_length = length + (-length % 8)
        self.data_start = 8 + self.raw_length

    def _metadata_part(self) -> str:
        return f'"__metadata__":{json.dumps(self.metadata, separators=(",", ":"))}'

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The 8-byte length, then the header, a chunk of about `size` bytes at a time."""
        parts = [struct.pack("<Q", self.raw_length), b"{"]
        pending = written = 1
        pieces = itertools.chain(
            [self._metadata_part()] if self.metadata is not None else [],
            (
                _entry_json(info.name, info.dtype, info.shape, info.begin, info.end)
                for info in map(self.table.row, range(self.table.rows))
            ),
        )
        for i, piece in enumerate(pieces):
            data = (b"," if i else b"") + piece.encode("utf-8")
            parts.append(data)
            pending += len(data)
            written += len(data)
            if pending >= size:
                yield b"".join(parts)
                parts, pending = [], 0
        yield b"".join([*parts, b"}", b" " * (self.raw_length - written - 1)])

    def header(self) -> bytes:
        return b"".join(self.chunks())


def _entry_json(name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> str:
    return (
        f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":[{",".join(map(str, shape))}],'
        f'"data_offsets":[{begin},{end}]}}'
    )


def build_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, list[TensorInfo]]:
    """A header's bytes and its tensors' offsets, in memory (small files; a shard's header goes through
    HeaderLayout)."""
    layout = HeaderLayout(entries, metadata)
    return layout.header(), list(layout.table.values())


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

    def __init__(
        self, path: Path, entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
    ):
        self.path = path
        layout = HeaderLayout(entries, metadata)
        self.infos = layout.table
        self.data_start = layout.data_start
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            preallocate(self.fd, self.data_start + layout.data_size)
            at = 0
            for chunk in layout.chunks():
                write_at(self.fd, at, chunk)
                at += len(chunk)
        except BaseException:
            self.close()
            raise

    def offset(self, name: str) -> int:
        """Where the bytes of tensor `name` start in the file."""
        return self.data_start + self.infos[name].begin

    def offset_at(self, row: int) -> int:
        """Where the bytes of the tensor at `row` (its place in `entries`) start in the file."""
        return self.data_start + self.infos.row(row).begin

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.write_row(self.infos.row_of(name), tensor)

    def write_row(self, row: int, tensor: torch.Tensor) -> None:
        info = self.infos.row(row)
        if torch_to_safetensors_dtype(tensor.dtype) != info.dtype or tuple(tensor.shape) != info.shape:
            raise RuntimeError(
                f"tensor {info.name!r} is {tensor.dtype}{tuple(tensor.shape)}, header says {info.dtype}{info.shape}"
            )
        write_at(self.fd, self.data_start + info.begin, tensor_bytes(tensor.contiguous()))

    def copy_raw(self, name: str, source_fd: int, source_offset: int) -> None:
        """Copy a tensor's bytes from another file without decoding them."""
        self.copy_row(self.infos.row_of(name), source_fd, source_offset)

    def copy_row(self, row: int, source_fd: int, source_offset: int) -> None:
        info = self.infos.row(row)
        copy_range(source_fd, source_offset, self.fd, self.data_start + info.begin, info.nbytes)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
