"""A minimal Hugging Face Hub-compatible HTTP server for tests (loopback only).

Implements exactly the endpoints that ``huggingface_hub`` 2.4 (``create_repo``, ``create_commit`` /
``upload_folder``, ``model_info``, ``hf_hub_download``) and ``transformers`` 5 ``from_pretrained`` use
for a model repo:

* ``POST /api/repos/create``                       -> 200 ``{"url": ...}`` or 409 if it exists
* ``POST /api/validate-yaml``                      -> checks the README front matter (model-index parses)
* ``POST /api/models/{repo}/preupload/{rev}``      -> every file ``uploadMode: "regular"`` (inline base64 in the
  commit), so neither the LFS batch API nor Xet is needed, whatever ``hf_xet`` does client-side
* ``POST /api/models/{repo}/commit/{rev}``         -> NDJSON body (header, file, deletedFile, deletedFolder);
  ``lfsFile`` lines are refused (400) since preupload never asks for LFS
* ``GET  /api/models/{repo}[/revision/{rev}]``     -> model info with ``sha`` and ``siblings``
* ``GET  /api/models/{repo}/tree/{rev}[/{path}]``  -> tree listing
* ``GET|HEAD /{repo}/resolve/{rev}/{path}``        -> file bytes with ``ETag``, ``X-Repo-Commit``,
  ``Content-Length`` (+ ``X-Linked-Etag``/``X-Linked-Size`` for LFS-like files, as the Hub does)

Every request is recorded in ``HubServer.requests`` (method, path) so tests can assert what the client did.
``HubServer.fail_commits = True`` makes the commit endpoint answer HTTP 500 (failure-path tests).
The current tree of each repo is mirrored on disk under ``storage/{namespace}/{name}/`` for inspection.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".gguf", ".pt", ".pth", ".h5", ".msgpack")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.onnx filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, rev: str) -> Commit | None:
        if rev in ("main", "refs/heads/main"):
            return self.head
        for c in self.commits:
            if c.oid == rev:
                return c
        return None


class HubServer:
    """State + lifecycle of the test Hub. Use as a context manager."""

    def __init__(self, storage: str | Path):
        self.storage = Path(storage)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_commits = False
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state helpers ---------------------------------------------------------------------------
    def new_commit(self, repo: Repo, summary: str, files: dict[str, bytes]) -> Commit:
        parent = repo.commits[-1].oid if repo.commits else ""
        h = hashlib.sha1(f"{parent}\n{summary}\n{time.time_ns()}".encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        commit = Commit(oid=h.hexdigest(), summary=summary, files=files)
        repo.commits.append(commit)
        self._mirror(repo)
        return commit

    def _mirror(self, repo: Repo) -> None:
        folder = self.storage / repo.repo_id
        if folder.exists():
            shutil.rmtree(folder)
        for path, data in repo.head.files.items():
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


@contextlib.contextmanager
def run_hub_server(storage: str | Path) -> Iterator[HubServer]:
    with HubServer(storage) as server:
        yield server


_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "model_info"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer  # set by HubServer.start
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # -- plumbing --------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub.lock:
            self.hub.requests.append((method, path))
        body = b""
        if method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
        for m, rx, name in _ROUTES:
            match = rx.match(path)
            if m == method and match:
                kwargs = {k: v for k, v in match.groupdict().items()}
                try:
                    with self.hub.lock:
                        getattr(self, "h_" + name)(body=body, head=(method == "HEAD"), **kwargs)
                except Exception as e:  # surface server bugs to the client as 500s
                    self._json(500, {"error": f"test hub server error: {type(e).__name__}: {e}"})
                return
        self._json(404, {"error": f"Not implemented by test hub server: {method} {path}"}, code="EntryNotFound")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _json(self, status: int, payload, *, code: str | None = None, head: bool = False) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", payload.get("error", code) if isinstance(payload, dict) else code)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _repo_or_404(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._json(404, {"error": "Repository not found"}, code="RepoNotFound", head=head)
        return repo

    def _commit_or_404(self, repo: Repo, rev: str, head: bool = False) -> Commit | None:
        commit = repo.at(unquote(rev))
        if commit is None:
            self._json(404, {"error": f"Invalid rev id: {rev}"}, code="RevisionNotFound", head=head)
        return commit

    # -- endpoints -------------------------------------------------------------------------------
    def h_create_repo(self, body: bytes, head: bool) -> None:
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            self._json(400, {"error": "test hub server only hosts model repos"})
            return
        name, org = payload["name"], payload.get("organization") or "user"
        repo_id = f"{org}/{name}"
        url = f"{self.hub.endpoint}/{repo_id}"
        if repo_id in self.hub.repos:
            self._json(409, {"error": "You already created this model repo", "url": url})
            return
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id=repo_id, private=private)
        self.hub.repos[repo_id] = repo
        self.hub.new_commit(repo, "initial commit", {".gitattributes": GITATTRIBUTES})
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def h_validate_yaml(self, body: bytes, head: bool) -> None:
        from huggingface_hub.repocard import RepoCard
        from huggingface_hub.repocard_data import model_index_to_eval_results

        content = json.loads(body)["content"]
        errors = []
        try:
            meta = RepoCard(content).data.to_dict()
            if "model-index" in meta:
                model_index_to_eval_results(meta["model-index"])
        except Exception as e:
            errors.append({"message": f"{type(e).__name__}: {e}"})
        if errors:
            self._json(400, {"errors": errors, "warnings": []})
        else:
            self._json(200, {"errors": [], "warnings": []})

    def h_preupload(self, body: bytes, head: bool, repo: str, rev: str) -> None:
        r = self._repo_or_404(repo)
        if r is None:
            return
        c = self._commit_or_404(r, rev)
        if c is None:
            return
        files = []
        for f in json.loads(body)["files"]:
            existing = c.files.get(f["path"])
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "regular",  # everything inline: no LFS batch API, no Xet
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing) if existing is not None else None,
                }
            )
        self._json(200, {"files": files, "commitOid": c.oid})

    def h_commit(self, body: bytes, head: bool, repo: str, rev: str) -> None:
        if self.hub.fail_commits:
            self._json(500, {"error": "Internal Error - commit refused by test server (fail_commits=True)"})
            return
        r = self._repo_or_404(repo)
        if r is None:
            return
        if unquote(rev) not in ("main", "refs/heads/main"):
            self._json(400, {"error": "test hub server only commits to main"})
            return
        files = dict(r.head.files)
        summary = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != r.head.oid:
                    self._json(412, {"error": "A commit has happened since. Please refresh and try again."})
                    return
            elif key == "file":
                if value.get("encoding") != "base64":
                    self._json(400, {"error": f"unsupported encoding {value.get('encoding')!r}"})
                    return
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:  # lfsFile / unknown: preupload never asks for LFS
                self._json(400, {"error": f"test hub server does not support {key!r} operations"})
                return
        commit = self.hub.new_commit(r, summary, files)
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.endpoint}/{r.repo_id}/commit/{commit.oid}",
                "pullRequestUrl": None,
            },
        )

    def _sibling_entries(self, c: Commit) -> list[dict]:
        return [{"rfilename": p, "size": len(d)} for p, d in sorted(c.files.items())]

    def h_model_info(self, body: bytes, head: bool, repo: str, rev: str | None = None) -> None:
        r = self._repo_or_404(repo)
        if r is None:
            return
        c = self._commit_or_404(r, rev or "main")
        if c is None:
            return
        owner, _ = r.repo_id.split("/")
        self._json(
            200,
            {
                "_id": r.repo_id,
                "id": r.repo_id,
                "modelId": r.repo_id,
                "author": owner,
                "sha": c.oid,
                "private": r.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": self._sibling_entries(c),
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
            },
        )

    def h_tree(self, body: bytes, head: bool, repo: str, rev: str, path: str | None = None) -> None:
        r = self._repo_or_404(repo)
        if r is None:
            return
        c = self._commit_or_404(r, rev)
        if c is None:
            return
        prefix = (path or "").strip("/")
        entries, dirs = [], set()
        for p, d in sorted(c.files.items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rest = p[len(prefix) + 1 :] if prefix else p
            if "/" in rest:
                dirs.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            entries.append({"type": "file", "oid": git_blob_sha1(d), "size": len(d), "path": p})
        if prefix and not entries and not dirs:
            self._json(404, {"error": f"Entry not found: {prefix}"}, code="EntryNotFound")
            return
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
        self._json(200, entries)

    def h_resolve(self, body: bytes, head: bool, repo: str, rev: str, path: str) -> None:
        r = self._repo_or_404(repo, head=head)
        if r is None:
            return
        c = self._commit_or_404(r, rev, head=head)
        if c is None:
            return
        data = c.files.get(path)
        if data is None:
            self._json(404, {"error": f"Entry not found: {path}"}, code="EntryNotFound", head=head)
            return
        lfs_like = path.endswith(LFS_SUFFIXES)
        etag = hashlib.sha256(data).hexdigest() if lfs_like else git_blob_sha1(data)
        status, payload = 200, data
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            payload, status = data[start : end + 1], 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", c.oid)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(payload) - 1}/{len(data)}")
        if lfs_like:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(payload)
