"""The Hugging Face Hub client as this process uses it: settings, timeouts, and one line for each failure.

HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE are read when a command runs; every
request gets a connect and a read timeout; requests identify themselves as rslora-tools/<version>.
The token is never printed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import HubError
from .refs import HubRef

LIBRARY_NAME = "rslora-tools"  # requests identify themselves as rslora-tools/<version>


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def cache_dir() -> str | None:
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


def configure_http() -> None:
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


def download_error(spec: str, ref: HubRef, e: Exception, offline: bool) -> str:
    """One line for a failed download: offline, unreachable, revision, gated, missing repo, HTTP status or timeout.

    huggingface_hub's own advice is for Python callers ("pass local_files_only=False"); these lines say what to
    do in the words of this tool (environment variables, flags), once.
    """
    from huggingface_hub import errors

    where = f"{ref.repo_id}@{ref.revision}" if ref.revision else ref.repo_id
    partly = isinstance(e, errors.IncompleteSnapshotError)
    if partly or (offline and isinstance(e, errors.LocalEntryNotFoundError)):
        missing = re.search(r"are missing \((.*)\)\. (?:The Hub|Outgoing)", str(e)) if partly else None
        cached = (
            f"not completely in the local cache (missing: {missing.group(1) if missing else '?'})"
            if partly
            else "not in the local cache"
        )
        if not offline:
            return (
                f"{where}: {cached}, and the Hub at {endpoint() or 'https://huggingface.co'} cannot be reached "
                f"({_root_cause(e)}); check the network or HF_ENDPOINT"
            )
        return (
            f"{where}: {cached}, and HF_HUB_OFFLINE=1 forbids downloading; run once online (HF_HUB_OFFLINE=0) "
            f"to download it{_not_local(spec) if not partly else ''}"
        )
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{where}: revision {ref.revision!r} not found in {ref.repo_id} (check the branch, tag or commit)"
    if isinstance(e, errors.GatedRepoError):
        return f"{ref.repo_id}: gated repo; accept its terms on the Hub and pass [[token]] or set HF_TOKEN"
    if isinstance(e, errors.RepositoryNotFoundError):
        return (
            f"{ref.repo_id}: no such repo on the Hub, or it is private (pass [[token]] or set HF_TOKEN)"
            f"{_not_local(spec)}"
        )
    if isinstance(e, errors.HfHubHTTPError):
        return f"{where}: the Hub answered {_status(e)}: {_first_line(e)}"
    if _timed_out(e):
        return f"{where}: {_timed_out(e)}"
    if isinstance(e, errors.LocalEntryNotFoundError):  # online, but no answer and nothing cached
        return (
            f"{where}: the Hub at {endpoint() or 'https://huggingface.co'} cannot be reached ({_root_cause(e)}) "
            f"and the repo is not in the local cache; check the network or HF_ENDPOINT{_not_local(spec)}"
        )
    return f"{where}: download failed ({type(e).__name__}: {_first_line(e)})"


def _not_local(spec: str) -> str:
    return "" if spec.startswith("hf://") else f" ({spec!r} is not a local folder either)"


def _root_cause(e: BaseException) -> str:
    """The innermost cause's first line ("[Errno -2] Name or service not known")."""
    seen: set[int] = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.removeprefix("Got: ")


def _timed_out(e: BaseException) -> str:
    """The message for a request that got no answer in time (anywhere in the exception's causes), or ""."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if "Timeout" in type(cause).__name__ or "ReadTimeout" in str(cause):
            connect, read = _http_timeouts or (10, 60)
            return (
                f"the Hub did not answer in time (connect {connect:g} s, read {read:g} s; set "
                "HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT to wait longer); check the network or HF_ENDPOINT"
            )
        cause = cause.__cause__ or cause.__context__
    return ""


def _status(e: Exception) -> str:
    response = getattr(e, "response", None)
    return str(getattr(response, "status_code", "an error"))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def hub_api(token: str | None) -> Any:
    """The huggingface_hub client, with this process's endpoint and timeouts; refused offline."""
    from huggingface_hub import HfApi

    if offline():
        raise HubError("HF_HUB_OFFLINE=1 is set; pushing needs the network (unset it)")
    configure_http()
    return HfApi(endpoint=endpoint(), token=token, library_name=LIBRARY_NAME, library_version=__version__)


def push_error(repo_id: str, e: Exception) -> str:
    """One line for a failed upload: what the Hub said and that a re-run resumes."""
    from huggingface_hub import errors

    e = _http_cause(e)
    status = _status(e)
    if status == "401" or isinstance(e, errors.LocalTokenNotFoundError):
        return f"{repo_id}: not authorized (401): log in with 'hf auth login', set HF_TOKEN or pass [[token]]"
    if status == "403":
        return f"{repo_id}: forbidden (403): the token cannot write to this repo or namespace"
    if isinstance(e, errors.HfHubHTTPError):
        return (
            f"{repo_id}: the Hub answered {status} during the upload ({_first_line(e)}); "
            "re-run the same push to resume, files already uploaded are skipped"
        )
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
