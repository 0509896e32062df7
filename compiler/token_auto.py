"""tokens="auto" for mmaccel.generate (issue 15, item 5): the fastest first token within accuracy_budget among
every setting of the prompt levers, and the prompt as given.

The candidates are the union of tokens="resolution"'s sides (compiler/resolution.py) and tokens="prune"'s
fractions kept (compiler/token_pruning.py), plus the prompt as given. Each is measured as those levers measure
theirs (the first new token's error against the untouched model, eager, or the user's metric, on the
calibration samples or the first call's inputs), and timed on the first call's prompt through the session's
compiled prefill (its rewrite included: prune's scoring pass, resolution's resize). The fastest within budget
wins, not the fewest tokens: at one token count the two levers' first tokens differ by the scoring pass, and
a prompt bucket (compiler/buckets.py) makes nearby counts cost the same. The choice is ImageTokenLever's, as
for the two levers alone; the report carries every candidate (the Pareto table of error against first-token
ms: resolution.pareto_table).

Not chosen here: quantize / prune of the weights (refused with tokens="auto" in mmaccel.generate, as with the
two levers: the steps would need one budget shared with the prompt's rewrite) and tokens="merge" in the tower.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .options import Sample
from .resolution import ImageLayout, ImageTokenLever, ResolutionLever
from .token_pruning import PruneLever

# The candidate that leaves the prompt as given: (lever, its setting).
AS_GIVEN = ("lossless", None)


class AutoLever(ImageTokenLever):
    """tokens="auto": settings are (lever name, that lever's setting) of the levers the model's layout allows."""
    name, setting_name, timed = "auto", "setting", True

    def __init__(self, budget: float, metric: Callable | None, calibration: Sequence[Sample] | None,
                 settings: Sequence[Any] | None = None) -> None:
        super().__init__(budget, metric, calibration, settings)
        self.levers: dict[str, ImageTokenLever] = {lever.name: lever for lever in (
            ResolutionLever(budget, metric, calibration), PruneLever(budget, metric, calibration))}
        self.followed: list[str] = []  # the levers that can follow the model last given to layout()

    def parts(self) -> list[ImageTokenLever]:
        return list(self.levers.values())

    def layout(self, model: torch.nn.Module) -> ImageLayout | str:
        """The layout, if any lever can follow the model (those that can are `followed`); else every reason."""
        layouts = {name: lever.layout(model) for name, lever in self.levers.items()}
        self.followed = [name for name, layout in layouts.items() if isinstance(layout, ImageLayout)]
        if not self.followed:
            return "; ".join(f"{name}: {reason}" for name, reason in layouts.items())
        return layouts[self.followed[0]]

    def candidates(self, layout: ImageLayout) -> list[tuple[str, Any]]:
        return [AS_GIVEN] + [(name, setting) for name in self.followed
                             for setting in self.levers[name].candidates(layout)]

    def lossless(self, setting: tuple[str, Any]) -> bool:
        return setting == AS_GIVEN

    def tokens(self, layout: ImageLayout, setting: tuple[str, Any]) -> int:
        name, value = setting
        return layout.tokens(layout.image_size) if self.lossless(setting) else self.levers[name].tokens(layout, value)

    def label(self, setting: tuple[str, Any]) -> str:
        name, value = setting
        return name if self.lossless(setting) else f"{name} {self.levers[name].label(value)}"

    def prepared(self, model, layout, ids, mask, inputs) -> dict[str, Any]:
        """Each followed lever's prepared prompt, and the prompt as given."""
        return {AS_GIVEN[0]: (ids, mask, inputs),
                **{name: self.levers[name].prepared(model, layout, ids, mask, inputs) for name in self.followed}}

    def rewrite(self, layout, prepared, setting, pad_id) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | str:
        name, value = setting
        return prepared[name] if self.lossless(setting) else self.levers[name].rewrite(layout, prepared[name], value,
                                                                                        pad_id)

    def rewritten(self, model, layout, prompt, setting, pad_id) -> tuple[torch.Tensor, torch.Tensor,
                                                                          dict[str, Any]] | str:
        """Only the setting's own lever prepares the prompt: a resolution side pays no scoring pass."""
        name, value = setting
        return prompt if self.lossless(setting) else self.levers[name].rewritten(model, layout, prompt, value, pad_id)
