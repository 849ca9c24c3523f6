"""The resumable results log and what keys it: the run key (weights identity, dtype, benchmark,
validation-split sha256, storage). A rerun with the same key skips every candidate already measured;
new weights at the same path get a new key, so old results are never reused for them."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

#: files of a model folder whose content identifies the weights (config.json: same weights, other
#: architecture settings would score differently)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_FULL_HASH_LIMIT = 32 * 2**20  # files up to this size are hashed whole
_HEAD = 4 * 2**20  # bigger files: the first 4 MiB (header), 64 sampled 64 KiB blocks and the size
_BLOCK, _SAMPLES = 64 * 2**10, 64


def _file_identity(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as fh:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
            return h.hexdigest()
        head = _HEAD
        if path.suffix == ".safetensors":  # the whole JSON header (dtypes, shapes, offsets), however long
            (n,) = struct.unpack("<Q", fh.read(8))
            head = max(head, 8 + n)
        fh.seek(0)
        h.update(fh.read(min(head, size)))
        # a fine-tune with the same shapes has the same header: sample the data too
        block = min(_BLOCK, size)
        for i in range(_SAMPLES + 1):
            fh.seek(max(0, min(size - block, head + (size - head - block) * i // _SAMPLES)))
            h.update(fh.read(block))
    return h.hexdigest()


def weights_identity(source) -> str:
    """A content identity of a resolved model source (:class:`laser_export.sources.ResolvedSource`).

    GGUF file: its header, size and sampled data blocks. Folder: the same for every weight file plus
    ``config.json``. Hub id: the local snapshot's files when it is cached, else ``repo@revision``
    (a Hub revision pinned by commit sha is itself an identity). Never the path alone.
    """
    files: list[Path] = []
    if source.gguf_file:
        files = [Path(source.location) / source.gguf_file]
    elif source.kind == "folder":
        folder = Path(source.location)
        files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"))
    elif source.kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source.location, revision=source.revision, local_files_only=True))
            files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"))
        except Exception:  # not cached (the load will say so), or no network: fall back to the pinned id
            files = []
        if not files:
            return f"hub:{source.location}@{source.revision or 'main'}"
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{_file_identity(f)}\n".encode())
    return h.hexdigest()[:32]


def run_key(**parts) -> str:
    """A stable id for (weights identity, dtype, benchmark, split sha, ...): results of other runs are ignored."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultsLog:
    """Append-only JSONL: one line per measured candidate/set, written as soon as it is measured."""

    def __init__(self, path: str | Path | None, key: str):
        self.path = Path(path) if path else None
        self.key = key
        self.rows: dict[str, dict] = {}
        self.other_runs = 0  # rows of other run keys in the file (e.g. other weights at the same path)
        if self.path and self.path.is_file():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted write
                if not isinstance(row, dict) or "id" not in row:
                    continue
                if row.get("run") == key:
                    self.rows[row["id"]] = row
                else:
                    self.other_runs += 1

    def get(self, ident: str) -> dict | None:
        return self.rows.get(ident)

    def add(self, ident: str, kind: str, metrics: dict, **extra) -> dict:
        row = {"run": self.key, "id": ident, "kind": kind, "metrics": metrics, **extra}
        self.rows[ident] = row
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = False  # an interrupted write left a partial last line: start on a fresh line
            if self.path.is_file() and self.path.stat().st_size:
                with self.path.open("rb") as fh:
                    fh.seek(-1, 2)
                    torn = fh.read(1) != b"\n"
            with self.path.open("a") as fh:
                fh.write(("\n" if torn else "") + json.dumps(row) + "\n")
                fh.flush()
        return row
