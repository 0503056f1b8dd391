"""Backend choice shared by the kernels: Triton on CUDA, the plain-torch reference elsewhere.

``HOMODISTIL_KERNELS`` overrides the choice: ``torch`` forces the reference, ``triton`` forces
the Triton kernels (on CPU this needs ``TRITON_INTERPRET=1`` set before the kernel modules are
imported, because ``@triton.jit`` picks the interpreter when it decorates), ``auto`` or unset
picks by device. The choice is logged once per process and backend on
``homodistil.kernels`` at INFO.

Every kernel call runs inside :func:`kernel_range`: a ``torch.profiler`` range named
``kernel/<name>`` (visible in traces) and, while a :class:`KernelStats` is installed
(``trainer`` perf scalars), a call count and its time.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import torch

ENV_VAR = "HOMODISTIL_KERNELS"
BACKENDS = ("triton", "torch")

logger = logging.getLogger("homodistil.kernels")
_logged: set[str] = set()


@functools.lru_cache(maxsize=None)
def _triton_has_gpu_driver() -> bool:
    """True when Triton can compile for the current GPU (cached: the answer cannot change)."""
    try:
        import triton

        triton.runtime.driver.active.get_current_target()
    except Exception:  # no triton, no driver, unsupported GPU: all mean "use the reference"
        return False
    return True


def forced_backend() -> str | None:
    """The backend ``HOMODISTIL_KERNELS`` forces, or None for ``auto`` / unset."""
    forced = os.environ.get(ENV_VAR, "auto").strip().lower()
    return forced if forced in BACKENDS else None


def kernel_backend(tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for a kernel whose main operand is ``tensor``."""
    forced = os.environ.get(ENV_VAR, "auto").strip().lower()
    if forced in BACKENDS:
        backend, why = forced, f"{ENV_VAR}={forced}"
    elif forced in ("", "auto"):
        if not tensor.is_cuda:
            backend, why = "torch", f"tensor on {tensor.device.type}"
        elif _triton_has_gpu_driver():
            backend, why = "triton", "tensor on cuda"
        else:
            backend, why = "torch", "tensor on cuda, but triton cannot compile for this GPU"
    else:
        raise ValueError(f"{ENV_VAR}={forced!r}: expected one of auto, triton, torch")
    if backend not in _logged:
        _logged.add(backend)
        logger.info("homodistil kernels: using the %s backend (%s)", backend, why)
    return backend


def check_launchable(kernel, tensor: torch.Tensor) -> bool:
    """Raise unless ``kernel`` can run on ``tensor``'s device; True when it is interpreted.

    Interpreted kernels run anywhere (slowly); compiled ones need a CUDA tensor.
    """
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(kernel, InterpretedFunction)
    if not interpreted and not tensor.is_cuda:
        raise RuntimeError(
            "the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before "
            "homodistil.kernels is imported (the interpreter runs them on CPU)")
    return interpreted


class KernelStats:
    """Calls and time per kernel name since the last :meth:`drain`: wall time on CPU, CUDA
    events on a GPU (read only at :meth:`drain`, so a call adds no host sync)."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def drain(self) -> dict[str, tuple[int, float]]:
        """{name: (calls, seconds)} since the last drain, and start afresh."""
        for name, start, end in self.events:
            end.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1e3
        out = {n: (c, self.seconds.get(n, 0.0)) for n, c in self.calls.items()}
        self.__init__()
        return out


_stats: KernelStats | None = None


def collect_stats(stats: KernelStats | None) -> None:
    """Install (or, with None, remove) the process's kernel counter."""
    global _stats
    _stats = stats


@contextlib.contextmanager
def kernel_range(name: str, tensor: torch.Tensor):
    """Profiler range ``kernel/<name>``; counted and timed while a KernelStats is installed."""
    with torch.profiler.record_function(f"kernel/{name}"):
        stats = _stats
        if stats is None:
            yield
            return
        stats.calls[name] = stats.calls.get(name, 0) + 1
        if tensor.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            stats.events.append((name, start, end))
        else:
            started = time.perf_counter()
            yield
            stats.seconds[name] = stats.seconds.get(name, 0.0) + time.perf_counter() - started
