"""CompileOptions: the few named, validated knobs of mmaccel (torchao style: a small dataclass)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import InvalidOptionError

# Targets that exist today. "auto" resolves per device (see backends.resolve_target).
TARGETS = ("auto", "eager", "triton", "onnxruntime")
CUDA_GRAPHS = (True, False, "auto")
# Lossy, opt-in (passes/quantize.py). "auto": each layer's precision chosen among int4/int8/original.
QUANTIZE = (None, "int8_weight_only", "int4_weight_only", "w8a8_dynamic", "fp8", "auto")
# Lossy, opt-in (passes/prune*.py): the structures prune may remove; "auto" is all of them; a list or tuple names
# several. All that are asked for are chosen in one solve, with quantize, under one accuracy_budget.
PRUNE_STRUCTURES = ("mlp_channels", "heads", "blocks")
# Those a fixed fraction can be asked for (prune={"mlp_channels": 0.5}); blocks are dropped whole, per block.
PRUNE_FRACTIONS = ("mlp_channels", "heads")
# What happens to the full-precision parameters a quantized / pruned graph no longer reads (compiler/release.py).
WEIGHTS = ("keep", "release")
# Lossy, opt-in: fewer tokens. "merge" (passes/tokens.py) in vision towers; "resolution" (compiler/resolution.py)
# and "prune" (compiler/token_pruning.py): fewer image tokens in a LLaVA prompt, mmaccel.generate only. "auto"
# (compiler/token_auto.py): in mmaccel.generate, the fastest first token within accuracy_budget among every
# setting of the prompt levers; on one graph (torch.compile, mmaccel.compile, export_onnx) the levers that can
# work there, which is "merge" alone today.
TOKENS = (None, "merge", "resolution", "prune", "auto")
# The levers that rewrite the prompt, which only mmaccel.generate can do (a compiled graph's inputs are fixed).
PROMPT_TOKENS = ("resolution", "prune")
# torch.compile(mode=...) values we accept; the others promise things (CUDA graphs, autotuning)
# that belong to the Triton target, so they are refused rather than silently ignored.
MODES = (None, "default")


@dataclass(frozen=True)
class Sample:
    """One calibration sample: the model's positional and keyword arguments."""
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        def one(a: Any) -> str:
            return f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)}" if hasattr(a, "shape") else type(a).__name__
        parts = [one(a) for a in self.args] + [f"{k}={one(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class CompileOptions:
    target: str = "auto"
    # Pass name -> enabled. Only names that differ from the default pipeline are stored.
    passes: Mapping[str, bool] = field(default_factory=dict)
    debug_dir: str | None = None
    # Triton target: record and replay CUDA graphs. "auto": for launch-bound graphs (decode steps).
    cuda_graphs: bool | str = "auto"
    # Lossy: quantize linear weights; the pass measures the output error and keeps it within the budget.
    quantize: str | None = None
    # Lossy: structures to remove (MLP channels, attention heads, blocks), chosen with quantize under one budget.
    prune: tuple[str, ...] | None = None
    # Lossy: structure -> the fraction of it to remove, from the dict form prune={"mlp_channels": 0.5, "blocks":
    # None}: the lever then offers that fraction alone (each site takes it or stays whole, under accuracy_budget);
    # None, or a structure given by name: the lever offers its usual fractions.
    prune_fractions: Mapping[str, float] = field(default_factory=dict)
    # Lossy: merge tokens between the blocks of vision towers (ToMe); chosen with the others under the same budget.
    tokens: str | None = None
    # tokens={"resolution": 224} (or a list of sides): the image sides in pixels offered, instead of the usual ones.
    token_sides: tuple[int, ...] | None = None
    # tokens={"prune": 0.5} (or a list): the fractions of each image's tokens kept offered, instead of the usual.
    token_keep: tuple[float, ...] | None = None
    accuracy_budget: float = 0.01
    # Inputs to measure the error of lossy passes on: samples of the model's arguments (validated here; mapped
    # to each graph's inputs by mmaccel.compile / export_onnx).
    calibration: tuple[Sample, ...] | None = field(default=None, compare=False, repr=False)
    # Lossy: what accuracy_budget bounds instead of the relative output error: metric(outputs, references) ->
    # float, each a list per calibration sample of the compiled graph's output tensors (passes/lossy.py Metric).
    metric: Callable[[list, list], float] | None = field(default=None, compare=False, repr=False)
    # A lossy pass that cannot run (a calibration sample that does not fit the graph) stops the compile or
    # export with LossyPassError; True: it is skipped with a warning instead.
    lossy_fallback: bool = False
    # "release": free the parameters the lossy passes replaced (the module can no longer run eagerly); "keep":
    # the module keeps them (the compiled model then holds both). Why "keep" is the default: README, Memory.
    weights: str = "keep"

    @classmethod
    def from_user(cls, options: Mapping[str, Any] | None = None, mode: str | None = None) -> "CompileOptions":
        """Validate user options; raise InvalidOptionError (a ValueError) naming the problem and the fix."""
        from ..passes.pipeline import PASS_NAMES  # late import: passes import compiler helpers

        options = dict(options or {})
        valid = ("target", "passes", "debug_dir", "cuda_graphs", "quantize", "prune", "tokens", "accuracy_budget",
                 "calibration", "metric", "lossy_fallback", "weights")
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise InvalidOptionError(
                f"unknown mmaccel option(s) {unknown}; valid options are {list(valid)}")
        if mode not in MODES:
            raise InvalidOptionError(
                f"torch.compile mode={mode!r} is not supported by backend='mmaccel'; valid modes are "
                f"{list(MODES)} (for CUDA graphs use options={{'cuda_graphs': True}} with the Triton target)")
        target = options.get("target", "auto")
        if target not in TARGETS:
            raise InvalidOptionError(f"option 'target'={target!r} is not valid; choose one of {list(TARGETS)}")
        cuda_graphs = options.get("cuda_graphs", "auto")
        if not any(cuda_graphs is c or (isinstance(c, str) and cuda_graphs == c) for c in CUDA_GRAPHS):
            raise InvalidOptionError(f"option 'cuda_graphs'={cuda_graphs!r} is not valid; choose True, False or 'auto'")
        quantize = options.get("quantize")
        if quantize not in QUANTIZE:
            raise InvalidOptionError(f"option 'quantize'={quantize!r} is not valid; choose one of {list(QUANTIZE)}")
        prune, prune_fractions = _validate_prune(options.get("prune"))
        tokens, token_sides, token_keep = _validate_tokens(options.get("tokens"))
        metric = _validate_metric(options.get("metric"), quantize or prune or tokens)
        budget = _validate_budget(options.get("accuracy_budget", 0.01), metric)
        calibration = _validate_calibration(options.get("calibration"), quantize or prune or tokens)
        lossy_fallback = options.get("lossy_fallback", False)
        if not isinstance(lossy_fallback, bool):
            raise InvalidOptionError(f"option 'lossy_fallback' must be True or False, got {lossy_fallback!r}")
        weights = _validate_weights(options.get("weights", "keep"), quantize or prune)
        passes = _validate_passes(options.get("passes"), PASS_NAMES)
        debug_dir = options.get("debug_dir")
        if debug_dir is None and os.environ.get("MMACCEL_DEBUG", "0") not in ("", "0"):
            debug_dir = os.environ.get("MMACCEL_DEBUG_DIR", "mmaccel_debug")
        if debug_dir is not None and not isinstance(debug_dir, (str, os.PathLike)):
            raise InvalidOptionError(f"option 'debug_dir' must be a path (str), got {type(debug_dir).__name__}")
        return cls(target=target, passes=passes, debug_dir=None if debug_dir is None else os.fspath(debug_dir),
                   cuda_graphs=cuda_graphs, quantize=quantize, prune=prune,
                   prune_fractions=prune_fractions, tokens=tokens, token_sides=token_sides,
                   token_keep=token_keep, accuracy_budget=float(budget),
                   calibration=calibration, metric=metric, lossy_fallback=lossy_fallback, weights=weights)

    def pass_enabled(self, name: str, default: bool = True) -> bool:
        return self.passes.get(name, default)


def _validate_prune(value: Any) -> tuple[tuple[str, ...] | None, dict[str, float]]:
    """A structure name, "auto" (every structure), a list / tuple of structure names, or a dict of structure ->
    fraction to remove -> (the structures, the fractions)."""
    if value is None:
        return None, {}
    if isinstance(value, Mapping):
        return tuple(_validate_prune(list(value))[0] or ()), _validate_fractions(value)
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not names:
        raise InvalidOptionError(f"option 'prune'={value!r} is not valid; give one of {list(PRUNE_STRUCTURES)}, "
                                 "'auto', a list of them, or a dict of structure -> fraction to remove")
    for name in names:
        if name not in (*PRUNE_STRUCTURES, "auto"):
            raise InvalidOptionError(f"option 'prune': {name!r} is not valid; choose among {list(PRUNE_STRUCTURES)} "
                                     "or 'auto' (all of them), alone or in a list")
    return (PRUNE_STRUCTURES if "auto" in names else tuple(dict.fromkeys(names))), {}


def _validate_fractions(value: Mapping[str, Any]) -> dict[str, float]:
    fractions = {}
    for name, fraction in value.items():
        if fraction is None:  # {"blocks": None}: that structure, its amount chosen by accuracy_budget
            continue
        if name not in PRUNE_FRACTIONS:
            raise InvalidOptionError(f"option 'prune': {name!r} takes no fraction; fractions are for "
                                     f"{list(PRUNE_FRACTIONS)} (blocks are chosen by accuracy_budget: give "
                                     "'blocks': None)")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise InvalidOptionError(f"option 'prune': the fraction of {name} to remove must be a number in (0, 1), "
                                     f"got {fraction!r} (0.25 removes a quarter)")
        fractions[name] = float(fraction)
    return fractions


def _validate_weights(value: Any, lossy: str | None) -> str:
    if value not in WEIGHTS:
        raise InvalidOptionError(f"option 'weights'={value!r} is not valid; choose one of {list(WEIGHTS)}")
    if value == "release" and lossy is None:
        raise InvalidOptionError("option weights='release' frees the parameters a quantized or pruned graph no longer "
                                 "reads; a lossless compile reads them all: set quantize=... or prune=... as well")
    return value


def _validate_tokens(value: Any) -> tuple[str | None, tuple[int, ...] | None, tuple[float, ...] | None]:
    """A lever name, or {"resolution": side(s)} / {"prune": fraction(s) kept} -> (lever, sides, fractions)."""
    if isinstance(value, Mapping):
        if len(value) != 1 or not set(value) <= set(PROMPT_TOKENS):
            raise InvalidOptionError(f"option 'tokens'={dict(value)!r}: the dict form is {{'resolution': side}} "
                                     "(pixels, or a list of sides to choose from) or {'prune': fraction} (of each "
                                     "image's tokens kept, or a list of fractions)")
        lever, given = next(iter(value.items()))
        settings = tuple(given) if isinstance(given, (list, tuple)) else (given,)
        if lever == "resolution":
            return lever, _validate_sides(settings, given), None
        return lever, None, _validate_keep(settings, given)
    if not isinstance(value, (str, type(None))) or value not in TOKENS:
        raise InvalidOptionError(f"option 'tokens'={value!r} is not valid; choose one of {list(TOKENS)}, "
                                 "{'resolution': side in pixels, or a list of sides} or {'prune': fraction kept}")
    return value, None, None


def _validate_sides(sides: tuple, given: Any) -> tuple[int, ...]:
    if not sides or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides):
        raise InvalidOptionError(f"option tokens={{'resolution': {given!r}}}: give image sides in pixels, "
                                 "positive ints")
    return sides


def _validate_keep(fractions: tuple, given: Any) -> tuple[float, ...]:
    if not fractions or any(isinstance(f, bool) or not isinstance(f, (int, float)) for f in fractions):
        raise InvalidOptionError(f"option tokens={{'prune': {given!r}}}: give the fraction of each image's tokens "
                                 "kept, a number in (0, 1), or a list of them")
    for fraction in fractions:
        if fraction <= 0:
            raise InvalidOptionError(f"option tokens={{'prune': {given!r}}}: keeping {fraction} of each image's "
                                     "tokens removes every image token; keep a fraction in (0, 1)")
        if fraction >= 1:
            raise InvalidOptionError(f"option tokens={{'prune': {given!r}}}: keeping {fraction} of each image's "
                                     "tokens prunes nothing; keep a fraction in (0, 1), or drop tokens=")
    return tuple(float(f) for f in fractions)


def refuse_outside_generate(options: CompileOptions) -> None:
    """tokens="resolution" / "prune" rewrite the prompt (how many image tokens it holds), which one compiled
    graph cannot."""
    if options.tokens in PROMPT_TOKENS:
        raise InvalidOptionError(f"option tokens={options.tokens!r} changes how many image tokens the prompt holds, "
                                 "an input of the model that only mmaccel.generate rewrites: use mmaccel.generate("
                                 f"model, **inputs, options={{'tokens': {options.tokens!r}}}), or tokens='merge' here")


def _validate_budget(budget: Any, metric: Any) -> float:
    """In (0, 1) for the relative output error; any positive number under a user metric (the user's scale)."""
    upper, meaning = ((math.inf, "a positive number: the largest value of your metric the lossy passes may reach")
                      if metric is not None else
                      (1, "a number in (0, 1): the largest relative output error (||out - ref|| / ||ref||) a lossy "
                          "pass may introduce"))
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < upper:
        raise InvalidOptionError(f"option 'accuracy_budget'={budget!r} must be {meaning}")
    return float(budget)


def _validate_metric(value: Any, lossy: Any) -> Callable[[list, list], float] | None:
    if value is None:
        return None
    if not callable(value):
        raise InvalidOptionError(f"option 'metric' must be a callable metric(outputs, references) -> float, got "
                                 f"{type(value).__name__}")
    if not lossy:
        raise InvalidOptionError("option 'metric' only matters to lossy passes; set quantize=..., prune=... or "
                                 "tokens=... as well, or drop metric")
    return value


def _validate_calibration(value: Any, lossy: str | None) -> tuple[Sample, ...] | None:
    """Any iterable of samples (a list, a generator, a DataLoader), read once. A sample is a tensor, a tuple
    of positional arguments, a dict of keyword arguments (as Hugging Face tokenizers and processors return
    them), or a pair (tuple of positional arguments, dict of keyword arguments)."""
    import torch

    if value is None:
        return None
    if lossy is None:
        raise InvalidOptionError("option 'calibration' only matters to lossy passes; set quantize=..., prune=... "
                                 "or tokens=... as well, or drop calibration")
    if isinstance(value, (torch.Tensor, Mapping)) or not hasattr(value, "__iter__"):
        raise InvalidOptionError("option 'calibration' must be an iterable of samples (a list of tensors, tuples "
                                 "of tensors or dicts of keyword arguments; a generator or DataLoader of them), got "
                                 f"{type(value).__name__}" + ("; one dict is one sample: pass [batch]"
                                                              if isinstance(value, Mapping) else ""))
    samples = tuple(as_sample(s, f"option 'calibration': sample {i}") for i, s in enumerate(value))
    if not samples:
        raise InvalidOptionError("option 'calibration' is empty; give at least one sample of the model's inputs")
    for i, sample in enumerate(samples):
        if not any(isinstance(a, torch.Tensor) for a in (*sample.args, *sample.kwargs.values())):
            raise InvalidOptionError(f"option 'calibration': sample {i} holds no tensor; each sample is a tensor, "
                                     "a tuple of tensors or a dict of them (the model's arguments)")
    return samples


def as_sample(value: Any, where: str) -> Sample:
    """A tensor, a tuple of positional arguments, a dict of keyword arguments, or (args tuple, kwargs dict)."""
    if isinstance(value, Mapping):
        return Sample((), dict(value))
    if isinstance(value, (tuple, list)):
        if len(value) == 2 and isinstance(value[0], (tuple, list)) and isinstance(value[1], Mapping):
            return Sample(tuple(value[0]), dict(value[1]))
        return Sample(tuple(value))
    if hasattr(value, "shape"):
        return Sample((value,))
    raise InvalidOptionError(f"{where} is a {type(value).__name__}; give a tensor, a tuple of the model's "
                             "positional arguments, a dict of its keyword arguments, or (args, kwargs)")


def _validate_passes(value: Any, known: tuple[str, ...]) -> dict[str, bool]:
    """`passes` is {name: bool} to switch passes on/off, or a list of names to run only those."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        chosen = dict(value)
        bad_values = [k for k, v in chosen.items() if not isinstance(v, bool)]
        if bad_values:
            raise InvalidOptionError(
                f"option 'passes' maps pass names to True/False; got non-bool values for {bad_values}")
    elif isinstance(value, (list, tuple, set, frozenset)):
        chosen = {name: (name in value) for name in known}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise InvalidOptionError(f"option 'passes' names unknown pass(es) {unknown}; valid passes are {list(known)}")
        return chosen
    else:
        raise InvalidOptionError(
            "option 'passes' must be a dict {pass_name: bool} or a list of pass names; "
            f"got {type(value).__name__}; valid passes are {list(known)}")
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise InvalidOptionError(f"option 'passes' names unknown pass(es) {unknown}; valid passes are {list(known)}")
    return chosen
