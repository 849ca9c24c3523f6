"""Matrices that are part of a parameter: a row block of a fused 2-D weight (Phi-3's ``gate_up_proj``,
ModernBERT's ``Wi``/``Wqkv``), one expert's (out, in) slice of a fused 3-D expert tensor
(transformers 5's Mixtral/Qwen3-MoE ``mlp.experts.gate_up_proj`` ``[E, 2·I, H]``, ``down_proj``
``[E, H, I]``), or a module that is not a plain linear layer (an MoE router).

Each is handled through a *view* of its block: the SVD reads one block (one expert's matrix, one row
block; never a float64 copy of the whole fused tensor), the reduced block is written back into the
fused tensor in place, and the undo keeps a copy of that block only.

Factorised storage of a block (:func:`factorise_block`): the block's thin factors (left ``(rows, k)``,
right ``(k, in)``, in the weight's dtype) are kept on the fused module (``_laser_fused``) and the block
holds their product, so the model in memory computes exactly what the factorised checkpoint loads. The
checkpoint (:func:`stored_form`) holds, per fused tensor with factorised blocks: under the tensor's own
name a flat 1-D *remainder* (the blocks left dense, in row order; plain transformers stops on its shape),
and per block ``<tensor>_laser[_e<expert>]_r<start>_<stop>_left`` / ``_right``. ``quantization_config.fused``
records ``{tensor name: {"shape", "blocks": [{"expert", "rows", "rank"}]}}``; the loader
(:func:`prepare_fused` before the weights load, :func:`assemble_fused` after) rebuilds the dense tensor block
by block. In memory the loaded model is dense (transformers' fused expert code reads whole tensors): the
factorised form saves checkpoint bytes, not memory or compute. The shipped remote code
(``remote/modeling_laser.py``) carries its own copy of the loader.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .architectures import ArchitectureError, Family, base_prefix, is_fused, matrix_spec, row_block

FUSED_ATTR = "_laser_fused"  # on a fused module: {tensor: {(expert, start, stop): (left, right)}}


@dataclass(frozen=True)
class BlockRef:
    """Where one matrix lives: parameter ``tensor`` of module ``module``, expert ``expert`` (dim 0) and rows
    ``rows`` [start, stop) of what remains. ``name`` is unique per matrix (manifest, SVD cache key)."""

    name: str
    module: str
    tensor: str
    expert: int | None
    rows: tuple[int, int] | None

    def parameter(self, model: nn.Module) -> torch.Tensor:
        try:
            t = getattr(model.get_submodule(self.module), self.tensor)
        except AttributeError:
            raise ArchitectureError(f"{self.name}: the model has no tensor {self.module}.{self.tensor}") from None
        if not isinstance(t, torch.Tensor) or t.dim() != (2 if self.expert is None else 3):
            raise ArchitectureError(f"{self.name}: {self.module}.{self.tensor} is not a "
                                    f"{'2-D matrix' if self.expert is None else '3-D [experts, out, in] tensor'}")
        return t

    def matrix(self, model: nn.Module) -> torch.Tensor:
        """The (out, in) block as a view of the fused tensor (no copy)."""
        t = self.parameter(model).data
        if self.expert is not None:
            t = t[self.expert]
        return t if self.rows is None else t[self.rows[0] : self.rows[1]]

    def write(self, model: nn.Module, new: torch.Tensor, undoable: bool) -> Callable[[], None]:
        """Copy ``new`` into the block in place; returns what puts the old block back (bit-exact)."""
        view = self.matrix(model)
        if tuple(new.shape) != tuple(view.shape):
            raise ArchitectureError(f"{self.name}: block shape {list(view.shape)}, got {list(new.shape)}")
        old = view.clone() if undoable else None
        with torch.no_grad():
            view.copy_(new.to(device=view.device, dtype=view.dtype))
        # the block's factors, if it was factorised (a factorised export used as the source): no longer its value
        store = (getattr(model.get_submodule(self.module), FUSED_ATTR, None) or {}).get(self.tensor, {})
        rows = self.rows or (0, int(view.shape[0]))
        key = (self.expert, rows[0], rows[1])
        factors = store.pop(key, None)

        def restore():
            if old is not None:
                with torch.no_grad():
                    self.matrix(model).copy_(old)
                if factors is not None:
                    store[key] = factors

        return restore


def block_ref(model: nn.Module, family: Family, layer: int, alias: str, expert: int | None = None) -> BlockRef:
    """The :class:`BlockRef` of a fused alias at ``layer`` (``expert`` for an expert tensor)."""
    spec = matrix_spec(family, alias)
    module = f"{base_prefix(model)}{family.layers}.{layer}.{spec.module}"
    if (expert is None) != (spec.experts is None):
        raise ArchitectureError(f"{family.name} {alias}: " + ("an expert index is needed" if expert is None
                                                              else "has no experts"))
    ref = BlockRef(f"{module}.{spec.tensor}", module, spec.tensor, expert, None)
    t = ref.parameter(model)
    rows = row_block(family, alias, model.config, int(t.shape[-2]))
    name = ref.name + (f"[{expert}]" if expert is not None else "") + (f"[{rows[0]}:{rows[1]}]" if rows else "")
    return BlockRef(name, module, spec.tensor, expert, rows)


# ---------------------------------------------------------------- factorised storage of fused blocks
def global_rows(shape, expert: int | None, rows: tuple[int, int] | None) -> tuple[int, int]:
    """The block's rows in the fused tensor seen as 2-D ``[(experts·)rows, in]``."""
    n = int(shape[-2])
    base = (expert or 0) * n
    r0, r1 = rows if rows is not None else (0, n)
    return base + r0, base + r1


def factor_names(tensor: str, expert: int | None, rows: tuple[int, int]) -> tuple[str, str]:
    """Parameter names (on the fused module) of a block's left (rows, k) and right (k, in) factors."""
    stem = f"{tensor}_laser" + (f"_e{expert}" if expert is not None else "") + f"_r{rows[0]}_{rows[1]}"
    return stem + "_left", stem + "_right"


def factorise_block(model: nn.Module, ref: BlockRef, left: torch.Tensor, right: torch.Tensor,
                    undoable: bool) -> Callable[[], None]:
    """Store the block as thin factors (kept on the fused module for the export) and write their product
    (float32 matmul of the factors in the weight's dtype: what a factorised checkpoint loads) into the block.
    Returns what undoes both."""
    view = ref.matrix(model)
    left, right = left.to(view.device, view.dtype), right.to(view.device, view.dtype)
    product = (left.float() @ right.float()).to(view.dtype)
    restore = ref.write(model, product, undoable)
    module = model.get_submodule(ref.module)
    rows = ref.rows or (0, int(view.shape[0]))
    key = (ref.expert, rows[0], rows[1])
    store = getattr(module, FUSED_ATTR, None)
    if store is None:
        store = {}
        setattr(module, FUSED_ATTR, store)
    store.setdefault(ref.tensor, {})[key] = (left.detach(), right.detach())

    def undo():
        store.get(ref.tensor, {}).pop(key, None)
        restore()

    return undo


def fused_records(model: nn.Module) -> dict[str, dict]:
    """``quantization_config.fused`` of a model with factorised blocks (empty when it has none)."""
    out = {}
    for name, module in model.named_modules():
        for tensor, blocks in sorted((getattr(module, FUSED_ATTR, None) or {}).items()):
            if not blocks:
                continue
            shape = list(getattr(module, tensor).shape)
            out[f"{name}.{tensor}" if name else tensor] = {"shape": shape, "blocks": [
                {"expert": e, "rows": [r0, r1], "rank": int(f[0].shape[1])}
                for (e, r0, r1), f in sorted(blocks.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1]))]}
    return out


def keep_mask(shape, blocks: list[dict]) -> torch.Tensor:
    """Rows of the 2-D view that stay dense (not in any factorised block)."""
    keep = torch.ones(math.prod(shape[:-1]), dtype=torch.bool, device="cpu")
    for b in blocks:
        g0, g1 = global_rows(shape, b["expert"], tuple(b["rows"]))
        keep[g0:g1] = False
    return keep


def expected_shapes(fused: dict[str, dict]) -> dict[str, list[int]]:
    """Tensor name → shape of everything the checkpoint holds for the fused tensors: the flat remainder
    under each tensor's own name, then each block's left and right factors."""
    out = {}
    for name, rec in fused.items():
        shape, blocks = rec["shape"], rec["blocks"]
        out[name] = [int(keep_mask(shape, blocks).sum()) * int(shape[-1])]
        module, _, tensor = name.rpartition(".")
        for b in blocks:
            left, right = factor_names(tensor, b["expert"], tuple(b["rows"]))
            rows, k = b["rows"][1] - b["rows"][0], int(b["rank"])
            out[f"{module}.{left}" if module else left] = [rows, k]
            out[f"{module}.{right}" if module else right] = [k, int(shape[-1])]
    return out


@contextmanager
def stored_form(model: nn.Module):
    """While inside: every fused tensor with factorised blocks is replaced by its stored form (flat remainder
    under its own name, factors as parameters), so ``state_dict``/``save_pretrained`` write the factorised
    checkpoint; on exit the dense tensors are put back (the same objects). Yields the ``fused`` records."""
    fused = fused_records(model)
    saved = []
    try:
        for name, rec in fused.items():
            module_name, _, tensor = name.rpartition(".")
            module = model.get_submodule(module_name)
            dense = getattr(module, tensor)
            rows2d = dense.data.reshape(-1, dense.shape[-1])
            remainder = rows2d[keep_mask(rec["shape"], rec["blocks"]).to(rows2d.device)].reshape(-1)
            saved.append((module, tensor, dense, []))
            module._parameters[tensor] = nn.Parameter(remainder, requires_grad=False)
            for (e, r0, r1), (left, right) in getattr(module, FUSED_ATTR)[tensor].items():
                for pname, t in zip(factor_names(tensor, e, (r0, r1)), (left, right)):  # in the tensor's dtype
                    module.register_parameter(pname, nn.Parameter(t.to(dense.dtype), requires_grad=False))
                    saved[-1][3].append(pname)
        yield fused
    finally:
        for module, tensor, dense, names in saved:
            for pname in names:
                del module._parameters[pname]
            module._parameters[tensor] = dense


def prepare_fused(model: nn.Module, fused: dict[str, dict]) -> None:
    """Before the weights load: each recorded fused tensor becomes its stored form (empty remainder and
    factor parameters, on the tensor's device and dtype) for transformers to load into."""
    shapes = expected_shapes(fused)
    for name in fused:
        module_name, _, tensor = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
            dense = module._parameters[tensor]
        except (AttributeError, KeyError):
            raise ArchitectureError(f"quantization_config.fused names {name!r}, which this model does not have") from None
        if list(dense.shape) != list(fused[name]["shape"]):
            raise ArchitectureError(f"quantization_config.fused: {name} has shape {list(dense.shape)} in this model, "
                                    f"the checkpoint records {fused[name]['shape']}")
        prefix = f"{module_name}." if module_name else ""
        for key in [name] + [k for k in shapes if k.startswith(f"{prefix}{tensor}_laser_")]:
            module._parameters[key[len(prefix):]] = nn.Parameter(
                torch.empty(shapes[key], device=dense.device, dtype=dense.dtype), requires_grad=False)


def assemble_fused(model: nn.Module, fused: dict[str, dict], keep_factors: bool = True) -> None:
    """After the weights load: rebuild each recorded fused tensor dense (remainder rows, then each block as
    the float32 product of its factors, one block at a time) and drop the stored-form parameters;
    ``keep_factors`` keeps the factors on the module (a later factorised export writes them again)."""
    for name, rec in fused.items():
        module_name, _, tensor = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape, blocks = rec["shape"], rec["blocks"]
        remainder = module._parameters[tensor].data
        dense = torch.empty(shape, dtype=remainder.dtype, device=remainder.device)
        rows2d = dense.view(-1, shape[-1])
        rows2d[keep_mask(shape, blocks).to(dense.device)] = remainder.view(-1, shape[-1])
        store = {}
        for b in blocks:
            e, rows = b["expert"], tuple(b["rows"])
            left, right = (module._parameters.pop(n).data for n in factor_names(tensor, e, rows))
            g0, g1 = global_rows(shape, e, rows)
            rows2d[g0:g1] = (left.float() @ right.float()).to(dense.dtype)
            store[(e, rows[0], rows[1])] = (left, right)
        module._parameters[tensor] = nn.Parameter(dense)
        if keep_factors:
            if getattr(module, FUSED_ATTR, None) is None:
                setattr(module, FUSED_ATTR, {})
            getattr(module, FUSED_ATTR)[tensor] = store
