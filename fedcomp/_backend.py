"""Which implementation serves each device, chosen once per process and logged.

``FEDCOMP_BACKEND`` (``auto`` by default) forces a backend:

* ``auto``: CPU tensors use the C++ kernels, built just in time on first use;
  if they cannot be built, the reference serves, with one warning.
* ``reference``: the pure-PyTorch reference everywhere (no build is attempted).
* ``cpu``: the C++ kernels; if they cannot be built, every op raises
  :class:`BackendUnavailable` (never a silent fallback).
* ``triton``: the Triton kernels (:mod:`fedcomp.triton`). On CUDA tensors
  they run on the GPU; on CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's
  interpreter, which is how this machine without a GPU tests them).
* ``cuda``: the CUDA C++ kernels (``csrc/cuda``), for CUDA tensors; they are built
  only when torch has CUDA.

CUDA tensors under ``auto``: the CUDA extension if it builds, else Triton if it
imports, else the reference (one warning). A forced backend that cannot serve
raises :class:`BackendUnavailable`, never a silent fallback.

Import never builds or fails; the first op call does the choosing.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings

ENV_VAR = "FEDCOMP_BACKEND"
CHOICES = ("auto", "reference", "cpu", "triton", "cuda")

log = logging.getLogger("fedcomp")


class BackendUnavailable(RuntimeError):
    """A backend forced with FEDCOMP_BACKEND cannot serve."""


_lock = threading.Lock()
_cpu_backend: str | None = None  # "cpu" or "reference" once chosen
_cpu_error: str | None = None  # why the C++ kernels are not in use
_gpu_backend: str | None = None  # "cuda", "triton" or "reference" once chosen
_gpu_error: str | None = None  # why the CUDA extension is not in use


def _triton_unavailable(why_prefix: str) -> str | None:
    """None if triton imports, else the reason."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"{why_prefix}: triton does not import ({type(exc).__name__}: {exc})"
    return None


def summarize(exc: BaseException) -> str:
    """``Type: last line of the message``: one readable line for a build or compile failure."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def requested() -> str:
    """The value of FEDCOMP_BACKEND, validated."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(CHOICES)}; got {value!r}")
    return value


def cpu_backend() -> str:
    """Choose (once) and return the backend that serves CPU tensors: 'cpu' or 'reference'."""
    global _cpu_backend, _cpu_error
    if _cpu_backend is not None:
        return _cpu_backend
    with _lock:
        if _cpu_backend is not None:
            return _cpu_backend
        want = requested()
        if want == "cuda":
            raise BackendUnavailable(
                f"{ENV_VAR}=cuda serves CUDA tensors only; CPU tensors need auto, cpu, reference, "
                "or triton with TRITON_INTERPRET=1"
            )
        if want == "triton":
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise BackendUnavailable(
                    f"{ENV_VAR}=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1"
                )
            why = _triton_unavailable(f"{ENV_VAR}=triton")
            if why:
                raise BackendUnavailable(why)
            from . import triton as triton_kernels

            triton_kernels.register("CPU")
            _cpu_error = "not loaded (FEDCOMP_BACKEND=triton: Triton interpreter on CPU tensors)"
            _cpu_backend = "triton"
            log.info("fedcomp: CPU tensors use the Triton kernels under TRITON_INTERPRET=1")
            return _cpu_backend
        if want == "reference":
            _cpu_error = f"not loaded ({ENV_VAR}=reference)"
            chosen = "reference"
        else:
            try:
                # Imported here, not at module level: `import fedcomp` stays free of
                # the build machinery, and `python -m fedcomp.build` runs cleanly.
                from . import build

                build.load_cpu_extension()
                chosen = "cpu"
            except Exception as exc:  # any build/load failure: compiler, ninja, ABI
                _cpu_error = summarize(exc)
                if want == "cpu":
                    raise BackendUnavailable(
                        f"{ENV_VAR}=cpu but the C++ CPU kernels could not be built: {_cpu_error}. "
                        "Run `python -m fedcomp.build --verbose` to see the compiler output."
                    ) from exc
                warnings.warn(
                    f"fedcomp: C++ CPU kernels unavailable ({_cpu_error}); using the slow "
                    "pure-PyTorch reference. Run `python -m fedcomp.build --verbose` for details.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                chosen = "reference"
        _cpu_backend = chosen
        log.info("fedcomp: CPU tensors use the %s backend", chosen)
        return chosen


def gpu_backend() -> str:
    """Choose (once) and return the backend that serves CUDA tensors: 'cuda', 'triton' or 'reference'."""
    global _gpu_backend, _gpu_error
    if _gpu_backend is not None:
        return _gpu_backend
    with _lock:
        if _gpu_backend is not None:
            return _gpu_backend
        want = requested()
        if want == "cpu":
            raise BackendUnavailable(f"{ENV_VAR}=cpu serves CPU tensors only; CUDA tensors need auto, cuda or triton")
        from . import cuda_ops

        chosen = "reference"
        if want in ("auto", "cuda"):
            try:
                from . import build

                build.load_cuda_extension()
                cuda_ops.register()
                chosen = "cuda"
            except Exception as exc:
                _gpu_error = summarize(exc)
                if want == "cuda":
                    raise BackendUnavailable(
                        f"{ENV_VAR}=cuda but the CUDA kernels are unavailable: {_gpu_error}"
                    ) from exc
        if chosen in ("reference", "cuda") and want in ("auto", "triton", "cuda"):
            why = _triton_unavailable(f"{ENV_VAR}={want}")
            if why is None:
                from . import triton as triton_kernels

                # with the CUDA extension loaded, Triton serves only the ops it does not implement
                triton_kernels.register("CUDA", skip=cuda_ops.IMPLEMENTED if chosen == "cuda" else ())
                chosen = "cuda" if chosen == "cuda" else "triton"
            elif want == "triton":
                raise BackendUnavailable(why)
            elif chosen == "reference":
                warnings.warn(
                    f"fedcomp: no GPU kernels ({_gpu_error}; {why}); CUDA tensors use the reference",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _gpu_backend = chosen
        log.info("fedcomp: CUDA tensors use the %s backend", chosen)
        return chosen


def backend_for(device_type: str) -> str:
    """Backend that serves tensors on ``device_type``."""
    if device_type == "cpu":
        return cpu_backend()
    if device_type == "cuda":
        return gpu_backend()
    want = requested()
    if want != "auto" and want != "reference":
        raise BackendUnavailable(f"{ENV_VAR}={want} cannot serve {device_type} tensors; unset it to use the reference")
    return "reference"


def backend_of(t) -> str:
    """:func:`backend_for` the device of tensor ``t``. Reads ``is_cpu`` / ``is_cuda`` rather than
    ``t.device.type``, whose string costs 4-15 us the first time after other work (a trainer's
    compress and aggregate paths call this several times per round)."""
    if t.is_cpu:
        return cpu_backend()
    if t.is_cuda:
        return gpu_backend()
    return backend_for(t.device.type)


def cpu_error() -> str | None:
    """Why the C++ kernels are not in use (None when they are, or before the choice)."""
    return _cpu_error


def gpu_error() -> str | None:
    """Why the CUDA kernels are not in use on CUDA tensors (None when they are, or before the choice)."""
    return _gpu_error
