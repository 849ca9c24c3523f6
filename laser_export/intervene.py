"""Apply LASER interventions to a loaded model: dense write-back or factorised swap.

Validation that needs only the config (layer range, matrix alias) runs before any weights load
(:func:`plan_targets`); rank checks that need the shapes run after loading and before anything is
written. Every change can be undone exactly (:class:`Undo`), which the search uses to try
candidates without copying the model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .artifacts import matrix_entry
from .architectures import ArchitectureError, Family, expand_matrix, is_fused, module_name, num_experts, num_layers
from .lowrank import (
    SVD_DTYPES,
    AutoRank,
    LowRankLinear,
    TruncatedSVD,
    compute_svd,
    factorised_saves_bytes,
    from_matrix,
    auto_rank,
    is_conv1d,
    rank_for,
    singular_values,
)
from .recipe import Intervention, RecipeError, Reduction


@dataclass(frozen=True)
class Target:
    """One matrix to reduce; ``index`` is the position of its intervention in the recipe."""

    index: int
    layer: int
    alias: str
    rho: float | None = None
    rank: int | str | None = None  # "auto": the Marchenko–Pastur rule, resolved by :meth:`with_auto_rank`
    expert: int | None = None  # MoE: the expert whose matrix this is
    auto: AutoRank | None = field(default=None, compare=False)  # how an auto rank was found

    @property
    def field(self) -> str:
        return f"interventions[{self.index}]"

    @property
    def is_auto(self) -> bool:
        return self.rank == "auto"

    def rank_for(self, shape) -> int:
        if self.is_auto:
            raise ValueError(f"{self.field}.rank: auto is resolved from the matrix (with_auto_rank), not its shape")
        return self.rank if self.rank is not None else rank_for(self.rho, shape)

    def with_auto_rank(self, matrix: torch.Tensor) -> "Target":
        """``rank: auto`` made concrete from the matrix's singular values (exact route); others unchanged."""
        if not self.is_auto:
            return self
        found = auto_rank(singular_values(matrix), tuple(matrix.shape))
        return replace(self, rank=found.rank, auto=found)


def plan_targets(interventions: Iterable[Intervention], config, family: Family,
                 storage: str | None = None) -> list[Target]:
    """Expand groups (and MoE experts) and check layers/aliases against the config (every alias takes
    either ``storage``; fused blocks too, :mod:`laser_export.fused`). Raises RecipeError naming fields."""
    n = num_layers(config)
    problems, targets, seen = [], [], {}
    for i, iv in enumerate(interventions):
        if not 0 <= iv.layer < n:
            problems.append(f"interventions[{i}].layer: model has {n} layers (0..{n - 1}), got {iv.layer}")
            continue
        try:
            aliases = expand_matrix(family, iv.matrix)
        except ArchitectureError as err:
            problems.append(f"interventions[{i}].matrix: {err}")
            continue
        for alias in aliases:
            experts = _experts(i, iv, family, alias, config, problems)
            for expert in experts:
                key = (iv.layer, alias, expert)
                if key in seen:
                    what = f"layer {iv.layer} {alias}" + (f" expert {expert}" if expert is not None else "")
                    problems.append(f"interventions[{i}]: {what} is already reduced by interventions[{seen[key]}]")
                    continue
                seen[key] = i
                targets.append(Target(i, iv.layer, alias, iv.rho, iv.rank, expert))
    if problems:
        raise RecipeError(problems)
    return targets


def _experts(i: int, iv: Intervention, family: Family, alias: str, config, problems: list[str]) -> list[int | None]:
    """The experts an intervention selects for ``alias`` ([None] for a matrix without experts)."""
    try:
        n = num_experts(family, alias, config)
    except ArchitectureError as err:
        if not hasattr(config, "to_dict"):  # `check` from model_type/num_layers hints: the count is unknown
            chosen = getattr(iv, "experts", None)
            return list(chosen) if isinstance(chosen, list) else [None]
        problems.append(f"interventions[{i}].matrix: {err}")
        return []
    chosen = getattr(iv, "experts", None)
    if n is None:
        if isinstance(chosen, list):
            problems.append(f"interventions[{i}].experts: {alias} of {family.name} has no experts")
            return []
        return [None]
    if chosen is None or chosen == "all":
        return list(range(n))
    bad = [e for e in chosen if e >= n]
    if bad:
        problems.append(f"interventions[{i}].experts: the model has {n} experts (0..{n - 1}), got {bad}")
        return []
    return list(chosen)


def describe_targets(targets: Sequence[Target], family: Family) -> str:
    """``L28.fc_in, L29.fc_out`` — an MoE site once, with its expert count (``L28.fc_in[8 experts]``;
    ``[all experts]`` when the count is not known yet, from recipe hints)."""
    from .architectures import matrix_spec

    sites: dict[tuple[int, str], list] = {}
    for t in targets:
        sites.setdefault((t.layer, t.alias), []).append(t.expert)
    out = []
    for (layer, alias), experts in sites.items():
        if experts != [None]:
            tail = f"[{len(experts)} expert{'s' if len(experts) > 1 else ''}]"
        else:
            tail = "[all experts]" if matrix_spec(family, alias).experts is not None else ""
        out.append(f"L{layer}.{alias}{tail}")
    return ", ".join(out)


@dataclass
class SVDCache:
    """Each matrix's SVD computed once (keyed by module name) and reused for every rank it holds.

    ``max_bytes`` bounds what is kept between calls (least recently used entries are dropped first;
    the entry just computed is always returned). ``max_bytes=0`` keeps nothing beyond the matrix
    being reduced, which is what ``run`` uses; ``None`` (default) keeps everything. An exact SVD
    keeps only the components the requested rank needs (``rank`` argument of :meth:`get`); a later
    request for a higher rank recomputes it.
    """

    reduction: Reduction = field(default_factory=Reduction)
    max_bytes: int | None = None
    _store: "OrderedDict[str, TruncatedSVD]" = field(default_factory=OrderedDict)

    def get(self, name: str, matrix: torch.Tensor, rank: int) -> TruncatedSVD:
        svd = self._store.get(name)
        if svd is not None and svd.components >= rank:
            self._store.move_to_end(name)
            return svd
        r = self.reduction
        svd = compute_svd(  # exact: float64 and deterministic, on the device that holds the weight
            matrix.detach(),
            method=r.method,
            dtype=SVD_DTYPES[r.svd_dtype],
            rank=rank,
            oversampling=r.oversampling,
            n_iter=r.power_iterations,
            seed=r.seed,
        )
        self._store.pop(name, None)
        if self.max_bytes is None or self.max_bytes > 0:
            self._store[name] = svd
            self._evict(keep=name)
        return svd

    def _evict(self, keep: str) -> None:
        if self.max_bytes is None:
            return
        while self.nbytes() > self.max_bytes and len(self._store) > 1:
            oldest = next(iter(self._store))
            if oldest == keep:
                self._store.move_to_end(oldest)
                continue
            del self._store[oldest]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self._store.values())

    def __contains__(self, name: str) -> bool:
        return name in self._store

    def __len__(self) -> int:
        return len(self._store)

    def __bool__(self) -> bool:  # an empty cache is still a cache: `cache or default` must keep it
        return True


@dataclass
class Undo:
    """Restores a module (or a weight tensor) exactly as it was."""

    restore: Callable[[], None]

    def __call__(self) -> None:
        self.restore()


def _offload_slot(module: nn.Module, key: str = "weight") -> tuple[dict, str] | None:
    """Where accelerate keeps an offloaded module's ``key`` tensor: (dict, full key), else None.

    An offloaded module (``AlignDevicesHook(offload=True)``) has its parameters on 'meta' and reads
    them from ``hook.weights_map`` (a ``PrefixedDataset``) at every forward: over a plain dict for
    CPU offload, over an ``OffloadedWeightsLoader`` for disk offload, whose ``state_dict`` entries
    take precedence over the files on disk."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False) or getattr(hook, "weights_map", None) is None:
        return None
    wmap = hook.weights_map
    dataset, full = getattr(wmap, "dataset", wmap), getattr(wmap, "prefix", "") + key
    target = getattr(dataset, "state_dict", dataset)
    if not isinstance(target, dict):
        raise TypeError(f"cannot write offloaded weight {full!r} into {type(dataset).__name__}")
    return target, full


def _get_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight tensor as stored (for an offloaded module, the offloaded copy)."""
    if module.weight.device.type == "meta" and _offload_slot(module) is not None:
        return module._hf_hook.weights_map["weight"]
    return module.weight.data


def _set_weight(module: nn.Module, new: torch.Tensor) -> Callable[[], None]:
    """Make ``new`` (in the module's layout) the module's weight, also where accelerate has offloaded
    it; returns the function that puts the previous weight back exactly."""
    slot = _offload_slot(module) if module.weight.device.type == "meta" else None
    if slot is not None:
        store, key = slot
        had, old = key in store, store.get(key)
        store[key] = new

        def restore():
            if had:
                store[key] = old
            else:
                store.pop(key, None)  # back to the copy on disk

        return restore
    original = module.weight.data
    module.weight.data = new

    def restore():
        module.weight.data = original

    return restore


def matrix_of(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of a Linear/Conv1D module, also when accelerate has offloaded it."""
    w = _get_weight(module)
    return w.t() if is_conv1d(module) else w


def replace_weight(model: nn.Module, name: str, svd: TruncatedSVD, k: int, factorised: bool,
                   in_place: bool = False) -> Undo:
    """Put the rank-k version of module ``name`` in place; return an Undo that restores it bit-exactly.

    ``in_place=True`` (dense, no undo needed): W_k is written into the weight's own storage, so a
    weight loaded from a memory-mapped checkpoint does not leave its mapped pages resident next to a
    new copy (peak memory stays flat whatever the number of reduced matrices); the Undo then does nothing."""
    module = model.get_submodule(name)
    original = _get_weight(module)
    dtype = original.dtype
    if factorised:
        left, right = svd.factors(k)
        bias = module.bias.detach() if module.bias is not None else None
        if bias is not None and bias.device.type == "meta":  # offloaded by accelerate
            bias = module._hf_hook.weights_map["bias"]
        device = module.weight.device if module.weight.device.type != "meta" else original.device
        new_mod = LowRankLinear.from_factors(left.to(device), right.to(device),
                                             None if bias is None else bias.to(device), dtype)
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:  # keep accelerate's device placement (execution device, io alignment)
            from accelerate.hooks import AlignDevicesHook, add_hook_to_module

            exec_dev = getattr(hook, "execution_device", None)
            if exec_dev is not None:
                new_mod.to(exec_dev)
            add_hook_to_module(new_mod, AlignDevicesHook(execution_device=exec_dev, io_same_device=hook.io_same_device))
        model.set_submodule(name, new_mod)
        return Undo(lambda: model.set_submodule(name, module))
    new = from_matrix(module, svd.reconstruct(k, dtype=dtype).to(original.device))
    if in_place and module.weight.device.type != "meta" and module.weight.data.shape == new.shape:
        with torch.no_grad():
            module.weight.data.copy_(new)
        return Undo(lambda: None)
    del original
    return Undo(_set_weight(module, new))


def _matrix_entry(target: Target, name: str, shape, k: int, storage: str, itemsize: int, err: float,
                  norm: float) -> dict:
    """The manifest entry (:func:`laser_export.artifacts.matrix_entry`) as the dict ``Applied.entries`` holds."""
    return matrix_entry(target, name, shape, k, storage, itemsize, err, norm).as_dict()


def frobenius_norm(matrix: torch.Tensor, chunk_rows: int = 1024) -> float:
    """||W||_F accumulated in float64, ``chunk_rows`` rows at a time (no full float64 copy)."""
    total = 0.0
    for i in range(0, matrix.shape[0], chunk_rows):
        total += float(matrix[i : i + chunk_rows].to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def truncation_error(matrix: torch.Tensor, svd: TruncatedSVD, k: int, chunk_rows: int = 1024) -> tuple[float, float]:
    """(||W − W_k||_F, ||W||_F) in float64. Exact SVD: from the dropped singular values (Eckart–Young,
    no matrix product); randomized: accumulated ``chunk_rows`` rows at a time."""
    if svd.exact and svd.total is not None:
        return svd.optimal_error(k), math.sqrt(svd.total)
    err = 0.0
    left, right = (svd.U[:, :k] * svd.S[:k]).double(), svd.Vh[:k].double()
    for i in range(0, matrix.shape[0], chunk_rows):
        rows = matrix[i : i + chunk_rows].to(torch.float64)
        err += float((rows - left[i : i + chunk_rows].to(rows.device) @ right.to(rows.device)).pow(2).sum())
    return math.sqrt(err), frobenius_norm(matrix, chunk_rows)


def _reduce_block(model, family: Family, t: Target, shape, k: int, cache: SVDCache, full_svd: bool,
                  undoable: bool, storage: str = "dense") -> tuple[Undo | None, dict]:
    """Reduce one fused block (:mod:`laser_export.fused`): SVD of that block only, W_k written back into
    the fused tensor; ``factorised`` (where the factors are smaller) also keeps the block's thin factors
    for the export. Returns (undo or None, manifest entry)."""
    from .fused import block_ref, factorise_block

    ref = block_ref(model, family, t.layer, t.alias, t.expert)
    matrix = ref.matrix(model)
    if matrix.device.type == "meta":
        raise ArchitectureError(f"{t.field}: {ref.name} is offloaded by the device_map; fused tensors (row blocks, "
                                "MoE experts) are reduced only when they are loaded on a device")
    itemsize = matrix.element_size()
    if k == min(shape):  # full rank: left bit-exact
        return None, _matrix_entry(t, ref.name, shape, k, "dense", itemsize, 0.0, frobenius_norm(matrix))
    svd = cache.get(ref.name, matrix, min(shape) if full_svd else k)
    err, norm = truncation_error(matrix, svd, k)
    if storage == "factorised" and factorised_saves_bytes(k, shape):
        restore = factorise_block(model, ref, *svd.factors(k), undoable)
        entry = _matrix_entry(t, ref.name, shape, k, "factorised", itemsize, err, norm)
        return (Undo(restore) if undoable else None), entry
    restore = ref.write(model, svd.reconstruct(k, dtype=matrix.dtype), undoable)
    entry = _matrix_entry(t, ref.name, shape, k, "dense", itemsize, err, norm)
    return (Undo(restore) if undoable else None), entry


class Applied(Undo):
    """What :func:`apply` returns: call it to undo every change (reverse order, bit-exact);
    ``entries`` holds one manifest entry per matrix."""

    def __init__(self, undos: list[Undo], entries: list[dict]):
        self.undos, self.entries = undos, entries
        super().__init__(self._restore)

    def _restore(self) -> None:
        while self.undos:
            self.undos.pop()()


def target_matrix(model: nn.Module, family: Family, t: Target) -> tuple[str, torch.Tensor]:
    """(unique name, (out, in) matrix) of a target: a module's weight (also offloaded), or a view of a
    fused block (:mod:`laser_export.fused`; a meta view on a weightless skeleton)."""
    if is_fused(family, t.alias):
        from .fused import block_ref

        ref = block_ref(model, family, t.layer, t.alias, t.expert)
        return ref.name, ref.matrix(model)
    name = module_name(model, family, t.layer, t.alias)
    module = model.get_submodule(name)
    if is_conv1d(module) != (family.weight_layout == "conv1d"):  # the family file's declared layout must hold
        raise ArchitectureError(f"families/{family.name}.json: weight_layout is {family.weight_layout!r}, but {name} "
                                f"is a {type(module).__name__}")
    return name, matrix_of(module)


def resolve(model: nn.Module, family: Family, targets: Sequence[Target]) -> list[tuple[Target, str, tuple[int, int], int]]:
    """(target, module name, (out, in) shape, rank) per target; RecipeError naming the fields when a
    rank exceeds the matrix's maximum. Nothing is changed."""
    plan, problems = [], []
    for t in targets:
        name, mat = target_matrix(model, family, t)
        shape = (int(mat.shape[0]), int(mat.shape[1]))
        t = t.with_auto_rank(mat)
        k = t.rank_for(shape)
        if k > min(shape):
            problems.append(f"{t.field}.rank: {name} has shape {list(shape)}, max rank {min(shape)}, got {k}")
        plan.append((t, name, shape, k))
    if problems:
        raise RecipeError(problems)
    return plan


def apply(
    model: nn.Module,
    targets: Sequence[Target],
    *,
    family: Family,
    storage: str = "dense",
    cache: SVDCache | None = None,
    undoable: bool = True,
    full_svd: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Applied:
    """Reduce every target of ``model`` in place — THE reduction used by run, verify and search.

    ``targets``: :class:`Target` (layer, matrix alias, rho or rank). ``storage``: ``dense`` writes
    W_k back into the weight; ``factorised`` swaps in a :class:`LowRankLinear` where the two factors
    are smaller than the dense matrix (else dense, and its entry says so). ``cache``: an
    :class:`SVDCache` (its ``reduction`` picks the SVD method); default: a fresh one holding only the
    current matrix. ``full_svd=True`` decomposes every component of each matrix (not only the top
    k), so a kept ``cache`` serves any later rank of the same matrix from this one decomposition —
    what the search does across its ρ grid (:class:`SVDCache` otherwise recomputes for a higher
    rank). ``undoable=False`` releases each original weight as soon as it is replaced
    (bounded memory for a one-way run); the returned object then cannot undo.
    Works with accelerate-dispatched models (offloaded weights are read from and written to the
    offload map). Ranks are checked before anything changes; an error half-way undoes what was done.

    Returns :class:`Applied`: ``applied()`` restores the model bit-exactly, ``applied.entries`` is
    the per-matrix manifest (rank, shape, Frobenius error from the dropped singular values, bytes).
    """
    cache = SVDCache(max_bytes=0) if cache is None else cache
    plan = resolve(model, family, targets)
    undos: list[Undo] = []
    entries: list[dict] = []
    try:
        for t, name, shape, k in plan:
            if progress:
                progress(f"SVD {name} {shape[0]}×{shape[1]} → rank {k}")
            if is_fused(family, t.alias):  # a row block / one expert of a fused tensor, in place
                undo, entry = _reduce_block(model, family, t, shape, k, cache, full_svd, undoable, storage)
                undos += [undo] if undo is not None else []
                entries.append(entry)
                continue
            module = model.get_submodule(name)
            matrix = matrix_of(module)
            itemsize = matrix.element_size()
            if k == min(shape):  # full rank: the truncated SVD is W itself, keep it bit-exact
                entries.append(_matrix_entry(t, name, shape, k, "dense", itemsize, 0.0, frobenius_norm(matrix)))
                continue
            svd = cache.get(name, matrix, min(shape) if full_svd else k)
            err, norm = truncation_error(matrix, svd, k)
            del matrix
            factorised = storage == "factorised" and factorised_saves_bytes(k, shape)
            undo = replace_weight(model, name, svd, k, factorised, in_place=not undoable)
            del svd
            if undoable:
                undos.append(undo)
            entries.append(
                _matrix_entry(t, name, shape, k, "factorised" if factorised else "dense", itemsize, err, norm)
            )
    except BaseException:
        for u in reversed(undos):
            u()
        raise
    return Applied(undos, entries)


def reduce_model(
    model: nn.Module,
    family: Family,
    targets: list[Target],
    *,
    storage: str = "dense",
    cache: SVDCache | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Apply every target in place, for good (no undo kept). Returns one manifest entry per matrix."""
    return apply(model, targets, family=family, storage=storage, cache=cache, undoable=False, progress=progress).entries
