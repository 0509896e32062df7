"""Drafts for speculative decoding (compiler/speculative.py): a user's small model, checked against the target,
or one derived from the target itself.

    draft=small_model   a Hugging Face causal LM with the target's vocabulary, on the target's device
    draft="quantized:int4_weight_only" (or int8_weight_only, fp8): the target compiled with that quantization
                        (passes/quantize.py) in a session of its own: a quantized copy of the weights and its
                        own cache; its error costs acceptance, never correctness, so its budget is loose
    draft="pruned:F" (or "pruned:F+SCHEME"): the target with fraction F of its MLP channels removed (passes/prune.py),
                        then quantized with SCHEME if given, in a session of its own like a quantized draft
    draft="layers:N"    self-speculation: the target's first N decoder layers, then its own final norm and LM
                        head (LayerSkip's early exit without the training), sharing the target's modules: no
                        weight is copied. It shares the target's cache too (layers_shared_with_target): its N
                        layers see the target's own inputs at every kept position, so the target's first N
                        cache layers hold exactly the draft's keys and values; no draft prefill, no draft cache
"""
from __future__ import annotations

import copy
import weakref
from typing import Any

import torch

_LAYER_DRAFTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # target -> {N: draft}
_SHARED_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # draft -> N
# Bytes per weight of each quantized draft (group scales included: int4 in groups of 32 with fp16 scale and zero
# is 5 bits), for the draft's step cost in speculative_k="auto".
QUANTIZED_DRAFT_BYTES = {"int8_weight_only": 1.0, "int4_weight_only": 0.625, "fp8": 1.0}
# The quantize pass keeps the draft's output error within this: loose, as a wrong draft token is only rejected.
QUANTIZED_DRAFT_BUDGET = 0.5
# A pruned draft removes its fixed fraction whatever the error (the budget only has to admit it, below 1).
PRUNED_DRAFT_BUDGET = 0.99


def resolve_draft(target: torch.nn.Module, draft: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The draft module for `draft=` (a module, "layers:N" or "quantized:SCHEME") and the backend options it
    adds, checked against the target: same vocabulary, same device, a decoder-only or LLaVA-style target.
    Anything else: ValueError saying what is accepted."""
    if getattr(target.config, "is_encoder_decoder", False):
        raise ValueError(f"mmaccel.generate: speculative decoding takes decoder-only and LLaVA-style models, not "
                         f"the encoder-decoder {type(target).__name__}")
    if isinstance(draft, str) and draft.startswith("layers:") and draft[len("layers:"):].isdigit():
        layers = int(draft[len("layers:"):])
        per_target = _LAYER_DRAFTS.setdefault(target, {})
        if layers not in per_target:
            per_target[layers] = layer_draft(target, layers)
        return per_target[layers], {}
    if isinstance(draft, str) and draft.startswith("quantized:") and draft[10:] in QUANTIZED_DRAFT_BYTES:
        # weights="keep": the draft is the target itself; releasing would free the target's own weights.
        return target, {"quantize": draft[10:], "accuracy_budget": QUANTIZED_DRAFT_BUDGET, "weights": "keep"}
    if isinstance(draft, str) and draft.startswith("pruned:"):
        return target, _pruned_draft_options(draft)
    if not isinstance(draft, torch.nn.Module):
        raise ValueError(f"mmaccel.generate: draft must be a model (torch.nn.Module), 'layers:N', 'quantized:"
                         f"SCHEME' or 'pruned:F[+SCHEME]' with SCHEME one of {list(QUANTIZED_DRAFT_BYTES)} and F "
                         f"the fraction of MLP channels removed, in (0, 1), got {draft!r}")
    if vocab_size(draft) != vocab_size(target):
        raise ValueError(f"mmaccel.generate: the draft's vocabulary has {vocab_size(draft)} tokens, the target's "
                         f"{vocab_size(target)}; speculative decoding needs the same tokenizer")
    draft_device, target_device = (next(m.parameters()).device for m in (draft, target))
    if draft_device != target_device:
        raise ValueError(f"mmaccel.generate: the draft is on {draft_device}, the target on {target_device}; "
                         "move the draft to the target's device")
    return draft, {}


def _pruned_draft_options(draft: str) -> dict[str, Any]:
    """'pruned:F' or 'pruned:F+SCHEME': the target with fraction F of every MLP's channels removed
    (passes/prune.py, channels chosen and the down projection refit on each step's own inputs), then quantized
    with SCHEME if given. Its error only costs acceptance, so the fixed fraction applies whatever it measures."""
    fraction, _, scheme = draft[len("pruned:"):].partition("+")
    try:
        value = float(fraction)
    except ValueError:
        value = -1.0
    if not 0 < value < 1 or (scheme and scheme not in QUANTIZED_DRAFT_BYTES):
        raise ValueError(f"mmaccel.generate: draft={draft!r}: write 'pruned:F' or 'pruned:F+SCHEME', F the fraction "
                         f"of MLP channels removed in (0, 1), SCHEME one of {list(QUANTIZED_DRAFT_BYTES)}")
    options = {"prune": {"mlp_channels": value}, "accuracy_budget": PRUNED_DRAFT_BUDGET, "weights": "keep"}
    return {**options, "quantize": scheme} if scheme else options


def layer_draft(target: torch.nn.Module, layers: int) -> torch.nn.Module:
    """The target truncated to its first `layers` decoder layers: shallow copies of the modules on the path to
    the decoder-layer list (which get a config with num_hidden_layers=layers), the rest shared."""
    path, total = _decoder_layers(target)
    if not 1 <= layers < total:
        raise ValueError(f"mmaccel.generate: draft='layers:{layers}' must keep 1 to {total - 1} of the target's "
                         f"{total} decoder layers")
    config = copy.deepcopy(target.config)
    text = _text_config(config)
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:layers]
    configs = {id(target.config): config, id(_text_config(target.config)): text}
    draft = _truncated(target, path.split("."), layers, configs)
    _SHARED_LAYERS[draft] = layers
    return draft


def layers_shared_with_target(draft: torch.nn.Module) -> int | None:
    """N for a draft made by layer_draft (its layers are the target's first N), else None."""
    return _SHARED_LAYERS.get(draft)


def draft_name(draft: Any) -> str:
    """How reports name a draft: its string, or a model's class and size (str() of a module is its whole repr,
    dozens of lines in generation_report's speculative summary and graph notes)."""
    if not isinstance(draft, torch.nn.Module):
        return str(draft)
    return f"{type(draft).__name__} ({sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M parameters)"


def vocab_size(model: torch.nn.Module) -> int:
    """The number of logits the model gives per position (its LM head's rows, else its config's vocab_size)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(_text_config(model.config).vocab_size)


def step_cost_ratio(draft: torch.nn.Module, target: torch.nn.Module, draft_options: dict[str, Any]) -> float:
    """A draft decode step's time over the target's, estimated as the weight bytes each reads per token (a
    decode step is bound by weight reads): decoder and LM head, not the input embedding table (one row read)
    nor a vision tower (prefill only)."""
    ratio = _step_bytes(draft) / _step_bytes(target)
    if draft_options.get("prune"):  # the MLPs' share of the bytes shrinks by the fraction removed
        ratio -= draft_options["prune"]["mlp_channels"] * _step_bytes(draft, mlp_only=True) / _step_bytes(target)
    if draft_options.get("quantize"):
        ratio *= min(1.0, QUANTIZED_DRAFT_BYTES[draft_options["quantize"]] / next(target.parameters()).element_size())
    return ratio


def _step_bytes(model: torch.nn.Module, mlp_only: bool = False) -> int:
    try:
        path, _ = _decoder_layers(model)
        decoder = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    except ValueError:
        decoder = model
    embed = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    params = {p.data_ptr(): p for name, p in decoder.named_parameters() if not mlp_only or ".mlp." in f".{name}"}
    if mlp_only:
        return sum(p.numel() * p.element_size() for p in params.values())
    if embed is not None:
        params.pop(embed.data_ptr(), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        params[head.weight.data_ptr()] = head.weight
    return sum(p.numel() * p.element_size() for p in params.values())


def _decoder_layers(model: torch.nn.Module) -> tuple[str, int]:
    """The qualified name of the text decoder's layer list (`model.layers`, `model.language_model.layers`: a
    vision tower's encoder layers are not it; `transformer.h` in GPT-2 and Falcon) and its length."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    layers = layers if isinstance(layers, torch.nn.ModuleList) else getattr(decoder, "h", None)
    if isinstance(layers, torch.nn.ModuleList):
        for name, module in model.named_modules():
            if module is layers:
                return name, len(layers)
    raise ValueError(f"mmaccel.generate: cannot find the decoder layers of {type(model).__name__} (get_decoder() "
                     "with a ModuleList 'layers' or 'h') to derive a draft from")


def _truncated(module: torch.nn.Module, path: list[str], layers: int, configs: dict[int, Any]) -> torch.nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)  # copy.copy shares the dict: assigning into it would edit the target
    if id(getattr(module, "config", None)) in configs:
        clone.config = configs[id(module.config)]
    child = module._modules[path[0]]
    clone._modules[path[0]] = torch.nn.ModuleList(list(child)[:layers]) if len(path) == 1 else \
        _truncated(child, path[1:], layers, configs)
    return clone


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
