"""Streaming reduction of fused blocks (:mod:`laser_export.fused`): MoE experts and row blocks, shard by shard.

Where a fused tensor's rows live in the checkpoint comes from transformers' own save mapping
(``revert_weight_conversion``) applied to a small *index* tensor of the fused tensor's shape with one column:
each checkpoint tensor it names receives the global row numbers (``[(expert·)rows]`` of the fused tensor seen
as 2-D) that it holds. That covers the Hub's per-expert layout (Mixtral's ``block_sparse_moe.experts.N.w1``,
Qwen3-MoE's ``mlp.experts.N.gate_proj``), a fused 2-D weight (Phi-3's ``gate_up_proj``) and a checkpoint saved
under the in-memory names, without naming a family.

Two output layouts, each the one the in-memory export writes:

* no factorised block: the source's layout; a checkpoint tensor holding reduced blocks is read, its blocks
  reduced one at a time (one block's SVD), and written under its own name;
* factorised blocks: transformers' in-memory names for every tensor (``save_original_format=False``); each
  fused tensor is assembled from its checkpoint tensors (one fused tensor in memory at a time), its blocks
  reduced, and written as the flat remainder plus the blocks' factors (:func:`laser_export.fused.stored_form`).

Entries, SVDs, casts and factor products are those of the in-memory path, so both exports are equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .architectures import is_fused
from .export.shards import OutTensor
from .fused import global_rows, keep_mask, block_ref, factor_names
from .intervene import SVDCache, frobenius_norm, truncation_error
from .artifacts import matrix_entry
from .lowrank import factorised_saves_bytes
from .errors import InputError
from .recipe import RecipeError


@dataclass(frozen=True)
class Piece:
    """Checkpoint tensor ``key`` holds global rows [g0, g1) of a (fused) tensor seen as 2-D."""

    key: str
    g0: int
    g1: int


@dataclass
class _Block:
    target: object
    name: str  # the manifest name (fused.BlockRef.name)
    tensor: str  # the fused tensor's in-memory name
    expert: int | None
    rows: tuple[int, int]
    g0: int
    g1: int
    shape: tuple[int, int]
    rank: int
    factorised: bool


class FusedLayoutError(InputError):
    """A fused tensor's rows are not where streaming can find them in the checkpoint (use the in-memory path)."""


def _error(msg: str) -> FusedLayoutError:
    return FusedLayoutError(msg)


def pieces(model, name: str, t: torch.Tensor, by_key: dict) -> list[Piece] | None:
    """Where the rows of ``name`` (tensor ``t`` of ``model``, meta) are in the checkpoint; None when it is not
    there (a tied weight saved once). FusedLayoutError when the mapping is not a plain split of rows."""
    from transformers.core_model_loading import revert_weight_conversion

    rows = math.prod(t.shape[:-1]) if t.dim() > 1 else t.numel()
    cols = int(t.shape[-1]) if t.dim() > 1 else 1
    if name in by_key:
        return [Piece(name, 0, rows)]
    index = torch.arange(rows).view(*t.shape[:-1], 1) if t.dim() > 1 else torch.arange(rows)
    out = []
    for key, idx in revert_weight_conversion(model, {name: index}).items():
        if key not in by_key:
            return None
        g = idx.reshape(-1)
        src = by_key[key]
        contiguous = bool((g[1:] - g[:-1] == 1).all()) if g.numel() > 1 else True
        if not contiguous or math.prod(src.shape) != g.numel() * cols:
            raise _error(f"{src.file.parent}: {key} does not hold a plain block of rows of {name}; use the "
                         "in-memory path")
        out.append(Piece(key, int(g[0]), int(g[-1]) + 1))
    return sorted(out, key=lambda p: p.g0)


@dataclass
class FusedStream:
    """The fused targets of a plan, as found in the checkpoint, and the tensors that stand for them."""

    p: object
    model: object
    src: object
    blocks: list[_Block] = field(default_factory=list)
    entries: dict[int, dict] = field(default_factory=dict)
    _pending: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self.cache = SVDCache(self.p.recipe.reduction, max_bytes=0)
        self.state = self.model.state_dict()  # meta tensors: names and shapes
        self._found: dict[str, list[Piece] | None] = {}
        self._inside: dict[str, list] | None = None
        problems = []
        for t in self.p.targets:
            if not is_fused(self.p.family, t.alias):
                continue
            ref = block_ref(self.model, self.p.family, t.layer, t.alias, t.expert)
            tensor = f"{ref.module}.{ref.tensor}"
            full = tuple(ref.parameter(self.model).shape)
            rows = ref.rows or (0, int(full[-2]))
            shape = (rows[1] - rows[0], int(full[-1]))
            g0, g1 = global_rows(full, ref.expert, rows)
            if t.is_auto:
                t = t.with_auto_rank(self._read_rows(tensor, g0, g1))
            k = t.rank_for(shape)
            if k > min(shape):
                problems.append(f"{t.field}.rank: {ref.name} has shape {list(shape)}, max rank {min(shape)}, got {k}")
            factorised = (self.p.recipe.storage == "factorised" and k < min(shape) and factorised_saves_bytes(k, shape))
            self.blocks.append(_Block(t, ref.name, tensor, ref.expert, rows, g0, g1, shape, k, factorised))
        if problems:
            raise RecipeError(problems)

    @property
    def fused_layout(self) -> bool:
        return any(b.factorised for b in self.blocks)

    def records(self) -> dict[str, dict]:
        """``quantization_config.fused`` (as :func:`laser_export.fused.fused_records` gives in memory)."""
        out: dict[str, dict] = {}
        for b in sorted((b for b in self.blocks if b.factorised), key=lambda b: (b.tensor, b.expert or 0, b.rows[0])):
            shape = list(self.state[b.tensor].shape)
            out.setdefault(b.tensor, {"shape": shape, "blocks": []})["blocks"].append(
                {"expert": b.expert, "rows": list(b.rows), "rank": b.rank})
        return dict(sorted(out.items()))

    # ---- reading
    def _where(self, name: str) -> list[Piece] | None:
        if name not in self._found:
            self._found[name] = pieces(self.model, name, self.state[name], self.src.by_key)
        return self._found[name]

    def _pieces(self, name: str) -> list[Piece]:
        found = self._where(name)
        if found is None:
            raise _error(f"{self.src.folder}: checkpoint has no tensor for {name}; use the in-memory path")
        return found

    def _read_rows(self, name: str, g0: int, g1: int) -> torch.Tensor:
        t = self.state[name]
        cols = int(t.shape[-1]) if t.dim() > 1 else 1
        parts = [self.src.read(pc.key).reshape(-1, cols)[max(g0, pc.g0) - pc.g0 : min(g1, pc.g1) - pc.g0]
                 for pc in self._pieces(name) if pc.g0 < g1 and g0 < pc.g1]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # ---- reducing
    def _reduce(self, b: _Block, rows2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Reduce block ``b`` held by ``rows2d`` (its own rows, written in place when dense); returns its
        factors (in the output dtype) when factorised. Records the manifest entry."""
        matrix = rows2d
        itemsize = matrix.element_size()
        if b.rank == min(b.shape):
            self.entries[id(b.target)] = matrix_entry(b.target, b.name, b.shape, b.rank, "dense", itemsize, 0.0,
                                                      frobenius_norm(matrix)).as_dict()
            return None
        svd = self.cache.get(b.name, matrix, b.rank)
        err, norm = truncation_error(matrix, svd, b.rank)
        storage = "factorised" if b.factorised else "dense"
        self.entries[id(b.target)] = matrix_entry(b.target, b.name, b.shape, b.rank, storage, itemsize, err,
                                                  norm).as_dict()
        if not b.factorised:
            rows2d.copy_(svd.reconstruct(b.rank, dtype=matrix.dtype))
            return None
        left, right = (f.to(matrix.dtype) for f in svd.factors(b.rank))
        rows2d.copy_((left.float() @ right.float()).to(matrix.dtype))
        return left, right

    # ---- source layout (no factorised block)
    def source_tensors(self, st) -> list[OutTensor] | None:
        """The output standing for source tensor ``st`` when it holds reduced blocks (else None)."""
        if self._inside is None:  # source key -> [(block, first row, stop row) inside that tensor]
            self._inside = {}
            for b in self.blocks:
                hits = [pc for pc in self._pieces(b.tensor) if pc.g0 < b.g1 and b.g0 < pc.g1]
                if len(hits) != 1:
                    raise _error(f"{self.src.folder}: {b.name} spans several checkpoint tensors; use the in-memory path")
                pc = hits[0]
                self._inside.setdefault(pc.key, []).append((b, b.g0 - pc.g0, b.g1 - pc.g0))
        inside = self._inside.get(st.key)
        if not inside:
            return None

        def produce():
            w = self.src.read(st.key).clone()
            rows2d = w.view(-1, w.shape[-1]) if w.dim() > 1 else w.view(-1, 1)
            for b, l0, l1 in inside:
                self._reduce(b, rows2d[l0:l1])
            return w

        return [OutTensor(st.key, self.src.out_dtype(st), st.shape, produce)]

    # ---- in-memory layout (factorised blocks)
    def fused_outputs(self, reducer) -> list[OutTensor]:
        """Every output tensor under transformers' in-memory names (what save_original_format=False writes)."""
        out = []
        for name, t in self.state.items():
            found = self._where(name)
            if found is None:
                continue
            mine = [b for b in self.blocks if b.tensor == name]
            if mine:
                out += self._fused_tensor(name, tuple(t.shape), found, mine)
            elif len(found) == 1 and tuple(self.src.by_key[found[0].key].shape) == tuple(t.shape):
                key = found[0].key  # one checkpoint tensor, renamed: the plain path (LowRankLinear factors too)
                for o in reducer.tensors(self.src.by_key[key]):
                    o.key = name.removesuffix(".weight") + o.key[len(key.removesuffix(".weight")):]
                    out.append(o)
            else:  # several checkpoint tensors (an untouched fused expert tensor): assembled
                dtype = self.src.out_dtype(self.src.by_key[found[0].key])
                out.append(OutTensor(name, dtype, tuple(t.shape), lambda n=name: self._whole(n)))
        return out

    def _whole(self, name: str) -> torch.Tensor:
        shape = tuple(self.state[name].shape)
        return self._read_rows(name, 0, math.prod(shape[:-1]) if len(shape) > 1 else shape[0]).reshape(shape)

    def _fused_tensor(self, name: str, shape: tuple, found: list[Piece], mine: list[_Block]) -> list[OutTensor]:
        dtype = self.src.out_dtype(self.src.by_key[found[0].key])
        fact = sorted((b for b in mine if b.factorised), key=lambda b: (b.expert or 0, b.rows[0]))
        module, _, tensor = name.rpartition(".")
        prefix = f"{module}." if module else ""

        def produce():
            rows2d = self._read_rows(name, 0, math.prod(shape[:-1])).clone()
            for b in mine:  # target order, as in memory
                factors = self._reduce(b, rows2d[b.g0 : b.g1])
                if factors is not None:
                    left_name, right_name = factor_names(tensor, b.expert, b.rows)
                    self._pending[prefix + left_name], self._pending[prefix + right_name] = factors
            if not fact:
                return rows2d.view(shape)
            recs = [{"expert": b.expert, "rows": list(b.rows)} for b in fact]
            return rows2d[keep_mask(list(shape), recs)].reshape(-1)

        if not fact:
            return [OutTensor(name, dtype, shape, produce)]
        recs = [{"expert": b.expert, "rows": list(b.rows)} for b in fact]
        out = [OutTensor(name, dtype, (int(keep_mask(list(shape), recs).sum()) * int(shape[-1]),), produce)]
        for b in fact:
            left_name, right_name = (prefix + n for n in factor_names(tensor, b.expert, b.rows))
            out.append(OutTensor(left_name, dtype, (b.shape[0], b.rank), lambda k=left_name: self._pending.pop(k)))
            out.append(OutTensor(right_name, dtype, (b.rank, b.shape[1]), lambda k=right_name: self._pending.pop(k)))
        return out
