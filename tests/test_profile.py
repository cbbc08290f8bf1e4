from __future__ import annotations

import pytest

from multi_dist.profile import _union_us


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
