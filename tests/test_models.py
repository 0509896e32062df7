"""The reference models themselves, in eager mode: shapes, causality, KV cache, tokenizer, registry."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mmaccel.models import (
    REFERENCE_MODELS,
    VLM,
    Chameleon,
    ChameleonConfig,
    Decoder,
    DecoderConfig,
    ViT,
    ViTConfig,
    VLMConfig,
    VLMDecode,
    VLMPrefill,
    Whisper,
    WhisperConfig,
    build,
    example_inputs,
)

# Cached decoding and full prefill reduce in different orders; fp32 agrees to about 1e-6.
FP32 = dict(rtol=1e-5, atol=1e-5)


def inference(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


def test_vit_shapes_and_penultimate_features() -> None:
    torch.manual_seed(0)
    config = ViTConfig.tiny()
    vit = inference(ViT(config))
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    assert vit(pixels).shape == (2, 1 + config.num_patches, config.hidden)

    expected = vit.embed(pixels)
    for block in vit.blocks[:-1]:
        expected = block(expected)
    features = vit.features(pixels)
    assert features.shape == (2, config.num_patches, config.hidden)
    torch.testing.assert_close(features, expected[:, 1:])


def test_vit_attention_matches_sdpa() -> None:
    torch.manual_seed(0)
    config = ViTConfig.tiny()
    attn = inference(ViT(config)).blocks[0].attn
    x = torch.randn(2, 5, config.hidden)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 5, config.heads, config.head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x)))
    torch.testing.assert_close(attn(x), attn.out_proj(out.transpose(1, 2).reshape(2, 5, config.hidden)), **FP32)


@pytest.mark.parametrize(
    "config",
    [DecoderConfig.tiny(), ChameleonConfig.tiny().text],
    ids=["llama_gqa_additive", "qknorm_masked_fill"],
)
def test_decoder_cached_decode_matches_longer_prefill(config: DecoderConfig) -> None:
    torch.manual_seed(0)
    decoder = inference(Decoder(config))
    decoder.setup_cache(batch_size=2)
    S = 7
    ids = torch.randint(0, config.vocab, (2, S + 1))
    full = decoder(ids, torch.arange(S + 1))
    prefix = decoder(ids[:, :S], torch.arange(S))
    step = decoder(ids[:, S:], torch.tensor([S]))
    assert full.shape == (2, S + 1, config.vocab) and full.dtype == torch.float32
    torch.testing.assert_close(prefix, full[:, :S], **FP32)  # causal: later tokens change nothing before them
    torch.testing.assert_close(step[:, -1], full[:, -1], **FP32)


def test_mask_styles_agree() -> None:
    config = DecoderConfig.tiny()
    logits = []
    for style in ("additive", "masked_fill"):
        torch.manual_seed(0)
        decoder = inference(Decoder(replace(config, mask_style=style)))
        decoder.setup_cache(batch_size=1)
        logits.append(decoder(torch.arange(6)[None], torch.arange(6)))
    torch.testing.assert_close(logits[0], logits[1], **FP32)


def test_decoder_requires_cache() -> None:
    decoder = inference(Decoder(DecoderConfig.tiny()))
    with pytest.raises(RuntimeError, match="setup_cache"):
        decoder(torch.zeros(1, 2, dtype=torch.long), torch.arange(2))


def tiny_vlm(batch: int) -> VLM:
    torch.manual_seed(0)
    vlm = inference(VLM(VLMConfig.tiny()))
    vlm.setup_cache(batch)
    return vlm


def test_vlm_cached_decode_matches_longer_prefill() -> None:
    vlm = tiny_vlm(batch=2)
    n_img, T = vlm.config.num_image_tokens, 5
    pixels = torch.randn(2, 3, vlm.config.vision.image_size, vlm.config.vision.image_size)
    ids = torch.randint(0, vlm.config.text.vocab, (2, T + 1))
    full = vlm.prefill(pixels, ids, torch.arange(n_img + T + 1))
    assert full.shape == (2, n_img + T + 1, vlm.config.text.vocab)
    vlm.prefill(pixels, ids[:, :T], torch.arange(n_img + T))
    step = vlm.decode(ids[:, T:], torch.tensor([n_img + T]))
    assert step.shape == (2, 1, vlm.config.text.vocab)
    torch.testing.assert_close(step[:, -1], full[:, -1], **FP32)


def test_vlm_generate_is_deterministic_and_greedy() -> None:
    vlm = tiny_vlm(batch=2)
    pixels = torch.randn(2, 3, vlm.config.vision.image_size, vlm.config.vision.image_size)
    ids = torch.randint(0, vlm.config.text.vocab, (2, 4))
    tokens, logits = vlm.generate(pixels, ids, max_new_tokens=5)
    assert tokens.shape == (2, 5) and len(logits) == 5
    torch.testing.assert_close(tokens, torch.stack([step.argmax(-1) for step in logits], dim=1))

    again, _ = vlm.generate(pixels, ids, max_new_tokens=5, prefill_fn=VLMPrefill(vlm), decode_fn=VLMDecode(vlm))
    torch.testing.assert_close(again, tokens)
    with pytest.raises(ValueError, match="max_seq_len"):
        vlm.generate(pixels, ids, max_new_tokens=vlm.config.text.max_seq_len)


def test_vq_tokenizer_picks_nearest_code_in_image_range() -> None:
    torch.manual_seed(0)
    config = ChameleonConfig.tiny()
    model = inference(Chameleon(config))
    pixels = torch.randn(2, 3, config.vq.image_size, config.vq.image_size)
    ids = model.tokenize_image(pixels)
    assert ids.shape == (2, config.vq.num_tokens) and ids.dtype == torch.long
    assert ids.min() >= config.image_token_offset and ids.max() < config.text.vocab

    tokenizer = model.image_tokenizer
    z = tokenizer.encoder(pixels).flatten(2).transpose(1, 2)
    nearest = torch.cdist(z, tokenizer.codebook.weight[None]).argmin(-1)
    torch.testing.assert_close(ids - config.image_token_offset, nearest)


def test_chameleon_over_interleaved_sequence() -> None:
    torch.manual_seed(0)
    config = ChameleonConfig.tiny()
    model = inference(Chameleon(config))
    model.setup_cache(batch_size=1)
    pixels = torch.randn(1, 3, config.vq.image_size, config.vq.image_size)
    text = torch.randint(0, config.image_token_offset, (1, 6))
    ids = torch.cat([model.tokenize_image(pixels), text], dim=1)
    logits = model(ids, torch.arange(ids.shape[1]))
    assert logits.shape == (1, config.vq.num_tokens + 6, config.text.vocab)
    assert torch.isfinite(logits).all()


def test_whisper_shapes_and_causal_decoder() -> None:
    torch.manual_seed(0)
    config = WhisperConfig.tiny()
    whisper = inference(Whisper(config))
    audio = whisper.encode(torch.randn(2, config.n_mels, 2 * config.n_audio_ctx))
    assert audio.shape == (2, config.n_audio_ctx, config.d_model)
    assert whisper.encode(torch.randn(2, config.n_mels, 11)).shape == (2, 6, config.d_model)

    tokens = torch.randint(0, config.vocab, (2, 7))
    logits = whisper.decode(tokens, audio)
    assert logits.shape == (2, 7, config.vocab) and logits.dtype == torch.float32
    torch.testing.assert_close(whisper.decode(tokens[:, :4], audio), logits[:, :4], **FP32)


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_registry_builds_deterministic_models_for_two_lengths(name: str) -> None:
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)
        model, inputs = build(name, batch=2)
        outputs.append(model(*inputs))
    torch.testing.assert_close(outputs[0], outputs[1])
    assert outputs[0].shape[0] == 2 and torch.isfinite(outputs[0]).all()

    longer = model(*example_inputs(name, model, batch=2, seq=12))
    assert torch.isfinite(longer).all()
    if name in ("vlm_prefill", "whisper_decoder", "chameleon"):
        assert longer.shape[1] == outputs[0].shape[1] + 4
