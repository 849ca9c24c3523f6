"""The one safetensors shard writer of a streamed export: header planned up front, tensors streamed in.

Every output tensor's name, dtype and shape is known before any data is produced (:class:`OutTensor`),
so each shard's header (names, dtypes, shapes, offsets) is written first and the tensors follow one at
a time, produced lazily: no output buffer. Shard names and the index follow ``save_pretrained``
(``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).
Modelled on mergekit's ``io/tensor_writer.py``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..atomic import write_json
from .checkpoint import INDEX, SAFETENSORS_DTYPES, WEIGHTS, ExportError


def parse_size(size: str | int) -> int:
    """'2GB' / '500MB' / '10KB' / int bytes → bytes (decimal units, like transformers)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


@dataclass
class OutTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class ShardWriter:
    """Writes one safetensors file whose header (names, dtypes, shapes, offsets) is known up front,
    then receives the tensors in that order, one at a time."""

    def __init__(self, path: Path, tensors: list[OutTensor]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in tensors:
            header[t.key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.expected = path, list(tensors)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        t = self.expected[self._next]
        if key != t.key or tensor.dtype != t.dtype or tuple(tensor.shape) != t.shape:
            raise ExportError(f"{self.path.name}: expected {t.key} {t.dtype} {t.shape}, got {key} {tensor.dtype} "
                              f"{tuple(tensor.shape)}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._f.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self.expected):
            raise ExportError(f"{self.path.name}: {len(self.expected) - self._next} tensors were not written")


def plan_shards(tensors: list[OutTensor], max_shard_size: int) -> list[tuple[str, list[OutTensor]]]:
    """(file name, tensors) per shard: huggingface_hub's split, the one ``save_pretrained`` uses, so a streamed
    export has the same shard files and index as a model saved whole."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        {t.key: t for t in tensors}, get_storage_size=lambda t: t.nbytes, get_storage_id=lambda t: None,
        filename_pattern=WEIGHTS.replace(".safetensors", "{suffix}.safetensors"), max_shard_size=max_shard_size)
    by_key = {t.key: t for t in tensors}
    return [(name, [by_key[k] for k in keys]) for name, keys in split.filename_to_tensors.items()]


def write_shards(folder: Path, tensors: list[OutTensor], max_shard_size: int,
                 progress: Callable[[str], None] | None = None) -> list[str]:
    """Write the tensors (produced lazily, in order) as shards + index like save_pretrained does."""
    shards = plan_shards(tensors, max_shard_size)
    weight_map = {}
    for name, shard in shards:
        w = ShardWriter(folder / name, shard)
        try:
            for t in shard:
                if progress:
                    progress(t.key)
                w.write(t.key, t.produce())
                weight_map[t.key] = name
        finally:
            w._f.close()
        w.close()
    if len(shards) > 1:
        metadata = {"total_parameters": sum(math.prod(t.shape) for t in tensors),
                    "total_size": sum(t.nbytes for t in tensors)}  # as save_pretrained writes them
        write_json(folder / INDEX, {"metadata": metadata, "weight_map": weight_map}, sort_keys=True)
    return [name for name, _ in shards]
