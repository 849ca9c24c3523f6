"""The export manifest, built in one place from typed pieces: the source, the per-matrix entries, the
checkpoint as read back, and one record per extra format (:class:`laser_export.artifacts.Manifest`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from .. import __version__
from ..artifacts import CheckpointInfo, Manifest, MatrixEntry, SourceInfo, Totals
from .dtype import scale_bytes


def public_source(source) -> str:
    """How a resolved source is named in what an export publishes: a Hub id or a package spec as written, a
    local folder or file by its name only (never a local absolute path)."""
    if source.kind in ("hub", "package"):
        return source.spec or source.location
    return source.gguf_file if source.gguf_file else Path(source.location).name


def source_tensor_bytes(source) -> int | None:
    """Bytes of the source's weights as stored: the safetensors files transformers loads (their tensors), or
    the GGUF file; None when they are not on this machine."""
    from .readback import checkpoint_files
    from .safetensors import read_safetensors_header

    if source.gguf_file:
        path = Path(source.location) / source.gguf_file
        return path.stat().st_size if path.is_file() else None
    folder = Path(source.location)
    if source.kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source.location, revision=source.revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache: unknown
            return None
    try:
        total = 0
        for name in checkpoint_files(folder):
            for info in read_safetensors_header(folder / name).values():
                start, end = info["data_offsets"]
                total += end - start
        return total or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def card_language(source) -> str | list[str] | None:
    """The ``language`` of the source's own model card (README.md front matter): a local folder's, or a Hub
    source's from the local Hub cache (no download); None when absent, unreadable or not valid ISO 639 codes."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    from ..recipe import _language

    card = None
    if source.kind == "folder":
        card = Path(source.location) / "README.md"
    elif source.kind == "hub":
        found = try_to_load_from_cache(source.location, "README.md", revision=source.revision)
        card = Path(found) if isinstance(found, str) else None
    try:
        meta = metadata_load(card) if card is not None and card.is_file() else None
        return _language((meta or {}).get("language"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def source_info(p) -> SourceInfo:
    m = p.recipe.model
    info = {"source": public_source(p.source), "revision": p.source.revision, "architecture": p.family.name,
            "model_type": p.config.model_type, "base_model": m.base_model, "license": m.license,
            "language": m.language or card_language(p.source),
            "dtype": p.loaded_dtype or m.dtype, "tensor_bytes": source_tensor_bytes(p.source)}
    compute = getattr(p, "compute_dtype", None)
    if compute not in (None, p.loaded_dtype):  # model.compute_dtype, when it differs from the weights' dtype
        info["compute_dtype"] = compute
    if p.source.gguf_file:
        from .gguf import gguf_quantization

        info.update(format="gguf", gguf_file=p.source.gguf_file,
                    gguf_quantization=gguf_quantization(Path(p.source.location) / p.source.gguf_file))
    else:
        info["format"] = "transformers"
    return SourceInfo(**info)


def build_manifest(p, entries: list[dict], *, export_dtype: str | None, checkpoint: CheckpointInfo,
                   streamed: bool, auto_map: dict | None = None, formats: dict[str, BaseModel] | None = None,
                   source: SourceInfo | None = None) -> Manifest:
    """The manifest of ``p``'s export (``p``: a :class:`laser_export.pipeline.Plan`). ``entries``: one per reduced
    matrix, measured in the loaded dtype (their byte counts are rescaled to ``export_dtype``)."""
    source = source or source_info(p)
    matrices = [MatrixEntry.model_validate(e) for e in scale_bytes(entries, source.dtype, export_dtype)]
    return Manifest(
        laser_export_version=__version__, recipe=p.recipe.name, model=source, storage=p.recipe.storage,
        export_dtype=export_dtype, reduction=p.recipe.reduction.model_dump(), matrices=matrices,
        totals=Totals(n_matrices=len(matrices), bytes_saved=sum(e.bytes_saved for e in matrices)),
        checkpoint=checkpoint, auto_map=auto_map or None, streamed=streamed, **(formats or {}),
    )
