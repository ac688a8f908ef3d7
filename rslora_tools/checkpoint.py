"""Hugging Face checkpoints on disk: single file or sharded with an index, plus side files.

Reading validates the index against the shard headers (every tensor in exactly one shard, no
file names that leave the folder). Writing helpers name shards and write the index the way
transformers does (`model-00001-of-00004.safetensors`, `indent=2, sort_keys=True`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .safetensors_file import SafetensorsHeader, TensorInfo, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

# Files that are not side files: weights, indexes, adapter files, the base's model card.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".pkl")
_NOT_SIDE_FILES = {"adapter_config.json", "README.md", ".gitattributes", "rslora_tools.json"}
_TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|.*\.model|.*\.tiktoken|"
    r"chat_template\.(jinja|json)|.*\.jinja|spiece\.model|sentencepiece\..*|(pre)?processor_config\.json|"
    r"preprocessor_config\.json|image_processor.*\.json|video_preprocessor.*\.json|feature_extractor.*\.json)$"
)


@dataclass
class Checkpoint:
    """A base model folder: its shards (in order), their headers, and config.json."""

    folder: Path
    shards: list[str]
    headers: dict[str, SafetensorsHeader]
    weight_map: dict[str, str]
    index_metadata: dict[str, Any] | None
    config: dict[str, Any] | None

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


def _safe_member(folder: Path, name: object, what: str) -> Path:
    """A file inside `folder` named by an index; refuse names that leave the folder."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise InputError(f"{folder / INDEX_FILE}: {what} names file {name!r}, which is not a plain file name in the folder")
    path = folder / name
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise InputError(f"{folder / INDEX_FILE}: {what} names shard {name!r}, which is missing") from e
    if resolved.parent != folder.resolve() and not _inside(resolved, folder.resolve()):
        # A symlink into the Hub cache's blobs folder is fine; anything else that leaves is not.
        if not _is_hub_blob(resolved, folder):
            raise InputError(f"{folder / INDEX_FILE}: shard {name!r} is a link that leaves the folder")
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


def open_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Open a base model folder (single `model.safetensors` or sharded with an index) and validate it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: base model folder not found")
    config = read_json_file(folder / "config.json") if (folder / "config.json").is_file() else None
    if config is not None and not isinstance(config, dict):
        raise InputError(f"{folder / 'config.json'}: expected a JSON object")
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        return _open_sharded(folder, index_path, config)
    candidates = [SINGLE_FILE] if (folder / SINGLE_FILE).is_file() else sorted(
        p.name for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_model")
    )
    if len(candidates) == 1:
        name = candidates[0]
        header = read_header(folder / name)
        return Checkpoint(folder, [name], {name: header}, {t: name for t in header.tensors}, None, config)
    if len(candidates) > 1:
        raise InputError(f"{folder}: several .safetensors files but no {INDEX_FILE}; the checkpoint layout is ambiguous")
    if any((folder / p).exists() for p in PICKLE_WEIGHTS):
        raise InputError(
            f"{folder}: the base model exists only as pickled PyTorch weights; pickles can execute code. "
            "Convert it to safetensors first (transformers: save_pretrained)"
        )
    raise InputError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; is this a Hugging Face model folder?")


def _open_sharded(folder: Path, index_path: Path, config: dict[str, Any] | None) -> Checkpoint:
    index = read_json_file(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: missing or empty 'weight_map'")
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{index_path}: 'metadata' must be an object")
    shards: list[str] = []
    for tensor, shard in weight_map.items():
        _safe_member(folder, shard, f"tensor {tensor!r}")
        if shard not in shards:
            shards.append(shard)
    shards.sort()
    headers = {shard: read_header(folder / shard) for shard in shards}
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


def read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


def write_json_file(path: Path, data: Any, *, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


def shard_file_name(index: int, count: int) -> str:
    """HF shard naming: model.safetensors for one shard, model-00001-of-00004.safetensors otherwise."""
    return SINGLE_FILE if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


_SIZE_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """Parse an HF-style size: decimal units ("5GB" = 5e9 bytes), binary with "GiB", or plain bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(f"invalid size {text!r}; use a number of bytes or a size like 500MB, 5GB, 2GiB")
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"invalid size {text!r}; it must be positive")
    return value


def side_files(folder: Path) -> list[Path]:
    """Top-level files that travel with a checkpoint: configs, tokenizer, templates, processors, code."""
    out = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in _NOT_SIDE_FILES:
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        out.append(p)
    return out


def is_tokenizer_file(name: str) -> bool:
    return bool(_TOKENIZER_FILE.match(name))
