from __future__ import annotations

from types import SimpleNamespace

import pytest

from multi_dist.profile import _union_us, summarize


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
