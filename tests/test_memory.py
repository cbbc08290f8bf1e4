"""LiveBytes and the fake-tensor estimate of ``launch/bench_memory.py --device estimate``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from multi_dist.memory import LiveBytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
import bench_memory  # noqa: E402


def test_live_bytes_counts_what_is_created_and_freed() -> None:
    a = torch.ones(1000)  # exists before: never counted
    with LiveBytes(exclude=[a]) as mem:
        b = torch.empty(250, dtype=torch.float32)  # 1,000 bytes
        c = b.view(25, 10)  # a view: no new storage
        a.add_(1)  # in place on an excluded tensor
        d = torch.empty(500, dtype=torch.float64)  # 4,000 bytes
        assert mem.live == mem.peak == 5000
        del b, c, d
        assert mem.live == 0 and mem.peak == 5000
        mem.reset_peak()
        e = torch.empty(10, dtype=torch.int8)
    assert (mem.live, mem.peak) == (10, 10) and e.numel() == 10
    assert mem.ops == 4  # three allocations and one add: the view is not an op that launches work


def test_the_fake_tensor_estimate_matches_a_real_step() -> None:
    """The estimate computes nothing; the same step on real tensors (tiny preset, bf16 CPU
    autocast, 16 frames, chunked checkpointing, all four losses) must reach the same live-tensor
    peak, to 2% (measured: equal)."""
    spec = {
        "preset": "tiny",
        "sampler": "multiway",
        "checkpointing": True,
        "chunk": 8,
        "frames": 16,
        "text": 12,
        "batch": 4,
        "frozen": 0,
        "objectives": list(bench_memory.OBJECTIVES),
    }
    est = bench_memory.estimate_one(spec)
    real = bench_memory.step_memory(spec, fake=False)
    assert est["status"] == "ok" and est["losses"] == real["losses"] == ["mcm", "mlm", "vtc", "vtm"]
    assert abs(est["step_peak_bytes"] - real["step_peak_bytes"]) <= 0.02 * real["step_peak_bytes"], (real, est)
    assert (est["static_bytes"], est["batch_bytes"]) == (real["static_bytes"], real["batch_bytes"])
    assert est["ops_per_step"] == real["ops_per_step"] > 1000  # the same ops dispatched, fake or real
