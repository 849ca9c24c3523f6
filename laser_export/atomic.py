"""Atomic writes: every file and folder laser-export writes appears whole or not at all.

* :func:`write_bytes` / :func:`write_text` / :func:`write_json` — one file: written to a temporary
  sibling (``.NAME.*.part`` in the same folder, so the rename never crosses a file system), flushed and
  fsync'ed, given mode 0644, then ``os.replace``'d over ``path``; on any failure the temporary file is
  removed and ``path`` is left as it was. :func:`open_atomic` is the same for a writer that streams
  (a download);
* :func:`atomic_folder` — a whole export folder, built in a temporary sibling and renamed into place
  (an existing export is moved aside first and removed only once the new one is in place);
  :func:`find_debris` / :func:`clean_debris` deal with what a killed run left next to it.

Only the append-only search log (:mod:`laser_export.search.results`) writes in place, on purpose: it
is resumable line by line and a torn last line is skipped when read.
"""

from __future__ import annotations

from .errors import InputError
import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

#: mode of every file written here (what the hand-written writers used)
FILE_MODE = 0o644


class OutputError(InputError):
    """The ``--out`` folder cannot be used (would replace something that is not ours, not writable, ...).

    Raised before any weights load (:func:`laser_export.export.safetensors.check_output`) and again at
    the final rename."""


@contextmanager
def _replacing(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` (same folder, so the rename is atomic). When the block ends without
    an error it is fsynced, given :data:`FILE_MODE` and renamed onto ``path``; in every case no temporary
    is left behind, and on an error (or an interrupt) ``path`` is untouched."""
    path = Path(path)
    # the writer's pid in the name: a killed writer's .part is recognisable debris (baseline_cache cleans it)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def open_atomic(path: str | Path, mode: str = "w", *, encoding: str | None = None) -> Iterator[IO]:
    """A file object (``mode`` ``"w"`` or ``"wb"``) whose content replaces ``path`` when the block ends
    without an error; on an error (or an interrupt) the temporary file is removed and ``path`` is
    untouched. The parent folder must exist."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic: mode 'w' or 'wb', got {mode!r}")
    with _replacing(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            f = os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None)
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns ``path``."""
    with open_atomic(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | Path, data: Any, *, indent: int | None = 2, sort_keys: bool = False,
               default: Callable | None = None, newline: bool = True) -> Path:
    """Write ``data`` as JSON (``json.dumps`` with ``indent``/``sort_keys``/``default``, then a newline
    unless ``newline=False``) to ``path`` atomically; returns ``path``."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=default) + ("\n" if newline else ""))


def write_via(path: str | Path, write: Callable[[Path], None]) -> Path:
    """For writers that take a path (``safetensors.torch.save_file``): ``write(tmp)`` to a temporary file in
    the same folder, then fsync, and ``os.replace`` onto ``path``; on an error the temporary is removed and
    ``path`` is untouched. Returns ``path``."""
    with _replacing(path) as tmp:
        write(tmp)
    return Path(path)


def check_parent_writable(path: Path, shown: str) -> None:
    """The nearest existing folder above ``path`` is a folder this process may write in, else
    :class:`OutputError` starting with ``shown`` (the option and the path as the user gave it)."""
    parent = Path(path).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{shown}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: cannot write in {parent} (permission denied or read-only)")


# -- folders -------------------------------------------------------------------------------------------

_DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*$")
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_debris(out_dir: str | Path) -> list[tuple[Path, str]]:
    """Leftovers of killed runs next to ``out_dir``: (path, 'tmp' | 'old') whose process is gone."""
    out = Path(out_dir).expanduser().resolve()
    if not out.parent.is_dir():
        return []
    found = []
    for p in sorted(out.parent.iterdir()):
        m = _DEBRIS.match(p.name)
        if m and m["name"] == out.name and p.is_dir() and not _pid_alive(int(m["pid"])):
            found.append((p, m["kind"]))
    return found


def clean_debris(out_dir: str | Path, *, dry_run: bool = False) -> list[str]:
    """Clean what a killed run left next to ``out_dir``; return one message per thing done.

    A ``.OUT.tmp-*`` folder (an export that was never completed) is removed. A ``.OUT.old-*/old``
    folder is the previous export moved aside for a replace: when ``OUT`` is missing (the kill came
    between the two renames) it is moved back, so the old export is complete again; otherwise the
    new export is in place and the backup is removed. ``dry_run`` only reports.
    """
    out = Path(out_dir).expanduser().resolve()
    done = []
    for path, kind in find_debris(out):
        if kind == "old" and (path / "old").is_dir() and not out.exists():
            done.append(f"{'would restore' if dry_run else 'restored'} the previous export {out} from {path.name} "
                        "(a run was killed while replacing it)")
            if not dry_run:
                os.replace(path / "old", out)
                shutil.rmtree(path, ignore_errors=True)
            continue
        what = "an incomplete export" if kind == "tmp" else "the backup of a replaced export"
        done.append(f"{'would remove' if dry_run else 'removed'} {path} ({what} left by a killed run)")
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
    return done


@contextmanager
def atomic_folder(
    out_dir: str | Path, overwrite: bool = False, protect: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success rename it to ``out_dir``.

    :func:`~laser_export.export.safetensors.check_output` (which folders an export may replace) runs
    before and again right before the rename, so a folder that appeared at ``out_dir`` during the run
    is never replaced (an empty folder is). An existing export (with ``overwrite``) is first moved
    aside and removed only once the new one is in place. Any failure removes the temporary folder; an
    existing export stays untouched. Disk full / read-only / permission problems become
    :class:`OutputError`."""
    from .export.safetensors import check_output

    out = check_output(out_dir, overwrite=overwrite, protect=protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        check_output(out_dir, overwrite=overwrite, protect=protect)
        if out.is_dir() and any(out.iterdir()):
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, backup / "old")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(backup / "old", out)
                shutil.rmtree(backup, ignore_errors=True)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out)  # a non-empty folder that appeared just now makes this fail (ENOTEMPTY)
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise OutputError(f"--out {out_dir}: appeared during the run; it was not replaced") from None
                raise
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in WRITE_ERRNOS:
            raise OutputError(f"--out {out_dir}: cannot write the export: {err.strerror}; nothing was exported") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _normal_permissions(folder: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; give the export the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
