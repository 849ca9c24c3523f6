"""ONNX export + onnxruntime parity (tiny random models built from configs, CPU, no downloads)."""

from __future__ import annotations

import string
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers as tf
from onnx import numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers

from laser_export.export import onnx as onnx_export
from laser_export.export.onnx import (
    OnnxParityError,
    UnsupportedOnnxArchitecture,
    check_onnx_parity,
    export_onnx,
)
from laser_export.lowrank import LowRankLinear, as_matrix, compute_svd

TOL = 1e-4
# different lengths -> a padded batch of 3 (the export traced a batch of 2 and 5 new tokens)
TEXTS = ["Hello world, this is longer", "Hi", "a medium one"]
RANK = 5  # distinct from every other dimension, so the factor shapes are recognisable


def char_tokenizer():
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    chars = sorted(set(string.ascii_letters + string.digits + " .,!?-'"))
    vocab = {t: i for i, t in enumerate(specials + chars)}  # 74 ids < vocab 128
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>"
    )


def tiny_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(1)
    cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=128, bos_token_id=0, eos_token_id=2)
    return tf.GPT2LMHeadModel(cfg).eval()


def tiny_roberta():
    torch.manual_seed(2)
    cfg = tf.RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=128, max_position_embeddings=130,
    )
    return tf.RobertaForMaskedLM(cfg).eval()


def factorise(model, name: str, rank: int = RANK):
    """Swap the module ``name`` for a LowRankLinear built from its rank-k SVD factors."""
    parent_name, attr = name.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    dense = getattr(parent, attr)
    left, right = compute_svd(as_matrix(dense)).factors(rank)
    bias = dense.bias.detach() if dense.bias is not None else None
    setattr(parent, attr, LowRankLinear.from_factors(left, right, bias, torch.float32))
    return left, right


def _export(tmp_path_factory, name, model, **kw):
    out = tmp_path_factory.mktemp(name)
    result = export_onnx(model, char_tokenizer(), out, sample_texts=TEXTS, **kw)
    return types.SimpleNamespace(model=model, out=out, path=out / "model.onnx", result=result)


@pytest.fixture(scope="module")
def llama_dense(tmp_path_factory):
    return _export(tmp_path_factory, "llama_dense", tiny_llama())


@pytest.fixture(scope="module")
def llama_lowrank(tmp_path_factory):
    model = tiny_llama()
    left, right = factorise(model, "model.layers.1.mlp.gate_proj")
    ns = _export(tmp_path_factory, "llama_lowrank", model)
    ns.left, ns.right = left, right
    return ns


def _assert_passed(result, with_past):
    assert result["file"] == "model.onnx"
    assert result["opset"] == 18
    assert result["with_past"] is with_past
    assert result["tolerance"] == TOL
    assert result["passed"] is True
    assert 0.0 <= result["max_abs_diff"] <= TOL
    assert result["max_abs_diff"] == max(result["checks"].values())
    assert "CPUExecutionProvider" in result["providers"]
    expected_checks = {"padded_batch", "decode_step"} if with_past else {"padded_batch"}
    assert set(result["checks"]) == expected_checks
    for value in result["checks"].values():
        assert 0.0 <= value <= TOL


def _causal_io(n_layers):
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def test_llama_dense_with_past_parity(llama_dense):
    r = llama_dense.result
    _assert_passed(r, with_past=True)
    inputs, outputs = _causal_io(2)
    assert r["inputs"] == inputs and r["outputs"] == outputs
    assert r["external_data"] is None and not (llama_dense.out / "model.onnx_data").exists()
    # the file on disk says the same: opset 18, named dynamic axes
    m = onnx.load(str(llama_dense.path))
    assert {o.domain: o.version for o in m.opset_import}[""] == 18
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 8]


def test_llama_lowrank_graph_has_thin_matmuls_and_parity(llama_lowrank):
    _assert_passed(llama_lowrank.result, with_past=True)
    m = onnx.load(str(llama_lowrank.path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    matmul_inputs = {x for n in m.graph.node if n.op_type == "MatMul" for x in n.input}
    right = llama_lowrank.right.numpy()  # (k, in) = (5, 32)
    left = llama_lowrank.left.numpy()  # (out, k) = (64, 5)

    def find(target):
        # the exporter folds F.linear's transpose into the initializer: accept either layout
        return [
            name for name, arr in inits.items()
            if name in matmul_inputs
            and ((arr.shape == target.shape and np.allclose(arr, target, atol=1e-6))
                 or (arr.shape == target.T.shape and np.allclose(arr, target.T, atol=1e-6)))
        ]

    assert find(right), "no MatMul with the (k, in) right factor"
    assert find(left), "no MatMul with the (out, k) left factor"
    # and no dense (64, 32) gate matrix of layer 1 came back: the only rank-5 dims are the factors
    thin = [a.shape for a in inits.values() if a.ndim == 2 and RANK in a.shape]
    assert sorted(thin) == sorted([(32, 5), (5, 64)]) or sorted(thin) == sorted([(5, 32), (64, 5)])


def test_gpt2_lowrank_with_past_parity(tmp_path_factory):
    model = tiny_gpt2()
    factorise(model, "transformer.h.0.mlp.c_fc")  # Conv1D with bias -> LowRankLinear(bias)
    ns = _export(tmp_path_factory, "gpt2", model)
    _assert_passed(ns.result, with_past=True)
    inputs, outputs = _causal_io(2)
    assert ns.result["inputs"] == inputs and ns.result["outputs"] == outputs


def test_roberta_lowrank_masked_lm_parity(tmp_path_factory):
    model = tiny_roberta()
    factorise(model, "roberta.encoder.layer.1.intermediate.dense")
    ns = _export(tmp_path_factory, "roberta", model)  # with_past=True is ignored for encoders
    _assert_passed(ns.result, with_past=False)
    assert ns.result["task"] == "masked-lm"
    assert ns.result["inputs"] == ["input_ids", "attention_mask"]
    assert ns.result["outputs"] == ["logits"]


def test_parity_check_fails_on_perturbed_initializer(llama_dense, tmp_path):
    tok = char_tokenizer()
    ok = check_onnx_parity(llama_dense.model, tok, llama_dense.path, sample_texts=TEXTS)
    assert ok["passed"] and ok["max_abs_diff"] <= TOL
    m = onnx.load(str(llama_dense.path))
    init = next(i for i in m.graph.initializer if i.name == "model.embed_tokens.weight")
    arr = numpy_helper.to_array(init).copy()
    arr += 0.05
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "model.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(OnnxParityError, match=r"tolerance 0\.0001") as err:
        check_onnx_parity(llama_dense.model, tok, bad, sample_texts=TEXTS)
    assert err.value.report["passed"] is False
    assert err.value.report["max_abs_diff"] > 100 * TOL
    assert err.value.report["checks"]["padded_batch"] > TOL


def _perturbing_run(monkeypatch, edit):
    real = onnx_export._run_session
    calls = []

    def run(session, feed):
        out = real(session, feed)
        calls.append(feed)
        edit(len(calls), feed, out)
        return out

    monkeypatch.setattr(onnx_export, "_run_session", run)
    return calls


def test_only_non_padded_positions_are_compared(llama_dense, monkeypatch):
    tok = char_tokenizer()

    def garbage_at_padding(call, feed, out):
        if call == 1:
            out["logits"][feed["attention_mask"] == 0] += 1e3

    calls = _perturbing_run(monkeypatch, garbage_at_padding)
    ok = check_onnx_parity(llama_dense.model, tok, llama_dense.path, sample_texts=TEXTS)
    assert len(calls) == 2 and (calls[0]["attention_mask"] == 0).any()  # the batch was left-padded
    assert (calls[0]["attention_mask"][:, -1] == 1).all()
    assert ok["passed"] and ok["sample_shape"][0] == 3

    def garbage_at_a_real_token(call, feed, out):
        if call == 1:
            out["logits"][0, -1, 0] += 1e-3

    _perturbing_run(monkeypatch, garbage_at_a_real_token)
    with pytest.raises(OnnxParityError) as err:
        check_onnx_parity(llama_dense.model, tok, llama_dense.path, sample_texts=TEXTS)
    assert err.value.report["checks"]["padded_batch"] == pytest.approx(1e-3, rel=0.05)


def test_decode_step_is_fed_with_onnx_presents(llama_dense, monkeypatch):
    def corrupt_presents(call, feed, out):
        if call == 1:
            out["present.0.value"] += 0.5
        else:  # the decode step receives what the prefill returned
            assert feed["input_ids"].shape == (3, 1)
            assert feed["past_key_values.0.value"].shape[2] == feed["attention_mask"].shape[1] - 1

    _perturbing_run(monkeypatch, corrupt_presents)
    with pytest.raises(OnnxParityError) as err:
        check_onnx_parity(llama_dense.model, char_tokenizer(), llama_dense.path, sample_texts=TEXTS)
    checks = err.value.report["checks"]
    assert checks["padded_batch"] <= TOL < checks["decode_step"]


def test_export_without_past_and_export_raises_on_parity_failure(tmp_path, monkeypatch):
    model = tiny_llama()
    factorise(model, "model.layers.0.self_attn.o_proj", rank=3)

    def shift_logits(call, feed, out):
        out["logits"] += 2e-3

    _perturbing_run(monkeypatch, shift_logits)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)  # exercise the > 2 GB layout
    with pytest.raises(OnnxParityError, match="do not publish") as err:
        export_onnx(model, char_tokenizer(), tmp_path, with_past=False, sample_texts=TEXTS)
    r = err.value.report
    assert r["external_data"] == "model.onnx_data"
    data, graph = tmp_path / "model.onnx_data", tmp_path / "model.onnx"
    m = onnx.load(str(graph), load_external_data=False)
    external = [i for i in m.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert "model.embed_tokens.weight" in {i.name for i in external}
    assert data.stat().st_size >= 4 * 128 * 32  # at least the embedding matrix lives in the sidecar
    assert r["passed"] is False and r["max_abs_diff"] == pytest.approx(2e-3, rel=0.05)
    assert r["with_past"] is False
    assert r["inputs"] == ["input_ids", "attention_mask", "position_ids"] and r["outputs"] == ["logits"]
    # the same file, checked without the sabotage, is fine
    monkeypatch.undo()
    ok = check_onnx_parity(model, char_tokenizer(), tmp_path / "model.onnx", with_past=False, sample_texts=TEXTS)
    assert ok["passed"] and set(ok["checks"]) == {"padded_batch"} and ok["max_abs_diff"] <= TOL


def test_unsupported_architectures_are_named(tmp_path):
    neox = tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=128)
    )
    with pytest.raises(UnsupportedOnnxArchitecture, match="'gpt_neox'"):
        export_onnx(neox, char_tokenizer(), tmp_path)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="mamba"))
    with pytest.raises(UnsupportedOnnxArchitecture, match="'mamba'"):
        export_onnx(fake, char_tokenizer(), tmp_path)
    seq_cls = tf.LlamaForSequenceClassification(tiny_llama().config)
    with pytest.raises(UnsupportedOnnxArchitecture, match="LlamaForSequenceClassification"):
        export_onnx(seq_cls, char_tokenizer(), tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_sample_texts_must_make_a_padded_batch(llama_dense):
    with pytest.raises(ValueError, match="different lengths"):
        check_onnx_parity(llama_dense.model, char_tokenizer(), llama_dense.path, sample_texts=["abc", "xyz"])


def test_the_graph_names_no_local_path(llama_dense):
    """Issue 21 (no leaks): torch.onnx records each node's Python stack trace (pkg.torch.onnx.stack_trace), with
    the absolute paths of the local environment's files (e.g. a venv under the home folder); the export (pushed
    as is) drops them."""
    import os

    data = b"".join(p.read_bytes() for p in llama_dense.out.rglob("*") if p.is_file())
    assert b"pkg.torch.onnx.stack_trace" not in data
    for local in (os.path.dirname(torch.__file__), os.path.dirname(tf.__file__), str(Path.home())):
        assert local.encode() not in data, local
