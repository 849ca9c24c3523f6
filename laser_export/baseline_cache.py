"""Baseline cache: the unreduced model's metrics and per-example scores, keyed by what determines them.

A verify run scores the baseline (the unreduced model) and the reduced model on the same examples. The
baseline depends only on the model's weights and tokenizer, the load dtype and device type, the exact
examples (their SHA-256), the scorer code and the batch size, so a rerun with the same key reads it from
``$LASER_EXPORT_BASELINE_CACHE`` (default ``~/.cache/laser-export/baselines``) and scores only the reduced
model. Entries are JSON, written atomically; ``--no-cache`` (``BaselineCache(enabled=False)``) ignores them.

Prefix: a first run's baseline pass is also the prefix cache's capture pass (the inputs of the blocks from
the lowest reduced layer on, see :mod:`laser_export.prefix`). Those inputs are stored next to the entry,
``<key>.prefix-<prefix key>.safetensors``, keyed by the baseline key plus what the recorded tensors depend on
(start and replay layers, block count, model class, torch / transformers versions, the prefix code), so a
rerun replays only the reduced blocks instead of running full forwards. Tensors keep their recorded dtype
(bit-exact replay); non-tensor inputs (None, bools, numbers) are a JSON structure in the file's metadata, with
a SHA-256 of the tensors. A prefix larger than ``$LASER_EXPORT_PREFIX_CACHE_GB`` (default 2; 0: never store)
is not stored: a ``.skipped`` marker records its size, and reruns use the cached baseline with full forwards.
An unreadable, truncated or mismatching prefix file is a miss: the run scores the baseline again (capture).

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
from .atomic import write_text, write_via
from .evaluate import ScoreResult

ENV_VAR = "LASER_EXPORT_BASELINE_CACHE"
PREFIX_BUDGET_VAR = "LASER_EXPORT_PREFIX_CACHE_GB"
PREFIX_FORMAT = 1
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


def prefix_budget_bytes() -> int:
    """``$LASER_EXPORT_PREFIX_CACHE_GB`` (default 2; 0 or less: never store a prefix) in bytes."""
    raw = os.environ.get(PREFIX_BUDGET_VAR) or "2"
    try:
        return max(0, int(float(raw) * 1e9))
    except ValueError:
        raise ValueError(f"{PREFIX_BUDGET_VAR}={raw!r} is not a number of GB") from None


def prefix_identity(cache) -> dict:
    """What a :class:`~laser_export.prefix.PrefixCache`'s recorded inputs depend on beyond the baseline key."""
    import torch
    import transformers

    from . import prefix

    return {
        "format": PREFIX_FORMAT,
        "start": cache.start,
        "replay_layers": sorted(cache.replay_layers),
        "n_blocks": len(cache.blocks),
        "model_class": f"{type(cache.model).__module__}.{type(cache.model).__qualname__}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prefix_code": hashlib.sha256(Path(prefix.__file__).read_bytes()).hexdigest()[:16],
    }


@dataclass
class PrefixStatus:
    """What happened to the stored prefix: ``hit`` (loaded), ``miss`` (none usable: captured, maybe stored now),
    ``skipped`` (not stored / not used: ``reason``)."""

    status: str
    reason: str | None = None
    path: str | None = None
    bytes: int | None = None

    def report(self) -> dict:
        return {"status": self.status, "reason": self.reason, "path": self.path, "bytes": self.bytes}


def _tensors_sha256(tensors: dict) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name), without copies where
    the tensor is contiguous on the CPU."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _over_budget(size: int, budget: int) -> PrefixStatus:
    return PrefixStatus("skipped", f"{_gb(size)} > {PREFIX_BUDGET_VAR} {_gb(budget)}", None, size)


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

    # -- the captured prefix --------------------------------------------------------------------------
    def prefix_path(self, key: str, pidentity: dict) -> Path:
        return self.root / f"{key}.prefix-{self.key(pidentity)[:16]}.safetensors"

    def _skip_marker(self, key: str, pidentity: dict) -> Path:
        return self.prefix_path(key, pidentity).with_suffix(".skipped")

    def load_prefix(self, key: str, pidentity: dict, cache) -> PrefixStatus:
        """Fill ``cache`` (a fresh :class:`~laser_export.prefix.PrefixCache` built like the stored one) from the
        entry: ``hit``, or ``miss`` with the reason (absent, unreadable, checksum or shape mismatch), or
        ``skipped`` when a run found it over the budget (and it still is)."""
        path = self.prefix_path(key, pidentity)
        if not self.enabled:
            return PrefixStatus("skipped", "--no-cache")
        marker = self._skip_marker(key, pidentity)
        if not path.exists() and marker.exists():
            try:
                size = int(json.loads(marker.read_text())["bytes"])
            except (OSError, ValueError, KeyError, TypeError):
                size = None
            budget = prefix_budget_bytes()
            if size is not None and size > budget:
                return _over_budget(size, budget)
        if not path.exists():
            return PrefixStatus("miss", f"no stored prefix for layer {cache.start}")
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if json.loads(meta.get("identity", "null")) != pidentity:
                raise ValueError("stored for another model, layer or library version")
            tensors = load_file(str(path))
            if _tensors_sha256(tensors) != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            cache.load_flat(tensors, json.loads(meta["structure"]))
        except Exception as err:  # any failure: never replay from it
            cache.batches = []
            return PrefixStatus("miss", f"unusable stored prefix ({type(err).__name__}: {str(err)[:120]})",
                                str(path))
        return PrefixStatus("hit", None, str(path), path.stat().st_size)

    def store_prefix(self, key: str, pidentity: dict, cache) -> PrefixStatus:
        """Store the captured ``cache`` (within the budget) as a safetensors file; never raises for a value that
        cannot be stored (``skipped`` with the reason). The caller's status is a miss: this reports what
        was written."""
        if not self.enabled:
            return PrefixStatus("skipped", "--no-cache")
        from .prefix import PrefixFormatError

        size, budget = cache.nbytes(), prefix_budget_bytes()
        path = self.prefix_path(key, pidentity)
        self.root.mkdir(parents=True, exist_ok=True)
        if size > budget:
            write_text(self._skip_marker(key, pidentity), json.dumps({"bytes": size, "identity": pidentity}))
            path.unlink(missing_ok=True)
            return _over_budget(size, budget)
        try:
            tensors, structure = cache.to_flat()
        except PrefixFormatError as err:
            return PrefixStatus("skipped", str(err))
        from safetensors.torch import save_file

        stored, seen = {}, set()
        for name, t in tensors.items():  # safetensors: contiguous CPU tensors that share no memory
            t = t.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            stored[name] = t.clone() if ptr in seen else t
            seen.add(ptr)
        meta = {"identity": json.dumps(pidentity, sort_keys=True), "structure": json.dumps(structure),
                "sha256": _tensors_sha256(stored)}
        write_via(path, lambda tmp: save_file(stored, str(tmp), metadata=meta))
        self._skip_marker(key, pidentity).unlink(missing_ok=True)
        return PrefixStatus("miss", None, str(path), path.stat().st_size)


def _plain(value):
    """numpy scalars (np.bool_, np.float32) → Python values for JSON."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the baseline cache")
