"""Typed options of a search (what ``laser-export search`` builds from its command line)."""

from __future__ import annotations

from dataclasses import dataclass

from ..recipe import RecipeError
from .plot import PLOT_METRICS


@dataclass
class SearchOptions:
    out: str  # recipe YAML to write; sweep files go next to it
    model: str | None = None  # model source (as model.source); default: the template's
    benchmark: str | None = None  # benchmark name; default: the template's
    template: str | None = None  # recipe to take model / benchmark / storage / export from
    benchmark_path: str | None = None
    subsample: int | None = None
    max_examples: int | None = None  # sweep on only the first N validation examples
    layers: str | None = None  # "20-29", "24,26,28", "-4"; None: the last third
    matrices: str = "fc_in,fc_up,fc_out"
    rhos: str = "0.01,0.05,0.1,0.25"
    seed: int | None = None
    validation_fraction: float | None = None
    batch_size: int | None = None
    storage: str | None = None
    compose: int = 3
    compose_tries: int = 6
    rank_by_snr: bool = False
    prune_snr: float | None = None
    tolerance: float = 0.005
    skip_test: bool = False
    results: str | None = None  # resumable JSONL; default <out stem>.search.jsonl
    name: str | None = None  # recipe name; default <model>-<benchmark>
    plot_metric: str = "both"  # top1 | logloss | both
    ray: str | None = None  # None: in process; "": a local Ray; else a Ray cluster address
    ray_workers: int | None = None
    svd_cache_gb: float = 2.0  # byte budget of the SVD cache (least recently used matrices dropped first)
    strategy: str = "grid"  # grid: every candidate on every example; halving: successive halving
    eta: int = 3  # halving: keep the best 1/eta at each cut, next part eta times larger
    from_scan: str | None = None  # a `laser-export scan` JSON: its SNR orders (and --prune-snr prunes) the sites
    task_weights: str | None = None  # several --benchmark a,b: weights of the mean paired gain (default equal)
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []

        def check(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        check(bool(self.out), "--out: give the recipe file to write")
        check(self.subsample is None or self.subsample >= 2, f"--subsample: at least 2, got {self.subsample}")
        check(self.max_examples is None or self.max_examples >= 1, f"--max-examples: at least 1, got {self.max_examples}")
        check(self.validation_fraction is None or 0 < self.validation_fraction < 1,
              f"--validation-fraction: between 0 and 1 (exclusive), got {self.validation_fraction}")
        check(self.batch_size is None or self.batch_size >= 1, f"--batch-size: at least 1, got {self.batch_size}")
        check(self.storage in (None, "dense", "factorised"), f"--storage: dense or factorised, got {self.storage!r}")
        check(self.compose >= 1, f"--compose: at least 1 (1: no stacking), got {self.compose}")
        check(self.compose_tries >= 0, f"--compose-tries: at least 0, got {self.compose_tries}")
        check(self.prune_snr is None or 0 < self.prune_snr <= 1, f"--prune-snr: a fraction in (0, 1], got {self.prune_snr}")
        check(0 <= self.tolerance <= 1, f"--tolerance: between 0 and 1, got {self.tolerance}")
        check(self.plot_metric in PLOT_METRICS, f"--plot-metric: one of {', '.join(PLOT_METRICS)}, got {self.plot_metric!r}")
        check(self.ray_workers is None or self.ray_workers >= 1, f"--ray-workers: at least 1, got {self.ray_workers}")
        check(self.svd_cache_gb >= 0, f"--svd-cache-gb: at least 0, got {self.svd_cache_gb}")
        check(self.strategy in ("grid", "halving"), f"--strategy: grid or halving, got {self.strategy!r}")
        check(self.eta >= 2, f"--eta: at least 2, got {self.eta}")
        check(self.strategy == "grid" or self.ray is None, "--strategy halving runs in this process: drop --ray")
        if problems:
            raise RecipeError(problems)
