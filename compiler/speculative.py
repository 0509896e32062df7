"""Speculative decoding on mmaccel.generate's compiled steps (Leviathan et al., 2023, "Fast Inference from
Transformers via Speculative Decoding"; Chen et al., 2023, "speculative sampling").

    tokens = mmaccel.generate(model, **inputs, max_new_tokens=64, draft="layers:2", speculative_k=4)

A round: the draft proposes k tokens, one compiled draft step each; the target reads its current token and the
k proposals in one compiled verify step over k+1 positions of its static cache; the longest prefix the target
accepts is kept, plus one token of the target's own (the correction at the first rejection, or a bonus token
when all k were accepted). Nothing is copied to roll back: every step sets its cache's write position from its
own position tensor, so entries past the accepted length are overwritten by the next round, and the mask (over
the whole cache, causal) never changes. All steps have static shapes (one verify graph per k), so the Triton
target replays them from CUDA graphs. A batch advances by its shortest accepted prefix (one position tensor for
all rows); a row that accepted more emits its own proposal there, which the target accepted.

Greedy: a proposal is accepted when it is the target's argmax, so the tokens are plain greedy decoding's.
Sampling: a proposal x is accepted with probability min(1, p(x)/q(x)), a rejection draws from
norm(max(0, p - q)) (p, q: the target's and the draft's distributions after temperature, top-k and top-p), so
every token is distributed as plain sampling's. The noise is sampling.py's hash of (seed, stream, draw counter,
row, column): a different draw from plain sampling with the same seed, from the same distribution.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import generation
from ._torch_internals import recompile_limit_at_least
from .drafts import draft_name, layers_shared_with_target, resolve_draft, step_cost_ratio
from .errors import warn_once
from .sampling import gumbel_noise, uniform_noise, warp_scores
from .step_graphs import StepGraph, StepGuards, record

# speculative_k="auto" picks, each round, the k of this set with the most expected tokens per unit of step
# cost: 2..8 spans the best k for acceptance rates 0.5..0.9 at draft costs of 5-30% of the target's.
# Each k is one verify graph: a larger set costs compile time (and CUDA-graph memory) for little gain.
K_CHOICES = (2, 4, 8)
# Acceptance counts decay by this factor per round, so "auto" follows a text whose difficulty changes
# (the estimate weighs about the last 10 rounds).
ACCEPTANCE_DECAY = 0.9
# Noise streams: the draft's proposals, the acceptance tests and the target's corrections draw at the same
# counter; plain sampling is stream 0.
DRAFT_STREAM, ACCEPT_STREAM, CORRECTION_STREAM = 1, 2, 3


class DraftFailed(RuntimeError):
    """The draft raised: mmaccel.generate decodes without it (one warning, the target's own tokens)."""


def generate(model: torch.nn.Module, input_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, *, draft: Any = None,
             speculative_k: int | str | None = None, **kwargs: Any) -> torch.Tensor:
    """mmaccel.generate (compiler/generation.py). With `draft`, speculative decoding: draft is a small causal
    LM with the target's vocabulary on its device, "layers:N" (the target's first N decoder layers, final norm
    and LM head, sharing its weights and cache), "quantized:int4_weight_only" (also int8_weight_only, fp8: the
    target quantized by passes/quantize.py, its own cache) or "pruned:F[+SCHEME]" (compiler/drafts.py);
    speculative_k is the number of tokens proposed per round, an int >= 1 (default 4), or "auto" (chosen each
    round among K_CHOICES from the measured acceptance rate). The report (mmaccel.generation_report) gives the
    acceptance rate and the k used."""
    if draft is None:
        if speculative_k is not None:
            raise ValueError("mmaccel.generate: speculative_k needs a draft (draft=small_model or 'layers:N')")
        return generation.generate(model, input_ids, attention_mask, **kwargs)
    choices = _k_choices(4 if speculative_k is None else speculative_k)
    # HF generate() options the steps do not compile (num_beams, repetition_penalty, Whisper's language, ...):
    # with a draft they reached the forward, which ignored them (greedy tokens where beams were asked for).
    # mmaccel.generate runs the model's own generate() for them, with one warning naming them.
    probe = {k: v for k, v in kwargs.items() if k not in generation._GENERATE_ARGS and k != "max_length"}
    if generation._uncompiled_options(model, probe) or \
            (input_ids is None and not getattr(model.config, "is_encoder_decoder", False)):  # inputs_embeds alone
        return generation.generate(model, input_ids, attention_mask, **kwargs)
    draft_model, draft_options = resolve_draft(model, draft)
    user = {k: kwargs.pop(k) for k in list(kwargs) if k in generation._GENERATE_ARGS}
    config = generation._resolve_config(model, user)
    if config.sampler.repetition or config.sampler.suppress or config.sampler.begin_suppress:
        # The rounds verify the draft's proposals against the target's unprocessed distribution
        warn_once("mmaccel.generate: speculative decoding does not apply repetition_penalty, suppress_tokens or "
                  "begin_suppress_tokens yet (set in the call or the generation config); decoding without the draft")
        return generation.generate(model, input_ids, attention_mask, **user, **kwargs)
    options = user.get("options") or {}
    target = generation._session(model, options)
    policy = _KPolicy(choices, step_cost_ratio(draft_model, model, draft_options))
    draft_session = generation._session(draft_model, {**options, **draft_options})
    speculation = _Speculation(target, draft_session, policy, draft_name(draft))
    try:
        return speculation.generate(input_ids, attention_mask, kwargs, config)
    except DraftFailed as failure:
        warn_once(f"mmaccel.generate: the draft failed ({failure.__cause__!r}); decoding without it")
        return target.generate(input_ids, attention_mask, kwargs, config)


def _k_choices(speculative_k: int | str) -> tuple[int, ...]:
    if speculative_k == "auto":
        return K_CHOICES
    if isinstance(speculative_k, bool) or not isinstance(speculative_k, int) or speculative_k < 1:
        raise ValueError(f"mmaccel.generate: speculative_k must be an int >= 1 or 'auto', got {speculative_k!r}")
    return (speculative_k,)


@dataclass
class _Recorded:
    """A draft's recorded rounds in the target's session: the k that ran once uncaptured (compiled, kernels
    chosen: ready to record), and the recordings by key (None: could not be recorded)."""
    warm: set[int] = field(default_factory=set)
    graphs: dict[tuple, StepGraph | None] = field(default_factory=dict)


@dataclass
class _KPolicy:
    """k per round, and what was accepted: the counts behind the report's acceptance rate."""
    choices: tuple[int, ...]
    draft_cost: float  # a draft step's time over a target step's (drafts.step_cost_ratio)
    accepted: float = 1.0  # decayed counts; the prior, one of each, is an acceptance rate of 0.5
    rejected: float = 1.0
    totals: dict[str, float] = field(default_factory=lambda: {"rounds": 0, "proposed": 0, "accepted": 0,
                                                               "row_accepted": 0})
    k_used: dict[int, int] = field(default_factory=dict)

    def next_k(self) -> int:
        """The k with the most expected tokens per round (Leviathan et al., eq. 1) per unit of cost: k draft
        steps plus one verify step, which costs one target step while decoding is bound by weight reads."""
        rate = self.accepted / (self.accepted + self.rejected)
        return max(self.choices, key=lambda k: _expected_tokens(rate, k) / (1 + k * self.draft_cost))

    def record(self, k: int, accepted: int, row_accepted: float) -> None:
        """`accepted`: the tokens the batch kept (its rows' minimum); `row_accepted`: the rows' mean."""
        self.accepted = ACCEPTANCE_DECAY * self.accepted + accepted
        self.rejected = ACCEPTANCE_DECAY * self.rejected + (accepted < k)
        self.totals["rounds"] += 1
        self.totals["proposed"] += k
        self.totals["accepted"] += accepted
        self.totals["row_accepted"] += row_accepted
        self.k_used[k] = self.k_used.get(k, 0) + 1

    def summary(self, draft: str, tokens: int) -> dict[str, Any]:
        rounds, proposed = max(self.totals["rounds"], 1), max(self.totals["proposed"], 1)
        return {"draft": draft, "k": dict(sorted(self.k_used.items())),
                "acceptance_rate": round(self.totals["accepted"] / proposed, 3),
                "row_acceptance_rate": round(self.totals["row_accepted"] / proposed, 3),
                "tokens_per_round": round(tokens / rounds, 2), "rounds": self.totals["rounds"]}


def _expected_tokens(rate: float, k: int) -> float:
    return float(k + 1) if rate >= 1 else (1 - rate ** (k + 1)) / (1 - rate)


# session's backend -> {step name: compiled step}: a session compiled again after a weight change has a new backend
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(session: Any, step: Any) -> Any:
    per_backend = _COMPILED.setdefault(session.backend, {})
    if step.__name__ not in per_backend:
        per_backend[step.__name__] = torch.compile(step, backend=session.backend, dynamic=False)
    return per_backend[step.__name__]


class _Speculation:
    """One speculative generate call: the target's and the draft's sessions (compiler/generation.py), their
    prefills, then rounds of draft steps and one verify step."""

    def __init__(self, target: Any, draft: Any, policy: _KPolicy, draft_name: str) -> None:
        self.target, self.draft, self.policy, self.draft_name = target, draft, policy, draft_name
        self.checked: set[int] = set()  # the k whose graphs ran once with all guards checked
        self.guards = StepGuards()  # whether rounds past a k's first may skip guards (no graph break)
        self.graphs: dict[int, StepGraph | None] = {}  # this call's round recording per k (None: uncaptured)
        self.draw: torch.Tensor | None = None  # the noise draw counter, on the device
        self.shared_layers = layers_shared_with_target(draft.model)

    def generate(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                 model_inputs: dict[str, Any], config: Any) -> torch.Tensor:
        attention_mask = self.target.prompt_mask(input_ids, attention_mask, config)
        self.target.forget_stale_recordings()
        if self.draft.forget_stale_recordings():
            self.target.rounds.pop(self.draft, None)
        ids, mask, model_inputs = self.target.fewer_image_tokens(input_ids, attention_mask, model_inputs, config)
        prompt, cache_len = self._buckets(ids.shape[1], config.max_new_tokens)
        with torch.no_grad(), recompile_limit_at_least(generation.MAX_GRAPHS_PER_STEP):
            state = self.target._prefill(ids, mask, model_inputs, config, prompt, cache_len)
            draft_state = self._draft_prefill(state, ids, mask, model_inputs, config, prompt, cache_len)
            tokens = self._rounds(state, draft_state, config.max_new_tokens, cache_len)
        self.target.note_weights()
        self.draft.note_weights()
        # The tokens the rounds added (the first came from the prefill).
        self.target.report.speculative = self.policy.summary(self.draft_name, tokens.shape[1] - 1)
        tokens = generation._trim_after_all_stopped(tokens[:, :config.max_new_tokens], config.stop_ids)
        return torch.cat([input_ids, tokens], dim=1)

    def _buckets(self, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
        """A verify step writes up to k positions past the last token kept: the cache holds k more."""
        room = max(self.policy.choices)
        if prompt_len + max_new_tokens + room > self.target.limit:
            raise ValueError(f"mmaccel.generate: a prompt of {prompt_len} positions + max_new_tokens="
                             f"{max_new_tokens} + speculative_k={room} positions of room for the proposals is "
                             f"past the model's limit of {self.target.limit} (config.max_position_embeddings); "
                             "lower max_new_tokens or speculative_k")
        return generation.generation_buckets(prompt_len, max_new_tokens + room, self.target.limit)

    def _draft_prefill(self, state: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       model_inputs: dict[str, Any], config: Any, prompt: int, cache_len: int) -> Any:
        """The draft's step state. A draft of the target's first N layers reads and writes the target's first N
        cache layers (drafts.py says why that is exact), which the target's prefill has filled."""
        if self.shared_layers:
            return _shared_draft_state(state, self.draft.model, self.shared_layers)
        if "inputs_embeds" in model_inputs:
            raise ValueError("mmaccel.generate: tokens='prune' (or 'auto', having chosen it) gives the target its "
                             "prompt as embeddings, which a separate draft model cannot read; use draft='layers:N' "
                             "or no draft")
        draft_inputs = {k: v for k, v in model_inputs.items() if k in self.draft.forward_args}
        with _draft_failures():
            return self.draft._prefill(input_ids, attention_mask, draft_inputs, config, prompt, cache_len)

    def _rounds(self, state: Any, draft_state: Any, max_new_tokens: int, cache_len: int) -> torch.Tensor:
        """Rounds until max_new_tokens or every row stopped. The next round is launched before this one's counts
        are read when it is needed whatever this one accepts, so the GPU runs it while the host books this one
        (its sync, slicing and k choice no longer leave the GPU idle). It starts from this round's state on the
        device and writes no further than a round launched after the read would: no extra cache room."""
        tokens, produced = [state.token], 1
        self.draw = torch.zeros(1, dtype=torch.long, device=state.token.device)
        flight = self._launch(state, draft_state, cache_len) if produced < max_new_tokens else None
        while flight is not None:
            following = self._launch(state, draft_state, cache_len) \
                if produced + flight.k + 1 < max_new_tokens else None
            accepted, all_done, row_accepted = flight.counts()
            tokens.append(flight.emitted[:, :accepted + 1])
            produced += accepted + 1
            self.policy.record(flight.k, accepted, row_accepted / state.token.shape[0])
            if all_done:
                break  # a round launched meanwhile wrote past the stop token only: its tokens are dropped
            if following is None and produced < max_new_tokens:
                following = self._launch(state, draft_state, cache_len)
            flight = following
        return torch.cat(tokens, dim=1)

    def _launch(self, state: Any, draft_state: Any, cache_len: int) -> "_Round":
        """Queue one round (recorded, or uncaptured on its k's first use); `state` and self.draw then hold the
        next round's inputs, on the device."""
        k = self.policy.next_k()
        if k not in self.graphs:
            self._note(state, k, cache_len)
            self.graphs[k] = self._recorded_round(state, draft_state, k)
        graph = self.graphs[k]
        if graph is None:
            with self.guards.repeat() if k in self.checked else self.guards.first():
                emitted, counts, *advanced = self._round(state, draft_state, k, self.draw)
            self.checked.add(k)
            state.token, state.position_ids, state.cache_position, state.done, self.draw = advanced
            return _Round(k, emitted, counts)
        emitted, counts = graph.replay(self._round_inputs(state, draft_state, self.draw))
        # The round left the next state in its buffers: point the states at them (no copies next time).
        width = len(generation.state_tensors(state))
        generation.adopt_tensors(state, graph.buffers[:width])
        if not self.shared_layers:
            generation.adopt_tensors(draft_state, graph.buffers[width:-1])
        self.draw = graph.buffers[-1]
        return _Round(k, emitted.clone(), counts.clone())  # the next replay overwrites the recording's outputs

    def _round_inputs(self, state: Any, draft_state: Any, draw: torch.Tensor) -> list[torch.Tensor]:
        """What a recorded round reads: the target's per-call tensors, the draft's (a draft with its own cache,
        whose mask and sampling tensors are its own), the draw counter."""
        draft = [] if self.shared_layers else generation.state_tensors(draft_state)
        return [*generation.state_tensors(state), *draft, draw]

    def _round(self, state: Any, draft_state: Any, k: int, draw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """k draft steps and one verify step, all on the device: the tokens to emit [B, k+1], [accepted, all rows
        done, accepted summed over rows], then the next round's token [B, 1], position_ids, cache_position, done
        flags and draw counter. A draft with its own cache also reads the last proposal, so that cache is full up
        to it when all k are accepted (otherwise the next round overwrites that entry: nothing to roll back)."""
        proposals, distributions = [state.token], []
        position_ids, cache_position = state.position_ids, state.cache_position
        with _draft_failures():
            for _ in range(k):
                token, q, position_ids, cache_position, draw, _ = self.draft_step(
                    draft_state, proposals[-1], position_ids, cache_position, draw)
                proposals.append(token)
                distributions.append(q)
            if not self.shared_layers:
                draw = self.draft_step(draft_state, proposals[-1], position_ids, cache_position, draw)[4]
        q = torch.stack(distributions, dim=1) if state.sampler.do_sample else None  # [B, k, V]
        emitted, counts, done, draw, _ = self.verify(state, torch.cat(proposals, dim=1), q, state.done,
                                                     state.position_ids, state.cache_position, draw)
        advance = counts[0] + 1
        token = emitted.gather(1, counts[:1, None].expand(emitted.shape[0], 1))  # emitted[:, accepted]
        return (emitted, counts, token, state.position_ids + advance, state.cache_position + advance, done,
                draw)

    @property
    def verify(self) -> Any:  # looked up per use: generate() may compile the sessions' steps again first
        return _compiled(self.target, _verify_step)

    @property
    def draft_step(self) -> Any:
        return _compiled(self.draft, _draft_step)

    def _recorded_round(self, state: Any, draft_state: Any, k: int) -> StepGraph | None:
        """The round for k as one recording (compiler/step_graphs.py), made once that k ran uncaptured (compiled,
        kernels chosen) with this draft. Kept per draft session, weakly: a recording holds the draft's weights
        and cache addresses, so it must not outlive them."""
        if not self.target.cuda_graphs:
            return None
        rounds = self.target.rounds.setdefault(self.draft, _Recorded())
        if k not in rounds.warm:
            rounds.warm.add(k)
            return None
        inputs = self._round_inputs(state, draft_state, torch.zeros(1, dtype=torch.long, device=state.token.device))
        # A draft of the target's layers gets a new view of the target's cache each call: not part of the key.
        draft_cache = None if self.shared_layers else id(draft_state.cache)
        key = (k, id(state.cache), draft_cache, *((tuple(t.shape), t.dtype) for t in inputs), state.sampler)
        if key not in rounds.graphs:
            rounds.graphs[key] = record("a speculative round", self._round_run(state, draft_state, k), inputs,
                                        self.guards.repeat)
        return rounds.graphs[key]

    def _round_run(self, state: Any, draft_state: Any, k: int) -> Any:
        """The function a round's recording captures, over _round_inputs' buffers; it ends by writing the next
        round's token, positions, done flags and draw counter into them."""
        target = dataclasses.replace(state, model=None)
        draft = None if self.shared_layers else dataclasses.replace(draft_state, model=None)
        width = len(generation.state_tensors(state))
        target_session, draft_session = weakref.ref(self.target), weakref.ref(self.draft)

        def run(*buffers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            steps = generation.with_tensors(target, buffers[:width], target_session().model)
            draft_steps = _shared_draft_state(steps, draft_session().model, self.shared_layers) if draft is None \
                else generation.with_tensors(draft, buffers[width:-1], draft_session().model)
            emitted, counts, *advanced = self._round(steps, draft_steps, k, buffers[-1])
            for buffer, new in zip((steps.token, steps.position_ids, steps.cache_position, steps.done, buffers[-1]),
                                   advanced):
                buffer.copy_(new)
            return emitted, counts

        return run

    def _note(self, state: Any, k: int, cache_len: int) -> None:
        dtype, device = generation._dtype_device(self.target.model)
        key = dict(batch=state.token.shape[0], cache=cache_len, dtype=dtype, device=device, sampler=state.sampler)
        self.target._note("draft", {**key, "draft": self.draft_name})
        self.target._note("verify", {**key, "k": k})


class _Round:
    """A queued round: its k, the tokens it emits [B, k+1] and its counts [accepted, all rows done, accepted
    summed over rows], copied to the host behind it without waiting (pinned memory, an event)."""

    def __init__(self, k: int, emitted: torch.Tensor, counts: torch.Tensor) -> None:
        self.k, self.emitted, self.ready = k, emitted, None
        self.host = counts
        if counts.is_cuda:
            self.host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            self.host.copy_(counts, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def counts(self) -> list[int]:
        """Waits for this round only (a round queued after it keeps running)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def _shared_draft_state(state: Any, draft_model: torch.nn.Module, layers: int) -> Any:
    """A draft of the target's first `layers` layers steps on the target's state with those cache layers."""
    cache = copy.copy(state.cache)
    cache.layers = state.cache.layers[:layers]
    return dataclasses.replace(state, model=draft_model, cache=cache)


@contextlib.contextmanager
def _draft_failures() -> Iterator[None]:
    """Any exception inside the draft (its compile or its run) becomes DraftFailed."""
    try:
        yield
    except DraftFailed:
        raise
    except Exception as error:  # the draft is the user's model: whatever it raises, decode without it
        raise DraftFailed(str(error)) from error


def _seek(cache: Any, cache_position: torch.Tensor) -> None:
    """Make the next cache write land at cache_position[0]: transformers >= 5.2x's StaticLayer writes at its
    cumulative_length (and derives the query positions from it); earlier versions write at cache_position."""
    for layer in getattr(cache, "layers", ()):
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length.copy_(cache_position[0])


def _draft_step(state: Any, token: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor,
                draw: torch.Tensor):
    """token [B, 1] -> the draft's next token [B, 1], and when sampling the distribution it was drawn from
    [B, V]; the positions and the draw counter advanced."""
    _seek(state.cache, cache_position)
    logits = generation._forward_logits(state, token, position_ids, cache_position, {})[0][:, -1]
    # the last output: the logits a lossy option's error is measured on (generation._measured), else None
    advanced = (position_ids + 1, cache_position + 1, draw + 1, generation._measured(state, logits))
    if not state.sampler.do_sample:
        return logits.argmax(-1, keepdim=True), None, *advanced
    scores = warp_scores(logits, state.sampler, *state.sampling[:2])
    noise = gumbel_noise(state.sampling[2], draw, scores.shape, scores.device, DRAFT_STREAM)
    return (scores + noise).argmax(-1, keepdim=True), scores.softmax(-1), *advanced


def _verify_step(state: Any, tokens: torch.Tensor, draft_q: torch.Tensor | None, done: torch.Tensor,
                 position_ids: torch.Tensor, cache_position: torch.Tensor, draw: torch.Tensor):
    """tokens [B, k+1]: the current token and k proposals. Returns the tokens to emit [B, k+1] (the first
    accepted+1 count), [accepted, all rows done, accepted summed over rows], the done flags [B, 1] and the next
    draw counter."""
    width = tokens.shape[1]
    offsets = torch.arange(width, device=tokens.device)
    _seek(state.cache, cache_position)
    logits, _ = generation._forward_logits(state, tokens, position_ids + offsets, cache_position + offsets, {},
                                           width)
    if state.sampler.do_sample:
        emitted, accepted = _accept_sampled(state, logits, tokens, draft_q, draw)
    else:
        emitted, accepted = _accept_greedy(logits, tokens)
    # Rows already done wait for no one; the batch keeps the shortest accepted prefix of the others.
    per_row = (accepted | done).int().cumprod(-1).sum(-1)
    count = per_row.min()
    emitted, done = _stops_within(state, emitted, offsets <= count, done)
    return (emitted, torch.stack([count, done.all().to(count.dtype), per_row.sum()]), done, draw + 1,
            generation._measured(state, logits))


def _accept_greedy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's argmax after each position [B, k+1] is what it emits (equal to the proposal wherever that
    is accepted); a proposal is accepted when it is that argmax [B, k]."""
    choice = logits.argmax(-1)
    return choice, tokens[:, 1:] == choice[:, :-1]


def _accept_sampled(state: Any, logits: torch.Tensor, tokens: torch.Tensor, draft_q: torch.Tensor,
                    draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling: proposal x accepted when u * q(x) < p(x); where it is not, the emitted token is drawn
    from norm(max(0, p - q)), and after the last proposal (q = 0 there) from p: the bonus token."""
    seed = state.sampling[2]
    p = warp_scores(logits, state.sampler, *state.sampling[:2]).softmax(-1)  # [B, k+1, V]
    proposed = tokens[:, 1:, None]
    p_proposed, q_proposed = p[:, :-1].gather(-1, proposed)[..., 0], draft_q.gather(-1, proposed)[..., 0]
    u = uniform_noise(seed, draw, p_proposed.shape, p.device, ACCEPT_STREAM)
    accepted = u * q_proposed < p_proposed  # [B, k]
    residual = (p - torch.nn.functional.pad(draft_q, (0, 0, 0, 1))).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: never rejected
    batch, width, vocab = residual.shape
    noise = gumbel_noise(seed, draw, (batch * width, vocab), p.device, CORRECTION_STREAM)
    corrected = (residual.log() + noise.view(batch, width, vocab)).argmax(-1)
    keep = torch.nn.functional.pad(accepted, (0, 1))
    return torch.where(keep, torch.nn.functional.pad(tokens[:, 1:], (0, 1)), corrected), accepted


def _stops_within(state: Any, emitted: torch.Tensor, kept: torch.Tensor, done: torch.Tensor):
    """Within a round as across steps: tokens after a row's stop token (or of a row already done) are padding,
    and a stop token among the kept ones ends its row."""
    stop = generation.is_stop(emitted, state.stop_ids) & kept
    stopped_before = (stop.cumsum(-1) - stop.int()) > 0
    emitted = torch.where(done | stopped_before, state.pad_id, emitted)
    return emitted, done | stop.any(-1, keepdim=True)
