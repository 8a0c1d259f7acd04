"""The one timing path: ``fedcomp-bench``, the pytest-benchmark suite and ``python -m
fedcomp.demo`` time through :func:`time_call` and :func:`measure`.

Timing: on the CPU, ``time.perf_counter`` around each call after a warm-up, with the
thread count fixed (``torch.set_num_threads``) and recorded; on a GPU, CUDA events around
each call with the L2 cache flushed before it (a 256 MiB buffer zeroed). Statistics are the
median, min and max of the repetitions. ``fresh=True`` restores every tensor the op writes
(residual, accumulator) before each call, outside the timed region; ``fresh=False`` reuses
them, as a training loop does (the residual then carries from call to call).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .. import _backend
from .cases import BACKENDS, CASES, DTYPES, Case, Inputs, Params, traffic_bytes

L2_FLUSH_BYTES = 256 << 20


class Unavailable(Exception):
    """A backend cannot serve the device (the message says why)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    repeat: int = 5,
    warmup: int = 1,
    *,
    device: torch.device | str = "cpu",
    before: Callable[[], None] | None = None,
) -> list[float]:
    """Milliseconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones. ``before()``
    runs before each call, untimed (restoring fresh inputs). On CUDA, events time the call and
    the L2 cache is flushed before each."""
    device = torch.device(device)
    for _ in range(warmup):
        if before:
            before()
        fn()
    _sync(device)
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        pairs = []
        for _ in range(repeat):
            if before:
                before()
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in pairs]
    samples = []
    for _ in range(repeat):
        if before:
            before()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def median_ms(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median of :func:`time_call` on the CPU (what the demo prints)."""
    return statistics.median(time_call(fn, repeat, warmup))


def check_backend(backend: str, device: torch.device) -> None:
    """Raise :class:`Unavailable` (with the reason) unless ``backend`` can run on ``device``,
    loading its kernels where that is needed."""
    if backend not in BACKENDS:
        raise Unavailable(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Unavailable("device cuda: torch sees no CUDA device")
    if backend == "cpu":
        if device.type != "cpu":
            raise Unavailable("backend cpu (the C++ kernels) serves CPU tensors only")
        from .. import build

        try:
            build.load_cpu_extension()
        except Exception as exc:
            raise Unavailable(f"backend cpu: the C++ kernels could not be built ({_backend.summarize(exc)})") from exc
    elif backend == "triton":
        why = _backend._triton_unavailable("backend triton")
        if why:
            raise Unavailable(why)
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Unavailable("backend triton on the CPU needs Triton's interpreter: set TRITON_INTERPRET=1")
    elif backend == "cuda":
        if device.type != "cuda":
            raise Unavailable("backend cuda serves CUDA tensors only (--device cuda)")
        if _backend.gpu_backend() != "cuda":
            raise Unavailable(f"backend cuda: the CUDA kernels are unavailable ({_backend.gpu_error()})")
    elif backend == "auto":
        _backend.backend_for(device.type)  # chooses (and loads) what serves this device


def bandwidth(n: int, device: torch.device, repeat: int, warmup: int = 1) -> dict[str, float]:
    """GB/s of a copy (reads and writes ``4n`` bytes) and of an in-place add (reads ``8n``,
    writes ``4n``) of ``n`` fp32 entries, on this machine now: the roofline of the same size."""
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    copy = statistics.median(time_call(lambda: b.copy_(a), repeat, warmup, device=device))
    add = statistics.median(time_call(lambda: b.add_(a), repeat, warmup, device=device))
    return {"copy_gbs": 8 * n / copy / 1e6, "add_gbs": 12 * n / add / 1e6, "copy_ms": copy, "add_ms": add}


def nominal_bandwidth_gbs(device: torch.device) -> float | None:
    """The GPU's nominal memory bandwidth (GB/s) from its memory clock and bus width, when torch
    reports them (double data rate); None on the CPU or when unknown."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, object]:
    """The header of a run: versions, CPU model and threads, GPU name and bandwidth."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    from .. import __version__

    env = {
        "fedcomp": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_nominal_gbs": nominal_bandwidth_gbs(device),
        "fedcomp_backend_env": os.environ.get(_backend.ENV_VAR, "auto"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return env


@dataclass
class Row:
    """One measured (case, size, dtype, backend): times in ms, rates and roofline fractions."""

    op: str
    n: int
    dtype: str
    backend: str
    median_ms: float
    min_ms: float
    max_ms: float
    repeat: int
    elements_per_s: float
    traffic_bytes: int | None
    gbs: float | None
    bandwidth_gbs: float  # max of this run's copy and add GB/s at the same n
    fraction_of_measured: float | None
    fraction_of_nominal: float | None
    speedup_vs_composite: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def measure(
    case: Case,
    backend: str,
    n: int,
    dtype_name: str,
    device: torch.device,
    params: Params,
    *,
    repeat: int,
    warmup: int,
    fresh: bool,
    roof: dict[str, float],
    nominal_gbs: float | None,
) -> Row:
    """Time one case on one backend at one size and dtype."""
    inputs: Inputs = case.make(n, DTYPES[dtype_name], device, params)
    fn = case.call(backend, inputs)
    samples = time_call(fn, repeat, warmup, device=device, before=inputs.refresh if fresh else None)
    med = statistics.median(samples)
    rows = params.rows if case.name.endswith("_rows") or case.name.startswith("pipeline") else 1
    # the op's minimal traffic, whichever backend: a composite that moves more shows a lower fraction
    traffic = traffic_bytes(case.name, n, DTYPES[dtype_name], params)
    gbs = traffic / med / 1e6 if traffic else None
    measured = max(roof["copy_gbs"], roof["add_gbs"])
    return Row(
        op=case.name,
        n=n,
        dtype=dtype_name,
        backend=backend,
        median_ms=med,
        min_ms=min(samples),
        max_ms=max(samples),
        repeat=repeat,
        elements_per_s=rows * n / med * 1e3,
        traffic_bytes=traffic,
        gbs=gbs,
        bandwidth_gbs=measured,
        fraction_of_measured=gbs / measured if gbs else None,
        fraction_of_nominal=gbs / nominal_gbs if gbs and nominal_gbs else None,
    )


def run(
    ops: list[str],
    sizes: list[int],
    dtypes: list[str],
    backends: list[str],
    device: torch.device,
    params: Params,
    *,
    repeat: int = 20,
    warmup: int = 2,
    fresh: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, object], list[Row], dict[int, dict[str, float]]]:
    """Every (op, size, dtype, backend) the backends implement; returns the header, the rows
    (with speed-ups over the composite of the same op, size and dtype) and the bandwidth per size."""
    for b in backends:
        check_backend(b, device)
    header = environment(device)
    nominal = header["gpu_nominal_gbs"]
    rows: list[Row] = []
    roofs = {}
    for n in sizes:
        roofs[n] = bandwidth(n, device, repeat, warmup)
        for name in ops:
            case = CASES[name]
            for dtype_name in dtypes if case.dtyped else ["fp32"]:
                group = []
                for b in backends:
                    if b not in case.backends():
                        continue
                    if progress:
                        progress(f"{name} n={n:.0e} {dtype_name} {b}")
                    group.append(
                        measure(
                            case,
                            b,
                            n,
                            dtype_name,
                            device,
                            params,
                            repeat=repeat,
                            warmup=warmup,
                            fresh=fresh,
                            roof=roofs[n],
                            nominal_gbs=nominal,
                        )
                    )
                composite = next((r.median_ms for r in group if r.backend == "composite"), None)
                for r in group:
                    if composite is not None and r.backend != "composite":
                        r.speedup_vs_composite = composite / r.median_ms
                rows.extend(group)
    return header, rows, roofs
