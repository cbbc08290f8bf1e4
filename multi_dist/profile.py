"""Profiling a few training steps: ``profile.start=N profile.steps=K`` in a training config.

Steps ``N .. N+K-1`` run under ``torch.profiler`` on every rank. Each rank writes, under
``run_dir/profile/``:

- ``trace_rank<r>.json``: the Chrome trace (open it in Perfetto or ``chrome://tracing``);
- ``summary_rank<r>.json``: wall time per step, the device's busy fraction (the union of GPU
  kernel intervals over the wall time: below 1, the GPU waited for the host: launches, syncs,
  data), kernels and host ops per step, the host's time per phase of the step, on a GPU the
  host's time in kernel launches and in waits for the GPU, the top operators by self time, and
  the rank's torch threads.

The figure that tells a launch-bound step from a compute-bound one is ``device_busy``: a step
whose kernels cover 30% of its wall time gains nothing from faster kernels and everything from
fewer launches (larger batches, ``compile``, fused passes). The phases say where the host's time
went (``phase_ms_per_step``: ``data``, ``forward``, ``nan_check``, ``backward``, ``optimizer``;
``drain``, the wait after the last profiled step for the GPU to finish it; and ``other``, the rest
of the wall time: logging, checkpoints). The GPU runs behind the host, so on a GPU a phase's time
is the host's: dispatching its ops, or waiting. ``nan_check`` is where the step waits for its
forward to finish on the GPU: a long one means the host got far ahead (the GPU is the
bottleneck); a short one with a low ``device_busy`` means the host could not keep the GPU fed.
``cuda_wait_ms_per_step`` sums the host's time in synchronisations (``drain`` included);
``cuda_copy_ms_per_step`` its time in copy calls, where a copy from pageable memory blocks.

Where the GPU waited, and what the step would take if it never did: ``gpu_kernel_ms_per_step`` is
the time some kernel ran (the step's time at the GPU's own pace; model FLOPs over it are the MFU
that faster kernels, not a faster host, would have to raise), and ``gpu_idle_ms_by_phase`` splits
the rest of the wall time by the host's phase at that moment (kernels and host calls share one
clock in the trace): idle time under ``optimizer`` is the GPU waiting while the host dispatches
the optimizer's many small ops, idle time under ``data`` the GPU waiting for the next batch.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .threads import cpuinfo, usable_cpus


@dataclass
class ProfileConfig:
    start: int = 0
    """First profiled step (1-based; 0: no profiling). Leave a few warm-up steps before it."""
    steps: int = 3
    """Steps profiled."""
    top: int = 15
    """Operators listed in the summary, by self time."""

    def validate(self) -> None:
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if self.steps <= 0 or self.top <= 0:
            raise ValueError("steps and top must be positive")


PHASES = ("data", "forward", "nan_check", "backward", "optimizer", "drain")
_PHASE = "phase/"
# CUDA runtime calls by what the host does in them. Launches by prefix: the runtime's
# cudaLaunchKernel, cudaLaunchKernelExC, cudaLaunchCooperativeKernel, the driver API's
# cuLaunchKernel(Ex) that triton's kernels (compile) use, CUDA graphs in both APIs, and the
# per-thread default stream's spellings of each (cudaLaunchKernel_ptsz, ...)
_LAUNCH = ("cudaLaunch", "cuLaunch", "cudaGraphLaunch", "cuGraphLaunch")
# the host blocked until the GPU caught up (cudaFree synchronises the device: allocator retries)
_WAIT = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaFree")
# copies: a pageable device-to-host copy (.cpu(), .tolist()) blocks inside cudaMemcpyAsync
_COPY = ("cudaMemcpyAsync", "cudaMemcpy2DAsync")


def phase(name: str) -> Any:
    """A context manager marking one phase of the training step (one of :data:`PHASES`; ``drain``
    is the profiler's own wait for the GPU to finish the last profiled step) in the profile; a few
    microseconds when no profiler runs."""
    return torch.profiler.record_function(_PHASE + name)


class StepProfiler:
    """Call :meth:`before` with the step about to run and :meth:`after` with the step just done."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, device: torch.device) -> None:
        self.cfg = cfg
        self.folder = run_dir / "profile"
        self.rank = rank
        self.cuda = device.type == "cuda"
        self._prof: Any = None
        self._t0 = 0.0
        self.summary: dict[str, Any] | None = None

    @property
    def last(self) -> int:
        return self.cfg.start + self.cfg.steps - 1

    def before(self, step: int) -> None:
        if self.cfg.start == 0 or step != self.cfg.start:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._sync()
        self._prof = profile(activities=activities, record_shapes=False)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def after(self, step: int) -> float:
        """At the end of step ``step``; returns the seconds spent writing the profile (not the
        steps' time: a log window leaves them out)."""
        if self._prof is None or step != self.last:
            return 0.0
        with phase("drain"):  # the GPU finishing the profiled steps: their time too
            self._sync()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.folder / f"trace_rank{self.rank}.json"))
        self.summary = summarize(prof, wall, self.cfg.steps, self.cuda, self.cfg.top)
        self.summary.update(
            first_step=self.cfg.start, last_step=self.last, rank=self.rank, threads=torch.get_num_threads()
        )
        (self.folder / f"summary_rank{self.rank}.json").write_text(json.dumps(self.summary, indent=1))
        if self.rank == 0:
            print(describe(self.summary) + f" -> {self.folder}", flush=True)
        return time.perf_counter() - self._t0 - wall

    def close(self) -> None:
        """Stop a profile the loop left early (an error, a stop request): nothing is written."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def summarize(prof: Any, wall_s: float, steps: int, cuda: bool, top: int) -> dict[str, Any]:
    """The figures of :mod:`multi_dist.profile`'s summary from a finished ``torch.profiler`` run."""
    from torch.autograd import DeviceType

    events = prof.events()
    host_ops = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::"))
    out: dict[str, Any] = {
        "steps": steps,
        "wall_s_per_step": wall_s / steps,
        "host_ops_per_step": host_ops / steps,
    }
    host = [e for e in events if e.device_type == DeviceType.CPU]
    phases = {name: 0.0 for name in PHASES}
    spans: list[tuple[float, float, str]] = []  # the phases on the host's timeline
    for e in host:
        if e.name.startswith(_PHASE) and e.name[len(_PHASE) :] in phases:
            phases[e.name[len(_PHASE) :]] += (e.time_range.end - e.time_range.start) / 1e3 / steps
            spans.append((e.time_range.start, e.time_range.end, e.name[len(_PHASE) :]))
    phases["other"] = max(0.0, wall_s * 1e3 / steps - sum(phases.values()))
    out["phase_ms_per_step"] = phases
    if cuda:
        launches = [e for e in host if e.name.startswith(_LAUNCH)]
        out["launches_per_step"] = len(launches) / steps
        out["cuda_launch_ms_per_step"] = sum(e.time_range.end - e.time_range.start for e in launches) / 1e3 / steps
        waits = (e.time_range.end - e.time_range.start for e in host if e.name in _WAIT)
        out["cuda_wait_ms_per_step"] = sum(waits) / 1e3 / steps
        copies = (e.time_range.end - e.time_range.start for e in host if e.name in _COPY)
        out["cuda_copy_ms_per_step"] = sum(copies) / 1e3 / steps

    def kernel(e: Any) -> bool:  # GPU activity that is not a user annotation (a whole range, gaps included)
        return e.device_type == DeviceType.CUDA and not e.is_user_annotation

    # the top: kernels by their GPU time on CUDA (each kernel once, under its own name), else host ops
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    if cuda:
        kernels = sorted((e.time_range.start, e.time_range.end) for e in events if kernel(e))
        out["kernels_per_step"] = len(kernels) / steps
        # no kernel at all means the profiler got no GPU activity (CUPTI unavailable), not an idle GPU
        busy_us = _union_us(kernels)
        out["device_busy"] = busy_us / 1e6 / wall_s if kernels else None
        if kernels and host:
            start = min(e.time_range.start for e in host)
            idle = idle_by_phase(kernels, spans, start, start + wall_s * 1e6)
            out["gpu_kernel_ms_per_step"] = busy_us / 1e3 / steps
            out["gpu_idle_ms_by_phase"] = {k: v / 1e3 / steps for k, v in idle.items()}
    averages = [  # operators only: no annotations (the loop's phases, the optimizer's step)
        a for a in prof.key_averages() if getattr(a, key) > 0 and not a.is_user_annotation and (kernel(a) or not cuda)
    ]
    averages.sort(key=lambda a: getattr(a, key), reverse=True)
    total = sum(getattr(a, key) for a in averages) or 1
    out["top_ops"] = [
        {
            "name": a.key,
            "calls_per_step": a.count / steps,
            "self_ms_per_step": getattr(a, key) / 1e3 / steps,
            "share": getattr(a, key) / total,
        }
        for a in averages[:top]
    ]
    return out


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of sorted ``(start, end)`` intervals (kernels of several streams overlap)."""
    return sum(e - s for s, e in _merge(intervals))


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted ``(start, end)`` intervals as disjoint, sorted ones (their union)."""
    merged: list[tuple[float, float]] = []
    for s, e in intervals:
        if merged and s <= merged[-1][1]:
            if e > merged[-1][1]:
                merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


def idle_by_phase(
    kernels: list[tuple[float, float]], spans: list[tuple[float, float, str]], start: float, end: float
) -> dict[str, float]:
    """The time in ``[start, end]`` no kernel ran, by the host's phase at that moment: ``spans``
    are the phases' ``(start, end, name)`` on the host's timeline (disjoint), ``kernels`` the
    sorted kernel intervals; idle time outside every span is ``other``. Same unit as the input."""
    busy = _merge(kernels)
    begins = [s for s, _ in busy]

    def covered(s: float, e: float) -> float:  # kernel time within [s, e]
        total, i = 0.0, max(0, bisect.bisect_right(begins, s) - 1)
        while i < len(busy) and busy[i][0] < e:
            total += max(0.0, min(e, busy[i][1]) - max(s, busy[i][0]))
            i += 1
        return total

    out = {name: 0.0 for name in (*PHASES, "other")}
    in_spans = 0.0
    for s, e, name in spans:
        s, e = max(s, start), min(e, end)
        if e > s:
            idle = (e - s) - covered(s, e)
            out[name] += idle
            in_spans += idle
    out["other"] = max(0.0, (end - start) - covered(start, end) - in_spans)
    return out


def describe(summary: dict[str, Any]) -> str:
    """One line of a summary: time per step, the phases that took it, the GPU's busy share."""
    phases = ", ".join(f"{k} {v:.0f}" for k, v in summary["phase_ms_per_step"].items())
    busy = summary.get("device_busy")
    line = (
        f"profile: steps {summary.get('first_step', '?')}-{summary.get('last_step', '?')}, "
        f"{summary['wall_s_per_step'] * 1e3:.0f} ms/step ({phases} ms)"
    )
    if "launches_per_step" in summary:  # a CUDA run
        line += f", GPU busy {busy:.0%}" if busy is not None else ", GPU busy unknown (no kernel recorded)"
        idle = summary.get("gpu_idle_ms_by_phase")
        if idle:  # where the GPU waited: the phases that kept it waiting longest
            worst = sorted(((v, k) for k, v in idle.items() if v >= 0.5), reverse=True)[:3]
            line += f" (kernels {summary['gpu_kernel_ms_per_step']:.0f} ms/step; idle under "
            line += (", ".join(f"{k} {v:.0f}" for v, k in worst) or "no phase") + " ms)"
        line += f", waits for it {summary['cuda_wait_ms_per_step']:.0f} ms/step"
        line += f", in copies {summary['cuda_copy_ms_per_step']:.0f}"
        line += f", {summary['launches_per_step']:.0f} launches/step"
    return line + f", {summary['host_ops_per_step']:.0f} host ops/step"


def machine_info(**versions: Any) -> dict[str, Any]:
    """The machine a benchmark ran on, for its JSON: CPU model, cores (all and usable), memory,
    platform, Python, torch and its CUDA, and ``versions`` (e.g. ``decord=decord.__version__``)."""
    cpu = next((x.split(":", 1)[1].strip() for x in cpuinfo().splitlines() if x.startswith("model name")), "")
    mem = None
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem = int(line.split()[1]) * 1024
    return {
        "cpu_count": os.cpu_count(),
        "cpu_threads_usable": usable_cpus(),
        "cpu_model": cpu,
        "mem_total_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        **versions,
    }
