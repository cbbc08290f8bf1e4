"""LiveBytes, the fake-tensor estimate of ``launch/bench_memory.py --device estimate``, and its time limits."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from multi_dist.memory import LiveBytes

from .conftest import run_script

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
    before = torch.ones(1000)  # not excluded: a view of it allocates nothing (it counted 4,000 bytes)
    with LiveBytes() as mem:
        view = before[:10]
    assert (mem.live, mem.peak) == (0, 0) and view.numel() == 10


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


def test_a_configuration_cut_by_the_time_guard_is_skipped_and_a_slow_one_times_out(tmp_path: Path) -> None:
    """Two limits, two statuses. One configuration killed at ``--config-timeout`` is a finding
    (``timeout``: too slow for the limit); one still running when ``--max-minutes`` runs out was
    cut by the budget, whatever its speed (``skipped``, as are those never started). Each
    configuration is asked for a minute of steps, so that both limits cut it however fast the
    machine (it took about 10 s with the defaults on one machine, 6 s on a faster one: as long as
    the guard)."""
    base = ["launch/bench_memory.py", "--device", "cpu", "--threads", "1", "--frames", "64", "--text", "32"]
    base += ["--min-seconds", "60", "--max-steps", "100000"]
    statuses, lefts = {}, {}
    for name, limit in {"slow": ["--config-timeout", "1"], "guard": ["--max-minutes", "0.1"]}.items():
        out = tmp_path / f"{name}.json"
        proc = run_script(*base, *limit, "--json", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        statuses[name] = [(r["status"], r["error"]) for r in json.loads(out.read_text())["results"]]
        # each configuration's line ends with the time left: the mean pace so far, capped by the guard
        ends = re.findall(r"^\[\d+/\d+\] .*\(\d+ s; (\d+) s total(?:, ~(\d+) s left)?\)$", proc.stdout, re.M)
        assert len(ends) == len(statuses[name]) and ends[-1][1] == "", proc.stdout
        lefts[name] = [int(left) for _, left in ends[:-1]]
    assert len(statuses["slow"]) == len(statuses["guard"]) > 2
    assert set(statuses["slow"]) == {("timeout", "killed after 1 s")}
    assert lefts["slow"][0] >= len(statuses["slow"]) - 1 and lefts["slow"] == sorted(lefts["slow"], reverse=True)
    assert set(lefts["guard"]) == {0}  # the guard is spent: whatever is left is skipped at once
    first, *rest = statuses["guard"]
    assert first == ("skipped", "time guard (0.1 min) reached while it ran")
    assert set(rest) == {("skipped", "time guard (0.1 min) reached")}


def test_a_dense_baseline_out_of_memory_meets_the_memory_goal_but_not_the_speed_goal() -> None:
    """With no dense step there is no speed to compare: the speed goal was reported met."""
    common = {"frames": 64, "text": 32, "checkpointing": True, "frozen": False, "chunk": 8, "main": True}
    results = [
        {**common, "sampler": "multiway", "status": "ok", "peak_bytes": 5e9, "clips_per_s": 10.0},
        {**common, "sampler": "none", "status": "oom"},
    ]
    goals = bench_memory.judge_goals(results, cuda=True, preset="base", texts=[32])
    assert goals["cuda_mem_64_frames"]["met"] is True
    assert goals["cuda_speed_64_frames"]["met"] is None
    assert goals["cuda_speed_64_frames"]["note"] == "the dense baseline ran out of memory: no speed to compare"
