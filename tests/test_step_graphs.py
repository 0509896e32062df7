"""Recorded runs of steps (compiler/step_graphs.py): mmaccel.generate's decode blocks and speculative rounds. On
the CPU a replay calls the recorded function on the same buffers, so these tests run the flow a GPU replays
(buffers, state handed back through them, block sizes, stale-weight checks, fallback) except the capture."""
from __future__ import annotations

import warnings

import pytest
import torch

import mmaccel
from mmaccel.backends.triton import cudagraphs
from mmaccel.compiler import errors, generation, step_graphs
from tests import hf_tiny
from tests.test_generation import EAGER, hf_generate, left_padded_batch, one_thread  # noqa: F401 (fixture)


def block_sizes(model: torch.nn.Module) -> list[int]:
    return sorted(key[0] for key, graph in generation._session(model, EAGER).blocks.items() if graph is not None)


def test_decode_blocks_cover_every_length_and_match_hf() -> None:
    """After the first decode step, every step runs in a block of 8, 4, 2 or 1 (the tail); tokens equal HF's."""
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 4])
    for new_tokens, sizes in ((2, []), (3, [1]), (16, [1, 2, 4, 8]), (26, [1, 2, 4, 8])):
        expected = hf_generate(model, ids, mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=[],
                                  options=EAGER)
        assert torch.equal(actual, expected), new_tokens
        assert block_sizes(model) == sizes or new_tokens == 26  # 26 = 1 + 1 + 8 + 8 + 8: no new size
    sampled = [mmaccel.generate(model, ids, mask, max_new_tokens=13, do_sample=True, seed=5, pad_token_id=0,
                                options=options) for options in (EAGER, {**EAGER, "cuda_graphs": False})]
    assert torch.equal(*sampled)  # blocks against one call per step (cuda_graphs=False records nothing)


def flip_head_and_generate(model, ids, mask, new_tokens: int) -> list:
    """Negate the LM head in place, generate, check the tokens are HF's on the new weights; the warnings."""
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    expected = hf_generate(model, ids, mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=[],
                                  options=EAGER)
    assert torch.equal(actual, expected)
    return caught


def test_changed_weights_drop_the_recordings_and_compile_again() -> None:
    """Recordings skip the compiled steps' frozen-weight check: a weight changed in place drops them, and the
    steps are compiled again on the new weights (a new backend: optimized, not warning and running unfrozen);
    the next call's tokens are the new weights', the old graphs are retired, blocks are recorded again."""
    errors._warned.clear()
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([5])
    mmaccel.generate(model, ids, mask, max_new_tokens=10, pad_token_id=0, eos_token_id=[], options=EAGER)
    assert block_sizes(model) == [8]
    session = generation._session(model, EAGER)
    first = session.backend.report
    caught = flip_head_and_generate(model, ids, mask, 10)
    assert not [w for w in caught if "have changed since" in str(w.message)]  # nothing ran unfrozen
    assert session.report.recompiles == 1 and session.backend.report is not first
    assert {g.status for g in first.graphs} == {"stale"}  # retired: they let go of what they froze
    assert {g.status for g in session.backend.report.graphs} == {"optimized"}
    assert block_sizes(model) == [8]
    report = mmaccel.generation_report(model, **EAGER)
    assert "compiled again after 1 weight change" in str(report)
    assert [why for _, _, why in report.graphs] == ["first call"] * 2 + ["compiled again: the weights changed"] * 2


def test_weights_that_keep_changing_stop_recompiling_and_run_unfrozen() -> None:
    """After MAX_WEIGHT_RECOMPILES recompiles the next change warns once and the steps run unfrozen on the
    live weights (a training loop would recompile every call): tokens still the new weights'."""
    errors._warned.clear()
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([5])
    session = generation._session(model, EAGER)
    for change in range(generation.MAX_WEIGHT_RECOMPILES + 2):
        caught = flip_head_and_generate(model, ids, mask, 6)
        if change == generation.MAX_WEIGHT_RECOMPILES + 1:
            assert any("changed again after" in str(w.message) for w in caught)
    assert session.report.recompiles == generation.MAX_WEIGHT_RECOMPILES


def test_every_kind_of_weight_change_drops_the_recordings() -> None:
    """The check lists the module tables' entries once and again only after one of them was replaced: an
    unchanged model keeps its recordings; a parameter replaced by setattr, one put into its module's table
    directly (as accelerate does), a buffer's storage swapped and a replaced submodule each drop them."""
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([5])
    head = model.lm_head

    def swap_param():
        head.weight = torch.nn.Parameter(head.weight.detach().clone())

    def swap_table():
        head._parameters["weight"] = torch.nn.Parameter(head.weight.detach().clone())

    def swap_buffer_storage():
        rotary = model.model.rotary_emb
        rotary.inv_freq.data = rotary.inv_freq.clone()

    def swap_module():
        old = model.model.layers[0].mlp.down_proj
        model.model.layers[0].mlp.down_proj = torch.nn.Linear(old.in_features, old.out_features, bias=False)

    for change in (swap_param, swap_table, swap_buffer_storage, swap_module):
        mmaccel.generate(model, ids, mask, max_new_tokens=10, pad_token_id=0, eos_token_id=[], options=EAGER)
        session = generation._session(model, EAGER)
        assert session.blocks and not session.forget_stale_recordings()  # unchanged: kept
        change()
        assert session.forget_stale_recordings(), change.__name__
        assert not session.blocks


def test_a_capture_that_fails_warns_once_and_runs_the_steps(monkeypatch) -> None:
    def broken(self, run, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(step_graphs.StepGraph, "__init__", broken)
    errors._warned.clear()
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([6])
    expected = hf_generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=[])
    with pytest.warns(mmaccel.MmaccelFallbackWarning, match="could not record decode steps") as caught:
        actual = mmaccel.generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, eos_token_id=[],
                                  options=EAGER)
    assert torch.equal(actual, expected)
    assert sum("could not record" in str(w.message) for w in caught) == 1
    assert block_sizes(model) == [] and not generation._session(model, EAGER).cuda_graphs  # no more tries


def test_speculative_rounds_are_recorded_per_k_and_draft() -> None:
    """A round's k runs uncaptured once, then from its recording: tokens equal plain greedy across calls."""
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([7, 4])
    expected = hf_generate(model, ids, mask, max_new_tokens=20, do_sample=False, eos_token_id=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error", mmaccel.MmaccelFallbackWarning)  # a failing draft would fall back quietly
        for _ in range(3):
            actual = mmaccel.generate(model, ids, mask, max_new_tokens=20, pad_token_id=0, eos_token_id=[],
                                      draft="layers:1", speculative_k=3, options=EAGER)
            assert torch.equal(actual, expected)
    rounds = generation._session(model, EAGER).rounds
    (recorded,) = rounds.values()
    # One recording for k=3 over three calls: each call's new view of the shared cache is not a new key.
    assert recorded.warm == {3}
    assert [key[0] for key, graph in recorded.graphs.items() if isinstance(graph, step_graphs.StepGraph)] == [3]


def test_step_graph_copies_only_inputs_not_already_in_its_buffers() -> None:
    def run(count: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        count.copy_(count + step)  # the new state goes back into the buffer, as a decode block's does
        return count * 10

    graph = step_graphs.StepGraph(run, [torch.tensor([1]), torch.tensor([2])])
    assert int(graph.replay([torch.tensor([5]), torch.tensor([1])])) == 60
    assert int(graph.replay(graph.buffers)) == 70  # continues from its own buffers: no copy, state 7


def test_triton_runner_launches_plainly_under_an_outer_capture(monkeypatch) -> None:
    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    runner = cudagraphs.CudaGraphRunner(lambda args: "plain launch", gm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert runner([torch.ones(1)]) == "plain launch" and not runner.recordings


def test_recordings_keep_the_compiled_graphs_they_ran_alive_through_a_reset() -> None:
    """A recording's kernels read its compiled graphs' constants: what ran while it was captured
    (lowering.keeping_what_runs, which StepGraph opens around its capture) stays alive after
    torch._dynamo.reset() for as long as the recording holds it, and goes when the recording does. On an H200 a
    decode block replayed after a reset hit an illegal memory access (bench/probe_reconvert.py); the capture
    itself needs a GPU, so here the collector alone."""
    import gc
    import weakref

    from mmaccel.compiler.lowering import FrozenGraph, keeping_what_runs

    torch._dynamo.reset()
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids = torch.randint(3, 90, (1, 5))
    compiled = mmaccel.compile(model, target="eager")
    with torch.no_grad(), keeping_what_runs() as kept:
        compiled(ids)
        with keeping_what_runs() as inner:  # nested: the innermost collector takes them
            compiled(ids)
    assert inner and all(isinstance(g, FrozenGraph) for g in inner) and not kept - inner
    refs = [weakref.ref(g) for g in inner]
    del inner
    torch._dynamo.reset()
    gc.collect()
    assert all(r() is not None for r in refs)  # held by `kept`, as a recording holds its graphs
    del kept, compiled
    gc.collect()
    assert all(r() is None for r in refs)  # and freed with it


def test_quantized_steps_quantize_the_new_weights_after_a_change() -> None:
    """Without the recompile a changed weight made the quantized steps run unfrozen: the full-precision graph,
    no longer the quantization asked for. Now the new weights are quantized again: the tokens equal those of a
    fresh session on a copy of the changed model, and the new graphs report the quantize pass."""
    import copy

    options = dict(EAGER, quantize="int8_weight_only", accuracy_budget=0.05, weights="keep")
    model = hf_tiny.llama("sdpa", use_cache=True)
    ids, mask = left_padded_batch([5])
    mmaccel.generate(model, ids, mask, max_new_tokens=6, pad_token_id=0, eos_token_id=[], options=options)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(0.5)
    fresh = copy.deepcopy(model)
    actual = mmaccel.generate(model, ids, mask, max_new_tokens=6, pad_token_id=0, eos_token_id=[], options=options)
    expected = mmaccel.generate(fresh, ids, mask, max_new_tokens=6, pad_token_id=0, eos_token_id=[], options=options)
    assert torch.equal(actual, expected)
    session = generation._session(model, options)
    assert session.report.recompiles == 1
    assert all(g.status == "optimized" and g.matched("quantize") for g in session.backend.report.graphs)
