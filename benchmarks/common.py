"""Shared benchmark helpers: timing, the device's copy and matmul ceilings, JSON output."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
from pathlib import Path
from typing import Any, Callable

import torch


def time_ms(fn: Callable[[], Any], warmup: int = 5, iters: int = 20) -> float:
    """Median time of ``fn`` in milliseconds, measured with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_ms_back_to_back(fn: Callable[[], Any], calls: int = 10, rounds: int = 5, warmup: int = 3) -> float:
    """Milliseconds per call of ``calls`` back-to-back calls between two CUDA events (the median of ``rounds``):
    launch costs overlap the previous call's kernels, as in a program or a CUDA-graph replay that issues steps
    without waiting. For kernels of about a millisecond, where one call timed alone also counts its launches."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / calls)
    return statistics.median(per_call)


def time_ms_interleaved(fns: dict[str, Callable[[], Any]], calls: int = 10, rounds: int = 5,
                        warmup: int = 2) -> dict[str, float]:
    """Milliseconds per call of each of ``fns``, timed in interleaved rounds: each round runs every function for
    ``warmup`` calls, then ``calls`` back-to-back calls between two CUDA events; the median over ``rounds`` is kept.
    Clock and thermal drift then fall on every function alike, which matters for ratios of near-equal kernels."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times[key].append(start.elapsed_time(end) / calls)
    return {k: statistics.median(ts) for k, ts in times.items()}


def copy_bandwidth_tbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e12


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense n x n x n matmul rate in TFLOP/s on random data."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_ceilings() -> dict[str, float]:
    """Measure and print the copy and bf16 matmul ceilings; returns the payload's ``ceilings`` entry."""
    copy_tbps, mm_tflops = copy_bandwidth_tbps(), matmul_tflops()
    print(f"ceilings: copy {copy_tbps:.3f} TB/s (read+write), bf16 matmul {mm_tflops:.1f} TFLOP/s", flush=True)
    return {"copy_tbps": copy_tbps, "matmul_bf16_tflops": mm_tflops}


def environment() -> dict[str, Any]:
    """Device, versions and date, recorded with every result."""
    import triton

    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def kernel_profile(fn: Callable[[], Any], top: int = 20, label: str = "", warm: bool = True) -> dict[str, Any]:
    """CUDA time by kernel of one call of ``fn`` under ``torch.profiler`` (after one warm-up call if ``warm``),
    printed as the ``top`` largest; returns ``{"cuda_kernel_ms": total, "top_kernels_ms": [[name, ms], ...]}``."""
    from torch.profiler import ProfilerActivity, profile

    if warm:
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total, kernels = 0.0, {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if e.device_type == torch.autograd.DeviceType.CUDA and t:
            kernels[e.key] = kernels.get(e.key, 0.0) + t / 1e3
            total += t / 1e3
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    print(f"profile{' of ' + label if label else ''}: {total:.2f} ms of CUDA kernels", flush=True)
    for name, ms in ranked:
        print(f"  {ms:9.3f} ms {100 * ms / total:5.1f} %  {name[:110]}", flush=True)
    return {"cuda_kernel_ms": total, "top_kernels_ms": [list(kv) for kv in ranked]}
