"""Tiny HF transformers models (random weights, no downloads) shared by the compile and export tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import transformers as T
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


def llama(impl: str, use_cache: bool = False, max_positions: int = 64, head_dim: int = 8) -> LlamaForCausalLM:
    """Grouped-query attention (4 query heads, 2 KV heads), as in Llama 2/3."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=max_positions,
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


# ---- the coverage registry: one tiny model per architecture family transformers ships -----------------
# Each entry builds the model with its default attention implementation (what a new user gets: "sdpa"
# where the architecture has it) and example inputs; `attention` is how many attention calls the final
# graph holds as scaled_dot_product_attention, `qkv_linears` whether the layers project q/k/v (or
# gate/up) with separate linears that parallel_linear_fusion merges.

@dataclass(frozen=True)
class Arch:
    name: str
    family: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple]
    attention: int
    qkv_linears: bool = True
    gqa: bool = False
    # Why the output is compared with Dynamo's own (torch.compile(backend="eager")) instead of plain eager:
    # for a model whose output already changes under torch.compile without mmaccel. None: plain eager.
    dynamo_reference: str | None = None


def _tiny(config_cls: Any, model_cls: Any, **config: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return inference(model_cls(config_cls(**config)))
    return build


def _ids() -> tuple[torch.Tensor]:
    return (token_batch(2, 9)[0],)


def _ids_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    return token_batch(2, 9, padded_from=6)


def _pixels(size: int = 32) -> Callable[[], tuple[torch.Tensor]]:
    return lambda: (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)),)


_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GQA = dict(_DECODER, num_key_value_heads=2)
_MHA = dict(_DECODER, num_key_value_heads=4)
_BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
_VIT = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8)


def _t5() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=4,
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return inference(T.T5Model(config))


def _t5_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = _ids_and_mask()
    return ids, mask, ids[:, :5]  # input_ids, attention_mask, decoder_input_ids


def _whisper_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(1)),)


def _wav2vec2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
                              conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                              num_conv_pos_embedding_groups=4, vocab_size=VOCAB)
    return inference(T.Wav2Vec2Model(config))


_VLM_TEXT = dict(_GQA, vocab_size=VOCAB + 1)
COVERAGE_IMAGE_TOKEN = VOCAB  # the last id of the coverage VLMs' text vocabulary (VOCAB + 1 ids)
IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches


def _llava() -> torch.nn.Module:
    torch.manual_seed(0)
    vision = T.CLIPVisionConfig(**_VIT, projection_dim=32)
    config = T.LlavaConfig(vision_config=vision, text_config=T.LlamaConfig(**_VLM_TEXT),
                           image_token_index=COVERAGE_IMAGE_TOKEN, vision_feature_layer=-1, vision_feature_select_strategy="default")
    return inference(T.LlavaForConditionalGeneration(config))


def _paligemma() -> torch.nn.Module:
    torch.manual_seed(0)
    vision = T.SiglipVisionConfig(**_VIT)
    text = T.GemmaConfig(**dict(_VLM_TEXT, head_dim=8))
    config = T.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=COVERAGE_IMAGE_TOKEN,
                               projection_dim=32, hidden_size=32)
    return inference(T.PaliGemmaForConditionalGeneration(config))


def paligemma() -> torch.nn.Module:
    """Tiny PaliGemma whose greedy tokens vary: weights N(0, 0.15) and an untied head (at init the tied head
    makes the model echo its input token, which would let a wrong generation loop pass)."""
    model = _paligemma()
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.15)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=generator) * 0.3,
                                              requires_grad=False)
    return model


def vlm_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens first, then 5 text tokens; the image's pixels."""
    ids = torch.cat([torch.full((2, IMAGE_TOKENS), COVERAGE_IMAGE_TOKEN), token_batch(2, 5)[0]], dim=1)
    return ids, _pixels()()[0]


ARCHITECTURES = [
    # text decoders, one attention per layer
    Arch("gpt2", "decoder", _tiny(T.GPT2Config, T.GPT2Model, vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4,
                                  n_positions=64), _ids, LAYERS, qkv_linears=False),
    Arch("opt", "decoder", _tiny(T.OPTConfig, T.OPTModel, vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                                 num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=64,
                                 word_embed_proj_dim=32, pad_token_id=0), _ids, LAYERS),
    Arch("llama", "decoder", _tiny(T.LlamaConfig, T.LlamaModel, **_MHA), _ids, LAYERS),
    Arch("phi", "decoder", _tiny(T.PhiConfig, T.PhiModel, **_MHA), _ids, LAYERS),
    Arch("gemma", "decoder", _tiny(T.GemmaConfig, T.GemmaModel, **_MHA, head_dim=8), _ids, LAYERS),
    Arch("gpt_neox", "decoder", _tiny(T.GPTNeoXConfig, T.GPTNeoXModel, **{k: v for k, v in _DECODER.items()}),
         _ids, LAYERS, qkv_linears=False),
    Arch("falcon", "decoder (multi-query)", _tiny(T.FalconConfig, T.FalconModel, vocab_size=VOCAB, hidden_size=32,
                                                  num_hidden_layers=LAYERS, num_attention_heads=4, multi_query=True),
         _ids, LAYERS, qkv_linears=False, gqa=True),
    # text decoders with grouped-query attention
    Arch("llama_gqa", "decoder (grouped-query)", _tiny(T.LlamaConfig, T.LlamaModel, **_GQA), _ids, LAYERS, gqa=True),
    Arch("mistral", "decoder (grouped-query)", _tiny(T.MistralConfig, T.MistralModel, **_GQA), _ids, LAYERS, gqa=True),
    Arch("qwen2", "decoder (grouped-query)", _tiny(T.Qwen2Config, T.Qwen2Model, **_GQA), _ids, LAYERS, gqa=True),
    Arch("qwen3", "decoder (grouped-query)", _tiny(T.Qwen3Config, T.Qwen3Model, **_GQA, head_dim=8), _ids, LAYERS,
         gqa=True),
    Arch("phi3", "decoder (grouped-query)", _tiny(T.Phi3Config, T.Phi3Model, **_GQA), _ids, LAYERS, qkv_linears=False,
         gqa=True),
    Arch("gemma_gqa", "decoder (grouped-query)", _tiny(T.GemmaConfig, T.GemmaModel, **_GQA, head_dim=8), _ids,
         LAYERS, gqa=True),
    # sliding windows shorter than the 9-token inputs, so the window mask matters
    Arch("mistral_window", "decoder (grouped-query, sliding window)",
         _tiny(T.MistralConfig, T.MistralModel, **_GQA, sliding_window=4), _ids, LAYERS, gqa=True),
    Arch("gemma2", "decoder (grouped-query, sliding window, soft-capped scores)",
         _tiny(T.Gemma2Config, T.Gemma2Model, **_GQA, head_dim=8, sliding_window=4), _ids, LAYERS, gqa=True),
    Arch("gemma3", "decoder (grouped-query, sliding window)",
         _tiny(T.Gemma3TextConfig, T.Gemma3TextModel, **_GQA, head_dim=8, sliding_window=4), _ids, LAYERS, gqa=True),
    # text encoders
    Arch("bert", "encoder", _tiny(T.BertConfig, T.BertModel, **_BERT), _ids_and_mask, LAYERS),
    Arch("roberta", "encoder", _tiny(T.RobertaConfig, T.RobertaModel, **dict(_BERT, pad_token_id=1)), _ids_and_mask,
         LAYERS),
    Arch("distilbert", "encoder", _tiny(T.DistilBertConfig, T.DistilBertModel, vocab_size=VOCAB, dim=32,
                                        n_layers=LAYERS, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                                        pad_token_id=0), _ids_and_mask, LAYERS),
    Arch("electra", "encoder", _tiny(T.ElectraConfig, T.ElectraModel, **dict(_BERT, embedding_size=32)),
         _ids_and_mask, LAYERS),
    Arch("t5", "encoder-decoder", _t5, _t5_inputs, 3 * LAYERS),
    # vision
    Arch("vit", "vision", _tiny(T.ViTConfig, T.ViTModel, **_VIT), _pixels(), LAYERS),
    Arch("dinov2", "vision", _tiny(T.Dinov2Config, T.Dinov2Model, **_VIT), _pixels(), LAYERS),
    Arch("swin", "vision", _tiny(T.SwinConfig, T.SwinModel, image_size=32, patch_size=4, embed_dim=16,
                                 depths=[1, 1], num_heads=[2, 4], window_size=4), _pixels(), 2),
    Arch("convnext", "vision (convolutional)", _tiny(T.ConvNextConfig, T.ConvNextModel, num_channels=3,
                                                     num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=32),
         _pixels(), 0, qkv_linears=False),
    Arch("clip_vision", "vision", _tiny(T.CLIPVisionConfig, T.CLIPVisionModel, **_VIT), _pixels(), LAYERS),
    Arch("siglip_vision", "vision", _tiny(T.SiglipVisionConfig, T.SiglipVisionModel, **_VIT), _pixels(),
         LAYERS + 1),  # and the attention-pooling head's
    # speech
    Arch("whisper_encoder", "speech encoder", lambda: whisper_encoder("sdpa"), _whisper_inputs, LAYERS),
    Arch("wav2vec2", "speech encoder", _wav2vec2,
         lambda: (torch.randn(2, 400, generator=torch.Generator().manual_seed(1)),), LAYERS),
    # vision-language
    Arch("llava", "vision-language", _llava, vlm_inputs, 2 * LAYERS, gqa=True),
    Arch("paligemma", "vision-language", _paligemma, vlm_inputs, 2 * LAYERS, gqa=True,
         dynamo_reference="transformers 5.24's PaliGemma differs from eager under plain torch.compile(backend="
                          "'eager') too (max logit error 0.079 of 0.73, 4 graphs): not mmaccel's, not yet traced"),
]


# Vision-language models for mmaccel.generate (tests/test_generation.py, bench/hf_generate_coverage.py): each a
# tiny config with weights N(0, 0.15) (at init, tiny VLMs echo their input token, which a wrong loop could pass),
# and the extra inputs its processor would give (image_sizes, image_grid_thw, ...). VLM_IMAGE_TOKEN marks images.
VLM_IMAGE_TOKEN = 90
_GEN_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GEN_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4)


def _varied(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.15)
    return inference(model)


def _images(*shape: int, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs a VLM's processor would give: pixel_values of `shape` (seeded), and `extra` (image_sizes, ...)."""
    return dict(pixel_values=torch.randn(*shape, generator=torch.Generator().manual_seed(2)), **extra)


def _llava_next() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """LLaVA-NeXT's any-resolution tiling: a 32x64 image as two 32x32 crops plus the resized whole."""
    config = T.LlavaNextConfig(vision_config=T.CLIPVisionConfig(**_GEN_VIT, image_size=32, patch_size=8),
                               text_config=T.LlamaConfig(**_GEN_TEXT), image_token_index=VLM_IMAGE_TOKEN,
                               image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], vision_feature_layer=-1)
    torch.manual_seed(0)
    images = _images(1, 3, 3, 32, 32, image_sizes=torch.tensor([[32, 64]]))
    return _varied(T.LlavaNextForConditionalGeneration(config)), images


def _qwen2_vl() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Qwen2-VL: patches flattened by its processor, a (t, h, w) grid, multimodal rotary positions (mrope)."""
    vision = dict(depth=LAYERS, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(_GEN_TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    config = T.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=VLM_IMAGE_TOKEN,
                             vision_start_token_id=91, vision_end_token_id=92, video_token_id=93)
    torch.manual_seed(0)
    images = _images(16, 3 * 2 * 4 * 4, image_grid_thw=torch.tensor([[1, 4, 4]]))
    return _varied(T.Qwen2VLForConditionalGeneration(config)), images


def _gemma3() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = T.Gemma3Config(text_config=dict(_GEN_TEXT, head_dim=8, sliding_window=8),
                            vision_config=dict(_GEN_VIT, image_size=32, patch_size=8), mm_tokens_per_image=4,
                            image_token_index=VLM_IMAGE_TOKEN, boi_token_index=91, eoi_token_index=92)
    torch.manual_seed(0)
    return _varied(T.Gemma3ForConditionalGeneration(config)), _images(1, 3, 32, 32)


def _mistral3() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    vision = T.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                   image_size=32, patch_size=8, head_dim=8)
    config = T.Mistral3Config(vision_config=vision, text_config=T.MistralConfig(**_GEN_TEXT),
                              image_token_index=VLM_IMAGE_TOKEN, spatial_merge_size=2, vision_feature_layer=-1)
    torch.manual_seed(0)
    images = _images(1, 3, 32, 32, image_sizes=torch.tensor([[32, 32]]))
    return _varied(T.Mistral3ForConditionalGeneration(config)), images


def _idefics3() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = T.Idefics3Config(vision_config=dict(_GEN_VIT, image_size=32, patch_size=8),
                              text_config=dict(_GEN_TEXT, model_type="llama"), image_token_id=VLM_IMAGE_TOKEN,
                              scale_factor=2)
    torch.manual_seed(0)
    return _varied(T.Idefics3ForConditionalGeneration(config)), _images(1, 1, 3, 32, 32)


def _internvl() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    vision = dict(_GEN_VIT, image_size=[32, 32], patch_size=[8, 8])
    config = T.InternVLConfig(vision_config=vision, text_config=dict(_GEN_TEXT, model_type="qwen2"),
                              image_token_id=VLM_IMAGE_TOKEN, image_seq_length=4, downsample_ratio=0.5,
                              vision_feature_layer=-1)
    torch.manual_seed(0)
    return _varied(T.InternVLForConditionalGeneration(config)), _images(1, 3, 32, 32)


def _aya_vision() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = T.AyaVisionConfig(vision_config=dict(_GEN_VIT, model_type="siglip_vision_model", image_size=32,
                                                  patch_size=8),
                               text_config=dict(_GEN_TEXT, model_type="cohere2", head_dim=8, sliding_window=8),
                               image_token_index=VLM_IMAGE_TOKEN, downsample_factor=2, vision_feature_layer=-1)
    torch.manual_seed(0)
    return _varied(T.AyaVisionForConditionalGeneration(config)), _images(1, 3, 32, 32)


def _llava_onevision() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = T.LlavaOnevisionConfig(vision_config=dict(_GEN_VIT, model_type="siglip_vision_model", image_size=32,
                                                       patch_size=8),
                                    text_config=dict(_GEN_TEXT, model_type="qwen2"), image_token_index=VLM_IMAGE_TOKEN,
                                    vision_feature_layer=-1, image_grid_pinpoints=[[32, 32], [32, 64]])
    torch.manual_seed(0)
    images = _images(1, 3, 3, 32, 32, image_sizes=torch.tensor([[32, 64]]))
    return _varied(T.LlavaOnevisionForConditionalGeneration(config)), images


VLMS: dict[str, Callable[[], tuple[torch.nn.Module, dict[str, torch.Tensor]]]] = {
    "llava_next": _llava_next, "llava_onevision": _llava_onevision, "qwen2_vl": _qwen2_vl, "gemma3": _gemma3,
    "mistral3": _mistral3, "idefics3": _idefics3, "internvl": _internvl, "aya_vision": _aya_vision,
}


def vlm_prompt(name: str, model: torch.nn.Module, images: dict[str, torch.Tensor]) -> torch.Tensor:
    """[1, L] ids: 3 text tokens, as many VLM_IMAGE_TOKEN as the model makes features of `images` (Qwen2-VL's
    between its vision start and end ids), 5 text tokens."""
    inner = model.model if hasattr(getattr(model, "model", None), "get_image_features") else model
    with torch.no_grad():
        features = inner.get_image_features(images["pixel_values"],
                                            **{k: v for k, v in images.items() if k != "pixel_values"})
    if getattr(features, "pooler_output", None) is not None:
        features = features.pooler_output
    elif hasattr(features, "last_hidden_state"):
        features = features.last_hidden_state
    parts = features if isinstance(features, (list, tuple)) else [features]
    count = sum(p.reshape(-1, p.shape[-1]).shape[0] for p in parts)
    generator = torch.Generator().manual_seed(5)
    image = torch.full((1, count), VLM_IMAGE_TOKEN)
    if name == "qwen2_vl":
        image = torch.cat([torch.tensor([[91]]), image, torch.tensor([[92]])], dim=1)
    return torch.cat([torch.randint(3, 80, (1, 3), generator=generator), image,
                      torch.randint(3, 80, (1, 5), generator=generator)], dim=1)
