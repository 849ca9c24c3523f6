"""Apply LASER interventions to a loaded model: dense write-back or factorised swap.

Validation that needs only the config (layer range, matrix alias) runs before any weights load
(:func:`plan_targets`); rank checks that need the shapes run after loading and before anything is
written. Every change can be undone exactly (:class:`Undo`), which the search uses to try
candidates without copying the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .architectures import ArchitectureError, Family, expand_matrix, module_name, num_layers
from .lowrank import (
    SVD_DTYPES,
    LowRankLinear,
    TruncatedSVD,
    as_matrix,
    compute_svd,
    factorised_saves_bytes,
    from_matrix,
    rank_for,
)
from .recipe import Intervention, RecipeError, Reduction


@dataclass(frozen=True)
class Target:
    """One matrix to reduce; ``index`` is the position of its intervention in the recipe."""

    index: int
    layer: int
    alias: str
    rho: float | None = None
    rank: int | None = None

    @property
    def field(self) -> str:
        return f"interventions[{self.index}]"

    def rank_for(self, shape) -> int:
        return self.rank if self.rank is not None else rank_for(self.rho, shape)


def plan_targets(interventions: Iterable[Intervention], config, family: Family) -> list[Target]:
    """Expand groups and check layers/aliases against the config. Raises RecipeError naming fields."""
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
            key = (iv.layer, alias)
            if key in seen:
                problems.append(
                    f"interventions[{i}]: layer {iv.layer} {alias} is already reduced by interventions[{seen[key]}]"
                )
                continue
            seen[key] = i
            targets.append(Target(i, iv.layer, alias, iv.rho, iv.rank))
    if problems:
        raise RecipeError(problems)
    return targets


@dataclass
class SVDCache:
    """Each matrix's SVD computed once (keyed by module name) and reused for every rank."""

    reduction: Reduction = field(default_factory=Reduction)
    _store: dict[str, TruncatedSVD] = field(default_factory=dict)

    def get(self, name: str, matrix: torch.Tensor, rank: int) -> TruncatedSVD:
        svd = self._store.get(name)
        if svd is not None and (svd.exact or svd.S.numel() >= rank):
            return svd
        r = self.reduction
        svd = compute_svd(  # on the CPU: exact and deterministic whatever device holds the model
            matrix.detach().cpu(),
            method=r.method,
            dtype=SVD_DTYPES[r.svd_dtype],
            rank=rank,
            oversampling=r.oversampling,
            n_iter=r.power_iterations,
            seed=r.seed,
        )
        self._store[name] = svd
        return svd

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


def replace_weight(model: nn.Module, name: str, svd: TruncatedSVD, k: int, factorised: bool) -> Undo:
    """Put the rank-k version of module ``name`` in place; return an Undo that restores it bit-exactly."""
    module = model.get_submodule(name)
    dtype = module.weight.dtype
    if factorised:
        left, right = svd.factors(k)
        bias = module.bias.detach() if module.bias is not None else None
        model.set_submodule(name, LowRankLinear.from_factors(left, right, bias, dtype).to(module.weight.device))
        return Undo(lambda: model.set_submodule(name, module))
    original = module.weight.data
    new = from_matrix(module, svd.reconstruct(k)).to(dtype=dtype, device=original.device)
    module.weight.data = new

    def restore():
        module.weight.data = original

    return Undo(restore)


def _matrix_entry(target: Target, name: str, shape, k: int, rho, storage: str, itemsize: int, err: float, norm: float):
    m, n = shape
    dense_bytes = m * n * itemsize
    stored = k * (m + n) * itemsize if storage == "factorised" else dense_bytes
    return {
        "name": name,
        "intervention": target.index,
        "layer": target.layer,
        "matrix": target.alias,
        "shape": [m, n],
        "rho": rho,
        "rank": k,
        "max_rank": min(m, n),
        "frobenius_error": err,
        "relative_error": err / norm if norm else 0.0,
        "storage": storage,
        "bytes_dense": dense_bytes,
        "bytes_stored": stored,
        "bytes_saved": dense_bytes - stored,
    }


def reduce_model(
    model: nn.Module,
    family: Family,
    targets: list[Target],
    *,
    storage: str = "dense",
    cache: SVDCache | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Apply every target in place. Returns one manifest entry per matrix.

    With ``storage="factorised"``, a matrix whose two factors would not be smaller than the dense
    matrix (k·(m+n) ≥ m·n) is written back dense instead, and its entry says so.
    """
    cache = SVDCache() if cache is None else cache
    # resolve every name and rank first, so a bad rank fails before anything changes
    plan = []
    problems = []
    for t in targets:
        name = module_name(model, family, t.layer, t.alias)
        mat = as_matrix(model.get_submodule(name))
        shape = (int(mat.shape[0]), int(mat.shape[1]))
        k = t.rank_for(shape)
        if k > min(shape):
            problems.append(f"{t.field}.rank: {name} has shape {list(shape)}, max rank {min(shape)}, got {k}")
        plan.append((t, name, shape, k))
    if problems:
        raise RecipeError(problems)

    entries = []
    for t, name, shape, k in plan:
        if progress:
            progress(f"SVD {name} {shape[0]}×{shape[1]} → rank {k}")
        module = model.get_submodule(name)
        original = as_matrix(module).detach().clone()
        itemsize, norm = original.element_size(), float(original.double().norm())
        if k == min(shape):  # full rank: the truncated SVD is W itself, keep it bit-exact
            entries.append(_matrix_entry(t, name, shape, k, t.rho, "dense", itemsize, 0.0, norm))
            continue
        svd = cache.get(name, original, k)
        factorised = storage == "factorised" and factorised_saves_bytes(k, shape)
        replace_weight(model, name, svd, k, factorised)
        new = model.get_submodule(name)
        stored = new.dense_matrix() if factorised else as_matrix(new)
        err = float((original.double() - stored.detach().double()).norm())
        entries.append(
            _matrix_entry(t, name, shape, k, t.rho, "factorised" if factorised else "dense", itemsize, err, norm)
        )
    return entries
