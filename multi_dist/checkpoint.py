"""Checkpoints that survive being killed mid-write.

Layout of ``RUN/checkpoints``::

    step_00000200/            DeepSpeed's own files (model + ZeRO optimizer partitions, zero_to_fp32.py)
        rank_00000.pt         our per-rank state: data stream position, RNG states (tensors, no pickled code)
        trainer.json          step, samples, config: written by rank 0 after every rank finished
    latest                    the tag of the newest *complete* checkpoint, replaced atomically

A checkpoint counts only once ``trainer.json`` exists and ``latest`` names it, so a kill during a
write leaves ``latest`` on the previous good one; incomplete folders are removed on the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

LATEST = "latest"
COMPLETE = "trainer.json"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_dir / tag / COMPLETE).is_file():
        raise RuntimeError(f"{pointer} names {tag}, which is not a complete checkpoint")
    return tag


def atomic_write(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: readers see the old file or the whole new one,
    also after a crash of the machine (the data reaches the disk before the rename does)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def rng_state() -> dict[str, Any]:
    state = {"python": list(random.getstate()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine: Any,
    ckpt_dir: str | Path,
    step: int,
    trainer: dict[str, Any],
    rank_state: dict[str, Any],
    keep: int,
    files: dict[str, str] | None = None,
) -> str:
    """Collective: every rank calls it. ``files`` (name -> text) are written by rank 0 beside
    DeepSpeed's, before the checkpoint counts as complete. Returns the tag written."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and (ckpt_dir / tag).exists():
        # the leftover of a write that was killed (perhaps by more ranks than now): written over in
        # place, it would count as complete with stale files of the other run among the new ones
        if latest_tag(ckpt_dir) == tag:
            raise RuntimeError(f"{ckpt_dir / tag} is the latest checkpoint: it is not written over")
        shutil.rmtree(ckpt_dir / tag)
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save(rank_state, ckpt_dir / tag / f"rank_{rank:05d}.pt")
    os.sync()  # this node's files on disk before rank 0 marks the checkpoint complete (a node that crashes)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        for name, text in (files or {}).items():
            atomic_write(ckpt_dir / tag / name, text)
        atomic_write(ckpt_dir / tag / COMPLETE, json.dumps(trainer, indent=1))
        atomic_write(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep, tag)
    if dist.is_initialized():
        dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop incomplete leftovers of killed writes."""
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
    complete = [t for t in tags if (ckpt_dir / t / COMPLETE).is_file()]
    doomed = [t for t in tags if t not in complete and t != current] + complete[: max(0, len(complete) - keep)]
    for t in doomed:
        if t != current:
            shutil.rmtree(ckpt_dir / t, ignore_errors=True)


def read_trainer(ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    """The trainer state (``trainer.json``) of checkpoint ``tag``, without touching the engine."""
    return json.loads((Path(ckpt_dir) / tag / COMPLETE).read_text())


def load(engine: Any, ckpt_dir: str | Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective: restores the engine (weights, optimizer, scheduler); returns (trainer, rank state)."""
    ckpt_dir = Path(ckpt_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rank_file = ckpt_dir / tag / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise RuntimeError(f"{rank_file} is missing: was the checkpoint written with another world size?")
    rank_state = torch.load(rank_file, weights_only=True)
    return read_trainer(ckpt_dir, tag), rank_state
