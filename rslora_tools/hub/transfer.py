"""The Hub transfers of a streamed merge (execute/hub_stream.py), one shard at a time.

- `remote_header`: a base shard's safetensors header, read with HTTP range requests (the first
  256 KiB, more only for a longer header), so the merge is planned before any shard is downloaded.
- `ShardFetcher`: a base shard when the merge needs it: from the Hugging Face cache when it is
  there (never deleted), else downloaded into the cache (`keep_cache`) or into the scratch
  folder, whence it is deleted after its last use. The merge reads shards through links in a
  `view` folder that also links the base's configs and tokenizer.
- `Publisher`: the repo, each output shard pre-uploaded as an LFS object as soon as it is
  complete (huggingface_hub's `preupload_lfs_files`; the Hub skips a blob it already stores),
  and one commit at the end with every file, so the repo never shows a half model.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import HubError, RsloraError
from ..formats.safetensors_file import SafetensorsHeader, header_length, parse_header
from .client import LIBRARY_NAME, cache_dir, download_error, endpoint, hub_api, offline, push_error
from .push import PushReport, commit, open_repo
from .refs import HubRef
from .resolve import Source
from .target import PushTarget

HEADER_PROBE = 256 << 10  # bytes of a shard's beginning asked for at first: the length and (almost always) the header


@contextmanager
def hub_bars_hidden() -> Iterator[None]:
    """huggingface_hub draws no progress bars of its own inside (the CLI draws one per phase)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hidden = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not hidden:
            enable_progress_bars()


def _remote_name(source: Source, shard: str) -> str:
    return f"{source.subfolder}/{shard}" if source.subfolder else shard


def _ref(source: Source) -> HubRef:
    assert source.repo_id is not None and source.commit is not None
    return HubRef(source.repo_id, source.commit, source.subfolder)


def remote_header(source: Source, shard: str, view: Path, token: str | None) -> SafetensorsHeader:
    """The header of base shard `shard` in the Hub repo `source` (at its resolved commit), by range requests."""
    where = view / shard
    try:
        data, size = _get_range(source, shard, 0, HEADER_PROBE, token)
        n = header_length(where, bytes(data[:8]), size)
        if len(data) < 8 + n:
            more, _ = _get_range(source, shard, len(data), 8 + n, token)
            data += more
    except RsloraError:
        raise
    except Exception as e:  # one line, as every Hub failure
        raise HubError(shard_error(source, shard, e, False)) from e
    return parse_header(where, data[8 : 8 + n], n, size)


def shard_error(source: Source, shard: str, e: Exception, is_offline: bool) -> str:
    """A failed shard download: a shard the index lists but the repo lacks is named as the plain merge names it;
    anything else is the Hub's line."""
    from huggingface_hub import errors

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.EntryNotFoundError) or status == 404:
        return f"{source.spec}: shard {shard} that the index lists is not in the repo (the Hub answered 404)"
    return download_error(source.spec, _ref(source), e, is_offline)


def _get_range(source: Source, shard: str, start: int, end: int, token: str | None) -> tuple[bytearray, int]:
    """Bytes [start, end) of a file in the repo (fewer at its end) and the file's size.

    A server that ignores the range (200 with the whole file) is read only up to `end`, then the
    connection is dropped: memory holds what was asked for, never the shard.
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    assert source.repo_id is not None
    url = hf_hub_url(source.repo_id, _remote_name(source, shard), revision=source.commit, endpoint=endpoint())
    headers = build_hf_headers(token=token, library_name=LIBRARY_NAME, library_version=__version__)
    headers["Range"] = f"bytes={start}-{end - 1}"
    with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        ranged = response.status_code == 206
        want = end - start if ranged else end
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= want:
                break
        del data[want:]
        if ranged:
            total = re.search(r"/(\d+)$", response.headers.get("Content-Range", ""))
            if total is None:
                raise HubError(f"{source.repo_id}: {shard}: the Hub's range answer has no size")
            return data, int(total.group(1))
        length = response.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HubError(
                f"{source.repo_id}: {shard}: the server ignored the byte range and did not say the file's "
                "size; it cannot be streamed (merge without [[stream=StreamOptions()]])"
            )
        return data[start:end], int(length)  # the server ignored the range: only the beginning was read


def listed_sha256(source: Source, token: str | None) -> dict[str, str]:
    """shard file -> the sha256 the Hub lists for it (LFS files) at the source's commit, for its folder."""
    from huggingface_hub.hf_api import RepoFile

    assert source.repo_id is not None
    try:
        entries = list(
            hub_api(token).list_repo_tree(
                source.repo_id, path_in_repo=source.subfolder or None, revision=source.commit, recursive=False
            )
        )
    except RsloraError:
        raise
    except Exception as e:
        raise HubError(download_error(source.spec, _ref(source), e, False)) from e
    prefix = f"{source.subfolder}/" if source.subfolder else ""
    return {
        f.path.removeprefix(prefix): f.lfs.sha256
        for f in entries
        if isinstance(f, RepoFile) and f.lfs is not None and f.path.endswith(".safetensors")
    }


def cached_shard(source: Source, shard: str) -> Path | None:
    """The shard in the Hugging Face cache at the source's resolved commit, or None."""
    from huggingface_hub import try_to_load_from_cache

    assert source.repo_id is not None
    found = try_to_load_from_cache(
        source.repo_id, _remote_name(source, shard), cache_dir=cache_dir(), revision=source.commit
    )
    return Path(found) if isinstance(found, str) else None


@dataclass
class Fetched:
    """A base shard the merge can read: where it is, and whether this run stores it itself (deleted after use)."""

    path: Path
    downloaded: int  # bytes that came over the network (0: cached, or finished by an earlier run)
    temporary: bool


class ShardFetcher:
    """Base shards of a Hub repo, one at a time, linked into `view` for the merge to read."""

    def __init__(
        self,
        source: Source,
        view: Path,
        scratch: Path,
        *,
        keep_cache: bool,
        token: str | None,
        progress: Callable[[int], None] | None = None,
        listed: dict[str, str] | None = None,
    ):
        self.source, self.view, self.scratch = source, view, scratch
        self.keep_cache, self.token, self.progress = keep_cache, token, progress
        self.listed = listed or {}  # shard -> the sha256 the Hub lists for it at the source's commit
        self.fetched: dict[str, Fetched] = {}
        self.lock = threading.Lock()

    def cached(self, shard: str) -> Path | None:
        return cached_shard(self.source, shard)

    def stored_before(self, shard: str) -> bool:
        """Left in the scratch folder by an earlier run that stopped (complete: its download is not repeated)."""
        return (self.scratch / _remote_name(self.source, shard)).is_file()

    def fetch(self, shard: str) -> Fetched:
        """The shard, checked against the sha256 the Hub lists (a cached blob by its name, a download by hashing)."""
        cached = self.cached(shard)
        if cached is not None:
            fetched = Fetched(cached, 0, False)
            self._check(shard, cached, hashed=False)
        else:
            fetched = self._download(shard)
            self._check(shard, fetched.path, hashed=True)
        link = self.view / shard
        link.unlink(missing_ok=True)
        link.symlink_to(fetched.path.resolve())
        with self.lock:
            self.fetched[shard] = fetched
        return fetched

    def _download(self, shard: str) -> Fetched:
        from huggingface_hub import hf_hub_download

        assert self.source.repo_id is not None
        counted = [0]

        def count(n: int) -> None:
            counted[0] += n
            if self.progress is not None:
                self.progress(n)

        place: dict[str, Any] = {"cache_dir": cache_dir()} if self.keep_cache else {"local_dir": self.scratch}
        try:
            path = hf_hub_download(
                self.source.repo_id,
                _remote_name(self.source, shard),
                revision=self.source.commit,
                token=self.token,
                endpoint=endpoint(),
                library_name=LIBRARY_NAME,
                library_version=__version__,
                tqdm_class=_counting_bar(count),
                **place,
            )
        except Exception as e:
            raise HubError(shard_error(self.source, shard, e, offline())) from e
        return Fetched(Path(path), counted[0], not self.keep_cache)

    def _check(self, shard: str, path: Path, *, hashed: bool) -> None:
        expected = self.listed.get(shard)
        if expected is None:
            return
        real = path.resolve()
        if hashed:
            digest = hashlib.sha256()
            with open(real, "rb") as f:
                while chunk := f.read(8 << 20):
                    digest.update(chunk)
            found = digest.hexdigest()
        elif re.fullmatch(r"[0-9a-f]{64}", real.name):  # a cache blob is named by its sha256
            found = real.name
        else:
            return
        if found != expected:
            if hashed:
                real.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
            raise HubError(
                f"{self.source.spec}: {shard}: the bytes received have sha256 {found[:12]}..., the Hub lists "
                f"{expected[:12]}... for this commit; the shard was deleted and nothing was pushed from it. "
                "Run the command again"
            )

    def release(self, shard: str) -> None:
        """The merge is done with `shard`: unlink it from the view, delete it if this run stored it in scratch."""
        (self.view / shard).unlink(missing_ok=True)
        with self.lock:
            fetched = self.fetched.pop(shard, None)
        if fetched is not None and fetched.temporary:
            fetched.path.unlink(missing_ok=True)
            metadata = (
                self.scratch / ".cache" / "huggingface" / "download" / f"{_remote_name(self.source, shard)}.metadata"
            )
            metadata.unlink(missing_ok=True)


def _counting_bar(count: Callable[[int], None]) -> Any:
    """A tqdm class that draws nothing and passes each update on to `count` (huggingface_hub's tqdm_class)."""
    from tqdm.auto import tqdm

    class Counting(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            count(int(n or 0))
            return None

    return Counting


@dataclass(frozen=True)
class Uploaded:
    """An output shard the Hub stores as an LFS object (not yet in a commit)."""

    path_in_repo: str
    sha256: str
    size: int


class Publisher:
    """One target repo: pre-upload shards as they are finished, then one commit with everything (hub.push.commit)."""

    def __init__(self, target: PushTarget):
        self.target = target
        self.repo_id = target.repo_id
        self.api: Any = None

    def _call(self, what: Callable[[], Any]) -> Any:
        try:
            return what()
        except RsloraError:
            raise
        except Exception as e:  # one line; what is uploaded stays on the Hub for a re-run
            raise HubError(push_error(self.repo_id, e)) from e

    def open(self) -> None:
        """Create the repo when it does not exist (before anything is uploaded)."""
        self.api = open_repo(self.target)

    def stored(self, blobs: list[Uploaded]) -> set[str]:
        """The sha256 of those `blobs` the Hub already stores (the LFS batch API answers them without actions).

        A repo that does not exist (deleted since an earlier run) stores none of them.
        """
        if not blobs:
            return set()
        from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info
        from huggingface_hub.utils import build_hf_headers

        api = self.api or hub_api(self.target.token)
        infos = [UploadInfo(size=b.size, sample=b"", sha256=bytes.fromhex(b.sha256)) for b in blobs]
        headers = build_hf_headers(token=self.target.token, library_name=LIBRARY_NAME, library_version=__version__)
        try:
            actions, _, _ = post_lfs_batch_info(
                infos, self.target.token, "model", self.repo_id, endpoint=api.endpoint, headers=headers
            )
        except Exception as e:
            if _status_of(e) == 404:  # no such repo (any more): nothing is stored
                return set()
            raise HubError(push_error(self.repo_id, e)) from e
        return {a["oid"] for a in actions if not a.get("actions")}

    def upload(self, path: Path, path_in_repo: str) -> tuple[Any, Uploaded, bool]:
        """Pre-upload one finished file; (its commit operation, what was uploaded, whether the Hub had it already).

        The file may be deleted afterwards: an LFS file is on the Hub, a small one is kept in memory
        for the commit (the Hub wants small files inline).
        """
        from huggingface_hub import CommitOperationAdd

        operation = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(path))
        blob = Uploaded(path_in_repo, operation.upload_info.sha256.hex(), operation.upload_info.size)
        had = blob.sha256 in self.stored([blob])
        self._call(
            lambda: self.api.preupload_lfs_files(
                self.repo_id, additions=[operation], create_pr=self.target.create_pr, free_memory=True
            )
        )
        if operation._upload_mode != "lfs":
            operation = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=path.read_bytes())
        return operation, blob, had

    @staticmethod
    def restored(blob: Uploaded) -> Any:
        """The commit operation of a blob an earlier run uploaded (its file is gone: the Hub has the content)."""
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.lfs import UploadInfo

        operation = CommitOperationAdd(path_in_repo=blob.path_in_repo, path_or_fileobj=b"")
        operation.upload_info = UploadInfo(size=blob.size, sample=b"", sha256=bytes.fromhex(blob.sha256))
        operation._upload_mode = "lfs"
        operation._is_uploaded = True
        return operation

    def commit(self, operations: list[Any], folder: Path, card: str | None, sizes: dict[str, int]) -> PushReport:
        """One commit: `operations` (the shards) plus every file of `folder` (and the card); check what arrived."""
        from huggingface_hub import CommitOperationAdd

        small = [
            CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
            for p in sorted(folder.iterdir())
            if p.is_file()
        ]
        expected = {**sizes, **{p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}}
        if card is not None:
            small.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
            expected["README.md"] = len(card.encode("utf-8"))
        message = f"Upload {self.repo_id.split('/')[-1]} with rslora-tools {__version__}"
        report = commit(self.api, self.target, [*operations, *small], expected, message)
        report.folder, report.card_written = str(folder), card is not None
        return report


def _status_of(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None
