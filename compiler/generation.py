"""mmaccel.generate: Hugging Face generation with the whole decode step compiled.

    tokens = mmaccel.generate(model, **inputs, max_new_tokens=64)          # what model.generate returns

Per call: lengths are padded to buckets (compiler/buckets.py) and the prompt runs through a compiled prefill
graph; then every new token is one step of a compiled decode step: forward over one token, token choice
(compiler/sampling.py), stop check and KV-cache write, all in one static-shape graph. After the first step,
runs of BLOCK_STEPS steps are recorded as one CUDA graph each (compiler/step_graphs.py) and replayed: the host
launches one replay per block and looks at the stop flags after it. The static KV cache of each (batch, cache
bucket, dtype, device) is allocated once per model and reused, so its address (and the recordings that write
it) stays valid across calls.

As gpt-fast's generate.py, with HF's model and cache classes: prefill and decode are separate graphs,
positions are tensors that the step advances itself, and sizes never become symbolic.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..passes.pipeline import asks_for_lossy
from ._torch_internals import recompile_limit_at_least
from .backend import Backend
from .buckets import generation_buckets
from .errors import warn_once
from .hf_geometry import chunked_attention, kv_heads, latent_attention, penalty_covers_left_padding
from .options import CompileOptions
from .report import CompileReport
from .resolution import ImageTokenLever, ResolutionLever, image_tokens_per_image, pareto_table
from .sampling import Sampler, choose_tokens
from .step_graphs import StepGraph, StepGuards, record
from .token_auto import AutoLever
from .token_pruning import PruneLever, image_attention

# A host sync per STOP_CHECK_EVERY tokens to stop once every row has finished: each check waits for the
# device, so checking every token would put back the per-token host round trip this loop removes; 8 tokens
# bound the wasted steps after the last stop token at 7.
STOP_CHECK_EVERY = 8
# Decode steps per recorded block, largest first: full blocks of STOP_CHECK_EVERY (one stop check each), the
# tail of max_new_tokens in the smaller ones, so no step runs as its own call after the first (which compiles).
BLOCK_STEPS = (STOP_CHECK_EVERY, 4, 2, 1)
# Dynamo's per-function recompile limit (8) would send a ninth bucket to uncompiled eager; the bucket set is
# bounded, so allow that many graphs for each of the two step functions.
MAX_GRAPHS_PER_STEP = 64
# Compiles of the steps again after their weights changed (_Session._recompile), per session: each adds a
# backend's graphs to Dynamo's cache for the step functions, which MAX_GRAPHS_PER_STEP bounds.
MAX_WEIGHT_RECOMPILES = 4

_GENERATE_ARGS = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed", "eos_token_id",
                  "pad_token_id", "generation_config", "options", "repetition_penalty", "suppress_tokens",
                  "begin_suppress_tokens"}


@dataclass
class GenerationReport:
    """What mmaccel.generate compiled for one model: each graph's key and why it was new."""
    compile: CompileReport
    graphs: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)  # (kind, key, why new)
    # Speculative decoding's last call (compiler/speculative.py): draft, k used, acceptance rate, tokens/round.
    speculative: dict[str, Any] | None = None
    # tokens="resolution" / "prune" / "auto" (compiler/resolution.py, token_pruning.py, token_auto.py): the
    # setting chosen (side, fraction kept), image tokens kept, measured error, every candidate measured.
    tokens: dict[str, Any] | None = None
    recompiles: int = 0  # times the steps were compiled again because the weights changed
    since: int = 0  # graphs[since:] were compiled by the current backend (after the last recompile)

    @property
    def buckets(self) -> dict[str, list[int]]:
        keys = [k for _, k, _ in self.graphs]
        return {"prompt": sorted({k["prompt"] for k in keys if "prompt" in k}),
                "cache": sorted({k["cache"] for k in keys})}

    def __str__(self) -> str:
        lines = [f"mmaccel.generate: {len(self.graphs)} step graphs ({len(self.compile.graphs)} compiled by "
                 f"mmaccel), buckets {self.buckets}"
                 + (f", compiled again after {self.recompiles} weight change(s)" if self.recompiles else "")]
        lines += [f"  {kind:8} {key}: {why}" for kind, key, why in self.graphs]
        if self.speculative:
            lines.append("  speculative: " + ", ".join(f"{k}={v}" for k, v in self.speculative.items()))
        if self.tokens:
            candidates = self.tokens.get("candidates", [])
            timed = bool(candidates) and "first_token_ms" in candidates[0]
            shown = {k: v for k, v in self.tokens.items() if not (timed and k == "candidates")}
            lines.append("  tokens: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
            lines += ["    " + line for line in pareto_table(candidates).splitlines()] if timed else []
        return "\n".join(lines)


def generate(model: torch.nn.Module, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             **kwargs: Any) -> torch.Tensor:
    """`model.generate(input_ids, attention_mask=..., max_new_tokens=..., ...)` with compiled steps: returns the
    prompt followed by the new tokens, rows that stopped padded with pad_token_id, as HF's generate does.
    Takes HF's greedy/sampling arguments (do_sample, temperature, top_k, top_p; defaults from
    model.generation_config), eos_token_id (an id or a list: generation stops at any of them), pad_token_id,
    seed (sampling), model inputs for the prompt (pixel_values, ...), and options={...} for the mmaccel
    backend (target, ...)."""
    scored = kwargs.pop("_scored", False)  # mmaccel.cascade: (tokens, mean log-probability per row)
    user = {k: kwargs.pop(k) for k in list(kwargs) if k in _GENERATE_ARGS}
    given = dict(kwargs)  # for the fallback: HF's generate() takes the options this call gave as they were
    _max_length_as_new_tokens(model, input_ids, user, kwargs)
    config = _resolve_config(model, user)
    try:
        asked = _uncompiled_options(model, kwargs)
        if asked:
            raise Unsupported(f"{', '.join(asked)} asked for, which mmaccel.generate does not compile (it takes "
                              "greedy and sampling with temperature, top_k, top_p, stop and pad ids)")
        _note_ignored_defaults(model, user.get("generation_config"))
        if getattr(model.config, "is_encoder_decoder", False) and type(model.config).__name__ != "WhisperConfig":
            # Its prompt would be taken as the decoder's and the encoder's input looked for as input_features:
            # BART asked for input_features, T5 failed on a missing max_position_embeddings
            raise Unsupported("encoder-decoder models other than Whisper are not compiled by mmaccel.generate")
        session = _session(model, user.get("options") or {})
        return session.generate(input_ids, attention_mask, kwargs, config, scored)
    except Unsupported as e:
        if scored:
            raise ValueError(f"mmaccel.generate: {type(model).__name__}: {e}") from None
        # Raised before any step ran (checks at the start of a call, or when the cache is made): nothing to undo.
        warn_once(f"mmaccel.generate: {type(model).__name__}: {e}; running the model's own generate() instead "
                  "(uncompiled)")
        hf = {k: v for k, v in user.items() if k not in ("options", "seed")}
        return model.generate(input_ids, attention_mask=attention_mask, **hf, **given)


def _max_length_as_new_tokens(model: torch.nn.Module, input_ids: Any, user: dict[str, Any],
                              kwargs: dict[str, Any]) -> None:
    """HF's max_length (prompt + new tokens) as max_new_tokens, which wins when both are given, as in HF's generate.
    Decoder-only models: an encoder-decoder's max_length counts its decoder's tokens, and stays an option that
    runs HF's generate()."""
    if "max_length" not in kwargs or getattr(model.config, "is_encoder_decoder", False):
        return
    max_length = kwargs.pop("max_length")
    if user.get("max_new_tokens") is not None or max_length is None or not isinstance(input_ids, torch.Tensor):
        return
    new = int(max_length) - input_ids.shape[-1]
    if new < 1:
        raise ValueError(f"mmaccel.generate: max_length={max_length} leaves no new token after the prompt's "
                         f"{input_ids.shape[-1]} tokens; pass max_new_tokens (new tokens alone) instead")
    user["max_new_tokens"] = new


# Hugging Face generation options that leave the tokens as they are (bookkeeping, caches, what a dict output would
# hold); mmaccel.generate's own are _GENERATE_ARGS. Any other GenerationConfig field or generate() argument given
# in a call with a value other than its default (num_beams=2, repetition_penalty, min_new_tokens, a streamer,
# return_dict_in_generate, ...) was passed on to the model's forward, which ignored it: greedy tokens came back
# where beam search was asked for, with no word said.
_NO_EFFECT = {"_from_model_config", "transformers_version", "bos_token_id", "cache_implementation", "cache_config",
              "compile_config", "disable_compile", "use_cache", "low_memory", "max_cache_len", "prefill_chunk_size",
              "output_attentions", "output_hidden_states", "output_scores", "output_logits", "is_assistant",
              "continuous_batching_config", "synced_gpus", "use_model_defaults"}


@functools.lru_cache(maxsize=1)
def _hf_generation_defaults() -> dict[str, Any]:
    """GenerationConfig's fields and generate()'s own arguments (None), at the defaults generate() applies:
    transformers 5 leaves unset fields None and fills them from GenerationConfig._get_default_generation_params()
    (num_beams 1, repetition_penalty 1.0, ...; absent elsewhere, where the fields hold their defaults). Built once
    per process: 2.8 ms on this project's CPU, twice per call before (a Whisper 8+8 call takes 49 ms on the
    H200). Read only."""
    from transformers import GenerationConfig, GenerationMixin

    arguments = set(inspect.signature(GenerationMixin.generate).parameters) - {"self", "inputs", "kwargs"}
    fields = GenerationConfig().to_dict()
    applied = getattr(GenerationConfig, "_get_default_generation_params", dict)()
    return {**{name: None for name in arguments}, **fields, **{k: v for k, v in applied.items() if k in fields}}


def _uncompiled_options(model: torch.nn.Module, kwargs: dict[str, Any]) -> list[str]:
    """Takes HF's generation options, and those of the model's own generate() (Whisper's language, task,
    return_timestamps, prompt_ids, ...: _own_generate_parameters), out of `kwargs` (what is left are model
    inputs); those that change what comes out, as "name=value" (empty: the call can be compiled). The model's own
    stayed in the model inputs before, which the forward ignored: generate(features, language="fr",
    task="translate") came back as untranslated tokens, silently."""
    defaults, own = _hf_generation_defaults(), _own_generate_parameters(type(model))
    asked = []
    for name in [n for n in kwargs if n in defaults or n in own]:
        value = kwargs.pop(name)
        if _changes_tokens(name, value) if name in defaults else value is not None and not _same(value, own[name]):
            asked.append(f"{name}={value!r}"[:80])
    return asked


@functools.lru_cache(maxsize=None)
def _own_generate_parameters(cls: type) -> dict[str, Any]:
    """Name -> default of the parameters only `cls`'s own generate() takes (once per class: off the per-call
    host path)."""
    from transformers import GenerationMixin

    if getattr(cls, "generate", GenerationMixin.generate) is GenerationMixin.generate:
        return {}
    skip = set(_hf_generation_defaults()) | set(inspect.signature(cls.forward).parameters) | _GENERATE_ARGS | {"self"}
    return {name: None if p.default is inspect.Parameter.empty else p.default
            for name, p in inspect.signature(cls.generate).parameters.items()
            if name not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _changes_tokens(name: str, value: Any) -> bool:
    """Whether HF generation option `name` at `value` makes HF's generate() give other tokens than its default."""
    return name not in _NO_EFFECT and value is not None and not _same(value, _hf_generation_defaults()[name])


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - tensors and other objects that do not compare to a bool: a given value
        return a is b


def _note_ignored_defaults(model: torch.nn.Module, config: Any = None) -> None:
    """One warning naming what the generation config (the call's, else the model's) sets that mmaccel.generate
    does not apply (repetition_penalty in many chat models' configs, Whisper's suppress_tokens): HF's generate()
    applies them by default, so the tokens can differ from it."""
    config = config if config is not None else getattr(model, "generation_config", None)
    if config is None or not hasattr(config, "to_diff_dict"):
        return
    ignored = sorted(name for name, value in config.to_diff_dict().items()
                     if name in _hf_generation_defaults() and name not in _GENERATE_ARGS
                     and name not in ("max_length", "decoder_start_token_id") and _changes_tokens(name, value))
    if ignored:
        warn_once(f"mmaccel.generate: {type(model).__name__}'s generation config sets {', '.join(ignored)}, which "
                  "mmaccel.generate does not apply (its tokens can differ from model.generate()'s); pass such "
                  "an option in the call to run the model's own generate() instead")


def generation_report(model: torch.nn.Module, **options: Any) -> GenerationReport:
    """The graphs mmaccel.generate compiled for `model` (with these backend options) so far."""
    return _session(model, options).report


@dataclass(frozen=True)
class _Config:
    max_new_tokens: int
    sampler: Sampler
    temperature: float
    top_p: float
    seed: int
    stop_ids: tuple[int, ...]
    pad_id: int
    # The pad id a missing attention_mask is inferred from (HF's _prepare_attention_mask_for_generation: a pad
    # id given or configured, other than every stop id); None: every position attends
    mask_pad: int | None = None
    # HF's logits processors that the steps apply (sampler.repetition / suppress / begin_suppress say which)
    repetition_penalty: float = 1.0
    suppress_ids: tuple[int, ...] = ()
    begin_suppress_ids: tuple[int, ...] = ()


def _resolve_config(model: torch.nn.Module, user: dict[str, Any]) -> _Config:
    """User arguments over the generation config, as HF's generate() merges them (transformers 5,
    GenerationMixin._prepare_generation_config): an argument given in the call wins, None included (eos_token_id=None:
    no stop id, top_k=None: no top-k); a field it leaves out comes from the call's generation_config, then the
    model's, then the defaults generate() applies (top_k 50 when sampling). Before, a None in the call fell back
    to the config (HF's eos id stopped a row that HF's generate(eos_token_id=None) continues) and top_k stayed
    unset where HF samples from the 50 likeliest."""
    configs = [c for c in (user.get("generation_config"), getattr(model, "generation_config", None)) if c is not None]
    applied = _hf_generation_defaults()

    def get(name: str, fallback: Any = None) -> Any:
        if name in user:
            value = user[name]
        else:
            value = next((v for v in (getattr(c, name, None) for c in configs) if v is not None), applied.get(name))
        return fallback if value is None else value

    max_new = get("max_new_tokens")
    if max_new is None or int(max_new) < 1:
        raise ValueError(f"mmaccel.generate: max_new_tokens must be a positive int, got {max_new!r}")
    eos = get("eos_token_id", ())
    stop_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    pad = get("pad_token_id")
    mask_pad = None if pad is None or int(pad) in stop_ids else int(pad)
    if pad is None:
        pad = stop_ids[0] if stop_ids else 0
    do_sample = bool(get("do_sample", False))
    top_k, top_p = get("top_k"), float(get("top_p", 1.0))
    temperature = float(get("temperature", 1.0))
    if do_sample and temperature <= 0:
        raise ValueError(f"mmaccel.generate: temperature must be > 0 when sampling, got {temperature}")
    penalty = float(get("repetition_penalty", 1.0))
    if penalty <= 0:
        raise ValueError(f"mmaccel.generate: repetition_penalty must be > 0, got {penalty}")
    suppress, begin = (tuple(int(t) for t in get(name, ())) for name in ("suppress_tokens", "begin_suppress_tokens"))
    sampler = Sampler(do_sample, int(top_k) if do_sample and top_k else None, do_sample and top_p < 1.0,
                      penalty != 1.0, bool(suppress), bool(begin))
    return _Config(int(max_new), sampler, temperature, top_p, int(user.get("seed") or 0), stop_ids, int(pad),
                   mask_pad, penalty, suppress, begin)


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _session(model: torch.nn.Module, options: dict[str, Any]) -> "_Session":
    options = _with_weights_default(options)
    key = repr(sorted(options.items()))
    per_model = _SESSIONS.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _Session(model, CompileOptions.from_user(options))
    return per_model[key]


def _token_lever(options: CompileOptions) -> tuple[ImageTokenLever | None, CompileOptions]:
    """tokens="resolution" / "prune" / "auto" rewrite the prompt before the steps (compiler/resolution.py,
    token_pruning.py, token_auto.py), so the steps' own backend compiles losslessly: it gets the options without
    the lever, its metric and its calibration."""
    levers = {"resolution": (ResolutionLever, options.token_sides), "prune": (PruneLever, options.token_keep),
              "auto": (AutoLever, None)}
    if options.tokens not in levers:
        return None, options
    if options.quantize or options.prune:
        raise ValueError(f"mmaccel.generate: tokens={options.tokens!r} is not yet chosen jointly with quantize / "
                         "prune under one accuracy_budget; ask for one of them")
    lever, settings = levers[options.tokens]
    return lever(options.accuracy_budget, options.metric, options.calibration, settings), dataclasses.replace(
        options, tokens=None, token_sides=None, token_keep=None, metric=None, calibration=None)


def _with_weights_default(options: dict[str, Any]) -> dict[str, Any]:
    """A user who quantizes or prunes for generation wants the smaller model: weights="release" unless set. Each
    new bucket of generate is a new graph, rebuilt from the first one's records (compiler/release.py); not with
    both levers, whose MLPs cannot be rebuilt (pruned, then quantized)."""
    if bool(options.get("quantize")) != bool(options.get("prune")) and "weights" not in options:
        return {**options, "weights": "release"}
    return options


class _Session:
    """One model's compiled steps, static caches and report, for one set of backend options."""

    def __init__(self, model: torch.nn.Module, options: CompileOptions) -> None:
        # Weakly: the session is the value of a WeakKeyDictionary keyed by the model, so a strong reference
        # here would keep the model (and its caches) alive forever.
        self._model = weakref.ref(model)
        self.token_lever, options = _token_lever(options)
        self._compile_steps(model, options)
        self.report = GenerationReport(self.backend.report)
        self.caches: dict[tuple, Any] = {}
        self.scores: dict[tuple, torch.Tensor] = {}  # scored calls' running sums, per (batch, device)
        self.constants: dict[tuple, tuple] = {}  # per-call constant tensors by value (see _constants)
        self.blocks: dict[tuple, StepGraph | None] = {}  # recorded decode blocks; None: could not be recorded
        self.step_guards = StepGuards()  # whether decode steps past the first may skip guards (no graph break)
        # Recorded speculative rounds (compiler/speculative.py), per draft session: they hold its addresses.
        self.rounds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.weights_seen: tuple = ()
        # (module table, name, value) of every submodule, parameter and buffer (forget_stale_recordings)
        self.entries: list[tuple[dict, str, Any]] | None = None
        self.cuda_graphs = options.cuda_graphs is not False
        self.limit = _position_limit(model)
        self.forward_args = set(inspect.signature(model.forward).parameters)
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.lossy = asks_for_lossy(options)

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    def _compile_steps(self, model: torch.nn.Module, options: CompileOptions) -> None:
        """The compiled steps, on a backend of their own (Dynamo keeps one set of graphs per backend)."""
        self.backend = Backend(options)
        for lever in self.token_lever.parts() if self.token_lever else ():
            if isinstance(lever, PruneLever):  # its scoring pass runs on every call: compiled as a step
                lever.scorer = torch.compile(image_attention, backend=self.backend, dynamic=False)
        self.backend.guard_model(model)
        self.prefill = torch.compile(_prefill_step, backend=self.backend, dynamic=False)
        self.decode = torch.compile(_decode_step, backend=self.backend, dynamic=False)

    def _recompile(self) -> None:
        """The weights changed since the steps froze them (load_state_dict, a dtype round trip, a replaced
        parameter): compile the steps again on a new backend, so that they run optimized (and quantized or
        pruned, if asked) on the new weights; without this each step warned and ran unfrozen from then on,
        the frozen-weight optimizations (and any quantization) lost. The old graphs are retired (they let go
        of what they froze). Each recompile adds graphs to Dynamo's cache for the step functions, so after
        MAX_WEIGHT_RECOMPILES the steps are left to run unfrozen (weights that change every call, a training
        loop, would recompile every call). Not under weights="release": the released weights cannot be read
        again."""
        options = self.backend.options
        if options.weights == "release":
            return
        if self.report.recompiles >= MAX_WEIGHT_RECOMPILES:
            warn_once(f"mmaccel.generate: the weights changed again after {MAX_WEIGHT_RECOMPILES} recompiles; "
                      "the steps now run unfrozen on the live weights (slower). Weights that change between "
                      "every call are better served by calling the model with generate() uncompiled, or by "
                      "torch._dynamo.reset() and a new mmaccel.generate once they settle.")
            return
        self.backend.retire("the weights changed since compile time: mmaccel.generate compiled the steps again")
        self._compile_steps(self.model, options)
        # the report keeps its history; graphs from here on are the new backend's (_note)
        self.report.compile, self.report.since = self.backend.report, len(self.report.graphs)
        self.report.recompiles += 1

    def prompt_mask(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                    config: _Config) -> torch.Tensor:
        """The prompt's attention mask: the given one, else as HF's generate infers it (a decoder-only prompt's
        pad positions masked when a pad id other than the stop ids is set). No input_ids: Unsupported."""
        if input_ids is None:  # HF starts from inputs_embeds, or from the bos token alone
            raise Unsupported("a prompt given as inputs_embeds, or none, has no input_ids for the compiled steps")
        if attention_mask is not None:
            return attention_mask
        if config.mask_pad is None or self.encoder_decoder:
            return torch.ones_like(input_ids)
        return input_ids.ne(config.mask_pad).long()

    def generate(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                 model_inputs: dict[str, Any], config: _Config, scored: bool = False) -> Any:
        """The tokens; with `scored`, also each row's mean log-probability of its new tokens up to its stop
        token [B] (accumulated by the steps themselves: no second forward)."""
        if self.encoder_decoder:
            input_ids, attention_mask = _decoder_prompt(self.model, model_inputs, input_ids, attention_mask)
        attention_mask = self.prompt_mask(input_ids, attention_mask, config)
        if self.model.training:
            warn_once("mmaccel.generate: the model is in training mode (dropout active); call model.eval()")
        self.forget_stale_recordings()
        ids, mask, model_inputs = self.fewer_image_tokens(input_ids, attention_mask, model_inputs, config)
        prompt, cache_len = generation_buckets(ids.shape[1], config.max_new_tokens, self.limit)
        with torch.no_grad(), recompile_limit_at_least(MAX_GRAPHS_PER_STEP):
            state = self._prefill(ids, mask, model_inputs, config, prompt, cache_len, scored)
            tokens = self._decode(state, config, prompt, cache_len)
        self.note_weights()
        out = torch.cat([input_ids, _trim_after_all_stopped(tokens, config.stop_ids)], dim=1)
        if not scored:
            return out
        return out, state.score[:, 0] / _tokens_until_stop(tokens, config.stop_ids)

    def forget_stale_recordings(self) -> bool:
        """Recorded blocks and rounds hold the weights' addresses and skip the check each compiled step makes
        that its frozen weights are unchanged (compiler/lowering.py): after any weight changed, drop them, and
        compile the steps again (_recompile). True when the weights changed since the last call: recordings
        elsewhere that ran these steps (a target's speculative rounds with this draft) must go too.

        Changed: a parameter, buffer or submodule that its module's table no longer holds (replaced by setattr,
        or put into the table directly as accelerate does), or a weight's version (in-place update) or address
        (.data swapped) moved. The tables' entries are listed once and again only after such a replacement:
        walking model.parameters() and buffers() each call took 0.64 ms on Whisper's 8 + 8 layers (323
        tensors), reading the listed entries ~0.1."""
        moved, seen = self._weights()
        if not moved and seen == self.weights_seen:
            return False
        self.blocks.clear()
        self.rounds.clear()
        if self.weights_seen:  # not the first call: the steps froze other weights
            self._recompile()
        self.weights_seen = seen
        return True

    def _weights(self) -> tuple[bool, tuple]:
        """(whether a table entry was replaced since the last listing, each weight's (version, address))."""
        moved = self.entries is None or any(table.get(name) is not value for table, name, value in self.entries)
        if moved:
            self.entries = [(table, name, value) for m in self.model.modules()
                            for table in (m._modules, m._parameters, m._buffers) for name, value in table.items()]
        return moved, tuple((t._version, t.data_ptr()) for _, _, t in self.entries if isinstance(t, torch.Tensor))

    def note_weights(self) -> None:
        """After a call: the weights its recordings were made with. A first compile moves weights into the
        compiled graphs' storage (weights="share"/"release"), which the next call would otherwise take for a
        change and drop the recordings just made."""
        self.weights_seen = self._weights()[1]

    def fewer_image_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, model_inputs: dict[str, Any],
                           config: _Config) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """tokens="resolution" / "prune": the prompt with fewer image tokens (a shorter prefill and cache): fewer
        placeholders and the image resized to match, or the prompt's embeddings at the kept positions. The
        tokens returned still start with the prompt as the user passed it."""
        if self.token_lever is None:
            return input_ids, attention_mask, model_inputs
        if self.token_lever.timed:  # tokens="auto" times each candidate's first token through the compiled prefill
            self.token_lever.first_token = lambda model, ids, mask, inputs: self.first_token(ids, mask, inputs, config)
        out = self.token_lever.apply(self.model, input_ids, attention_mask, model_inputs, config.pad_id)
        self.report.tokens = self.token_lever.choice.summary() if self.token_lever.choice else None
        return out

    def first_token(self, ids: torch.Tensor, mask: torch.Tensor, model_inputs: dict[str, Any],
                    config: _Config) -> torch.Tensor:
        """The compiled prefill alone on a prompt: its first new token [B, 1] (what a call's first token costs)."""
        prompt, cache_len = generation_buckets(ids.shape[1], config.max_new_tokens, self.limit)
        with torch.no_grad(), recompile_limit_at_least(MAX_GRAPHS_PER_STEP):
            return self._prefill(ids, mask, dict(model_inputs), config, prompt, cache_len).token

    def _prefill(self, input_ids, attention_mask, model_inputs, config, prompt, cache_len,
                 scored: bool = False) -> "_StepState":
        batch, prompt_len = input_ids.shape
        dtype, device = _dtype_device(self.model)
        pad = prompt - prompt_len
        # Left padding to the bucket, masked; the mask covers the whole cache (future positions are excluded by
        # causality, so they can read as 1 from the start and the mask never changes during decode).
        ids = torch.nn.functional.pad(input_ids, (pad, 0), value=config.pad_id)
        mask = torch.nn.functional.pad(attention_mask.to(torch.long), (pad, cache_len - prompt), value=0)
        mask[:, prompt:] = 1
        position_ids = (mask[:, :prompt].cumsum(-1) - 1).masked_fill(mask[:, :prompt] == 0, 1)
        position_ids = position_ids + _POSITION_OFFSET.get(getattr(self.model.config, "model_type", None), 0)
        if getattr(self.model.config, "model_type", None) in _PREFIX_LM:
            model_inputs.setdefault("token_type_ids", torch.zeros_like(input_ids))
        model_inputs = {name: _left_padded(name, value, pad) for name, value in model_inputs.items()}
        cache = self._cache(batch, cache_len, dtype, device)
        sampling, stop_ids, pad_id = self._constants(config, device)
        penalty, suppress_ids, begin_suppress_ids = self._processors(config, device)
        state = _StepState(self.model, cache, mask, sampling, stop_ids, pad_id, config.sampler,
                           "cache_position" in self.forward_args, "logits_to_keep" in self.forward_args,
                           self.encoder_decoder, self.lossy,
                           score=self._score(batch, device) if scored else None, penalty=penalty,
                           suppress_ids=suppress_ids, begin_suppress_ids=begin_suppress_ids)
        if config.sampler.repetition:  # from the prompt as passed: the bucket's own left padding never counts
            state.seen = _seen_in_prompt(input_ids, None if penalty_covers_left_padding() else attention_mask,
                                         _logits_width(self.model))
        self._note("prefill", dict(batch=batch, prompt=prompt, cache=cache_len, dtype=dtype, device=device,
                                   sampler=config.sampler, inputs=sorted(model_inputs)))
        with _image_tokens_checked(self.model, input_ids, model_inputs):
            state.token, state.done, state.encoder_outputs, _ = self.prefill(
                state, ids, position_ids, torch.arange(prompt, device=device), model_inputs)
        state.begin_suppress_ids = None  # the first new token's alone: the decode steps do not read it
        state.position_ids = position_ids[:, -1:] + 1
        # A fill kernel: torch.tensor([prompt], device=cuda) is a blocking copy from the host
        state.cache_position = torch.full((1,), prompt, dtype=torch.long, device=device)
        return state

    def _decode(self, state: "_StepState", config: _Config, prompt: int, cache_len: int) -> torch.Tensor:
        dtype, device = _dtype_device(self.model)
        if config.max_new_tokens > 1:  # one new token comes from the prefill alone
            self._note("decode", dict(batch=state.token.shape[0], cache=cache_len, dtype=dtype, device=device,
                                      sampler=config.sampler))
        tokens, step = [state.token], 1
        blocks: dict[int, StepGraph | None] = {}  # this call's recording per size: its key holds every block
        while step < config.max_new_tokens:
            size = next(n for n in BLOCK_STEPS if n <= config.max_new_tokens - step)
            if step > 1 and size not in blocks:
                blocks[size] = self._block(state, size) if self.cuda_graphs else None
            block = blocks.get(size)
            if block is None:
                if config.stop_ids and step % STOP_CHECK_EVERY == 0 and bool(state.done.all()):
                    break
                # The first step checks every guard; later steps repeat it with the same objects and shapes.
                with self.step_guards.repeat() if step > 1 else self.step_guards.first():
                    state.token, state.done, state.position_ids, state.cache_position, _ = self.decode(
                        state, state.token, state.done, state.position_ids, state.cache_position)
                tokens.append(state.token)
                step += 1
                continue
            tokens.append(block.replay(state_tensors(state)).clone())
            adopt_tensors(state, block.buffers)  # the block left the new state in its buffers
            step += size
            # No stop ids: no row can stop, and the check's host sync leaves the device idle until the next
            # block is launched
            if config.stop_ids and bool(state.done.all()):
                break
        return torch.cat(tokens, dim=1)

    def _block(self, state: "_StepState", size: int) -> StepGraph | None:
        """`size` decode steps as one recording, made on first use for this cache and these per-call inputs."""
        key = (size, id(state.cache), *((tuple(t.shape), t.dtype) for t in state_tensors(state)), state.sampler)
        if key not in self.blocks:
            template = dataclasses.replace(state, model=None)  # no reference to the model from the session

            def run(*buffers: torch.Tensor) -> torch.Tensor:
                steps = with_tensors(template, buffers, self.model)
                token, done, position_ids, cache_position = (steps.token, steps.done, steps.position_ids,
                                                             steps.cache_position)
                out = []
                for _ in range(size):
                    token, done, position_ids, cache_position, _ = self.decode(steps, token, done, position_ids,
                                                                               cache_position)
                    out.append(token)
                for buffer, new in zip((steps.token, steps.done, steps.position_ids, steps.cache_position),
                                       (token, done, position_ids, cache_position)):
                    buffer.copy_(new)
                return torch.cat(out, dim=1)

            self.blocks[key] = record("decode steps", run, state_tensors(state), self.step_guards.repeat)
            # What breaks a capture is the model's code, the same for every block size: stop trying.
            self.cuda_graphs = self.blocks[key] is not None
        return self.blocks[key]

    def _cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> Any:
        key = (batch, length, dtype, device)
        if key not in self.caches:
            self.caches[key] = _static_cache(self.model, batch, length, dtype, device)
        cache = self.caches[key]
        _reset_cache(cache)
        return cache

    def _constants(self, config: _Config, device: torch.device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor,
                                                                        torch.Tensor]:
        """The call's sampling tensors, stop ids and pad id on the device, made once per distinct values: each
        torch.tensor(value, device=cuda) is a blocking copy from the host, and six of them per call were ~2 ms
        of a 5.3 ms Whisper first token (H200, cProfile). The steps only read them (a recorded block copies
        them into its own buffers)."""
        key = (config.temperature, config.top_p, config.seed, config.stop_ids, config.pad_id, device)
        if key not in self.constants:
            if len(self.constants) >= 64:  # a seed per call would otherwise grow this without bound
                self.constants.clear()
            sampling = (torch.tensor(config.temperature, device=device), torch.tensor(config.top_p, device=device),
                        torch.tensor(config.seed, device=device))
            self.constants[key] = (sampling, torch.tensor(config.stop_ids or [-1], device=device),
                                   torch.tensor(config.pad_id, device=device))
        return self.constants[key]

    def _processors(self, config: _Config, device: torch.device) -> tuple[torch.Tensor | None, ...]:
        """(repetition penalty [], suppressed ids [n], ids suppressed at the first new token [m]) on the device,
        each None when the call does not ask for it; made once per distinct values, as _constants."""
        key = ("processors", config.repetition_penalty, config.suppress_ids, config.begin_suppress_ids, device)
        if key not in self.constants:
            self.constants[key] = (
                torch.tensor(config.repetition_penalty, device=device) if config.sampler.repetition else None,
                torch.tensor(config.suppress_ids, device=device) if config.suppress_ids else None,
                torch.tensor(config.begin_suppress_ids, device=device) if config.begin_suppress_ids else None)
        return self.constants[key]

    def _score(self, batch: int, device: torch.device) -> torch.Tensor:
        """A scored call's running sums [B, 1], zeroed: one buffer per (batch, device) and session. The steps
        add to it in place, so a compiled step's CUDA graph (Triton target) holds its address: a new tensor
        per call re-recorded the prefill's graph every call (H200: the cascade's small model took 14-18 ms a
        request scored against 2 ms unscored)."""
        key = (batch, device)
        if key not in self.scores:
            self.scores[key] = torch.zeros(batch, 1, device=device)
        return self.scores[key].zero_()

    def _note(self, kind: str, key: dict[str, Any]) -> None:
        """Record a step graph the first time its key is seen, with the fields that made it new."""
        if key in [k for kd, k, _ in self.report.graphs[self.report.since:] if kd == kind]:
            return
        seen = [k for kd, k, _ in self.report.graphs if kd == kind]
        new = [f"{name}={value}" for name, value in key.items() if all(k.get(name) != value for k in seen)]
        why = "first call" if not seen else "compiled again: the weights changed" if key in seen else \
            "new " + ", ".join(new) if new else "new combination of seen values"
        self.report.graphs.append((kind, key, why))


@dataclass(eq=False)
class _StepState:
    """What the compiled steps read besides the token: the model, its cache and the per-call constants."""
    model: torch.nn.Module
    cache: Any
    mask: torch.Tensor  # [B, cache_len]
    sampling: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # temperature, top_p, seed
    stop_ids: torch.Tensor  # [n_stop]
    pad_id: torch.Tensor  # []
    sampler: Sampler
    pass_cache_position: bool  # transformers < 5.2x takes cache_position; later versions count in the cache
    pass_logits_to_keep: bool
    encoder_decoder: bool  # Whisper: the prompt is the decoder's, the cache an EncoderDecoderCache
    # Lossy options: the steps also return their logits, the float output the lossy passes measure their error
    # on (a step's other outputs are tokens and flags: an int8 model measured 0 error on them, budget unchecked).
    returns_logits: bool
    encoder_outputs: tuple[torch.Tensor] | None = None  # computed by the prefill, read by decode steps
    token: torch.Tensor | None = None  # [B, 1]
    done: torch.Tensor | None = None  # [B, 1] bool
    position_ids: torch.Tensor | None = None  # [B, 1]
    cache_position: torch.Tensor | None = None  # [1]
    # Scored calls (the cascade's confidence): each row's summed log-probability of its chosen tokens [B, 1]
    # (float32), added to in place by every step until the row stops.
    score: torch.Tensor | None = None
    # HF's logits processors (Sampler.repetition / suppress / begin_suppress): the penalty [], the ids each row
    # has seen [B, V] bool (the prompt from its first attended position, as HF's prompt_ignore_length of the left
    # padding, then every chosen token: made before the prefill, updated in place by every step), the suppressed ids
    # [n], and those suppressed at the first new token [m] (the prefill's alone)
    penalty: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    suppress_ids: torch.Tensor | None = None
    begin_suppress_ids: torch.Tensor | None = None


# The _StepState fields that change per call (or per step): what a recorded block copies into its own buffers.
_PER_CALL = ("mask", "sampling", "stop_ids", "pad_id", "encoder_outputs", "score", "penalty", "seen", "suppress_ids",
             "token", "done", "position_ids", "cache_position")


def state_tensors(state: _StepState) -> list[torch.Tensor]:
    """The per-call tensors of `state`, flattened in _PER_CALL order (tuples spread, None skipped)."""
    tensors = []
    for name in _PER_CALL:
        value = getattr(state, name)
        tensors += list(value) if isinstance(value, tuple) else [] if value is None else [value]
    return tensors


def with_tensors(state: _StepState, tensors: Sequence[torch.Tensor], model: torch.nn.Module) -> _StepState:
    """A copy of `state` for `model` whose per-call tensors are `tensors` (state_tensors' order)."""
    copy = dataclasses.replace(state, model=model)
    adopt_tensors(copy, tensors)
    return copy


def adopt_tensors(state: _StepState, tensors: Sequence[torch.Tensor]) -> None:
    """Point `state`'s per-call fields at `tensors` (state_tensors' order), in place."""
    it = iter(tensors)
    for name in _PER_CALL:
        value = getattr(state, name)
        if value is not None:
            setattr(state, name, tuple(next(it) for _ in value) if isinstance(value, tuple) else next(it))


def _forward_logits(state: _StepState, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    cache_position: torch.Tensor, extra: dict[str, Any],
                    logits_to_keep: int = 1) -> tuple[torch.Tensor, Any]:
    """The model over `input_ids` ([B, S]) at `position_ids`, writing the cache: the last `logits_to_keep`
    positions' logits [B, logits_to_keep, V], and the encoder's outputs (encoder-decoder models; else None)."""
    prefix = "decoder_" if state.encoder_decoder else ""
    kwargs = {f"{prefix}input_ids": input_ids, f"{prefix}attention_mask": state.mask,
              f"{prefix}position_ids": position_ids, **extra}
    if "inputs_embeds" in extra:  # tokens="prune": the prompt as its embeddings, the ids only give its shape
        del kwargs["input_ids"]
    if state.encoder_outputs is not None:
        kwargs["encoder_outputs"] = state.encoder_outputs
    if state.pass_cache_position:
        kwargs["cache_position"] = cache_position
    if state.pass_logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    out = state.model(past_key_values=state.cache, use_cache=True, **kwargs)
    encoder_outputs = (out.encoder_last_hidden_state,) if state.encoder_decoder else None
    return out.logits[:, -logits_to_keep:, :].to(torch.float32), encoder_outputs


def _processed(state: _StepState, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """[B, V] logits through HF's processors in HF's order: repetition penalty (a seen token's logit divided by the
    penalty, multiplied where negative), suppressed tokens, and at the first new token its own suppressed ones
    (-inf; the prefill's state alone holds them). Pointwise ops and index fills: they fuse into the step."""
    if seen is not None:
        logits = torch.where(seen, torch.where(logits < 0, logits * state.penalty, logits / state.penalty), logits)
    if state.suppress_ids is not None:
        logits = logits.index_fill(-1, state.suppress_ids, -float("inf"))
    if state.begin_suppress_ids is not None:
        logits = logits.index_fill(-1, state.begin_suppress_ids, -float("inf"))
    return logits


def _logits_width(model: torch.nn.Module) -> int:
    """The size of the model's logits' last dim: its output embedding's rows, else its text config's vocabulary."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.shape[0]
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.vocab_size


def _seen_in_prompt(input_ids: torch.Tensor, mask: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """[B, V] bool: the ids of each row's prompt (as passed, not the bucket's) from its first attended position on
    (HF's repetition penalty leaves the left padding out since transformers 5.23), or all of them when `mask` is
    None (earlier versions)."""
    ids = input_ids if mask is None else input_ids.masked_fill(mask.cumsum(-1) == 0, vocab)  # padding -> past V
    # contiguous: the decode steps' later calls read a recorded block's copy, which must have the same strides
    return torch.zeros(input_ids.shape[0], vocab + 1, dtype=torch.bool, device=input_ids.device).scatter(
        1, ids, True)[:, :vocab].contiguous()


def _choose(state: _StepState, logits: torch.Tensor, step: torch.Tensor, done: torch.Tensor | None,
            seen: torch.Tensor | None = None):
    """Next token [B, 1] (pad once a row is done) and the updated done flags [B, 1]; `seen` (repetition penalty)
    gets the chosen tokens, in place."""
    logits = _processed(state, logits, seen)
    token = choose_tokens(logits, state.sampler, *state.sampling, step)[:, None]
    if state.score is not None:
        chosen = logits.log_softmax(-1).gather(-1, token)
        state.score.add_(chosen if done is None else torch.where(done, 0.0, chosen))
    if done is not None:
        token = torch.where(done, state.pad_id, token)
    if seen is not None:  # HF's input_ids grow by this token (a finished row's pad too)
        seen.scatter_(1, token, True)
    stopped = is_stop(token, state.stop_ids)
    return token, stopped if done is None else done | stopped


def is_stop(token: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """torch.isin(token, stop_ids), for a few stop ids as an OR of equalities: pointwise ops that the Triton
    target fuses into the step's last kernel, where ATen's isin ran four kernels of its own every step (H200,
    Whisper's decode step: fill, compare and two copies, ~4 us of 378)."""
    if stop_ids.shape[0] > 16:
        return torch.isin(token, stop_ids)
    stopped = token == stop_ids[0]
    for i in range(1, stop_ids.shape[0]):
        stopped = stopped | (token == stop_ids[i])
    return stopped


def _prefill_step(state: _StepState, input_ids, position_ids, cache_position, extra):
    logits, encoder_outputs = _forward_logits(state, input_ids, position_ids, cache_position, extra)
    token, done = _choose(state, logits[:, -1], cache_position[-1:], None, state.seen)
    return token, done, encoder_outputs, _measured(state, logits[:, -1])


def _decode_step(state: _StepState, token, done, position_ids, cache_position):
    logits, _ = _forward_logits(state, token, position_ids, cache_position, {})
    token, done = _choose(state, logits[:, -1], cache_position, done, state.seen)
    return token, done, position_ids + 1, cache_position + 1, _measured(state, logits[:, -1])


def _measured(state: _StepState, logits: torch.Tensor) -> torch.Tensor | None:
    return logits if state.returns_logits else None


def _decoder_prompt(model: torch.nn.Module, model_inputs: dict[str, Any], input_ids: torch.Tensor | None,
                    attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encoder-decoder models (Whisper): the first positional input is the encoder's (input_features), the
    decoder's prompt is decoder_input_ids, by default one decoder_start_token_id per row, as HF's generate."""
    if input_ids is not None and input_ids.is_floating_point():
        model_inputs.setdefault("input_features", input_ids)
        input_ids = None
    if "input_features" not in model_inputs:
        raise ValueError(f"mmaccel.generate: {type(model).__name__} needs input_features")
    decoder_ids = model_inputs.pop("decoder_input_ids", None)
    if decoder_ids is None:
        config = model.generation_config
        if getattr(config, "lang_to_id", None) or getattr(config, "forced_decoder_ids", None):
            warn_once(f"mmaccel.generate: {type(model).__name__}'s own generate() starts the decoder with language "
                      "and task tokens (detecting the language when none is given) and a no-timestamps token; "
                      "mmaccel.generate starts it from decoder_start_token_id alone, so its tokens can differ: pass "
                      "decoder_input_ids=[[start, language, task, no-timestamps ids]] for compiled steps that "
                      "match, or language=/task= to run the model's own generate()")
        start = config.decoder_start_token_id
        decoder_ids = torch.full((model_inputs["input_features"].shape[0], 1), start,
                                 device=model_inputs["input_features"].device)
    return decoder_ids, model_inputs.pop("decoder_attention_mask", None)


def _tokens_until_stop(tokens: torch.Tensor, stop_ids: tuple[int, ...]) -> torch.Tensor:
    """[B]: each row's new tokens up to and including its first stop token (all of them if none)."""
    if not stop_ids:
        return torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
    stopped = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device))
    return torch.where(stopped.any(-1), stopped.int().argmax(-1) + 1, tokens.shape[1])


def _trim_after_all_stopped(tokens: torch.Tensor, stop_ids: tuple[int, ...]) -> torch.Tensor:
    """HF's generate stops once every row has produced a stop token: drop the columns after that step (a row
    that never stopped keeps them all)."""
    if not stop_ids:
        return tokens
    return tokens[:, :int(_tokens_until_stop(tokens, stop_ids).max())]


@contextlib.contextmanager
def _image_tokens_checked(model: torch.nn.Module, input_ids: torch.Tensor, model_inputs: dict[str, Any]):
    """transformers checks that the prompt holds one placeholder per image feature with
    torch._check_tensor_all, which Dynamo cannot trace: the prefill would break into pieces around it. For
    LLaVA-style configs (placeholder id, square images in patches) the same check runs here, on the host, once
    per call, and transformers' own is switched off (its documented TRANSFORMERS_DISABLE_TORCH_CHECK) while
    the prefill traces and runs."""
    pixels = model_inputs.get("pixel_values")
    expected = None if pixels is None else image_tokens_per_image(model.config, pixels.shape[-1])
    if expected is None:
        yield
        return
    found = int((input_ids == model.config.image_token_id).sum())
    if found != expected * pixels.shape[0]:
        raise ValueError(f"mmaccel.generate: the prompt holds {found} image placeholder tokens (id "
                         f"{model.config.image_token_id}) for {pixels.shape[0]} image(s) of {expected} features each")
    previous = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"]
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = previous


# Where a model's prepare_inputs_for_generation shifts the positions HF's generate derives from the attention
# mask: PaliGemma's are 1-indexed (modeling_paligemma.py adds 1). Without the shift every rotary angle is off by
# one position and greedy tokens differ from HF eager after a few steps (tiny PaliGemma, 8 tokens).
_POSITION_OFFSET = {"paligemma": 1}
# Per-position inputs a model takes beside input_ids, padded on the left like the prompt: PaliGemma's
# token_type_ids (0: prefix, attended bidirectionally; 1: suffix); padded positions are masked out anyway.
_PER_POSITION_INPUTS = {"token_type_ids": 1}


def _left_padded(name: str, value: Any, pad: int) -> Any:
    """A model input padded on the left like the prompt, if it is per position (else as it is)."""
    if name == "inputs_embeds":  # [B, L, D]
        return torch.nn.functional.pad(value, (0, 0, pad, 0))
    if name in _PER_POSITION_INPUTS:
        return torch.nn.functional.pad(value, (pad, 0), value=_PER_POSITION_INPUTS[name])
    return value


# PaliGemma is a prefix LM: image and prompt attend to each other both ways. Its processor returns
# token_type_ids (all 0 for a prompt) saying so; without them transformers 5.24 attends bidirectionally when
# the attention mask has no padding and causally when it has (tiny PaliGemma: earlier logits move by 1.4 when
# the last prompt token changes, by 0 with padding). mmaccel.generate always passes a padded mask, so it
# supplies the processor's token_type_ids when they are missing: the model's prefix-LM attention.
_PREFIX_LM = ("paligemma",)


def _dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    param = next(model.parameters())
    return param.dtype, param.device


# No limit in the config (ALiBi models, Bloom and MPT, extrapolate to any length): caches are sized by the
# buckets alone, up to this many positions
UNBOUNDED_POSITIONS = 1 << 20


def _position_limit(model: torch.nn.Module) -> int:
    """The longest sequence the model supports, from its (text) config; UNBOUNDED_POSITIONS where the config
    names none (before: a ValueError, so Bloom and MPT could not be used at all)."""
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "max_target_positions", "n_positions", "max_seq_len", "seq_length"):
        if getattr(text, name, None):
            return int(getattr(text, name))
    return UNBOUNDED_POSITIONS


def _static_cache(model: torch.nn.Module, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> Any:
    """A transformers StaticCache of `length` positions, allocated now (not lazily inside the compiled prefill).
    transformers 5 takes (config, max_cache_len) and allocates on first use unless early-initialized; 4.x
    took the batch size, device and dtype in the constructor."""
    from transformers import EncoderDecoderCache, StaticCache
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config

    def allocate(positions: int) -> Any:
        try:
            cache = StaticCache(config=model.config, max_cache_len=positions)
        except TypeError:
            return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=positions, device=device,
                               dtype=dtype)
        _full_length_layers(cache, positions, text)
        heads = kv_heads(model, text)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        cache.early_initialization(batch, heads, head_dim, dtype, device)
        return cache

    if not getattr(model.config, "is_encoder_decoder", False):
        return allocate(length)
    # Cross-attention keys/values: one per encoder output position (Whisper: max_source_positions).
    return EncoderDecoderCache(allocate(length), allocate(model.config.max_source_positions))


class Unsupported(Exception):
    """What mmaccel.generate cannot compile for this model, in words (it falls back to the model's generate())."""


def _full_length_layers(cache: Any, positions: int, text: Any) -> None:
    """Every layer of `cache` a transformers StaticLayer of `positions` slots, whose whole state is tensors.

    The steps run with Dynamo's guards checked only on a call's first step and are replayed from CUDA graphs,
    both of which assume a step is a function of tensors alone. transformers' StaticSlidingWindowLayer (Mistral,
    Gemma 2/3, Qwen2 with a window, ...) is a ring buffer of `sliding_window` slots steered by a Python int
    (cumulative_length_int: which branch runs, the mask's size and offset), so steps past the window ran the branch
    traced before it: a tiny Mistral with an 8-token window gave other tokens than HF from its 17th position,
    Gemma 2 from its 9th, silently. A full-length StaticLayer holds the same keys with the window applied by
    the model's sliding-window mask (masking_utils: kv_idx > q_idx - sliding_window, from the config), which
    the left padding of the prompt bucket does not change: it shifts queries and keys alike. Chunked attention
    (its mask depends on where positions fall in absolute chunks, which that padding moves) and layers with
    other state (linear attention, shared or indexed keys) raise Unsupported, as does multi-head latent attention
    (hf_geometry.latent_attention)."""
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    if latent_attention(text):
        raise Unsupported("its attention caches keys and values of other widths than its heads' (multi-head latent "
                          "attention), which the static cache mmaccel.generate allocates does not hold")
    chunked = chunked_attention(text)
    for i, layer in enumerate(layers):
        if type(layer) is StaticLayer:
            continue
        if type(layer).__name__ == "StaticSlidingWindowLayer" and not chunked:
            layers[i] = StaticLayer(max_cache_len=positions)
            continue
        raise Unsupported(f"its cache layers ({type(layer).__name__}{' (chunked attention)' if chunked else ''}) "
                          "keep state the compiled steps cannot carry")


def _reset_cache(cache: Any) -> None:
    """cache.reset() with the zeroing as one multi-tensor launch per dtype: transformers' StaticLayer.reset zeroes
    keys, values and the length counter one launch each, 48 launches a call for Whisper 8 + 8 and 96 for LLaVA's
    32 layers, each ~5 us of host time on a CUDA device before the prefill can start (H200: the warm first token
    spent 2.8 ms of host work on 2.45 ms of GPU work; cProfile put ~0.6 ms of it in these zero_ calls). Any cache
    or layer class whose reset is not exactly transformers' own (another version, a subclass) gets its own
    reset()."""
    from transformers.cache_utils import Cache, EncoderDecoderCache, StaticLayer

    parts = [cache.self_attention_cache, cache.cross_attention_cache] if type(cache).reset is EncoderDecoderCache.reset \
        else [cache]
    if not all(type(c).reset is Cache.reset and isinstance(getattr(c, "layers", None), list) for c in parts) or not all(
            type(layer).reset is StaticLayer.reset for c in parts for layer in c.layers):
        cache.reset()
        return
    tensors = []
    for layer in (layer for c in parts for layer in c.layers):
        if layer.is_initialized:
            tensors += [layer.keys, layer.values]
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            tensors.append(counter)
        elif counter is not None:
            layer.cumulative_length = 0
    torch._foreach_zero_(tensors)
    for index in getattr(cache, "is_updated", {}):
        cache.is_updated[index] = False
