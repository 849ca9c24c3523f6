"""GGUF: name a GGUF source's quantization, and write a dense export as a GGUF file (``export.formats: [gguf]``).

Writing uses the ``gguf`` package (llama.cpp's own writer) and its tensor-name map for the family's
``gguf_arch``; only dense storage can be written (llama.cpp has no factorised layers). Tensors are written in
the export dtype (F32 / F16 / BF16). The file carries the architecture hyper-parameters and, when the model
came from a GGUF file, that file's tokenizer metadata, so llama.cpp, Ollama and
``from_pretrained(folder, gguf_file=...)`` load it.
"""

from __future__ import annotations

from ..errors import CheckFailed
from pathlib import Path


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
_FILE_TYPES = {"float32": "ALL_F32", "float16": "MOSTLY_F16", "bfloat16": "MOSTLY_BF16"}


def _permute_qk(w, n_head: int):
    """HF → llama.cpp rotary layout of q/k rows (llama.cpp's convert_hf_to_gguf does the same)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hparams(writer, config) -> None:
    heads = config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", None)
    if theta:
        writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(config.vocab_size)


def _copy_tokenizer(writer, source_gguf: Path | None) -> bool:
    """Copy the ``tokenizer.*`` metadata of the source GGUF file (the vocabulary llama.cpp needs)."""
    if source_gguf is None:
        return False
    import gguf

    reader = gguf.GGUFReader(str(source_gguf))
    copied = False
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
            copied = True
    return copied


def _tensor(writer, name: str, t, dtype: str) -> None:
    import gguf
    import torch

    if dtype == "bfloat16":
        raw = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("uint16")
        writer.add_tensor(name, raw, raw_shape=list(t.shape), raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        writer.add_tensor(name, t.to(getattr(torch, dtype)).contiguous().numpy())


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
    return out


def write_gguf(model, path: Path, *, arch: str, dtype: str, source_gguf: Path | None = None,
               name: str | None = None, reference=None, tolerance: float = 1e-4) -> dict:
    """Write ``model`` (dense) to ``path`` as GGUF with ``arch`` metadata; with ``reference``, read it back with
    transformers and compare logits (:func:`check_gguf`). Returns the manifest entry."""
    import gguf

    tensors = _gguf_tensors(model, arch)
    writer = gguf.GGUFWriter(str(path), arch)
    if name:
        writer.add_name(name)
    _hparams(writer, model.config)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype]))
    tokenizer = _copy_tokenizer(writer, source_gguf)
    for tname, t in tensors:
        _tensor(writer, tname, t, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": path.name, "arch": arch, "dtype": _GGML_TYPES[dtype], "tokenizer": tokenizer,
            "tensor_bytes": sum(t.numel() for _, t in tensors) * (4 if dtype == "float32" else 2),
            "max_abs_diff": None if reference is None else check_gguf(reference, path, tolerance),
            "tolerance": tolerance}


def check_gguf(reference, path: Path, tolerance: float = 1e-4) -> float:
    """Load ``path`` back with transformers (fp32) and compare logits with ``reference`` (an fp32 model holding
    the same weights, e.g. the safetensors export loaded in float32) on a fixed batch.

    Catches what a name map cannot: a family whose layers the GGUF architecture does not hold (biases,
    norm offsets) loads without error but computes something else. Returns max |Δlogits|."""
    import torch
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.arange(16).remainder(reference.config.vocab_size).reshape(2, 8)
    with torch.no_grad():
        diff = float((back(ids).logits - reference(ids.to(reference.device)).logits.float().cpu()).abs().max())
    if not diff <= tolerance:
        raise GgufExportError(f"GGUF parity check failed: transformers reads {path.name} back with max |Δlogits| "
                              f"{diff:.3g} > {tolerance:g} (the GGUF architecture does not hold this model)")
    return diff
