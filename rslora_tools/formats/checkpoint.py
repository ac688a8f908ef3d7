"""Hugging Face checkpoint folders, a single file or shards with an index, plus side files.

Reading validates the index against the shard headers (every tensor in exactly one shard, no
file names that leave the folder) and opens shard files on demand (`CheckpointFiles`).
Writing follows transformers: shards named `model-00001-of-00004.safetensors`, the index
written with `indent=2, sort_keys=True`, and the side files (configs, tokenizer, templates)
copied verbatim, with `config.json` updated only where a merge changes it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .safetensors_file import (
    SafetensorsHeader,
    TensorInfo,
    check_unchanged,
    read_header,
    read_into,
    read_tensor,
    tensor_bytes,
    tensor_nbytes,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

# Files that are not side files: weights, indexes, adapter files, the base's model card, provenance.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".pkl")
_NOT_SIDE_FILES = {"adapter_config.json", "README.md", ".gitattributes", "rslora_tools.json"}
# Tokenizer, chat template and processor files (glob patterns): what a merge takes from the adapter
# folder when it has them, and what a Hub download fetches besides the configs.
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
    "*.jinja",
    "sentencepiece.*",
    "processor_config.json",
    "preprocessor_config.json",
    "image_processor*.json",
    "video_preprocessor*.json",
    "feature_extractor*.json",
)

TensorEntry = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype, shape)


class OneShard(Mapping[str, str]):
    """The weight map of a single-file checkpoint: every tensor of the header -> that file (no dict of its own)."""

    def __init__(self, header: SafetensorsHeader, shard: str):
        self.tensors, self.shard = header.tensors, shard

    def __getitem__(self, name: str) -> str:
        if name not in self.tensors:
            raise KeyError(name)
        return self.shard

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


@dataclass
class Checkpoint:
    """A model folder: its shards (in order), their headers, and config.json."""

    folder: Path
    shards: list[str]
    headers: dict[str, SafetensorsHeader]
    weight_map: Mapping[str, str]
    index_metadata: dict[str, Any] | None
    config: dict[str, Any] | None
    remote: bool = False  # the shards are not here yet (a streamed Hub base): headers only, no tensor data

    @property
    def sharded(self) -> bool:
        return self.index_metadata is not None

    def info(self, name: str) -> TensorInfo:
        return self.headers[self.weight_map[name]].tensors[name]

    def tensor_names(self) -> list[str]:
        """All tensor names, shard by shard, each shard in file order."""
        return [name for shard in self.shards for name in self.headers[shard].tensors]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for h in self.headers.values() for t in h.tensors.values())


def check_shard_name(index_path: Path, name: object, what: str) -> str:
    """A shard named by an index must be a plain `.safetensors` file name in the index's folder.

    No path and no `..` (it would leave the folder), and the `.safetensors` suffix: a shard named
    like a side file (`tokenizer.json`, `rslora_tools.json`) would be overwritten by that file in
    a merged folder.
    """
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise InputError(f"{index_path}: {what} names file {name!r}, which is not a plain file name in the folder")
    if not name.endswith(".safetensors"):
        raise InputError(f"{index_path}: {what} names file {name!r}, which is not a .safetensors shard")
    _refuse_hidden(index_path, name, f"{what} names file {name!r}")
    return name


def _refuse_hidden(where: Path, name: str, what: str) -> None:
    """A shard's name may not start with '.': the output keeps the name, and a push skips hidden files."""
    if name.startswith("."):
        raise InputError(
            f"{where}: {what}, a hidden file (its name starts with '.'), which the Hub and push skip; "
            "rename it (and the index entries)"
        )


def _safe_member(folder: Path, name: object, what: str) -> Path:
    """A file inside `folder` named by an index; refuse names and links that leave the folder."""
    path = folder / check_shard_name(folder / INDEX_FILE, name, what)
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise InputError(f"{folder / INDEX_FILE}: {what} names shard {name!r}, which is missing") from e
    if not stays_inside(folder, resolved):
        raise InputError(f"{folder / INDEX_FILE}: shard {name!r} is a link that leaves the folder")
    return path


def stays_inside(folder: Path, resolved: Path) -> bool:
    """The link rule, for every file an input folder contributes (shards, side files, files pushed).

    A file (or the file a link leads to) must be in the folder, or be a Hub cache blob of the
    snapshot the folder is; a link anywhere else would copy or publish a file from outside.
    """
    return _inside(resolved, folder.resolve()) or _is_hub_blob(resolved, folder)


def checked_file(folder: Path, path: Path, what: str = "file") -> Path:
    """`path` (an entry of FOLDER) when it stays inside the folder (`stays_inside`); InputError otherwise."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise InputError(f"{path}: cannot be read ({e})") from e
    if not stays_inside(folder, resolved):
        raise InputError(
            f"{folder}: {what} {path.relative_to(folder).as_posix()!r} is a link that leaves the "
            f"folder (to {resolved}); copy the file into the folder instead"
        )
    return path


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _is_hub_blob(resolved: Path, folder: Path) -> bool:
    # huggingface_hub snapshots: <repo>/snapshots/<rev>/<file> -> <repo>/blobs/<sha>
    parts = folder.resolve().parts
    return "snapshots" in parts and resolved.parent.name == "blobs" and _inside(resolved, folder.resolve().parents[1])


def index_shard_names(folder: Path) -> list[str] | None:
    """The shard files the folder's index lists (sorted, each a checked plain name), or None without an index."""
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        return None
    weight_map = _weight_map(index_path, read_json_file(index_path))
    return sorted({check_shard_name(index_path, shard, f"tensor {tensor!r}") for tensor, shard in weight_map.items()})


def _weight_map(index_path: Path, index: Any) -> dict[str, Any]:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: missing or empty 'weight_map'")
    return weight_map


HeaderSource = Callable[[str], SafetensorsHeader]  # shard name -> its header (a remote base: fetched, not read)


def open_checkpoint(folder: str | os.PathLike[str], remote: HeaderSource | None = None) -> Checkpoint:
    """Open a model folder (single `model.safetensors` or sharded with an index) and validate it.

    `remote`: the shards are not in FOLDER (yet); their headers come from this function (each
    header's `path` says where the shard will be read from), and FOLDER holds the index and side
    files only (a Hub base streamed shard by shard, execute/streamed_base.py).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: base model folder not found")
    config = read_json_file(folder / "config.json") if (folder / "config.json").is_file() else None
    if config is not None and not isinstance(config, dict):
        raise InputError(f"{folder / 'config.json'}: expected a JSON object")
    index_path = folder / INDEX_FILE
    if remote is not None:
        if index_path.is_file():
            opened = _open_sharded(folder, index_path, config, remote)
        else:
            header = remote(SINGLE_FILE)
            opened = Checkpoint(
                folder, [SINGLE_FILE], {SINGLE_FILE: header}, OneShard(header, SINGLE_FILE), None, config
            )
        opened.remote = True
        return opened
    check_layout([p.name for p in (index_path, folder / SINGLE_FILE) if p.is_file()], str(folder))
    if index_path.is_file():
        return _open_sharded(folder, index_path, config)
    candidates = (
        [SINGLE_FILE]
        if (folder / SINGLE_FILE).is_file()
        else sorted(p.name for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    )
    if len(candidates) == 1:
        name = candidates[0]
        _refuse_hidden(folder, name, f"the only weights file is {name!r}")
        header = read_header(folder / name)
        return Checkpoint(folder, [name], {name: header}, OneShard(header, name), None, config)
    if len(candidates) > 1:
        raise InputError(
            f"{folder}: several .safetensors files but no {INDEX_FILE}; the checkpoint layout is ambiguous"
        )
    if any((folder / p).exists() for p in PICKLE_WEIGHTS):
        raise InputError(
            f"{folder}: the base model exists only as pickled PyTorch weights; pickles can execute code. "
            "Convert it to safetensors first (transformers: save_pretrained)"
        )
    raise InputError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; is this a Hugging Face model folder?")


def check_layout(names: list[str], where: str) -> None:
    """One rule for a local folder and a Hub repo (its file listing): a single file beside an index is ambiguous."""
    if SINGLE_FILE in names and INDEX_FILE in names:
        raise InputError(
            f"{where}: holds both {SINGLE_FILE} and {INDEX_FILE}; transformers loads {SINGLE_FILE} and ignores "
            "the index, so which one is the model is ambiguous: remove the other one"
        )


def _open_sharded(
    folder: Path, index_path: Path, config: dict[str, Any] | None, remote: HeaderSource | None = None
) -> Checkpoint:
    index = read_json_file(index_path)
    weight_map = _weight_map(index_path, index)
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{index_path}: 'metadata' must be an object")
    shards: list[str] = []
    for tensor, shard in weight_map.items():
        if remote is None:
            _safe_member(folder, shard, f"tensor {tensor!r}")
        else:
            check_shard_name(index_path, shard, f"tensor {tensor!r}")
        if shard not in shards:
            shards.append(shard)
    shards.sort()
    headers = {shard: remote(shard) if remote is not None else read_header(folder / shard) for shard in shards}
    seen: dict[str, str] = {}
    for shard, header in headers.items():
        for name in header.tensors:
            if name in seen:
                raise InputError(f"{folder}: tensor {name!r} is stored in two shards ({seen[name]} and {shard})")
            seen[name] = shard
            mapped = weight_map.get(name)
            if mapped is None:
                raise InputError(f"{index_path}: tensor {name!r} is in shard {shard} but not in the weight_map")
            if mapped != shard:
                raise InputError(f"{index_path}: tensor {name!r} is in shard {shard} but the index says {mapped}")
    for name, shard in weight_map.items():
        if name not in headers[shard].tensors:
            raise InputError(f"{index_path}: tensor {name!r} is mapped to {shard}, which does not contain it")
    return Checkpoint(folder, shards, headers, dict(weight_map), metadata, config)


class CheckpointFiles:
    """A checkpoint's shard files, opened read-only on demand (one descriptor each, shared by threads)."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, shard: str) -> int:
        with self._lock:  # worker threads open files too
            if shard not in self._fds:
                header = self.checkpoint.headers[shard]
                fd = os.open(header.path, os.O_RDONLY)
                try:
                    check_unchanged(fd, header)  # the file planned from, not one replaced since
                except BaseException:
                    os.close(fd)
                    raise
                self._fds[shard] = fd
            return self._fds[shard]

    def locate(self, name: str) -> tuple[int, int]:
        """(file descriptor, absolute offset) of a tensor's bytes."""
        shard = self.checkpoint.weight_map[name]
        header = self.checkpoint.headers[shard]
        return self.fd(shard), header.data_start + header.tensors[name].begin

    def path(self, name: str) -> Path:
        """The shard file that holds tensor `name`."""
        return self.checkpoint.headers[self.checkpoint.weight_map[name]].path

    def read(self, name: str) -> torch.Tensor:
        shard = self.checkpoint.weight_map[name]
        return read_tensor(self.fd(shard), self.checkpoint.headers[shard], name)

    def read_slice(self, name: str, index: int) -> torch.Tensor:
        """Slice `index` of a tensor's first dimension (one expert of a fused expert tensor), a new CPU tensor."""
        import torch

        shard = self.checkpoint.weight_map[name]
        header = self.checkpoint.headers[shard]
        info = header.tensors[name]
        out = torch.empty(info.shape[1:], dtype=torch_dtype(header, name))
        size = info.nbytes // info.shape[0]
        read_into(
            self.fd(shard),
            header.data_start + info.begin + index * size,
            tensor_bytes(out),
            f"{header.path}: tensor {name!r}",
        )
        return out

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def forget(self, shard: str) -> None:
        """Close one shard (a streamed base's shard about to be deleted: its space is freed when no one holds it)."""
        with self._lock:
            fd = self._fds.pop(shard, None)
        if fd is not None:
            os.close(fd)


def read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    except RecursionError as e:
        raise InputError(f"{path}: not usable JSON (nested too deeply)") from e


def write_json_file(path: Path, data: Any, *, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


def shard_file_name(index: int, count: int) -> str:
    """HF shard naming: model.safetensors for one shard, model-00001-of-00004.safetensors otherwise."""
    return SINGLE_FILE if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_index(folder: Path, shards: list[tuple[str, list[TensorEntry]]], metadata: dict[str, Any]) -> None:
    """model.safetensors.index.json for these shards: weight_map, total_size in bytes, total_parameters if kept."""
    weight_map = {name: shard for shard, entries in shards for name, _, _ in entries}
    entries = [entry for _, shard_entries in shards for entry in shard_entries]
    metadata = dict(metadata)
    metadata["total_size"] = sum(tensor_nbytes(dtype, shape) for _, dtype, shape in entries)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(math.prod(shape) for _, _, shape in entries)
    write_json_file(folder / INDEX_FILE, {"metadata": metadata, "weight_map": weight_map}, sort_keys=True)


def side_files(folder: Path) -> list[Path]:
    """Top-level files that travel with a checkpoint: configs, tokenizer, templates, processors, code.

    A side file that is a link out of its folder is refused (`checked_file`): it would be copied and published.
    """
    out = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in _NOT_SIDE_FILES:
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        out.append(checked_file(folder, p, "side file"))
    return out


def is_tokenizer_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TOKENIZER_PATTERNS)


def updated_config(config: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """config.json with a merge's changes: the keys updated (a None value removes the key), and a nested
    text_config's vocab_size too."""
    config = {k: v for k, v in {**config, **updates}.items() if not (k in updates and updates[k] is None)}
    if isinstance(config.get("text_config"), dict) and "vocab_size" in updates:
        config["text_config"] = {**config["text_config"], "vocab_size": updates["vocab_size"]}
    return config


def copy_side_files(base: Path, adapter: Path, dest: Path, config_updates: dict[str, Any]) -> None:
    """config.json (updated only where the merge changes it), generation config, tokenizer, templates.

    The tokenizer comes from the adapter folder when it has one (the tokenizer it was trained with).
    """
    adapter_files = [p for p in side_files(adapter) if is_tokenizer_file(p.name)]
    for path in side_files(base):
        if adapter_files and is_tokenizer_file(path.name):
            continue
        if path.name == "config.json" and config_updates:
            write_json_file(dest / path.name, updated_config(read_json_file(path), config_updates))
            continue
        shutil.copyfile(path, dest / path.name)
    for path in adapter_files:
        shutil.copyfile(path, dest / path.name)
