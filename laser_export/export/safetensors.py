"""Atomic safetensors export: write into a temporary sibling folder, check it, then rename.

The folder holds the transformers checkpoint (sharded above ``max_shard_size``), the tokenizer,
``recipe.yaml`` (the recipe as run) and ``manifest.json`` (what changed, per matrix). A failure at
any step removes the temporary folder and leaves an existing export untouched.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from torch import nn

from ..hf import mark_factorised

MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"


class ExportError(RuntimeError):
    pass


def read_safetensors_header(path: str | Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def checkpoint_tensors(folder: str | Path) -> dict[str, dict]:
    """name → {dtype, shape, bytes} for every tensor stored in the folder's safetensors files."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, info in read_safetensors_header(file).items():
            start, end = info["data_offsets"]
            out[name] = {"dtype": info["dtype"], "shape": info["shape"], "bytes": end - start, "file": file.name}
    return out


def checkpoint_tensor_bytes(folder: str | Path) -> int:
    return sum(t["bytes"] for t in checkpoint_tensors(folder).values())


class OutputError(ValueError):
    """The ``--out`` folder cannot be used (would replace something that is not ours, not writable, ...).

    Raised before any weights load (:func:`check_output`) and again at the final rename."""


_DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*$")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


def is_export(folder: str | Path) -> bool:
    """True when ``folder`` holds a laser-export manifest (the only kind of folder --overwrite replaces)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "laser_export_version" in data


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it."""
    return path == folder or folder in path.parents


def check_output(
    out_dir: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = (), flag: str = "--out"
) -> Path:
    """Check that an export may be written to ``out_dir``; return its resolved path. No side effects.

    Refused: the working directory or any parent of it, the home folder or any parent of it, a folder
    that holds (or is) one of ``protect`` (the model source, the data), a file, a non-empty folder that
    is not a laser-export export, an existing export without ``overwrite``, a parent that cannot be
    written. Raises :class:`OutputError` naming ``flag`` and the folder.
    """
    out = Path(out_dir).expanduser().resolve()
    shown = f"{flag} {out_dir}" + ("" if str(out) == str(out_dir) else f" ({out})")
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if _inside(cwd, out):
        raise OutputError(f"{shown}: is the working directory or a parent of it; never replaced, choose a new folder")
    if _inside(home, out):
        raise OutputError(f"{shown}: is the home folder or a parent of it; never replaced, choose a new folder")
    for p in protect:
        held = Path(p).expanduser().resolve()
        if _inside(held, out):
            raise OutputError(f"{shown}: holds the model source or data ({held}); never replaced, choose a new folder")
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
                    f"{shown}: exists, is not empty and is not a laser-export export (no {MANIFEST}); "
                    "it is never replaced, choose a new folder"
                )
            if not overwrite:
                raise OutputError(f"{shown}: already holds an export; pass --overwrite to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{shown}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: cannot write in {parent} (permission denied or read-only)")
    return out


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

    :func:`check_output` runs before and again right before the rename, so a folder that appeared
    at ``out_dir`` during the run is never replaced (an empty folder is). An existing export (with
    ``overwrite``) is first moved aside and removed only once the new one is in place. Any failure
    removes the temporary folder; an existing export stays untouched. Disk full / read-only /
    permission problems become :class:`OutputError`."""
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
        if err.errno in _WRITE_ERRNOS:
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


def _saved_names(model: nn.Module, state: dict) -> dict[str, str]:
    """Module name -> tensor name in the files. transformers 5 saves some models under their legacy
    key names (Gemma-3's ``model.language_model.*`` is written as ``language_model.model.*``)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: names are saved as they are
        return {k: k for k in state}
    out = {}
    for k, t in state.items():
        renamed = revert_weight_conversion(model, {k: t})
        out[k] = next(iter(renamed)) if len(renamed) == 1 else k
    return out


def check_checkpoint(folder: Path, model: nn.Module) -> None:
    """Every parameter of ``model`` is in the files with the same shape; nothing extra is stored."""
    stored = checkpoint_tensors(folder)
    if not stored:
        raise ExportError(f"{folder}: no safetensors files were written")
    problems = []
    params = dict(model.named_parameters())
    state = model.state_dict()
    saved = _saved_names(model, state)
    for name, p in params.items():
        on_disk = saved.get(name, name)
        if on_disk not in stored:
            problems.append(f"missing {name}")
        elif list(p.shape) != stored[on_disk]["shape"]:
            problems.append(f"{name}: shape {stored[on_disk]['shape']} on disk, {list(p.shape)} in the model")
    expected = set(saved.values())
    problems += [f"unexpected tensor {k}" for k in stored if k not in expected]
    if problems:
        raise ExportError("exported checkpoint does not match the model: " + "; ".join(problems[:10]))


def write_checkpoint(
    model: nn.Module,
    tokenizer,
    folder: Path,
    *,
    recipe_yaml: str,
    manifest: dict,
    max_shard_size: str = "2GB",
) -> dict:
    """Write model, tokenizer, recipe and manifest into ``folder`` (already created) and check them.

    Fills ``manifest["checkpoint"]`` (tensor bytes and file list) and returns the manifest. The
    manifest always carries ``laser_export_version``: that is how a folder is recognised as an
    export that ``--overwrite`` may replace."""
    from .. import __version__

    manifest.setdefault("laser_export_version", __version__)
    ranks = mark_factorised(model)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if ranks:  # factorised: ship the loading code (trust_remote_code=True works without laser-export)
        from .remote_code import write_remote_code

        manifest["auto_map"] = write_remote_code(folder, model)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    check_checkpoint(folder, model)
    manifest["checkpoint"] = {
        "tensor_bytes": checkpoint_tensor_bytes(folder),
        "files": sorted(p.name for p in folder.glob("*.safetensors")),
    }
    (folder / RECIPE).write_text(recipe_yaml)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
