"""Verify a recipe's claims: score baseline and reduced model on the recipe's split, compare.

A claim holds when the measured value is within ``claims.tolerance`` of the claimed one (both
directions: a claim is a reproducible number, not a lower bound). A run with ``--limit`` is reported
but can never satisfy a claim.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.table import Table

from .benchmarks import BenchmarkError, examples_sha256, load_split
from . import answer_balance, metrics as metrics_table
from .evaluate import paired_bootstrap, score, scorer_for
from .metrics import format_value
from .pipeline import Loaded, Plan, reduce_loaded
from .progress import console
from .prefix import PrefixCache, PrefixCacheError

if TYPE_CHECKING:
    from .baseline_cache import BaselineCache

#: metrics reported next to the claimed one, when the benchmark has them (the metrics table, in its order)
REPORTED = metrics_table.ALL


def select_examples(p: Plan, limit: int | None = None) -> tuple[list, dict]:
    """The examples a verify run scores and the split info for its report (no model needed)."""
    from .benchmarks.hub import recorded_sources

    bench = p.recipe.benchmark
    with recorded_sources() as sources:
        split = load_split(
            bench.name,
            path=bench.path,
            seed=bench.seed,
            validation_fraction=0.0 if bench.split == "all" else bench.validation_fraction,
            subsample=bench.subsample,
        )
    examples = split.get(bench.split)
    info = {"name": bench.name, "split": bench.split, "subsample": bench.subsample, **split.info(bench.split)}
    if sources:  # Hub datasets: the resolved commit (online) or the local files' SHA-256
        info["sources"] = sources
    if limit is not None:
        examples = examples[:limit]
        info["examples_sha256"] = examples_sha256(examples)
    info["limit"] = limit
    info["n_scored"] = len(examples)
    return examples, info


def check_scorable(p: Plan) -> str:
    """The scorer that applies to the plan's family and benchmark (``plan`` checked this already)."""
    from .benchmarks import BENCHMARKS

    try:
        return scorer_for(p.family, BENCHMARKS[p.recipe.benchmark.name], p.recipe.benchmark.metric)
    except ValueError as err:
        raise BenchmarkError(str(err)) from None


def _baseline_identity(p: Plan, loaded: Loaded, info: dict, extra: dict) -> dict:
    from .baseline_cache import model_identity, scorer_version
    from .evaluate import _model_device

    return {
        "model": model_identity(p.source, loaded.model.config),
        "dtype": p.recipe.model.dtype,
        **({"compute_dtype": p.compute_dtype} if p.compute_dtype not in (None, p.loaded_dtype) else {}),
        "device": _model_device(loaded.model).type,
        "benchmark": info["name"],
        "examples_sha256": info["examples_sha256"],
        "batch_size": p.recipe.benchmark.batch_size,
        "scorer": scorer_version(),
        "scorer_kind": check_scorable(p),
        "scorer_options": extra,
    }


class PairedPasses:
    """The two scoring passes of a verify, shared by ``verify`` and the search's test-split check.

    :meth:`baseline` scores the unreduced model on ``examples``; with the causal scorer and
    ``prefix_cache`` it also records the inputs of block ``start`` (the lowest reduced layer).
    The caller then reduces the model, and :meth:`reduced` scores it on the same examples, replaying
    only blocks ``start..L-1`` from the recording (equal to a full forward within 1e-5, see
    tests/test_search.py) — or running full forwards when nothing was recorded (no prefix cache, or
    a cached baseline whose prefix was not stored: :meth:`forget_prefix`; a stored prefix is loaded into
    ``cache`` by the baseline cache)."""

    def __init__(self, scorer: str, model, tokenizer, family, examples, *, start: int, batch_size: int,
                 progress: bool = True, prefix_cache: bool = True, extra: dict | None = None):
        self.scorer, self.model, self.tokenizer, self.examples = scorer, model, tokenizer, examples
        self.start, self.batch_size, self.progress, self.extra = start, batch_size, progress, extra or {}
        # the prefix cache replays causal-LM blocks
        self.cache = (PrefixCache(model, family, start, lazy_capture=True, replay_layers=[start])
                      if prefix_cache and scorer == "causal" else None)

    def _score(self, description: str, forward_fn):
        return score(self.scorer, self.model, self.tokenizer, self.examples, batch_size=self.batch_size,
                     progress=self.progress, description=description, forward_fn=forward_fn, **self.extra)

    def baseline(self, description: str = "baseline"):
        return self._score(description, None if self.cache is None else self.cache.capture)

    def forget_prefix(self) -> None:
        """The baseline was not scored here: the reduced pass runs full forwards."""
        self.cache = None

    @property
    def replays(self) -> bool:
        return self.cache is not None

    def reduced(self, description: str = "reduced"):
        try:
            return self._score(description, None if self.cache is None else self.cache.replay(self.start))
        finally:
            self.cache = None  # the recording is large; one replay is all a verify needs


def _score_baseline(p: Plan, loaded: Loaded, passes: PairedPasses, info, *, baseline_cache, extra: dict):
    """(baseline ScoreResult, cache info for the report).

    With a baseline cache, a hit needs the stored prefix too when the reduced pass would replay one
    (``passes.cache``): it is loaded into ``passes``; without it the baseline is scored again as the
    capture pass, and both are stored. A hit whose prefix is skipped (over the budget, no prefix cache)
    leaves ``passes`` without a recording: the reduced model is then scored with full forwards."""
    if baseline_cache is None:
        return passes.baseline(), None
    from .baseline_cache import PrefixStatus, prefix_identity

    no_prefix = "no prefix cache (--no-prefix-cache or a non-causal scorer)"
    identity = _baseline_identity(p, loaded, info, extra)
    key = baseline_cache.key(identity)
    path = str(baseline_cache.path(key))
    pid = None if passes.cache is None else prefix_identity(passes.cache)
    base, why = baseline_cache.load(key), "no cached baseline"
    if base is not None:
        pre = (PrefixStatus("skipped", no_prefix) if passes.cache is None
               else baseline_cache.load_prefix(key, pid, passes.cache))
        if pre.status != "miss":
            if pre.status == "hit":
                console.print(f"baseline and prefix from cache {path} ({pre.bytes / 2**20:.1f} MiB prefix; "
                              "--no-cache scores again)")
            else:  # the reduced model is scored with full forwards
                console.print(f"baseline from cache {path}; prefix {pre.reason}: full forwards (--no-cache scores again)")
                passes.forget_prefix()
            return base, {"hit": True, "key": key, "path": path, "prefix": pre.report()}
        why = pre.reason
        console.print(f"baseline cache: {why}; scoring the baseline again to capture it")
    base = passes.baseline()
    stored = baseline_cache.store(key, identity, base)
    pre = (PrefixStatus("skipped", no_prefix) if passes.cache is None
           else baseline_cache.store_prefix(key, pid, passes.cache))
    if pre.status == "skipped" and passes.cache is not None:
        console.print(f"prefix not cached: {pre.reason}")
    if pre.status == "miss":
        pre.reason = why
    return base, {"hit": False, "key": key, "path": str(stored) if stored else None, "prefix": pre.report()}


def verify_loaded(
    p: Plan, loaded: Loaded, *, limit: int | None = None, progress: bool = True, selected=None,
    prefix_cache: bool = True, baseline_cache: "BaselineCache | None" = None,
) -> dict:
    """Score ``loaded`` (unreduced) on the split, reduce it in place, score again, build the report.

    ``selected``: the result of :func:`select_examples`, when the caller loaded the data already.
    ``prefix_cache``: the baseline pass records the inputs of every block from the lowest reduced
    layer on, and the reduced pass replays only those blocks (equal to a full forward within 1e-5,
    see tests/test_search.py); False runs two full forwards."""
    recipe, bench = p.recipe, p.recipe.benchmark
    scorer = check_scorable(p)
    examples, info = selected or select_examples(p, limit)
    ppl_ids, ppl_opts = _perplexity_input(p, loaded)
    from .benchmarks import BENCHMARKS

    extra = {"max_new_tokens": BENCHMARKS[bench.name].max_new_tokens} if scorer == "generate" else {}
    passes = PairedPasses(scorer, loaded.model, loaded.tokenizer, p.family, examples,
                          start=min(t.layer for t in p.targets), batch_size=bench.batch_size, progress=progress,
                          prefix_cache=prefix_cache, extra=extra)
    t0 = time.perf_counter()
    base, cache_info = _score_baseline(p, loaded, passes, info, baseline_cache=baseline_cache, extra=extra)
    replayed = passes.replays
    ppl_base = _measure_perplexity(loaded, ppl_ids, ppl_opts, progress) if ppl_ids else None
    t1 = time.perf_counter()
    reduce_loaded(p, loaded, progress=progress)
    t2 = time.perf_counter()
    ppl_red = _measure_perplexity(loaded, ppl_ids, ppl_opts, progress) if ppl_ids else None
    try:
        red = passes.reduced()
    except PrefixCacheError as err:  # e.g. a cached prefix whose batches differ: never report its numbers
        if cache_info is None or not cache_info.get("prefix") or cache_info["prefix"]["status"] != "hit":
            raise
        console.print(f"cached prefix not replayable ({err}); scoring the reduced model with full forwards")
        cache_info["prefix"] = {**cache_info["prefix"], "status": "miss", "reason": f"replay refused: {err}"}
        replayed = False
        red = passes.reduced()  # the recording was dropped: full forwards
    t3 = time.perf_counter()
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
        "scorer": scorer,
        "dtype": {"weights": p.loaded_dtype, "compute": p.compute_dtype},
        "perplexity": None if ppl_base is None else {
            **{k: v for k, v in vars(ppl_opts).items() if k != "max_tokens"},
            "path": None if ppl_opts.path is None else str(ppl_opts.path),
            "n_tokens": ppl_base["n_tokens"],
            "baseline": ppl_base["perplexity"],
            "reduced": ppl_red["perplexity"],
            "ratio": ppl_red["perplexity"] / ppl_base["perplexity"],
        },
        "skip_verify": False,
        "answer_balance": answer_balance.paired(examples, base, red),
        "prefix_cache": replayed,  # the reduced pass replayed the captured prefix
        "baseline_cache": cache_info,
        "seconds": {"baseline": round(t1 - t0, 2), "reduce": round(t2 - t1, 2), "reduced": round(t3 - t2, 2)},
    }


def _perplexity_input(p: Plan, loaded: Loaded):
    """Token ids and options of the recipe's perplexity measurement (None when it has none)."""
    spec = p.recipe.perplexity
    if spec is None:
        return None, None
    from .perplexity import PerplexityOptions, load_text, token_ids

    max_pos = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None) or spec.context
    context = min(spec.context, max_pos)
    opts = PerplexityOptions(dataset=spec.dataset, config=spec.config, split=spec.split, path=spec.path,
                             max_tokens=spec.max_tokens, context=context, stride=min(spec.stride, context))
    return token_ids(loaded.tokenizer, load_text(opts), opts.max_tokens), opts


def _measure_perplexity(loaded: Loaded, ids, opts, progress: bool) -> dict:
    from .perplexity import perplexity

    return perplexity(loaded.model, ids, context=opts.context, stride=opts.stride, progress=progress)


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
        t.add_row(m, format_value(m, report["metrics"]["baseline"][m]), format_value(m, report["metrics"]["reduced"][m]),
                  f"{d['estimate']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    console.print(t)
    ppl = report.get("perplexity")
    if ppl:
        console.print(
            f"perplexity ({ppl['dataset']}{'/' + ppl['config'] if ppl['config'] else ''} {ppl['split']}, "
            f"{ppl['n_tokens']} tokens): baseline {ppl['baseline']:.3f}, reduced {ppl['reduced']:.3f} "
            f"(×{ppl['ratio']:.4f})"
        )
    for side in ("baseline", "reduced"):
        warning = answer_balance.side_warning(report.get("answer_balance"), side, report["metrics"][side].get("top1"))
        if warning:
            console.print(f"[yellow]warning:[/] {side} model: {warning}")
    for c in report["claims"]:
        mark = "[green]✓ holds[/]" if c["passed"] else "[red]✗ FAILS[/]"
        why = f" ({c['why']})" if "why" in c else ""
        console.print(
            f"{mark} {c['name']} ({c['metric']}): claimed {c['claimed']:.4f}, measured {c['measured']:.4f}, "
            f"tolerance ±{c['tolerance']}{why}"
        )
    if not report["claims"]:
        console.print("measured, no claims (the recipe makes none)")
    else:
        console.print("[green]all claims hold[/]" if report["passed"] else "[red]claims not verified[/]")
