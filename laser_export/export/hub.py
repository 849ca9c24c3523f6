"""Push an export folder to the Hugging Face Hub as one commit.

The local export is treated as read-only: it is never modified or deleted, whatever happens on the
remote side. Every failure (auth, network, server error, bad metadata) is raised as :class:`PushError`
whose message says the local folder is intact and gives the exact command to retry.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import stat
import warnings
from pathlib import Path

from ..errors import CheckFailed
from ..defaults import HUB_TIMEOUT
from ..net import deadline, redact, xet_in_use

__all__ = ["PushError", "push_folder", "hub_repo_url", "retry_command", "folder_operations", "DEFAULT_TIMEOUT"]

#: seconds allowed for one push (connect, every request, every upload; plus credit for the bytes sent,
#: see laser_export/net.py); ``--hub-timeout``, ``LASER_EXPORT_HUB_TIMEOUT``
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

    `--private` is kept when it was asked for (dropping it could publish a private export). A password
    in the endpoint URL is shown as ``***``.
    """
    parts = ["laser-export", "push", str(folder), "--repo-id", repo_id]
    if private:
        parts.append("--private")
    if endpoint:
        parts += ["--endpoint", redact(endpoint)]
    return shlex.join(parts)


def hub_repo_url(repo_id: str, *, endpoint: str | None = None, revision: str | None = None) -> str:
    """Browser URL of a model repo (optionally a branch/commit tree) on `endpoint` (default: HF_ENDPOINT)."""
    if endpoint is None:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    url = f"{endpoint.rstrip('/')}/{repo_id}"
    if revision:
        url += f"/tree/{revision}"
    return redact(url)


def _ignored(rel: str) -> bool:
    parts = rel.split("/")
    if any(p in _IGNORED_DIRS for p in parts[:-1]) or parts[-1] in _IGNORED_DIRS:
        return True
    if rel.startswith(_IGNORED_PREFIXES) or "/.cache/huggingface/" in "/" + rel:
        return True
    return any(fnmatch.fnmatch(parts[-1], pat) for pat in _IGNORED_FILES)


def _walk(root: Path) -> tuple[list[str], list[str]]:
    """(files to upload, entries refused): symbolic links (never followed: their target could be
    anything on this machine) and anything that is not a regular file or a folder (FIFOs, sockets,
    devices) are refused, never skipped silently."""
    files, refused = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = base / name
            rel = path.relative_to(root).as_posix()
            if _ignored(rel) or (name in dirnames and not path.is_symlink()):
                continue
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                refused.append(f"{rel} (a symbolic link)")
            elif not stat.S_ISREG(mode):
                refused.append(f"{rel} (not a regular file)")
            else:
                files.append(rel)
        dirnames[:] = [d for d in dirnames if not _ignored((base / d).relative_to(root).as_posix())]
    return sorted(files), refused


def folder_operations(folder: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the files that `push_folder` would upload, sorted. A symbolic link or a
    non-regular file anywhere in the folder is an error (ValueError naming it): nothing is pushed."""
    files, refused = _walk(Path(folder))
    if refused:
        raise ValueError(f"refusing to push {', '.join(refused[:5])}{' ...' if len(refused) > 5 else ''}: "
                         "an export folder holds regular files only (copy the target in if it belongs there)")
    return files


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

    ``timeout``: the deadline of each of the push's network steps (create the repo; upload the large
    files through LFS, with credit for the bytes sent; the commit), see :mod:`laser_export.net`
    (None: no limit). Under a deadline large files go through LFS over httpx, bounded (Xet is turned off for
    the push: hf_xet's transfers bypass httpx); ``HF_HUB_DISABLE_XET=0`` asks for Xet anyway, unbounded. A stalled server fails the push with the retry command. Server
    error text in the message has every token the client could send, Authorization headers and URL
    passwords redacted. A symbolic link or non-regular file in the folder refuses the push.
    """
    folder_s = str(folder)
    retry = retry_command(folder_s, repo_id, private=private, endpoint=endpoint)

    def fail(reason: str, cause: BaseException | None = None) -> PushError:
        msg = (
            f"Push of {folder_s!r} to Hub repo {repo_id!r} failed: {redact(reason, token)}\n"
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
    try:
        files = folder_operations(root)
    except ValueError as err:
        raise fail(str(err)) from None
    if not files:
        raise fail(f"{folder_s!r} contains no files to upload")
    try:
        info = _commit(root, files, repo_id, private=private, token=token, endpoint=endpoint, revision=revision,
                       message=commit_message or f"Upload LASER export ({len(files)} files) with laser-export",
                       timeout=timeout, steps=(steps := []))
    except PushError:
        raise
    except Exception as e:  # any auth / network / HTTP / validation failure
        step = steps[-1] if steps else None
        raise fail(_reason(e, step, timeout), e) from e
    return redact(str(info.commit_url or hub_repo_url(repo_id, endpoint=endpoint)))


def _xet_uploads(timeout: float | None) -> bool:
    """Whether the upload step moves the large files through ``hf_xet``: under a deadline only when the user
    asked for it (:func:`laser_export.net.xet_in_use`; a deadline turns Xet off otherwise), without one
    huggingface_hub's own default."""
    import importlib.util

    from huggingface_hub import constants

    if timeout is not None:
        return xet_in_use()
    return not constants.HF_HUB_DISABLE_XET and importlib.util.find_spec("hf_xet") is not None


def _commit(root: Path, files: list[str], repo_id: str, *, private, token, endpoint, revision, message, timeout, steps):
    """create_repo, preupload_lfs_files, create_commit: three network steps, each with its deadline
    (the upload step's grows with the bytes sent; with Xet, asked for explicitly, it is not bounded)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    with deadline(timeout) as op:
        steps.append(op)
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(root / rel)) for rel in files]
    xet = _xet_uploads(timeout)
    if not xet:  # the LFS batch call needs every sha256: hash here (local work) rather than on the clock
        for operation in operations:
            operation.upload_info.sha256  # noqa: B018 - computed and cached by huggingface_hub
    with deadline(None if xet else timeout) as op, warnings.catch_warnings():
        steps.append(op)
        # huggingface_hub's own LFS PUT passes a file as data=: httpx2's deprecation notice is not the user's
        warnings.filterwarnings("ignore", message="Use 'content=", category=DeprecationWarning)
        api.preupload_lfs_files(repo_id, additions=operations, repo_type="model", revision=revision)
    with deadline(timeout) as op:
        steps.append(op)
        return api.create_commit(repo_id=repo_id, repo_type="model", operations=operations,
                                 commit_message=message, revision=revision)


def _reason(e: BaseException, step, timeout: float | None) -> str:
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    if step is not None and step.explain(e):
        return f"no complete answer within the {timeout:g} s Hub timeout (the deadline of each push step; raise it with --hub-timeout): {text}"
    if timeout and ("timeout" in type(e).__name__.lower() or "timed out" in text.lower()):
        text += f" (no answer within the {timeout:g} s Hub timeout; raise it with --hub-timeout)"
    if "offline" in type(e).__name__.lower() or "HF_HUB_OFFLINE" in text:
        text += " (HF_HUB_OFFLINE is set: unset it to push)"
    if "xet" in text.lower() and _xet_uploads(timeout):
        text += (" (large files were uploaded through Xet: hf_xet is installed and HF_HUB_DISABLE_XET=0 asks for "
                 "it; for a Hub-compatible server without Xet, unset it or set HF_HUB_DISABLE_XET=1 to upload them "
                 "through LFS)")
    return text
