"""``export.dtype``: cast the (verified) model to the export dtype, refusing a cast that overflows."""

from __future__ import annotations

import torch
from torch import nn

from ..finite import count_overflows
from ..recipe import RecipeError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_dtype(model: nn.Module) -> str:
    return str(next(p.dtype for p in model.parameters() if p.is_floating_point())).removeprefix("torch.")


def _overflows(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Tensors of ``model`` that are finite now and would hold inf/NaN once cast to ``dtype``."""
    bad = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point() or t.device.type == "meta":
            continue
        n = count_overflows(t, dtype)
        if n:
            bad.append(f"{name} ({n} of {t.numel()} values beyond the {str(dtype).removeprefix('torch.')} range)")
    return bad


def check_castable(model: nn.Module, dtype: str | None) -> None:
    """RecipeError naming ``export.dtype`` and the tensors when casting ``model`` to ``dtype`` would turn a finite
    weight into inf/NaN. Checked right after loading (before a verify spends its time) and again at the cast."""
    current = model_dtype(model)
    target = dtype or current
    if target != current:
        bad = _overflows(model, DTYPES[target])
        if bad:
            raise RecipeError([f"export.dtype: {target}: " + "; ".join(bad[:5])
                               + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
                               + f"; keep {current} (remove export.dtype) or use bfloat16"])


def cast_for_export(model: nn.Module, dtype: str | None) -> str:
    """Cast ``model`` in place to ``dtype`` (None: keep the loaded dtype); return the export dtype.

    A cast that would turn a finite weight into inf/NaN is refused (:func:`check_castable`) before anything is
    changed or written."""
    check_castable(model, dtype)
    target = dtype or model_dtype(model)
    if target != model_dtype(model):
        model.to(DTYPES[target])
    return target


def scale_bytes(entries: list[dict], loaded: str | None, exported: str | None) -> list[dict]:
    """Manifest entries whose byte counts use the export dtype's element size (they were measured in the
    loaded dtype)."""
    if not loaded or not exported or loaded == exported or loaded not in DTYPES or exported not in DTYPES:
        return entries
    old, new = DTYPES[loaded].itemsize, DTYPES[exported].itemsize
    fields = ("bytes_dense", "bytes_stored", "bytes_saved")
    return [{**e, **{k: e[k] * new // old for k in fields if e.get(k) is not None}} for e in entries]
