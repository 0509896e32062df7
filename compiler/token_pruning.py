"""tokens="prune" for mmaccel.generate (issue 15, item 2): the image tokens the text attends to least are left
out of the language model's prompt.

FastV (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2") ranks a LLaVA prompt's image tokens by
the attention the last prompt position pays them in the language model's layer K (K=2: the second layer's
attention, mean over heads) and drops the lowest-ranked ones for the layers after K. Here:
1. Scoring pass, compiled like the steps (one graph per prompt bucket): the vision tower and projector, the
   prompt's embeddings with the image features in place, the language model's first K-1 layers over the
   whole prompt, then only what the scores need of layer K: its queries at the last position and its keys,
   softmax over the keys [B, heads, 1, S] (never the [S, S] probabilities), mean over heads.
2. Each image keeps its R highest-scoring tokens, in their original order; the prompt's embeddings are
   gathered to the kept positions (text all kept), rows left-padded again, positions contiguous (as
   tokens="resolution" cuts placeholders), and the usual compiled prefill runs on them (inputs_embeds: the
   tower ran once, in the scoring pass), so every layer and the KV cache every decode step reads hold R
   tokens per image.
This differs from FastV, which keeps every token in layers < K and prunes from layer K on, with the pruned
tokens' positions (position ids keep their gaps). Keeping all tokens in the first K layers would need a prefill
split at layer K and a cache whose first K layers are longer than the rest, and CUDA-graph-friendly static
caches have one length; gaps in the positions would need per-position ids through every decode step. So the
whole language model runs on the kept tokens, at contiguous positions: the scoring pass costs about K/L of a
full prefill more (LLaVA-1.5-7B, K=2: 2 of 32 layers, less: layer K is queries at one position), and its
accuracy loss is the one the budget measures, not FastV's published one.

The fraction kept is chosen under accuracy_budget by the tokens= levers' one mechanism (compiler/resolution.py
ImageTokenLever): keep 25%, 50% or 75% of each image's tokens (or the user's {"prune": fraction}).
"""
from __future__ import annotations

import copy
import sys
import weakref
from typing import Any, Callable, Sequence

import torch

from .buckets import prompt_bucket
from .errors import InvalidOptionError
from .options import Sample
from .resolution import ImageLayout, ImageTokenLever, image_ranks, left_packed, llava_layout

# FastV's K: its paper finds layer 2's attention already ranks image tokens usefully and prunes after it.
SCORE_LAYER = 2
# Fractions of each image's tokens kept, fewest first: LLaVA-1.5's 576 -> 144, 288, 432.
KEEP_FRACTIONS = (0.25, 0.5, 0.75)


class PruneLever(ImageTokenLever):
    """tokens="prune" in one generate session: the keep fraction chosen on first use, then each call's prompt
    scored (`scorer`: image_attention, compiled by the session) and pruned."""
    name, setting_name = "prune", "keep"

    def __init__(self, budget: float, metric: Callable | None, calibration: Sequence[Sample] | None,
                 settings: Sequence[float] | None = None) -> None:
        super().__init__(budget, metric, calibration, settings)
        self.scorer: Callable = image_attention

    def layout(self, model: torch.nn.Module) -> ImageLayout | str:
        layout = llava_layout(model)
        reason = None if isinstance(layout, str) else scoring_reason(model)
        return reason or layout

    def candidates(self, layout: ImageLayout) -> list[float]:
        fractions = list(self.settings) if self.settings is not None else list(KEEP_FRACTIONS)
        for fraction in fractions:
            if self.tokens(layout, fraction) < 1:
                raise InvalidOptionError(f"tokens={{'prune': {fraction}}} keeps none of an image's "
                                         f"{layout.tokens(layout.image_size)} tokens; keep a larger fraction")
        return sorted(fractions)

    def tokens(self, layout: ImageLayout, fraction: float) -> int:
        return round(layout.tokens(layout.image_size) * fraction)

    def label(self, fraction: float) -> str:
        return f"{fraction:.0%}"

    def prepared(self, model, layout, ids, mask, inputs) -> tuple:
        """The prompt scored: (ids, mask, other inputs, embeddings [B, L, D], scores [B, L])."""
        found, images, full = int((ids == layout.image_token_id).sum()), len(inputs["pixel_values"]), \
            layout.tokens(layout.image_size)
        if found != images * full:  # masked_scatter would fail inside the graph, or fill only the first ones
            raise ValueError(f"mmaccel.generate: the prompt holds {found} image placeholder tokens (id "
                             f"{layout.image_token_id}) for {images} image(s) of {full} features each")
        embeds, scores = bucket_scored(self.scorer, model, ids, mask, inputs["pixel_values"])
        return ids, mask, {k: v for k, v in inputs.items() if k != "pixel_values"}, embeds, scores

    def rewrite(self, layout, prepared, fraction, pad_id) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | str:
        ids, mask, inputs, embeds, scores = prepared
        kept = kept_positions(ids, scores, layout, self.tokens(layout, fraction))
        if isinstance(kept, str):
            return kept
        ids, mask, embeds = left_packed(kept, (ids, pad_id), (mask, 0), (embeds, 0))
        return ids, mask, {**inputs, "inputs_embeds": embeds}


def kept_positions(ids: torch.Tensor, scores: torch.Tensor, layout: ImageLayout, keep: int) -> torch.Tensor | str:
    """[B, L] bool: every text position, and the `keep` highest-scoring positions of each image; or why the
    layout cannot be followed."""
    ranks = image_ranks(ids, layout)
    if isinstance(ranks, str):
        return ranks
    is_image = ids == layout.image_token_id
    kept = ~is_image
    full = layout.tokens(layout.image_size)
    for row in range(ids.shape[0]):
        per_image = scores[row][is_image[row]].view(-1, full)  # [images, N]
        top = torch.zeros_like(per_image, dtype=torch.bool).scatter_(-1, per_image.topk(keep, -1).indices, True)
        kept[row, is_image[row]] = top.flatten()
    return kept


def bucket_scored(scorer: Callable, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`scorer` over the prompt left-padded to its prompt bucket (compiled: one graph per bucket, as the
    prefill), the padding cut off again: (embeddings [B, L, D], scores [B, L])."""
    pad = prompt_bucket(ids.shape[1]) - ids.shape[1]
    not_image = int(model.config.image_token_id == 0)  # any id but the placeholder's: masked out anyway
    padded_ids = torch.nn.functional.pad(ids, (pad, 0), value=not_image)
    padded_mask = torch.nn.functional.pad(mask.long(), (pad, 0), value=0)
    with torch.no_grad():
        embeds, scores = scorer(model, first_layers(model), padded_ids, padded_mask, pixels, query_key(model))
    return embeds[:, pad:], scores[:, pad:]


def query_key(model: torch.nn.Module) -> tuple[torch.Tensor | None, ...]:
    """Layer SCORE_LAYER's query and key projections (weight, bias each), detached: the scoring graph reads
    them as inputs, not as frozen constants. The prefill compiled after it fuses that layer's q/k/v into one
    buffer and rebinds the parameters as views of it (passes/fusion.py): frozen, the scoring graph's copies
    went stale (the second call warned and ran unoptimized)."""
    attention = model.get_decoder().layers[SCORE_LAYER - 1].self_attn
    return tuple(None if t is None else t.detach() for linear in (attention.q_proj, attention.k_proj)
                 for t in (linear.weight, linear.bias))


def image_attention(model: torch.nn.Module, first: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                    pixels: torch.Tensor, projections: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's embeddings with the image features in place [B, L, D], and the attention the last position
    pays each position at the language model's layer SCORE_LAYER, mean over heads [B, L] (float32).
    `first`: first_layers(model), the layers before it; `projections`: query_key(model)."""
    is_image = (ids == model.config.image_token_id)[..., None]
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter(is_image, _image_features(model, pixels).to(embeds.dtype))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = first(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    return embeds, last_position_attention(model, hidden.last_hidden_state, mask, positions, projections)


def last_position_attention(model: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor,
                            positions: torch.Tensor, projections: tuple) -> torch.Tensor:
    """Layer SCORE_LAYER's attention probabilities of the last position over every position [B, L], mean over
    heads: its queries at that one position, its keys everywhere, as its eager attention computes them."""
    text = model.get_decoder()
    layer = text.layers[SCORE_LAYER - 1]
    attention = layer.self_attn
    rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    hidden = layer.input_layernorm(hidden)
    cos, sin = text.rotary_emb(hidden, positions)
    batch, length, _ = hidden.shape
    q_weight, q_bias, k_weight, k_bias = projections
    query = torch.nn.functional.linear(hidden[:, -1:], q_weight, q_bias)
    query = query.view(batch, 1, -1, attention.head_dim).transpose(1, 2)
    key = torch.nn.functional.linear(hidden, k_weight, k_bias).view(batch, length, -1, attention.head_dim)
    key = key.transpose(1, 2)
    query = rotary(query, query, cos[:, -1:], sin[:, -1:])[0]  # [B, heads, 1, head_dim]
    key = rotary(key, key, cos, sin)[0].repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = (query @ key.transpose(-1, -2)) * attention.scaling  # [B, heads, 1, L]
    logits = logits.masked_fill(mask[:, None, None, :] == 0, torch.finfo(logits.dtype).min)
    return logits.float().softmax(-1).mean(1)[:, 0]


def scoring_reason(model: torch.nn.Module) -> str | None:
    """Why the scoring pass cannot follow the language model (None: it can): it needs a decoder of at least
    SCORE_LAYER layers whose attention is Llama's (q_proj, k_proj, rotary embeddings, no query/key norm)."""
    text = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(text, "layers", None)
    if layers is None or len(layers) < SCORE_LAYER or not hasattr(text, "rotary_emb"):
        return f"the language model is not a decoder of at least {SCORE_LAYER} layers with rotary embeddings"
    attention = getattr(layers[SCORE_LAYER - 1], "self_attn", None)
    needs = ("q_proj", "k_proj", "head_dim", "scaling")
    if attention is None or not all(hasattr(attention, n) for n in needs) or hasattr(attention, "q_norm") or \
            not hasattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb"):
        return f"layer {SCORE_LAYER}'s attention ({type(attention).__name__}) is not Llama-style"
    return None


def first_layers(model: torch.nn.Module) -> torch.nn.Module:
    """The language model's first SCORE_LAYER - 1 decoder layers, without the final norm (the input of layer
    SCORE_LAYER): a shallow copy sharing the model's modules, made once per model."""
    if model not in _FIRST_LAYERS:
        text = model.get_decoder()
        config = copy.deepcopy(text.config)
        config.num_hidden_layers = SCORE_LAYER - 1
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:SCORE_LAYER - 1]
        first = copy.copy(text)
        first._modules = {**text._modules, "layers": torch.nn.ModuleList(list(text.layers)[:SCORE_LAYER - 1]),
                          "norm": torch.nn.Identity()}
        first.config = config
        _FIRST_LAYERS[model] = first
    return _FIRST_LAYERS[model]


_FIRST_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _image_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The projector's features of every image, one row per image token [images * N, D]."""
    config = model.config
    out = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
                                         vision_feature_select_strategy=config.vision_feature_select_strategy)
    # transformers 5.2x: an output whose pooler_output lists each image's [N, D]; earlier: a tensor [B, N, D]
    return torch.cat(list(getattr(out, "pooler_output", out)))
