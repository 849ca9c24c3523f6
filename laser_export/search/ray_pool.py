"""Spread a sweep over Ray actors: one actor per GPU (or per worker on CPU clusters), each holding the
model, an SVD cache and its own prefix cache; candidates go out in groups of one layer (a group reuses
the actor's prefix cache and SVDs), results come back as groups finish and the driver appends them to
the same resumable results log as a single-process search.

Ray is an optional dependency: ``pip install 'laser-export[ray]'``.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from typing import Callable, Iterator, Sequence

from ..recipe import RecipeError
from .grid import Candidate


class _Worker:
    """The body of one Ray actor (plain class; wrapped with ``ray.remote`` by :class:`RayPool`)."""

    def __init__(self, factory: Callable, family, examples, batch_size: int, storage: str, reduction,
                 cache_start: int, use_prefix_cache: bool, threads: int | None):
        import torch

        from ..intervene import SVDCache
        from .sweep import LocalScorer

        if threads:
            torch.set_num_threads(threads)
        model, tokenizer = factory()
        self.scorer = LocalScorer(model, tokenizer, family, examples, batch_size=batch_size, storage=storage,
                                  svd=SVDCache(reduction) if reduction is not None else SVDCache(),
                                  use_prefix_cache=use_prefix_cache, cache_start=cache_start)

    def baseline(self) -> dict:
        return self.scorer.baseline()

    def score_group(self, cands: Sequence[Candidate], baseline: dict) -> list[tuple[Candidate, dict]]:
        return list(self.scorer.score_candidates(cands, baseline))

    def score_set(self, cands: Sequence[Candidate]) -> dict:
        return self.scorer.score_set(cands)

    def stats(self) -> dict:
        return {"n_scored": self.scorer.n_scored, **self.scorer.timings}


class RayPool:
    """A ``pool`` for :func:`laser_export.search.sweep.run_search` backed by Ray actors.

    ``address``: None or "" starts (or joins, via ``RAY_ADDRESS``) a local Ray; otherwise the address
    of a running cluster (``ray://host:10001`` or ``auto``). ``workers``: number of actors (default:
    one per GPU in the cluster, else 2, one CPU each). ``factory()`` returns ``(model, tokenizer)``
    inside each actor (it is pickled and sent to them).
    """

    def __init__(self, factory: Callable, family, examples: Sequence, *, batch_size: int = 32,
                 storage: str = "dense", reduction=None, cache_start: int = 0, use_prefix_cache: bool = True,
                 address: str | None = None, workers: int | None = None, threads: int | None = None):
        try:
            import ray
        except ImportError:
            raise RecipeError(["--ray: Ray is not installed; install it with pip install 'laser-export[ray]'"]) from None
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            kw: dict = dict(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
            if address:
                kw["address"] = address
            else:  # a local Ray: its workers must import this checkout too
                path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
                kw["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
                if workers:
                    kw["num_cpus"] = max(workers, 1)
            ray.init(**kw)
            self._started = True
        gpus = int(ray.cluster_resources().get("GPU", 0))
        n = workers or (gpus if gpus else 2)
        if n < 1:
            raise RecipeError([f"--ray-workers: at least 1, got {n}"])
        self.size = n
        self._spawn = lambda: [  # noqa: E731  (actors start on first use: a fully resumed sweep needs none)
            ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)(_Worker).remote(
                factory, family, list(examples), batch_size, storage, reduction, cache_start, use_prefix_cache,
                threads)
            for _ in range(n)
        ]
        self._actors: list | None = None
        self.timings: dict = {"capture_s": 0.0, "score_s": 0.0}
        self.n_scored = 0

    @property
    def actors(self) -> list:
        if self._actors is None:
            self._actors = self._spawn()
        return self._actors

    def __len__(self) -> int:
        return self.size

    def _refresh_stats(self) -> None:
        stats = self.ray.get([a.stats.remote() for a in self.actors])
        self.n_scored = sum(s["n_scored"] for s in stats)
        for k in ("capture_s", "score_s"):
            self.timings[k] = sum(s[k] for s in stats)  # actor-seconds (summed over workers)

    def baseline(self) -> dict:
        return self.ray.get(self.actors[0].baseline.remote())

    def score_candidates(self, cands: Sequence[Candidate], baseline: dict) -> Iterator[tuple[Candidate, dict]]:
        """Groups of one layer each, handed to whichever actor is free; yields as groups finish."""
        if not cands:
            return
        groups: dict[int, list[Candidate]] = defaultdict(list)
        for c in cands:
            groups[c.layer].append(c)
        queue = list(groups.values())  # in the order given (latest layers first)
        running: dict = {}
        idle = list(self.actors)
        try:
            while queue or running:
                while queue and idle:
                    a = idle.pop(0)
                    running[a.score_group.remote(queue.pop(0), baseline)] = a
                done, _ = self.ray.wait(list(running), num_returns=1)
                for ref in done:
                    idle.append(running.pop(ref))
                    yield from self.ray.get(ref)
        finally:
            for ref in running:
                self.ray.cancel(ref)
            self._refresh_stats()

    def score_set(self, cands: Sequence[Candidate]) -> dict:
        out = self.ray.get(self.actors[0].score_set.remote(list(cands)))
        self._refresh_stats()
        return out

    def close(self) -> None:
        for a in self._actors or []:
            self.ray.kill(a)
        self._actors = None
        if self._started:
            self.ray.shutdown()
