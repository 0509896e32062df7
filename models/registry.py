"""Named reference models, each buildable at a tiny (CPU tests) or real (GPU benchmarks) size.

    model, inputs = build("vlm_prefill", size="tiny", batch=2, seq=8)
    logits = model(*inputs)
    longer = example_inputs("vlm_prefill", model, batch=2, seq=12)  # same model, another length

`seq` sets the dimension that varies in practice (default 8):
    vit              ignored: the image grid is fixed by the learned positions
    vlm_prefill      text tokens after the image tokens
    vlm_decode       text tokens already in the prompt: the decoded token sits at image tokens + seq
    whisper_encoder  mel frames (default and maximum 2 * n_audio_ctx)
    whisper_decoder  text tokens (at most n_text_ctx)
    chameleon        text tokens after the image tokens
Models are in eval mode with gradients off (inference only: no autograd graph is built and the
KV cache never records history), and KV caches are allocated for `batch`. Callers seed the RNG
with torch.manual_seed for deterministic weights and inputs.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .chameleon import Chameleon, ChameleonConfig
from .vit import ViT, ViTConfig
from .vlm import VLM, VLMConfig, VLMDecode, VLMPrefill
from .whisper import AudioEncoder, TextDecoder, WhisperConfig

DEFAULT_SEQ = 8
SIZES = ("tiny", "real")

Inputs = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ReferenceModel:
    make: Callable[[str, int], nn.Module]  # (size, batch) -> fp32 module, built on the current default device
    inputs: Callable[[nn.Module, int, int | None], Inputs]  # (module, batch, seq) -> arguments of module(*inputs)


def _pick(size: str, tiny: Callable, real: Callable):
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {SIZES}")
    return tiny() if size == "tiny" else real()


def _weights(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _vlm(size: str, batch: int) -> VLM:
    vlm = VLM(_pick(size, VLMConfig.tiny, VLMConfig.llava_7b))
    vlm.setup_cache(batch)
    return vlm


def _vit_inputs(vit: ViT, batch: int, seq: int | None) -> Inputs:
    c, w = vit.config, _weights(vit)
    return (torch.randn(batch, c.channels, c.image_size, c.image_size, dtype=w.dtype, device=w.device),)


def _vlm_prefill_inputs(module: VLMPrefill, batch: int, seq: int | None) -> Inputs:
    seq = seq or DEFAULT_SEQ
    c, w = module.vlm.config, _weights(module)
    pixels = torch.randn(batch, 3, c.vision.image_size, c.vision.image_size, dtype=w.dtype, device=w.device)
    ids = torch.randint(0, c.text.vocab, (batch, seq), device=w.device)
    return pixels, ids, torch.arange(c.num_image_tokens + seq, device=w.device)


def _vlm_decode_inputs(module: VLMDecode, batch: int, seq: int | None) -> Inputs:
    c, device = module.vlm.config, _weights(module).device
    token = torch.randint(0, c.text.vocab, (batch, 1), device=device)
    return token, torch.tensor([c.num_image_tokens + (seq or DEFAULT_SEQ)], device=device)


def _whisper_encoder_inputs(encoder: AudioEncoder, batch: int, seq: int | None) -> Inputs:
    c, w = encoder.config, _weights(encoder)
    frames = seq or 2 * c.n_audio_ctx
    return (torch.randn(batch, c.n_mels, frames, dtype=w.dtype, device=w.device),)


def _whisper_decoder_inputs(decoder: TextDecoder, batch: int, seq: int | None) -> Inputs:
    c, w = decoder.config, _weights(decoder)
    tokens = torch.randint(0, c.vocab, (batch, seq or DEFAULT_SEQ), device=w.device)
    audio = torch.randn(batch, c.n_audio_ctx, c.d_model, dtype=w.dtype, device=w.device)
    return tokens, audio


def _chameleon_inputs(model: Chameleon, batch: int, seq: int | None) -> Inputs:
    c, w = model.config, _weights(model)
    pixels = torch.randn(batch, 3, c.vq.image_size, c.vq.image_size, dtype=w.dtype, device=w.device)
    text = torch.randint(0, c.image_token_offset, (batch, seq or DEFAULT_SEQ), device=w.device)
    ids = torch.cat([model.tokenize_image(pixels), text], dim=1)
    return ids, torch.arange(ids.shape[1], device=w.device)


def _make_chameleon(size: str, batch: int) -> Chameleon:
    model = Chameleon(_pick(size, ChameleonConfig.tiny, ChameleonConfig.real))
    model.setup_cache(batch)
    return model


REFERENCE_MODELS: dict[str, ReferenceModel] = {
    "vit": ReferenceModel(lambda size, batch: ViT(_pick(size, ViTConfig.tiny, ViTConfig.vit_b16)), _vit_inputs),
    "vlm_prefill": ReferenceModel(lambda size, batch: VLMPrefill(_vlm(size, batch)), _vlm_prefill_inputs),
    "vlm_decode": ReferenceModel(lambda size, batch: VLMDecode(_vlm(size, batch)), _vlm_decode_inputs),
    "whisper_encoder": ReferenceModel(
        lambda size, batch: AudioEncoder(_pick(size, WhisperConfig.tiny, WhisperConfig.base)),
        _whisper_encoder_inputs,
    ),
    "whisper_decoder": ReferenceModel(
        lambda size, batch: TextDecoder(_pick(size, WhisperConfig.tiny, WhisperConfig.base)),
        _whisper_decoder_inputs,
    ),
    "chameleon": ReferenceModel(_make_chameleon, _chameleon_inputs),
}


def build(
    name: str,
    size: str = "tiny",
    batch: int = 1,
    seq: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Inputs]:
    """Build reference model `name` ("tiny" or "real" size) and example inputs for model(*inputs)."""
    spec = REFERENCE_MODELS[name]
    # Built directly on the device: the real sizes are too large to initialize on a CPU first.
    with torch.device(device):
        model = spec.make(size, batch)
    model = model.to(dtype).eval().requires_grad_(False)
    return model, spec.inputs(model, batch, seq)


def example_inputs(name: str, model: nn.Module, batch: int = 1, seq: int | None = None) -> Inputs:
    """Fresh example inputs for a model made by `build(name, ...)`, e.g. at another sequence length."""
    return REFERENCE_MODELS[name].inputs(model, batch, seq)
