"""The resumable results log and what keys it: the run key (the content identity of the model,
:func:`laser_export.identity.weights_identity`: weights, tokenizer, remote code; dtype, library versions,
benchmark, validation-split sha256, storage). A rerun with the same key skips every candidate already measured;
new weights at the same path get a new key, so old results are never reused for them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


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
