"""export_onnx(model, example_inputs, folder, generation=True): a Hugging Face generating model as a folder of
ONNX graphs and a manifest, which mmaccel.onnx_generate (compiler/onnx_generate.py) drives on ONNX Runtime.

    folder/decoder.onnx    (input_ids | inputs_embeds, attention_mask, position_ids, past_key_values.{i}.key/value)
                           -> (logits, present.{i}.key/value): Optimum's layout, dynamic batch, sequence and past
    folder/embed.onnx      LLaVA: input_ids -> inputs_embeds (the image features are merged in between, by position)
    folder/vision.onnx     LLaVA: pixel_values -> image_features (vision tower + projector)
    folder/encoder.onnx    Whisper: input_features -> every decoder layer's cross-attention K/V (the decoder reads
                           them as past_key_values.{i}.encoder.*, beside its growing past_key_values.{i}.decoder.*)
    folder/manifest.json   each graph's inputs and outputs, the cache geometry, stop/pad ids, dtype, export id

The decoder is the model wrapped in a module that takes the past tensors and builds a DynamicCache from them
inside the traced forward (as transformers' own integrations/executorch.py does), so the cache's growth is the
graph's concatenation and the new cache is returned as tensors: no in-place state. Every graph goes through the
same lowering and passes as a single-file export; int4 linears then become ONNX Runtime's MatMulNBits
(use_matmul_nbits), and with a quantize option the token embedding table becomes int8 per row
(compiler/export_embeddings.py) and the MatMulNBits take int8 activations when ONNX Runtime's measured error
allows (compiler/export_accuracy_level.py). Unless portable=True, the decoder's attention, rotary and
residual+RMSNorm then become ONNX Runtime's contrib ops (compiler/onnx_fusions.py), kept only where ONNX
Runtime's outputs stay the unfused file's. The folder is written aside and renamed into place at the end: a
failed export leaves nothing at `folder` (and an existing folder untouched).
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.export import Dim

from ..ops.int4_matmul_nbits import to_matmul_nbits
from ..passes.cleanup import drop_unused_constants
from ..passes.contract import PassResult
from ..passes.patterns import add_constant, constant_value
from .export import EXTERNAL_DATA_BYTES, ExportError, convert, export_options, lower_for_export
from .export_accuracy_level import int8_activation_matmuls
from .onnx_fusions import NAME as FUSION, fuse_for_onnxruntime
from .onnx_rewrites import compact_external_data, divide_by_square_roots, drop_zero_biases, share_tied_embedding
from .export_embeddings import quantize_embeddings
from . import hf_geometry
from .onnx_generate import FORMAT, HF_SAMPLING_DEFAULTS, MANIFEST, VERSION
from .options import as_sample
from .report import CompileReport, GraphReport
# Trace-time sizes: distinct (so torch.export does not unify batch, sequence and past), and none 0 or 1
# (torch.export specializes those). At run time any size goes, 0 past positions (the prompt step) included.
TRACE_BATCH, TRACE_SEQUENCE, TRACE_PAST = 2, 5, 7


@dataclass
class GraphSpec:
    """One graph of the folder: the module traced, its example inputs and dynamic dims, and the names its
    ONNX inputs and outputs get (`dims`: per input, dim index -> name)."""
    name: str
    module: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    dynamic_shapes: Any
    inputs: list[str]
    outputs: list[str]
    dims: list[dict[int, str]]
    sliding: bool = False  # the decoder of a model with sliding-window layers (onnx_fusions: padding_masks)


class DecoderWithPast(torch.nn.Module):
    """A causal LM as one step over explicit past tensors: (tokens, attention_mask [B, past+S], position_ids
    [B, S], past K/V per layer [B, Hkv, past, D]) -> (logits [B, S, V], present K/V per layer)."""

    def __init__(self, model: torch.nn.Module, token_input: str) -> None:
        super().__init__()
        self.model, self.token_input = model, token_input
        # transformers 5.2x renames forward's past_key_values to cache (the old name warns until 5.40)
        self.cache_arg = "cache" if "cache" in _forward_parameters(model) else "past_key_values"

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # No config: every layer a DynamicLayer keeping all its past, sliding-window ones too (_check_plain_cache)
        cache = DynamicCache(list(zip(past[0::2], past[1::2])))
        out = self.model(**{self.token_input: tokens, self.cache_arg: cache}, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True)
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


class ImageFeatures(torch.nn.Module):
    """LLaVA's vision tower and projector: pixel_values [N, C, H, W] -> image features [N, P, hidden].
    LlavaModel.get_image_features' selection (feature layer(s), class token dropped for "default"), without
    its split into a per-image list, which would fix the number of images at trace time."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.tower, self.projector = model.model.vision_tower, model.model.multi_modal_projector
        layers = model.config.vision_feature_layer
        self.layers = [layers] if isinstance(layers, int) else list(layers)
        self.drop_class_token = model.config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        selected = [hidden[layer][:, 1:] if self.drop_class_token else hidden[layer] for layer in self.layers]
        return self.projector(torch.cat(selected, dim=-1))


class TokenEmbedding(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.embedding = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


class WhisperEncoderCrossKV(torch.nn.Module):
    """Whisper's encoder ending in every decoder layer's cross-attention K/V, computed once per prompt and read
    by every decoder step (as ONNX Runtime GenAI's Whisper encoder does): input_features [B, mels, frames] ->
    per layer key, value [B, heads, encoder positions, head dim], as WhisperAttention projects them."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.encoder, self.layers = model.model.encoder, model.model.decoder.layers

    def forward(self, input_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.encoder(input_features).last_hidden_state  # [B, T, d_model]
        cross = []
        for layer in self.layers:
            attention = layer.encoder_attn
            for projection in (attention.k_proj, attention.v_proj):
                cross.append(projection(hidden).view(hidden.shape[0], -1, attention.num_heads, attention.head_dim)
                             .transpose(1, 2))
        return tuple(cross)


class WhisperDecoderWithPast(torch.nn.Module):
    """Whisper's decoder as one step: (input_ids, attention_mask, position_ids, then per layer the self-attention
    past key, value and the cross-attention key, value) -> (logits, present self-attention key, value per layer).
    The cross-attention cache is marked filled, so the layers read it and never project encoder states: the
    encoder states passed are a placeholder the graph drops."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.decoder, self.proj_out, self.config = model.model.decoder, model.proj_out, model.config
        self.cache_arg = "cache" if "cache" in _forward_parameters(self.decoder) else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache, EncoderDecoderCache

        self_attention = DynamicCache(list(zip(past[0::4], past[1::4])), config=self.config)
        cross_attention = DynamicCache(list(zip(past[2::4], past[3::4])), config=self.config)
        cache = EncoderDecoderCache(self_attention, cross_attention)
        placeholder = past[2].new_zeros(input_ids.shape[0], 1, self.config.d_model)
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           encoder_hidden_states=placeholder, use_cache=True, **{self.cache_arg: cache})
        return (self.proj_out(out.last_hidden_state),
                *[t for layer in self_attention.layers for t in (layer.keys, layer.values)])


def export_generation(model: torch.nn.Module, example_inputs: Any, folder: str | os.PathLike,
                      portable: bool = False, **options: Any) -> CompileReport:
    """Export `model`'s generation graphs into `folder` (see the module docstring). `example_inputs`: the
    inputs a prompt would give (input_ids; pixel_values for LLaVA, input_features for Whisper, which fix the
    image size and the number of audio frames), as a dict or positional tuple. portable=True: standard ONNX
    ops only; by default the decoder's attention and norms become ONNX Runtime's contrib ops
    (compiler/onnx_fusions.py), where they match and ONNX Runtime's outputs stay the same."""
    opts = export_options(options)
    if opts.prune is not None or opts.calibration is not None:
        raise ExportError("export_onnx(generation=True) takes no prune or calibration option yet: each graph's "
                          "quantization error is measured on its trace inputs (drop those options)")
    folder = os.path.abspath(os.fspath(folder))
    text = _text_config(model)
    specs = generation_graphs(model, as_sample(example_inputs, "example_inputs"), text)
    report, export_id = CompileReport(opts), uuid.uuid4().hex
    manifest = {"format": FORMAT, "version": VERSION, "export_id": export_id, "model_type": model.config.model_type,
                "config": generation_config(model, text), "graphs": {}}
    fuse_positions = None if portable else getattr(text, "max_position_embeddings", None)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".mmaccel-export-") as tmp:
        staged = os.path.join(tmp, "out")
        os.makedirs(staged)
        for index, spec in enumerate(specs):
            record = GraphReport(index=index, target=f"onnx graph {spec.name}.onnx in {folder}",
                                 target_reason="export_onnx(generation=True)")
            start = time.perf_counter()
            manifest["graphs"][spec.name] = _export_graph(spec, staged, opts, record, export_id, fuse_positions)
            fusion = next((p for p in record.passes if p.name == FUSION and p.matched), None)
            if fusion is not None:  # the rotary tables end there
                manifest["config"]["max_positions"] = fuse_positions
            if fusion is not None and fusion.details["past_present_share_buffer"]:  # onnx_generate's SharedCache
                manifest["config"]["past_present_share_buffer"] = True
            record.status, record.compile_seconds = "optimized", time.perf_counter() - start
            report.graphs.append(record)
        with open(os.path.join(staged, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        _replace_folder(staged, folder, tmp)
    return report


def _export_graph(spec: GraphSpec, staged: str, opts: Any, record: GraphReport, export_id: str,
                  fuse_positions: int | None) -> dict[str, Any]:
    """Lower, optimize and write one graph; its manifest entry. fuse_positions: the decoder's contrib-op
    fusion on, its rotary tables that many positions long (None: off)."""
    import onnx

    gm, flat_inputs = lower_for_export(spec.module, spec.example, spec.dynamic_shapes, opts, record)
    use_matmul_nbits(gm)
    reference = eager_outputs(spec) if opts.quantize is not None else None
    if reference is not None:  # the token embedding table too (compiler/export_embeddings.py)
        record.passes.append(quantize_embeddings(gm, flat_inputs, reference, opts.accuracy_budget))
    program = convert(gm, flat_inputs)
    path = os.path.join(staged, f"{spec.name}.onnx")
    external = record.frozen_bytes > EXTERNAL_DATA_BYTES
    program.save(path, external_data=external)
    proto = onnx.load(path, load_external_data=False)
    entry = {"file": f"{spec.name}.onnx", **name_values(proto, spec)}
    divided = divide_by_square_roots(proto.graph)  # so ONNX Runtime fuses the RMSNorms (compiler/onnx_rewrites.py)
    record.passes.append(PassResult(name="onnx_divide_by_square_roots", matched=divided,
                                    changes=[f"{divided} Mul(x, Reciprocal(Sqrt)) -> Div(x, Sqrt)"] if divided else []))
    shared = share_tied_embedding(proto.graph, staged)  # a tied LM head's table once, not twice
    zero = drop_zero_biases(proto.graph, staged)  # random-init models' biases (compiler/onnx_rewrites.py)
    if (shared or zero) and external:
        compact_external_data(proto, staged)  # the dropped tensors' bytes leave the data file too
    record.passes.append(PassResult(name="onnx_share_tied_embedding", matched=len(shared), changes=shared))
    record.passes.append(PassResult(name="onnx_drop_zero_biases", matched=len(zero), changes=zero))
    proto.metadata_props.add(key="mmaccel.export_id", value=export_id)
    proto.metadata_props.add(key="mmaccel.graph", value=spec.name)
    onnx.save(proto, path)  # external data stays where program.save put it: only the references are rewritten
    _onnxruntime_rewrites(spec, path, flat_inputs, reference, opts, record, fuse_positions)
    onnx.checker.check_model(path)  # by path: also checks models with external data
    return entry


def _onnxruntime_rewrites(spec: GraphSpec, path: str, inputs: Any, reference: list[torch.Tensor] | None, opts: Any,
                          record: GraphReport, fuse_positions: int | None) -> None:
    """The decoder's contrib-op fusion (compiler/onnx_fusions.py; checked against the unfused file while the
    MatMulNBits still run the exact kernel: int8 activations turn 1e-7 differences into 2e-2 on the 125M Llama),
    then int8 activations in MatMulNBits if ONNX Runtime's error allows (export_accuracy_level.py), measured on
    the trace inputs, or for a fused decoder on one decode step after the trace past, the step int8 activations
    speed up."""
    fused = False
    if spec.name == "decoder" and fuse_positions:
        feeds = decoder_feeds(spec)
        record.passes.append(fuse_for_onnxruntime(path, feeds, fuse_positions, padding_masks=not spec.sliding))
        fused = record.passes[-1].matched > 0
    if reference is None:
        return
    if fused:
        inputs = [torch.from_numpy(feeds[1][name]) for name in spec.inputs]
        reference = eager_outputs(spec, inputs)
    record.passes.append(int8_activation_matmuls(path, inputs, reference, opts.accuracy_budget))


def decoder_feeds(spec: GraphSpec) -> list[dict[str, Any]]:
    """The decoder's inputs for a prompt (no past) and for one step after the trace past, from its example (the
    two calls onnx_generate makes), and both again left-padded."""
    example = dict(zip(spec.inputs, (t.detach().cpu().numpy() for t in spec.example)))
    tokens, mask = example[spec.inputs[0]], example["attention_mask"]
    batch, sequence = tokens.shape[:2]
    grows = {name.replace("present", "past_key_values", 1) for name in spec.outputs}
    prompt = {**example, "attention_mask": np.ones((batch, sequence), mask.dtype),
              "position_ids": np.tile(np.arange(sequence), (batch, 1)),
              **{n: v[:, :, :0] for n, v in example.items() if n in grows}}
    step = {**example, spec.inputs[0]: tokens[:, :1], "attention_mask": np.ones((batch, TRACE_PAST + 1), mask.dtype),
            "position_ids": np.full((batch, 1), TRACE_PAST)}
    return [prompt, step, *(left_padded(feeds) for feeds in (prompt, step) if feeds["attention_mask"].shape[1] > 1)]


def left_padded(feeds: dict[str, Any]) -> dict[str, Any]:
    """`feeds` with the first half of row 0's positions pads, position_ids as HF's generate() gives them (1 at
    pads): so that the fusions are checked on left-padded batches too."""
    mask = feeds["attention_mask"].copy()
    mask[0, :mask.shape[1] // 2] = 0
    positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)[:, -feeds["position_ids"].shape[1]:]
    return {**feeds, "attention_mask": mask, "position_ids": positions.astype(feeds["position_ids"].dtype)}


def eager_outputs(spec: GraphSpec, inputs: Any = None) -> list[torch.Tensor]:
    """The traced module's own outputs on `inputs` (its trace inputs by default), flattened as the graph
    returns them."""
    with torch.no_grad():
        out = spec.module(*[t.clone() for t in (spec.example if inputs is None else inputs)])
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def use_matmul_nbits(gm: torch.fx.GraphModule) -> int:
    """int4_linear -> int4_matmul_nbits, the weight repacked now into MatMulNBits' layout (ops/int4_matmul_nbits.py):
    ONNX Runtime then runs its 4-bit kernel on the packed weight rather than an fp32 copy it unpacks at session
    start. Same values, so the lossy pass's measured error stands. Returns how many were rewritten."""
    int4 = list(gm.graph.find_nodes(op="call_function", target=torch.ops.mmaccel.int4_linear.default))
    for node in int4:
        x, packed, scale, zero, group, bias, activation, residual = node.args
        repacked = to_matmul_nbits(*(constant_value(gm, n.target) for n in (packed, scale, zero)), group)
        with gm.graph.inserting_before(node):
            b, scales, zero_points = (gm.graph.get_attr(add_constant(gm, f"_nbits_{part}", t))
                                      for part, t in zip(("weight", "scale", "zero"), repacked))
            new = gm.graph.call_function(torch.ops.mmaccel.int4_matmul_nbits.default,
                                         (x, b, scales, zero_points, bias, activation, residual))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    drop_unused_constants(gm)
    gm.recompile()
    return len(int4)


def _replace_folder(staged: str, folder: str, tmp: str) -> None:
    """Move the finished folder into place; an existing one is moved aside first and removed only after."""
    old = None
    if os.path.lexists(folder):
        old = os.path.join(tmp, "previous")
        os.rename(folder, old)
    try:
        os.rename(staged, folder)
    except OSError:
        if old is not None:
            os.rename(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def generation_graphs(model: torch.nn.Module, example: Any, text: Any) -> list[GraphSpec]:
    """The graphs of `model`'s folder: the decoder; LLaVA adds the token embedding and the vision graph,
    Whisper the encoder (ending in the cross-attention K/V)."""
    if _is_whisper(model):
        return _whisper_graphs(model, example)
    if getattr(model.config, "is_encoder_decoder", False):
        raise ExportError(f"export_onnx(generation=True) does not export encoder-decoder models other than "
                          f"Whisper yet ({type(model).__name__})")
    images = [name for name in ("pixel_values", "pixel_values_videos", "image_grid_thw")
              if dict(example.kwargs).get(name) is not None]
    if images and not _is_llava(model):
        # exported as its text decoder alone, the folder would drop the images the example gave, and only
        # onnx_generate would say so ("pixel_values given, but this folder has no vision graph")
        raise ExportError(f"export_onnx(generation=True) exports the vision graph of LLaVA only; "
                          f"{type(model).__name__}'s example holds {images}: drop them to export its text decoder "
                          "alone, or run it with mmaccel.generate")
    sliding = _check_plain_cache(model)
    param = next(model.parameters())
    layers, kv_heads, head_dim = _cache_geometry(model)
    past = [(f"past_key_values.{i}.{kind}", _kv_example(param, kv_heads, TRACE_PAST, head_dim), True)
            for i in range(layers) for kind in ("key", "value")]
    if _is_llava(model):
        embeds = torch.randn(TRACE_BATCH, TRACE_SEQUENCE, text.hidden_size, dtype=param.dtype, device=param.device)
        decoder = _decoder_graph(DecoderWithPast(model, "inputs_embeds"), "inputs_embeds", embeds, past)
        return [replace(decoder, sliding=sliding), _embed_graph(model, param.device),
                _vision_graph(model, example)]
    ids = torch.randint(0, text.vocab_size, (TRACE_BATCH, TRACE_SEQUENCE), device=param.device)
    return [replace(_decoder_graph(DecoderWithPast(model, "input_ids"), "input_ids", ids, past),
                                sliding=sliding)]


def _decoder_graph(module: torch.nn.Module, token_name: str, tokens: torch.Tensor,
                   past: list[tuple[str, torch.Tensor, bool]]) -> GraphSpec:
    """The decoder step's spec. `past`: (input name, example, grows): a growing past (self-attention) has a
    dynamic length and comes back as `present.*`; a fixed one (Whisper's cross-attention K/V) is only read."""
    batch, sequence, past_length = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    mask = torch.ones(TRACE_BATCH, TRACE_PAST + TRACE_SEQUENCE, dtype=torch.long, device=tokens.device)
    positions = torch.arange(TRACE_PAST, TRACE_PAST + TRACE_SEQUENCE, device=tokens.device).repeat(TRACE_BATCH, 1)
    shapes = ({0: batch, 1: sequence}, {0: batch, 1: Dim.DYNAMIC}, {0: batch, 1: sequence},
              tuple({0: batch, 2: past_length} if grows else {0: batch} for _, _, grows in past))
    dims = [{0: "batch_size", 1: "sequence_length"}, {0: "batch_size", 1: "total_sequence_length"},
            {0: "batch_size", 1: "sequence_length"}, *({0: "batch_size", 2: "past_sequence_length"} for _ in past)]
    return GraphSpec("decoder", module, (tokens, mask, positions, *[example for _, example, _ in past]), shapes,
                     [token_name, "attention_mask", "position_ids", *[name for name, _, _ in past]],
                     ["logits", *[name.replace("past_key_values", "present") for name, _, grows in past if grows]],
                     dims)


def _kv_example(param: torch.Tensor, heads: int, length: int, head_dim: int) -> torch.Tensor:
    return torch.randn(TRACE_BATCH, heads, length, head_dim, dtype=param.dtype, device=param.device)


def _embed_graph(model: torch.nn.Module, device: torch.device) -> GraphSpec:
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (TRACE_BATCH, TRACE_SEQUENCE), device=device)
    return GraphSpec("embed", TokenEmbedding(model), (ids,), ({0: Dim("batch_size"), 1: Dim("sequence_length")},),
                     ["input_ids"], ["inputs_embeds"], [{0: "batch_size", 1: "sequence_length"}])


def _vision_graph(model: torch.nn.Module, example: Any) -> GraphSpec:
    """The example's pixel_values fix the image size; the number of images is dynamic (traced with two)."""
    pixels = dict(example.kwargs).get("pixel_values")
    if pixels is None:
        raise ExportError(f"{type(model).__name__}: example_inputs must hold pixel_values (a dict with input_ids "
                          "and pixel_values), which fix the image size of the vision graph")
    pixels = pixels[:1].expand(TRACE_BATCH, *pixels.shape[1:]).contiguous()
    return GraphSpec("vision", ImageFeatures(model), (pixels,), ({0: Dim("num_images")},), ["pixel_values"],
                     ["image_features"], [{0: "num_images"}])


def _whisper_graphs(model: torch.nn.Module, example: Any) -> list[GraphSpec]:
    """Encoder (input_features -> cross-attention K/V per layer) and decoder (self-attention past grows, the
    cross-attention K/V are read). The example's input_features fix the number of frames."""
    features = dict(example.kwargs).get("input_features", example.args[0] if example.args else None)
    if features is None:
        raise ExportError(f"{type(model).__name__}: example_inputs must hold input_features")
    features = features[:1].expand(TRACE_BATCH, *features.shape[1:]).contiguous()
    layers, heads, head_dim = _cache_geometry(model)
    param = next(model.parameters())
    encoder_positions = model.config.max_source_positions
    past = []
    for i in range(layers):
        past += [(f"past_key_values.{i}.decoder.{kind}", _kv_example(param, heads, TRACE_PAST, head_dim), True)
                 for kind in ("key", "value")]
        past += [(f"past_key_values.{i}.encoder.{kind}", _kv_example(param, heads, encoder_positions, head_dim), False)
                 for kind in ("key", "value")]
    cross = [name.replace("past_key_values", "present") for name, _, grows in past if not grows]
    encoder = GraphSpec("encoder", WhisperEncoderCrossKV(model), (features,), ({0: Dim("batch_size")},),
                        ["input_features"], cross, [{0: "batch_size"}])
    ids = torch.randint(0, model.config.vocab_size, (TRACE_BATCH, TRACE_SEQUENCE), device=param.device)
    return [encoder, _decoder_graph(WhisperDecoderWithPast(model), "input_ids", ids, past)]


def name_values(proto: Any, spec: GraphSpec) -> dict[str, Any]:
    """Give the graph's inputs and outputs the spec's names (every reference renamed) and its dynamic dims
    the spec's dim names (torch.onnx names them s0, s1, ...; an output's 's3 + s5' becomes
    'past_sequence_length + sequence_length'). Returns the manifest's inputs and outputs: name, dtype, dims."""
    import onnx

    graph = proto.graph
    renames = {v.name: new for v, new in zip([*graph.input, *graph.output], [*spec.inputs, *spec.outputs])}
    if len(graph.input) != len(spec.inputs) or len(graph.output) != len(spec.outputs):
        raise ExportError(f"graph {spec.name}: the ONNX file has {len(graph.input)} inputs and {len(graph.output)} "
                          f"outputs, the export expects {len(spec.inputs)} and {len(spec.outputs)}")
    symbols: dict[str, str] = {}
    for value, dims in zip(graph.input, spec.dims):
        for index, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and index in dims:
                symbols.setdefault(dim.dim_param, dims[index])
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = renames.get(value.name, value.name)
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = re.sub(r"\w+", lambda m: symbols.get(m.group(0), m.group(0)), dim.dim_param)
    for node in all_nodes(graph):
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]

    def describe(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in tensor.shape.dim]}

    return {"inputs": [describe(v) for v in graph.input], "outputs": [describe(v) for v in graph.output]}


def all_nodes(graph: Any):
    """Every node, those of subgraphs (If/Loop bodies) included: an outer value may be read inside them."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)
            for sub in attr.graphs:
                yield from all_nodes(sub)


def sampling_defaults(gen: Any) -> dict[str, Any]:
    """do_sample, temperature, top_k, top_p, and the logits processors repetition_penalty, suppress_tokens and
    begin_suppress_tokens, as HF's generate() would run this model without arguments: its generation config's
    values, HF's defaults where unset (top_k 50). onnx_generate takes them as its defaults."""
    return {name: default if getattr(gen, name, None) is None else getattr(gen, name)
            for name, default in HF_SAMPLING_DEFAULTS.items()}


def generation_config(model: torch.nn.Module, text: Any) -> dict[str, Any]:
    """What onnx_generate needs besides the graphs: cache geometry, stop and pad ids, dtype, image token,
    Whisper's decoder start token."""
    layers, kv_heads, head_dim = _cache_geometry(model)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = getattr(text, "eos_token_id", None) if eos is None else eos
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    config = {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim,
              "vocab_size": text.vocab_size, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "eos_token_id": [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [int(eos)],
              "pad_token_id": getattr(text, "pad_token_id", None) if pad is None else pad}
    config["sampling"] = sampling_defaults(gen)
    config["penalty_covers_left_padding"] = hf_geometry.penalty_covers_left_padding()  # as the exporting HF does
    if _is_llava(model):
        config["image_token_id"] = model.config.image_token_id
    if _is_whisper(model):
        config["decoder_start_token_id"] = getattr(gen, "decoder_start_token_id", None) or \
            model.config.decoder_start_token_id
    return config


def _text_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generation_config") or not hasattr(model, "get_input_embeddings"):
        raise ExportError(f"export_onnx(generation=True) takes a Hugging Face generating model (a *ForCausalLM or "
                          f"LlavaForConditionalGeneration); {type(model).__name__} is not one")
    return config.get_text_config(decoder=True)


def _cache_geometry(model: torch.nn.Module) -> tuple[int, int, int]:
    """(decoder layers, K/V heads, head dim) of the self-attention cache."""
    config = model.config
    if _is_whisper(model):  # its num_hidden_layers / num_attention_heads name the encoder's
        return config.decoder_layers, config.decoder_attention_heads, config.d_model // config.decoder_attention_heads
    text = config.get_text_config(decoder=True)
    return text.num_hidden_layers, hf_geometry.kv_heads(model, text), getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def _check_plain_cache(model: torch.nn.Module) -> bool:
    """Every layer must be one whose past is keys and values alone. A sliding-window layer is exported as a
    full-attention one, keeping every past position (the decoder builds its cache without the config): the
    window is applied by the model's own sliding-window mask (masking_utils: kv_idx > q_idx - sliding_window,
    from the config), so the past the runtime feeds back stays lined up with the attention mask; transformers'
    own sliding layer drops old positions, which that mask would then misplace (wrong tokens, not an error). The
    past grows past the window: a decoder of window W reads the whole sequence where HF reads W positions.
    Chunked attention (its mask places positions in absolute chunks), multi-head latent attention (keys and values
    of other widths than the past's declared shape) and layers with other state are refused.
    Whether the model has sliding-window layers."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    text = model.config.get_text_config(decoder=True)
    chunked, latent = hf_geometry.chunked_attention(text), hf_geometry.latent_attention(text)
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if chunked or latent or not kinds <= {DynamicLayer.__name__, "DynamicSlidingWindowLayer"}:
        raise ExportError(f"{type(model).__name__}: its cache has {sorted(kinds)} layers"
                          f"{' (chunked attention)' if chunked else ''}"
                          f"{' (multi-head latent attention: keys and values of other widths)' if latent else ''}; "
                          "export_onnx(generation=True) supports full-attention and sliding-window layers only")
    return "DynamicSlidingWindowLayer" in kinds


def _is_whisper(model: torch.nn.Module) -> bool:
    return type(model.config).__name__ == "WhisperConfig"


def _is_llava(model: torch.nn.Module) -> bool:
    return type(model.config).__name__ == "LlavaConfig"


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)
