"""The Triton target's CUDA-graph recording policy (backends/triton/cudagraphs.py), on CPU: which call of a
shape records it, and which recordings are kept. Recording itself needs a GPU; here it is replaced by a stub
that notes the key, so the test checks the decisions, not the capture."""
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from mmaccel.backends.triton.cudagraphs import MAX_RECORDINGS, CudaGraphRunner, _rebindable, calls_before_recording


def _graph(symbolic: bool) -> fx.GraphModule:
    fn = lambda x: (x * 2).sum(-1)  # noqa: E731
    if not symbolic:
        return make_fx(fn)(torch.randn(2, 3))
    return make_fx(fn, tracing_mode="symbolic")(torch.randn(2, 3))


class _StubRunner(CudaGraphRunner):
    """Records by noting the key; a 'replay' is counted; every input counts as a CUDA tensor."""

    def __init__(self, gm: fx.GraphModule, record_after: int) -> None:
        super().__init__(lambda args: args[0] * 2, gm, record_after)
        self.recorded: list[tuple] = []
        self.replays = 0

    def key(self, args, addresses=True):
        return (tuple(args[0].shape),)

    def record(self, key, args):
        self.recorded.append(key)
        self.recordings[key] = (None, [], None)
        return self.run(args)

    def __call__(self, args):
        key = self.key(args)
        if key in self.recordings:
            self.recordings.move_to_end(key)
            self.replays += 1
            return self.run(args)
        return super().__call__(args)


def test_auto_records_static_graphs_at_once_and_symbolic_ones_on_the_second_call():
    assert calls_before_recording("auto", _graph(symbolic=False)) == 1
    assert calls_before_recording("auto", _graph(symbolic=True)) == 2
    assert calls_before_recording(True, _graph(symbolic=True)) == 1
    assert calls_before_recording(False, _graph(symbolic=False)) is None


def test_graphs_reading_host_tensors_beside_cuda_ones_are_not_recorded():
    """A CPU input is read at capture time only (a replay would reuse its old value) and a CPU tensor's copy to
    the GPU cannot be captured (tiny HF Mistral on an H200); a 0-dim CPU constant is a number and stays."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from mmaccel.backends.triton.cudagraphs import host_tensors

    def with_vals(*devices_and_shapes):
        gm = _graph(symbolic=False)
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake:
            vals = [torch.empty(shape, device=device) for device, shape in devices_and_shapes]
        for node, val in zip(gm.graph.nodes, vals):
            node.meta["val"] = val
        return gm

    assert host_tensors(with_vals(("cpu", (2, 3)), ("cpu", (2, 3)))) == []  # a CPU graph: nothing is "host"
    assert host_tensors(with_vals(("cuda", (2, 3)), ("cpu", ()), ("cuda", (2,)))) == []
    assert host_tensors(with_vals(("cuda", (2, 3)), ("cpu", (0,)), ("cuda", (2,)))) == ["mul"]
    graph = fx.Graph()
    scalar = graph.placeholder("scalar")
    graph.output(graph.call_function(torch.ops.aten._to_copy.default, (scalar,), {"device": "cuda"}))
    copied = fx.GraphModule(torch.nn.Module(), graph)
    with FakeTensorMode(allow_non_fake_inputs=True):
        scalar.meta["val"] = torch.empty(())
        copied.graph.output_node().args[0].meta["val"] = torch.empty((), device="cuda")
    assert host_tensors(copied) == ["scalar", "_to_copy_default"]
    mixed = with_vals(("cpu", (2, 3)), ("cuda", (2, 3)), ("cuda", (2,)))
    assert host_tensors(mixed) == ["x_1"]
    assert calls_before_recording("auto", mixed) is None


def test_a_symbolic_graph_records_a_length_seen_twice_never_one_seen_once():
    runner = _StubRunner(_graph(symbolic=True), record_after=2)
    for length in (5, 6, 7):  # prefills: each prompt length once
        runner([torch.randn(1, length)])
    assert runner.recorded == []
    for _ in range(10):  # decode steps at one cache length
        runner([torch.randn(1, 40)])
    assert runner.recorded == [((1, 40),)]
    assert runner.replays == 8


def test_past_the_limit_the_least_recently_used_recording_is_replaced(recwarn):
    runner = _StubRunner(_graph(symbolic=False), record_after=1)
    for length in range(MAX_RECORDINGS):
        runner([torch.randn(1, length + 1)])
    runner([torch.randn(1, 1)])  # used again: now the most recent
    runner([torch.randn(1, 100)])  # one more shape: evicts length 2, the least recently used
    assert ((1, 2),) not in runner.recordings and ((1, 1),) in runner.recordings
    assert len(runner.recordings) == MAX_RECORDINGS
    assert any("least recently used" in str(w.message) for w in recwarn)


def test_sightings_stay_bounded():
    runner = _StubRunner(_graph(symbolic=True), record_after=2)
    for length in range(10 * MAX_RECORDINGS):
        runner([torch.randn(1, length + 1)])
    assert len(runner.sightings) <= 4 * MAX_RECORDINGS and runner.recorded == []


def test_a_written_input_is_rebound_only_to_a_storage_nothing_else_holds():
    """A new cache may take over a recording's storage (adopt) only when neither storage is seen by anything else:
    the recording's alias alone on its side, the caller's tensor alone on the other, one layout."""
    ours, theirs = torch.zeros(4, 8), torch.ones(4, 8)
    assert _rebindable(ours, theirs)
    held = ours.detach()  # the old cache, still held by its caller
    assert not _rebindable(ours, theirs)
    del held
    view = theirs[:2]  # something else reads the new cache's storage
    assert not _rebindable(ours, theirs) and not _rebindable(ours, view)
    del view
    assert not _rebindable(ours, torch.ones(64)[:32].view(4, 8))  # a view of a larger storage
    assert not _rebindable(ours, torch.ones(5, 8)[:4])
    assert _rebindable(ours, theirs)


class _CpuRunner(CudaGraphRunner):
    """The real keys and rebinding on CPU tensors; recordings are put in by hand (capture needs a GPU)."""
    DEVICE_TYPE = "cpu"

    def __init__(self) -> None:
        super().__init__(lambda args: None, _graph(symbolic=False))

    def put(self, args):
        """A recording as record() keeps its inputs (no graph)."""
        static = self.static_inputs(args)
        self.recordings[self.key(args)] = (None, static, None)
        return static


def _marked(t: torch.Tensor) -> torch.Tensor:
    torch._dynamo.mark_static_address(t)
    return t


def test_a_new_marked_cache_takes_over_a_recording_whose_cache_is_gone_and_keeps_its_values():
    runner = _CpuRunner()
    x = torch.randn(3)
    static = runner.put([_marked(torch.randn(4, 8)), x])  # the caller's cache is gone: only the alias holds it
    new = _marked(torch.randn(4, 8))
    values = new.clone()
    assert runner.adopt([new, x])
    assert new.data_ptr() == static[0].data_ptr() and torch.equal(new, values)
    assert runner.key([new, x]) in runner.recordings


def test_no_takeover_while_the_old_cache_is_held_or_the_recording_pinned_other_inputs():
    runner = _CpuRunner()
    x = torch.randn(3)
    kept = _marked(torch.randn(4, 8))
    runner.put([kept, x])
    new = _marked(torch.randn(4, 8))
    assert not runner.adopt([new, x], collect=True) and new.data_ptr() != kept.data_ptr()  # the caller holds `kept`
    other = _CpuRunner()
    other.put([torch.randn(4, 8), x])  # recorded with an unmarked input there: it copies that input in each replay
    assert not other.adopt([new, x])


class _ReplayingCpuRunner(CudaGraphRunner):
    """The real policy on CPU tensors, with a stand-in for capture: a 'recording' reruns the graph on the inputs it
    keeps (the caller's storage for a pinned input, its own copy otherwise), as a replay reads them."""
    DEVICE_TYPE = "cpu"

    def __init__(self) -> None:
        fn = lambda big, x: (big * x).sum(-1)  # noqa: E731
        super().__init__(lambda args: [fn(*args)], make_fx(fn)(torch.randn(512, 512), torch.randn(512)))
        self.recorded: list[tuple] = []

    def record(self, key, args):
        self.recorded.append(key)
        result = self.run(list(args))
        static = self.static_inputs(args)
        outputs = [r.clone() for r in result]
        replay = type("Replay", (), {"replay": lambda _: outputs.__setitem__(slice(None), self.run(list(static)))})()
        self.recordings[key] = (replay, static, outputs)
        return result


def test_a_large_input_read_at_one_address_is_pinned_then_taken_over_and_unpinned_when_held():
    """Whisper's cross-attention cache in HF's recipe: unmarked, only read, at one address for a whole generate()
    call. After STABLE_CALLS calls it is read in place (no copy per call); a new one takes over that recording;
    one that arrives while the old is still held sends the input back to being copied, never recording per call."""
    from mmaccel.backends.triton.cudagraphs import STABLE_CALLS

    runner = _ReplayingCpuRunner()
    x = torch.randn(512)

    def check(big):
        torch.testing.assert_close(runner([big, x])[0], (big * x).sum(-1))

    big = torch.randn(512, 512)
    for _ in range(STABLE_CALLS + 2):
        check(big)
        big.mul_(1.5)  # its owner writes it between calls: a pinned input is read where it is, with these values
    assert runner.stable == {0} and len(runner.recorded) == 2 and len(runner.recordings) == 1
    (_, static, _), = runner.recordings.values()
    assert static[0].data_ptr() == big.data_ptr()  # read in place, not a copy
    del big, static
    new = torch.randn(512, 512)
    values = new.clone()
    check(new)  # a new one takes the recording over: its values copied there once, no recording
    assert torch.equal(new, values) and len(runner.recorded) == 2
    held = torch.randn(512, 512)
    held_values = held.clone()
    check(held)  # `new` is still held: back to copying, one recording, and `new` untouched
    assert runner.stable == set() and runner.unsteady == {0} and len(runner.recorded) == 3
    for _ in range(4):
        check(new)
        check(held)
    assert len(runner.recorded) == 3 and torch.equal(held, held_values) and torch.equal(new, values)


def test_a_stable_input_stays_pinned_when_a_call_records_for_another_held_input():
    """The call records because a written input (a KV cache) is still held, not because of the stable one: that one
    stays pinned (HF's recipe with past_key_values kept from the last call)."""
    from mmaccel.backends.triton.cudagraphs import STABLE_CALLS

    runner = _ReplayingCpuRunner()
    runner.mutated = {1}  # stands for the cache the step writes
    big, cache = torch.randn(512, 512), torch.randn(512)
    for _ in range(STABLE_CALLS):
        torch.testing.assert_close(runner([big, cache])[0], (big * cache).sum(-1))
    assert runner.stable == {0}
    recorded = len(runner.recorded)
    other = torch.randn(512)  # a new cache while `cache` is still held
    torch.testing.assert_close(runner([big, other])[0], (big * other).sum(-1))
    assert runner.stable == {0} and runner.unsteady == set() and len(runner.recorded) == recorded + 1


def test_a_small_input_is_copied_even_at_one_address():
    from mmaccel.backends.triton.cudagraphs import STABLE_CALLS

    runner = _ReplayingCpuRunner()
    small, x = torch.randn(8, 512), torch.randn(512)
    for _ in range(2 * STABLE_CALLS):
        torch.testing.assert_close(runner([small, x])[0], (small * x).sum(-1))
    assert runner.stable == set() and len(runner.recorded) == 1


def test_a_graph_whose_capture_fails_returns_the_real_result_and_is_never_recorded_again(recwarn):
    """transformers' fp32 mixture-of-experts fallback (offs.tolist()) and Idefics3's boolean-mask indexing read
    values back from the GPU, which a capture refuses: the error reached the caller (tiny Mixtral, Qwen2-MoE,
    OLMoE and Idefics3 on an H200). Now the call returns what its real run computed, one warning names the
    reason, and later calls run plainly without trying to record again."""

    class FailingCapture(CudaGraphRunner):
        DEVICE_TYPE = "cpu"

        def __init__(self) -> None:
            super().__init__(lambda args: args[0] * 2, _graph(symbolic=False))
            self.runs = self.captures = 0
            self.run = self.counted

        def counted(self, args):
            self.runs += 1
            return args[0] * 2

        def warm_up(self, args):
            return self.run(list(args)), None

        def capture(self, static, stream):
            self.captures += 1
            raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture unless the CPU "
                               "tensor is pinned.\nmore lines")

    runner = FailingCapture()
    x = torch.randn(2, 3)
    for _ in range(3):
        assert torch.equal(runner([x]), x * 2)
    assert runner.captures == 1 and runner.runs == 3 and not runner.recordings
    messages = [str(w.message) for w in recwarn if "cannot be recorded as a CUDA graph" in str(w.message)]
    assert len(messages) == 1 and "Cannot copy between CPU and CUDA" in messages[0], messages
