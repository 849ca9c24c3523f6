"""Atomic safetensors export: write into a temporary sibling folder, check it, then rename
(:func:`laser_export.atomic.atomic_folder`, re-exported here), and the in-memory checkpoint writer.

:func:`write_checkpoint` saves a model held in memory (``save_pretrained``); a streamed export writes its
shards with :mod:`laser_export.export.shards`; both end with :func:`finish_checkpoint` (loading code,
read-back). The whole folder (recipe, manifest, card, formats) is assembled by
:mod:`laser_export.export.writer`. A failure at any step removes the temporary folder and leaves an
existing export untouched.
"""

from __future__ import annotations

from ..errors import CheckFailed
import json
from pathlib import Path
from typing import Iterable

from torch import nn

from ..atomic import (  # noqa: F401 - re-exported: the folder-level atomic writes used to live here
    OutputError,
    atomic_folder,
    check_parent_writable,
    clean_debris,
    find_debris,
    write_json,
    write_text,
)
from ..artifacts import CheckpointInfo
from ..hf import mark_factorised

MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"


class ExportError(CheckFailed):
    pass


def read_safetensors_header(path: str | Path) -> dict:
    """Tensor name → {dtype, shape, data_offsets} of a safetensors file (``__metadata__`` left out);
    :func:`laser_export.export.readback.read_header` parses it (ExportError for a file that is not one)."""
    from .readback import read_header

    return read_header(Path(path))[0]


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
    check_parent_writable(out, shown)
    return out


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


def finish_checkpoint(folder: Path, model: nn.Module, ranks: dict[str, int],
                      expected: dict[str, list[int]] | None = None) -> tuple[CheckpointInfo, dict | None]:
    """The last steps of every checkpoint, in memory or streamed: ship the loading code of a factorised one
    (``auto_map`` + ``modeling_laser.py``: ``trust_remote_code=True`` works without laser-export), then read the
    files back (:func:`laser_export.export.readback.read_back`). Returns (checkpoint record, auto_map)."""
    from .readback import read_back

    auto_map = None
    if ranks:
        from .remote_code import write_remote_code

        auto_map = write_remote_code(folder, model)
    return read_back(folder, expected), auto_map


def write_checkpoint(model: nn.Module, tokenizer, folder: Path, *, max_shard_size: str = "2GB") -> dict:
    """Save an in-memory model (weights, config, generation config, tokenizer, loading code of a factorised
    model) into ``folder`` (already created) and read it back. Returns ``{"checkpoint", "auto_map"}``, the
    manifest's records of it."""
    ranks = mark_factorised(model)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    check_checkpoint(folder, model)
    checkpoint, auto_map = finish_checkpoint(folder, model, ranks)
    return {"checkpoint": checkpoint.model_dump(), "auto_map": auto_map}
