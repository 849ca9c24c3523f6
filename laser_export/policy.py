"""The output policy: which paths laser-export may write, append to or replace. Every writer asks here.

* :func:`check_output` — an export folder (``--out``): never the working directory, home or a parent
  of them, never a folder holding the model source, the data or the recipe, or inside one of them, never a non-empty folder
  that is not a laser-export export, an existing export only with ``--overwrite``;
* :func:`check_file_output` — one file we write (``--report``, search ``--out``/``--results``, sweep
  files): never a folder, a FIFO or device, a protected input (the model source or anything inside it,
  the benchmark data, the recipe, a template), the working directory or home themselves;
  :func:`check_search_log` — the append-only search log appends only to its own format;
* :func:`protected_inputs` — the local inputs of a recipe (known from the recipe alone, before any
  heavy import), :func:`protected` — the same from a plan;
* :func:`atomic_folder` — a whole export folder built in a temporary sibling and renamed into place
  (an existing export is moved aside first and removed only once the new one is in place);
  :func:`find_debris` / :func:`clean_debris` deal with what a killed run left next to it.

Single files are written by :mod:`laser_export.atomic` (which imports nothing from the package). This
module imports nothing heavy: the CLI answers bad output paths before torch loads.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .atomic import TAG, process_tag, tag_alive
from .errors import InputError

MANIFEST = "manifest.json"
#: longest file name most file systems take (bytes, UTF-8)
NAME_MAX = 255
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST,
                errno.ENAMETOOLONG, errno.EFBIG}


class OutputError(InputError):
    """A path laser-export would write cannot be used (would replace something that is not ours, not
    writable, a protected input, ...). Raised before any weights load and again where the write happens."""


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it."""
    return path == folder or folder in path.parents


def _resolve(path: str | Path, shown: str) -> Path:
    """``path`` made absolute with symlinks resolved; a symlink loop or an over-long name is an OutputError."""
    p = Path(path).expanduser()
    for part in p.parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise OutputError(f"{shown}: a name in the path is longer than {NAME_MAX} bytes")
    try:
        return p.resolve(strict=False)
    except (RuntimeError, OSError) as err:  # RuntimeError: symlink loop (Python < 3.13)
        raise OutputError(f"{shown}: cannot be resolved ({getattr(err, 'strerror', None) or err})") from None


def _shown(flag: str, given: str | Path, resolved: Path) -> str:
    return f"{flag} {given}" + ("" if str(resolved) == str(given) else f" ({resolved})")


def is_export(folder: str | Path) -> bool:
    """True when ``folder`` holds a laser-export manifest (the only kind of folder --overwrite replaces).
    A manifest that is not a regular file (a FIFO), is huge or nested too deeply is not ours."""
    path = Path(folder) / MANIFEST
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 * 2**20:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "laser_export_version" in data


def check_parent_writable(path: Path, shown: str) -> None:
    """The nearest existing folder above ``path`` is a folder this process may write in, else
    :class:`OutputError` starting with ``shown`` (the option and the path as the user gave it)."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{shown}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: cannot write in {parent} (permission denied or read-only)")


def _check_not_protected(target: Path, shown: str, protect: Iterable[str | Path], folder: bool) -> None:
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if _inside(cwd, target):
        raise OutputError(f"{shown}: is the working directory or a parent of it; never replaced, choose a new "
                          f"{'folder' if folder else 'file'}")
    if _inside(home, target):
        raise OutputError(f"{shown}: is the home folder or a parent of it; never replaced, choose a new "
                          f"{'folder' if folder else 'file'}")
    for p in protect:
        held = _resolve(p, str(p))
        if folder and _inside(held, target):
            raise OutputError(f"{shown}: holds the model source or data ({held}); never replaced, choose a new folder")
        if folder and _inside(target, held):
            raise OutputError(f"{shown}: is inside an input of this run ({held}: the model source or data); never "
                              "written, choose a folder elsewhere")
        if not folder and _inside(target, held):
            where = "is" if target == held else "is inside"
            raise OutputError(f"{shown}: {where} an input of this run ({held}: the model source, data, recipe or "
                              "template); never written, choose another path")


def check_output(
    out_dir: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = (), flag: str = "--out"
) -> Path:
    """Check that an export may be written to ``out_dir``; return its resolved path. No side effects.

    Refused: the working directory or any parent of it, the home folder or any parent of it, a folder
    that holds, is or is inside one of ``protect`` (the model source, the data), a file, a non-empty folder that
    is not a laser-export export, an existing export without ``overwrite``, a parent that cannot be
    written. Raises :class:`OutputError` naming ``flag`` and the folder.
    """
    out = _resolve(out_dir, f"{flag} {out_dir}")
    shown = _shown(flag, out_dir, out)
    _check_not_protected(out, shown, protect, folder=True)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"{shown}: exists and is not a folder")
        try:
            nonempty = any(out.iterdir())
        except OSError as err:
            raise OutputError(f"{shown}: cannot be read: {err.strerror}") from None
        if nonempty:
            if not is_export(out):
                raise OutputError(
                    f"{shown}: exists, is not empty and is not a laser-export export "
                    f"({'its ' + MANIFEST + ' is not ours' if (out / MANIFEST).exists() else 'no ' + MANIFEST}); "
                    "it is never replaced, choose a new folder"
                )
            if not overwrite:
                raise OutputError(f"{shown}: already holds an export; pass --overwrite to replace it")
    check_parent_writable(out, shown)
    return out


def check_file_output(path: str | Path, flag: str, *, protect: Iterable[str | Path] = (),
                      inside: Iterable[tuple[str, str | Path]] = ()) -> Path:
    """Check that one file may be written (replaced atomically) at ``path``; return its resolved path.

    Refused: a folder, a FIFO/device/socket, one of ``protect`` or a file inside a protected folder,
    the working directory or home themselves, a name over 255 bytes, an unwritable parent, a path
    inside a folder another output of the same command replaces (``inside``: (flag, folder) pairs,
    e.g. the export folder for ``--report``). Raises :class:`OutputError` naming ``flag``."""
    target = _resolve(path, f"{flag} {path}")
    shown = _shown(flag, path, target)
    if target.is_dir():
        raise OutputError(f"{shown}: is a folder; give a file path such as {Path(path) / 'report.json'}")
    if str(path).endswith(("/", os.sep)):  # `dir/` names a folder: never a file called `dir`
        raise OutputError(f"{shown}: ends with '/', a folder; give a file path such as {Path(path) / 'report.json'}")
    if target.exists() and not target.is_file():
        raise OutputError(f"{shown}: exists and is not a regular file (a FIFO, device or socket); never written")
    _check_not_protected(target, shown, protect, folder=False)
    for other_flag, folder in inside:
        held = _resolve(folder, f"{other_flag} {folder}")
        if _inside(target, held):
            raise OutputError(f"{shown}: is inside {other_flag} {folder}, which the export replaces; "
                              "write it elsewhere")
    check_parent_writable(target, shown)
    return target


#: the first key of every line laser-export's search log writes
_LOG_LINE = re.compile(rb'^\{"run": "[0-9a-f]{16}", "id": ')


def check_search_log(path: str | Path, flag: str = "--results", **kw) -> Path:
    """The append-only search log may be appended to at ``path``: a new file, or one whose lines are all
    laser-export search-log lines (a torn last line aside). Anything else is refused, never appended to."""
    target = check_file_output(path, flag, **kw)
    if target.is_file() and target.stat().st_size:
        with target.open("rb") as fh:
            lines = fh.read(1 << 16).splitlines()
        if len(lines) > 1 or target.stat().st_size < 1 << 16:
            lines = lines[:-1] or lines  # the last line may be torn by a killed write
        if not all(_LOG_LINE.match(line) for line in lines if line.strip()):
            raise OutputError(f"{_shown(flag, path, target)}: exists and is not a laser-export search log; "
                              "it is never appended to, choose another file")
    return target


def _local(value: str | Path | None) -> Path | None:
    """The local path a recipe field names, or None (Hub ids, URLs, ``package:`` files, missing paths)."""
    if not value or str(value).startswith(("http://", "https://", "package:")):
        return None
    path = Path(str(value)).expanduser()
    return path if path.exists() or path.is_symlink() else None


def protected_inputs(recipe=None, *files: str | Path | None) -> list[Path]:
    """Local paths no output may write into: the model source (a folder or file), the benchmark data
    and the recipe/template files given. Needs the parsed recipe only, no weights or heavy imports."""
    held = [Path(f).expanduser() for f in files if f]
    if recipe is not None:
        for value in (recipe.model.source, recipe.benchmark.path if recipe.benchmark else None,
                      recipe.perplexity.path if getattr(recipe, "perplexity", None) else None):
            path = _local(value)
            if path is not None:
                held.append(path)
    return held


def protected(p, recipe_file: str | Path | None = None) -> list[Path]:
    """:func:`protected_inputs` of a plan, with the resolved model source (a Hub snapshot stays the Hub's)."""
    held = protected_inputs(p.recipe, recipe_file)
    if p.source.kind != "hub":
        held.append(Path(p.source.location))
    return held


def report_path(recipe_name: str, report: Path | None) -> tuple[Path, str]:
    """Where a verify report goes and the flag that named it."""
    if report is not None:
        return Path(report), "--report"
    return Path("reports") / f"{recipe_name}.verify.json", "report path"


def check_report_path(path: Path, flag: str, protect: Iterable[str | Path] = (),
                      out: Path | None = None) -> Path:
    """The report can be written at ``path``: :func:`check_file_output`, and not inside ``out`` (the export
    folder the same run replaces)."""
    check_file_output(path, flag, protect=protect, inside=[("--out", out)] if out is not None else [])
    return Path(path)


# -- folders -------------------------------------------------------------------------------------------

_DEBRIS = re.compile(rf"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>{TAG})-[^/]*$")


def find_debris(out_dir: str | Path, *, alive: bool = False) -> list[tuple[Path, str]]:
    """Leftovers of killed runs next to ``out_dir``: (path, 'tmp' | 'old') whose process is gone (the pid
    and the start time in the name, so a reused pid is not taken for the writer); ``alive``: those of runs
    that still run instead."""
    out = _resolve(out_dir, f"--out {out_dir}")
    if not out.parent.is_dir():
        return []
    found = []
    for p in sorted(out.parent.iterdir()):
        m = _DEBRIS.match(p.name)
        if m and m["name"] == out.name and p.is_dir() and tag_alive(m["pid"]) == alive:
            found.append((p, m["kind"]))
    return found


def clean_debris(out_dir: str | Path, *, dry_run: bool = False) -> list[str]:
    """Clean what a killed run left next to ``out_dir``; return one message per thing done.

    A ``.OUT.tmp-*`` folder (an export that was never completed) is removed. A ``.OUT.old-*/old``
    folder is the previous export moved aside for a replace: when ``OUT`` is missing (the kill came
    between the two renames) it is moved back, so the old export is complete again; otherwise the
    new export is in place and the backup is removed. ``dry_run`` only reports.
    """
    out = _resolve(out_dir, f"--out {out_dir}")
    done = [f"the previous export {out} is at {path} (moved aside by a run that still runs, pid "
            f"{_DEBRIS.match(path.name)['pid'].partition('t')[0]}); left as it is"
            for path, kind in find_debris(out, alive=True) if kind == "old" and not out.exists()]
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


def _swap_in(tmp: Path, out: Path, out_dir: str | Path) -> None:
    """Rename ``tmp`` to ``out``; an existing export is moved aside first and removed once ``tmp`` is in."""
    if out.is_dir() and any(out.iterdir()):
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{process_tag()}-", dir=out.parent))
        os.replace(out, backup / "old")
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(backup / "old", out)
            shutil.rmtree(backup, ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
        return
    try:
        os.replace(tmp, out)  # a non-empty folder that appeared just now makes this fail (ENOTEMPTY)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise OutputError(f"--out {out_dir}: appeared during the run; it was not replaced") from None
        raise


@contextmanager
def atomic_folder(
    out_dir: str | Path, overwrite: bool = False, protect: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success rename it to ``out_dir``.

    :func:`check_output` runs before and again right before the rename, so a folder that appeared at
    ``out_dir`` during the run is never replaced (an empty folder is). Any failure removes the
    temporary folder; an existing export stays untouched. Disk full / read-only / permission problems
    (also a safetensors writer's own error about them) become :class:`OutputError`."""
    out = check_output(out_dir, overwrite=overwrite, protect=protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{process_tag()}-", dir=out.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        check_output(out_dir, overwrite=overwrite, protect=protect)
        _swap_in(tmp, out, out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in WRITE_ERRNOS:
            raise OutputError(f"--out {out_dir}: cannot write the export: {err.strerror}; nothing was exported") from None
        raise
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(err):
            raise OutputError(f"--out {out_dir}: cannot write the export: No space left on device; "
                              "nothing was exported") from None
        raise


def _is_disk_full(err: BaseException) -> bool:
    """A writer's own error for a full disk (safetensors' ``SafetensorError: ... No space left``)."""
    text = str(err)
    return type(err).__name__ == "SafetensorError" and ("No space left" in text or "os error 28" in text)


def _normal_permissions(folder: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; give the export the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def precheck(recipe_file: str | Path, *, out: str | Path | None = None, overwrite: bool = False,
             report: Path | None = None, verifying: bool = True) -> None:
    """The output paths of ``run``/``apply`` (``out`` not None; ``""``: the default ``out/<name>``) and
    ``verify``, checked from the recipe alone, before torch or the model load. The library checks them
    again once the source is resolved; this answers bad input in a fraction of a second."""
    from .recipe import load_recipe

    recipe, _ = load_recipe(recipe_file)
    protect = protected_inputs(recipe, recipe_file)
    out_dir = None
    if out is not None:
        out_dir = Path(out) if out else Path("out") / recipe.name
        if not find_debris(out_dir):  # debris may restore an export at out_dir first: the library decides then
            check_output(out_dir, overwrite=overwrite, protect=protect)
    if verifying and recipe.claims is not None:
        path, flag = report_path(recipe.name, report)
        check_report_path(path, flag, protect, out=out_dir)
