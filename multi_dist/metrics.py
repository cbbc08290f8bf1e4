"""One flat metrics dict per log step: a progress line on rank 0, ``metrics.jsonl`` in the run
folder, and wandb (imported lazily, offline unless a project is configured; never required)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    """``online`` needs ``project`` (and network); ``offline`` writes a run to sync later."""
    project: str | None = None
    entity: str | None = None
    name: str | None = None

    def validate(self) -> None:
        if self.mode == "online" and not self.project:
            raise ValueError("mode 'online' needs a project")


class MetricLogger:
    def __init__(
        self,
        run_dir: Path,
        cfg: WandbConfig,
        config: dict[str, Any],
        total_steps: int,
        enabled: bool = True,
        resume_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.start_step, self.t0 = resume_step, time.time()
        self._last: dict[str, float] = {}
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = (run_dir / "metrics.jsonl").open("a")
        if cfg.mode != "disabled":
            self._wandb = _start_wandb(run_dir, cfg, config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._last.update({k: v for k, v in metrics.items() if k.startswith("train/loss")})
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        print(self._line(step, metrics), flush=True)

    def _line(self, step: int, m: dict[str, float]) -> str:
        done = step - self.start_step
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        losses = " ".join(f"{k.split('loss_')[-1]} {v:.3f}" for k, v in m.items() if k.startswith("train/loss_"))
        parts = [f"step {step}/{self.total}"]
        if "train/loss" in m:
            parts.append(f"loss {m['train/loss']:.4f} ({losses})")
        if "perf/clips_per_s" in m:
            parts.append(
                f"{m['perf/clips_per_s']:.1f} clips/s, wait {m['data/wait_frac']:.0%}, "
                f"lr {m['optim/lr']:.2e}, mem {m['perf/mem_gib']:.2f} GiB"
            )
        evals = [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in m.items() if k.startswith("eval/")]
        if evals:
            parts.append("eval: " + ", ".join(evals))
        if eta == eta and step < self.total:
            parts.append(f"ETA {_hms(eta)}")
        return " | ".join(parts)

    def last_losses(self) -> dict[str, float]:
        return {k.removeprefix("train/"): v for k, v in self._last.items()}

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _start_wandb(run_dir: Path, cfg: WandbConfig, config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: logging to metrics.jsonl only", file=sys.stderr)
        return None
    folder = run_dir / "wandb"
    folder.mkdir(exist_ok=True)
    os.environ.setdefault("WANDB_DIR", str(folder))
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.project or "multi-dist",
        entity=cfg.entity,
        name=cfg.name or run_dir.name,
        mode=cfg.mode,
        config=config,
        dir=str(folder),
        resume="allow",
        id=_run_id(run_dir),
    )


def _run_id(run_dir: Path) -> str:
    """A stable id per run folder, so a resumed run continues the same wandb run."""
    f = run_dir / "wandb" / "run_id"
    if f.is_file():
        return f.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    f.write_text(rid)
    return rid
