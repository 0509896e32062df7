"""CUDA graphs for the Triton target: a decode step is hundreds of small kernels whose launch costs more
than their work; replaying one recorded graph removes that cost.

Correctness rules:
- a recording is keyed by every input's shape, strides and dtype; an input the graph writes in place
  (a KV cache) is also keyed by its address, since the recording writes to that address, and so is one its
  owner marked as keeping its address (`torch._dynamo.mark_static_address`: transformers' static caches, also
  the cross-attention cache a decode step only reads), which is then read where it is, not copied each call;
- a written input that arrives at a new address takes over a recording whose own such storage nothing else
  holds any more, instead of recording again: its values are copied there and the caller's tensor is rebound
  to that storage (`Tensor.set_`), so what the caller holds is what the replay writes. Hugging Face's compiled
  recipe makes a new static cache in every generate() call; recording each time cost the Whisper 8+8 decode
  33 ms a call and kept up to MAX_RECORDINGS dead caches alive (H200, bench/profile_generate.py --recipe).
  Never done when anything else shares either storage (a view, an alias, a cache the user kept): that call
  records as before;
- other inputs are copied into the recording's own buffers when their address differs, except a large one the
  graph only reads that arrived at one address STABLE_CALLS calls in a row: from then on it is pinned like a
  marked one (read in place, taken over by a new one). Hugging Face's recipe creates Whisper's cross-attention
  cache inside the compiled prefill, where transformers skips mark_static_address, and the decode step copied
  all of it in every token: 27 device copies, 0.10 of 0.78 ms of GPU time per token at large-v3 dims with 8
  decoder layers (H200, bench/profile_generate.py --recipe). One that then moves and cannot take over itself
  (its old storage still held, or the new one shared) goes back to being copied, for good, rather than recording
  on every call;
- the call that records runs the graph for real (on a side stream, which also warms up kernels and
  libraries) and returns those results; capturing executes nothing, so in-place writes happen once;
- every recording warms up and captures on one stream per device: cuBLAS keeps a workspace per stream it has
  run on (32 MiB each on Hopper), so a new warm-up stream per recording, beside torch's capture stream, held
  32 MiB more for every recording (H200, `bench/hf_memory.py --explain`, one recording: 4 live workspaces of
  32 MiB, 0.036x of an 8-layer 7B model's bf16 weights, two of them the recording's);
- outputs are copied out of the recording's buffers, so the next replay never overwrites what a caller holds;
- at most MAX_RECORDINGS shapes are kept; a new one past that replaces the least recently used (one warning).

Graphs with symbolic sizes (Dynamo made a length dynamic: Hugging Face's compiled-generate recipe after the
second prompt or max_new_tokens) record a shape on its second call, not its first: a decode step at one cache
length runs once per token, hundreds of times, while a prefill at a new prompt length runs once; recording that
one would cost a capture and pool memory for nothing.

Under an outer capture (mmaccel.generate recording several steps as one graph) the kernels launch plainly into it.
"""
from __future__ import annotations

import gc
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ...compiler._torch_internals import marked_static_address, tensors_sharing_storage
from ...compiler.errors import warn_once

MAX_RECORDINGS = 8
# Read-only inputs watched for a stable address: smaller ones cost less to copy (one launch, ~5 us of host time
# either way) than the recording a change of pinning takes
STABLE_BYTES = 1 << 20
STABLE_CALLS = 3
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy.default, torch.ops.aten.copy_.default)
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}  # the warm-up and capture stream of each device


def _recording_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def calls_before_recording(option: Any, gm: fx.GraphModule) -> int | None:
    """On which call of a shape it is recorded; None: no CUDA graphs. "auto": on the first call when every
    size is static, on the second when some are symbolic (module docstring); True: always on the first.
    Measured on an H200 (bench/results/gpu_triton_*), replay beat plain launches on every benchmarked model,
    from a decode step to ViT-L batch 8, because the generated launchers cost tens of microseconds of Python
    each; with symbolic sizes, plain launches took the HF-recipe decode step from about 3 to 8-13 ms per token
    (issue 13). The price is memory: recorded shapes keep their activations in one private pool."""
    if option is False:
        return None
    host = host_tensors(gm)
    if host:
        warn_once(f"mmaccel: a graph that reads host (CPU) tensors beside CUDA ones ({', '.join(host[:3])}) runs "
                  "without CUDA graphs: a recording would replay their values from the capture, or fail copying "
                  "them; it runs correctly, with a launch per kernel")
        return None
    return 2 if option == "auto" and has_symbolic_sizes(gm) else 1


def host_tensors(gm: fx.GraphModule) -> list[str]:
    """Nodes of a CUDA graph that a recording cannot replay: a CPU input (read at capture time only), a CPU
    tensor with dimensions or a copy of a CPU tensor to the GPU (a host-to-device copy cannot be captured). A
    0-dim CPU constant that ops read as a number (a scalar the graph was traced with) stays."""
    vals = [(node, node.meta.get("val")) for node in gm.graph.nodes]
    vals = [(node, val) for node, val in vals if isinstance(val, torch.Tensor)]
    if not any(val.device.type == "cuda" for _, val in vals):
        return []
    host = {node for node, val in vals if val.device.type == "cpu"}
    return [node.name for node, val in vals if node in host and (node.op == "placeholder" or val.dim())
            or node not in host and node.target in _COPIES and any(n in host for n in node.all_input_nodes)]


def has_symbolic_sizes(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        vals = node.meta.get("val")
        for v in vals if isinstance(vals, (tuple, list)) else (vals,):
            if isinstance(v, torch.SymInt) or isinstance(v, torch.Tensor) and not all(isinstance(s, int) for s in v.shape):
                return True
    return False


def mutated_inputs(gm: fx.GraphModule) -> set[int]:
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    written = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for i in getattr(node.target, "writes_inputs", ()):  # generated kernels that store into an input
            if node.args[i] in placeholders:
                written.add(placeholders.index(node.args[i]))
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.is_mutable:
            continue
        for arg, spec in zip(node.args, schema.arguments):
            if spec.alias_info is not None and spec.alias_info.is_write and arg in placeholders:
                written.add(placeholders.index(arg))
    return written


class CudaGraphRunner:
    DEVICE_TYPE = "cuda"  # the inputs it records (tests of the keys and rebinding use CPU tensors)

    def __init__(self, run: Callable[[list[Any]], Any], gm: fx.GraphModule, record_after: int = 1) -> None:
        self.run = run
        self.kernels = getattr(run, "kernels", None)
        self.mutated = mutated_inputs(gm)
        self.recordings: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, list[Any], Any]] = OrderedDict()
        self.pool = None
        self.record_after = record_after
        self.sightings: OrderedDict[tuple, int] = OrderedDict()
        self.stable: set[int] = set()  # read-only inputs pinned after STABLE_CALLS calls at one address
        self.unsteady: set[int] = set()  # once stable, then moved and could not take over: copied for good
        self.watched: dict[int, tuple[int, int]] | None = None  # input -> (address, calls in a row there)

    def key(self, args: Sequence[Any], addresses: bool = True) -> tuple | None:
        """Per input (shape, strides, dtype, device index, address if pinned), or the value of a number; None
        when an input is not a tensor of DEVICE_TYPE. Computed on every call: cheap attributes only (torch.Size
        as it is, the device's index, not a torch.device built twice): 29 instead of 55 us for 55 inputs, 24 of them
        pinned, on this project's 2-core CPU."""
        parts = []
        cuda = self.DEVICE_TYPE == "cuda"
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if not (a.is_cuda if cuda else a.is_cpu):
                    return None
                address = a.data_ptr() if addresses and self.pinned(i, a) else None
                parts.append((a.shape, a.stride(), a.dtype, a.get_device(), address))
            elif isinstance(a, (int, float, bool)):
                parts.append(a)
            else:
                return None
        return tuple(parts)

    def __call__(self, args: list[Any]) -> Any:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # Inside an outer recording (several steps as one graph: compiler/step_graphs.py): launch plainly,
            # so these kernels land in that graph; a replay of this one cannot be captured into it.
            return self.run(args)
        key = self.key(args) if self.record_after is not None else None
        if key is None:  # not all CUDA tensors, or a graph that cannot be recorded (record)
            return self.run(args)
        if self.watch(args):
            key = self.key(args)
        entry = self.recordings.get(key)
        if entry is None and self.adopt(args):
            key = self.key(args)
            entry = self.recordings.get(key)
        if entry is None:
            if not self.due(key):
                return self.run(args)
            # about to record: first collect what reference cycles keep (a cache its caller dropped can sit in one
            # until Python's collector runs; Dynamo's first call keeps its inputs so), which costs less than a recording
            if self.adopt(args, collect=True):
                key = self.key(args)
                entry = self.recordings.get(key)
            elif self.unsettle(key, args):
                key = self.key(args)
                entry = self.recordings.get(key)
        if entry is None:
            if len(self.recordings) >= MAX_RECORDINGS:
                warn_once(f"mmaccel: {MAX_RECORDINGS} CUDA graphs recorded for one compiled graph (input shapes or "
                          "cache addresses keep changing); the least recently used ones are re-recorded as needed")
                self.recordings.popitem(last=False)
            return self.record(key, args)
        self.recordings.move_to_end(key)
        graph, static, outputs = entry
        for s, a in zip(static, args):  # pinned inputs matched the key by address: never copied here
            if isinstance(a, torch.Tensor) and s.data_ptr() != a.data_ptr():
                s.copy_(a)
        graph.replay()
        return _copy_out(outputs)

    def static_inputs(self, args: list[Any]) -> list[Any]:
        """What a recording reads: for a pinned input an alias of the caller's tensor, which keeps the storage
        the recording uses alive and is how adopt() sees that the caller's tensor is gone; for the others the
        recording's own copy."""
        return [a if not isinstance(a, torch.Tensor) else a.detach() if self.pinned(i, a) else a.clone()
                for i, a in enumerate(args)]

    def pinned(self, i: int, a: torch.Tensor) -> bool:
        """Whether input `i` is read and written where it is (keyed by address, never copied in)."""
        return i in self.mutated or i in self.stable or marked_static_address(a)

    def watch(self, args: list[Any]) -> bool:
        """Counts the calls in a row at which each large read-only input kept its address; at STABLE_CALLS it is
        pinned, and the recordings that copy it are dropped (no key of theirs matches again); whether one was."""
        if self.watched is None:
            self.watched = {i: (0, 0) for i, a in enumerate(args) if isinstance(a, torch.Tensor)
                            and not self.pinned(i, a) and a.untyped_storage().nbytes() >= STABLE_BYTES}
        promoted = False
        for i, (address, calls) in list(self.watched.items()):
            now = args[i].data_ptr()
            calls = calls + 1 if now == address else 1
            if calls < STABLE_CALLS:
                self.watched[i] = (now, calls)
                continue
            del self.watched[i]
            self.stable.add(i)
            self.recordings = OrderedDict((k, v) for k, v in self.recordings.items() if k[i][4] is not None)
            promoted = True
        return promoted

    def unsettle(self, key: tuple, args: list[Any]) -> bool:
        """A call about to record because an input pinned as stable moved and could not take over (its old
        storage still held, or the new one shared): that input goes back to being copied in, for good (recording on
        each such call would cost far more), and the recordings that pinned it are dropped; whether one did. One
        that could have taken over stays pinned: the call records for another input (a KV cache still held)."""
        shapes = _without_addresses(key)
        moved = {i for k, (_, static, _) in self.recordings.items() if _without_addresses(k) == shapes
                 for i in self.stable if k[i][4] != key[i][4] and not _rebindable(static[i], args[i])}
        if not moved:
            return False
        self.stable -= moved
        self.unsteady |= moved
        self.recordings = OrderedDict((k, v) for k, v in self.recordings.items()
                                      if all(k[i][4] is None for i in moved))
        return True

    def adopt(self, args: list[Any], collect: bool = False) -> bool:
        """Rebinds the pinned inputs of `args` to the storages of a recording of the same shapes whose pinned
        inputs nothing else holds (module docstring); whether one was found. `collect`: run Python's cycle
        collector first, when there is such a recording."""
        wanted = self.key(args, addresses=False)
        candidates = [(key, static) for key, (_, static, _) in reversed(self.recordings.items())  # most recent first
                      if _without_addresses(key) == wanted]
        if candidates and collect:
            gc.collect()
        pinned = {i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and self.pinned(i, a)}
        for key, static in candidates:
            # only a recording that pinned the same inputs: an input it copies in must never share a caller's storage
            if pinned != {i for i, part in enumerate(key) if isinstance(part, tuple) and part[4] is not None}:
                continue
            moved = [i for i in sorted(pinned) if static[i].data_ptr() != args[i].data_ptr()]
            if not moved or not all(_rebindable(static[i], args[i]) for i in moved):
                continue
            try:
                for i in moved:
                    static[i].copy_(args[i])
                    args[i].set_(static[i])
            except RuntimeError:  # e.g. an inference tensor outside inference mode; each rebind done kept its values
                return False
            return True
        return False

    def due(self, key: tuple) -> bool:
        """Whether this call of an unrecorded shape records it (counts sightings, bounded like recordings)."""
        seen = self.sightings.pop(key, 0) + 1
        if seen >= self.record_after:
            return True
        self.sightings[key] = seen
        if len(self.sightings) > 4 * MAX_RECORDINGS:
            self.sightings.popitem(last=False)
        return False

    def record(self, key: tuple, args: list[Any]) -> Any:
        """Runs the call for real (on the recording stream: it warms up kernels and libraries), then records it.
        A graph whose capture fails (one that reads a value back from the GPU: transformers' fp32
        mixture-of-experts fallback calls offs.tolist(), Idefics3 indexes with a boolean mask) is never recorded
        again, with one warning, and keeps running with a launch per kernel; the real call's result stands, since
        capturing executes nothing. Found on an H200 by bench/hf_generate_coverage.py --device cuda, where the
        capture error reached the caller."""
        result, stream = self.warm_up(args)
        try:
            self.recordings[key] = self.capture(self.static_inputs(args), stream)
        except Exception as error:  # noqa: BLE001 - the model's code is the user's: whatever breaks the capture
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.record_after = None
            self.recordings.clear()
            warn_once(f"mmaccel: a compiled graph cannot be recorded as a CUDA graph ({type(error).__name__}: "
                      f"{str(error).splitlines()[0][:160]}); it runs with a launch per kernel: correct, slower on "
                      "small models")
        return result

    def warm_up(self, args: list[Any]) -> tuple[Any, torch.cuda.Stream]:
        """The real call, on the recording stream, and that stream."""
        stream = _recording_stream(torch.device("cuda", torch.cuda.current_device()))
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            result = self.run(list(args))
        torch.cuda.current_stream().wait_stream(stream)
        return result, stream

    def capture(self, static: list[Any], stream: torch.cuda.Stream) -> tuple[torch.cuda.CUDAGraph, list[Any], Any]:
        """(graph, static inputs, outputs) of one capture of the call over `static`."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            outputs = self.run(list(static))
        return graph, static, outputs


def _without_addresses(key: tuple) -> tuple:
    return tuple(p[:4] + (None,) if isinstance(p, tuple) else p for p in key)


def _rebindable(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether `theirs` may be rebound to the storage of `ours` (a recording's alias of a written input): nothing
    but `ours` holds that storage, nothing but `theirs` holds its own, and both storages have one layout."""
    return (tensors_sharing_storage(ours) == 1 and tensors_sharing_storage(theirs) == 1 and theirs._base is None
            and theirs.storage_offset() == ours.storage_offset()
            and theirs.untyped_storage().nbytes() == ours.untyped_storage().nbytes())


def _copy_out(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_copy_out(o) for o in outputs)
    return outputs
