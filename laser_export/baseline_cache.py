"""Baseline cache: the unreduced model's metrics and per-example scores, keyed by what determines them.

A verify run scores the baseline (the unreduced model) and the reduced model on the same examples. The
baseline depends only on the model's content (weights, config, tokenizer and remote-code files:
:mod:`laser_export.identity`), the load dtype, device type and library versions, the exact examples (their
SHA-256), the scorer code and the batch size, so a rerun with the same key reads it from
``$LASER_EXPORT_BASELINE_CACHE`` (default ``~/.cache/laser-export/baselines``) and scores only the reduced
model. Entries are JSON, written atomically; ``--no-cache`` (``BaselineCache(enabled=False)``) ignores them.

Every read checks what it reads: an entry holds its key and the full identity it was stored for, and is used
only when both equal this run's (a file copied under another key is a miss); its per-example rows are paired
with this run's examples by id (a missing or extra id is a miss). A result with NaN/inf is never stored.

Prefix: a first run's baseline pass is also the prefix cache's capture pass (the inputs of the blocks from
the lowest reduced layer on, see :mod:`laser_export.prefix`). Those inputs are stored next to the entry,
``<key>.prefix-<prefix key>.safetensors``, keyed by the baseline key plus what the recorded tensors depend on
(start and replay layers, block count, model class, library versions, the prefix code); the file's metadata
repeats both and is compared on load. Tensors keep their recorded dtype (bit-exact replay); non-tensor inputs
(None, bools, numbers) are a JSON structure in the metadata, with a SHA-256 of the tensors. A prefix larger
than ``$LASER_EXPORT_PREFIX_CACHE_GB`` (default 2; 0: never store) is not stored, nor is one whose replay
is not the model's forward (:attr:`laser_export.prefix.PrefixCache.exact`): a ``.skipped`` marker records
why, and reruns use the cached baseline with full forwards. An unreadable, truncated or mismatching prefix
file is a miss: the run scores the baseline again (capture).

An unusable cache folder (a file, read-only, not writable, disk full, the model source or another input of
the run, or inside one) is a one-line warning from
:meth:`BaselineCache.open`, before any weights load, and the run goes on without the cache; a write that fails
later (disk full) is reported as not stored. ``.part`` temporaries of killed writers are removed when the
cache is opened. Reports name entries by key and file name, never by absolute path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import clean_part_debris, process_tag, write_text, write_via
from .defaults import PREFIX_CACHE_GB_VAR
from .evaluate import ScoreResult

ENV_VAR = "LASER_EXPORT_BASELINE_CACHE"
ENTRY_FORMAT = 2
PREFIX_FORMAT = 2
#: below this much free space the cache is not used (a prefix file alone can be ~2 GB)
MIN_FREE_BYTES = 64 << 20
#: ``.NAME.<pid>-XXXX.part``: a temporary of :mod:`laser_export.atomic` (pid of the writer)
#: a ``.part`` without a pid (older writers) is debris once untouched this long


def default_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "laser-export" / "baselines")


def memo_dir_if_present() -> Path | None:
    """The cache folder as the checksum memo's home (:func:`laser_export.identity.file_sha256`) when it
    already exists and is writable; None otherwise (nothing is created for a memo)."""
    root = default_dir()
    return root if root.is_dir() and os.access(root, os.W_OK | os.X_OK) else None


def scorer_version() -> str:
    """laser-export's version and a hash of the scoring code: a change to the scorer invalidates entries."""
    from . import __version__, evaluate, metrics

    code = Path(evaluate.__file__).read_bytes() + Path(metrics.__file__).read_bytes()
    return f"{__version__}+{hashlib.sha256(code).hexdigest()[:16]}"


def prefix_budget_bytes() -> int:
    """``$LASER_EXPORT_PREFIX_CACHE_GB`` (default 2; 0: never store a prefix) in bytes; anything but a
    finite number >= 0 is an :class:`~laser_export.defaults.EnvironmentSettingError` (exit 2)."""
    from .defaults import prefix_cache_gb

    return int(prefix_cache_gb() * 1e9)


def check_cache_settings() -> None:
    """Validate the cache environment settings up front (before any weights load): raises
    :class:`~laser_export.defaults.EnvironmentSettingError` (exit 2). An unusable cache *folder* is not an
    error: :meth:`BaselineCache.open` warns and the run goes on without the cache."""
    prefix_budget_bytes()


def prefix_identity(cache) -> dict:
    """What a :class:`~laser_export.prefix.PrefixCache`'s recorded inputs depend on beyond the baseline key."""
    from . import prefix
    from .identity import library_versions

    return {
        "format": PREFIX_FORMAT,
        "start": cache.start,
        "replay_layers": sorted(cache.replay_layers),
        "n_blocks": len(cache.blocks),
        "model_class": f"{type(cache.model).__module__}.{type(cache.model).__qualname__}",
        "libraries": library_versions(),
        "prefix_code": hashlib.sha256(Path(prefix.__file__).read_bytes()).hexdigest()[:16],
    }


def _normal(value):
    """``value`` as it reads back from JSON (tuples become lists), for comparing a stored identity."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass
class PrefixStatus:
    """What happened to the stored prefix: ``hit`` (loaded), ``miss`` (none usable: captured, maybe stored now),
    ``skipped`` (not stored / not used: ``reason``). ``path``: the file name inside the cache folder (never
    an absolute path: reports are pushed)."""

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
    return PrefixStatus("skipped", f"{_gb(size)} > {PREFIX_CACHE_GB_VAR} {_gb(budget)}", None, size)


def _inside_input(root: Path, protect) -> str | None:
    """Why the cache folder must not be written: it is (or is inside) an input of the run; None otherwise."""
    try:
        here = root.expanduser().resolve()
        for p in protect:
            held = Path(p).expanduser().resolve()
            if here == held or held in here.parents:
                return f"is inside an input of this run ({held}: the model source, data or recipe); never written"
    except (OSError, RuntimeError):  # a symlink loop: _unusable says why
        return None
    return None


def _unusable(root: Path) -> str | None:
    """Why the cache folder cannot be used (not a folder, not writable, read-only, nearly full), or None.
    Writes nothing that stays: an existing folder gets a probe file, removed at once; a missing one is
    created only when the first entry is stored (its nearest existing parent must be writable)."""
    try:
        if root.exists():
            if not root.is_dir():
                return "is not a folder"
            fd, probe = tempfile.mkstemp(dir=root, prefix=f".probe.{process_tag()}-", suffix=".part")
            os.close(fd)
            os.unlink(probe)
            where = root
        else:
            where = root.parent
            while not where.exists():
                where = where.parent
            if not where.is_dir():
                return f"{where} is not a folder"
            if not os.access(where, os.W_OK | os.X_OK):
                return f"cannot create it in {where} (permission denied or read-only)"
        free = shutil.disk_usage(where).free
    except OSError as err:
        return err.strerror or type(err).__name__
    if free < MIN_FREE_BYTES:
        return f"only {free / 2**20:.0f} MiB free"
    return None


@dataclass(frozen=True)
class BaselineCache:
    """``enabled=False``: never read nor write. ``directory``: default :func:`default_dir`.
    :meth:`open` is the way in: it checks the settings and the folder up front."""

    enabled: bool = True
    directory: Path | None = None
    #: why the cache is off although it was asked for (an unusable folder); None otherwise
    disabled_reason: str | None = None

    @classmethod
    def open(cls, enabled: bool = True, directory: str | Path | None = None, warn=None,
             clean: bool = True, protect=()) -> "BaselineCache":
        """Check :func:`check_cache_settings` (raises ``EnvironmentSettingError``), then the folder: one that
        cannot be used (a file, read-only, not writable, disk full, or one of ``protect`` — the run's inputs:
        model source, data, recipe — or inside one) is a one-line warning (``warn``, default the console) and a
        disabled cache; a usable one is cleaned of ``.part`` debris of killed writers (unless ``clean=False``:
        a dry run changes nothing)."""
        check_cache_settings()
        cache = cls(enabled, Path(directory) if directory is not None else None)
        if not enabled:
            return cache
        why = _inside_input(cache.root, protect) or _unusable(cache.root)
        if why is not None:
            if warn is None:
                from .progress import console

                def warn(line):
                    console.print(f"[yellow]warning:[/] {line}", markup=True, highlight=False)
            warn(f"baseline cache {ENV_VAR}={cache.root}: {why}; continuing without the cache")
            return cls(False, cache.directory, why)
        if clean:
            clean_part_debris(cache.root)
        return cache

    @property
    def root(self) -> Path:
        return Path(self.directory) if self.directory is not None else default_dir()

    @staticmethod
    def key(identity: dict) -> str:
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def memo_dir(self) -> Path | None:
        """Where :func:`laser_export.identity.file_sha256` keeps its checksum memo (None when disabled)."""
        return self.root if self.enabled else None

    def load(self, key: str, identity: dict, ids: list[str]) -> tuple[ScoreResult | None, str]:
        """(the stored baseline, "") when the entry at ``key`` was stored for exactly ``identity`` and holds
        one row per example id of ``ids`` (rows are returned in the order of ``ids``); else (None, why)."""
        if not self.enabled:
            return None, "--no-cache"
        try:
            data = json.loads(self.path(key).read_text())
        except FileNotFoundError:
            return None, "no cached baseline"
        except (OSError, ValueError) as err:
            return None, f"unreadable cached baseline ({type(err).__name__})"
        if not isinstance(data, dict) or data.get("format") != ENTRY_FORMAT or data.get("key") != key:
            return None, "cached baseline of another format or key"
        if data.get("identity") != _normal(identity):
            return None, "cached baseline stored for another model, data or library version"
        try:
            rows = {row["id"]: row for row in data["per_example"]}
            if len(rows) != len(data["per_example"]) or set(rows) != set(ids) or len(ids) != len(rows):
                return None, "cached baseline rows do not match the example ids"
            return ScoreResult(per_example=[rows[i] for i in ids], metrics=dict(data["metrics"])), ""
        except (KeyError, TypeError, ValueError):
            return None, "malformed cached baseline"

    def store(self, key: str, identity: dict, result: ScoreResult) -> tuple[Path | None, str | None]:
        """(the entry's path, None) once written; (None, why) when it cannot be (non-finite scores, a write
        error such as a full disk): never raises, the run goes on without storing."""
        if not self.enabled:
            return None, "--no-cache"
        try:
            text = json.dumps({"format": ENTRY_FORMAT, "key": key, "identity": _normal(identity),
                               "metrics": result.metrics, "per_example": result.per_example},
                              default=_plain, allow_nan=False)
        except ValueError:
            return None, "non-finite scores (NaN/inf) are not cached"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return write_text(self.path(key), text), None
        except OSError as err:
            return None, f"cannot write the cache entry: {err.strerror or type(err).__name__}"

    # -- the captured prefix --------------------------------------------------------------------------
    def prefix_path(self, key: str, pidentity: dict) -> Path:
        return self.root / f"{key}.prefix-{self.key(pidentity)[:16]}.safetensors"

    def _skip_marker(self, key: str, pidentity: dict) -> Path:
        return self.prefix_path(key, pidentity).with_suffix(".skipped")

    def _marker_status(self, key: str, pidentity: dict) -> PrefixStatus | None:
        """The skip marker's verdict when it still holds: over the budget (and still is), or a replay that
        is not the model's forward; None otherwise."""
        marker = self._skip_marker(key, pidentity)
        try:
            data = json.loads(marker.read_text())
            if data.get("key") != key or data.get("identity") != _normal(pidentity):
                return None
            if data.get("inexact"):
                return PrefixStatus("skipped", str(data["inexact"]))
            size = int(data["bytes"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        budget = prefix_budget_bytes()
        return _over_budget(size, budget) if size > budget else None

    def _mark(self, key: str, pidentity: dict, **what) -> None:
        try:
            write_text(self._skip_marker(key, pidentity),
                       json.dumps({"key": key, "identity": _normal(pidentity), **what}))
            self.prefix_path(key, pidentity).unlink(missing_ok=True)
        except OSError:
            pass

    def load_prefix(self, key: str, pidentity: dict, cache) -> PrefixStatus:
        """Fill ``cache`` (a fresh :class:`~laser_export.prefix.PrefixCache` built like the stored one) from the
        entry: ``hit``, or ``miss`` with the reason (absent, unreadable, stored under another key, checksum or
        shape mismatch), or ``skipped`` when a run found it over the budget (and it still is) or found that
        replay is not this model's forward."""
        path = self.prefix_path(key, pidentity)
        if not self.enabled:
            return PrefixStatus("skipped", "--no-cache")
        if not path.exists() and (marked := self._marker_status(key, pidentity)) is not None:
            return marked
        if not path.exists():
            return PrefixStatus("miss", f"no stored prefix for layer {cache.start}")
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") != key or json.loads(meta.get("identity", "null")) != _normal(pidentity):
                raise ValueError("stored for another model, layer or library version")
            if meta.get("exact") != "true":
                raise ValueError("not checked to replay the model's forward")
            tensors = load_file(str(path))
            if _tensors_sha256(tensors) != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            cache.load_flat(tensors, json.loads(meta["structure"]))
            cache.exact = True
        except Exception as err:  # any failure: never replay from it
            cache.batches = []
            return PrefixStatus("miss", f"unusable stored prefix ({type(err).__name__}: {str(err)[:120]})", path.name)
        return PrefixStatus("hit", None, path.name, path.stat().st_size)

    def store_prefix(self, key: str, pidentity: dict, cache) -> PrefixStatus:
        """Store the captured ``cache`` (within the budget, and only when its replay was checked to be the
        model's forward) as a safetensors file; never raises for a value that cannot be stored or a write
        error (``skipped`` with the reason). The caller's status is a miss: this reports what was written."""
        if not self.enabled:
            return PrefixStatus("skipped", "--no-cache")
        from .prefix import PrefixFormatError

        if cache.exact is False:
            self._mark(key, pidentity, inexact=cache.inexact_reason or "replay is not the model's forward")
            return PrefixStatus("skipped", cache.inexact_reason)
        size, budget = cache.nbytes(), prefix_budget_bytes()
        path = self.prefix_path(key, pidentity)
        if size > budget:
            self._mark(key, pidentity, bytes=size)
            return _over_budget(size, budget)
        try:
            tensors, structure = cache.to_flat()
        except PrefixFormatError as err:
            return PrefixStatus("skipped", str(err))
        stored = _unshared(tensors)
        meta = {"key": key, "identity": json.dumps(_normal(pidentity), sort_keys=True),
                "structure": json.dumps(structure), "sha256": _tensors_sha256(stored),
                "exact": "true" if cache.exact else "false"}
        from safetensors.torch import save_file

        try:
            write_via(path, lambda tmp: save_file(stored, str(tmp), metadata=meta))
        except Exception as err:  # noqa: BLE001 - a full disk, a read-only folder: run on without it
            return PrefixStatus("skipped", f"cannot write the prefix: {getattr(err, 'strerror', None) or err}"[:200])
        self._skip_marker(key, pidentity).unlink(missing_ok=True)
        return PrefixStatus("miss", None, path.name, path.stat().st_size)


def _unshared(tensors: dict) -> dict:
    """safetensors stores contiguous CPU tensors that share no memory."""
    stored, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        stored[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return stored


def _plain(value):
    """numpy scalars (np.bool_, np.float32) → Python values for JSON."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the baseline cache")
