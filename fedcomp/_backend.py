"""Which implementation serves each device, chosen once per process and logged.

``FEDCOMP_BACKEND`` (``auto`` by default) forces a backend:

* ``auto``: CPU tensors use the C++ kernels, built just in time on first use;
  if they cannot be built, the reference serves, with one warning.
* ``reference``: the pure-PyTorch reference everywhere (no build is attempted).
* ``cpu``: the C++ kernels; if they cannot be built, every op raises
  :class:`BackendUnavailable` (never a silent fallback).
* ``triton`` / ``cuda``: GPU backends, not part of this release; forcing one
  raises :class:`BackendUnavailable`.

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
        if want in ("triton", "cuda"):
            raise BackendUnavailable(
                f"{ENV_VAR}={want}: the {want} kernels are not part of this release; "
                "use auto, cpu or reference"
            )
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
                _cpu_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
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


def backend_for(device_type: str) -> str:
    """Backend that serves tensors on ``device_type``."""
    if device_type == "cpu":
        return cpu_backend()
    want = requested()
    if want in ("cpu", "triton", "cuda"):
        raise BackendUnavailable(
            f"{ENV_VAR}={want} cannot serve {device_type} tensors in this release; "
            "GPU kernels are not built yet, unset it to use the reference"
        )
    return "reference"


def cpu_error() -> str | None:
    """Why the C++ kernels are not in use (None when they are, or before the choice)."""
    return _cpu_error
