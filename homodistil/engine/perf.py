"""Where a training step's time goes: the ``perf/*`` and ``kernels/*`` scalars and the profiler window.

Phases (``Perf.phase``) are timed with CUDA events on a GPU, read once per ``trainer.perf_every``
steps (no host sync per phase), and with ``perf_counter`` on CPU; each is also a
``torch.profiler`` range ``phase/<name>``, so traces show them. The step time of the scalars is
the wall time between two flushes divided by the steps in between, so it includes everything
the loop did (held-out evaluation and checkpoints too); ``perf/phase/other`` is what no phase
covered. FLOPs come from :func:`homodistil.cost.step_flops_per_token`, the model that
``homodistil plan`` uses, at the student's current (last shrunk) widths. docs/profiling.md
explains every scalar.
"""
from __future__ import annotations

import contextlib
import functools
import resource
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, record_function, tensorboard_trace_handler

from homodistil.config import Config
from homodistil.kernels._dispatch import KernelStats, collect_stats
from homodistil.cost import Arch, gpu_for_device, peak_tflops, step_flops_per_token

PHASES = ("data", "teacher", "student", "importance", "optimizer", "mask", "shrink", "heldout", "checkpoint", "log", "profile")
GIB = 1024**3


@functools.lru_cache(maxsize=1)
def cpu_peak_tflops(n: int = 256, reps: int = 16) -> float:
    """The best fp32 matmul rate torch reaches on this CPU with its current threads (TFLOP/s):
    best of 3 timings of ``reps`` (n × n) @ (n × n) products, measured once per process."""
    gen = torch.Generator().manual_seed(0)  # not the global RNG: a resumed run's dropout stream is restored
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a @ b  # warm-up: first-call allocations and thread start
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - started)
    return 2.0 * n**3 * reps / best / 1e12


def device_peak(cfg: Config, device: torch.device) -> tuple[float | None, str]:
    """(peak TFLOP/s of one device, where the figure comes from) for perf/mfu."""
    if cfg.trainer.peak_tflops is not None:
        return cfg.trainer.peak_tflops, "trainer.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gpu = gpu_for_device(name)
        if gpu is None:
            return None, f"{name} is not in the peak table: set trainer.peak_tflops for perf/mfu"
        return peak_tflops(gpu, cfg.bf16), f"{name}: {'bf16' if cfg.bf16 else 'TF32'} dense peak"
    return cpu_peak_tflops(), f"measured fp32 matmul peak of this CPU ({torch.get_num_threads()} threads)"


def _resident_gib() -> float:
    """The process's resident set now (Linux ``VmRSS``; 0 where /proc is missing)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    return next((int(line.split()[1]) * 1024 / GIB for line in lines if line.startswith("VmRSS:")), 0.0)


# imported by the recipe after torch, DeepSpeed and transformers and before any model is built:
# on CPU, a run's peak resident set less this is what the run itself holds (what the plan models)
BASE_RESIDENT_GIB = _resident_gib()


def peak_memory_gib(device: torch.device) -> float:
    """The process's peak memory so far: allocated GPU memory, or resident host memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


def timed(name: str):
    """Method decorator: the call is phase ``name`` of the owner's ``self.perf``."""
    def wrap(method):
        @functools.wraps(method)
        def inner(self, *args, **kwargs):
            with self.perf.phase(name):
                return method(self, *args, **kwargs)
        return inner
    return wrap


class Perf:
    """Phase timers, throughput/MFU scalars, kernel counters and the profiler window of one rank."""

    def __init__(self, cfg: Config, device: torch.device, world: int, out_dir: Path, rank: int):
        self.cfg, self.device, self.rank = cfg, device, rank
        self.cuda = device.type == "cuda"
        self.every = cfg.trainer.perf_every
        self.samples_per_step = cfg.global_batch(world)
        self.tokens_per_step = self.samples_per_step * cfg.data.max_seq_length
        self.world = world
        self.peak, self.peak_source = device_peak(cfg, device) if self.every else (None, "trainer.perf_every=0")
        self.kernels = KernelStats()
        if self.every:
            collect_stats(self.kernels)
        self.profile_dir = out_dir / "profile"
        self.profiler: torch.profiler.profile | None = None
        self.start()

    def start(self) -> None:
        """Start the clock of the next interval afresh (what came before is not counted)."""
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.events = []
        self.kernels.drain()
        self.started, self.steps = time.perf_counter(), 0
        self.interval, self.mark = 0, None
        self.open: dict[str, tuple[int, object]] = {}  # phases running now: (interval, start time or event)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time the block as phase ``name`` (one of :data:`PHASES`); a profiler range too."""
        if not self.every:  # perf scalars off: no timing, only the profiler's range while it runs
            with record_function(f"phase/{name}") if self.profiler else contextlib.nullcontext():
                yield
            return
        # a phase that spans a flush (the logging) counts up to it in the interval it began in (end_step)
        # and from it on in the next
        interval = self.interval
        with record_function(f"phase/{name}"):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.open[name] = (interval, start)
                try:
                    yield
                finally:
                    end.record()
                    del self.open[name]
                    self.events.append((name, start if interval == self.interval else self.mark, end))
            else:
                started = time.perf_counter()
                self.open[name] = (interval, started)
                try:
                    yield
                finally:
                    del self.open[name]
                    since = started if interval == self.interval else self.started
                    self.seconds[name] += time.perf_counter() - since

    def begin_step(self, step: int) -> None:
        """Called before step ``step`` (1-based) runs: opens the profiler window at its start and
        closes it after its last step (the trace then also holds that step's logging)."""
        p = self.cfg.trainer.profile
        if self.profiler is not None and step == p.start + p.steps:
            with self.phase("profile"):  # writing the trace is this step's cost, not the window's
                self.stop_profiler()
        if p is not None and step == p.start and self.profiler is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            # writes profile/rank<r>.<timestamp>.pt.trace.json: a Chrome/Perfetto trace, which
            # TensorBoard's profiler plugin also reads
            handler = tensorboard_trace_handler(str(self.profile_dir), worker_name=f"rank{self.rank}")
            self.profiler = torch.profiler.profile(activities=activities, on_trace_ready=handler, record_shapes=True)
            self.profiler.start()

    def end_step(self, step: int, student: Arch, teacher: Arch) -> dict[str, float]:
        """After step ``step``: every ``perf_every`` steps, the perf/* and kernels/* scalars
        averaged over the steps since the last ones (else none)."""
        self.steps += 1
        if not self.every or step % self.every:
            return {}
        now = time.perf_counter()
        mark = torch.cuda.Event(enable_timing=True) if self.cuda else None
        if mark is not None:
            mark.record()
        for name, (began, start) in self.open.items():  # the running phases' part before this flush
            if self.cuda:
                self.events.append((name, start if began == self.interval else self.mark, mark))
            else:
                self.seconds[name] += now - (start if began == self.interval else self.started)
        for name, start, end in self.events:
            end.synchronize()  # the only wait: once per perf_every steps
            self.seconds[name] += start.elapsed_time(end) / 1e3
        n, step_s = self.steps, (now - self.started) / self.steps
        flops = step_flops_per_token(self.cfg, teacher, student) * self.tokens_per_step / self.world
        out = {"perf/step_s": step_s, "perf/tokens_per_s": self.tokens_per_step / step_s,
               "perf/samples_per_s": self.samples_per_step / step_s, "perf/tflops": flops / step_s / 1e12,
               "perf/max_mem_gib": peak_memory_gib(self.device)}
        if not self.cuda:
            out["perf/base_mem_gib"] = BASE_RESIDENT_GIB
        if self.peak is not None:
            out["perf/mfu"] = out["perf/tflops"] / self.peak
            out["perf/peak_tflops"] = self.peak
        out.update({f"perf/phase/{name}": s / n for name, s in self.seconds.items()})
        out["perf/phase/other"] = step_s - sum(self.seconds.values()) / n
        for name, (calls, seconds) in self.kernels.drain().items():
            out[f"kernels/{name}/calls"] = calls / n
            out[f"kernels/{name}/ms"] = 1e3 * seconds / n
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.started, self.steps, self.interval, self.mark = now, 0, self.interval + 1, mark
        return out

    def stop_profiler(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def close(self) -> None:
        self.stop_profiler()
        collect_stats(None)
