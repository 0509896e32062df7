"""The helpers every bench/ script shares: the timer (mmaccel/timing.py) and bench/common.py (environment record,
floors, result files written whole or not at all)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
from pathlib import Path

import pytest

from mmaccel import timing

BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


class FakeClock:
    """perf_counter for mmaccel.timing: each call of the timed function takes the next scripted duration (s)."""

    def __init__(self, monkeypatch, durations: list[float]):
        self.now, self.durations, self.calls = 0.0, list(durations), []
        monkeypatch.setattr(timing.time, "perf_counter", lambda: self.now)

    def fn(self, name: str = "fn"):
        def call():
            self.calls.append(name)
            self.now += self.durations.pop(0)
        return call


def test_times_ms_warms_up_then_times_each_call(monkeypatch) -> None:
    clock = FakeClock(monkeypatch, [9.0, 9.0, 0.004, 0.001, 0.003, 0.002, 0.005])
    times = timing.times_ms(clock.fn(), repeats=5, warmup=2)
    assert len(clock.calls) == 7
    assert times == pytest.approx([4.0, 1.0, 3.0, 2.0, 5.0])  # the 9 s warm-ups are not among them


def test_median_ms_is_the_median_of_the_timed_calls(monkeypatch) -> None:
    durations = [0.001, 0.010, 0.002, 0.007]
    clock = FakeClock(monkeypatch, [1.0] + durations)
    assert timing.median_ms(clock.fn(), repeats=4, warmup=1, device="cpu") == \
        pytest.approx(statistics.median(d * 1e3 for d in durations))


def test_before_runs_untimed_ahead_of_each_timed_call(monkeypatch) -> None:
    clock = FakeClock(monkeypatch, [0.5, 0.001, 0.5, 0.002, 0.5, 0.003])
    times = timing.times_ms(clock.fn(), repeats=3, warmup=0, before=clock.fn("flush"))
    assert clock.calls == ["flush", "fn"] * 3
    assert times == pytest.approx([1.0, 2.0, 3.0])


def test_interleaved_rounds_time_each_function_once_per_round(monkeypatch) -> None:
    clock = FakeClock(monkeypatch, [0.0] * 4 + [0.001, 0.002] * 3)
    times = timing.interleaved_times_ms({"a": clock.fn("a"), "b": clock.fn("b")}, repeats=3, warmup=2)
    assert clock.calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert times == {"a": pytest.approx([1.0] * 3), "b": pytest.approx([2.0] * 3)}


def test_environment_records_versions_device_and_commit(monkeypatch) -> None:
    monkeypatch.setenv("MMACCEL_GEMV_TUNE", "0")
    env = common.environment("cpu", threads=2)
    assert env["switches"].get("MMACCEL_GEMV_TUNE") == "0"
    for field in ("date", "device", "cpu_count", "torch", "triton", "onnxruntime", "transformers", "python",
                  "mmaccel", "git_commit"):
        assert field in env, field
    assert env["threads"] == 2 and env["cpu_count"] == os.cpu_count()
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
    json.dumps(env)  # it goes into the result file as it is


def test_floors_take_the_larger_of_memory_and_compute() -> None:
    hardware = {"copy_gb_s": 1000.0, "matmul_tflop_s": 100.0}
    memory = common.floors(moved_bytes=2e9, flops=1e9, hardware=hardware)  # 2 ms of bytes, 0.01 ms of FLOPs
    assert memory["floor_ms"] == pytest.approx(2.0) and memory["bound"] == "memory"
    compute = common.floors(moved_bytes=1e6, flops=1e12, hardware=hardware)
    assert compute["floor_ms"] == pytest.approx(10.0) and compute["bound"] == "compute"


def test_measure_hardware_on_cpu() -> None:
    import torch

    hw = common.measure_hardware(torch.device("cpu"), torch.float32)
    assert hw["copy_gb_s"] > 0 and hw["matmul_tflop_s"] > 0


def test_write_json_leaves_the_old_file_when_serialization_fails(tmp_path) -> None:
    path = tmp_path / "results" / "r.json"
    common.write_json(str(path), {"results": [1]})
    assert json.loads(path.read_text()) == {"results": [1]}
    with pytest.raises(TypeError):
        common.write_json(str(path), {"results": [object()]})
    assert json.loads(path.read_text()) == {"results": [1]}
    assert os.listdir(path.parent) == ["r.json"]  # no temporary file left behind


def test_write_png_writes_nothing_when_the_plot_fails(tmp_path, capsys) -> None:
    def half_a_plot(data, png):
        Path(png).write_bytes(b"\x89PNG half")
        raise ImportError("No module named 'matplotlib'")

    png = tmp_path / "r.png"
    assert common.write_png(half_a_plot, {}, str(png), "python bench/plot.py r.json") is None
    assert os.listdir(tmp_path) == []
    assert "python bench/plot.py r.json" in capsys.readouterr().out
    assert common.write_png(lambda data, p: Path(p).write_bytes(b"\x89PNG"), {}, str(png), "") == str(png)
    assert png.read_bytes() == b"\x89PNG" and os.listdir(tmp_path) == ["r.png"]


def test_default_out_follows_OUT(monkeypatch) -> None:
    monkeypatch.delenv("OUT", raising=False)
    assert common.default_out("x.json") == str(BENCH / "results" / "x.json")
    monkeypatch.setenv("OUT", "/tmp/out")
    assert common.default_out("x.json") == "/tmp/out/x.json"
