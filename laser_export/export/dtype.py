"""``export.dtype``: cast the (verified) model to the export dtype and keep the manifest's byte counts true."""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BYTE_FIELDS = ("bytes_dense", "bytes_stored", "bytes_saved")


def model_dtype(model: nn.Module) -> str:
    return str(next(p.dtype for p in model.parameters() if p.is_floating_point())).removeprefix("torch.")


def cast_for_export(model: nn.Module, dtype: str | None, manifest: dict) -> str:
    """Cast ``model`` in place to ``dtype`` (None: keep the loaded dtype); return the export dtype.

    ``manifest["matrices"]`` entries are replaced by copies whose byte counts use the new element size, and
    ``manifest["totals"]["bytes_saved"]`` follows."""
    current = model_dtype(model)
    target = dtype or current
    if target != current:
        old, new = DTYPES[current].itemsize, DTYPES[target].itemsize
        model.to(DTYPES[target])
        manifest["matrices"] = [
            {**e, **{k: e[k] * new // old for k in _BYTE_FIELDS if e.get(k) is not None}}
            for e in manifest.get("matrices", [])
        ]
        manifest.setdefault("totals", {})["bytes_saved"] = sum(e["bytes_saved"] for e in manifest["matrices"])
    manifest["export_dtype"] = target
    return target
