"""mmaccel.onnx_generate: generation on ONNX Runtime from a folder that export_onnx(..., generation=True) wrote.

    tokens = mmaccel.onnx_generate("llama_onnx/", input_ids, attention_mask, max_new_tokens=32)

numpy and onnxruntime only, no torch and no mmaccel import: this file can be copied beside a folder and run
where neither is installed. The loop is Hugging Face's greedy/sampling generate over the decoder graph: the
prompt (left-padded batches, as HF tokenizers pad for generation) runs with 0 past positions, then one token
per step; the present K/V the decoder returns stay ONNX Runtime values bound as the next step's past (IO
binding: the cache is never copied into numpy). LLaVA folders: the prompt's image placeholders get the vision
graph's features, merged into the token embeddings by position, as LlavaForConditionalGeneration does.
Whisper folders: the encoder graph turns input_features into each layer's cross-attention K/V once; every
decoder step reads them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT, VERSION = "mmaccel-onnx-generation", 1
MANIFEST = "manifest.json"
# A decode step is ~800 short kernels, and ONNX Runtime's workers spin between them by default: where another
# job holds a core, a spinning worker takes the time slices the main thread needs. 125M Llama, 2 threads, the
# process held to one core (as when the other is busy), ms per token, spinning by default / 20 us / never:
# fp32 40.0 / 22.7 / 21.5, int4 13.8 / 7.1 / 6.3; with both cores free 15.4 / 15.3 / 15.8 and 4.3 / 4.4 / 5.3
# (never spinning costs 23% there; 20 us keeps ORT's speed). bench/onnx_spinning.py measures it.
SPIN_US = 20


class ManifestError(ValueError):
    """The folder is not one export's: a missing or unknown manifest, or a graph from another export."""


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0


class OnnxGenerator:
    """One folder's sessions, loaded once; `generate` may be called many times."""

    def __init__(self, folder: str | os.PathLike, providers: list[str] | None = None,
                 intra_op_threads: int | None = None, spin_us: int | None = SPIN_US) -> None:
        """spin_us: how long an idle intra-op worker spins for work before it sleeps (0: never spins; None: ONNX
        Runtime's default spinning)."""
        import onnxruntime as ort

        self.folder = os.fspath(folder)
        self.manifest = load_manifest(self.folder)
        self.config = self.manifest["config"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        for key, value in _spin_entries(spin_us).items():
            options.add_session_config_entry(key, value)
        self.sessions = {}
        for name, entry in self.manifest["graphs"].items():
            session = ort.InferenceSession(os.path.join(self.folder, entry["file"]), options,
                                           providers=providers or ["CPUExecutionProvider"])
            _check_graph(session, name, entry, self.manifest["export_id"])
            self.sessions[name] = session
        self.decoder_inputs = [i["name"] for i in self.manifest["graphs"]["decoder"]["inputs"]]
        self.decoder_outputs = [o["name"] for o in self.manifest["graphs"]["decoder"]["outputs"]]

    def generate(self, input_ids: Any = None, attention_mask: Any = None, pixel_values: Any = None,
                 input_features: Any = None, max_new_tokens: int = 20, sampling: Sampling = Sampling(),
                 seed: int = 0, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None) -> np.ndarray:
        """The prompt followed by the new tokens [B, S + new]; rows that stopped are padded with pad_token_id,
        and generation ends once every row has stopped, as HF's generate. Whisper: the prompt is the decoder's
        (by default decoder_start_token_id per row), the audio `input_features`."""
        ids = self._prompt_ids(input_ids, input_features)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        stop = _ids(self.config["eos_token_id"] if eos_token_id is None else eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self.config.get("pad_token_id")
        pad = (stop[0] if stop else 0) if pad is None else int(pad)
        if max_new_tokens < 1:
            raise ValueError(f"onnx_generate: max_new_tokens must be a positive int, got {max_new_tokens}")
        limit = self.config.get("max_positions")  # the fused decoder's rotary tables end there
        last = int(mask.sum(-1).max()) + max_new_tokens - 2  # the last position a step is fed
        if limit is not None and last >= limit:
            raise ValueError(f"onnx_generate: position {last} is past the {limit} positions of this folder's rotary "
                             "tables (max_position_embeddings); export with portable=True for a decoder without "
                             "that bound")
        rng = np.random.default_rng(seed)
        batch = ids.shape[0]
        # HF's positions for a left-padded prompt: count real tokens; padding positions read 1 (masked anyway)
        positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
        step_input = self._prompt_input(ids, pixel_values)
        past = self._initial_past(batch, input_features)
        done = np.zeros(batch, dtype=bool)
        new_tokens = []
        for _ in range(max_new_tokens):
            logits, present = self._decode(step_input, mask, positions, past)
            past.update(present)
            token = np.where(done, pad, choose_tokens(logits[:, -1, :], sampling, rng))
            new_tokens.append(token)
            if stop:  # np.isin costs ~70 us even with no stop ids (125M Llama: 0.5% of a step)
                done |= np.isin(token, stop)
            if done.all():
                break
            step_input = self._token_input(token[:, None])
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        return np.concatenate([ids, np.stack(new_tokens, axis=1)], axis=1)

    def _decode(self, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                past: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """One decoder run: the last logits as numpy, the present K/V as ONNX Runtime values (no copy), by the
        past input each one feeds next."""
        import onnxruntime as ort

        binding = self.sessions["decoder"].io_binding()
        for name, value in zip(self.decoder_inputs[:3], (tokens, mask, positions)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.decoder_inputs[3:]:
            if isinstance(past[name], ort.OrtValue):
                binding.bind_ortvalue_input(name, past[name])
            else:
                binding.bind_cpu_input(name, past[name])
        for name in self.decoder_outputs:
            binding.bind_output(name, "cpu")
        self.sessions["decoder"].run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), {_past_name(n): v for n, v in zip(self.decoder_outputs[1:], outputs[1:])}

    def _prompt_ids(self, input_ids: Any, input_features: Any) -> np.ndarray:
        if "encoder" not in self.sessions and input_features is not None:
            raise ValueError("onnx_generate: input_features given, but this folder has no encoder graph")
        if "encoder" in self.sessions and input_features is None:
            raise ValueError("onnx_generate: this folder is an encoder-decoder's (Whisper): give input_features")
        if input_ids is None and input_features is not None:
            return np.full((np.shape(input_features)[0], 1), self.config["decoder_start_token_id"], dtype=np.int64)
        if input_ids is None:
            raise ValueError("onnx_generate needs input_ids (the tokenized prompt)")
        return np.asarray(input_ids, dtype=np.int64)

    def _initial_past(self, batch: int, input_features: Any) -> dict[str, Any]:
        """Every past input before the prompt step: no self-attention positions yet; Whisper's cross-attention
        K/V from the encoder graph, read by every step."""
        past = {}
        if "encoder" in self.sessions:
            encoder = self.sessions["encoder"]
            features = np.asarray(input_features, dtype=self.config["dtype"])
            outputs = encoder.run(None, {encoder.get_inputs()[0].name: features})
            past = {_past_name(o.name): value for o, value in zip(encoder.get_outputs(), outputs)}
        empty = np.zeros((batch, self.config["num_kv_heads"], 0, self.config["head_dim"]), dtype=self.config["dtype"])
        return {name: past.get(name, empty) for name in self.decoder_inputs[3:]}

    def _prompt_input(self, ids: np.ndarray, pixel_values: Any) -> np.ndarray:
        """What the decoder's first input takes for the prompt: the ids, or (LLaVA) their embeddings with the
        image features in place of the image placeholders."""
        if "embed" not in self.sessions:
            if pixel_values is not None:
                raise ValueError("onnx_generate: pixel_values given, but this folder has no vision graph")
            return ids
        embeds = self._token_input(ids)
        if pixel_values is None:
            return embeds
        pixels = np.asarray(pixel_values, dtype=self.config["dtype"])
        features = self.sessions["vision"].run(None, {"pixel_values": pixels})[0]
        placeholders = ids == self.config["image_token_id"]
        if placeholders.sum() != features.shape[0] * features.shape[1]:
            raise ValueError(f"onnx_generate: the prompt holds {int(placeholders.sum())} image placeholder tokens (id "
                             f"{self.config['image_token_id']}) for {features.shape[0]} image(s) of "
                             f"{features.shape[1]} features each")
        embeds[placeholders] = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
        return embeds

    def _token_input(self, ids: np.ndarray) -> np.ndarray:
        if "embed" not in self.sessions:
            return ids
        return self.sessions["embed"].run(None, {"input_ids": ids})[0]


def onnx_generate(folder: str | os.PathLike | OnnxGenerator, input_ids: Any = None, attention_mask: Any = None,
                  pixel_values: Any = None, input_features: Any = None, max_new_tokens: int = 20, do_sample: bool = False,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0, seed: int = 0,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """Generate from an exported folder (or an OnnxGenerator, to load the sessions once): greedy, or sampling
    with HF's temperature -> top-k -> top-p order (numpy's generator seeded with `seed`: reproducible, not
    HF's random stream). Inputs are numpy arrays or anything np.asarray takes (CPU torch tensors)."""
    if do_sample and temperature <= 0:
        raise ValueError(f"onnx_generate: temperature must be > 0 when sampling, got {temperature}")
    generator = folder if isinstance(folder, OnnxGenerator) else OnnxGenerator(folder)
    sampling = Sampling(bool(do_sample), float(temperature), int(top_k) if top_k else None, float(top_p))
    return generator.generate(input_ids, attention_mask, pixel_values, input_features, max_new_tokens, sampling,
                              seed, eos_token_id, pad_token_id)


def choose_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> token ids [B]: argmax, or a sample after temperature, top-k and top-p (Gumbel-max)."""
    logits = np.asarray(logits, dtype=np.float32)  # no copy of fp32 logits (32000 of them: ~30 us a step)
    if not sampling.do_sample:
        return logits.argmax(-1)
    scores = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scores.shape[-1]:
        kth = np.partition(scores, -sampling.top_k, axis=-1)[:, -sampling.top_k, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if sampling.top_p < 1.0:
        scores = _top_p(scores, sampling.top_p)
    return (scores + rng.gumbel(size=scores.shape)).argmax(-1)


def _top_p(scores: np.ndarray, top_p: float) -> np.ndarray:
    """As HF's TopPLogitsWarper: drop the least likely tokens whose probabilities sum to at most 1 - top_p,
    always keeping the most likely one."""
    order = np.argsort(scores, axis=-1, kind="stable")
    ascending = np.take_along_axis(scores, order, -1)
    probs = np.exp(ascending - ascending[:, -1:])
    cumulative = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
    drop = cumulative <= 1 - top_p
    drop[:, -1] = False
    dropped = np.zeros_like(drop)
    np.put_along_axis(dropped, order, drop, -1)
    return np.where(dropped, -np.inf, scores)


def load_manifest(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise ManifestError(f"{folder} has no {MANIFEST}: not a folder written by "
                            "mmaccel.export_onnx(..., generation=True)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ManifestError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
                            f"runtime reads {FORMAT!r} version {VERSION}")
    return manifest


def _check_graph(session: Any, name: str, entry: dict[str, Any], export_id: str) -> None:
    """The graph file must be the one the manifest describes: same export, same inputs and outputs."""
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("mmaccel.export_id") != export_id or meta.get("mmaccel.graph") != name:
        raise ManifestError(f"{entry['file']} is graph {meta.get('mmaccel.graph')!r} of export "
                            f"{meta.get('mmaccel.export_id')!r}, but the manifest names graph {name!r} of export "
                            f"{export_id!r}: the folder mixes files of different exports; export it again")
    have = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    want = ([i["name"] for i in entry["inputs"]], [o["name"] for o in entry["outputs"]])
    if have != want:
        raise ManifestError(f"{entry['file']}: inputs/outputs {have} differ from the manifest's {want}")


def _spin_entries(spin_us: int | None) -> dict[str, str]:
    """ONNX Runtime session config entries for `spin_us` (the key spin_duration_us is ONNX Runtime 1.32's)."""
    if spin_us is None:
        return {}
    if spin_us == 0:
        return {"session.intra_op.allow_spinning": "0"}
    return {"session.intra_op.spin_duration_us": str(int(spin_us))}


def _past_name(present: str) -> str:
    """The past input a present output feeds: present.0.key -> past_key_values.0.key (Optimum's names)."""
    return present.replace("present", "past_key_values", 1)


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
