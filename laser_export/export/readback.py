"""Read an export's safetensors checkpoint back before it is declared done.

Both export paths (a model saved whole, a checkpoint streamed shard by shard) end here, inside the
temporary folder and before the rename: the files transformers would load (the index and its shards, or
``model.safetensors``) are parsed from disk, and every tensor is checked — a known dtype, a shape whose
byte size matches its offsets, offsets that tile the data exactly, no tensor twice, exactly the tensor
names and shapes the writer meant to write, and finite values (a cast to a narrower dtype can turn a
large weight into ``inf``). Any problem is an :class:`~laser_export.export.checkpoint.ExportError`
naming the file and the tensor; nothing is exported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..artifacts import CheckpointInfo
from .checkpoint import FROM_SAFETENSORS, INDEX, WEIGHTS, ExportError

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT = {"F64", "F32", "F16", "BF16"}


def checkpoint_files(folder: Path) -> list[str]:
    """The safetensors files transformers loads from ``folder``: ``model.safetensors`` when present (it wins
    over an index, as in ``from_pretrained``), else the shards the index names."""
    if (folder / WEIGHTS).is_file():
        return [WEIGHTS]
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            return list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ExportError(f"{folder / INDEX}: not a valid safetensors index ({err})") from None
    return []


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor name → header entry, bytes of data after the header) of a safetensors file; ExportError when it is
    not one (the parse: :mod:`laser_export.st_header`)."""
    from ..st_header import HeaderError, parse

    try:
        header, n, size = parse(path)
    except HeaderError as err:
        raise ExportError(f"{path.name}: {err}") from None
    header.pop("__metadata__", None)
    return header, size - 8 - n


def _check_layout(path: Path, header: dict, data_bytes: int) -> None:
    """Known dtypes, offsets matching each shape, data tiled exactly (no gap, overlap or tail)."""
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"{path.name}: tensor {name} has no valid dtype/shape/data_offsets") from None
        if dtype not in _ITEMSIZE:
            raise ExportError(f"{path.name}: tensor {name} has unknown dtype {dtype}")
        if end - start != math.prod(shape) * _ITEMSIZE[dtype]:
            raise ExportError(f"{path.name}: tensor {name}: offsets [{start}, {end}] do not hold a {dtype} {shape}")
        spans.append((start, end, name))
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            raise ExportError(f"{path.name}: invalid offset for tensor {name} (starts at {start}, expected {at})")
        at = end
    if at != data_bytes:
        raise ExportError(f"{path.name}: the header announces {at} data bytes, the file holds {data_bytes}")


#: bytes read at a time by the finiteness check (one reused buffer: memory does not grow with the checkpoint)
READ_CHUNK = 64 << 20


def _check_finite(path: Path, header: dict, data_bytes: int) -> None:
    """Every float tensor is finite, read with plain reads into one reused buffer (a memory map would put the
    whole shard into the process's resident memory) and checked by :mod:`laser_export.finite`."""
    import torch

    from ..finite import count_nonfinite

    base = path.stat().st_size - data_bytes
    buf = bytearray(READ_CHUNK)
    with open(path, "rb") as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _FLOAT:
                continue
            dtype, item = FROM_SAFETENSORS[info["dtype"]], _ITEMSIZE[info["dtype"]]
            start, end = info["data_offsets"]
            f.seek(base + start)
            bad, left, step = 0, end - start, READ_CHUNK - READ_CHUNK % item
            while left > 0:
                got = f.readinto(memoryview(buf)[: min(left, step)])
                if not got:
                    raise ExportError(f"{path.name}: tensor {name}: the file ends inside its data")
                bad += count_nonfinite(torch.frombuffer(buf, dtype=dtype, count=got // item))
                left -= got
            if bad:
                raise ExportError(f"{path.name}: tensor {name} ({str(dtype).removeprefix('torch.')}) holds {bad} "
                                  f"non-finite values (inf/NaN) of {(end - start) // item}; nothing was exported")


def read_back(folder: Path, expected: dict[str, list[int]] | None = None) -> CheckpointInfo:
    """Check the checkpoint in ``folder`` (see the module docstring); ``expected``: tensor name → shape
    that must be stored, exactly. Returns the manifest's ``checkpoint`` record."""
    files = checkpoint_files(folder)
    if not files:
        raise ExportError(f"{folder}: no safetensors checkpoint was written")
    stored: dict[str, tuple[list[int], str]] = {}
    total = 0
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{INDEX} names {name}, which was not written")
        header, data_bytes = read_header(path)
        _check_layout(path, header, data_bytes)
        for key, info in header.items():
            if key in stored:
                raise ExportError(f"tensor {key} is stored twice ({stored[key][1]} and {name})")
            stored[key] = ([int(d) for d in info["shape"]], name)
        total += data_bytes
        _check_finite(path, header, data_bytes)
    if len(files) > 1 or (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"] if (folder / INDEX).is_file() else {}
        wrong = [k for k, (_, f) in stored.items() if weight_map.get(k) != f] + [k for k in weight_map if k not in stored]
        if wrong and files != [WEIGHTS]:
            raise ExportError(f"{INDEX} does not match the shards (e.g. tensor {wrong[0]})")
    if expected is not None:
        problems = [f"missing {k}" for k in expected if k not in stored]
        problems += [f"unexpected tensor {k}" for k in stored if k not in expected]
        problems += [f"{k}: shape {stored[k][0]} on disk, {list(s)} expected" for k, s in expected.items()
                     if k in stored and stored[k][0] != list(s)]
        if problems:
            raise ExportError("exported checkpoint does not match the model: " + "; ".join(problems[:10]))
    return CheckpointInfo(tensor_bytes=total, files=sorted(files))
