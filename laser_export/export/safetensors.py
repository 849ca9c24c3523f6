"""Atomic safetensors export: write into a temporary sibling folder, check it, then rename
(:func:`laser_export.policy.atomic_folder`).

The folder holds the transformers checkpoint (sharded above ``max_shard_size``), the tokenizer,
``recipe.yaml`` (the recipe as run) and ``manifest.json`` (what changed, per matrix). A failure at
any step removes the temporary folder and leaves an existing export untouched.
"""

from __future__ import annotations

import math

from ..errors import CheckFailed
import json
import struct
from pathlib import Path

from torch import nn

from ..atomic import write_json, write_text
from ..hf import mark_factorised
from ..policy import MANIFEST

RECIPE = "recipe.yaml"


class ExportError(CheckFailed):
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
        # one name, or several: a fused MoE expert tensor is saved as one tensor per expert (Hub layout)
        out[k] = next(iter(renamed)) if len(renamed) == 1 else (tuple(renamed) or k)
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
        if isinstance(on_disk, tuple):  # saved split (MoE experts): every part is there, numbers add up
            parts = [stored.get(k) for k in on_disk]
            if any(x is None for x in parts):
                problems.append(f"missing {name} (as {', '.join(k for k, x in zip(on_disk, parts) if x is None)})")
            elif sum(math.prod(x["shape"]) for x in parts) != p.numel():
                problems.append(f"{name}: {len(parts)} parts on disk do not add up to {list(p.shape)}")
            continue
        if on_disk not in stored:
            problems.append(f"missing {name}")
        elif list(p.shape) != stored[on_disk]["shape"]:
            problems.append(f"{name}: shape {stored[on_disk]['shape']} on disk, {list(p.shape)} in the model")
    expected = {k for v in saved.values() for k in (v if isinstance(v, tuple) else (v,))}
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
    write_text(folder / RECIPE, recipe_yaml)
    write_json(folder / MANIFEST, manifest)
    return manifest
