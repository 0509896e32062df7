"""The lossy mechanism's solver (passes/lossy.py), on sites whose errors are given: where the sites' errors alone
say a mix fits and the mix measures over budget (token merges compound), the mix is upgraded by errors measured in
its context. The levers themselves are tested in test_quantize.py, test_prune.py and test_tokens.py."""
from __future__ import annotations

import pytest

from mmaccel.passes import lossy
from mmaccel.passes.lossy import ORIGINAL, Site, improve_in_context, solve

LADDER = ("r40%", "r8%", ORIGINAL)
# a tower of 10 tokens and 3 blocks: site cost (10 - r) * blocks from it on, r40% = 4 tokens, r8% = 1
COSTS = {"a": (18, 27, 30), "b": (12, 18, 20), "c": (6, 9, 10)}
# measured errors of whole mixes (a, b, c), as on the trained digits tower (bench/token_merge_accuracy.py): alone,
# only r40% before the first block shows; r8% there is harmless alone but not under r40% after it
MIXES = {("r8%", "r40%", "r40%"): 0.011, (ORIGINAL, "r40%", "r40%"): 0.003, ("r8%", "r8%", "r40%"): 0.008,
         ("r8%", ORIGINAL, "r40%"): 0.008, ("r8%", "r40%", "r8%"): 0.011, ("r8%", "r40%", ORIGINAL): 0.011}


def _sites() -> list[Site]:
    sites = [Site(n, f"vit.layers.{i}", (1, 10, 8), COSTS[n][-1], LADDER, {ORIGINAL: 0.0}, lever="tokens")
             for i, n in enumerate("abc")]
    for site in sites:
        for option in LADDER[:-1]:
            site.sensitivity[option] = _measure({site.key: option})
    return sites


def _measure(choice: dict[tuple[str, str], str]) -> float:
    mix = tuple(choice.get(("tokens", n), ORIGINAL) for n in "abc")
    if sum(p != ORIGINAL for p in mix) == 1:
        return 0.13 if mix[0] == "r40%" else 0.0
    return MIXES[mix]


def _cost(site: Site, option: str) -> int:
    return COSTS[site.node][LADDER.index(option)]


def test_a_mix_over_budget_is_upgraded_by_errors_measured_in_context() -> None:
    sites = _sites()
    alone = solve(sites, _cost, 0.01)  # the errors alone: r8% first, r40% after, estimated 0
    assert list(alone.values()) == ["r8%", "r40%", "r40%"] and _measure(alone) > 0.01
    chosen, error, steps = improve_in_context(sites, alone, _measure(alone), 0.01, _cost, _measure)
    # first block left whole: 0.008 removed for 3 token-blocks, more per cost than any move after it
    assert list(chosen.values()) == [ORIGINAL, "r40%", "r40%"] and error == 0.003 and steps == 1


def test_in_context_gives_up_past_its_measurements(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five moves to measure, three allowed (half the six sensitivities): the mix comes back as it was, over budget
    (apply_levers rolls back)."""
    monkeypatch.setattr(lossy, "IN_CONTEXT_PER_SENSITIVITY", 0.5)
    alone = solve(_sites(), _cost, 0.01)
    assert improve_in_context(_sites(), alone, 0.011, 0.01, _cost, _measure) == (alone, 0.011, 0)
