"""Verify a recipe's claims: score baseline and reduced model on the recipe's split, compare.

A claim holds when the measured value is within ``claims.tolerance`` of the claimed one (both
directions: a claim is a reproducible number, not a lower bound). A run with ``--limit`` is reported
but can never satisfy a claim.
"""

from __future__ import annotations

import time

from rich.table import Table

from .benchmarks import BenchmarkError, examples_sha256, load_split
from .evaluate import paired_bootstrap, score_examples
from .pipeline import Loaded, Plan, console, reduce_loaded
from .prefix import PrefixCache

#: metrics reported next to the claimed one, when the benchmark has them
REPORTED = ("top1", "top1_no_article", "top5", "top10", "accuracy", "logprob", "logloss")


def select_examples(p: Plan, limit: int | None = None) -> tuple[list, dict]:
    """The examples a verify run scores and the split info for its report (no model needed)."""
    bench = p.recipe.benchmark
    split = load_split(
        bench.name,
        path=bench.path,
        seed=bench.seed,
        validation_fraction=bench.validation_fraction,
        subsample=bench.subsample,
    )
    examples = split.get(bench.split)
    info = {"name": bench.name, "split": bench.split, "subsample": bench.subsample, **split.info(bench.split)}
    if limit is not None:
        examples = examples[:limit]
        info["examples_sha256"] = examples_sha256(examples)
    info["limit"] = limit
    info["n_scored"] = len(examples)
    return examples, info


def check_scorable(p: Plan) -> None:
    if p.family.task != "causal-lm":
        raise BenchmarkError(
            f"benchmark: scoring a {p.family.task} model ({p.family.name}) is not implemented; "
            "verify supports causal LMs"
        )


def verify_loaded(
    p: Plan, loaded: Loaded, *, limit: int | None = None, progress: bool = True, selected=None,
    prefix_cache: bool = True,
) -> dict:
    """Score ``loaded`` (unreduced) on the split, reduce it in place, score again, build the report.

    ``selected``: the result of :func:`select_examples`, when the caller loaded the data already.
    ``prefix_cache``: the baseline pass records the inputs of every block from the lowest reduced
    layer on, and the reduced pass replays only those blocks (equal to a full forward within 1e-5,
    see tests/test_search.py); False runs two full forwards."""
    recipe, bench = p.recipe, p.recipe.benchmark
    check_scorable(p)
    examples, info = selected or select_examples(p, limit)
    start = min(t.layer for t in p.targets)
    cache = PrefixCache(loaded.model, p.family, start, lazy_capture=True, replay_layers=[start]) if prefix_cache else None
    t0 = time.perf_counter()
    base = score_examples(loaded.model, loaded.tokenizer, examples, batch_size=bench.batch_size,
                          progress=progress, description="baseline", forward_fn=None if cache is None else cache.capture)
    t1 = time.perf_counter()
    reduce_loaded(p, loaded, progress=progress)
    t2 = time.perf_counter()
    red = score_examples(loaded.model, loaded.tokenizer, examples, batch_size=bench.batch_size,
                         progress=progress, description="reduced", forward_fn=None if cache is None else cache.replay(start))
    t3 = time.perf_counter()
    del cache
    if bench.metric not in base.metrics:
        raise BenchmarkError(
            f"benchmark.metric: {bench.name} has no metric {bench.metric!r}; "
            f"available: {', '.join(k for k in base.metrics if k != 'n')}"
        )
    metrics = {
        "baseline": {k: v for k, v in base.metrics.items() if k in REPORTED or k == "n"},
        "reduced": {k: v for k, v in red.metrics.items() if k in REPORTED or k == "n"},
    }
    delta = {
        m: paired_bootstrap(base.hits(m), red.hits(m), seed=0)
        for m in REPORTED
        if m in base.metrics and m in red.metrics
    }
    claims = []
    if recipe.claims is not None:
        tol = recipe.claims.tolerance
        for side, claim in (("baseline", recipe.claims.baseline), ("reduced", recipe.claims.reduced)):
            measured = metrics[side][bench.metric]
            ok = abs(measured - claim.accuracy) <= tol + 1e-12 and limit is None
            claims.append({
                "name": f"{side}.accuracy",
                "metric": bench.metric,
                "claimed": claim.accuracy,
                "measured": measured,
                "tolerance": tol,
                "passed": ok,
                **({"why": f"--limit {limit}: a limited run cannot satisfy a claim"} if limit is not None else {}),
            })
    return {
        "recipe": recipe.name,
        "benchmark": info,
        "metrics": metrics,
        "delta": delta,
        "claims": claims,
        "interventions": loaded.entries,
        "passed": bool(claims) and all(c["passed"] for c in claims),
        "skip_verify": False,
        "prefix_cache": prefix_cache,
        "seconds": {"baseline": round(t1 - t0, 2), "reduce": round(t2 - t1, 2), "reduced": round(t3 - t2, 2)},
    }


def _fmt(v: float, metric: str) -> str:
    return f"{v:.4f}" if metric in ("logprob", "logloss") else f"{100 * v:.2f}%"


def print_report(report: dict) -> None:
    b = report["benchmark"]
    title = (
        f"{report['recipe']}: {b['name']} {b['split']} split, n={b['n_scored']}, seed={b['seed']}, "
        f"sha256={b['examples_sha256'][:12]}" + (f", LIMIT {b['limit']}" if b["limit"] is not None else "")
    )
    t = Table(title=title)
    for col in ("metric", "baseline", "reduced", "Δ (paired bootstrap 95% CI)"):
        t.add_column(col)
    for m, d in report["delta"].items():
        lo, hi = d["ci95"]
        t.add_row(m, _fmt(report["metrics"]["baseline"][m], m), _fmt(report["metrics"]["reduced"][m], m),
                  f"{d['estimate']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    console.print(t)
    for c in report["claims"]:
        mark = "[green]✓ holds[/]" if c["passed"] else "[red]✗ FAILS[/]"
        why = f" ({c['why']})" if "why" in c else ""
        console.print(
            f"{mark} {c['name']} ({c['metric']}): claimed {c['claimed']:.4f}, measured {c['measured']:.4f}, "
            f"tolerance ±{c['tolerance']}{why}"
        )
    console.print("[green]all claims hold[/]" if report["passed"] else "[red]claims not verified[/]")
