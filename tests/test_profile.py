from __future__ import annotations

from types import SimpleNamespace

import pytest

from multi_dist.profile import PHASES, _union_us, describe, idle_by_phase, summarize


@pytest.mark.parametrize(
    ("intervals", "covered"),
    [
        ([], 0.0),
        ([(0, 10), (20, 25)], 15.0),  # disjoint
        ([(0, 10), (5, 15)], 15.0),  # overlapping (two streams)
        ([(0, 10), (2, 3), (4, 12)], 12.0),  # nested, then reaching past the end
        ([(0, 10), (10, 11)], 11.0),  # touching
    ],
)
def test_device_busy_counts_overlapping_kernels_once(intervals: list[tuple[float, float]], covered: float) -> None:
    assert _union_us(sorted(intervals)) == covered


class _Event:
    def __init__(self, name: str, device: str, start: float, end: float, annotation: bool = False) -> None:
        from torch.autograd import DeviceType

        self.name = self.key = name
        self.device_type = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
        self.is_user_annotation = annotation
        self.time_range = SimpleNamespace(start=start, end=end)
        self.count = 1
        self.self_device_time_total = end - start if device == "cuda" else 0.0
        self.self_cpu_time_total = end - start if device == "cpu" else 0.0


class _Profile:
    def __init__(self, events: list[_Event]) -> None:
        self._events = events

    def events(self) -> list[_Event]:
        return self._events

    def key_averages(self) -> list[_Event]:
        return self._events


def test_gpu_summary_counts_kernels_not_annotations() -> None:
    """Two steps over 1 ms of wall time: the host launched 3 aten ops; the GPU ran kernels over
    0.1-0.3 and 0.25-0.4 ms (overlapping streams) and 0.6-0.7 ms, i.e. 0.4 ms busy. A user
    annotation spanning the whole optimizer step (gaps included) is GPU activity but no kernel."""
    prof = _Profile(
        [
            _Event("aten::mm", "cpu", 0, 50),
            _Event("aten::add", "cpu", 60, 70),
            _Event("aten::mm", "cpu", 500, 550),
            _Event("gemm_kernel", "cuda", 100, 300),
            _Event("gemm_kernel", "cuda", 250, 400),
            _Event("add_kernel", "cuda", 600, 700),
            _Event("Optimizer.step#AdamW.step", "cuda", 0, 1000, annotation=True),
        ]
    )
    out = summarize(prof, wall_s=1e-3, steps=2, cuda=True, top=5)
    assert out["device_busy"] == pytest.approx(0.4)
    assert out["kernels_per_step"] == 1.5 and out["host_ops_per_step"] == 1.5
    assert [op["name"] for op in out["top_ops"]] == ["gemm_kernel", "gemm_kernel", "add_kernel"]
    assert sum(op["share"] for op in out["top_ops"]) == pytest.approx(1.0)


def test_phases_launches_and_waits_from_the_host_timeline() -> None:
    """Two steps over 10 ms of wall time. The loop's phase annotations give the host's time per
    phase (summed over steps, per step), the rest of the wall time is ``other``; CUDA runtime calls
    give the launches and the time the host sat waiting for the GPU (a stream synchronization
    inside ``nan_check``, a blocking copy); an annotation of another name is no phase."""
    prof = _Profile(
        [
            _Event("phase/data", "cpu", 0, 100, annotation=True),
            _Event("phase/forward", "cpu", 100, 2100, annotation=True),
            _Event("cudaLaunchKernel", "cpu", 200, 210),
            _Event("cuLaunchKernel", "cpu", 300, 320),
            _Event("phase/nan_check", "cpu", 2100, 3100, annotation=True),
            _Event("cudaStreamSynchronize", "cpu", 2150, 3050),
            _Event("phase/backward", "cpu", 3100, 4100, annotation=True),
            _Event("phase/optimizer", "cpu", 4100, 4500, annotation=True),
            _Event("phase/data", "cpu", 5000, 5300, annotation=True),
            _Event("phase/forward", "cpu", 5300, 7300, annotation=True),
            _Event("cudaMemcpy", "cpu", 7400, 7500),
            _Event("cudaMemcpyAsync", "cpu", 7500, 7900),  # .tolist() of a device tensor: pageable, blocks
            _Event("phase/drain", "cpu", 9000, 9600, annotation=True),
            _Event("cudaDeviceSynchronize", "cpu", 9010, 9590),
            _Event("my_region", "cpu", 0, 9000, annotation=True),
            _Event("gemm_kernel", "cuda", 1000, 6000),
        ]
    )
    out = summarize(prof, wall_s=10e-3, steps=2, cuda=True, top=5)
    phases = out["phase_ms_per_step"]
    assert list(phases) == [*PHASES, "other"]
    assert phases == pytest.approx(
        {"data": 0.2, "forward": 2.0, "nan_check": 0.5, "backward": 0.5, "optimizer": 0.2, "drain": 0.3, "other": 1.3}
    )
    assert out["launches_per_step"] == 1.0 and out["cuda_launch_ms_per_step"] == pytest.approx(0.015)
    assert out["cuda_wait_ms_per_step"] == pytest.approx((900 + 100 + 580) / 2 / 1e3)
    assert out["cuda_copy_ms_per_step"] == pytest.approx(0.2)
    assert out["device_busy"] == pytest.approx(0.5)
    # the kernel (1-6 ms) left the GPU idle in the first forward before 1 ms, in the second after
    # 6 ms, during the first batch's data, the drain, and 7.3-9 and 9.6-10 ms outside any phase
    assert out["gpu_kernel_ms_per_step"] == pytest.approx(2.5)
    idle = out["gpu_idle_ms_by_phase"]
    assert idle == pytest.approx(
        {"data": 0.05, "forward": 1.1, "nan_check": 0, "backward": 0, "optimizer": 0, "drain": 0.3, "other": 1.05}
    )
    assert sum(idle.values()) + out["gpu_kernel_ms_per_step"] == pytest.approx(5.0)  # the wall time per step
    line = describe({**out, "first_step": 3, "last_step": 4})
    assert line.startswith("profile: steps 3-4, 5 ms/step (data 0, forward 2, nan_check 0, backward 0")
    assert "GPU busy 50% (kernels 2 ms/step; idle under forward 1, other 1 ms), waits for it 1 ms/step" in line
    assert "in copies 0, 1 launches/step" in line

    # no kernel recorded (the profiler got no GPU activity): unknown, not an idle GPU
    blind = summarize(_Profile([e for e in prof.events() if e.device_type.name == "CPU"]), 10e-3, 2, True, 5)
    assert blind["device_busy"] is None and blind["kernels_per_step"] == 0 and blind["launches_per_step"] == 1.0
    assert "gpu_idle_ms_by_phase" not in blind and "gpu_kernel_ms_per_step" not in blind
    assert "GPU busy unknown (no kernel recorded), waits for it 1 ms/step" in describe({**blind, "first_step": 3})

    # every spelling of a launch counts, a copy does not
    names = (
        "cudaLaunchKernel_ptsz",
        "cudaLaunchKernelExC",
        "cuLaunchKernelEx",
        "cudaGraphLaunch_ptsz",
        "cuGraphLaunch",
    )
    calls = _Profile([_Event(n, "cpu", 0, 10) for n in (*names, "cudaMemcpyAsync")])
    assert summarize(calls, wall_s=1e-3, steps=1, cuda=True, top=5)["launches_per_step"] == len(names)

    cpu = summarize(prof, wall_s=10e-3, steps=2, cuda=False, top=5)  # a CPU run has no CUDA figures
    assert "launches_per_step" not in cpu and "device_busy" not in cpu
    assert cpu["phase_ms_per_step"] == phases
    assert "GPU" not in describe({**cpu, "first_step": 3, "last_step": 4})
    assert [op["name"] for op in cpu["top_ops"]] == [  # the top 5 by self time; no annotations
        "cudaStreamSynchronize",
        "cudaDeviceSynchronize",
        "cudaMemcpyAsync",
        "cudaMemcpy",
        "cuLaunchKernel",
    ]


def test_idle_time_is_split_by_the_phase_the_host_was_in() -> None:
    """Kernels of two streams overlap (counted once); a phase reaching past the window counts only
    inside it; a gap between phases is ``other``; a kernel running on after the host's optimizer
    phase ended does not make that phase idle."""
    kernels = sorted([(10, 40), (30, 60), (100, 150), (155, 200), (290, 320)])
    spans = [(0, 50, "forward"), (50, 120, "backward"), (130, 250, "optimizer"), (250, 400, "data")]
    idle = idle_by_phase(kernels, spans, start=0, end=300)
    # forward 0-50: idle 0-10; backward 50-120: idle 60-100; optimizer 130-250: idle 150-155, 200-250;
    # data 250-300 (cut at the window's end): idle 250-290; nothing outside the phases
    assert idle == pytest.approx(
        {"data": 40, "forward": 10, "nan_check": 0, "backward": 40, "optimizer": 55, "drain": 0, "other": 0}
    )
    gap = idle_by_phase(kernels, [(0, 50, "forward"), (130, 250, "optimizer")], start=0, end=300)
    assert gap["other"] == pytest.approx(40 + 40)  # 60-100 and 250-290: no phase ran
    assert idle_by_phase([], spans, 0, 300)["optimizer"] == 120  # no kernel: idle throughout
