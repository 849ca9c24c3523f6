"""Tiny random models, one per architecture family in the table, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

H, L, V = 32, 3, 128  # hidden size, layers, vocab

# model_type -> (config class, model class, config kwargs)
TINY = {
    "gptj": (tf.GPTJConfig, tf.GPTJForCausalLM, dict(n_embd=H, n_layer=L, n_head=4, rotary_dim=4, n_positions=64, vocab_size=V, bos_token_id=1, eos_token_id=2)),
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=V)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=V)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=V)),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=V)),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_embd=H, n_layer=L, n_head=4, n_positions=64, vocab_size=V, bos_token_id=1, eos_token_id=2)),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64, vocab_size=V, max_position_embeddings=64)),
    "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=V, sliding_window=4)),
    # the multimodal checkpoint (AutoModelForCausalLM -> Gemma3ForConditionalGeneration): blocks under model.language_model
    "gemma3": (tf.Gemma3Config, tf.Gemma3ForConditionalGeneration, dict(
        text_config=dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=V + 3, sliding_window=4),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=V, eoi_token_index=V + 1, image_token_index=V + 2)),
    "bert": (tf.BertConfig, tf.BertForMaskedLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64, vocab_size=V, max_position_embeddings=64, pad_token_id=0)),
    "roberta": (tf.RobertaConfig, tf.RobertaForMaskedLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64, vocab_size=V, max_position_embeddings=64)),
    "phi": (tf.PhiConfig, tf.PhiForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64, vocab_size=V, max_position_embeddings=64)),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "smollm3": (tf.SmolLM3Config, tf.SmolLM3ForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "modernbert": (tf.ModernBertConfig, tf.ModernBertForMaskedLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64, vocab_size=V, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=2, local_attention=16)),
    # MoE (transformers 5 fused experts: mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I])
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, vocab_size=V, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=48, vocab_size=V, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM, dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, ffn_dim=64, vocab_size=V, max_position_embeddings=64, word_embed_proj_dim=H)),
}


def tiny_model(model_type: str, seed: int = 0):
    cfg_cls, model_cls, kw = TINY[model_type]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    # random init gives near-identical tiny weights in some families: make matrices full-rank-ish
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() in (2, 3):  # 3-D: fused MoE experts [E, out, in]
                p.normal_(0, 0.2)
    return model


def tiny_inputs(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (batch, seq), generator=g)


def tiny_tokenizer():
    """A word-level tokenizer over a small vocabulary (offline), wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(V - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_mlm_tokenizer():
    """Like :func:`tiny_tokenizer`, with the last id as ``<mask>`` and RoBERTa-style ``<s> … </s>``
    added around every text (what a masked-LM tokenizer does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(V - 5)] + ["<mask>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>",
    )


def save_tiny(model_type: str, folder, seed: int = 0):
    model = tiny_model(model_type, seed)
    model.save_pretrained(folder)
    from laser_export.architectures import family_for

    masked = family_for(model.config.model_type).task == "masked-lm"
    (tiny_mlm_tokenizer() if masked else tiny_tokenizer()).save_pretrained(folder)
    return model


def checkpoint_tensors(folder) -> dict:
    """Every tensor of the ``*.safetensors`` files in ``folder`` (name -> tensor), files in name order."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
