"""Rank arithmetic, truncated SVD (exact or randomized) and the factorised LowRankLinear module.

Conventions
-----------
A weight is always handled as the *mathematical* matrix ``W`` of shape ``(out, in)`` such that
``y = x @ W.T + b``. ``nn.Linear.weight`` already has that layout; GPT-2's ``Conv1D.weight`` is
stored transposed ``(in, out)`` and is converted by :func:`as_matrix` / :func:`from_matrix`.

The rank kept for a fraction ``rho`` is ``k = max(1, floor(rho * min(m, n)))`` computed with exact
decimal arithmetic (``0.3 * 10`` is 3, not 2.9999999999999996 → 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def rank_for(rho: float, shape: tuple[int, int] | torch.Size) -> int:
    """Rank kept for ``rho`` in (0, 1] on a matrix of ``shape``: max(1, floor(rho * min(m, n)))."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    max_rank = min(int(shape[0]), int(shape[1]))
    return max(1, math.floor(Fraction(str(rho)) * max_rank))


def factorised_saves_bytes(rank: int, shape: tuple[int, int]) -> bool:
    """True when two thin factors (k·(m+n) numbers) are smaller than the dense m·n matrix."""
    m, n = int(shape[0]), int(shape[1])
    return rank * (m + n) < m * n


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D (weight stored as (in, out)), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def as_matrix(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of a Linear or Conv1D module (a view, no copy)."""
    w = module.weight
    return w.t() if is_conv1d(module) else w


def from_matrix(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Bring an (out, in) matrix back to the module's own weight layout."""
    return matrix.t().contiguous() if is_conv1d(module) else matrix.contiguous()


@dataclass
class TruncatedSVD:
    """U (m, r), S (r,), Vh (r, n) in a float dtype on CPU (or the weight's device).

    ``exact`` is True for a full SVD (every rank up to min(m, n) is available and the dropped
    singular values are known); a randomized SVD only holds its top ``r`` components.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    shape: tuple[int, int]
    exact: bool

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    def check_rank(self, k: int) -> None:
        if not 1 <= k <= self.S.numel():
            raise ValueError(f"rank {k} not available: this SVD holds {self.S.numel()} components")

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(left (m, k), right (k, n)) with sqrt(S) split between them, so left @ right = W_k."""
        self.check_rank(k)
        root = self.S[:k].sqrt()
        return self.U[:, :k] * root, root[:, None] * self.Vh[:k]

    def reconstruct(self, k: int) -> torch.Tensor:
        self.check_rank(k)
        return (self.U[:, :k] * self.S[:k]) @ self.Vh[:k]

    def optimal_error(self, k: int) -> float | None:
        """Eckart–Young: ||W - W_k||_F = sqrt(sum of dropped σ²); None for a randomized SVD."""
        if not self.exact:
            return None
        return float(self.S[k:].double().pow(2).sum().sqrt())


def compute_svd(
    matrix: torch.Tensor,
    *,
    method: str = "exact",
    dtype: torch.dtype = torch.float32,
    rank: int | None = None,
    oversampling: int = 10,
    n_iter: int = 4,
    seed: int = 0,
) -> TruncatedSVD:
    """SVD of an (out, in) matrix, upcast to ``dtype`` (bf16/fp16 have no CPU SVD).

    ``method="exact"``: full ``torch.linalg.svd`` (deterministic), reusable for every rank.
    ``method="randomized"``: ``torch.svd_lowrank`` with ``q = rank + oversampling`` and ``n_iter``
    power iterations under a fixed seed, truncated to ``rank`` components.
    """
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    w = matrix.detach().to(dtype)
    if method == "exact":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return TruncatedSVD(U, S, Vh, shape, exact=True)
    if method == "randomized":
        if rank is None:
            raise ValueError("randomized SVD needs the largest rank it will be asked for")
        q = min(rank + oversampling, min(shape))
        devices = [w.device] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(w, q=q, niter=n_iter)
        return TruncatedSVD(U[:, :rank], S[:rank], V[:, :rank].T, shape, exact=False)
    raise ValueError(f"unknown SVD method {method!r} (exact | randomized)")


class LowRankLinear(nn.Module):
    """y = (x @ weight.T) @ weight_out.T + bias — a rank-k replacement for an (out, in) linear map.

    ``weight`` is the right factor (k, in) and ``weight_out`` the left factor (out, k). Naming the
    right factor ``weight`` is deliberate: a loader that does not know this module finds a
    ``weight`` of shape (k, in) where it expects (out, in) and fails with a size mismatch instead
    of silently initialising random weights (k < min(out, in) whenever factorising saves bytes).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.weight_out = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(
        cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> "LowRankLinear":
        out_f, rank = left.shape
        mod = cls(right.shape[1], out_f, rank, bias=bias is not None, device=left.device, dtype=dtype)
        with torch.no_grad():
            mod.weight.copy_(right.to(dtype))
            mod.weight_out.copy_(left.to(dtype))
            if bias is not None:
                mod.bias.copy_(bias.to(dtype))
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight), self.weight_out, self.bias)

    def dense_matrix(self) -> torch.Tensor:
        return self.weight_out @ self.weight

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
