"""The search grid: candidates (layer, matrix, ρ) and the parsing of ``--layers``, ``--matrices``, ``--rhos``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ..architectures import Family, expand_matrix
from ..recipe import RecipeError


#: the ``--rhos`` entry for ``rank: auto`` (the singular values above the Marchenko–Pastur edge)
AUTO = "auto"


def rho_label(rho: float | str) -> str:
    return rho if rho == AUTO else f"{rho:g}"


def rho_order(rho: float | str) -> tuple[int, float]:
    """Sort key: the numeric ρ ascending, then auto."""
    return (1, 0.0) if rho == AUTO else (0, float(rho))


@dataclass(frozen=True)
class Candidate:
    layer: int
    matrix: str
    rho: float | str  # a fraction of the max rank kept, or AUTO
    expert: int | None = None  # --per-expert: this one expert of an MoE alias (None: every expert together)

    @property
    def key(self) -> str:
        where = f"L{self.layer}.{self.matrix}" + (f"[e{self.expert}]" if self.expert is not None else "")
        return f"{where}.rank-auto" if self.rho == AUTO else f"{where}.rho{self.rho:g}"

    @property
    def site(self) -> tuple[int, str]:
        """(layer, matrix): what the SNR ranking orders (every expert of an MoE alias together)."""
        return (self.layer, self.matrix)

    @property
    def unit(self) -> tuple[int, str, int | None]:
        """What one intervention reduces: composition keeps at most one ρ per unit."""
        return (self.layer, self.matrix, self.expert)

    def as_intervention(self) -> dict:
        out = {"layer": self.layer, "matrix": self.matrix}
        out.update({"rank": AUTO} if self.rho == AUTO else {"rho": self.rho})
        return {**out, "experts": [self.expert]} if self.expert is not None else out


def set_key(cands: Sequence[Candidate]) -> str:
    """For display (ρ formatted); the results log uses :func:`candidate_id`."""
    return "+".join(c.key for c in cands)


def candidate_id(c: Candidate, rank: int) -> str:
    """The exact id of a candidate in the results log: its site and the integer rank it keeps. Two ρ that keep
    the same rank are the same model (one measurement); two that print alike (``0.06249999``, ``0.0625``) but
    keep different ranks are different candidates."""
    expert = f".e{c.expert}" if c.expert is not None else ""
    return f"L{c.layer}.{c.matrix}{expert}.k{int(rank)}"


def set_id(ids: Sequence[str]) -> str:
    """The results-log id of a composed set, from its members' :func:`candidate_id` (in order)."""
    return "set:" + "+".join(ids)


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """``"20-29"``, ``"24,26,28"``, ``"-4"`` style negatives, or None (the last third of the model)."""
    if spec is None or spec == "":
        return list(range(n_layers - max(1, n_layers // 3), n_layers))
    layers: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (None, None)
                if lo is None:
                    raise ValueError
                a, b = int(lo), int(hi)
                if a > b:
                    raise RecipeError([f"--layers: range {part!r} is empty (write low-high, e.g. {b}-{a})"])
                layers += list(range(a, b + 1))
            else:
                v = int(part)
                layers.append(v + n_layers if v < 0 else v)
        except ValueError:
            raise RecipeError([f"--layers: cannot read {part!r} (use e.g. 20-29 or 24,26,28)"]) from None
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise RecipeError([f"--layers: model has {n_layers} layers (0..{n_layers - 1}), got {bad}"])
    return sorted(set(layers))


def parse_rhos(spec: str | Iterable[float]) -> list[float]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out, auto = [], False
    for item in items:
        if str(item).strip() == AUTO:
            auto = True
            continue
        try:
            v = float(item)
        except ValueError:
            raise RecipeError([f"--rhos: {item!r} is not a number"]) from None
        if not 0 < v <= 1:
            raise RecipeError([f"--rhos: ρ is the fraction of the max rank kept, in (0, 1]; got {v}"])
        out.append(v)
    if not out and not auto:
        raise RecipeError(["--rhos: no values"])
    return sorted(set(out)) + ([AUTO] if auto else [])


def parse_matrices(spec: str | Iterable[str], family: Family) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        item = item.strip()
        if item:
            for alias in expand_matrix(family, item):  # raises ArchitectureError (exit 2)
                if alias not in out:
                    out.append(alias)
    return out
