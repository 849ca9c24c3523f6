"""Atomic writes: every file and folder laser-export writes appears whole or not at all.

* :func:`write_bytes` / :func:`write_text` / :func:`write_json` — one file: written to a temporary
  sibling (``.NAME.*.part`` in the same folder, so the rename never crosses a file system), flushed and
  fsync'ed, given mode 0644, then ``os.replace``'d over ``path``; on any failure the temporary file is
  removed and ``path`` is left as it was. :func:`open_atomic` is the same for a writer that streams
  (a download);
* whole export folders are replaced by :func:`laser_export.policy.atomic_folder`, which also decides
  what may be written at all (the output policy).

This module imports nothing from the package (it is the bottom of every writer).

Only the append-only search log (:mod:`laser_export.search.results`) writes in place, on purpose: it
is resumable line by line and a torn last line is skipped when read.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

#: mode of every file written here (what the hand-written writers used)
FILE_MODE = 0o644


@contextmanager
def _replacing(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` (same folder, so the rename is atomic). When the block ends without
    an error it is fsynced, given :data:`FILE_MODE` and renamed onto ``path``; in every case no temporary
    is left behind, and on an error (or an interrupt) ``path`` is untouched."""
    path = Path(path)
    # the writer's pid in the name: a killed writer's .part is recognisable debris (baseline_cache cleans it)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{process_tag()}-", suffix=".part")
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


#: a :func:`process_tag` in a name (older writers wrote the pid alone)
TAG = r"\d+(?:t\d+)?"
#: a temporary sibling written by :func:`_replacing`: ``.NAME.PID-RANDOM.part``
_PART = re.compile(rf"^\.(?P<name>.+)\.(?P<pid>{TAG})-[^./]+\.part$")
#: a ``.part`` without a pid (an older writer's) counts as dead once untouched this long
_STALE_PART_S = 3600


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_tag() -> str:
    """This process in a temporary file's name: ``PID`` plus ``tSTART`` (its start time) where known, so a
    later process that got the same pid is not taken for the writer (:func:`tag_alive`)."""
    pid = os.getpid()
    start = _start_ticks(pid)
    return str(pid) if start is None else f"{pid}t{start}"


def tag_alive(tag: str) -> bool:
    """Whether the process a :func:`process_tag` names still runs: its pid is alive and, when the tag holds a
    start time and the system tells it, the process with that pid started then (not a reused pid)."""
    pid, _, start = tag.partition("t")
    if not pid_alive(int(pid)):
        return False
    if not start or int(pid) == os.getpid():
        return True
    now = _start_ticks(int(pid))
    return now is None or now == int(start)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (ours always does; one we may not signal is taken as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_part_debris(folder: str | Path) -> list[Path]:
    """Remove ``.part`` temporaries in ``folder`` left by writers that were killed (their pid is gone; a
    ``.part`` without a pid once untouched for an hour). Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        if not (p.name.startswith(".") and p.name.endswith(".part")) or not p.is_file():
            continue
        m = _PART.match(p.name)
        try:
            dead = (not tag_alive(m["pid"])) if m else time.time() - p.stat().st_mtime > _STALE_PART_S
            if dead:
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed
