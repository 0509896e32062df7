"""What every bench/ script shares besides the timer (mmaccel/timing.py): the error measure, the roofline
(floors from measured copy bandwidth and matmul rate), the environment a result was measured in, and result
files (JSON, PNG) written whole or not at all, by default under bench/results/ ($OUT/ when OUT is set, as on
the GPU machine). Scripts run as `python bench/<script>.py`, which puts this folder on sys.path.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Callable

import torch

import mmaccel
from mmaccel.timing import median_ms

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
# Versions recorded when installed (None otherwise), read from package metadata so nothing heavy is imported.
PACKAGES = ("triton", "onnxruntime", "onnx", "transformers", "numpy")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def gb_per_s(nbytes: float, us: float) -> float:
    return nbytes / us / 1e3


# ----------------------------------------------------------------------------------------------- roofline
def measure_hardware(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """The two roofs of the floors: copy bandwidth (read + write bytes of a 1 GiB device copy; 64 MiB off GPU)
    and the matmul rate in `dtype` (8192^3; 1024^3 off GPU)."""
    on_gpu = device.type == "cuda"
    nbytes, n = (1 << 30, 8192) if on_gpu else (1 << 26, 1024)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), 20, 5, device)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    c = torch.empty_like(a)
    matmul_ms = median_ms(lambda: torch.mm(a, b, out=c), 20, 5, device)
    del src, dst, a, b, c
    if on_gpu:
        torch.cuda.empty_cache()
    return {"copy_bytes": nbytes, "copy_gb_s": 2 * nbytes / copy_ms / 1e6,
            "matmul_n": n, "matmul_tflop_s": 2 * n**3 / matmul_ms / 1e9}


def floors(moved_bytes: float, flops: float, hardware: dict[str, float]) -> dict[str, Any]:
    """memory floor = bytes / copy bandwidth, compute floor = FLOPs / matmul rate, floor = the larger."""
    memory_ms = moved_bytes / hardware["copy_gb_s"] / 1e6
    compute_ms = flops / hardware["matmul_tflop_s"] / 1e9
    return {"memory_floor_ms": memory_ms, "compute_floor_ms": compute_ms, "floor_ms": max(memory_ms, compute_ms),
            "bound": "memory" if memory_ms >= compute_ms else "compute"}


# ----------------------------------------------------------------------------------------------- environment
def _command_output(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str = "cpu", **extra: Any) -> dict[str, Any]:
    """Where and with what a result was measured; `extra`: the script's own settings (threads, repeats, ...)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine(),
        "driver": _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if on_gpu else None,
        "cuda": torch.version.cuda,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        **{name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "mmaccel": mmaccel.__version__,
        "git_commit": _command_output(["git", "-C", BENCH_DIR, "rev-parse", "HEAD"]),
        # the measurement switches (MMACCEL_PDL=0, MMACCEL_GEMV_TUNE=0, ...): an A/B pair of runs says which is which
        "switches": {name: value for name, value in sorted(os.environ.items()) if name.startswith("MMACCEL_")},
        **extra,
    }


# ----------------------------------------------------------------------------------------------- result files
def start_memory(device: torch.device | str) -> None:
    """Begin a memory_row: on CUDA, the peak counts from here."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def memory_row(device: torch.device | str) -> dict[str, int]:
    """On CUDA, bytes allocated now ("steady": the model, its compiled graphs, their recordings and caches) and
    the most allocated since start_memory ("peak": compile included), for the row beside its latency (issue 21:
    every latency the benches measure comes with its memory). Empty on CPU (no allocator statistics)."""
    if torch.device(device).type != "cuda":
        return {}
    torch.cuda.synchronize()
    return {"steady_bytes": torch.cuda.memory_allocated(), "peak_bytes": torch.cuda.max_memory_allocated()}


def other_jobs_start() -> tuple[float, float, float]:
    """Begin an other_jobs_cores interval."""
    own = os.times()
    return _busy_cpu_seconds(), own.user + own.system, time.perf_counter()


def other_jobs_cores(start: tuple[float, float, float]) -> float:
    """How many cores other processes kept busy since `start` (other_jobs_start): the machine's busy CPU time
    less this process's (all its threads), over the wall time. On a shared machine it tells the interleaved
    rounds that ran alone (near 0) from those beside another job (the 1-minute load average lags by minutes)."""
    busy, own, wall = start
    now = os.times()
    other = (_busy_cpu_seconds() - busy) - (now.user + now.system - own)
    return round(max(other, 0.0) / max(time.perf_counter() - wall, 1e-9), 2)


def _busy_cpu_seconds() -> float:
    """Seconds all cores have spent neither idle nor waiting for I/O, from /proc/stat (Linux; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def default_out(filename: str) -> str:
    """$OUT/<filename> when OUT is set (the GPU machine sends back what lands there), else bench/results/."""
    return os.path.join(os.environ.get("OUT") or RESULTS_DIR, filename)


def _replace_atomically(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` a file beside `path`, then rename it over `path`: a reader (or a crash) never sees half a
    file, and a failed write leaves the old file as it was."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.{os.getpid()}.tmp{ext}")  # same extension: savefig reads the format
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, data: Any, indent: int = 2) -> None:
    text = json.dumps(data, indent=indent)  # serialized before any file is touched

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _replace_atomically(path, write)


def png_beside(json_path: str) -> str:
    return os.path.splitext(json_path)[0] + ".png"


def write_png(plot: Callable[[Any, str], None], data: Any, png: str, hint: str) -> str | None:
    """`plot(data, png)`, written whole or not at all. The JSON is written first, so a missing matplotlib (or a
    plotting bug) costs only the PNG: say so, with `hint` (how to draw it later). Returns the PNG's path."""
    try:
        _replace_atomically(png, lambda tmp: plot(data, tmp))
    except Exception as e:
        print(f"no plot ({type(e).__name__}: {e}); on a machine with matplotlib: {hint}")
        return None
    print(f"wrote {png}")
    return png


def run_models(names: list[str], run: Callable[[str], list[Any]], data: dict[str, Any], out: str,
               plot: Callable[[Any, str], None], script: str) -> None:
    """data["results"] += run(name) for each name, the JSON rewritten after each (a long run keeps what it has
    measured), then the PNG beside it."""
    start = time.perf_counter()
    for name in names:
        data["results"] += run(name)
        data["environment"]["total_s"] = time.perf_counter() - start
        write_json(out, data, indent=1)
    print(f"wrote {out} ({data['environment']['total_s']:.0f} s)")
    write_png(plot, data, png_beside(out), f"python {script} --plot-only {out}")


def accuracy_bench_parser(description: str, cases: dict[str, Any], out_name: str,
                          quick_help: str) -> argparse.ArgumentParser:
    """The arguments the accuracy benches (quantize_accuracy.py, prune_accuracy.py) share."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", default=",".join(cases), help=f"comma-separated, of {list(cases)}")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=default_out(out_name))
    p.add_argument("--quick", action="store_true", help=quick_help.replace("%", "%%"))  # argparse formats help with %
    p.add_argument("--plot-only", metavar="JSON", help="only draw the PNG of an existing JSON")
    return p


def plot_only(path: str, plot: Callable[[Any, str], None], script: str) -> None:
    """Draw the PNG of an existing JSON (--plot-only)."""
    with open(path) as f:
        write_png(plot, json.load(f), png_beside(path), f"python {script} --plot-only {path}")
