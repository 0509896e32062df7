"""What the KV cache of a Hugging Face model looks like, read from the model where its config is not enough: shared
by mmaccel.generate (compiler/generation.py, which allocates the cache before the first step) and the ONNX
generation export (compiler/export_generation.py, which declares the past's shape); and what the installed
transformers' generate() does where its versions differ and the two must do as it does."""
from __future__ import annotations

from typing import Any

import torch


def kv_heads(model: torch.nn.Module, text: Any) -> int:
    """Key/value heads per layer: the text config's num_key_value_heads where it has one, else the decoder's
    attention modules' own count, else its attention heads. Falcon's config has no num_key_value_heads (its
    num_kv_heads reads num_attention_heads) while multi_query gives its attention one K/V head: sized from the
    config, mmaccel.generate's prefill failed in Dynamo (index_copy_ slice shapes) and the ONNX export in
    torch.export (cat sizes)."""
    heads = getattr(text, "num_key_value_heads", None)
    if heads:
        return heads
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for module in decoder.modules():
        for name in ("num_kv_heads", "num_key_value_heads"):
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return text.num_attention_heads


def chunked_attention(text: Any) -> bool:
    """Whether some layer attends in chunks (Llama 4): transformers gives such layers the sliding-window cache
    class, but their mask places positions in absolute chunks, which neither a full-length cache layer nor the
    prompt bucket's left padding keeps as HF has it."""
    return getattr(text, "attention_chunk_size", None) is not None or \
        "chunked_attention" in (getattr(text, "layer_types", None) or ())


def latent_attention(text: Any) -> bool:
    """Whether keys and values are cached at other widths than one head's (multi-head latent attention, DeepSeek
    V2/V3: the compressed kv_nope beside the rotary key): a cache allocated from the config's heads and head_dim
    has the wrong shape (mmaccel.generate's prefill failed in Dynamo at the cache's index_copy_); transformers
    itself allocates such caches lazily."""
    head_dim = getattr(text, "head_dim", None)
    v_head_dim = getattr(text, "v_head_dim", None)
    return any(getattr(text, name, None) for name in ("kv_lora_rank", "qk_head_dim")) or \
        (v_head_dim is not None and head_dim is not None and v_head_dim != head_dim)


def penalty_covers_left_padding() -> bool:
    """Whether the installed transformers' generate() counts a prompt's left padding among the ids that
    repetition_penalty penalizes: before 5.23 its processor saw all of input_ids; 5.23 passes
    prompt_ignore_length=padding_lengths (each row's ids from its first attended position). Found on the H200
    (transformers 5.17): greedy tokens with a penalty differed from HF's on a left-padded batch, matching on the
    CPU's 5.24."""
    import transformers
    release = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    return release < (5, 23)
