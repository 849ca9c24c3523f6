"""Load a laser-export *factorised* checkpoint with plain transformers (no laser-export installed).

This file is copied into every factorised export and named in ``config.json``'s ``auto_map``, so

    AutoModelForCausalLM.from_pretrained(repo_or_folder, trust_remote_code=True)

gives the reduced model. It needs only torch and transformers (>= 5). The checkpoint stores each reduced
matrix W (out x in) as two factors, ``<module>.weight`` (k x in) and ``<module>.weight_out`` (out x k); the
ranks are in ``config.json`` under ``quantization_config: {quant_method: laser, ranks: {module: k}}``.
Importing this file registers that quantization method with transformers (unless laser-export already did),
whose hook swaps each named linear layer for a :class:`LowRankLinear` before the weights load. ``auto_map``
also names the generated config class, so ``AutoConfig.from_pretrained(..., trust_remote_code=True)`` imports
this file too: clients that read ``quantization_config`` before loading a model class (lm-eval's HFLM) find
``laser`` registered. Without ``trust_remote_code`` they stop with "Unknown quantization type"; plain
transformers stops on the factors' shapes: never a silently wrong model.

Fused tensors (an MoE's ``mlp.experts.gate_up_proj`` [experts, out, in], Phi-3's ``gate_up_proj``/``qkv_proj``)
can hold factorised blocks (one expert's matrix, one row block): ``quantization_config.fused`` gives, per fused
tensor, its shape and blocks ``{expert, rows, rank}``; the checkpoint holds under the tensor's name a flat 1-D
remainder (the rows left dense) and per block ``<tensor>_laser[_e<expert>]_r<start>_<stop>_left`` (rows, k) and
``_right`` (k, in). The tensor is rebuilt dense after loading, block by block (memory and compute are those of
the dense model; the checkpoint is smaller).

A checkpoint that lacks a factor, or holds one of another shape, is refused (``LaserLoadError``) instead of
loading random weights (also under ``ignore_mismatched_sizes=True``).
Generated classes for this checkpoint are appended at the end of the file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "laser"


class LaserLoadError(RuntimeError):
    """The checkpoint does not hold what its quantization_config says (a factor is missing)."""


class LowRankLinear(nn.Module):
    """y = (x @ weight.T) @ weight_out.T + bias, with weight (k, in) and weight_out (out, k)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.weight_out = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight), self.weight_out, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _is_factorised(module: nn.Module) -> bool:
    return hasattr(module, "weight_out") and hasattr(module, "rank")


def _swap(model: nn.Module, ranks: dict) -> None:
    for name, rank in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise LaserLoadError(f"quantization_config.ranks names {name!r}, which this model does not have") from None
        if _is_factorised(old):
            continue
        w = old.weight
        conv1d = type(old).__name__ == "Conv1D"  # GPT-2 stores (in, out)
        out_f, in_f = (w.shape[1], w.shape[0]) if conv1d else (w.shape[0], w.shape[1])
        new = LowRankLinear(in_f, out_f, int(rank), bias=old.bias is not None, device=w.device, dtype=w.dtype)
        model.set_submodule(name, new)


def _fused_names(tensor: str, expert, rows) -> tuple[str, str]:
    stem = f"{tensor}_laser" + (f"_e{expert}" if expert is not None else "") + f"_r{rows[0]}_{rows[1]}"
    return stem + "_left", stem + "_right"


def _keep_rows(shape, blocks) -> torch.Tensor:
    keep = torch.ones(math.prod(shape[:-1]), dtype=torch.bool, device="cpu")
    for b in blocks:
        base = (b["expert"] or 0) * shape[-2]
        keep[base + b["rows"][0] : base + b["rows"][1]] = False
    return keep


def _fused_shapes(fused: dict) -> dict:
    """Tensor name -> shape of what the checkpoint holds for the fused tensors."""
    out = {}
    for name, rec in fused.items():
        shape, blocks = rec["shape"], rec["blocks"]
        out[name] = [int(_keep_rows(shape, blocks).sum()) * int(shape[-1])]
        module, _, tensor = name.rpartition(".")
        for b in blocks:
            left, right = _fused_names(tensor, b["expert"], b["rows"])
            k = int(b["rank"])
            out[f"{module}.{left}"] = [b["rows"][1] - b["rows"][0], k]
            out[f"{module}.{right}"] = [k, int(shape[-1])]
    return out


def _check_fused(fused: dict, checkpoint_files) -> None:
    """The checkpoint's headers hold every fused remainder and factor with its recorded shape."""
    files = [str(f) for f in (checkpoint_files or [])]
    if not fused or not files or not all(f.endswith(".safetensors") for f in files):
        return
    from safetensors import safe_open

    stored = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            stored.update({k: list(sf.get_slice(k).get_shape()) for k in sf.keys()})
    problems = [f"{k} is missing" if k not in stored else f"{k} has shape {stored[k]}, the recorded blocks need {v}"
                for k, v in _fused_shapes(fused).items() if stored.get(k) != v]
    if problems:
        raise LaserLoadError("factorised checkpoint is incomplete: " + "; ".join(problems[:10]))


def _prepare_fused(model: nn.Module, fused: dict) -> None:
    """Before loading: each fused tensor becomes its stored form (remainder + factor parameters)."""
    shapes = _fused_shapes(fused)
    for name, rec in fused.items():
        module_name, _, tensor = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
            dense = module._parameters[tensor]
        except (AttributeError, KeyError):
            raise LaserLoadError(f"quantization_config.fused names {name!r}, which this model does not have") from None
        if list(dense.shape) != list(rec["shape"]):
            raise LaserLoadError(f"{name} has shape {list(dense.shape)}, the checkpoint records {rec['shape']}")
        for key in [name] + [k for k in shapes if k.startswith(f"{module_name}.{tensor}_laser_")]:
            module._parameters[key[len(module_name) + 1 :]] = nn.Parameter(
                torch.empty(shapes[key], device=dense.device, dtype=dense.dtype), requires_grad=False)


def _assemble_fused(model: nn.Module, fused: dict) -> None:
    """After loading: rebuild each fused tensor dense, one factorised block at a time."""
    for name, rec in fused.items():
        module_name, _, tensor = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape = rec["shape"]
        remainder = module._parameters[tensor].data
        dense = torch.empty(shape, dtype=remainder.dtype, device=remainder.device)
        rows = dense.view(-1, shape[-1])
        rows[_keep_rows(shape, rec["blocks"]).to(dense.device)] = remainder.view(-1, shape[-1])
        for b in rec["blocks"]:
            left, right = (module._parameters.pop(n).data for n in _fused_names(tensor, b["expert"], b["rows"]))
            base = (b["expert"] or 0) * shape[-2]
            rows[base + b["rows"][0] : base + b["rows"][1]] = (left.float() @ right.float()).to(dense.dtype)
        module._parameters[tensor] = nn.Parameter(dense)


class LaserConfig(QuantizationConfigMixin):
    def __init__(self, ranks: dict | None = None, laser_export_version: str | None = None, fused: dict | None = None,
                 **kwargs):
        self.quant_method = QUANT_METHOD
        self.ranks = dict(ranks or {})
        self.fused = dict(fused or {})
        self.laser_export_version = laser_export_version

    def to_dict(self) -> dict:
        out = {"quant_method": QUANT_METHOD, "ranks": dict(self.ranks),
               "laser_export_version": self.laser_export_version}
        return {**out, "fused": dict(self.fused)} if self.fused else out


class LaserQuantizer(HfQuantizer):
    requires_calibration = False

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        _swap(model, self.quantization_config.ranks)
        fused = getattr(self.quantization_config, "fused", None) or {}
        _check_fused(fused, checkpoint_files)
        _prepare_fused(model, fused)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        _assemble_fused(model, getattr(self.quantization_config, "fused", None) or {})
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:  # laser-export, when imported, registers its own
    register_quantization_config(QUANT_METHOD)(LaserConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(LaserQuantizer)


def _ranks(config, field: str = "ranks") -> dict:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return {}
    return dict(qc.get(field) or {}) if isinstance(qc, dict) else dict(getattr(qc, field, {}) or {})


class LaserLoadMixin:
    """from_pretrained that refuses a checkpoint whose factors are missing."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = []
        for name in _ranks(model.config):
            module = model.get_submodule(name)
            if not _is_factorised(module):
                problems.append(f"{name} was not replaced by its low-rank factors")
                continue
            missing = [k for k in info.get("missing_keys", ()) if k.startswith(name + ".")]
            problems += [f"{k} is missing from the checkpoint" for k in missing]
            # under ignore_mismatched_sizes=True transformers leaves a mis-shaped factor uninitialised: refuse it
            mismatched = [m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys", ())]
            problems += [f"{k} in the checkpoint does not have the shape its recorded rank implies"
                         for k in mismatched if str(k).startswith(name + ".")]
        mismatched = [str(m[0] if isinstance(m, (tuple, list)) else m) for m in info.get("mismatched_keys", ())]
        for name in _ranks(model.config, "fused"):  # a fused tensor's remainder and block factors
            ours = [k for k in info.get("missing_keys", ()) if k == name or k.startswith(f"{name}_laser_")]
            problems += [f"{k} is missing from the checkpoint" for k in ours]
            problems += [f"{k} in the checkpoint does not have its recorded shape" for k in mismatched
                         if k == name or k.startswith(f"{name}_laser_")]
        if problems:
            raise LaserLoadError("factorised checkpoint is incomplete: " + "; ".join(problems[:10]))
        return (model, info) if want_info else model


# ---- generated for this checkpoint by laser-export (below) ----
