"""Rows of a Hugging Face Hub dataset split: through ``datasets`` when online, or from local files in
the Hub's own layout (offline).

``path=None``: ``datasets.load_dataset(repo, config, split=..., revision=...)`` (network or the
``datasets`` cache). ``path=DIR``: a local copy of the dataset repository, e.g. made with
``hf download --repo-type dataset REPO --local-dir DIR`` (or its ``refs/convert/parquet`` branch).
The files of one split are found by name, in this order:

- ``DIR/[CONFIG/]SPLIT-*.parquet`` or ``DIR/[CONFIG/]data/SPLIT-*.parquet`` (how ``push_to_hub`` names shards),
- ``DIR/[CONFIG/]SPLIT/*.parquet`` (the parquet-converter layout),
- ``DIR/[CONFIG/]SPLIT.jsonl`` / ``SPLIT.json`` (one JSON object per line, or a JSON list),

and read with ``datasets``' own parquet/json builders, so the columns and types are the Hub's.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from .base import BenchmarkError


def _split_files(root: Path, config: str | None, split: str) -> tuple[str, list[str]] | None:
    bases = [root / config, root] if config else [root]
    for base in bases:
        for pattern, kind in (
            (f"{split}-*.parquet", "parquet"),
            (f"data/{split}-*.parquet", "parquet"),
            (f"{split}/*.parquet", "parquet"),
            (f"{split}.parquet", "parquet"),
            (f"{split}.jsonl", "json"),
            (f"{split}.json", "json"),
        ):
            files = sorted(glob.glob(str(base / pattern)))
            if files:
                return kind, files
    return None


def _how_to_get(repo: str, config: str | None) -> str:
    conf = f" (config {config})" if config else ""
    return (
        f"download {repo}{conf} where there is network access, e.g. "
        f"`hf download --repo-type dataset {repo} --local-dir DIR`, and set benchmark.path: DIR"
    )


def load_rows(
    name: str, repo: str, config: str | None, split: str, path: str | os.PathLike | None, revision: str | None = None
) -> list[dict]:
    """The rows of one split as a list of dicts (column -> value)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise BenchmarkError(f"{name}: the `datasets` package is needed (pip install datasets)") from None
    if path is None:
        try:
            ds = datasets.load_dataset(repo, config, split=split, revision=revision)
        except Exception as err:  # noqa: BLE001 - datasets raises many types (ConnectionError, FileNotFoundError, ...)
            raise BenchmarkError(
                f"{name}: cannot load {repo} {config or ''} split {split} through datasets "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); offline, {_how_to_get(repo, config)}"
            ) from None
        return list(ds)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise BenchmarkError(f"{name}: benchmark.path {root} is not a folder; {_how_to_get(repo, config)}")
    found = _split_files(root, config, split)
    if found is None:
        where = f"{root}/{config + '/' if config else ''}"
        raise BenchmarkError(
            f"{name}: no files for split {split!r} under {root} (looked for {where}{split}-*.parquet, "
            f"{where}{split}/*.parquet, {where}{split}.jsonl); {_how_to_get(repo, config)}"
        )
    kind, files = found
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files={"rows": files}, split="rows")
    except Exception as err:  # noqa: BLE001
        raise BenchmarkError(f"{name}: cannot read {files[0]}: {type(err).__name__}: {err}") from None
    return list(ds)


def field(row: dict, key: str, name: str, where: str):
    try:
        return row[key]
    except KeyError:
        raise BenchmarkError(f"{name}: {where}: missing column {key!r} (has {', '.join(row)})") from None
