"""``from_pretrained`` support for factorised checkpoints (transformers' pluggable quantizer API).

A factorised export writes ``"quantization_config": {"quant_method": "laser", "ranks": {module: k}}``
into ``config.json``. With ``laser_export`` imported, the registered :class:`LaserQuantizer` swaps
each named ``nn.Linear``/``Conv1D`` for a :class:`~laser_export.lowrank.LowRankLinear` of that rank
before the weights load, so ``AutoModelForCausalLM.from_pretrained(folder)`` gives the reduced model.

Without ``laser_export``, transformers only *warns* about the unknown quantization type and loads the
plain architecture. That must not load silently wrong weights, and it does not: the factorised
module's right factor is stored under ``<module>.weight`` with shape (k, in) where the plain module
expects (out, in), so the plain loader stops with a size-mismatch error (see tests/test_roundtrip.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .lowrank import LowRankLinear, is_conv1d

QUANT_METHOD = "laser"


class LaserConfig(QuantizationConfigMixin):
    """``ranks``: qualified module name → rank of its LowRankLinear replacement. ``fused``: fused tensor
    name → its shape and factorised blocks (:mod:`laser_export.fused`)."""

    def __init__(self, ranks: dict[str, int] | None = None, laser_export_version: str | None = None,
                 fused: dict | None = None, **kwargs):
        from . import __version__

        self.quant_method = QUANT_METHOD
        self.ranks = dict(ranks or {})
        self.fused = dict(fused or {})
        self.laser_export_version = laser_export_version or __version__

    def to_dict(self) -> dict[str, Any]:
        out = {
            "quant_method": QUANT_METHOD,
            "ranks": dict(self.ranks),
            "laser_export_version": self.laser_export_version,
        }
        return {**out, "fused": dict(self.fused)} if self.fused else out


def swap_to_lowrank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each named Linear/Conv1D with an (uninitialised) LowRankLinear of the given rank."""
    for name, rank in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantization_config.ranks names {name!r}, which this model does not have") from None
        if isinstance(old, LowRankLinear):
            continue
        w = old.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if is_conv1d(old) else (w.shape[0], w.shape[1])
        new = LowRankLinear(in_f, out_f, int(rank), bias=old.bias is not None, device=w.device, dtype=w.dtype)
        new.dense_class = type(old)  # what the product of the factors is, for a later dense write-back
        model.set_submodule(name, new)


def check_factors(model: nn.Module, ranks: dict[str, int], checkpoint_files, fused: dict | None = None) -> None:
    """Every factor of every factorised module is in the checkpoint with the shape its rank implies.

    transformers would otherwise leave a missing factor as uninitialised memory (it does not know how
    to initialise a LowRankLinear) and load without an error. Raises ValueError listing the problems."""
    from safetensors import safe_open

    stored: dict[str, list[int]] = {}
    files = [str(f) for f in (checkpoint_files or [])]
    if not files or not all(f.endswith(".safetensors") for f in files):
        return  # only safetensors checkpoints carry a header to check (laser-export writes safetensors)
    for f in files:
        with safe_open(f, framework="pt") as sf:  # reads the header only
            stored.update({k: list(sf.get_slice(k).get_shape()) for k in sf.keys()})
    from .fused import expected_shapes

    prefix = getattr(model, "base_model_prefix", "")
    problems = []
    wanted = {}  # tensor name -> (shape, what explains it)
    for name, rank in ranks.items():
        mod = model.get_submodule(name)
        want = {"weight": [int(rank), mod.in_features], "weight_out": [mod.out_features, int(rank)]}
        if mod.bias is not None:
            want["bias"] = [mod.out_features]
        wanted.update({f"{name}.{part}": (shape, f"rank {rank}") for part, shape in want.items()})
    wanted.update({k: (v, "quantization_config.fused") for k, v in expected_shapes(fused or {}).items()})
    for key, (shape, why) in wanted.items():
        candidates = [key, f"{prefix}.{key}" if prefix else key, key.removeprefix(f"{prefix}.")]
        found = next((stored[c] for c in candidates if c in stored), None)
        if found is None:  # transformers may save under legacy prefixes (Gemma3: language_model.model.*)
            found = _unique_suffix_match(stored, key)
        if found is None:
            problems.append(f"{key} is missing")
        elif list(found) != shape:
            problems.append(f"{key} has shape {list(found)}, {why} needs {shape}")
    if problems:
        raise ValueError(
            "factorised checkpoint is incomplete or inconsistent with its quantization_config: "
            + "; ".join(problems[:8]) + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")
        )


def _unique_suffix_match(stored: dict[str, list[int]], key: str) -> list[int] | None:
    """The shape of the one stored tensor whose name ends with the longest tail of ``key`` (at least the
    layer index, module path and tensor name), or None when no tail matches exactly one stored name."""
    parts = key.split(".")
    for start in range(1, max(1, len(parts) - 3)):
        tail = "." + ".".join(parts[start:])
        hits = [k for k in stored if k.endswith(tail)]
        if len(hits) == 1:
            return stored[hits[0]]
        if len(hits) > 1:
            return None
    return None


class LaserQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: LaserConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .fused import prepare_fused

        fused = getattr(self.quantization_config, "fused", None) or {}
        swap_to_lowrank(model, self.quantization_config.ranks)
        check_factors(model, self.quantization_config.ranks, checkpoint_files, fused)
        prepare_fused(model, fused)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .fused import assemble_fused

        assemble_fused(model, getattr(self.quantization_config, "fused", None) or {})
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register the 'laser' quantization method with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LaserConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LaserQuantizer)


def mark_factorised(model: nn.Module) -> dict[str, int]:
    """Record the LowRankLinear modules (and factorised fused blocks, :mod:`laser_export.fused`) of an
    in-memory model in its config, so save_pretrained writes the quantization_config that from_pretrained
    needs. Returns the ranks."""
    from .fused import fused_records

    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    fused = fused_records(model)
    if ranks or fused:
        model.config.quantization_config = LaserConfig(ranks, fused=fused)
    elif getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return ranks


register()
