"""Where `laser-export run` spends time and memory on a GPT-J-shaped checkpoint, phase by phase, against a plain
transformers load+save of the same checkpoint measured in the same run (issue 19).

Run: ``python bench/run_phases.py [--layers 28] [--workdir DIR]`` (the checkpoint is built once in
``DIR/ckpt`` by ``bench/flagship.py``'s builder and reused; 28 layers = GPT-J-6B: 12.1 GB bf16, ~13 GB free RAM).

Both steps run in fresh child processes. The run is ``laser-export run`` of ``recipes/gptj-counterfact.yaml``
pointed at the checkpoint and the CounterFact fixture (15 test prompts, bf16, factorised export, no baseline
cache); a sampler thread reads the child's resident memory every 20 ms and attributes it to the phase running
(load, baseline pass, reduce, reduced pass, export write, export read-back). Prints each phase's wall time and
peak RSS, then the run's wall time as a ratio of the plain load+save and its peak RSS as a ratio of model bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def _wrap(mod, name: str, phase: str, state: dict) -> None:
    f = getattr(mod, name)

    def timed(*a, **k):
        outer, state["phase"] = state["phase"], phase
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            state["wall"][phase] = state["wall"].get(phase, 0.0) + time.perf_counter() - t
            state["phase"] = outer

    setattr(mod, name, timed)


def child_run(recipe: str, out: str, report: str) -> None:
    """In a fresh process: the run with phase attribution; prints one JSON line."""
    state = {"phase": "startup", "peak": {}, "wall": {}}

    def sample():
        while True:
            r, p = _rss(), state["phase"]
            state["peak"][p] = max(state["peak"].get(p, 0), r)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    import laser_export.export.readback as rb
    import laser_export.export.safetensors as st
    import laser_export.export.writer as writer
    import laser_export.runner as runner
    import laser_export.verify as verify
    from laser_export.cli import main

    for mod, name, phase in ((runner, "load_model", "load"), (verify.Measurement, "baseline", "baseline pass"),
                             (runner, "reduce_loaded", "reduce"), (verify.Measurement, "reduced", "reduced pass"),
                             (st, "write_checkpoint", "export: write"), (rb, "read_back", "  of which read-back")):
        _wrap(mod, name, phase, state)
    t = time.perf_counter()
    rc = main([recipe, "--out", out, "--no-progress", "--no-cache", "--report", report])
    wall = time.perf_counter() - t
    time.sleep(0.05)
    print(json.dumps({"rc": rc, "wall": wall, "phases": state["wall"], "peaks": state["peak"],
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def child_plain(src: str, out: str) -> None:
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(src, dtype="auto").save_pretrained(out)
    print(json.dumps({"wall": time.perf_counter() - t,
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _child(*argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_run(*sys.argv[3:]) if sys.argv[2] == "run" else child_plain(*sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--workdir", default="/work/flagship-tmp/phases")
    args = ap.parse_args()
    import flagship

    work = Path(args.workdir)
    src, model_bytes = flagship.gptj_checkpoint(work, args.layers)
    recipe = flagship.recipe(work, "phases", "gptj-counterfact", src, args.layers, dtype="bfloat16")
    for d in ("plain", "out"):
        shutil.rmtree(work / d, ignore_errors=True)
    plain = _child("plain", str(src), str(work / "plain"))
    shutil.rmtree(work / "plain", ignore_errors=True)
    run = _child("run", str(recipe), str(work / "out"), str(work / "report.json"))
    print(f"GPT-J shape, {args.layers} layers, {model_bytes / 1e9:.2f} GB bf16; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"plain load+save: {plain['wall']:.1f} s, peak RSS {plain['maxrss'] / 1e9:.2f} GB")
    print("laser-export run, by phase (wall; peak RSS while it ran):")
    order = ["load", "baseline pass", "reduce", "reduced pass", "export: write", "  of which read-back"]
    for phase in sorted(run["phases"], key=lambda p: order.index(p) if p in order else len(order)):
        sec = run["phases"][phase]
        print(f"  {phase:20s} {sec:7.1f} s   {run['peaks'].get(phase, 0) / 1e9:6.2f} GB")
    other = run["wall"] - sum(v for k, v in run["phases"].items() if not k.startswith(" "))
    print(f"  {'everything else':20s} {other:7.1f} s   (recipe, plan, tokenising, scoring set-up, card, manifest)")
    print(f"run: {run['wall']:.1f} s = {run['wall'] / plain['wall']:.2f}x plain load+save; peak RSS "
          f"{run['maxrss'] / 1e9:.2f} GB = {run['maxrss'] / model_bytes:.2f}x model bytes")


if __name__ == "__main__":
    main()
