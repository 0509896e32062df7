"""Hugging Face configs at the dimensions of real checkpoints, and tiny ones, for models built with random
weights (nothing is downloaded): used by bench/hf_generate.py and the demo. transformers is imported here
only, so mmaccel.models stays importable without it."""
from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, WhisperConfig


def llava_config(tiny: bool) -> tuple[LlavaConfig, int]:
    """LLaVA-1.5-7B: CLIP ViT-L/14 at 336px (576 image tokens) + Llama-2-7B. Returns (config, image tokens)."""
    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8)
        text = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_id=99), 16
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000), 576


def llama_config(tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0)


def whisper_config(tiny: bool) -> WhisperConfig:
    if tiny:
        return WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                             max_source_positions=20, max_target_positions=64, decoder_start_token_id=3, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2,
                             begin_suppress_tokens=None, suppress_tokens=None)
    return WhisperConfig(vocab_size=51866, d_model=1280, encoder_layers=32, decoder_layers=32,
                         encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120,
                         decoder_ffn_dim=5120, num_mel_bins=128, max_source_positions=1500, max_target_positions=448,
                         decoder_start_token_id=50258, begin_suppress_tokens=None, suppress_tokens=None)
