"""A loopback stand-in for the Hugging Face Hub HTTP API, for the real huggingface_hub client.

It implements what `snapshot_download`, `create_repo`, `upload_folder` (legacy LFS path, so
run with HF_HUB_DISABLE_XET=1) and `list_repo_tree` use (the Hub's public HTTP API):
repo info, tree, resolve (HEAD/GET), repo create, validate-yaml, preupload, LFS batch /
upload / verify, and the NDJSON commit (added and deleted files, the parent commit checked). Every request is
recorded; faults can be injected
(`fail`: every time, `fail_once`: the next time), and transfers can be throttled (`download_rate`,
`upload_rate`, bytes per second, as a slow network would be). Downloads honour `Range`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    messages: dict[str, str] = field(default_factory=dict)


class FakeHub:
    def __init__(self, token: str = "hf_fake_token"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, dict[str, bytes]] = {}  # repo -> sha256 -> content (as the Hub, LFS storage is per repo)
        self.requests: list[tuple[str, str]] = []
        self.user_agents: list[str] = []
        self.fail: dict[str, int] = {}  # path regex -> HTTP status to answer with
        self.fail_once: dict[str, int] = {}  # the same, removed after it answered once
        self.download_rate: float | None = None  # bytes per second for file downloads (None: as fast as it goes)
        self.upload_rate: float | None = None  # bytes per second for LFS uploads
        self.uploads: list[str] = []  # sha256 of every LFS object received, in order
        self.on_upload = None  # called with the sha256 after each LFS object is stored (a test's hook)
        self._link_lock = threading.Lock()
        self._link_free: dict[str, float] = {}  # direction -> when the link has sent what was queued on it
        self._digests: dict[tuple[int, str], tuple[bytes, str]] = {}
        self.ranged: list[str] = []  # paths of the GET requests that asked for a byte range
        self.ignore_range = False  # answer range requests with the whole file (200), as some servers do
        self.served: dict[str, bytes] = {}  # file path -> other bytes to serve for it (a Hub serving other content)
        self.sent: dict[str, int] = {}  # request path -> bytes of file content sent (a client may stop reading)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- state helpers for tests ------------------------------------------------------------------

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        branch: str = "main",
        message: str = "commit",
        parent: str | None = None,
        deleted: tuple[str, ...] = (),
    ) -> str:
        repo = self.repos.setdefault(repo_id, Repo())
        base = dict(repo.commits.get(parent or repo.branches.get(branch, ""), {}))
        for path in deleted:
            base.pop(path, None)
        base.update(files)
        sha = hashlib.sha1(
            json.dumps(
                [repo_id, branch, message, len(repo.commits), sorted((k, self.sha256(v)) for k, v in base.items())]
            ).encode()
        ).hexdigest()
        repo.commits[sha] = base
        repo.messages[sha] = message
        repo.branches[branch] = sha
        return sha

    def upload_local_folder(self, repo_id: str, folder, branch: str = "main", message: str = "upload") -> str:
        from pathlib import Path

        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
        return self.add_commit(repo_id, files, branch, message)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches.get(revision, revision)]

    def sha256(self, content: bytes) -> str:
        """The sha256 of a stored file, computed once (models of gigabytes are listed and queried often)."""
        return self._digest(content, "sha256", lambda: hashlib.sha256(content).hexdigest())

    def git_oid(self, content: bytes) -> str:
        return self._digest(content, "git", lambda: _git_oid(content))

    def _digest(self, content: bytes, kind: str, compute) -> str:
        key = (id(content), kind)
        known = self._digests.get(key)
        if known is None or known[0] is not content:
            known = self._digests[key] = (content, compute())
        return known[1]

    def lfs_object(self, repo_id: str, oid: str) -> bytes | None:
        """The content of an LFS object the repo stores: uploaded to it, or in one of its commits."""
        if oid in self.lfs.get(repo_id, {}):
            return self.lfs[repo_id][oid]
        for files in self.repos[repo_id].commits.values() if repo_id in self.repos else ():
            for content in files.values():
                if self.sha256(content) == oid:
                    return content
        return None

    def resolve(self, repo_id: str, revision: str) -> tuple[Repo | None, str | None]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None
        if revision in repo.branches:
            return repo, repo.branches[revision]
        if revision in repo.commits:
            return repo, revision
        return repo, None

    def throttle(self, direction: str, nbytes: int) -> None:
        """Sleep as long as sending `nbytes` takes on a link of `download_rate` or `upload_rate` bytes per second,
        shared by every connection (parallel transfers split the bandwidth, as on a real network)."""
        rate = self.download_rate if direction == "down" else self.upload_rate
        if not rate:
            return
        with self._link_lock:
            start = max(time.monotonic(), self._link_free.get(direction, 0.0))
            self._link_free[direction] = end = start + nbytes / rate
        time.sleep(max(0.0, end - time.monotonic()))

    # --- HTTP --------------------------------------------------------------------------------------

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in separate writes: without this, each answer waits for a delayed ACK.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _send(
                self,
                status: int,
                body: bytes | dict | list = b"",
                headers: dict | None = None,
                content_type: str = "application/json",
                head: bool = False,
                throttled: bool = False,
            ) -> None:
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if head:
                    return
                view = memoryview(body)
                try:
                    for start in range(0, len(body), _CHUNK):
                        chunk = view[start : start + _CHUNK]
                        if throttled:
                            hub.throttle("down", len(chunk))
                        self.wfile.write(chunk)
                        if content_type == "application/octet-stream":
                            hub.sent[self.path] = hub.sent.get(self.path, 0) + len(chunk)
                except (BrokenPipeError, ConnectionResetError):  # the client read what it wanted and left
                    self.close_connection = True

            def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
                self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

            def _body(self, throttled: bool = False) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                parts, got = [], 0
                while got < length:
                    part = self.rfile.read(min(_CHUNK, length - got))
                    if not part:
                        break
                    parts.append(part)
                    got += len(part)
                    if throttled:
                        hub.throttle("up", len(part))
                return b"".join(parts)

            def _authorized(self) -> bool:
                return self.headers.get("Authorization") == f"Bearer {hub.token}"

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                path, query = unquote(url.path), parse_qs(url.query)
                hub.requests.append((method, path))
                hub.user_agents.append(self.headers.get("User-Agent", ""))
                upload = method == "PUT" and path.startswith("/lfs-upload/")
                body = self._body(upload) if method in ("POST", "PUT") else b""
                for pattern, status in hub.fail.items():
                    if re.search(pattern, path):
                        return self._error(status, "Injected", f"injected failure {status}")
                for pattern, status in list(hub.fail_once.items()):
                    if re.search(pattern, path):
                        del hub.fail_once[pattern]
                        return self._error(status, "Injected", f"injected failure {status}")
                head = method == "HEAD"
                if method == "POST" and path == "/api/repos/create":
                    return self._create(json.loads(body))
                if method == "POST" and path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
                if m and method == "GET":
                    return self._info(m.group(1), m.group(2))
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+(?:/pr/\d+)?)(?:/(.*))?", path)
                if m and method == "GET":
                    return self._tree(m.group(1), m.group(2), m.group(3) or "")
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
                if m and method == "POST":
                    return self._preupload(m.group(1), json.loads(body))
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
                if m and method == "POST":
                    return self._commit(m.group(1), m.group(2), body, "create_pr" in query)
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path)
                if m and method == "POST":
                    return self._branch(m.group(1), m.group(2))
                m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
                if m and method == "POST":
                    return self._lfs_batch(m.group(1), json.loads(body))
                m = re.fullmatch(r"/lfs-upload/([^/]+/[^/]+)/([0-9a-f]{64})", path)
                if m and method == "PUT":
                    if hashlib.sha256(body).hexdigest() != m.group(2):
                        return self._error(400, "BadOid", "sha256 mismatch")
                    hub.lfs.setdefault(m.group(1), {})[m.group(2)] = body
                    hub._digests[(id(body), "sha256")] = (body, m.group(2))
                    hub.uploads.append(m.group(2))
                    if hub.on_upload is not None:
                        hub.on_upload(m.group(2))
                    return self._send(200, {})
                if re.fullmatch(r"/lfs-verify/([0-9a-f]{64})", path) and method == "POST":
                    return self._send(200, {})
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+(?:/pr/\d+)?)/(.+)", path)
                if m and method in ("GET", "HEAD"):
                    return self._resolve(m.group(1), m.group(2), m.group(3), head)
                return self._error(404, "EntryNotFound", f"no route for {method} {path}", head=head)

            def _create(self, payload: dict) -> None:
                if not self._authorized():
                    return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
                if repo_id in hub.repos:  # the real Hub's 409 body carries the repo url too
                    return self._send(
                        409,
                        {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                        {"X-Error-Code": "RepoExists", "X-Error-Message": "You already created this model repo"},
                    )
                private = payload.get("visibility") == "private" or bool(payload.get("private"))
                hub.repos[repo_id] = Repo(private=private)
                hub.add_commit(
                    repo_id,
                    {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                    message="initial commit",
                )
                self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

            def _repo_or_error(self, repo_id: str, revision: str, head: bool = False):
                repo, sha = hub.resolve(repo_id, revision)
                if repo is None or (repo.private and not self._authorized()):
                    self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.", head=head)
                    return None, None
                if sha is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
                    return None, None
                return repo, sha

            def _info(self, repo_id: str, revision: str) -> None:
                repo, sha = self._repo_or_error(repo_id, revision)
                if repo is None:
                    return
                siblings = [{"rfilename": p} for p in sorted(repo.commits[sha])]
                self._send(
                    200,
                    {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": sha,
                        "private": repo.private,
                        "siblings": siblings,
                        "tags": [],
                        "downloads": 0,
                        "likes": 0,
                    },
                )

            def _tree(self, repo_id: str, revision: str, prefix: str) -> None:
                repo, sha = self._repo_or_error(repo_id, revision)
                if repo is None:
                    return
                entries, folders = [], set()
                for p, content in sorted(repo.commits[sha].items()):
                    if prefix and not p.startswith(prefix.rstrip("/") + "/"):
                        continue
                    parts = p.split("/")
                    for i in range(1, len(parts)):
                        folders.add("/".join(parts[:i]))
                    oid = hub.sha256(content)
                    entries.append(
                        {
                            "type": "file",
                            "path": p,
                            "size": len(content),
                            "oid": hub.git_oid(content),
                            "lfs": {"oid": oid, "size": len(content), "pointerSize": 134},
                        }
                    )
                entries += [
                    {"type": "directory", "path": f, "oid": "0" * 40, "size": 0}
                    for f in sorted(folders)
                    if not prefix or f.startswith(prefix.rstrip("/") + "/")
                ]
                self._send(200, entries)

            def _resolve(self, repo_id: str, revision: str, file: str, head: bool) -> None:
                repo, sha = self._repo_or_error(repo_id, revision, head)
                if repo is None:
                    return
                content = repo.commits[sha].get(file)
                if content is None:
                    return self._error(404, "EntryNotFound", f"{file} does not exist", head=head)
                etag = f'"{hub.sha256(content)}"'
                content = hub.served.get(file, content)
                headers = {
                    "X-Repo-Commit": sha,
                    "ETag": etag,
                    "X-Linked-Etag": etag,
                    "X-Linked-Size": str(len(content)),
                    "Accept-Ranges": "bytes",
                }
                ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if ranged and not head and not hub.ignore_range:
                    hub.ranged.append(self.path)
                    start = int(ranged.group(1))
                    end = min(int(ranged.group(2)) if ranged.group(2) else len(content) - 1, len(content) - 1)
                    if start >= len(content):
                        return self._error(416, "RangeNotSatisfiable", "range not satisfiable")
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                    return self._send(
                        206, content[start : end + 1], headers, content_type="application/octet-stream", throttled=True
                    )
                self._send(200, content, headers, content_type="application/octet-stream", head=head, throttled=True)

            def _branch(self, repo_id: str, branch: str) -> None:
                if not self._authorized():
                    return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository Not Found")
                if branch in repo.branches:
                    return self._error(409, "BranchExists", "Reference already exists")
                repo.branches[branch] = repo.branches["main"]
                self._send(200, {})

            def _preupload(self, repo_id: str, payload: dict) -> None:
                if not self._authorized():
                    return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                files = [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if f["size"] > 0 else "regular",
                        "shouldIgnore": False,
                        "oid": None,
                    }
                    for f in payload["files"]
                ]
                self._send(200, {"files": files})

            def _lfs_batch(self, repo_id: str, payload: dict) -> None:
                if not self._authorized():
                    return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                objects = []
                for obj in payload["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"]}
                    if hub.lfs_object(repo_id, obj["oid"]) is None:
                        entry["actions"] = {
                            "upload": {"href": f"{hub.url}/lfs-upload/{repo_id}/{obj['oid']}"},
                            "verify": {"href": f"{hub.url}/lfs-verify/{obj['oid']}"},
                        }
                    objects.append(entry)
                self._send(200, {"objects": objects}, content_type="application/vnd.git-lfs+json")

            def _commit(self, repo_id: str, revision: str, body: bytes, create_pr: bool) -> None:
                if not self._authorized():
                    return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository Not Found")
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                files: dict[str, bytes] = {}
                deleted: list[str] = []
                for line in lines:
                    v = line["value"]
                    if line["key"] == "deletedFile":
                        deleted.append(v["path"])
                    elif line["key"] == "file":
                        files[v["path"]] = base64.b64decode(v["content"])
                    elif line["key"] == "lfsFile":
                        content = hub.lfs_object(repo_id, v["oid"])
                        if content is None:
                            return self._error(422, "MissingLfs", f"LFS object {v['oid']} was never uploaded")
                        files[v["path"]] = content
                parent = repo.branches.get(revision, revision)
                if header.get("parentCommit") and header["parentCommit"] != parent:  # the branch moved meanwhile
                    return self._error(
                        412, "PreconditionFailed", "A commit has happened since. Please refresh and try again."
                    )
                branch = revision
                pr_url = None
                if create_pr:
                    branch = f"refs/pr/{sum(b.startswith('refs/pr/') for b in repo.branches) + 1}"
                    pr_url = f"{hub.url}/{repo_id}/discussions/{branch.rsplit('/', 1)[1]}"
                elif revision not in repo.branches:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                sha = hub.add_commit(repo_id, files, branch, header["summary"], parent=parent, deleted=tuple(deleted))
                self._send(
                    200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url}
                )

            def do_GET(self) -> None:
                self._route("GET")

            def do_HEAD(self) -> None:
                self._route("HEAD")

            def do_POST(self) -> None:
                self._route("POST")

            def do_PUT(self) -> None:
                self._route("PUT")

        return Handler


_CHUNK = 1 << 20  # bytes sent or received between two throttle checks


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def use_fake_hub(monkeypatch, server: FakeHub, hf_home) -> None:
    """Point the real huggingface_hub client at `server`: its endpoint and token, a fresh cache, online, no Xet."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_TOKEN", server.token)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
