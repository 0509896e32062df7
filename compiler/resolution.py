"""tokens="resolution" for mmaccel.generate (issue 15, item 3): fewer image tokens in the language model.

A LLaVA-1.5 prompt holds one placeholder per image feature (576 for a 336px image in 14px patches, of 640
positions): the placeholders, not the vision tower, set the prefill length and the KV cache every decode step
reads. A graph rewrite of one step cannot change that count (it is the model's input), so this runs before
the steps: the image is resized on its device to a smaller grid of whole patches, the CLIP tower interpolates
its position embeddings to that grid (transformers' interpolate_pos_encoding), and each image's run of N
placeholders in the prompt is cut to its M = grid^2 (+1 class token for the "full" strategy) first ones.

Why a lower resolution rather than pooling the projector's output grid 2x2: every token the language model
reads is still one the model's own tower and projector made, for a patch of the image (the distribution the
projector was trained to produce; an average of MLP outputs is not), the tower itself runs on fewer patches
too, and position embeddings interpolated to a coarser grid are what CLIP's interpolate_pos_encoding is for.

The side is chosen once per session under accuracy_budget: the relative error of the first new token's
logits (or the user's metric) against the full-resolution model, eager, on the calibration samples or else
the first call's inputs; the fewest tokens within budget wins; over budget: full resolution, one warning.
That choice is ImageTokenLever's, here, shared with tokens="prune" (compiler/token_pruning.py): one mechanism
for the levers that rewrite a LLaVA prompt, as passes/lossy.py is one for the levers that rewrite a graph.
"""
from __future__ import annotations

import abc
import functools
import inspect
import statistics
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..passes.lossy import pooled_relative_error
from ..timing import interleaved_times_ms
from .errors import InvalidOptionError, warn_once
from .options import Sample

# Candidate grids as fractions of the model's grid side: LLaVA-1.5's 24x24 -> 20x20 (280px, 69% of the
# tokens), 16x16 (224px, 44%), 12x12 (168px, 25%): from a small loss to a quarter of the image tokens.
GRID_FRACTIONS = (5 / 6, 2 / 3, 1 / 2)
# A timed lever (tokens="auto") times each candidate's first token: 2 warm-up calls (the first compiles that
# prompt bucket's prefill; on the Triton target the second records its CUDA graph), then the median of 3, the
# candidates interleaved (mmaccel/timing.py). 3 and not more: 7 candidates at LLaVA-1.5-7B dims are 35 first
# tokens, about 1 s at the 26 ms lossless first token measured on an H200, on the first call only.
TIMING_WARMUP, TIMING_REPEATS = 2, 3


@dataclass(frozen=True)
class ImageLayout:
    """Where a LLaVA-style model's image features go: one placeholder per feature, N per image."""
    image_token_id: int
    image_size: int  # pixels, square
    patch_size: int
    class_token: bool  # vision_feature_select_strategy "full": the class token is a feature too

    def tokens(self, side: int) -> int:
        return (side // self.patch_size) ** 2 + self.class_token


def llava_layout(model: torch.nn.Module) -> ImageLayout | str:
    """The image-token layout of a LLaVA-1.5-style model (tokens="resolution" and "prune" follow it), or why
    it cannot be followed (a reason for the report)."""
    config = model.config
    vision = getattr(config, "vision_config", None)
    if type(config).__name__ != "LlavaConfig":
        return (f"{type(config).__name__}: only LLaVA-1.5-style models (LlavaConfig: one placeholder per patch) "
                "are followed")
    if getattr(config, "image_token_id", None) is None or not hasattr(vision, "patch_size"):
        return "the config names no image_token_id or vision patch_size"
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    return ImageLayout(config.image_token_id, vision.image_size, vision.patch_size, strategy == "full")


def image_layout(model: torch.nn.Module) -> ImageLayout | str:
    """The layout tokens="resolution" can follow (the tower must interpolate its position embeddings)."""
    layout = llava_layout(model)
    tower = _vision_tower(model)
    if isinstance(layout, ImageLayout) and (
            tower is None or "interpolate_pos_encoding" not in inspect.signature(tower.forward).parameters):
        return f"the vision tower {type(tower).__name__} cannot interpolate its position embeddings"
    return layout


def image_tokens_per_image(config: Any, side: int | None = None) -> int | None:
    """LLaVA-1.5: one feature per patch of a `side`-pixel image (default: the config's), plus the class token
    with vision_feature_select_strategy "full"; PaliGemma: one per patch (SigLIP has no class token)."""
    vision = getattr(config, "vision_config", None)
    if getattr(config, "image_token_id", None) is None or not hasattr(vision, "patch_size") or \
            type(config).__name__ not in ("LlavaConfig", "PaliGemmaConfig"):
        return None
    patches = ((side or vision.image_size) // vision.patch_size) ** 2
    return patches + (getattr(config, "vision_feature_select_strategy", "default") == "full")


def candidate_sides(layout: ImageLayout) -> list[int]:
    """Image sides in whole patches below the model's, fewest tokens first."""
    grid = layout.image_size // layout.patch_size
    grids = {max(1, round(grid * f)) for f in GRID_FRACTIONS} - {grid}
    return [g * layout.patch_size for g in sorted(grids)]


def validate_side(layout: ImageLayout, side: int) -> None:
    if side < layout.patch_size:
        raise InvalidOptionError(f"tokens='resolution': a {side}px image is below one {layout.patch_size}px patch")
    if side // layout.patch_size >= layout.image_size // layout.patch_size:
        raise InvalidOptionError(f"tokens='resolution': a {side}px image gives no fewer {layout.patch_size}px "
                                 f"patches than the model's {layout.image_size}px")


def resized(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """pixel_values [B, 3, H, W] at side x side on their device: bicubic with antialiasing, as CLIP's image
    processor resizes (normalization is per channel and affine, so resizing the normalized pixels is the same)."""
    if pixels.shape[-1] == side and pixels.shape[-2] == side:
        return pixels
    out = torch.nn.functional.interpolate(pixels.float(), size=(side, side), mode="bicubic", antialias=True,
                                          align_corners=False)
    return out.to(pixels.dtype)


def shrunk_prompt(ids: torch.Tensor, mask: torch.Tensor, layout: ImageLayout, keep: int,
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The prompt with each image's run of N placeholders cut to its first `keep`, rows left-padded again to
    the longest; or why the layout cannot be followed (placeholders not in runs of N)."""
    ranks = image_ranks(ids, layout)
    if isinstance(ranks, str):
        return ranks
    kept = (ids != layout.image_token_id) | (ranks < keep)
    return left_packed(kept, (ids, pad_id), (mask, 0))


def image_ranks(ids: torch.Tensor, layout: ImageLayout) -> torch.Tensor | str:
    """[B, L]: each image placeholder's index within its image (0 .. N-1; 0 elsewhere), or why the layout
    cannot be followed (placeholders not in runs of N, the features of whole images)."""
    full = layout.tokens(layout.image_size)
    ranks = []
    for row in ids == layout.image_token_id:
        rank, run_lengths = _runs(row)
        if bool((run_lengths % full).any()):
            return f"the prompt's image placeholders are not in runs of {full} per image ({run_lengths.tolist()})"
        ranks.append(rank % full)
    return torch.stack(ranks)


def left_packed(kept: torch.Tensor, *tensors: tuple[torch.Tensor, Any]) -> tuple[torch.Tensor, ...]:
    """Each (tensor [B, L, ...], fill) at the positions `kept` [B, L] marks, in order, rows left-filled to the
    longest: the shape of a left-padded prompt."""
    length = int(kept.sum(-1).max())
    out = []
    for tensor, fill in tensors:
        packed = tensor.new_full((tensor.shape[0], length, *tensor.shape[2:]), fill)
        for i, row in enumerate(kept):
            packed[i, length - int(row.sum()):] = tensor[i][row]
        out.append(packed)
    return tuple(out)


def _runs(is_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One row [L]: each position's index within its run of consecutive placeholders, and the runs' lengths."""
    positions = torch.arange(is_image.shape[0], device=is_image.device)
    after = torch.cat([is_image[1:], is_image.new_zeros(1)])
    starts = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
    run_start = torch.where(starts, positions, torch.zeros_like(positions)).cummax(0).values
    rank = torch.where(is_image, positions - run_start, torch.zeros_like(positions))
    return rank, rank[is_image & ~after] + 1


def interpolating_tower(model: torch.nn.Module) -> None:
    """The vision tower interpolates its position embeddings for an image of another size than its own (once
    per model; at its own size the tower runs as before). A hook on the tower, not an argument of the model's
    forward: LLaVA's forward hands extra arguments to the tower in transformers 5.2x but not in 4.x."""
    tower = _vision_tower(model)
    if tower in _INTERPOLATING:
        return
    size = model.config.vision_config.image_size

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        pixels = args[0] if args else kwargs.get("pixel_values")
        if pixels is not None and tuple(pixels.shape[-2:]) != (size, size):
            kwargs = {**kwargs, "interpolate_pos_encoding": True}
        return args, kwargs

    tower.register_forward_pre_hook(hook, with_kwargs=True)
    _INTERPOLATING.add(tower)


_INTERPOLATING: weakref.WeakSet = weakref.WeakSet()


def _vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    inner = getattr(model, "model", None)
    return getattr(model, "vision_tower", None) or getattr(inner, "vision_tower", None)


@dataclass
class TokenChoice:
    """What a tokens= lever of mmaccel.generate chose for one model (GenerationReport.tokens)."""
    lever: str  # "resolution", "prune"
    setting_name: str  # what its setting is: "side", "keep"
    setting: Any = None  # the lever's setting chosen; None: the prompt as given (over budget, layout not followed)
    label: str = ""  # the setting as the report prints it ("16px", "50%")
    tokens: tuple[int, int] | None = None  # image tokens per image: (full, kept)
    error: float | None = None
    # setting, tokens, error per candidate; a timed lever's also: label, first_token_ms, pareto, chosen
    candidates: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None  # why the prompt is left as it is
    first_token_ms: float | None = None  # a timed lever's (tokens="auto"), of the setting chosen

    def summary(self) -> dict[str, Any]:
        if self.setting is None:
            return {"lever": self.lever, "left untouched": self.reason, "candidates": self.candidates}
        timed = {} if self.first_token_ms is None else {"first-token ms": self.first_token_ms}
        return {"lever": self.lever, self.setting_name: self.label, "image tokens per image": list(self.tokens),
                "measured error": self.error, **timed, "candidates": self.candidates}


def pareto_table(candidates: list[dict[str, Any]]) -> str:
    """A timed lever's candidates as the report prints them: setting, image tokens, error, first-token ms, on the
    Pareto front of (error, ms) or not, the one chosen."""
    lines = [f"{'setting':18} {'image tokens':>12} {'error':>9} {'first-token ms':>14}  Pareto front"]
    for c in candidates:
        mark = ("yes" if c["pareto"] else "no") + ("  <- chosen" if c.get("chosen") else "")
        lines.append(f"{c['label']:18} {c['tokens']:12d} {c['error']:9.4g} {c['first_token_ms']:14.2f}  {mark}")
    return "\n".join(lines)


def on_pareto_front(candidates: list[dict[str, Any]]) -> list[bool]:
    """Whether each candidate is on the front of (error, first-token ms): no other is as good in both and better
    in one."""
    def dominates(a: dict, b: dict) -> bool:
        return a["error"] <= b["error"] and a["first_token_ms"] <= b["first_token_ms"] and (
            a["error"] < b["error"] or a["first_token_ms"] < b["first_token_ms"])
    return [not any(dominates(other, c) for other in candidates) for c in candidates]


def first_token_times(runs: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Median ms of each candidate's first token (mmaccel/timing.py, interleaved: load from other processes
    falls on all alike)."""
    times = interleaved_times_ms(runs, TIMING_REPEATS, TIMING_WARMUP, device)
    return {label: statistics.median(ms) for label, ms in times.items()}


class ImageTokenLever(abc.ABC):
    """A tokens= lever of mmaccel.generate: a lossy rewrite of a LLaVA prompt before the steps (fewer image
    tokens), its setting chosen once per session under accuracy_budget, then applied to each call's prompt.
    The one choice mechanism of these levers: each setting's error is the first new token's logits' against
    the untouched model's (or the user's metric), eager, on the calibration samples or else the first call's
    inputs; the fewest tokens within budget wins; none within: the prompt as given, one warning. A timed lever
    (tokens="auto": settings of several levers, whose cost is not their token count alone: prune's scoring pass
    costs time that resolution's resize does not) also times each setting's first token on the first call's
    prompt, and the fastest within budget wins, the prompt as given among the candidates.

    A lever says: its layout (or why none), its candidate settings (fewest tokens first, validated), the image
    tokens per image a setting keeps, what a prompt needs for any setting (`prepared`: the prune lever's scores,
    computed once for all settings) and the rewrite of a prepared prompt at one setting."""
    name: str
    setting_name: str
    timed = False

    def __init__(self, budget: float, metric: Callable | None, calibration: Sequence[Sample] | None,
                 settings: Sequence[Any] | None = None) -> None:
        self.budget, self.metric, self.calibration, self.settings = budget, metric, calibration, settings
        self.choice: TokenChoice | None = None
        # A timed lever's: the first token of a prompt, first_token(model, ids, mask, inputs) (mmaccel.generate
        # sets its compiled prefill; else the eager model), and the timing of the candidates' runs, a seam that
        # tests replace: time_ms({label: run}, device) -> {label: ms}.
        self.first_token: Callable = first_token_logits
        self.time_ms: Callable[[dict[str, Callable[[], object]], torch.device], dict[str, float]] = first_token_times

    @abc.abstractmethod
    def layout(self, model: torch.nn.Module) -> ImageLayout | str:
        ...

    @abc.abstractmethod
    def candidates(self, layout: ImageLayout) -> list[Any]:
        ...

    @abc.abstractmethod
    def tokens(self, layout: ImageLayout, setting: Any) -> int:
        ...

    @abc.abstractmethod
    def label(self, setting: Any) -> str:
        ...

    @abc.abstractmethod
    def prepared(self, model: torch.nn.Module, layout: ImageLayout, ids: torch.Tensor, mask: torch.Tensor,
                 inputs: dict[str, Any]) -> Any:
        ...

    @abc.abstractmethod
    def rewrite(self, layout: ImageLayout, prepared: Any, setting: Any,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | str:
        ...

    def rewritten(self, model: torch.nn.Module, layout: ImageLayout, prompt: tuple, setting: Any,
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | str:
        """A prompt (ids, mask, inputs) prepared and rewritten at `setting`: what each call with that setting runs."""
        return self.rewrite(layout, self.prepared(model, layout, *prompt), setting, pad_id)

    def lossless(self, setting: Any) -> bool:
        """Whether `setting` is the prompt as given (a timed lever's candidate, to compare the others with)."""
        return False

    def parts(self) -> list["ImageTokenLever"]:
        """The levers whose rewrites this one makes (itself; tokens="auto": each lever it chooses among)."""
        return [self]

    def apply(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any],
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(input_ids, attention_mask, model inputs) with the chosen setting; unchanged without an image."""
        if inputs.get("pixel_values") is None:
            return ids, mask, inputs
        if self.choice is None:
            self.choice = self._choose(model, ids, mask, inputs, pad_id)
        if self.choice.setting is None:
            return ids, mask, inputs
        prompt = self.rewritten(model, self.layout(model), (ids, mask, inputs), self.choice.setting, pad_id)
        if isinstance(prompt, str):
            warn_once(f"mmaccel.generate tokens={self.name!r}: this prompt left as given: {prompt}")
            return ids, mask, inputs
        return prompt

    def _choose(self, model, ids, mask, inputs, pad_id) -> TokenChoice:
        layout = self.layout(model)
        if isinstance(layout, str):
            return TokenChoice(self.name, self.setting_name, reason=layout)
        settings = self.candidates(layout)
        samples = _samples(self.calibration) if self.calibration else [(ids, mask, inputs)]
        references = [[first_token_logits(model, *sample)] for sample in samples]
        prepared = [self.prepared(model, layout, *sample) for sample in samples]
        measured = []
        for setting in settings:
            outputs = []
            for sample in prepared:
                prompt = self.rewrite(layout, sample, setting, pad_id)
                if isinstance(prompt, str):
                    return TokenChoice(self.name, self.setting_name, reason=prompt)
                outputs.append([first_token_logits(model, *prompt)])
            error = (self.metric or pooled_relative_error)(outputs, references)
            measured.append({self.setting_name: setting, "tokens": self.tokens(layout, setting),
                             "error": float(error)})
        if self.timed:
            reason = self._timed(model, layout, (ids, mask, inputs), measured, pad_id)
            if reason is not None:
                return TokenChoice(self.name, self.setting_name, reason=reason)
        return self._cheapest(layout, measured)

    def _timed(self, model: torch.nn.Module, layout: ImageLayout, prompt: tuple, measured: list[dict[str, Any]],
               pad_id: int) -> str | None:
        """Add to each candidate its label, first-token ms on `prompt` (the first call's: the shapes the session
        runs) from its rewrite (prune's scoring pass included) through the first token, and whether it is on the
        Pareto front; or say why `prompt` cannot be rewritten."""
        runs = {}
        for m in measured:
            setting = m[self.setting_name]
            probe = self.rewritten(model, layout, prompt, setting, pad_id)
            if isinstance(probe, str):
                return probe
            m["label"] = self.label(setting)
            runs[m["label"]] = functools.partial(self._first_token_of, model, layout, prompt, setting, pad_id)
        times = self.time_ms(runs, prompt[0].device)
        for m in measured:
            m["first_token_ms"] = float(times[m["label"]])
        for m, front in zip(measured, on_pareto_front(measured)):
            m["pareto"] = front
        return None

    def _first_token_of(self, model, layout, prompt, setting, pad_id) -> object:
        return self.first_token(model, *self.rewritten(model, layout, prompt, setting, pad_id))

    def _cheapest(self, layout: ImageLayout, measured: list[dict[str, Any]]) -> TokenChoice:
        """The fewest tokens within budget; a timed lever's: the fastest first token within budget (the prompt as
        given too). None within (the prompt as given aside): the prompt as given, one warning."""
        within = [m for m in measured if m["error"] <= self.budget and not self.lossless(m[self.setting_name])]
        if not within:
            reason = f"every setting measured over accuracy_budget {self.budget}: all image tokens kept"
            warn_once(f"mmaccel.generate tokens={self.name!r}: {reason} ({measured})")
            best = None
        elif self.timed:
            given = [m for m in measured if self.lossless(m[self.setting_name])]
            best = min(within + given, key=lambda m: m["first_token_ms"])
            reason = "the prompt as given measured fastest"
        else:
            best = min(within, key=lambda m: m["tokens"])
        if self.timed:
            chosen = best or next(m for m in measured if self.lossless(m[self.setting_name]))
            for m in measured:
                m["chosen"] = m is chosen
        if best is None or self.lossless(best[self.setting_name]):
            return TokenChoice(self.name, self.setting_name, reason=reason, candidates=measured)
        setting = best[self.setting_name]
        return TokenChoice(self.name, self.setting_name, setting, self.label(setting),
                           (layout.tokens(layout.image_size), best["tokens"]), best["error"], measured,
                           first_token_ms=best.get("first_token_ms"))


class ResolutionLever(ImageTokenLever):
    """tokens="resolution": the image at a smaller side in whole patches, its placeholders cut to match."""
    name, setting_name = "resolution", "side"

    def layout(self, model: torch.nn.Module) -> ImageLayout | str:
        return image_layout(model)

    def candidates(self, layout: ImageLayout) -> list[int]:
        sides = list(self.settings) if self.settings is not None else candidate_sides(layout)
        for side in sides:
            validate_side(layout, side)
        return sides

    def tokens(self, layout: ImageLayout, side: int) -> int:
        return layout.tokens(side)

    def label(self, side: int) -> str:
        return f"{side}px"

    def prepared(self, model, layout, ids, mask, inputs) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        interpolating_tower(model)
        return ids, mask, inputs

    def rewrite(self, layout, prepared, side, pad_id) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | str:
        ids, mask, inputs = prepared
        prompt = shrunk_prompt(ids, mask, layout, layout.tokens(side), pad_id)
        if isinstance(prompt, str):
            return prompt
        return *prompt, {**inputs, "pixel_values": resized(inputs["pixel_values"], side)}


def first_token_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                       inputs: dict[str, Any]) -> torch.Tensor:
    """The model's logits for the first new token [B, V] (float32), eager, positions from the mask as
    mmaccel.generate and HF's generate derive them for left-padded rows."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    ids = None if "inputs_embeds" in inputs else ids  # tokens="prune": the prompt's embeddings, pruned
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **inputs)
    return out.logits[:, -1].float()


def _samples(calibration: Sequence[Sample]) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """Calibration samples as (input_ids, attention_mask, other inputs): dicts as a processor returns them."""
    out = []
    for sample in calibration:
        kwargs = dict(sample.kwargs)
        ids = sample.args[0] if sample.args else kwargs.pop("input_ids")
        mask = kwargs.pop("attention_mask", None)
        out.append((ids, torch.ones_like(ids) if mask is None else mask, kwargs))
    return out
