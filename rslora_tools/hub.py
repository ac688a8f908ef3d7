"""Stage 6, commands: the Hugging Face Hub; BASE/ADAPTER given as repo ids are downloaded, results pushed with a card.

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

from . import __version__
from .adapter import find_adapter_folder
from .adapter_config import read_config_file
from .checkpoint import SINGLE_FILE, TOKENIZER_PATTERNS, check_layout, index_shard_names
from .errors import HubError, InputError, RsloraError
from .hub_refs import HubRef, parse_ref

LIBRARY_NAME = "rslora-tools"  # requests identify themselves as rslora-tools/<version>
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
        return {"spec": self.spec, "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "subfolder": self.subfolder}


def resolve_input(spec: str, *, role: InputRole, revision: str | None = None, token: str | None = None,
                  allow_pickle: bool = False, shards: bool = True) -> Source:
    """A local folder for BASE ("base") or ADAPTER ("adapter"): the path itself, or a cached Hub snapshot.

    `shards=False`: a Hub base's weight shards are not downloaded (a streamed merge fetches them one at a time).
    """
    local = Path(spec).expanduser()
    if local.exists():
        if revision:
            raise InputError(f"{spec}: is a local folder; a revision applies to Hub repos only")
        return Source(spec, local)
    what = "base model" if role == "base" else role
    if _looks_local(spec):
        raise InputError(f"{spec}: {what} folder not found")
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
    if _offline():
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
        raise InputError(f"{spec}: the repo's index is not valid: {e}") from e
    _download(spec, pinned, shards, token, exact=True)
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing == [SINGLE_FILE]:
        raise InputError(f"{spec}: the repo has no model.safetensors (or index); pickle-only checkpoints are refused")
    if missing:
        raise InputError(f"{spec}: shard {missing[0]} that the index lists is not in the repo (or not in the cache)")


def _looks_local(spec: str) -> bool:
    """A path, not a repo id: starts with / . or ~, or has more than one '/' (mergekit's rule), not hf://."""
    if spec.startswith("hf://"):
        return False
    return spec.startswith(("/", ".", "~")) or spec.partition("@")[0].count("/") > 1 or os.sep != "/" and os.sep in spec


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


_http_timeouts: tuple[float, float] | None = None


def _timeout_setting(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return value if value > 0 else default


def _configure_http() -> None:
    """Give every Hub request a connect and a read timeout (huggingface_hub's own client has none for API calls).

    Connect: HF_HUB_ETAG_TIMEOUT seconds (default 10); waiting for data: HF_HUB_DOWNLOAD_TIMEOUT
    seconds (default 60, as a commit of large files can take the server a while). A request that
    times out is retried where huggingface_hub retries (downloads), and otherwise fails with one line.
    """
    global _http_timeouts
    timeouts = (_timeout_setting("HF_HUB_ETAG_TIMEOUT", 10), _timeout_setting("HF_HUB_DOWNLOAD_TIMEOUT", 60))
    if timeouts == _http_timeouts:
        return
    from huggingface_hub.utils import _http

    connect, read = timeouts

    def fill_timeouts(request: Any) -> None:
        # huggingface_hub passes timeout=None to many API calls, which overrides a client default:
        # the limits are filled into each request instead, keeping any finite one it set itself.
        limits = dict(request.extensions.get("timeout") or {})
        for key, default in (("connect", connect), ("read", read), ("write", read), ("pool", read)):
            if limits.get(key) is None:
                limits[key] = default
        request.extensions["timeout"] = limits

    def client_factory() -> Any:
        client = _http.default_client_factory()
        hooks = dict(client.event_hooks)
        hooks["request"] = [*hooks.get("request", []), fill_timeouts]
        client.event_hooks = hooks
        return client

    _http.set_client_factory(client_factory)
    _http_timeouts = timeouts


def _download(spec: str, ref: HubRef, patterns: list[str], token: str | None, exact: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    _configure_http()
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    allow = [prefix + p for p in patterns]
    ignore = None if exact else [prefix + "*/*"]
    offline = _offline()
    try:
        path = snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=allow, ignore_patterns=ignore, token=token,
            cache_dir=_cache_dir(), endpoint=_endpoint(), local_files_only=offline, library_name=LIBRARY_NAME,
            library_version=__version__,
        )
    except Exception as e:  # each client error becomes one line that says what to do
        raise HubError(download_error(spec, ref, e, offline)) from e
    return Path(path)


def download_error(spec: str, ref: HubRef, e: Exception, offline: bool) -> str:
    """One line for a failed download: offline, revision, gated, missing repo, HTTP status or timeout."""
    from huggingface_hub import errors

    where = f"{ref.repo_id}@{ref.revision}" if ref.revision else ref.repo_id
    if isinstance(e, errors.IncompleteSnapshotError) or (offline and isinstance(e, errors.LocalEntryNotFoundError)):
        detail = (str(e).splitlines()[0] if str(e) else type(e).__name__).rstrip(".")
        return (f"{where}: not (completely) in the local cache and HF_HUB_OFFLINE=1 forbids downloading: {detail}. "
                "Download it once online, or unset HF_HUB_OFFLINE")
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{where}: revision {ref.revision!r} not found in {ref.repo_id} (check the branch, tag or commit)"
    if isinstance(e, errors.GatedRepoError):
        return f"{ref.repo_id}: gated repo; accept its terms on the Hub and pass --token or set HF_TOKEN"
    if isinstance(e, errors.RepositoryNotFoundError):
        return (f"{ref.repo_id}: no such repo on the Hub, or it is private (pass --token or set HF_TOKEN); "
                f"'{spec}' is not a local folder either")
    if isinstance(e, errors.HfHubHTTPError):
        return f"{where}: the Hub answered {_status(e)}: {_first_line(e)}"
    if _timed_out(e):
        return f"{where}: {_timed_out(e)}"
    return f"{where}: download failed ({type(e).__name__}: {_first_line(e)})"


def _timed_out(e: BaseException) -> str:
    """The message for a request that got no answer in time (anywhere in the exception's causes), or ""."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if "Timeout" in type(cause).__name__ or "ReadTimeout" in str(cause):
            connect, read = _http_timeouts or (10, 60)
            return (f"the Hub did not answer in time (connect {connect:g} s, read {read:g} s; set "
                    "HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT to wait longer); check the network or HF_ENDPOINT")
        cause = cause.__cause__ or cause.__context__
    return ""


def _status(e: Exception) -> str:
    response = getattr(e, "response", None)
    return str(getattr(response, "status_code", "an error"))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def auto_base(adapter_config: dict[str, Any], adapter_spec: str) -> tuple[str, str | None]:
    """BASE `auto`: the base the adapter records (base_model_name_or_path, revision)."""
    base = adapter_config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InputError(f"{adapter_spec}: the adapter does not record its base model; pass BASE explicitly")
    revision = adapter_config.get("revision") if isinstance(adapter_config.get("revision"), str) else None
    return base, revision


def resolve_merge_inputs(
    base: str, adapter: str, *, base_revision: str | None = None, adapter_revision: str | None = None,
    token: str | None = None, allow_pickle: bool = False, base_shards: bool = True,
) -> tuple[Source, Source, list[str]]:
    """Resolve ADAPTER, then BASE (`auto` = the base the adapter records); warn on a base mismatch.

    `base_shards=False`: a Hub base's shards are not downloaded (a streamed merge fetches them itself).
    """
    adapter_source = resolve_input(adapter, role="adapter", revision=adapter_revision, token=token,
                                   allow_pickle=allow_pickle)
    try:
        config = read_config_file(find_adapter_folder(adapter_source.path))
    except RsloraError:
        config = {}  # load_adapter reports what is wrong with it
    if base == "auto":
        base, recorded_revision = auto_base(config, adapter)
        base_revision = base_revision or recorded_revision
    base_source = resolve_input(base, role="base", revision=base_revision, token=token, shards=base_shards)
    warning = base_mismatch(base_source, config)
    return base_source, adapter_source, [warning] if warning else []


def base_mismatch(base: Source, adapter_config: dict[str, Any]) -> str | None:
    """A warning when BASE is a repo other than the one the adapter records."""
    recorded = adapter_config.get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded or base.repo_id is None:
        return None
    recorded_ref = parse_ref(recorded) if not Path(recorded).exists() else None
    if recorded_ref is not None and recorded_ref.repo_id.lower() != base.repo_id.lower():
        return f"the adapter was trained on {recorded!r} but BASE is {base.repo_id!r}"
    return None


# --- the client for publishing (publish.py) --------------------------------------------------------


def hub_api(token: str | None) -> Any:
    """The huggingface_hub client, with this process's endpoint and timeouts; refused offline."""
    from huggingface_hub import HfApi

    if _offline():
        raise HubError("HF_HUB_OFFLINE=1 is set; pushing needs the network (unset it)")
    _configure_http()
    return HfApi(endpoint=_endpoint(), token=token, library_name=LIBRARY_NAME, library_version=__version__)


def push_error(repo_id: str, e: Exception) -> str:
    """One line for a failed upload: what the Hub said and that a re-run resumes."""
    from huggingface_hub import errors

    e = _http_cause(e)
    status = _status(e)
    if status == "401" or isinstance(e, errors.LocalTokenNotFoundError):
        return f"{repo_id}: not authorized (401): log in with 'hf auth login', set HF_TOKEN or pass --token"
    if status == "403":
        return f"{repo_id}: forbidden (403): the token cannot write to this repo or namespace"
    if isinstance(e, errors.HfHubHTTPError):
        return (f"{repo_id}: the Hub answered {status} during the upload ({_first_line(e)}); "
                "re-run the same push to resume, files already uploaded are skipped")
    if _timed_out(e):
        return f"{repo_id}: {_timed_out(e)}; re-run the same push to resume"
    return f"{repo_id}: upload failed ({type(e).__name__}: {_first_line(e)}); re-run the same push to resume"


def _http_cause(e: Exception) -> Exception:
    """The Hub's HTTP error behind `e` when huggingface_hub wrapped it (an LFS upload's RuntimeError), else `e`."""
    from huggingface_hub import errors

    cause: BaseException | None = e
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, errors.HfHubHTTPError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return e
