"""Where and in what precision moerge runs: ``device="auto"`` (CUDA when available, else
Apple MPS, else the CPU) and ``dtype="auto"`` (bfloat16 on a CUDA card that supports it,
float32 elsewhere), plus the CPU thread policy.

Every entry point that loads or builds tensors (``compose``, ``load_base``, ``merge``, the
routers' preparation, the zoo, serving workers, the CLI) takes these two settings and resolves
them here, so the same code runs on a laptop CPU and on a GPU."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

DeviceLike = str | torch.device | None
DTypeLike = str | torch.dtype | None

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """``"auto"``/``None`` → ``cuda`` if available, else ``mps``, else ``cpu``; any other value
    is checked (an unavailable CUDA or MPS is refused with what is available instead)."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this torch has no CUDA device; use device='cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for, but MPS is not available here; use device='cpu' or 'auto'")
    return dev


def resolve_dtype(dtype: DTypeLike = "auto", device: DeviceLike = "cpu") -> torch.dtype:
    """``"auto"``/``None`` → bfloat16 on a CUDA card that supports it, else float16 on CUDA,
    float32 on the CPU and MPS; names (``"bf16"``, ``"float16"``…) or torch dtypes otherwise."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if dtype is None or dtype == "auto":
        dev = resolve_device(device)
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'") from None


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def place(module: torch.nn.Module, device: DeviceLike = "auto", dtype: DTypeLike = "auto") -> torch.nn.Module:
    """Move and cast a model to the resolved device and dtype (in place; returns it)."""
    dev = resolve_device(device)
    return module.to(device=dev, dtype=resolve_dtype(dtype, dev))


def busy_cores(interval: float = 0.25) -> float:
    """How many cores other work keeps busy right now (from two reads of ``/proc/stat``; the
    1-minute load average where that file is missing)."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = read()
        time.sleep(interval)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total = max(1, t1 - t0)
    return available_cores() * (1.0 - (i1 - i0) / total)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def auto_threads(limit: int | None = None) -> int:
    """Threads for CPU work on a possibly shared machine: the cores not already busy (at least
    one, at most ``limit``). Small-op work (the zoo's d = 64 models, gate and router training)
    runs many times slower when its threads outnumber the free cores, because they spin-wait
    on each other; a free core gives it a second thread (1.3× faster alone here).

    ``$OMP_NUM_THREADS``, when set to a positive count, is taken as given instead (the usual way
    to pin a process's threads: a test worker, a batch job beside others). Measured: in the test
    suite the tour sampled a free core at its start, took two threads beside the other worker's
    busy one and kept them; its evaluation took 76 s instead of 45 s, and the other worker's
    Ray test 65 s instead of 16 s."""
    pinned = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if pinned.isdigit() and int(pinned) > 0:
        return min(int(pinned), limit) if limit else int(pinned)
    free = available_cores() - busy_cores()
    n = max(1, min(available_cores(), int(free + 0.5)))
    return min(n, limit) if limit else n


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``None`` keeps the current setting); returns the count."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def describe(device: DeviceLike = "auto") -> dict[str, Any]:
    """The resolved device with its name and, for CUDA, memory and compute capability."""
    dev = resolve_device(device)
    info: dict[str, Any] = {"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
    else:
        import platform

        info["name"] = platform.processor() or platform.machine()
        info["cores"] = os.cpu_count()
    return info
