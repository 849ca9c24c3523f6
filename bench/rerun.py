"""A rerun of the main command with a warm baseline cache vs the first run (issue 12: "a fraction of the first").

Run: ``python bench/rerun.py [--recipe recipes/smollm2-wikidataqa.yaml] [--subsample N | --limit N]
[--command run|verify]``.

Runs the command twice, back to back in this one process (each a fresh ``python -m laser_export``
subprocess: model load included), with a new temporary baseline cache (``$LASER_EXPORT_BASELINE_CACHE``)
and output folder: the first run is cold (scores the baseline as the prefix cache's capture pass, stores
baseline + prefix), the second is warm (reads both, replays only the reduced blocks). Prints both wall
times, the ratio second / first, verify's own timings from the two reports, the prefix size on disk,
and whether the two reports' numbers are identical. No assertions.

* default: the full recipe (SmolLM2: 4,800 test examples; ``run`` = load, verify, export safetensors + ONNX).
* ``--subsample N``: a copy of the recipe with ``benchmark.subsample: N`` (test split = 80% of N) and the
  claims' tolerance widened to 1.0, so ``run`` goes on to the export as it does with the real recipe.
* ``--limit N``: pass ``--limit N`` (a limited run never satisfies a claim: ``run`` stops after verify
  with exit 1, nothing exported; use it with ``--command verify``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict) -> tuple[float, int, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - t, proc.returncode, proc.stderr + proc.stdout


def _line(output: str, start: str) -> str:
    return next((ln.strip() for ln in output.splitlines() if ln.strip().startswith(start)), "(none)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2-wikidataqa.yaml")
    ap.add_argument("--command", choices=("run", "verify"), default="run")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--subsample", type=int, help="benchmark.subsample of a recipe copy (claims tolerance 1.0)")
    group.add_argument("--limit", type=int, help="pass --limit N (run: no export, exit 1)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="laser-rerun-") as tmp:
        tmp = Path(tmp)
        recipe = args.recipe.resolve()
        if args.subsample:
            data = yaml.safe_load(recipe.read_text())
            data["benchmark"]["subsample"] = args.subsample
            data["claims"]["tolerance"] = 1.0
            if str(data["model"]["source"]).startswith("."):  # relative paths stay relative to the original
                data["model"]["source"] = str((recipe.parent / data["model"]["source"]).resolve())
            recipe = tmp / recipe.name
            recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        env = {**os.environ, "LASER_EXPORT_BASELINE_CACHE": str(tmp / "cache")}
        times, reports, outputs = [], [], []
        for i in (1, 2):
            cmd = [sys.executable, "-m", "laser_export", args.command, str(recipe), "--report",
                   str(tmp / f"report{i}.json"), "--no-progress"]
            if args.command == "run":
                cmd += ["--out", str(tmp / "out"), "--overwrite"]
            if args.limit:
                cmd += ["--limit", str(args.limit)]
            seconds, rc, output = _run(cmd, env)
            report = json.loads((tmp / f"report{i}.json").read_text())
            if rc not in (0, 1):
                sys.exit(f"run {i} failed (exit {rc}):\n{output[-3000:]}")
            times.append(seconds)
            reports.append(report)
            outputs.append(output)
            print(f"run {i}: exit {rc}, {seconds:.1f} s wall; verify seconds {report['seconds']}; "
                  f"baseline_cache hit={report['baseline_cache']['hit']}, "
                  f"prefix={report['baseline_cache']['prefix']['status']}", flush=True)
        prefix = sorted((tmp / "cache").glob("*.safetensors"))
        size = sum(p.stat().st_size for p in prefix)
        first, second = reports
        same = all(first[k] == second[k] for k in ("metrics", "delta")) and \
            [c["measured"] for c in first["claims"]] == [c["measured"] for c in second["claims"]]
        b = first["benchmark"]
        verify_s = [r["seconds"]["baseline"] + r["seconds"]["reduced"] for r in reports]
        print(f"\n`laser-export {args.command}` {args.recipe.name}: {b['name']} {b['split']} n={b['n_scored']}"
              + (f" (subsample {args.subsample})" if args.subsample else "")
              + (f" (--limit {args.limit})" if args.limit else ""))
        print(f"second run: {_line(outputs[1], 'baseline and prefix')}")
        print(f"first (cold cache) {times[0]:.1f} s | second (warm cache) {times[1]:.1f} s | "
              f"SECOND / FIRST = {times[1] / times[0]:.2f}x")
        print(f"scoring only (baseline + reduced, from the reports): {verify_s[0]:.1f} s -> {verify_s[1]:.1f} s "
              f"= {verify_s[1] / verify_s[0]:.2f}x")
        print(f"prefix cache on disk: {len(prefix)} file(s), {size / 2**20:.1f} MiB "
              f"(baseline JSON {sum(p.stat().st_size for p in (tmp / 'cache').glob('*.json')) / 2**20:.1f} MiB)")
        print(f"reports identical (metrics, deltas, measured claims): {same}")


if __name__ == "__main__":
    main()
