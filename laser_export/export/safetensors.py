"""Atomic safetensors export: write into a temporary sibling folder, check it, then rename.

The folder holds the transformers checkpoint (sharded above ``max_shard_size``), the tokenizer,
``recipe.yaml`` (the recipe as run) and ``manifest.json`` (what changed, per matrix). A failure at
any step removes the temporary folder and leaves an existing export untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


@contextmanager
def atomic_folder(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success rename it to ``out_dir``."""
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, backup / "old")
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
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


def check_checkpoint(folder: Path, model: nn.Module) -> None:
    """Every parameter of ``model`` is in the files with the same shape; nothing extra is stored."""
    stored = checkpoint_tensors(folder)
    if not stored:
        raise ExportError(f"{folder}: no safetensors files were written")
    problems = []
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name not in stored:
            problems.append(f"missing {name}")
        elif list(p.shape) != stored[name]["shape"]:
            problems.append(f"{name}: shape {stored[name]['shape']} on disk, {list(p.shape)} in the model")
    state = model.state_dict()
    problems += [f"unexpected tensor {k}" for k in stored if k not in state]
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

    Fills ``manifest["checkpoint"]`` (tensor bytes and file list) and returns the manifest."""
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
