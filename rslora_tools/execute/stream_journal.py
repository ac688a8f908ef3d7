"""The journal of a streamed merge: the output shards uploaded so far (not yet committed), kept in the scratch
folder under a key of the inputs and options, so that a re-run of the same command skips them.

A shard the journal does not know is merged again (the Hub's pre-upload step skips its blob if it
has it); a journal of other inputs or options is ignored; one that cannot be read names itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from .._version import __version__
from ..errors import InputError
from ..hub.resolve import Source
from ..hub.transfer import Uploaded
from .merge_job import PreparedMerge
from .options import MergeOptions

JOURNAL_NAME = "rslora-tools-stream.json"


def journal_key(prepared: PreparedMerge, options: MergeOptions, base: Source) -> str:
    """What makes the shards of two runs equal: tool version, target, inputs (commits, or files' sizes and times),
    options and the output layout."""
    folders = [a.path for a in prepared.adapter.sources] + ([base.path] if base.repo_id is None else [])
    record = {
        "version": __version__,
        "repo": options.push.repo_id if options.push else None,
        "create_pr": options.push.create_pr if options.push else None,
        "sources": prepared.sources,
        "base": base.to_dict(),
        "inputs": [_listing(Path(f)) for f in folders] + ([options.initial] if options.initial else []),
        "options": [
            options.dtype,
            options.max_shard_size,
            options.device,
            str(options.trained_on),
            options.base_is_residual,
            options.allow_nonfinite,
            options.keep_quantization,
        ],
        "weights": list(prepared.adapter.weights),
        "shards": [
            (name, [(t.name, t.dtype, list(t.shape)) for t in tensors]) for name, tensors in prepared.plan.shards
        ],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    out = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else [folder]:
        if path.is_file():
            info = path.stat()
            out.append((path.name, info.st_size, info.st_mtime_ns))
    return out


class Journal:
    """The shards uploaded so far (not yet committed), in the scratch folder, for a re-run to skip.

    A journal of other inputs or options (another key) is ignored; one that cannot be read is an
    error that names it and says how to start over (`forget`: --no-resume).
    """

    def __init__(self, scratch: Path, key: str, *, forget: bool = False):
        self.path, self.key = scratch / JOURNAL_NAME, key
        self.entries: dict[str, Uploaded] = {}
        if forget or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("key") != key:
                return
            entries = [_journal_entry(e) for e in data["uploaded"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(
                f"{self.path}: the journal of an earlier [[stream=StreamOptions()]] run cannot be read ({_why(e)}); "
                f"pass "
                "[[StreamOptions(no_resume=True)]] to start over, or delete it"
            ) from None
        self.entries = {e.path_in_repo: e for e in entries}

    def add(self, blob: Uploaded) -> None:
        self.entries[blob.path_in_repo] = blob
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(
            json.dumps({"key": self.key, "uploaded": [asdict(b) for b in self.entries.values()]}, indent=1),
            encoding="utf-8",
        )
        os.replace(tmp, self.path)


def _journal_entry(entry: object) -> Uploaded:
    """One uploaded blob as the journal records it, checked (a bad value raises ValueError)."""
    if not isinstance(entry, dict):
        raise ValueError("an entry is not an object")
    name, sha256, size = entry["path_in_repo"], entry["sha256"], entry["size"]
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        raise ValueError(f"path_in_repo {name!r} is not a shard name")
    if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"sha256 {sha256!r} of {name} is not 64 hex digits")
    if type(size) is not int or size < 0:
        raise ValueError(f"size {size!r} of {name} is not a byte count")
    return Uploaded(name, sha256, size)


def _why(e: Exception) -> str:
    return f"missing {e}" if isinstance(e, KeyError) else str(e) or type(e).__name__
