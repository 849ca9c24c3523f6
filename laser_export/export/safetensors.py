"""The safetensors checkpoint of an export: the in-memory writer and the checks every checkpoint gets.

:func:`write_checkpoint` saves a model held in memory (``save_pretrained``); a streamed export writes its
shards with :mod:`laser_export.export.shards`; both end with :func:`finish_checkpoint` (loading code,
read-back). The whole folder (recipe, manifest, card, formats; temporary sibling, then rename) is
assembled by :mod:`laser_export.export.writer`.
"""

from __future__ import annotations

import math

from .checkpoint import ExportError
from pathlib import Path

from torch import nn

from ..artifacts import CheckpointInfo
from ..hf import mark_factorised


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


def check_checkpoint(folder: Path, model: nn.Module, original_format: bool = True) -> None:
    """Every parameter of ``model`` is in the files with the same shape; nothing extra is stored.
    ``original_format=False``: saved under the in-memory names (``save_original_format=False``)."""
    stored = checkpoint_tensors(folder)
    if not stored:
        raise ExportError(f"{folder}: no safetensors files were written")
    problems = []
    params = dict(model.named_parameters())
    state = model.state_dict()
    saved = _saved_names(model, state) if original_format else {k: k for k in state}
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
    from ..fused import stored_form

    ranks = mark_factorised(model)
    with stored_form(model) as fused:  # factorised fused blocks: saved under the in-memory (fused) names
        model.save_pretrained(folder, max_shard_size=max_shard_size, **({"save_original_format": False} if fused else {}))
        check_checkpoint(folder, model, original_format=not fused)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    checkpoint, auto_map = finish_checkpoint(folder, model, {**ranks, **fused})
    return {"checkpoint": checkpoint.model_dump(), "auto_map": auto_map}
