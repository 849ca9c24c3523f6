"""Baseline cache: the unreduced model's metrics and per-example scores, keyed by what determines them.

A verify run scores the baseline (the unreduced model) and the reduced model on the same examples. The
baseline depends only on the model's weights and tokenizer, the load dtype and device type, the exact
examples (their SHA-256), the scorer code and the batch size, so a rerun with the same key reads it from
``$LASER_EXPORT_BASELINE_CACHE`` (default ``~/.cache/laser-export/baselines``) and scores only the reduced
model. Entries are JSON, written atomically; ``--no-cache`` (``BaselineCache(enabled=False)``) ignores them.

Model identity: for a Hub model, repo id and the commit transformers resolved; for local files (a GGUF
file, a folder), each weight / config / tokenizer file's resolved path, size and modification time (a
changed file is a different model).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .atomic import write_text
from .evaluate import ScoreResult

ENV_VAR = "LASER_EXPORT_BASELINE_CACHE"
_MODEL_FILES = ("*.json", "*.safetensors", "*.bin", "*.gguf", "*.model", "*.txt")


def default_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "laser-export" / "baselines")


def scorer_version() -> str:
    """laser-export's version and a hash of the scoring code: a change to the scorer invalidates entries."""
    from . import evaluate, metrics

    code = Path(evaluate.__file__).read_bytes() + Path(metrics.__file__).read_bytes()
    return f"{__version__}+{hashlib.sha256(code).hexdigest()[:16]}"


def _file_id(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def model_identity(source, config) -> dict:
    """What identifies the weights and tokenizer of a resolved source (see the module docstring)."""
    if source.kind == "hub":
        return {"hub": source.location, "revision": source.revision,
                "commit": getattr(config, "_commit_hash", None)}
    folder = Path(source.location)
    if source.gguf_file:
        return {"files": [_file_id(folder / source.gguf_file)]}
    files = sorted({p for pattern in _MODEL_FILES for p in folder.glob(pattern) if p.is_file()})
    return {"files": [_file_id(p) for p in files]}


@dataclass(frozen=True)
class BaselineCache:
    """``enabled=False``: never read nor write. ``directory``: default :func:`default_dir`."""

    enabled: bool = True
    directory: Path | None = None

    @property
    def root(self) -> Path:
        return Path(self.directory) if self.directory is not None else default_dir()

    @staticmethod
    def key(identity: dict) -> str:
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def load(self, key: str) -> ScoreResult | None:
        if not self.enabled:
            return None
        try:
            data = json.loads(self.path(key).read_text())
            return ScoreResult(per_example=data["per_example"], metrics=data["metrics"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or unreadable: score again (and overwrite)

    def store(self, key: str, identity: dict, result: ScoreResult) -> Path | None:
        if not self.enabled:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"identity": identity, "metrics": result.metrics, "per_example": result.per_example},
                          default=_plain)
        return write_text(self.path(key), text)


def _plain(value):
    """numpy scalars (np.bool_, np.float32) → Python values for JSON."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the baseline cache")
