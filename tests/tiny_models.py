"""Tiny models of the architectures the README names, built from small configs (no download): one place for the
tests that must cover them all (path graph, fold, checkpoints)."""

from __future__ import annotations

from typing import Any, Callable

import timm
import torch
import transformers as tf
from torch import nn

IDS = torch.tensor([[5, 6, 7, 8, 9, 2]])
_LM = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
           vocab_size=100, max_position_embeddings=32, pad_token_id=0)


def _causal_lm(model_type: str, **overrides: Any) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        config = tf.AutoConfig.for_model(model_type, **{**_LM, **overrides})
        return tf.AutoModelForCausalLM.from_config(config).eval(), {"input_ids": IDS}

    return build


def _vision(model_cls: type, config: tf.PretrainedConfig, size: int) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (model_cls(config).eval(), {"pixel_values": torch.randn(1, 3, size, size)})


def _gpt2_style(model_type: str, **dims: Any) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        config = tf.AutoConfig.for_model(model_type, vocab_size=100, **dims)
        return tf.AutoModelForCausalLM.from_config(config).eval(), {"input_ids": IDS}

    return build


_MOE = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=8, num_key_value_heads=2)

DECODER_LMS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "gpt2": _gpt2_style("gpt2", n_embd=16, n_layer=2, n_head=2, n_positions=32),
    "gptj": _gpt2_style("gptj", n_embd=16, n_layer=2, n_head=2, n_positions=32, rotary_dim=4),
    "gpt_neox": _causal_lm("gpt_neox", rotary_pct=0.5),
    "llama": _causal_lm("llama"),
    "mistral": _causal_lm("mistral"),
    "qwen2": _causal_lm("qwen2"),
    "qwen3": _causal_lm("qwen3", head_dim=8),
    "gemma": _causal_lm("gemma", head_dim=8),
    "gemma2": _causal_lm("gemma2", head_dim=8),
    "phi": _causal_lm("phi"),
    "phi3": _causal_lm("phi3"),
    "opt": _gpt2_style("opt", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=24,
                       word_embed_proj_dim=16, max_position_embeddings=32),
    "falcon": _gpt2_style("falcon", hidden_size=16, num_hidden_layers=2, num_attention_heads=2),
    "bloom": _gpt2_style("bloom", hidden_size=16, n_layer=2, n_head=2),
}
"""Decoder-only causal LMs: 2 layers, d = 16 (GPT-2, GPT-J, BLOOM, Falcon: FFN 4d = 64; the others 24)."""

MOE_LMS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "mixtral": _causal_lm("mixtral", **_MOE),
    "qwen2_moe": _causal_lm("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                            shared_expert_intermediate_size=12, num_key_value_heads=2),
}
"""Mixture-of-experts LMs: 2 layers of 4 experts of width 8 (Qwen2-MoE: plus a shared expert of width 12)."""

OTHERS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "deberta_v2": lambda: (tf.DebertaV2ForMaskedLM(tf.DebertaV2Config(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32)).eval(), {"input_ids": IDS}),
    "albert": lambda: (tf.AlbertModel(tf.AlbertConfig(
        vocab_size=100, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=32)).eval(), {"input_ids": IDS}),
    "distilbert": lambda: (tf.DistilBertModel(tf.DistilBertConfig(
        vocab_size=100, dim=16, n_layers=2, n_heads=2, hidden_dim=24, max_position_embeddings=32)).eval(),
                           {"input_ids": IDS}),
    "hf_vit": _vision(tf.ViTForImageClassification, tf.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, image_size=32,
        patch_size=8, num_labels=3), 32),
    "whisper": lambda: (tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=24, num_mel_bins=8, max_source_positions=16, vocab_size=100,
        max_target_positions=16, pad_token_id=0, decoder_start_token_id=1, bos_token_id=1,
        eos_token_id=2)).eval(), {"input_features": torch.randn(1, 8, 32), "decoder_input_ids": IDS[:, :4]}),
    "wav2vec2": lambda: (tf.Wav2Vec2ForCTC(tf.Wav2Vec2Config(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        vocab_size=32)).eval(), {"input_values": torch.randn(1, 400)}),
    "clip": lambda: (tf.CLIPModel(tf.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8))).eval(),
                     {"input_ids": IDS, "pixel_values": torch.randn(1, 3, 16, 16)}),
    "hf_convnext": _vision(tf.ConvNextModel, tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                               image_size=32), 32),
    "hf_swin": _vision(tf.SwinModel, tf.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                                                   num_heads=[1, 2], window_size=4), 32),
    "dinov2": _vision(tf.Dinov2Model, tf.Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                      mlp_ratio=2, image_size=28, patch_size=14), 28),
    "timm_vit_swiglu": lambda: (timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=3, mlp_layer=timm.layers.SwiGLU,
        act_layer=nn.SiLU).eval(), torch.randn(1, 3, 32, 32)),
    "timm_regnet": lambda: (timm.create_model("regnety_002", pretrained=False, num_classes=5).eval(),
                            torch.randn(1, 3, 64, 64)),
}
"""Encoders, audio, dual encoder, HF vision, a timm ViT with separate SwiGLU projections and a timm RegNet (RegNetY:
squeeze-excite in every block)."""

ALL: dict[str, Callable[[], tuple[nn.Module, Any]]] = {**DECODER_LMS, **MOE_LMS, **OTHERS}
