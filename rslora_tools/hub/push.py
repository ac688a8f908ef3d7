"""Publishing to the Hub, the one path of `push`, every `--push-to-hub` and `merge --stream`.

What a push does to a repo (docs/reliability.md, "What a push does to a repo"):
- It never goes into an input's own repo (the base's, an adapter's, TUNED's, INIT's) where loaders
  would read it: only as a pull request (`create_pr`) or on a branch other than main and the
  input's own revision.
- What it uploads is complete: the folder's regular files, none of them a link out of the folder,
  hidden files excepted, and every shard an index names among them.
- Its one commit makes the repo's weight and adapter files exactly the new ones: top-level
  `*.safetensors`, index files, `adapter_config.json`, `adapter_model.*`, `*.bin`, `*.pt`, `*.pth`,
  `*.gguf` and `rslora_tools.json` that the push does not bring are deleted in the same commit
  (made on the commit they were listed from), and the report names them.
- After the commit, the repo holds every pushed file with its size, and none of the deleted ones.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import HubError, InputError, RsloraError
from ..formats.checkpoint import checked_file, read_json_file
from ..formats.provenance import read_provenance
from ..reporting import Report
from .card import model_card
from .client import hub_api, push_error
from .target import PushTarget

# Top-level files a push replaces as a whole: a stale one left beside the new files would be loaded instead of
# them (model.safetensors beside a new index) or on top of them (adapter_config.json beside merged weights).
STALE_PATTERNS = (
    "*.safetensors",
    "*.index.json",
    "adapter_config.json",
    "adapter_model.*",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.gguf",
    "rslora_tools.json",
)


@dataclass
class PushReport(Report):
    repo_id: str
    folder: str
    commit: str
    commit_url: str
    pr_url: str | None
    files: int
    card_written: bool
    private: bool | None = None
    revision: str | None = None
    verified: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # stale weight/adapter files deleted in the same commit


def push(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
) -> PushReport:
    """Create the repo if needed and upload FOLDER (with a model card when it has none) in one commit.

    Args:
        folder: a merged model or converted adapter folder; it is never modified.
        repo_id: the Hub repo, `org/name`.
        private: create the repo private (an existing repo keeps its visibility).
        revision: commit to this branch (created if needed) instead of main.
        commit_message: the commit message.
        create_pr: open a pull request instead of committing.
        token: the Hugging Face token (default: HF_TOKEN or the stored login); never printed.

    Returns:
        A `PushReport`: the commit, its URL (and the PR's), the files checked in the repo, and the stale
        weight and adapter files the commit deleted (see the module docstring for the rules).
    """
    target = PushTarget(repo_id, private, revision, create_pr, commit_message, token)
    return push_folder(Path(folder), target)


@dataclass
class PushPreview(Report):
    """What a push of FOLDER would upload (`push --dry-run`): made offline, without asking the Hub anything."""

    repo_id: str
    folder: str
    files: dict[str, int]  # path in the repo -> size in bytes, the model card included
    card: str | None  # the model card that would be generated (None: FOLDER has its own README.md)
    dry_run: bool = True


def preview_push(
    folder: str | os.PathLike[str], repo_id: str, *, revision: str | None = None, create_pr: bool = False
) -> PushPreview:
    """The files and the model card a push would upload, checked as a push checks them; no network.

    The stale files a push deletes are known only from the repo, so they are not in the preview.
    """
    target = PushTarget(repo_id, False, revision, create_pr, None, None)
    files = files_to_push(Path(folder))
    target.refuse_inputs(read_provenance(Path(folder)))
    card = None if "README.md" in files else model_card(Path(folder), repo_id)
    sizes = {name: path.stat().st_size for name, path in files.items()}
    if card is not None:
        sizes["README.md"] = len(card.encode("utf-8"))
    return PushPreview(repo_id, str(folder), dict(sorted(sizes.items())), card)


def push_folder(folder: Path, target: PushTarget) -> PushReport:
    """`push` with its options in a `PushTarget`."""
    from huggingface_hub import CommitOperationAdd

    files = files_to_push(folder)
    target.refuse_inputs(read_provenance(folder))
    card = None if "README.md" in files else model_card(folder, target.repo_id)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    sizes = {name: path.stat().st_size for name, path in files.items()}
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        sizes["README.md"] = len(card.encode("utf-8"))
    api = open_repo(target)
    report = commit(api, target, operations, sizes, f"Upload {folder.name} with rslora-tools {__version__}")
    report.folder, report.card_written = str(folder), card is not None
    return report


def files_to_push(folder: Path) -> dict[str, Path]:
    """FOLDER's files by their path in the repo: regular files, hidden ones skipped, links out of it refused,
    and every shard an index names among them."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        files[rel.as_posix()] = checked_file(folder, path)
    if not files:
        raise InputError(f"{folder}: is empty; nothing to push")
    for name in [n for n in files if n.endswith(".index.json")]:
        index = read_json_file(files[name])
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        prefix = name.rpartition("/")[0]
        for shard in sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []:
            in_repo = f"{prefix}/{shard}" if prefix else str(shard)
            if in_repo not in files:
                why = "a hidden file, which a push skips" if str(shard).startswith(".") else "not in the folder"
                raise InputError(
                    f"{folder / name}: names shard {shard!r}, which is {why}; the pushed model would be incomplete"
                )
    return files


def open_repo(target: PushTarget) -> Any:
    """The client, with the repo created when it does not exist (and the branch, for a push to one)."""
    api = hub_api(target.token)
    _call(target, lambda: api.create_repo(target.repo_id, private=target.private or None, exist_ok=True))
    if target.revision and target.revision != "main" and not target.create_pr:
        _call(target, lambda: api.create_branch(target.repo_id, branch=target.revision, exist_ok=True))
    return api


def commit(api: Any, target: PushTarget, operations: list[Any], sizes: dict[str, int], message: str) -> PushReport:
    """One commit of `operations` (adding the files in `sizes`), deleting the stale files; then check the repo."""
    from huggingface_hub import CommitOperationDelete

    head = _call(target, lambda: api.repo_info(target.repo_id, revision=target.branch).sha)
    before = _call(target, lambda: list_files(api, target.repo_id, head, recursive=False))
    removed = stale_files(before, sizes)
    deletions = [CommitOperationDelete(path_in_repo=name) for name in removed]
    info = _call(
        target,
        lambda: api.create_commit(
            target.repo_id,
            operations=[*operations, *deletions],
            commit_message=target.commit_message or message,
            revision=target.revision,
            create_pr=target.create_pr,
            parent_commit=head,
        ),
    )
    after = _call(target, lambda: list_files(api, target.repo_id, info.oid, recursive=True))
    check_arrived(target.repo_id, sizes, after, removed)
    return PushReport(
        target.repo_id,
        "",
        info.oid,
        str(info.commit_url),
        info.pr_url,
        len(sizes),
        False,
        target.private,
        target.revision,
        sorted(sizes),
        removed,
    )


def stale_files(remote: dict[str, int], pushed: dict[str, int]) -> list[str]:
    """The repo's top-level weight and adapter files (STALE_PATTERNS) that this push does not bring."""
    return sorted(
        name
        for name in remote
        if "/" not in name
        and name not in pushed
        and any(fnmatch.fnmatchcase(name, pattern) for pattern in STALE_PATTERNS)
    )


def list_files(api: Any, repo_id: str, revision: str, *, recursive: bool) -> dict[str, int]:
    from huggingface_hub.hf_api import RepoFile

    return {
        f.path: f.size
        for f in api.list_repo_tree(repo_id, revision=revision, recursive=recursive)
        if isinstance(f, RepoFile)
    }


def check_arrived(repo_id: str, expected: dict[str, int], remote: dict[str, int], removed: Sequence[str] = ()) -> None:
    """Every pushed file is in the repo with its size, and no file the commit deleted is; else HubError."""
    missing = sorted(p for p, size in expected.items() if remote.get(p) != size)
    if missing:
        raise HubError(
            f"{repo_id}: the upload finished but {len(missing)} of its files are missing or differ in the repo "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); run the same push again to resume"
        )
    left = sorted(p for p in removed if p in remote)
    if left:
        raise HubError(
            f"{repo_id}: the commit should have deleted {', '.join(left[:5])}, but the repo still holds "
            "it; run the same push again"
        )


def _call(target: PushTarget, what: Any) -> Any:
    try:
        return what()
    except RsloraError:
        raise
    except Exception as e:  # one line; nothing local was changed, and what is uploaded stays for a re-run
        raise HubError(push_error(target.repo_id, e)) from e
