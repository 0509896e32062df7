"""mmaccel.onnx_generate: generation on ONNX Runtime from a folder that export_onnx(..., generation=True) wrote.

    tokens = mmaccel.onnx_generate("llama_onnx/", input_ids, attention_mask, max_new_tokens=32)

numpy and onnxruntime only, no torch and no mmaccel import: this file can be copied beside a folder and run
where neither is installed. The loop is Hugging Face's greedy/sampling generate over the decoder graph: the
prompt (left-padded batches, as HF tokenizers pad for generation) runs with 0 past positions, then one token
per step. The cache is never copied into numpy (IO binding): a decoder whose attention is ONNX Runtime's
GroupQueryAttention (the default export) keeps it in one buffer per key and value that every step reads and
writes in place (SharedCache); other decoders return their present K/V, which stay ONNX Runtime values bound
as the next step's past (GrowingCache). LLaVA folders: the prompt's image placeholders get the vision
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


# The sampling defaults HF's generate() applies where a generation config leaves a field unset (transformers 5:
# GenerationConfig._get_default_generation_params; earlier versions hold them as the fields' own defaults); the
# export writes the model's own into the manifest (export_generation.sampling_defaults)
HF_SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                        "repetition_penalty": 1.0, "suppress_tokens": None, "begin_suppress_tokens": None}


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    # HF's logits processors, before the choice (as mmaccel.generate's steps apply them: compiler/generation.py)
    repetition_penalty: float = 1.0
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    # The exporting transformers' rule (manifest "penalty_covers_left_padding"): before 5.23 HF penalizes the
    # ids of a prompt's left padding too
    penalty_covers_padding: bool = False


class OnnxGenerator:
    """One folder's sessions, loaded once; `generate` may be called many times."""

    def __init__(self, folder: str | os.PathLike, providers: list[str] | None = None,
                 intra_op_threads: int | None = None, spin_us: int | None = SPIN_US, share_buffer: bool = True,
                 max_length: int | None = None) -> None:
        """spin_us: how long an idle intra-op worker spins for work before it sleeps (0: never spins; None: ONNX
        Runtime's default spinning). share_buffer: one K/V buffer for past and present (SharedCache) where the
        manifest says the decoder takes it; False: the past grows by concatenation every step (GrowingCache).
        max_length: that buffer's positions (prompt + new tokens - 1), as ONNX Runtime GenAI's max_length; a
        call needing more is refused (growing loops too); None: each call's buffer is as long as it needs."""
        import onnxruntime as ort

        self.folder = os.fspath(folder)
        self.share_buffer, self.max_length = share_buffer, max_length
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
        stop = _ids(self.config["eos_token_id"] if eos_token_id is None else eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self.config.get("pad_token_id")
        # No mask: as HF's generate infers it, a decoder-only prompt's pad positions masked (a left-padded row
        # attended to its pads before)
        inferred = pad is not None and int(pad) not in stop and input_features is None
        mask = np.asarray(attention_mask, dtype=np.int64) if attention_mask is not None else \
            (ids != int(pad)).astype(np.int64) if inferred else np.ones_like(ids)
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
        length = ids.shape[1]
        masks = np.ones((batch, length + max_new_tokens - 1), np.int64)  # each step's mask: the first `length`
        masks[:, :length] = mask
        cache = self._cache(masks, input_features)
        done, stopped, stops = np.zeros(batch, dtype=bool), False, set(stop)
        new_tokens = []
        seen = None  # repetition penalty: the ids each row has seen [B, V], its prompt from its first attended id
        processed = sampling.repetition_penalty != 1.0 or sampling.suppress_tokens or sampling.begin_suppress_tokens
        # Each numpy call between two runs costs 10-60 us, not 1-3: the run (~400 MB of fp32 weights streamed)
        # leaves the interpreter's and numpy's code and data out of cache (125M Qwen2, 2 threads: np.where 40 us,
        # the argmax 55, the mask's binding 45). So no call a step does not need: rows that stopped are padded
        # only once one has, and stop ids are checked on the tokens as Python ints (np.isin ~70 us)
        for step in range(max_new_tokens):
            logits = cache.run(step_input, length, positions)[:, -1, :]
            if processed:
                if seen is None and sampling.repetition_penalty != 1.0:
                    seen = np.zeros((batch, logits.shape[-1] + 1), dtype=bool)
                    np.put_along_axis(seen, ids if sampling.penalty_covers_padding else
                                      np.where(np.cumsum(mask, -1) == 0, logits.shape[-1], ids), True, -1)
                    seen = seen[:, :-1]
                logits = _processed(np.asarray(logits, dtype=np.float32), sampling, seen, step == 0)
            token = choose_tokens(logits, sampling, rng)
            if stopped:
                token = np.where(done, pad, token)
            if seen is not None:
                seen[np.arange(batch), token] = True
            new_tokens.append(token)
            if stops:
                hits = [t in stops for t in token.tolist()]
                if any(hits):
                    done |= hits
                    stopped = True
                    if done.all():
                        break
            step_input = self._token_input(token[:, None])
            length += 1
            positions = positions[:, -1:] + 1
        return np.concatenate([ids, np.stack(new_tokens, axis=1)], axis=1)

    def _cache(self, masks: np.ndarray, input_features: Any) -> "SharedCache | GrowingCache":
        """The decoder's K/V for one call whose steps' masks are prefixes of `masks` [B, positions of the last
        step]."""
        session, inputs, outputs = self.sessions["decoder"], self.decoder_inputs, self.decoder_outputs
        batch, length = masks.shape
        if self.max_length is not None and length > self.max_length:
            raise ValueError(f"onnx_generate: the K/V buffer holds max_length={self.max_length} positions; this call "
                             f"needs {length} (prompt + max_new_tokens - 1): ask OnnxGenerator for a larger "
                             "max_length, or for fewer new tokens")
        if not (self.share_buffer and self.config.get("past_present_share_buffer")):
            return GrowingCache(session, inputs, outputs, masks, self._initial_past(batch, input_features))
        shape = (batch, self.config["num_kv_heads"], self.max_length or length, self.config["head_dim"])
        return SharedCache(session, inputs, outputs, masks, shape, np.dtype(self.config["dtype"]))

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
            past = {past_name(o.name): value for o, value in zip(encoder.get_outputs(), outputs)}
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


class GrowingCache:
    """Past K/V that the decoder grows by concatenation (portable files, Whisper's, share_buffer=False): each
    run's present outputs stay ONNX Runtime values (never copied into numpy), bound as the next run's past."""

    def __init__(self, session: Any, inputs: list[str], outputs: list[str], masks: np.ndarray,
                 past: dict[str, Any]) -> None:
        self.session, self.inputs, self.outputs, self.masks, self.past = session, inputs, outputs, masks, past

    def run(self, tokens: np.ndarray, length: int, positions: np.ndarray) -> np.ndarray:
        """One decoder run attending to `length` positions (its mask: the first `length` of masks'): its logits
        [B, S, V]."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in zip(self.inputs[:3], (tokens, self.masks[:, :length], positions)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.inputs[3:]:
            if isinstance(self.past[name], ort.OrtValue):
                binding.bind_ortvalue_input(name, self.past[name])
            else:
                binding.bind_cpu_input(name, self.past[name])
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past.update({past_name(n): v for n, v in zip(self.outputs[1:], outputs[1:])})
        return outputs[0].numpy()


class SharedCache:
    """The decoder's K/V in one buffer per layer's key and value, `shape` [B, kv heads, positions, head dim],
    bound once as both the past input and the present output: GroupQueryAttention then writes each run's new
    positions in place (ONNX Runtime's past_present_share_buffer mode, taken when the two are the same memory),
    so no step concatenates or copies the cache; a step's token, position and logits are buffers bound once
    too, and only its mask is bound anew: for one row, an ONNX Runtime value made before the loop on that
    prefix of `masks` (binding it costs ~30 us a step after a run where a numpy mask's costs ~45, mostly cache
    misses: onnx_generate's loop), for several a copy of the prefix each step. ONNX Runtime GenAI's loop runs
    its builder's decoders so on CPU.
    Only for decoders whose every present is a GroupQueryAttention's output, checked at export (the manifest's
    past_present_share_buffer; compiler/onnx_fusions.py).
    125M Llama, 2 threads (bench/onnx_fusion_peers.py, interleaved rounds): 0.15 ms per token outside ONNX
    Runtime's run where GrowingCache spends 0.44 (fp32; int4 0.09 against 0.41), and 4% less per token in all
    in fp32 (13.22 against 13.53 ms), 15% in int4 (2.28 against 2.68)."""

    def __init__(self, session: Any, inputs: list[str], outputs: list[str], masks: np.ndarray,
                 shape: tuple[int, ...], dtype: np.dtype) -> None:
        import onnxruntime as ort

        self.session, self.inputs, self.logits_name, self.masks = session, inputs[:3], outputs[0], masks
        self.mask_values: dict[int, Any] = {}  # length -> the prefix of one row's masks as an ONNX Runtime value
        self.binding = session.io_binding()
        self.binding.bind_output(outputs[0], "cpu")  # first: the prompt's logits are get_outputs()[0]
        self.buffers = {past_name(name): np.zeros(shape, dtype) for name in outputs[1:]}
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(buffer) for name, buffer in self.buffers.items()}
        for name in outputs[1:]:
            self.binding.bind_ortvalue_input(past_name(name), self.values[past_name(name)])
            self.binding.bind_ortvalue_output(name, self.values[past_name(name)])
        self.step: dict[str, np.ndarray] | None = None  # after the prompt: one token per row, bound once
        self.step_values: dict[str, Any] = {}  # their ONNX Runtime values, which the binding reads

    def run(self, tokens: np.ndarray, length: int, positions: np.ndarray) -> np.ndarray:
        """One decoder run attending to `length` positions: its logits [B, S, V]. After the first run (the
        prompt), the token and position are written into buffers bound once, only the mask (one position longer
        each step) is bound anew, and the logits returned are a buffer the next run overwrites."""
        if self.step is None:
            return self._prompt(tokens, length, positions)
        self.step["tokens"][...] = tokens
        self.step["positions"][...] = positions
        mask = self.mask_values.get(length)
        if mask is None:
            self.binding.bind_cpu_input(self.inputs[1], np.ascontiguousarray(self.masks[:, :length]))
        else:
            self.binding.bind_ortvalue_input(self.inputs[1], mask)
        self.session.run_with_iobinding(self.binding)
        return self.step["logits"]

    def _prompt(self, tokens: np.ndarray, length: int, positions: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        if len(self.masks) == 1:  # each step's mask a contiguous prefix of the row: values on it, no copies
            self.mask_values = {n: ort.OrtValue.ortvalue_from_numpy(self.masks[:, :n])
                                for n in range(length + 1, self.masks.shape[1] + 1)}
        for name, value in zip(self.inputs, (tokens, self.masks[:, :length], positions)):
            self.binding.bind_cpu_input(name, np.ascontiguousarray(value))
        self.session.run_with_iobinding(self.binding)
        logits = self.binding.get_outputs()[0].numpy()
        self.step = {"tokens": np.empty_like(tokens[:, -1:]), "positions": np.empty_like(positions[:, -1:]),
                     "logits": np.empty((logits.shape[0], 1, logits.shape[2]), logits.dtype)}
        self.step_values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in self.step.items()}
        self.binding.bind_ortvalue_input(self.inputs[0], self.step_values["tokens"])
        self.binding.bind_ortvalue_input(self.inputs[2], self.step_values["positions"])
        self.binding.bind_ortvalue_output(self.logits_name, self.step_values["logits"])
        return logits


def onnx_generate(folder: str | os.PathLike | OnnxGenerator, input_ids: Any = None, attention_mask: Any = None,
                  pixel_values: Any = None, input_features: Any = None, max_new_tokens: int = 20,
                  do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, eos_token_id: int | list[int] | None = None,
                  pad_token_id: int | None = None, repetition_penalty: float | None = None,
                  suppress_tokens: list[int] | None = None, begin_suppress_tokens: list[int] | None = None
                  ) -> np.ndarray:
    """Generate from an exported folder (or an OnnxGenerator, to load the sessions once): greedy, or sampling
    with HF's temperature -> top-k -> top-p order (numpy's generator seeded with `seed`: reproducible, not
    HF's random stream). Inputs are numpy arrays or anything np.asarray takes (CPU torch tensors).
    do_sample, temperature, top_k and top_p left at None are the exported model's, as HF's generate() samples it
    (its generation config, else HF's defaults: top_k 50; before, sampling used every token); top_k=0: no top-k.
    repetition_penalty, suppress_tokens and begin_suppress_tokens likewise (a chat model's configured penalty,
    Whisper's suppressed ids), applied as HF's processors; before, the configured ones were ignored, silently.
    No attention_mask: the pad id's positions are masked as HF infers it (a pad id other than the stop ids)."""
    generator = folder if isinstance(folder, OnnxGenerator) else OnnxGenerator(folder)
    folder_defaults = {**HF_SAMPLING_DEFAULTS, **generator.config.get("sampling", {})}
    do_sample = folder_defaults["do_sample"] if do_sample is None else do_sample
    temperature = float(folder_defaults["temperature"] if temperature is None else temperature)
    top_k = folder_defaults["top_k"] if top_k is None else top_k
    top_p = float(folder_defaults["top_p"] if top_p is None else top_p)
    if do_sample and temperature <= 0:
        raise ValueError(f"onnx_generate: temperature must be > 0 when sampling, got {temperature}")
    penalty = float(folder_defaults["repetition_penalty"] if repetition_penalty is None else repetition_penalty)
    if penalty <= 0:
        raise ValueError(f"onnx_generate: repetition_penalty must be > 0, got {penalty}")
    suppress, begin = (tuple(int(t) for t in (folder_defaults[name] if given is None else given) or ())
                       for name, given in (("suppress_tokens", suppress_tokens),
                                           ("begin_suppress_tokens", begin_suppress_tokens)))
    sampling = Sampling(bool(do_sample), temperature, int(top_k) if top_k else None, top_p, penalty, suppress, begin,
                        bool(generator.config.get("penalty_covers_left_padding", False)))
    return generator.generate(input_ids, attention_mask, pixel_values, input_features, max_new_tokens, sampling,
                              seed, eos_token_id, pad_token_id)


def _processed(logits: np.ndarray, sampling: Sampling, seen: np.ndarray | None, first: bool) -> np.ndarray:
    """[B, V] logits through HF's processors in HF's order: repetition penalty (a seen id's logit divided by the
    penalty, multiplied where negative), suppressed ids, and at the first new token its own suppressed ids."""
    if seen is not None:
        p = sampling.repetition_penalty
        logits = np.where(seen, np.where(logits < 0, logits * p, logits / p), logits)
    dropped = list(sampling.suppress_tokens) + (list(sampling.begin_suppress_tokens) if first else [])
    if dropped:
        logits = logits.copy()
        logits[:, dropped] = -np.inf
    return logits


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


def past_name(present: str) -> str:
    """The past input a present output feeds: present.0.key -> past_key_values.0.key (Optimum's names)."""
    return present.replace("present", "past_key_values", 1)


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
