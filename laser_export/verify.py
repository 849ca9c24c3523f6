"""Verify a recipe's claims: score baseline and reduced model on the recipe's split, compare.

A claim holds when the measured value is within ``claims.tolerance`` of the claimed one (both
directions: a claim is a reproducible number, not a lower bound). A run with ``--limit`` is reported
but can never satisfy a claim.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from .benchmarks import BenchmarkError, examples_sha256, load_split
from . import answer_balance, metrics as metrics_table
from .selection import score, scorer_for
from .stats import paired_bootstrap
from .metrics import format_value
from .errors import CheckFailed
from .pipeline import Loaded, Plan
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


def _baseline_identity(p: Plan, loaded: Loaded, info: dict, extra: dict, memo_dir=None) -> dict:
    """What the baseline scores depend on, by content (:mod:`laser_export.identity`): the model's files (or
    its Hub commit), the load dtype and device type, library versions, the examples' SHA-256, the scorer."""
    from .baseline_cache import scorer_version
    from .evaluate import _model_device
    from .identity import library_versions, model_identity

    m = p.recipe.model
    return {
        "model": model_identity(p.source, getattr(loaded.model.config, "_commit_hash", None), memo_dir),
        "trust_remote_code": bool(m.trust_remote_code),
        "dtype": m.dtype,
        **({"compute_dtype": p.compute_dtype} if p.compute_dtype not in (None, p.loaded_dtype) else {}),
        "device": _model_device(loaded.model).type,
        "libraries": library_versions(),
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
    capture pass, and both are stored. A hit whose prefix is skipped (over the budget, no prefix cache,
    a replay that is not the model's forward) leaves ``passes`` without a recording: the reduced model is
    then scored with full forwards. The report names the entry by key and file name (never a local path)."""
    if baseline_cache is None or not baseline_cache.enabled:
        base = passes.baseline()
        _drop_inexact(passes)
        return base, None
    from .baseline_cache import PrefixStatus, prefix_identity

    no_prefix = "no prefix cache (--no-prefix-cache or a non-causal scorer)"
    identity = _baseline_identity(p, loaded, info, extra, baseline_cache.memo_dir())
    key = baseline_cache.key(identity)
    name = baseline_cache.path(key).name
    pid = None if passes.cache is None else prefix_identity(passes.cache)
    base, why = baseline_cache.load(key, identity, [ex.id for ex in passes.examples])
    if base is not None:
        pre = (PrefixStatus("skipped", no_prefix) if passes.cache is None
               else baseline_cache.load_prefix(key, pid, passes.cache))
        if pre.status != "miss":
            if pre.status == "hit":
                console.print(f"baseline and prefix from cache entry {key} ({pre.bytes / 2**20:.1f} MiB prefix; "
                              "--no-cache scores again)")
            else:  # the reduced model is scored with full forwards
                console.print(f"baseline from cache entry {key}; prefix {pre.reason}: full forwards "
                              "(--no-cache scores again)")
                passes.forget_prefix()
            return base, {"hit": True, "status": "hit", "key": key, "path": name, "prefix": pre.report()}
        why = pre.reason
    console.print(f"baseline cache: {why}; scoring the baseline" + ("" if passes.cache is None else " (capture)"))
    base = passes.baseline()
    stored, not_stored = baseline_cache.store(key, identity, base)
    if not_stored:
        console.print(f"[yellow]warning:[/] baseline not cached: {not_stored}")
    pre = (PrefixStatus("skipped", no_prefix) if passes.cache is None
           else baseline_cache.store_prefix(key, pid, passes.cache))
    if pre.status == "skipped" and passes.cache is not None:
        console.print(f"prefix not cached: {pre.reason}")
    if pre.status == "miss":
        pre.reason = why
    _drop_inexact(passes)
    return base, {"hit": False, "status": "stored" if stored else "miss", "key": key,
                  "path": name if stored else None, "reason": not_stored, "prefix": pre.report()}


def _drop_inexact(passes: PairedPasses) -> None:
    """The capture found that replay is not the model's forward: the reduced pass runs full forwards."""
    if passes.cache is not None and passes.cache.exact is False:
        console.print(f"prefix cache: {passes.cache.inexact_reason}")
        passes.forget_prefix()


class ScoresNotFinite(CheckFailed):
    """A scoring pass produced NaN/inf (e.g. float16 overflow): never reported as a measurement."""


def _check_finite(side: str, metrics: dict, model, dtype: str | None) -> None:
    """Every metric of the ``side`` pass is a finite number, else ScoresNotFinite naming the pass (and the first
    non-finite weight, when one is)."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return
    from .finite import first_nonfinite

    found = first_nonfinite(model.named_parameters())
    where = f"weight {found[0]} holds inf/NaN" if found else f"the activations overflow in {dtype}"
    advice = ("load the model in float32 or bfloat16 (model.dtype)" if dtype in ("float16", None)
              else f"the checkpoint itself is not usable as loaded in {dtype}")
    raise ScoresNotFinite(f"{side} pass: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite ({where}); "
                          f"nothing is reported: {advice}")


def report_model(p: Plan) -> dict:
    """What identifies the measured model in a report: its public source, revision, weights identity, dtype."""
    from .baseline_cache import memo_dir_if_present
    from .export.manifest import public_source
    from .identity import digest, model_identity

    # a Hub source: the commit its config came from (the same on any machine, whatever is cached there)
    identity = model_identity(p.source, commit=getattr(p.config, "_commit_hash", None), memo_dir=memo_dir_if_present())
    return {"source": public_source(p.source), "revision": p.source.revision, "weights": digest(identity),
            "dtype": p.loaded_dtype or p.recipe.model.dtype}


class Measurement:
    """The two measurements of a verify around the run path's explicit reduce step: :meth:`baseline` scores
    ``loaded`` unreduced, the caller reduces it, :meth:`reduced` scores it again and returns the report.

    ``selected``: the result of :func:`select_examples`, when the caller loaded the data already.
    ``prefix_cache``: the baseline pass records the inputs of every block from the lowest reduced layer on,
    and the reduced pass replays only those blocks (equal to a full forward within 1e-5, see
    tests/test_search.py); False runs two full forwards."""

    def __init__(self, p: Plan, loaded: Loaded, *, limit: int | None = None, progress: bool = True, selected=None,
                 prefix_cache: bool = True, baseline_cache: "BaselineCache | None" = None):
        from .benchmarks import BENCHMARKS

        bench = p.recipe.benchmark
        self.p, self.loaded, self.limit, self.progress, self.baseline_cache = p, loaded, limit, progress, baseline_cache
        self.scorer = check_scorable(p)
        self.examples, self.info = selected or select_examples(p, limit)
        self.ppl_ids, self.ppl_opts = _perplexity_input(p, loaded)
        self.extra = {"max_new_tokens": BENCHMARKS[bench.name].max_new_tokens} if self.scorer == "generate" else {}
        self.passes = PairedPasses(self.scorer, loaded.model, loaded.tokenizer, p.family, self.examples,
                                   start=min(t.layer for t in p.targets), batch_size=bench.batch_size,
                                   progress=progress, prefix_cache=prefix_cache, extra=self.extra)

    def _ppl(self):
        return _measure_perplexity(self.loaded, self.ppl_ids, self.ppl_opts, self.progress) if self.ppl_ids else None

    def baseline(self) -> None:
        t0 = time.perf_counter()
        self.base, self.cache_info = _score_baseline(self.p, self.loaded, self.passes, self.info,
                                                     baseline_cache=self.baseline_cache, extra=self.extra)
        _check_finite("baseline", self.base.metrics, self.loaded.model, self.p.loaded_dtype)
        self.replayed = self.passes.replays
        self.ppl_base = self._ppl()
        self.t = [t0, time.perf_counter()]

    def reduced(self) -> dict:
        """Score the reduced model (``loaded.entries``: what the reduce step did) and build the report."""
        t2 = time.perf_counter()
        ppl_red = self._ppl()
        try:
            red = self.passes.reduced()
        except PrefixCacheError as err:  # e.g. a cached prefix whose batches differ: never report its numbers
            info = self.cache_info
            if info is None or not info.get("prefix") or info["prefix"]["status"] != "hit":
                raise
            console.print(f"cached prefix not replayable ({err}); scoring the reduced model with full forwards")
            info["prefix"] = {**info["prefix"], "status": "miss", "reason": f"replay refused: {err}"}
            self.replayed = False
            red = self.passes.reduced()  # the recording was dropped: full forwards
        _check_finite("reduced", red.metrics, self.loaded.model, self.p.loaded_dtype)
        self.t += [t2, time.perf_counter()]
        return self._report(red, ppl_red)

    def _report(self, red, ppl_red) -> dict:
        p, base, bench = self.p, self.base, self.p.recipe.benchmark
        if bench.metric not in base.metrics:
            raise BenchmarkError(
                f"benchmark.metric: {bench.name} has no metric {bench.metric!r}; "
                f"available: {', '.join(k for k in base.metrics if k != 'n')}"
            )
        metrics = {side: {k: v for k, v in r.metrics.items() if k in REPORTED or k == "n"}
                   for side, r in (("baseline", base), ("reduced", red))}
        delta = {m: paired_bootstrap(base.hits(m), red.hits(m), seed=0)
                 for m in REPORTED if m in base.metrics and m in red.metrics}
        claims = _claims(p, metrics, self.limit)
        t0, t1, t2, t3 = self.t
        return {
            "recipe": p.recipe.name,
            "model": report_model(p),
            "benchmark": self.info,
            "metrics": metrics,
            "delta": delta,
            "claims": claims,
            "interventions": self.loaded.entries,
            "reduction": p.recipe.reduction.model_dump(),  # how they were reduced (apply --report compares it)
            "passed": bool(claims) and all(c["passed"] for c in claims),
            "scorer": self.scorer,
            "dtype": {"weights": p.loaded_dtype, "compute": p.compute_dtype},
            "perplexity": _perplexity_report(self.ppl_opts, self.ppl_base, ppl_red),
            "skip_verify": False,
            "answer_balance": answer_balance.paired(self.examples, base, red),
            "prefix_cache": self.replayed,  # the reduced pass replayed the captured prefix
            "baseline_cache": self.cache_info,
            "seconds": {"baseline": round(t1 - t0, 2), "reduce": round(t2 - t1, 2), "reduced": round(t3 - t2, 2)},
        }


def _claims(p: Plan, metrics: dict, limit: int | None) -> list[dict]:
    recipe, claims = p.recipe, []
    if recipe.claims is None:
        return claims
    tol, metric = recipe.claims.tolerance, recipe.benchmark.metric
    for side, claim in (("baseline", recipe.claims.baseline), ("reduced", recipe.claims.reduced)):
        measured = metrics[side][metric]
        ok = abs(measured - claim.accuracy) <= tol + 1e-12 and limit is None
        claims.append({
            "name": f"{side}.accuracy", "metric": metric, "claimed": claim.accuracy, "measured": measured,
            "tolerance": tol, "passed": ok,
            **({"why": f"--limit {limit}: a limited run cannot satisfy a claim"} if limit is not None else {}),
        })
    return claims


def _perplexity_report(opts, base: dict | None, red: dict | None) -> dict | None:
    if base is None:
        return None
    return {
        **{k: v for k, v in vars(opts).items() if k != "max_tokens"},
        "path": None if opts.path is None else Path(opts.path).name,  # a report is published: no local path
        "n_tokens": base["n_tokens"],
        "baseline": base["perplexity"],
        "reduced": red["perplexity"],
        "ratio": red["perplexity"] / base["perplexity"],
    }


def load_report(path: Path, p: Plan) -> dict:
    """The passing verify report of ``p``'s recipe, measured on this model (source, revision, weights) and these
    interventions, else RecipeError naming the file. (The matrices and dtype are compared again with the
    export, :func:`laser_export.export.writer.check_report_matches`.)"""
    from .inputs import read_json_object
    from .recipe import RecipeError

    recipe = p.recipe
    report = read_json_object(path, "--report")
    if report.get("recipe") != recipe.name:
        raise RecipeError([f"--report: {path} is the report of recipe {report.get('recipe')!r}, not {recipe.name!r}"])
    if report.get("claims") and not report.get("passed"):  # no claims: measured only
        raise RecipeError([f"--report: {path} says the claims did not hold; nothing to apply"])
    measured, here = report.get("model"), report_model(p)
    if not isinstance(measured, dict):
        raise RecipeError([f"--report: {path} does not say which model it measured (an older report); verify again"])
    for key in ("source", "revision", "weights"):
        if measured.get(key) != here[key]:
            raise RecipeError([f"--report: {path} measured another model ({key} {measured.get(key)!r}, this recipe's "
                               f"is {here[key]!r}); verify the recipe again"])
    planned = [(t.layer, t.alias) for t in p.targets]
    ivs = [(e.get("layer"), e.get("matrix")) for e in report.get("interventions") or [] if isinstance(e, dict)]
    if ivs != planned:
        raise RecipeError([f"--report: {path} measured other interventions than the recipe's; verify it again"])
    if report.get("reduction") != recipe.reduction.model_dump():  # another SVD gives other factors
        raise RecipeError([f"--report: {path} measured matrices reduced with {report.get('reduction')!r}, this recipe "
                           f"reduces with {recipe.reduction.model_dump()!r}; verify the recipe again"])
    _check_report_claims(path, report, p)
    return report


def _check_report_claims(path: Path, report: dict, p: Plan) -> None:
    """The report verified this recipe's claims (metric, claimed values, tolerance) on this recipe's benchmark
    split (name, split, seed, validation fraction, subsample), else RecipeError: the card shows the report's
    claims next to the recipe it embeds."""
    from .recipe import RecipeError

    recipe, bench = p.recipe, p.recipe.benchmark
    want = [] if recipe.claims is None else [
        [f"{side}.accuracy", bench.metric, claim.accuracy, recipe.claims.tolerance]
        for side, claim in (("baseline", recipe.claims.baseline), ("reduced", recipe.claims.reduced))]
    got = [[c.get(k) for k in ("name", "metric", "claimed", "tolerance")]
           for c in report.get("claims") or [] if isinstance(c, dict)]
    if got != want:
        def brief(claims):
            return ", ".join(f"{n} {m} {c} ±{t}" for n, m, c, t in claims) or "none"

        raise RecipeError([f"--report: {path} verified other claims ({brief(got)}) than this recipe makes "
                           f"({brief(want)}); verify the recipe again"])
    measured = report.get("benchmark") if isinstance(report.get("benchmark"), dict) else {}
    split_keys = () if bench is None or bench.split == "all" else ("seed", "validation_fraction")  # all: no split
    for key in ("name", "split", "subsample", *split_keys):
        here = getattr(bench, key) if bench is not None else None
        if bench is not None and measured.get(key) != here:
            raise RecipeError([f"--report: {path} measured benchmark.{key} {measured.get(key)!r}, this recipe's is "
                               f"{here!r}; verify the recipe again"])
    if bench is not None:
        _check_report_examples(path, measured, p)


def _check_report_examples(path: Path, measured: dict, p: Plan) -> None:
    """The report scored the examples this recipe's data gives (their SHA-256, with the report's --limit), else
    RecipeError: the same benchmark name and split over another data file are other numbers. Where the data cannot
    be read here (apply runs where the data is not), one line says the examples were not compared."""
    from .benchmarks import BenchmarkError
    from .recipe import RecipeError

    try:
        _, info = select_examples(p, measured.get("limit"))
    except BenchmarkError as err:
        console.print(f"[yellow]--report: the examples it scored were not compared with this recipe's data "
                      f"({' '.join(str(err).split())[:200]})[/]")
        return
    if measured.get("examples_sha256") != info["examples_sha256"]:
        raise RecipeError([f"--report: {path} scored other examples (sha256 {str(measured.get('examples_sha256'))[:12]}) "
                           f"than this recipe's data gives ({info['examples_sha256'][:12]}, "
                           f"{p.recipe.benchmark.path or p.recipe.benchmark.name}); verify the recipe again"])


def check_report_json(report: dict, where: str) -> None:
    """A report is valid JSON: no NaN/inf anywhere (ScoresNotFinite naming the key)."""
    def walk(x, at):
        if isinstance(x, float) and not math.isfinite(x):
            raise ScoresNotFinite(f"{where}: {at} is {x}; a report never holds a non-finite number")
        for k, v in (x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()):
            walk(v, f"{at}.{k}" if at else str(k))

    walk(report, "")


def _perplexity_ids(p: Plan, tokenizer, context: int):
    """(token ids, options) of the recipe's perplexity text; BenchmarkError naming perplexity when the text
    cannot be read or has fewer than 2 tokens."""
    from .perplexity import PerplexityOptions, load_text, token_ids

    spec = p.recipe.perplexity
    opts = PerplexityOptions(dataset=spec.dataset, config=spec.config, split=spec.split, path=spec.path,
                             max_tokens=spec.max_tokens, context=context, stride=min(spec.stride, context))
    ids = token_ids(tokenizer, load_text(opts), opts.max_tokens)
    if len(ids) < 2:
        where = f"perplexity.path {spec.path}" if spec.path is not None else f"perplexity: {spec.dataset}"
        raise BenchmarkError(f"{where}: the text has {len(ids)} tokens; perplexity needs at least 2")
    return ids, opts


def check_perplexity_input(p: Plan) -> None:
    """The recipe's perplexity text read and tokenised with the plan's tokenizer before the weights load: a
    missing, non-UTF-8, non-regular or too short text fails here, not after loading (runner._select)."""
    if p.recipe.perplexity is not None and p.tokenizer is not None:
        _perplexity_ids(p, p.tokenizer, p.recipe.perplexity.context)


def _perplexity_input(p: Plan, loaded: Loaded):
    """Token ids and options of the recipe's perplexity measurement (None when it has none)."""
    spec = p.recipe.perplexity
    if spec is None:
        return None, None
    max_pos = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None) or spec.context
    return _perplexity_ids(p, loaded.tokenizer, min(spec.context, max_pos))


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
    if report.get("lm_eval"):
        from .lm_eval_block import print_lm_eval

        print_lm_eval(report["lm_eval"])
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
