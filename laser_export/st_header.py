"""The one safetensors header parser: ``(header, header length, file size)`` of a file, or :class:`HeaderError`
with the reason. It imports nothing from the package; callers turn the reason into their own error (a model
source's :class:`~laser_export.sources.SourceError`, an export's ``ExportError``) and check what they need."""

from __future__ import annotations

import json
import struct
from pathlib import Path

#: the longest header read (bytes): a real header is kilobytes to a few MiB
MAX_HEADER = 100 << 20


class HeaderError(ValueError):
    """Not a safetensors file (the message is the reason, without the file's name)."""


def parse(path: str | Path) -> tuple[dict, int, int]:
    """(header with ``__metadata__``, header length n, file size). OSError when the file cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError("shorter than its 8-byte safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER):
            raise HeaderError(f"header length {n} is impossible for a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise HeaderError("its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise HeaderError("its safetensors header is not an object")
    return header, n, size
