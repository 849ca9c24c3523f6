"""Export formats besides the safetensors checkpoint: one object per format, one interface.

A format says what it needs (``needs_model``: the reduced model in memory; a streamed export cannot give
it), writes its files into the export folder (``write``), and returns what it records in the manifest
(a typed :mod:`laser_export.artifacts` model stored under ``manifest.<name>``). The safetensors
checkpoint itself is always written, by :mod:`laser_export.export.writer`. Adding a format: one object
here (entry points of its own module) plus the family capability field that allows it.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from ..artifacts import GgufInfo, OnnxInfo
from ..progress import console, status


@dataclass
class FormatInput:
    """What a format may use: the plan, the reduced model and tokenizer, the folder being written (whose
    safetensors checkpoint is already in place and read back) and the export dtype."""

    plan: object
    model: object
    tokenizer: object
    folder: Path
    export_dtype: str
    source: dict | None = None  # the manifest's ``model`` record (provenance)
    progress: bool = True


class ExportFormat(Protocol):
    name: str
    needs_model: bool

    def write(self, x: FormatInput) -> BaseModel: ...


class OnnxFormat:
    """``onnx/model.onnx`` or ``model_fp16.onnx`` (+ external data, + ``model_quantized.onnx`` on request), checked
    against onnxruntime (:func:`export.onnx.export_onnx`)."""

    name, needs_model = "onnx", True

    def write(self, x: FormatInput) -> OnnxInfo:
        from .onnx import export_onnx, write_transformers_js_config

        export = x.plan.recipe.export
        quiet = contextlib.redirect_stdout(io.StringIO()) if not x.progress else contextlib.nullcontext()
        with status("exporting ONNX and checking parity with onnxruntime", x.progress), quiet:  # torch.onnx prints
            info = export_onnx(x.model, x.tokenizer, x.folder / "onnx", with_past=export.onnx_with_past,
                               tolerance=export.onnx_tolerance, quantized=export.onnx_quantized)
        write_transformers_js_config(x.folder, info)  # transformers.js_config in config.json (external data, fp16)
        for entry in (info, info.get("quantized") or {}):  # the layout transformers.js and optimum expect
            for key in ("file", "external_data"):
                if entry.get(key):
                    entry[key] = f"onnx/{entry[key]}"
        console.print(f"ONNX parity: max |Δlogits| {info['max_abs_diff']:.2e} ≤ {info['tolerance']:.0e} "
                      "(onnxruntime vs torch, padded batch + decode step)")
        return OnnxInfo.model_validate(info)


class GgufFormat:
    """``<name>.gguf`` for llama.cpp, checked against the safetensors export (:func:`export.gguf.write_gguf`)."""

    name, needs_model = "gguf", True

    def write(self, x: FormatInput) -> GgufInfo:
        import torch
        import transformers

        from .gguf import write_gguf

        p = x.plan
        auto = getattr(transformers, p.family.auto_class)
        source = Path(p.source.location) / p.source.gguf_file if p.source.gguf_file else None
        with status("writing GGUF and checking it against the safetensors export", x.progress):
            reference = auto.from_pretrained(x.folder, dtype=torch.float32).eval()  # the export as written
            info = write_gguf(x.model, x.folder / f"{p.recipe.name}.gguf", arch=p.family.gguf_arch,
                              dtype=x.export_dtype, source_gguf=source, name=p.recipe.name, reference=reference,
                              tokenizer=x.tokenizer, quantized=p.recipe.export.gguf_types, provenance=x.source)
        return GgufInfo.model_validate(info)


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (OnnxFormat(), GgufFormat())}


def formats_of(recipe) -> list[ExportFormat]:
    """The recipe's formats beyond safetensors, in the order they are written."""
    return [FORMATS[name] for name in recipe.export.formats if name in FORMATS]
