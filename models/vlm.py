"""LLaVA-style vision-language model: ViT features -> MLP projector -> Llama decoder."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .common import MLP
from .decoder import Decoder, DecoderConfig
from .vit import ViT, ViTConfig


@dataclass(frozen=True)
class VLMConfig:
    vision: ViTConfig
    text: DecoderConfig

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @classmethod
    def tiny(cls) -> "VLMConfig":
        return cls(vision=ViTConfig.tiny(), text=DecoderConfig.tiny())

    @classmethod
    def llava_7b(cls) -> "VLMConfig":
        """LLaVA-1.5-7B: CLIP ViT-L/14@336 (576 image tokens) and a Llama-2-7B decoder."""
        return cls(vision=ViTConfig.vit_l14_336(), text=DecoderConfig.llama_7b())


class VLM(nn.Module):
    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = ViT(config.vision)
        self.projector = MLP(config.vision.hidden, config.text.hidden, config.text.hidden)
        self.decoder = Decoder(config.text)

    def setup_cache(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        self.decoder.setup_cache(batch_size, dtype, device)

    def prefill(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, I + T, vocab] for the image tokens (I) followed by the text `input_ids` [B, T].

        `input_pos` covers the whole sequence: usually arange(I + T).
        """
        image_embeds = self.projector(self.vision.features(pixel_values))
        embeds = torch.cat([image_embeds, self.decoder.embed(input_ids)], dim=1)
        return self.decoder(input_pos=input_pos, inputs_embeds=embeds)

    def decode(self, token_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, vocab] for one new token per sequence, `token_ids` [B, 1] at `input_pos` [1]."""
        return self.decoder(token_ids, input_pos)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        prefill_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        decode_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Greedy decoding. Returns the new tokens [B, max_new_tokens] and each step's logits [B, vocab].

        `prefill_fn` and `decode_fn` default to `self.prefill` and `self.decode`; pass compiled
        versions of them (e.g. of `VLMPrefill(self)`, `VLMDecode(self)`) to compare against eager.
        The cache must be allocated (`setup_cache`) for the batch size of `input_ids`.
        """
        prefill_fn = prefill_fn or self.prefill
        decode_fn = decode_fn or self.decode
        prompt_len = self.config.num_image_tokens + input_ids.shape[1]
        if prompt_len + max_new_tokens > self.config.text.max_seq_len:
            raise ValueError(f"{prompt_len} + {max_new_tokens} tokens exceed max_seq_len {self.config.text.max_seq_len}")
        device = input_ids.device
        logits = prefill_fn(pixel_values, input_ids, torch.arange(prompt_len, device=device))[:, -1]
        step_logits = [logits]
        tokens = [logits.argmax(dim=-1, keepdim=True)]
        for pos in range(prompt_len, prompt_len + max_new_tokens - 1):
            logits = decode_fn(tokens[-1], torch.tensor([pos], device=device))[:, -1]
            step_logits.append(logits)
            tokens.append(logits.argmax(dim=-1, keepdim=True))
        return torch.cat(tokens, dim=1), step_logits


class VLMPrefill(nn.Module):
    """`VLM.prefill` as a module, so it can be compiled and called as module(*inputs)."""

    def __init__(self, vlm: VLM) -> None:
        super().__init__()
        self.vlm = vlm

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.vlm.prefill(pixel_values, input_ids, input_pos)


class VLMDecode(nn.Module):
    """`VLM.decode` as a module, so it can be compiled and called as module(*inputs)."""

    def __init__(self, vlm: VLM) -> None:
        super().__init__()
        self.vlm = vlm

    def forward(self, token_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.vlm.decode(token_ids, input_pos)
