"""The main job on the embedded demo corpus: build the corpus if missing, pretrain the ``demo``
preset with the ``deepspeed`` launcher (2 CPU processes by default), evaluate, and print what it
learned: losses first vs last, zero-shot retrieval R@1 vs chance, MCM accuracy vs 25%."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .dist import deepspeed_command
from .shards.build import format_summary
from .shards.demo import make_demo

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DemoConfig:
    corpus: str = "data/demo"
    """Folder of the demo corpus (built on first use, left as it is afterwards)."""
    train_clips: int = 1600
    val_clips: int = 200
    nproc: int = 2
    """Training processes (ranks) started by the deepspeed launcher."""
    pretrain_config: str = "configs/pretrain/demo.yaml"
    run_dir: str = "runs/demo"
    pretrain: list[str] = field(default_factory=list)
    """Extra ``a.b=c`` overrides for the pretraining config, e.g. ``[steps=50]``."""

    def validate(self) -> None:
        if self.train_clips <= 0 or self.val_clips <= 0 or self.nproc <= 0:
            raise ValueError("train_clips, val_clips and nproc must be positive")


def pretrain_config_path(name: str) -> str:
    """The pretraining config: relative paths are read from the directory the demo is launched
    from, as all the others; one not found there is the one shipped in the repository
    (``configs/pretrain/demo.yaml`` from anywhere)."""
    path = Path(name)
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        return str(ROOT / path)
    return name


def check_pretrain(cfg: DemoConfig) -> None:
    """The pretraining config with the demo's overrides, loaded as the ranks will load it: a typo
    in ``pretrain=[...]`` fails now, before the corpus is built and the launcher starts."""
    from .cli import load

    try:
        load("pretrain", pretrain_config_path(cfg.pretrain_config), [f"run_dir={cfg.run_dir}", *cfg.pretrain])
    except ValueError as err:
        raise type(err)(f"pretrain: {err}") from err


def pretrain_command(cfg: DemoConfig) -> list[str]:
    """The training command, run in the caller's directory (where ``corpus`` and ``run_dir`` are
    read and written, by this process as by the ranks)."""
    corpus = Path(cfg.corpus)
    args = [
        str(ROOT / "launch" / "pretrain.py"),
        "--config",
        pretrain_config_path(cfg.pretrain_config),
        f"data.path={corpus / 'train'}",
        f"val.path={corpus / 'val'}",
        f"run_dir={cfg.run_dir}",
        *cfg.pretrain,
    ]
    return [*deepspeed_command(cfg.nproc), *args]


def report(summary: dict[str, Any]) -> str:
    first, last, ev = summary["first_losses"], summary["last_losses"], summary.get("eval", {})
    lines = ["", "what the demo learned:"]
    for name in sorted(k for k in first if k.startswith("loss_")):
        lines.append(f"  {name[5:]:>4} loss  {first[name]:7.3f} -> {last.get(name, float('nan')):7.3f}")
    if ev:
        chance = ev["eval/chance_r1"]
        lines.append(
            f"  zero-shot text->video R@1 {ev['eval/t2v_r1']:.1%} (chance {chance:.1%}, "
            f"{ev['eval/t2v_r1'] / chance:.0f}x), R@5 {ev['eval/t2v_r5']:.1%}, R@10 {ev['eval/t2v_r10']:.1%}"
        )
        lines.append(f"  zero-shot video->text R@1 {ev['eval/v2t_r1']:.1%} ({ev['eval/v2t_r1'] / chance:.0f}x chance)")
        if "eval/mcm_acc" in ev:
            acc, chance = ev["eval/mcm_acc"], ev["eval/mcm_chance"]
            lines.append(f"  multiple choice (MCM) accuracy {acc:.1%} (chance {chance:.0%})")
        lines.append(
            f"  on {int(ev['eval/clips'])} held-out clips ({int(ev['eval/texts'])} distinct captions); "
            f"the exported model is in {summary['export']}"
        )
    return "\n".join(lines)


def run(cfg: DemoConfig) -> dict[str, Any]:
    t0 = time.time()
    corpus = Path(cfg.corpus)
    print(f"demo corpus: {corpus.resolve()}", flush=True)
    for summary in make_demo(corpus, cfg.train_clips, cfg.val_clips, processes=2).values():
        print("  " + format_summary(summary), flush=True)
    cmd = pretrain_command(cfg)
    print("\n$ " + " ".join(cmd), flush=True)
    # the accelerator named (no detection warnings); each rank sets its own share of the cores
    # (multi_dist.threads: the deepspeed launcher leaves it a thread per core)
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    proc = subprocess.run(cmd, env={"DS_ACCELERATOR": accelerator, **os.environ})
    if proc.returncode != 0:
        raise SystemExit(f"pretraining failed (exit {proc.returncode}); see the output above")
    summary = json.loads((Path(cfg.run_dir) / "summary.json").read_text())
    print(report(summary))
    print(f"  total {time.time() - t0:.0f} s", flush=True)
    return summary
