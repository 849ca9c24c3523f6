"""One content identity for a model source, used by every cache and resumable result.

:func:`model_identity` says what a loaded model is made of, by content, never by path or time:

* a local folder: the SHA-256 of each file transformers loads (``model.safetensors``, else the weight files
  named by ``model.safetensors.index.json``, else the ``pytorch_model.bin`` file or index;
  other ``*.safetensors`` in the folder, e.g. a backup, are not loaded and not hashed), of the config,
  tokenizer and generation files (``*.json``, ``*.txt``, ``*.model``, ``*.jinja``, ``*.tiktoken``) and of the
  remote-code ``*.py`` files;
* a GGUF file (weights, tokenizer and config in one file): its SHA-256;
* a Hub source: the repository and the commit transformers resolved (a commit pins every file's content).
  Before the download (``search`` keys its log before loading) the commit of a locally cached snapshot;
  a source neither downloaded nor pinned to a commit is keyed by ``id@revision`` and says so.

Hashing is streaming (1 MiB reads); a checksum is memoised per file *stat* — resolved path, device, inode,
size, mtime and ctime (ctime changes on every write or ``touch``/``cp -p`` and cannot be set back) — within
the process and, when the caller names one, in a small JSON sidecar (:data:`SIDECAR`) in the cache folder,
so a rerun on unchanged files costs nothing. A file whose stat differs is hashed again; the sidecar is never
trusted for anything else.

:func:`library_versions` (torch, transformers, laser-export) and the load dtype complete a cache key; each
cache adds what its values depend on (the benchmark examples' SHA-256, the scorer, the batch size).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .atomic import write_text

#: memo of checksums, in a cache folder: {stat key: sha256}
SIDECAR = "file-sha256.memo"  # JSON; not *.json, which are cache entries
_AUX_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py")
_CHUNK = 1 << 20
_memo: dict[str, str] = {}


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def file_sha256(path: str | Path, memo_dir: str | Path | None = None) -> str:
    """SHA-256 of ``path``'s content (streaming); memoised by stat (see the module docstring)."""
    path = Path(path)
    key = _stat_key(path)
    if key in _memo:
        return _memo[key]
    sidecar = _read_sidecar(memo_dir)
    digest = sidecar.get(key)
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        if _stat_key(path) != key:  # written to while we read it: do not memoise a mixture
            return digest
        if memo_dir is not None and _within(path, Path(memo_dir)):
            memo_dir = None  # never write the memo among the files it hashes (a cache pointed at the model)
        _write_sidecar(memo_dir, {**sidecar, key: digest})
    _memo[key] = digest
    return digest


def _within(path: Path, folder: Path) -> bool:
    try:
        folder = folder.expanduser().resolve()
        return folder in path.resolve().parents
    except (OSError, RuntimeError):
        return True  # unresolvable: do not write there


def _read_sidecar(memo_dir) -> dict:
    if memo_dir is None:
        return {}
    try:
        data = json.loads((Path(memo_dir) / SIDECAR).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_sidecar(memo_dir, data: dict) -> None:
    if memo_dir is None:
        return
    live = {k: v for k, v in data.items() if _still_there(k)}  # drop entries of files that changed or went
    try:
        Path(memo_dir).mkdir(parents=True, exist_ok=True)
        write_text(Path(memo_dir) / SIDECAR, json.dumps(live, sort_keys=True))
    except OSError:
        pass  # a speed-up only


def _still_there(key: str) -> bool:
    try:
        return _stat_key(Path(key.split("|", 1)[0])) == key
    except OSError:
        return False


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files transformers loads from ``folder``, in ``from_pretrained``'s order: ``model.safetensors``
    (it wins over a stale index beside it), else the shards ``model.safetensors.index.json`` names, else
    ``pytorch_model.bin``, else the shards of its index; else every ``*.safetensors`` / ``*.bin`` there."""
    folder = Path(folder)
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
                return [folder / s for s in shards]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass  # unreadable index: the loader fails on it; identify by what is there
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))


def _folder_files(folder: Path) -> list[Path]:
    weights = weight_files(folder)
    aux = {p for pattern in _AUX_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sorted(set(weights) | aux)


def model_identity(source, commit: str | None = None, memo_dir: str | Path | None = None) -> dict:
    """What a resolved source (:class:`~laser_export.sources.ResolvedSource`) is made of, by content (see the
    module docstring). ``commit``: the Hub commit transformers resolved (``config._commit_hash``)."""
    if source.kind == "hub":
        commit = commit or _cached_commit(source)
        if commit:
            return {"hub": source.location, "commit": commit}
        return {"hub": source.location, "revision": source.revision or "main", "unresolved": True}
    folder = Path(source.location)
    files = [folder / source.gguf_file] if source.gguf_file else _folder_files(folder)
    return {"files": {p.name: file_sha256(p, memo_dir) for p in files if p.is_file()}}


def _cached_commit(source) -> str | None:
    """The commit of the locally cached snapshot of a Hub source (``snapshots/<commit>``), or None."""
    rev = source.revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        return rev
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(source.location, revision=rev, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached
        return None
    return path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None


def library_versions() -> dict:
    import torch
    import transformers

    from . import __version__

    return {"torch": torch.__version__, "transformers": transformers.__version__, "laser_export": __version__}


def digest(identity: dict, n: int = 32) -> str:
    """A short stable hex digest of a JSON-able identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:n]


def weights_identity(source, revision: str | None = None, memo_dir: str | Path | None = None) -> str:
    """:func:`model_identity` of a source (a spec string or a resolved source) as a short digest."""
    from .sources import resolve_source

    src = resolve_source(source, revision) if isinstance(source, str) else source
    return digest(model_identity(src, memo_dir=memo_dir))
