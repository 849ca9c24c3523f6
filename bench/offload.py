"""`laser-export verify` of the GPT-J-6B shape with half of its blocks offloaded to disk through accelerate
(`model.device_map`), under a memory cap below the model's bytes (issue 19).

Run: ``python bench/offload.py [--layers 28] [--workdir DIR] [--disk-from 14]`` (the checkpoint is built once in
``DIR/ckpt`` with ``bench/flagship.py``'s builder and reused).

The recipe is a copy of ``recipes/gptj-counterfact.yaml`` (15 CounterFact fixture prompts, fc_in of the last
layer, bf16) with ``model.device_map``: the embeddings, blocks ``0..disk_from-1``, the final norm and the head on
the CPU, blocks ``disk_from..`` on ``disk`` (``model.offload_folder`` in the work folder). The verify runs in a
fresh child process whose address space is capped (``RLIMIT_AS`` is not usable with torch's reservations, so the
cap is checked on the measured peak: ``ru_maxrss`` must stay below the model's bytes). Prints the wall time, the
peak RSS as a ratio of model bytes, and the reduced model's metrics next to an in-memory verify's (same numbers
expected: the offloaded weights are the same weights).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def child(recipe: str, report: str) -> None:
    from laser_export.cli import main

    t = time.perf_counter()
    rc = main(["verify", recipe, "--report", report, "--no-progress", "--no-cache"])
    print(json.dumps({"rc": rc, "wall": time.perf_counter() - t,
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _child(recipe: Path, report: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(recipe), str(report)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"verify failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--disk-from", type=int, default=None, help="first block on disk (default: half the blocks)")
    ap.add_argument("--workdir", default="/work/flagship-tmp/offload")
    args = ap.parse_args()
    import yaml

    import flagship

    work = Path(args.workdir)
    src, model_bytes = flagship.gptj_checkpoint(work, args.layers)
    disk_from = args.layers // 2 if args.disk_from is None else args.disk_from
    plain = flagship.recipe(work, "inmemory", "gptj-counterfact", src, args.layers, dtype="bfloat16")
    data = yaml.safe_load(plain.read_text())
    dmap = {"transformer.wte": "cpu", **{f"transformer.h.{i}": ("cpu" if i < disk_from else "disk")
                                         for i in range(args.layers)}, "transformer.ln_f": "cpu", "lm_head": "cpu"}
    data["name"] = "offload"
    data["model"].update(device_map=dmap, offload_folder=str(work / "offload"))
    offload = work / "offload.yaml"
    offload.write_text(yaml.safe_dump(data, sort_keys=False))
    off = _child(offload, work / "offload.json")
    mem = _child(plain, work / "inmemory.json")
    on_disk = sum(f.stat().st_size for f in (work / "offload").rglob("*") if f.is_file())
    print(f"GPT-J shape, {args.layers} layers, {model_bytes / 1e9:.2f} GB bf16; blocks {disk_from}..{args.layers - 1} "
          f"on disk ({on_disk / 1e9:.2f} GB in the offload folder); load average {os.getloadavg()[0]:.1f}")
    print(f"verify, device_map with disk offload: {off['wall']:.1f} s, peak RSS {off['maxrss'] / 1e9:.2f} GB = "
          f"{off['maxrss'] / model_bytes:.2f}x model bytes ({'under' if off['maxrss'] < model_bytes else 'OVER'} "
          f"the cap of model bytes)")
    print(f"verify, in memory:                   {mem['wall']:.1f} s, peak RSS {mem['maxrss'] / 1e9:.2f} GB = "
          f"{mem['maxrss'] / model_bytes:.2f}x model bytes")
    reports = {k: json.loads((work / f"{k}.json").read_text()) for k in ("offload", "inmemory")}
    for side in ("baseline", "reduced"):
        a, b = (reports[k]["metrics"][side] if "metrics" in reports[k] else reports[k][side] for k in ("offload", "inmemory"))
        same = all(abs(a[m] - b[m]) <= 1e-6 for m in a if isinstance(a[m], float) and m in b)
        print(f"  {side}: offloaded {json.dumps({m: round(v, 4) for m, v in a.items() if isinstance(v, float)})}; "
              f"same as in memory: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
