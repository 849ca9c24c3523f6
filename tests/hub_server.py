"""A minimal Hugging Face Hub-compatible HTTP server for tests (loopback only).

Implements exactly the endpoints that ``huggingface_hub`` 2.4 (``create_repo``, ``create_commit`` /
``upload_folder``, ``model_info``, ``hf_hub_download``) and ``transformers`` 5 ``from_pretrained`` use
for a model repo:

* ``POST /api/repos/create``                       -> 200 ``{"url": ...}`` or 409 if it exists
* ``POST /api/validate-yaml``                      -> checks the README front matter (model-index parses)
* ``POST /api/models/{repo}/preupload/{rev}``      -> ``uploadMode: "lfs"`` for files of ``lfs_threshold`` bytes or
  more and for ``*.safetensors`` & co (as the real Hub), else ``"regular"`` (inline base64 in the commit)
* ``POST /{repo}.git/info/lfs/objects/batch``      -> the git-LFS batch API (``basic`` transfer: one PUT; files of
  ``multipart_threshold`` bytes or more: the Hub's ``multipart`` transfer, ``chunk_size`` + one PUT URL per part
  and a completion URL). Objects already stored get no ``actions``.
* ``PUT /lfs-upload/{oid}[/part/{n}]``, ``POST /lfs-complete/{oid}`` -> the upload targets: the body is streamed to
  disk (Content-Length or chunked), never held in memory, and an object is stored only when its sha256 and size
  are the announced ones (parts are joined the same way)
* ``POST /api/models/{repo}/commit/{rev}``         -> NDJSON body (header, file, lfsFile, deletedFile, deletedFolder);
  an ``lfsFile`` must name a stored object of that size
* ``GET /api/models/{repo}/xet-write-token/{rev}`` -> 404: this server does not speak Xet (huggingface_hub with
  ``hf_xet`` installed uploads every LFS file through Xet: set ``HF_HUB_DISABLE_XET=1`` to use LFS)
* ``GET  /api/models/{repo}[/revision/{rev}]``     -> model info with ``sha`` and ``siblings``
* ``GET  /api/models/{repo}/tree/{rev}[/{path}]``  -> tree listing
* ``GET|HEAD /{repo}/resolve/{rev}/{path}``        -> file bytes with ``ETag``, ``X-Repo-Commit``,
  ``Content-Length`` (+ ``X-Linked-Etag``/``X-Linked-Size`` for LFS-like files, as the Hub does)

Every request is recorded in ``HubServer.requests`` (method, path) so tests can assert what the client did.
``HubServer.fail_commits = True`` makes the commit endpoint answer HTTP 500 (failure-path tests);
``HubServer.stall_files = {"model.safetensors"}`` makes a download of that file send its headers and then nothing.
Stored files: ``bytes`` (regular) or :class:`LfsObject` (on disk); :meth:`HubServer.file_bytes` reads either.
The current tree of each repo is mirrored on disk under ``storage/{namespace}/{name}/`` for inspection.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
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


@dataclass(frozen=True)
class LfsObject:
    """A file stored through LFS: its sha256 ``oid``, ``size`` and where its bytes are on disk."""

    oid: str
    size: int
    path: Path

    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.oid}\nsize {self.size}\n".encode()


def size_of(blob: "bytes | LfsObject") -> int:
    return blob.size if isinstance(blob, LfsObject) else len(blob)


def read_blob(blob: "bytes | LfsObject") -> bytes:
    return blob.path.read_bytes() if isinstance(blob, LfsObject) else blob


def blob_oid(blob: "bytes | LfsObject") -> str:
    """What preupload/tree report as a file's oid: sha256 for LFS files, the git blob sha1 otherwise."""
    return blob.oid if isinstance(blob, LfsObject) else git_blob_sha1(blob)


@dataclass
class Commit:
    oid: str
    summary: str
    files: dict[str, "bytes | LfsObject"]


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

    def __init__(self, storage: str | Path, *, lfs_threshold: int = 10 << 20, multipart_threshold: int = 64 << 20,
                 multipart_chunk: int = 16 << 20):
        self.storage = Path(storage)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.lfs_dir = self.storage / "_lfs"  # objects by sha256, outside the repos' mirrored trees
        (self.lfs_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.lfs_threshold = lfs_threshold
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk = multipart_chunk
        self.lfs_pending: dict[str, int] = {}  # oid -> size announced in a batch call
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_commits = False
        self.stall_files: set[str] = set()
        self.stopping = threading.Event()
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
        self.stopping.set()
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
            h.update(path.encode() + b"\0" + blob_oid(files[path]).encode())
        commit = Commit(oid=h.hexdigest(), summary=summary, files=files)
        repo.commits.append(commit)
        self._mirror(repo)
        return commit

    def _mirror(self, repo: Repo) -> None:
        folder = self.storage / repo.repo_id
        if folder.exists():
            shutil.rmtree(folder)
        for path, blob in repo.head.files.items():
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(blob, LfsObject):
                try:
                    os.link(blob.path, target)  # no second copy of a multi-GB object
                except OSError:
                    shutil.copyfile(blob.path, target)  # streamed copy
            else:
                target.write_bytes(blob)

    def file_bytes(self, repo_id: str, path: str, rev: str = "main") -> bytes:
        """The content of ``path`` at ``rev`` (regular or LFS)."""
        return read_blob(self.repos[repo_id].at(rev).files[path])

    def lfs_object(self, oid: str) -> Path:
        return self.lfs_dir / oid


@contextlib.contextmanager
def run_hub_server(storage: str | Path) -> Iterator[HubServer]:
    with HubServer(storage) as server:
        yield server


_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
_OID = r"(?P<oid>[0-9a-f]{64})"
_ROUTES = [
    ("POST", re.compile(r"^/(?P<repo>[\w.\-]+/[\w.\-]+?)\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(rf"^/lfs-upload/{_OID}$"), "lfs_put"),
    ("PUT", re.compile(rf"^/lfs-upload/{_OID}/part/(?P<part>\d+)$"), "lfs_put_part"),
    ("POST", re.compile(rf"^/lfs-complete/{_OID}$"), "lfs_complete"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/xet-write-token/(?P<rev>[^/]+)$"), "xet_token"),
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "model_info"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


_STREAMED = {"lfs_put", "lfs_put_part", "lfs_complete"}


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
        if method == "POST" and not path.startswith("/lfs-complete/"):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
        for m, rx, name in _ROUTES:
            match = rx.match(path)
            if m == method and match:
                kwargs = {k: v for k, v in match.groupdict().items()}
                try:
                    if name in _STREAMED:  # large bodies: streamed to disk, not under the state lock
                        getattr(self, "h_" + name)(**kwargs)
                    elif name == "resolve" and method == "GET" and path.rsplit("/", 1)[-1] in self.hub.stall_files:
                        self._stall()
                    else:
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

    def do_PUT(self):
        self._dispatch("PUT")

    def _stall(self) -> None:
        """Headers of a large file, then silence until the server stops (a stalled download)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(1 << 30))
        self.send_header("ETag", '"' + "0" * 64 + '"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.end_headers()
        self.wfile.flush()
        self.hub.stopping.wait()

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body in chunks of at most 1 MiB (Content-Length or chunked transfer encoding)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return
                while size:
                    chunk = self.rfile.read(min(size, 1 << 20))
                    size -= len(chunk)
                    yield chunk
                self.rfile.readline()
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk

    def _store_verified(self, oid: str, chunks: Iterator[bytes]) -> str | None:
        """Stream ``chunks`` to a temporary file; keep it as object ``oid`` only if its sha256 and size
        are the announced ones. Returns an error text, or None."""
        expected = self.hub.lfs_pending.get(oid)
        tmp = self.hub.lfs_dir / "tmp" / f"{oid}.{threading.get_ident()}"
        h, size = hashlib.sha256(), 0
        with open(tmp, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
                f.write(chunk)
        if h.hexdigest() != oid or (expected is not None and size != expected):
            tmp.unlink()
            return f"uploaded content does not match: sha256 {h.hexdigest()} size {size}, expected {oid} size {expected}"
        tmp.replace(self.hub.lfs_object(oid))
        return None

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
            size = int(f.get("size") or 0)
            lfs = size > 0 and (size >= self.hub.lfs_threshold or f["path"].endswith(LFS_SUFFIXES))
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": blob_oid(existing) if existing is not None else None,
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
            elif key == "lfsFile":
                obj = self.hub.lfs_object(value["oid"])
                if value.get("algo", "sha256") != "sha256" or not obj.is_file() or obj.stat().st_size != value.get("size", obj.stat().st_size):
                    self._json(400, {"error": f"lfsFile {value['path']}: object {value['oid']} was never uploaded"})
                    return
                files[value["path"]] = LfsObject(value["oid"], obj.stat().st_size, obj)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
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
        return [{"rfilename": p, "size": size_of(d)} for p, d in sorted(c.files.items())]

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
            entry = {"type": "file", "oid": git_blob_sha1(d.pointer() if isinstance(d, LfsObject) else d),
                     "size": size_of(d), "path": p}
            if isinstance(d, LfsObject):
                entry["lfs"] = {"oid": d.oid, "size": d.size, "pointerSize": len(d.pointer())}
            entries.append(entry)
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
        blob = c.files.get(path)
        if blob is None:
            self._json(404, {"error": f"Entry not found: {path}"}, code="EntryNotFound", head=head)
            return
        size = size_of(blob)
        lfs_like = isinstance(blob, LfsObject) or path.endswith(LFS_SUFFIXES)
        etag = blob.oid if isinstance(blob, LfsObject) else (hashlib.sha256(blob).hexdigest() if lfs_like else git_blob_sha1(blob))
        status, start, end = 200, 0, size - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if m:
            start, status = int(m.group(1)), 206
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", c.oid)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + length - 1}/{size}")
        if lfs_like:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(size))
        self.end_headers()
        if head:
            return
        if not isinstance(blob, LfsObject):
            self.wfile.write(blob[start : start + length])
            return
        with open(blob.path, "rb") as f:  # streamed from disk
            f.seek(start)
            while length > 0:
                chunk = f.read(min(length, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                length -= len(chunk)

    # -- LFS upload protocol ---------------------------------------------------------------------
    def h_lfs_batch(self, body: bytes, head: bool, repo: str) -> None:
        if self._repo_or_404(repo) is None:
            return
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            self._json(422, {"message": "test hub server: upload with the basic/multipart transfer only"})
            return
        objects, base = [], self.hub.endpoint
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub.lfs_object(oid).is_file():
                self.hub.lfs_pending[oid] = size
                if size >= self.hub.multipart_threshold:
                    chunk = self.hub.multipart_chunk
                    header = {"chunk_size": str(chunk)}
                    header.update({str(n): f"{base}/lfs-upload/{oid}/part/{n}" for n in range(1, -(-size // chunk) + 1)})
                    entry["actions"] = {"upload": {"href": f"{base}/lfs-complete/{oid}", "header": header}}
                else:
                    entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{oid}"}}
            objects.append(entry)
        transfer = "multipart" if any("chunk_size" in o.get("actions", {}).get("upload", {}).get("header", {})
                                      for o in objects) else "basic"
        self._json(200, {"transfer": transfer, "objects": objects, "hash_algo": "sha256"})

    def h_lfs_put(self, oid: str) -> None:
        error = self._store_verified(oid, self._body_chunks())
        self._json(400 if error else 200, {"error": error} if error else {})

    def h_lfs_put_part(self, oid: str, part: str) -> None:
        folder = self.hub.lfs_dir / "parts" / oid
        folder.mkdir(parents=True, exist_ok=True)
        h = hashlib.md5()
        with open(folder / f"{int(part):06d}", "wb") as f:
            for chunk in self._body_chunks():
                h.update(chunk)
                f.write(chunk)
        self.send_response(200)
        self.send_header("ETag", f'"{h.hexdigest()}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def h_lfs_complete(self, oid: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length) or b"{}")
        folder = self.hub.lfs_dir / "parts" / oid
        parts = sorted(folder.glob("*")) if folder.is_dir() else []
        numbers = [p["partNumber"] for p in payload.get("parts", [])]
        if payload.get("oid") != oid or numbers != list(range(1, len(parts) + 1)) or not parts:
            self._json(400, {"error": f"completion of {oid}: parts {numbers} do not match the {len(parts)} uploaded"})
            return

        def joined():
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 20):
                        yield chunk

        error = self._store_verified(oid, joined())
        shutil.rmtree(folder)
        self._json(400 if error else 200, {"error": error} if error else {})

    def h_xet_token(self, body: bytes, head: bool, repo: str, rev: str) -> None:
        self._json(404, {"error": "test hub server does not speak Xet: set HF_HUB_DISABLE_XET=1 to upload through LFS"},
                   code="EntryNotFound")
