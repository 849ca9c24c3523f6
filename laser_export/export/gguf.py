"""GGUF: name a GGUF source's quantization, and write a dense export as GGUF files that llama.cpp / Ollama run.

Writing uses the ``gguf`` package (llama.cpp's own writer, tensor-name map, vocabulary, metadata and quantization
helpers) and follows the rules of llama.cpp's ``convert_hf_to_gguf.py``:

* **tensor types**: 1-D tensors (norms, biases, ``rope_freqs``) stay F32 whatever the export type (llama.cpp's
  kernels add an F16 norm to an F32 activation and abort); 2-D tensors take the file's type. ``Q8_0`` / ``Q4_0``
  variants are quantized with ``gguf.quants``; a matrix whose rows are not a whole number of blocks falls back to
  F16, and a ``Q4_0`` file keeps the token embedding and output matrix in ``Q8_0`` (llama-quantize's rule).
  ``Q4_K_M`` / ``Q5_K_M`` / ``Q6_K`` (what LASER models ship as) are made by llama.cpp's own quantizer through
  llama-cpp-python (optional; ``check`` refuses them without it), from the export-dtype file.
* **tokenizer**: from the source GGUF file when there is one (its ``tokenizer.*`` keys are copied), else from the
  transformers tokenizer through ``gguf.vocab`` (GPT-2 byte-level BPE, Llama-style byte-fallback BPE, or a
  SentencePiece model) and ``gguf.SpecialVocab`` (merges, special token ids, chat template). The ``gpt2`` models'
  pre-tokenizer name comes from ``gguf_pretokenizers.json`` (data), else ``default``, said in the manifest.
* **hyper-parameters**: head dims (``key_length`` / ``value_length``), rope base, rope scaling (``linear``,
  ``yarn``, and ``llama3`` as a ``rope_freqs`` tensor computed by transformers' own rope function).
* **provenance** through ``gguf.Metadata``: name, size label, license, base model, languages.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import CheckFailed


def gguf_quantization(path: str | Path) -> str | None:
    """The GGUF file type (e.g. ``Q4_1``, ``F16``) from ``general.file_type``; None when absent/unreadable."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.file_type")
        if field is None:
            return None
        return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    except (ImportError, OSError, ValueError, KeyError, IndexError):
        return None


class GgufExportError(CheckFailed):
    label = "GGUF export failed, nothing exported:"
    """The model cannot be written as GGUF (a tensor without a GGUF name, factorised layers)."""


_GGML_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: k-quant variants, written by llama.cpp's own quantizer (``llama_model_quantize`` of llama-cpp-python, an
#: optional dependency) from the export-dtype file: the ``gguf`` package cannot write k-quants
LLAMA_CPP_TYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                   "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}
#: quantized variants (``export.gguf_types``): the ``gguf`` package writes Q8_0/Q4_0, llama.cpp the k-quants
GGUF_TYPES = ("Q8_0", "Q4_0", *LLAMA_CPP_TYPES)
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
               "Q4_0": "MOSTLY_Q4_0"}
#: keys llama.cpp reads before it can load a file of architecture ``{arch}`` (checked by :func:`missing_keys`)
REQUIRED_KEYS = ("general.architecture", "{arch}.context_length", "{arch}.embedding_length", "{arch}.block_count",
                 "{arch}.feed_forward_length", "{arch}.attention.head_count",
                 "{arch}.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
                 "tokenizer.ggml.token_type")


def _permute_qk(w, n_head: int):
    """HF → llama.cpp rotary layout of q/k rows (llama.cpp's convert_hf_to_gguf does the same)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_parameters(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None):
        params["rope_theta"] = config.rope_theta
    return params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _hparams(writer, config) -> None:
    heads = config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden/heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    params = _rope_parameters(config)
    if params.get("rope_theta"):
        writer.add_rope_freq_base(float(params["rope_theta"]))
    _rope_scaling(writer, params)
    writer.add_vocab_size(config.vocab_size)


def _rope_scaling(writer, params: dict) -> None:
    """Rope-scaling keys for ``linear`` and ``yarn`` (``llama3`` is the ``rope_freqs`` tensor, :func:`_rope_freqs`)."""
    import gguf

    kind = params.get("rope_type") or params.get("type") or "default"
    if kind in ("default", "llama3"):
        return
    if kind not in ("linear", "yarn"):
        raise GgufExportError(f"export.formats: gguf: rope scaling {kind!r} has no GGUF form in this writer "
                              "(default, linear, yarn and llama3 are written)")
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(params["factor"]))
    if kind == "yarn" and params.get("original_max_position_embeddings"):
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))


def _rope_freqs(config):
    """llama3 rope scaling as llama.cpp holds it: per-frequency divisors (base / scaled inverse frequencies),
    the scaled ones computed by transformers' own rope function. None for other rope types."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = _rope_parameters(config)
    if (params.get("rope_type") or params.get("type")) != "llama3":
        return None
    dim = _head_dim(config)
    base = 1.0 / (float(params["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    return (base / scaled.double()).float()


# ---------------------------------------------------------------------------------------------- tokenizer


def _copy_tokenizer(writer, source_gguf: Path) -> dict:
    """Copy the ``tokenizer.*`` metadata of the source GGUF file (the vocabulary llama.cpp needs)."""
    import gguf

    reader = gguf.GGUFReader(str(source_gguf))
    model = None
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
            model = field.contents() if key == "tokenizer.ggml.model" else model
    return {"from": "source GGUF", "model": model} if model else {}


def _vocab(folder: Path):
    """The first ``gguf.vocab`` class that reads the saved tokenizer (SentencePiece, Llama BPE, GPT-2 BPE)."""
    import gguf

    tried = []
    kinds = (gguf.SentencePieceVocab,) if (folder / "tokenizer.model").is_file() else ()
    for cls in (*kinds, gguf.LlamaHfVocab, gguf.BpeVocab):
        try:
            return cls(folder)
        except (FileNotFoundError, TypeError, ImportError, RuntimeError, KeyError, ValueError) as err:
            tried.append(f"{cls.__name__}: {err}")
    raise GgufExportError("export.formats: gguf: the tokenizer is none of the kinds llama.cpp reads "
                          f"(GPT-2 byte-level BPE, Llama byte-fallback BPE, SentencePiece): {'; '.join(tried)}")


def _pretokenizer(folder: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a byte-level BPE tokenizer, from the data table; else default."""
    pre = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer")
    table = json.loads((Path(__file__).with_name("gguf_pretokenizers.json")).read_text(encoding="utf-8"))
    for entry in table["pretokenizers"]:
        if _matches(entry["pre_tokenizer"], pre):
            return entry["name"]
    return "default"


def _matches(pattern, value) -> bool:
    """Every key of ``pattern`` has the same value in ``value`` (lists item by item, same length)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(_matches(v, value.get(k)) for k, v in pattern.items())
    if isinstance(pattern, list):
        return isinstance(value, list) and len(pattern) == len(value) and all(map(_matches, pattern, value))
    return pattern == value


def _tokens(vocab, tokenizer, n_vocab: int):
    """Token texts, scores and types padded to the model's vocabulary; special tokens are CONTROL."""
    import gguf

    tokens, scores, types = [], [], []
    for text, score, typ in vocab.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        scores.append(float(score))
        types.append(typ)
    if len(tokens) > n_vocab:
        raise GgufExportError(f"export.formats: gguf: the tokenizer has {len(tokens)} tokens, more than the "
                              f"model's vocab_size {n_vocab}")
    special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    for i in special & set(range(len(tokens))):
        types[i] = gguf.TokenType.CONTROL
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def _write_tokenizer(writer, tokenizer, n_vocab: int) -> dict:
    """The transformers tokenizer as GGUF vocabulary keys, through the ``gguf`` package's vocab helpers."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="laser-export-gguf-vocab-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        try:
            vocab = _vocab(folder)
        except GgufExportError as err:  # written without a vocabulary: transformers still loads it, llama.cpp not
            return {"missing": str(err).removeprefix("export.formats: gguf: ")}
        tokens, scores, types = _tokens(vocab, tokenizer, n_vocab)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        pre = _pretokenizer(folder) if vocab.tokenizer_model == "gpt2" else None
        if pre:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        if vocab.tokenizer_model != "gpt2":
            writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)
    return {"from": "transformers tokenizer", "model": vocab.tokenizer_model, "pre": pre, "tokens": len(tokens)}


# ---------------------------------------------------------------------------------------------- tensors


def _ggml_type(name: str, t, file_type: str):
    """llama.cpp's converter rule: 1-D stays F32; quantized types only where a row is whole blocks (else F16)."""
    import gguf

    qt = gguf.GGMLQuantizationType
    if t.dim() <= 1:
        return qt.F32
    kind = qt[file_type]
    if file_type == "Q4_0" and name in ("token_embd.weight", "output.weight"):
        kind = qt.Q8_0
    if kind in (qt.Q8_0, qt.Q4_0) and t.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        return qt.F16
    return kind


def _add_tensor(writer, name: str, t, file_type: str) -> tuple[str, int]:
    import gguf
    import numpy as np

    kind = _ggml_type(name, t, file_type)
    data = t.detach().float().cpu().contiguous().numpy()
    if kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32, copy=False))
    elif kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        q = gguf.quants.quantize(data, kind)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=kind)
        return kind.name, int(q.nbytes)
    return kind.name, int(data.size * (4 if kind == gguf.GGMLQuantizationType.F32 else 2))


def _gguf_tensors(model, arch: str):
    """(gguf name, tensor) for every parameter, q/k permuted; raises if one has no GGUF name."""
    import gguf

    from ..lowrank import LowRankLinear

    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise GgufExportError("export.formats: gguf needs dense weights (storage: dense)")
    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out, unmapped = [], []
    for hf_name, p in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            unmapped.append(hf_name)
            continue
        t = p.detach().cpu()
        if hf_name.endswith("q_proj.weight"):
            t = _permute_qk(t, heads)
        elif hf_name.endswith("k_proj.weight"):
            t = _permute_qk(t, kv)
        out.append((name, t))
    if unmapped:
        raise GgufExportError(f"export.formats: gguf ({arch}) has no name for {', '.join(unmapped[:5])}")
    freqs = _rope_freqs(config)
    if freqs is not None:
        out.insert(0, (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs))
    return out


# ---------------------------------------------------------------------------------------------- files


def _metadata(name: str | None, provenance: dict | None, n_params: int):
    """Provenance keys (``general.*``) through ``gguf.Metadata``."""
    import gguf

    prov = provenance or {}
    meta = gguf.Metadata(name=name or "laser-export model", size_label=gguf.size_label(n_params, 0, 0, 0),
                         description="LASER (layer-selective rank reduction) export written by laser-export",
                         license=prov.get("license"), languages=prov.get("languages") or None)
    base = prov.get("base_model")
    if base:
        meta.base_models = [{"name": base.split("/")[-1], "organization": base.split("/")[0] if "/" in base else None,
                             "repo_url": f"https://huggingface.co/{base}"}]
        meta.base_models = [{k: v for k, v in b.items() if v} for b in meta.base_models]
    return meta


def _write_file(path: Path, tensors, *, model, arch: str, file_type: str, tokenizer, source_gguf, name,
                provenance) -> dict:
    """One GGUF file of ``file_type`` (F32 / F16 / BF16 / Q8_0 / Q4_0); returns its manifest fields."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    try:
        _metadata(name, provenance, sum(t.numel() for _, t in tensors)).set_gguf_meta_model(writer)
        _hparams(writer, model.config)
        writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[file_type]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = {}
        if source_gguf is not None:
            vocab = _copy_tokenizer(writer, source_gguf)
        elif tokenizer is not None:
            vocab = _write_tokenizer(writer, tokenizer, int(model.config.vocab_size))
        types: dict[str, int] = {}
        nbytes = 0
        for tname, t in tensors:
            kind, size = _add_tensor(writer, tname, t, file_type)
            types[kind] = types.get(kind, 0) + 1
            nbytes += size
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"file": path.name, "type": file_type, "tensor_types": types, "tensor_bytes": nbytes, "vocab": vocab}


def llama_cpp_missing(types) -> str | None:
    """Why the k-quant variants among ``types`` cannot be written here (llama-cpp-python absent); None if they can."""
    import importlib.util

    wanted = [t for t in types if t in LLAMA_CPP_TYPES]
    if wanted and importlib.util.find_spec("llama_cpp") is None:
        return (f"{', '.join(wanted)} is written by llama.cpp's own quantizer, which needs llama-cpp-python "
                "(pip install llama-cpp-python; it builds llama.cpp from source)")
    return None


def _llama_quantize(src: Path, dst: Path, file_type: str) -> dict:
    """``dst``: ``src`` quantized to a k-quant ``file_type`` by llama.cpp (llama-quantize's own tensor rules:
    mixed types per tensor, 1-D tensors F32); returns its manifest fields, read back from the file."""
    import ctypes
    import logging
    import os
    from importlib.metadata import version

    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[file_type])
    params.nthread = os.cpu_count() or 1
    log = logging.getLogger("llama-cpp-python")  # llama-cpp-python prints llama.cpp's log by this logger's level
    level = log.level
    log.setLevel(logging.ERROR)  # llama-quantize's line per tensor is not the user's
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if rc != 0 or not dst.is_file():
        raise GgufExportError(f"llama.cpp could not quantize {src.name} to {file_type} (llama_model_quantize "
                              f"returned {rc})")
    types: dict[str, int] = {}
    nbytes = 0
    for t in gguf.GGUFReader(str(dst)).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        nbytes += int(t.n_bytes)
    return {"file": dst.name, "type": file_type, "tensor_types": types, "tensor_bytes": nbytes,
            "quantizer": f"llama.cpp (llama-cpp-python {version('llama-cpp-python')})"}


def variant_path(path: Path, file_type: str) -> Path:
    """``name.gguf`` → ``name-Q8_0.gguf`` (the file of a quantized variant)."""
    return path.with_name(f"{path.stem}-{file_type}{path.suffix}")


def write_gguf(model, path: Path, *, arch: str, dtype: str, source_gguf: Path | None = None,
               name: str | None = None, reference=None, tolerance: float = 1e-4, tokenizer=None,
               quantized: tuple[str, ...] | list[str] = (), provenance: dict | None = None) -> dict:
    """Write ``model`` (dense) to ``path`` as GGUF in the export ``dtype`` (1-D tensors F32), plus one file per
    ``quantized`` type (``Q8_0``, ``Q4_0`` by the ``gguf`` package; ``Q4_K_M``, ``Q5_K_M``, ``Q6_K`` by llama.cpp from
    the export-dtype file) next to it. The vocabulary comes from ``source_gguf`` when given, else
    from ``tokenizer``. With ``reference``, each file is read back with transformers and its logits compared
    (:func:`check_gguf`; the quantized files are measured, not held to ``tolerance``). Returns the manifest entry."""
    unknown = [q for q in quantized if q not in GGUF_TYPES]
    if unknown:
        raise GgufExportError(f"export.gguf_types: {unknown[0]!r} is not one of {', '.join(GGUF_TYPES)}")
    tensors = _gguf_tensors(model, arch)
    kw = dict(model=model, arch=arch, tokenizer=tokenizer, source_gguf=source_gguf, name=name, provenance=provenance)
    main = _write_file(path, tensors, file_type=_GGML_TYPES[dtype], **kw)
    variants = []
    for q in quantized:
        if q in LLAMA_CPP_TYPES:
            entry = _llama_quantize(path, variant_path(path, q), q)
        else:
            entry = _write_file(variant_path(path, q), tensors, file_type=q, **kw)
        entry["max_abs_diff"] = None if reference is None else check_gguf(reference, path.parent / entry["file"],
                                                                           None)
        variants.append(entry)
    vocab = main["vocab"]
    return {"file": path.name, "arch": arch, "dtype": _GGML_TYPES[dtype], "tokenizer": "model" in vocab,
            "vocab": vocab, "tensor_types": main["tensor_types"], "tensor_bytes": main["tensor_bytes"],
            "max_abs_diff": None if reference is None else check_gguf(reference, path, tolerance),
            "tolerance": tolerance, "variants": variants,
            "llama_cpp_keys_missing": missing_keys(path)}


def missing_keys(path: Path) -> list[str]:
    """The keys llama.cpp needs to load ``path`` (:data:`REQUIRED_KEYS`) that the file lacks."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else "?"
    return [k.format(arch=arch) for k in REQUIRED_KEYS if k.format(arch=arch) not in fields]


def check_gguf(reference, path: Path, tolerance: float | None = 1e-4) -> float:
    """Load ``path`` back with transformers (fp32) and compare logits with ``reference`` (an fp32 model holding
    the same weights, e.g. the safetensors export loaded in float32) on a fixed batch.

    Catches what a name map cannot: a family whose layers the GGUF architecture does not hold (biases,
    norm offsets) loads without error but computes something else. Returns max |Δlogits|; with ``tolerance``
    None the difference is only measured (a quantized file)."""
    import torch
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.arange(16).remainder(reference.config.vocab_size).reshape(2, 8)
    with torch.no_grad():
        diff = float((back(ids).logits - reference(ids.to(reference.device)).logits.float().cpu()).abs().max())
    if tolerance is not None and not diff <= tolerance:
        raise GgufExportError(f"GGUF parity check failed: transformers reads {path.name} back with max |Δlogits| "
                              f"{diff:.3g} > {tolerance:g} (the GGUF architecture does not hold this model)")
    return diff
