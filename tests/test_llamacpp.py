"""GGUF files that llama.cpp runs: the keys it requires, F32 1-D tensors, the vocabulary from a transformers
tokenizer, quantized variants; and (slow, when ``llama-cpp-python`` is installed) llama.cpp itself loading each
file and generating the same greedy tokens as transformers."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from laser_export.export.gguf import GgufExportError, missing_keys, variant_path, write_gguf

TEXT = ("Low-rank approximations of weight matrices can improve reasoning in language models. "
        "The capital of France is Paris, 1234 kilometres from Rome; it's 42 degrees.")


def bpe_tokenizer(vocab_size: int = 320):
    """A GPT-2-style byte-level BPE tokenizer trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_llama(vocab: int, seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=vocab, max_position_embeddings=128, **over)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if "lm_head" in name else 0.1)
            else:
                p.uniform_(0.5, 1.5)  # norms away from 1: an F16/F32 mix-up would show
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tok = bpe_tokenizer()
    model = tiny_llama(len(tok) + 3)  # padded vocabulary, as real checkpoints have
    folder = tmp_path_factory.mktemp("gguf")
    files = {}
    for dtype in ("float32", "float16", "bfloat16"):
        path = folder / f"m-{dtype}.gguf"
        quantized = ("Q8_0", "Q4_0") if dtype == "float16" else ()
        info = write_gguf(model, path, arch="llama", dtype=dtype, tokenizer=tok, name="tiny-laser",
                          quantized=quantized, reference=model if dtype == "float32" else None,
                          provenance={"base_model": "someorg/tiny-base", "license": "apache-2.0", "languages": ["en"]})
        files[info["dtype"]] = (path, info)
        for v in info["variants"]:
            files[v["type"]] = (folder / v["file"], v)
    return model, tok, files


def test_every_file_has_the_keys_llama_cpp_requires_and_f32_one_dimensional_tensors(exported):
    model, tok, files = exported
    assert set(files) == {"F32", "F16", "BF16", "Q8_0", "Q4_0"}
    for kind, (path, info) in files.items():
        assert missing_keys(path) == [], kind
        reader = gguf.GGUFReader(str(path))
        f = reader.fields
        assert f["tokenizer.ggml.model"].contents() == "gpt2" and f["tokenizer.ggml.pre"].contents() == "gpt-2"
        assert len(f["tokenizer.ggml.tokens"].contents()) == model.config.vocab_size
        assert len(f["tokenizer.ggml.merges"].contents()) > 0
        assert f["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
        assert f["general.name"].contents() == "tiny-laser" and f["general.license"].contents() == "apache-2.0"
        assert f["general.base_model.0.repo_url"].contents() == "https://huggingface.co/someorg/tiny-base"
        assert f["general.languages"].contents() == ["en"]
        for t in reader.tensors:
            if len(t.shape) == 1:  # norms: F32 whatever the file type (llama.cpp aborts on F16 norms)
                assert t.tensor_type == gguf.GGMLQuantizationType.F32, (kind, t.name)
            elif kind == "Q4_0" and t.name in ("token_embd.weight", "output.weight"):
                assert t.tensor_type.name == "Q8_0"
            else:
                assert t.tensor_type.name == kind, (kind, t.name)


def test_the_manifest_entry_lists_variants_and_parity(exported):
    _, _, files = exported
    path, info = files["F32"]
    assert info["max_abs_diff"] == 0.0 and info["tokenizer"] is True and info["vocab"]["pre"] == "gpt-2"
    assert info["tensor_types"]["F32"] == len(gguf.GGUFReader(str(path)).tensors)
    _, f16 = files["F16"]
    assert [v["file"] for v in f16["variants"]] == ["m-float16-Q8_0.gguf", "m-float16-Q4_0.gguf"]
    assert f16["tensor_types"]["F32"] == 5  # 2 layers x 2 norms + the output norm
    assert files["Q4_0"][1]["tensor_bytes"] < files["Q8_0"][1]["tensor_bytes"] < f16["tensor_bytes"]
    assert variant_path(path, "Q8_0").name == "m-float32-Q8_0.gguf"


def test_transformers_reads_the_written_vocabulary_back(exported):
    _, tok, files = exported
    path, _ = files["F16"]
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert back(TEXT)["input_ids"][-20:] == tok(TEXT)["input_ids"][-20:]


def test_head_dim_and_rope_scaling_keys(tmp_path):
    tok = bpe_tokenizer()
    model = tiny_llama(len(tok), head_dim=32, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0})
    write_gguf(model, tmp_path / "y.gguf", arch="llama", dtype="float32", tokenizer=tok)
    f = gguf.GGUFReader(str(tmp_path / "y.gguf")).fields
    assert f["llama.attention.key_length"].contents() == 32 == f["llama.rope.dimension_count"].contents()
    assert f["llama.rope.scaling.type"].contents() == "yarn" and f["llama.rope.scaling.factor"].contents() == 4.0
    assert f["llama.rope.scaling.original_context_length"].contents() == 32

    llama3 = tiny_llama(len(tok), rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0})
    write_gguf(llama3, tmp_path / "l3.gguf", arch="llama", dtype="float16", tokenizer=tok)
    (freqs,) = [t for t in gguf.GGUFReader(str(tmp_path / "l3.gguf")).tensors if t.name == "rope_freqs.weight"]
    assert freqs.tensor_type == gguf.GGMLQuantizationType.F32 and list(freqs.shape) == [8]
    assert freqs.data.min() == pytest.approx(1.0) and freqs.data.max() == pytest.approx(8.0)  # high kept, low ×8


def test_unknown_rope_scaling_and_quant_type_are_refused(tmp_path):
    model = tiny_llama(300, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                             "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
                                             "original_max_position_embeddings": 32})
    with pytest.raises(GgufExportError, match="rope scaling 'longrope'"):
        write_gguf(model, tmp_path / "x.gguf", arch="llama", dtype="float32")
    with pytest.raises(GgufExportError, match="Q4_K"):
        write_gguf(tiny_llama(300), tmp_path / "x.gguf", arch="llama", dtype="float32", quantized=["Q4_K"])


def test_a_tokenizer_llama_cpp_cannot_read_is_reported_not_hidden(tmp_path):
    from tinymodels import tiny_tokenizer

    info = write_gguf(tiny_llama(128), tmp_path / "w.gguf", arch="llama", dtype="float32", tokenizer=tiny_tokenizer())
    assert info["tokenizer"] is False and "none of the kinds llama.cpp reads" in info["vocab"]["missing"]
    assert "tokenizer.ggml.model" in info["llama_cpp_keys_missing"]


# ------------------------------------------------------------------------------------------ llama.cpp itself


def _greedy_hf(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
def test_llama_cpp_loads_each_file_and_generates(exported, kind):
    """llama.cpp (llama-cpp-python) tokenizes like transformers and, on each file, generates greedily what
    transformers generates from the same file (F32: from the model itself)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (see the README)")
    model, tok, files = exported
    path, _ = files[kind]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False, logits_all=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tok(TEXT)["input_ids"]
    prompt = tok(TEXT[:40])["input_ids"]
    ours = llm.generate(prompt, temp=0.0, top_k=1, reset=True)  # endless: take as many as transformers made
    theirs = model if kind == "F32" else AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    want = _greedy_hf(theirs, prompt, 12)
    got = []
    for t in ours:
        got.append(t)
        if len(got) == len(want):
            break
    agree = sum(a == b for a, b in zip(got, want)) / len(want)
    # llama.cpp also quantizes activations for Q8_0 / Q4_0 matrices: near-ties may flip there
    assert agree >= {"Q8_0": 0.75, "Q4_0": 0.5}.get(kind, 1.0), (kind, got, want)


def test_run_writes_the_tokenizer_and_the_variants_the_recipe_asks_for(tmp_path):
    import json

    import yaml

    from laser_export.cli import main

    tok = bpe_tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    recipe = {"name": "g", "model": {"source": str(tmp_path / "m")}, "storage": "dense",
              "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}],
              "export": {"formats": ["safetensors", "gguf"], "dtype": "float16", "gguf_types": ["Q8_0"]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main([str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["gguf"]
    assert entry["tokenizer"] is True and entry["llama_cpp_keys_missing"] == []
    assert [v["file"] for v in entry["variants"]] == ["g-Q8_0.gguf"] and (tmp_path / "out" / "g-Q8_0.gguf").is_file()
    assert "`g-Q8_0.gguf`: Q8_0 variant." in (tmp_path / "out" / "README.md").read_text()


def test_variants_without_their_format_fail_check(tmp_path, capsys):
    import yaml

    from laser_export.cli import main
    from tinymodels import save_tiny

    save_tiny("llama", tmp_path / "m")
    recipe = {"name": "g", "model": {"source": str(tmp_path / "m")},
              "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}], "export": {"gguf_types": ["Q8_0"]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["check", str(tmp_path / "r.yaml")]) == 2
    assert "export.gguf_types needs gguf in export.formats" in capsys.readouterr().err


@pytest.mark.slow
def test_llama_cpp_runs_a_float16_smollm2_export(smollm2_gguf, tmp_path):
    """A real model: SmolLM2-135M (GGUF source, tokenizer keys copied) exported in F16 and Q8_0; llama.cpp
    generates from both, the F16 file greedily as transformers does on the F32 model."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (see the README)")
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    info = write_gguf(model, tmp_path / "s.gguf", arch="llama", dtype="float16", source_gguf=smollm2_gguf,
                      name="smollm2-laser", quantized=["Q8_0"], provenance={"license": "apache-2.0"})
    assert info["llama_cpp_keys_missing"] == [] and info["vocab"]["model"] == "gpt2"
    prompt = tok("The capital of France is")["input_ids"]
    want = _greedy_hf(model, prompt, 8)
    for file, need in (("s.gguf", 1.0), ("s-Q8_0.gguf", 0.5)):
        llm = llama_cpp.Llama(model_path=str(tmp_path / file), n_ctx=64, n_threads=2, verbose=False)
        got = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            got.append(t)
            if len(got) == len(want):
                break
        assert sum(a == b for a, b in zip(got, want)) / len(want) >= need, (file, got, want)


def test_k_quants_need_llama_cpp_python_and_check_says_so(tmp_path, capsys, monkeypatch):
    """Q4_K_M & co are made by llama.cpp's own quantizer (llama-cpp-python): without it, `check` refuses the
    recipe naming the field and the package (exit 2), before anything loads."""
    import importlib.util

    import yaml

    from laser_export.cli import main
    from tinymodels import save_tiny

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    save_tiny("llama", tmp_path / "m")
    recipe = {"name": "g", "model": {"source": str(tmp_path / "m")}, "storage": "dense",
              "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}],
              "export": {"formats": ["safetensors", "gguf"], "gguf_types": ["Q4_K_M"]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["check", str(tmp_path / "r.yaml")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "export.gguf_types: Q4_K_M is written by llama.cpp's own quantizer, which needs llama-cpp-python" in err


@pytest.mark.slow
def test_q4_k_m_variant_by_llama_cpp_runs_in_llama_cpp(tmp_path):
    """A Q4_K_M variant (what LASER models ship as) written by llama.cpp's quantizer from the F16 export: k-quant
    tensors (rows of 256), 1-D tensors F32, read back by transformers and run by llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (see the README)")
    tok = bpe_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=512, vocab_size=len(tok),
                                         max_position_embeddings=128)).eval()
    info = write_gguf(model, tmp_path / "m.gguf", arch="llama", dtype="float16", tokenizer=tok,
                      quantized=("Q4_K_M",))
    (v,) = info["variants"]
    assert v["file"] == "m-Q4_K_M.gguf" and v["quantizer"].startswith("llama.cpp (llama-cpp-python ")
    assert {"Q4_K", "F32"} <= set(v["tensor_types"]) and v["tensor_bytes"] < info["tensor_bytes"] / 2
    reader = gguf.GGUFReader(str(tmp_path / v["file"]))
    assert all(t.tensor_type.name == "F32" for t in reader.tensors if len(t.shape) == 1 or t.shape[1] == 1)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=v["file"], dtype=torch.float32).eval()
    ids = torch.tensor([tok(TEXT[:40])["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(back(ids).logits).all()
    llm = llama_cpp.Llama(model_path=str(tmp_path / v["file"]), n_ctx=128, n_threads=1, verbose=False)
    out = llm.generate(ids[0].tolist(), temp=0.0, top_k=1, reset=True)
    assert isinstance(next(out), int)
