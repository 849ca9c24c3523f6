"""Push an export folder to the Hugging Face Hub as one commit.

The local export is treated as read-only: it is never modified or deleted, whatever happens on the
remote side. Every failure (auth, network, server error, bad metadata) is raised as :class:`PushError`
whose message says the local folder is intact and gives the exact command to retry.
"""

from __future__ import annotations

from .. import defaults
from ..defaults import HUB_TIMEOUT
from ..errors import CheckFailed
import fnmatch
import os
import re
import shlex
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["PushError", "push_folder", "hub_repo_url", "retry_command", "folder_operations", "redact",
           "hub_timeout", "DEFAULT_TIMEOUT"]

#: seconds allowed for each Hub request to connect and for each read (``--hub-timeout``,
#: ``LASER_EXPORT_HUB_TIMEOUT``); a server that accepts the connection and never answers fails after it.
DEFAULT_TIMEOUT = HUB_TIMEOUT

# Same exclusions as huggingface_hub's upload_folder (DEFAULT_IGNORE_PATTERNS): never push VCS or
# huggingface_hub's local bookkeeping.
_IGNORED_DIRS = {".git"}
_IGNORED_PREFIXES = (".cache/huggingface/",)
_IGNORED_FILES = (".DS_Store",)


class PushError(CheckFailed):
    label = "push failed:"
    """Pushing an export folder to the Hub failed; the local export is untouched."""

    def __init__(self, message: str, *, folder: str, repo_id: str, retry: str):
        super().__init__(message)
        self.folder = folder
        self.repo_id = repo_id
        self.retry_command = retry


def retry_command(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
                  endpoint: str | None = None) -> str:
    """The CLI command that retries a push: `laser-export push FOLDER --repo-id REPO [--private] [--endpoint URL]`.

    `--private` is kept when it was asked for (dropping it could publish a private export).
    """
    parts = ["laser-export", "push", str(folder), "--repo-id", repo_id]
    if private:
        parts.append("--private")
    if endpoint:
        parts += ["--endpoint", endpoint]
    return shlex.join(parts)


_SECRETS = [
    (re.compile(r"hf_[A-Za-z0-9]{8,}"), "hf_***"),
    (re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(bearer\s+|basic\s+)?[^\s,'\"}]+"), r"\1\2***"),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer ***"),
    (re.compile(r"(?i)((?:access_|api_|hf_)?token[\"']?\s*[:=]\s*[\"']?)[^\s,'\"&}]+"), r"\1***"),
]


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with Hub tokens, Authorization headers and ``token=`` values replaced by ``***``."""
    for secret in (*secrets, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    for pattern, repl in _SECRETS:
        text = pattern.sub(repl, text)
    return text


def timeout_from_env() -> float:
    """``$LASER_EXPORT_HUB_TIMEOUT`` (validated: a bad value is an input error, never a silent default)."""
    return defaults.hub_timeout()


@contextmanager
def hub_timeout(seconds: float | None) -> Iterator[None]:
    """Give every huggingface_hub request a connect/read/write timeout of ``seconds`` (its shared
    HTTP client has none by default, so a stalled server hangs forever); restored afterwards."""
    from huggingface_hub.utils import _http

    if seconds is None:
        yield
        return
    import httpx2

    previous = _http._GLOBAL_CLIENT_FACTORY

    def factory():
        client = previous()
        client.timeout = httpx2.Timeout(seconds)
        return client

    _http.set_client_factory(factory)
    try:
        yield
    finally:
        _http.set_client_factory(previous)


def hub_repo_url(repo_id: str, *, endpoint: str | None = None, revision: str | None = None) -> str:
    """Browser URL of a model repo (optionally a branch/commit tree) on `endpoint` (default: HF_ENDPOINT)."""
    if endpoint is None:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    url = f"{endpoint.rstrip('/')}/{repo_id}"
    if revision:
        url += f"/tree/{revision}"
    return url


def _ignored(rel: str) -> bool:
    parts = rel.split("/")
    if any(p in _IGNORED_DIRS for p in parts[:-1]) or parts[-1] in _IGNORED_DIRS:
        return True
    if rel.startswith(_IGNORED_PREFIXES) or "/.cache/huggingface/" in "/" + rel:
        return True
    return any(fnmatch.fnmatch(parts[-1], pat) for pat in _IGNORED_FILES)


def folder_operations(folder: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the files that `push_folder` would upload, sorted."""
    root = Path(folder)
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            if not _ignored(rel):
                out.append(rel)
    return out


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> str:
    """Create `repo_id` if needed and upload every file of `folder` in ONE commit; return the commit URL.

    `token=None` uses huggingface_hub's standard lookup (``HF_TOKEN``, then the `hf auth login` file).
    `endpoint=None` uses ``HF_ENDPOINT`` / https://huggingface.co.

    Files are committed with ``HfApi.create_commit`` rather than ``upload_folder``: with ``hf_xet``
    installed, ``upload_folder`` switches to a pipelined multi-commit upload, and an export must land
    atomically (weights, manifest and card together). Large files still go through Xet/LFS when the
    server's preupload answer says so; a server that answers "regular" gets them inline.

    ``timeout``: seconds for each request to connect and for each read (None: no limit). A stalled
    server fails the push (after huggingface_hub's retries) with the retry command. Server error
    text in the message has tokens and Authorization headers redacted.
    """
    folder_s = str(folder)
    retry = retry_command(folder_s, repo_id, private=private, endpoint=endpoint)

    def fail(reason: str, cause: BaseException | None = None) -> PushError:
        msg = (
            f"Push of {folder_s!r} to Hub repo {repo_id!r} failed: {reason}\n"
            f"The local export at {folder_s} is intact (nothing was modified or deleted).\n"
            f"Retry with: {retry}"
            + (f"\n(that command pushes to the default branch; this push targeted revision {revision!r})" if revision else "")
        )
        err = PushError(msg, folder=folder_s, repo_id=repo_id, retry=retry)
        if cause is not None:
            err.__cause__ = cause
        return err

    root = Path(folder)
    if not root.is_dir():
        raise fail(f"{folder_s!r} is not a directory")
    files = folder_operations(root)
    if not files:
        raise fail(f"{folder_s!r} contains no files to upload")

    try:
        from huggingface_hub import CommitOperationAdd, HfApi

        with hub_timeout(timeout):
            api = HfApi(endpoint=endpoint, token=token)
            api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
            operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(root / rel)) for rel in files]
            info = api.create_commit(
                repo_id=repo_id,
                repo_type="model",
                operations=operations,
                commit_message=commit_message or f"Upload LASER export ({len(files)} files) with laser-export",
                revision=revision,
            )
    except PushError:
        raise
    except Exception as e:  # any auth / network / HTTP / validation failure
        text = " ".join(str(e).split())
        if timeout and ("timeout" in type(e).__name__.lower() or "timed out" in text.lower()):
            text += f" (no answer within the {timeout:g} s Hub timeout; raise it with --hub-timeout)"
        if "offline" in type(e).__name__.lower() or "HF_HUB_OFFLINE" in text:
            text += " (HF_HUB_OFFLINE is set: unset it to push)"
        raise fail(redact(f"{type(e).__name__}: {text}", token), e) from e
    return str(info.commit_url or hub_repo_url(repo_id, endpoint=endpoint))
