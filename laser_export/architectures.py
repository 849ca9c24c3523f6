"""Architecture knowledge as data: one table row per model family.

Each family says, relative to the model's *base model* (``model.base_model``, e.g. ``LlamaModel``
inside ``LlamaForCausalLM``), where the list of transformer blocks lives and, relative to one
block, which module each matrix alias names. Aliases follow the paper: ``fc_in`` (the MLP's first
matrix: GPT-J ``fc_in``, Llama ``gate_proj``), ``fc_up`` (Llama's ``up_proj``), ``fc_out``, and
attention ``q``/``k``/``v``/``o`` (``qkv`` where a family fuses them). Groups expand to every alias
of that kind that the family has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str  # ModuleList of blocks, relative to the base model
    matrices: dict[str, str]  # alias -> module path relative to one block
    final_norm: str | None  # relative to the base model (None: post-LN models)
    task: str = "causal-lm"  # causal-lm | masked-lm
    notes: str = ""
    extra: dict = field(default_factory=dict)


_LLAMA_LIKE = {
    "fc_in": "mlp.gate_proj",
    "fc_up": "mlp.up_proj",
    "fc_out": "mlp.down_proj",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
}

_TABLE: list[Family] = [
    Family(
        "gptj",
        ("gptj",),
        layers="h",
        matrices={
            "fc_in": "mlp.fc_in",
            "fc_out": "mlp.fc_out",
            "q": "attn.q_proj",
            "k": "attn.k_proj",
            "v": "attn.v_proj",
            "o": "attn.out_proj",
        },
        final_norm="ln_f",
    ),
    Family(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"),
        layers="layers",
        matrices=_LLAMA_LIKE,
        final_norm="norm",
        notes="gated MLP: fc_in = gate_proj, fc_up = up_proj, fc_out = down_proj",
    ),
    Family(
        "gemma3",
        ("gemma3", "gemma3_text"),
        layers="layers",
        matrices=_LLAMA_LIKE,
        final_norm="norm",
        notes="gated MLP like llama (gate_proj/up_proj/down_proj); text-only checkpoints (Gemma3ForCausalLM)",
    ),
    Family(
        "gpt2",
        ("gpt2",),
        layers="h",
        matrices={"fc_in": "mlp.c_fc", "fc_out": "mlp.c_proj", "qkv": "attn.c_attn", "o": "attn.c_proj"},
        final_norm="ln_f",
        notes="Conv1D layers (weight stored (in, out)); q/k/v are fused in c_attn: use qkv",
    ),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        layers="layers",
        matrices={
            "fc_in": "mlp.dense_h_to_4h",
            "fc_out": "mlp.dense_4h_to_h",
            "qkv": "attention.query_key_value",
            "o": "attention.dense",
        },
        final_norm="final_layer_norm",
        notes="q/k/v are fused in query_key_value: use qkv",
    ),
    Family(
        "roberta",
        ("roberta", "xlm-roberta", "bert"),
        layers="encoder.layer",
        matrices={
            "fc_in": "intermediate.dense",
            "fc_out": "output.dense",
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "o": "attention.output.dense",
        },
        final_norm=None,
        task="masked-lm",
    ),
    Family(
        "phi",
        ("phi",),
        layers="layers",
        matrices={
            "fc_in": "mlp.fc1",
            "fc_out": "mlp.fc2",
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.dense",
        },
        final_norm="final_layernorm",
    ),
    Family(
        "opt",
        ("opt",),
        layers="decoder.layers",
        matrices={
            "fc_in": "fc1",
            "fc_out": "fc2",
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.out_proj",
        },
        final_norm="decoder.final_layer_norm",
    ),
]

FAMILIES: MappingProxyType[str, Family] = MappingProxyType({f.name: f for f in _TABLE})
_BY_MODEL_TYPE = {mt: f for f in _TABLE for mt in f.model_types}

#: Groups of aliases; each expands to the members the family actually has.
GROUPS: dict[str, tuple[str, ...]] = {
    "mlp": ("fc_in", "fc_up", "fc_out"),
    "attn": ("q", "k", "v", "qkv", "o"),
}


class ArchitectureError(ValueError):
    """A model, layer or matrix that the architecture table cannot resolve."""


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for(model_type: str) -> Family:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ArchitectureError(
            f"unknown architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
        ) from None


def expand_matrix(family: Family, matrix: str) -> list[str]:
    """An alias or a group name -> the list of aliases it means for this family."""
    if matrix in GROUPS:
        return [a for a in GROUPS[matrix] if a in family.matrices]
    if matrix in family.matrices:
        return [matrix]
    known = ", ".join(list(family.matrices) + [g for g in GROUPS if expand_matrix(family, g)])
    hint = f" ({family.notes})" if family.notes else ""
    raise ArchitectureError(f"{family.name} has no matrix {matrix!r}; choose one of: {known}{hint}")


def num_layers(config) -> int:
    """Number of transformer blocks from a transformers config (num_hidden_layers is aliased
    to n_layer/num_layers by the configs that use other names)."""
    text = getattr(config, "text_config", None) or config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    raise ArchitectureError(f"cannot tell the number of layers of model_type {config.model_type!r}")


def base_prefix(model: nn.Module) -> str:
    """Qualified-name prefix of the base model inside ``model`` ('' when model is the base)."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


def module_name(model: nn.Module, family: Family, layer: int, alias: str) -> str:
    return f"{base_prefix(model)}{family.layers}.{layer}.{family.matrices[alias]}"


def layer_modules(model: nn.Module, family: Family) -> nn.ModuleList:
    return model.get_submodule(f"{base_prefix(model)}{family.layers}")
