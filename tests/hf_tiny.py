"""Tiny HF transformers models (random weights, no downloads) shared by the compile and export tests."""
from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
    WhisperConfig,
    WhisperForConditionalGeneration,
    WhisperModel,
)

LAYERS = 2
VOCAB = 100


def inference(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


def clip_vision(impl: str) -> CLIPVisionModel:
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                              image_size=32, patch_size=8, attn_implementation=impl)
    return inference(CLIPVisionModel(config))


def bert(impl: str) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                        attn_implementation=impl)
    return inference(BertModel(config))


def llama(impl: str, use_cache: bool = False, max_positions: int = 64) -> LlamaForCausalLM:
    """Grouped-query attention (4 query heads, 2 KV heads), as in Llama 2/3."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=use_cache,
                         attn_implementation=impl)
    return inference(LlamaForCausalLM(config))


def qwen2(impl: str = "sdpa") -> Qwen2ForCausalLM:
    """Qwen2: Q/K/V projections with biases, grouped-query attention, tied embeddings."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
                         attn_implementation=impl)
    return inference(Qwen2ForCausalLM(config))


IMAGE_TOKEN = VOCAB - 1  # LLaVA's <image> placeholder id


def llava() -> LlavaForConditionalGeneration:
    """LLaVA-1.5's structure (CLIP vision tower, 2-layer MLP projector, Llama decoder), tiny: a 32x32 image in
    8x8 patches gives 16 image tokens, which the prompt must hold as IMAGE_TOKEN placeholders."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         attn_implementation="sdpa")
    return inference(LlavaForConditionalGeneration(config))


def llava_prompt(text_before: int, text_after: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt: text, the 16 image placeholders, text; and one random image."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(3, IMAGE_TOKEN, (1, text_before), generator=generator),
                     torch.full((1, 16), IMAGE_TOKEN),
                     torch.randint(3, IMAGE_TOKEN, (1, text_after), generator=generator)], dim=1)
    return ids, torch.randn(1, 3, 32, 32, generator=generator)


DECODERS = {"llama": (LlamaConfig, LlamaModel), "mistral": (MistralConfig, MistralModel),
            "qwen2": (Qwen2Config, Qwen2Model)}


def decoder(arch: str, impl: str, kv_heads: int) -> torch.nn.Module:
    """A Llama-family decoder (no LM head) with 4 query heads sharing `kv_heads` K/V heads: grouped-query
    attention (2), multi-query (1)."""
    torch.manual_seed(0)
    config_class, model_class = DECODERS[arch]
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                          num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False, attn_implementation=impl)
    return inference(model_class(config))


def whisper_encoder(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=20, max_target_positions=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
                           attn_implementation=impl)
    return inference(WhisperModel(config).get_encoder())


def token_batch(batch: int, seq: int, padded_from: int | None = None, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and an attention mask; the last row is right-padded from `padded_from` on."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded_from is not None:
        mask[-1, padded_from:] = 0
        ids[-1, padded_from:] = 0
    return ids, mask


def whisper() -> WhisperForConditionalGeneration:
    """Whisper for generation: 16 mel bins x 40 frames in, 20 encoder positions. init_std=0.5 so that random
    weights give varied tokens (at Whisper's 0.02 every step picks the same id); no suppressed tokens (the
    default lists name ids past this vocabulary)."""
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=20, max_target_positions=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3, init_std=0.5,
                           begin_suppress_tokens=None, suppress_tokens=None, attn_implementation="sdpa")
    return inference(WhisperForConditionalGeneration(config))
