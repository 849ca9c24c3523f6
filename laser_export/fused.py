"""Matrices that are part of a parameter: a row block of a fused 2-D weight (Phi-3's ``gate_up_proj``,
ModernBERT's ``Wi``/``Wqkv``), one expert's (out, in) slice of a fused 3-D expert tensor
(transformers 5's Mixtral/Qwen3-MoE ``mlp.experts.gate_up_proj`` ``[E, 2·I, H]``, ``down_proj``
``[E, H, I]``), or a module that is not a plain linear layer (an MoE router).

Each is handled through a *view* of its block: the SVD reads one block (one expert's matrix, one row
block; never a float64 copy of the whole fused tensor), the reduced block is written back into the
fused tensor in place, and the undo keeps a copy of that block only. Storage is dense: the factorised
form of a block is refused by :func:`refuse_factorised` (at ``check`` time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .architectures import ArchitectureError, Family, base_prefix, is_fused, matrix_spec, row_block


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

        def restore():
            if old is not None:
                with torch.no_grad():
                    self.matrix(model).copy_(old)

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


def refuse_factorised(targets, family: Family, storage: str) -> list[str]:
    """Recipe problems for a factorised recipe that names a fused alias (one line per intervention)."""
    if storage != "factorised":
        return []
    out, seen = [], set()
    for t in targets:
        if is_fused(family, t.alias) and t.index not in seen:
            seen.add(t.index)
            out.append(f"{t.field}.matrix: {t.alias} of {family.name} is part of a fused tensor "
                       f"({matrix_spec(family, t.alias).module}); its factorised form is not supported yet: "
                       "use storage: dense")
    return out
