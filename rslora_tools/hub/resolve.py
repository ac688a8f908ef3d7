"""Inputs given as Hub repos, resolved to a commit and downloaded into the cache (only what a command reads).

Inputs: a local folder wins; then `hf://org/name[@rev][/subfolder]`; then `org/name[@rev]`.
Downloads go through `snapshot_download` into the standard cache with allow-patterns (never
pickles, and for a base only the shards its index lists). HF_ENDPOINT, HF_HOME, HF_HUB_CACHE
and HF_HUB_OFFLINE are read when a command runs. The token is never printed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .._version import __version__
from ..adapter.adapter import find_adapter_folder
from ..adapter.config import read_config_file
from ..errors import HubError, InputError, RsloraError
from ..formats.checkpoint import SINGLE_FILE, TOKENIZER_PATTERNS, check_layout, index_shard_names
from .client import LIBRARY_NAME, cache_dir, configure_http, download_error, endpoint, hub_api, offline
from .refs import HubRef, parse_ref

BASE_PATTERNS = ["*.json", *TOKENIZER_PATTERNS]
ADAPTER_PATTERNS = ["*.json", "*.safetensors", "*.md", *TOKENIZER_PATTERNS]
InputRole = Literal["base", "adapter"]


@dataclass
class Source:
    """Where an input came from: a local folder, or a Hub repo at a resolved commit."""

    spec: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    subfolder: str = ""

    def to_dict(self) -> dict[str, Any]:
        """What provenance records (no cache paths: the file may be published)."""
        if self.repo_id is None:
            return {"spec": self.spec}
        return {
            "spec": self.spec,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "subfolder": self.subfolder,
        }


def resolve_input(
    spec: str,
    *,
    role: InputRole,
    revision: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    shards: bool = True,
) -> Source:
    """A local folder for BASE ("base") or ADAPTER ("adapter"): the path itself, or a cached Hub snapshot.

    `shards=False`: a Hub base's weight shards are not downloaded (a streamed merge fetches them one at a time).
    """
    local = Path(spec).expanduser()
    if local.exists():
        if revision:
            raise InputError(f"{spec}: is a local folder; a revision applies to Hub repos only")
        return Source(spec, local)
    what = "base model" if role == "base" else role
    if _looks_local(spec) or _inside_a_local_folder(spec):
        raise InputError(f"{spec}: {what} folder not found{_did_you_mean(local, role)}", path=spec)
    ref = parse_ref(spec, revision)
    if ref is None:
        raise InputError(
            f"{spec}: no such local {what} folder, and not a Hub repo id (use org/name, org/name@revision or hf://org/name)"
        )
    patterns = BASE_PATTERNS if role == "base" else ADAPTER_PATTERNS + (["adapter_model.bin"] if allow_pickle else [])
    snapshot = _download(spec, ref, patterns, token)
    folder = snapshot / ref.subfolder if ref.subfolder else snapshot
    if not folder.is_dir():
        raise InputError(f"{spec}: the repo has no folder {ref.subfolder!r}")
    pinned = HubRef(ref.repo_id, snapshot.name, ref.subfolder)
    if role == "base":
        check_layout(_listing(spec, pinned, folder, token), spec)
    if role == "base" and shards:
        _download_shards(spec, pinned, folder, token)
    return Source(spec, folder, ref.repo_id, ref.revision, snapshot.name, ref.subfolder)


def _listing(spec: str, ref: HubRef, folder: Path, token: str | None) -> list[str]:
    """The file names at the top of the repo folder (offline: of the cached snapshot), for `check_layout`."""
    if offline():
        return [p.name for p in folder.iterdir()]
    try:
        entries = hub_api(token).list_repo_tree(ref.repo_id, path_in_repo=ref.subfolder or None, revision=ref.revision)
        return [entry.path.rpartition("/")[2] for entry in entries]
    except Exception as e:
        raise HubError(download_error(spec, ref, e, False)) from e


def _download_shards(spec: str, pinned: HubRef, folder: Path, token: str | None) -> None:
    """The shards the base's index lists (or model.safetensors), at the commit already resolved."""
    try:
        shards = index_shard_names(folder) or [SINGLE_FILE]
    except InputError as e:
        raise InputError(f"{spec}: the repo's index is not valid: {e.message}") from e
    _download(spec, pinned, shards, token, exact=True)
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing == [SINGLE_FILE]:
        raise InputError(f"{spec}: the repo has no model.safetensors (or index); pickle-only checkpoints are refused")
    if missing:
        raise InputError(f"{spec}: shard {missing[0]} that the index lists is not in the repo (or not in the cache)")


def _inside_a_local_folder(spec: str) -> bool:
    """`fixtures/tiny-lama`: a repo id's shape, but its first part is a folder here, so a mistyped path.

    (A Hub repo whose namespace is also a local folder's name is still reachable as hf://org/name.)
    """
    head, slash, _ = spec.partition("/")
    return bool(slash) and head not in ("", ".", "..") and Path(head).expanduser().is_dir()


FolderKind = Literal["adapter", "merged", "model"]


def folder_kind(path: str | os.PathLike[str]) -> FolderKind | None:
    """What a local folder holds, by its files: an adapter (PEFT's or mlx-lm's adapter_config.json), a model merged
    by rslora-tools (its rslora_tools.json says so), another model (config.json or safetensors); None otherwise."""
    folder = Path(path).expanduser()
    try:
        if not folder.is_dir():
            return None
        if (folder / "adapter_config.json").is_file():
            return "adapter"
        recorded = folder / "rslora_tools.json"
        if recorded.is_file() and '"merge"' in recorded.read_text(errors="replace"):
            return "merged"
        if (folder / "config.json").is_file() or any(folder.glob("*.safetensors")):
            return "model"
    except OSError:
        return None
    return None


def _did_you_mean(path: Path, role: InputRole) -> str:
    """ " (did you mean NAME?)" for the closest name in the path's folder that holds what `role` needs (an adapter
    for ADAPTER, a model for BASE), when one is close."""
    import difflib

    parent = path.parent
    wanted = ("adapter",) if role == "adapter" else ("model", "merged")
    try:
        names = [p.name for p in parent.iterdir() if folder_kind(p) in wanted] if parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.75)
    return f" (did you mean {parent / close[0]}?)" if close else ""


def _looks_local(spec: str) -> bool:
    """A path, not a repo id: starts with / . or ~, or has more than one '/' (mergekit's rule), not hf://."""
    if spec.startswith("hf://"):
        return False
    return (
        spec.startswith(("/", ".", "~")) or spec.partition("@")[0].count("/") > 1 or os.sep != "/" and os.sep in spec
    )


def _download(spec: str, ref: HubRef, patterns: list[str], token: str | None, exact: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    configure_http()
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    allow = [prefix + p for p in patterns]
    ignore = None if exact else [prefix + "*/*"]
    local_only = offline()
    try:
        path = snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            allow_patterns=allow,
            ignore_patterns=ignore,
            token=token,
            cache_dir=cache_dir(),
            endpoint=endpoint(),
            local_files_only=local_only,
            library_name=LIBRARY_NAME,
            library_version=__version__,
        )
    except Exception as e:  # each client error becomes one line that says what to do
        raise HubError(download_error(spec, ref, e, local_only)) from e
    return Path(path)


def auto_base(adapter_config: dict[str, Any], adapter_spec: str) -> tuple[str, str | None]:
    """BASE `auto`: the base the adapter records (base_model_name_or_path, revision)."""
    base = adapter_config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InputError(f"{adapter_spec}: the adapter does not record its base model; pass BASE explicitly")
    revision = adapter_config.get("revision") if isinstance(adapter_config.get("revision"), str) else None
    return base, revision


def resolve_merge_inputs(
    base: str,
    adapter: str,
    *,
    base_revision: str | None = None,
    adapter_revision: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    base_shards: bool = True,
) -> tuple[Source, Source, list[str]]:
    """Resolve ADAPTER, then BASE (`auto` = the base the adapter records); warn on a base mismatch.

    `base_shards=False`: a Hub base's shards are not downloaded (a streamed merge fetches them itself).
    """
    adapter_source = resolve_input(
        adapter, role="adapter", revision=adapter_revision, token=token, allow_pickle=allow_pickle
    )
    try:
        config = read_config_file(find_adapter_folder(adapter_source.path))
    except RsloraError:
        config = {}  # load_adapter reports what is wrong with it
    warnings: list[str] = []
    if base != "auto":
        base_source = resolve_input(base, role="base", revision=base_revision, token=token, shards=base_shards)
    else:
        recorded, recorded_revision = auto_base(config, adapter)
        base, looked = locate_recorded_base(recorded, adapter_source.path)
        if base != recorded:
            warnings.append(
                f"BASE auto: the adapter records its base as the relative path {recorded!r}; "
                f"using {base}, found from the adapter's folder"
            )
        try:
            base_source = resolve_input(
                base, role="base", revision=base_revision or recorded_revision, token=token, shards=base_shards
            )
        except RsloraError as e:
            if not looked:
                raise
            raise type(e)(
                f"{e.message}; BASE auto: the adapter records its base as {recorded!r}, which as a "
                f"relative path is in none of {', '.join(map(str, looked))}; pass BASE",
                **e.fields,
            ) from e
    warning = base_mismatch(base_source, config)
    return base_source, adapter_source, warnings + ([warning] if warning else [])


def locate_recorded_base(recorded: str, adapter_folder: Path) -> tuple[str, list[Path]]:
    """The base an adapter records, as a folder when it is a relative path found from here or from the adapter.

    PEFT records `base_model_name_or_path` as it was given in training, often a path relative to where
    training ran. It is tried as given, then against the adapter's folder and each of its parents. Returns
    the spec to use and, when it is relative and found nowhere, the folders looked in (it may be a Hub repo).
    """
    path = Path(recorded).expanduser()
    if recorded.startswith("hf://") or path.is_absolute() or path.is_dir():
        return recorded, []
    folder = adapter_folder.resolve()
    looked = list(dict.fromkeys([Path.cwd(), folder, *folder.parents]))
    for candidate in looked:
        if (candidate / path).is_dir():
            return str(candidate / path), []
    return recorded, looked


def base_mismatch(base: Source, adapter_config: dict[str, Any]) -> str | None:
    """A warning when BASE is a repo other than the one the adapter records."""
    recorded = adapter_config.get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded or base.repo_id is None:
        return None
    recorded_ref = parse_ref(recorded) if not Path(recorded).exists() else None
    if recorded_ref is not None and recorded_ref.repo_id.lower() != base.repo_id.lower():
        return f"the adapter was trained on {recorded!r} but BASE is {base.repo_id!r}"
    return None


# --- the client for publishing (hub/push.py) --------------------------------------------------------
