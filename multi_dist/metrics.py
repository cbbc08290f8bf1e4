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
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        _drop_rows_after(run_dir / "metrics.jsonl", resume_step)
        self._file = (run_dir / "metrics.jsonl").open("a")
        if cfg.mode != "disabled":
            self._wandb = _start_wandb(run_dir, cfg, config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
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

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


PROGRESS_ENV = "MULTI_DIST_PROGRESS_S"
"""Seconds between two progress lines of long work outside the training loop (default 30)."""


class Progress:
    """A periodic line for long work on one rank (evaluation, re-ranking): what is done of how
    much, the rate and the ETA, at most every ``every_s`` seconds (``MULTI_DIST_PROGRESS_S``,
    default 30); once a line was printed, a last one when the work ends.

    >>> bar = Progress("evaluating data/msrvtt/test", total=len(stream), unit="batches", enabled=rank == 0)
    >>> for batch in stream: ...; bar.update()
    >>> bar.close()
    """

    def __init__(self, what: str, total: int | None, unit: str, enabled: bool = True, every_s: float | None = None):
        self.what, self.total, self.unit, self.enabled = what, total, unit, enabled
        self.every_s = float(os.environ.get(PROGRESS_ENV, 30)) if every_s is None else every_s
        self.done, self.t0 = 0, time.perf_counter()
        self._last, self._printed = self.t0, False

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every_s:
            self._last, self._printed = now, True
            print(self.line(now), flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.t0
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        of = f"/{self.total}" if self.total is not None else ""
        text = f"{self.what}: {self.done}{of} {self.unit}, {rate:.2f} {self.unit}/s"
        if self.total is not None and self.done < self.total and rate > 0:
            text += f", ETA {_hms((self.total - self.done) / rate)}"
        return text

    def close(self) -> None:
        if self.enabled and self._printed:
            print(f"{self.line()} (done in {_hms(time.perf_counter() - self.t0)})", flush=True)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step``, where a run starts or resumes: what a
    killed run logged after its last checkpoint is logged again (a step twice, the two differing in
    time and rates), and a line cut by the kill is no JSON."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line + "\n")
    from .checkpoint import atomic_write

    atomic_write(path, "".join(kept))


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
    try:
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
    except (wandb.errors.UsageError, wandb.errors.CommError) as err:  # no API key; the server out of reach
        said = " ".join(str(err).split())
        raise ValueError(
            f"wandb.mode={cfg.mode}: {said} (or set WANDB_API_KEY; wandb.mode=offline logs to {folder} to sync later)"
        ) from err


def _run_id(run_dir: Path) -> str:
    """A stable id per run folder, so a resumed run continues the same wandb run."""
    f = run_dir / "wandb" / "run_id"
    if f.is_file():
        return f.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    f.write_text(rid)
    return rid
