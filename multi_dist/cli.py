"""The commands users run, in one place: ``pretrain``, ``finetune`` and ``evaluate``.

``launch/*.py``, the Slurm launcher and Ray sweeps all go through :func:`load` (a strict config:
a typo fails here, naming the key, before any process or job starts) and :func:`run`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .config import exit_on_startup_error, load_config, start_up
from .threads import share_cores

COMMANDS = ("pretrain", "finetune", "evaluate")
OnLog = Callable[[int, dict[str, float]], None]


def config_class(command: str) -> type:
    if command in ("pretrain", "finetune"):
        from .train import TrainConfig

        return TrainConfig
    if command == "evaluate":
        from .evaluate import EvalConfig

        return EvalConfig
    raise ValueError(f"unknown command {command!r} (known: {', '.join(COMMANDS)})")


def load(command: str, config: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The command's typed config from a YAML file and ``a.b=c`` overrides."""
    cfg = load_config(config_class(command), config, overrides)
    if command == "finetune" and cfg.task.name == "pretrain":
        raise ValueError("finetune: set task.name (qa, choice, retrieval or labels); use pretrain to pretrain")
    return cfg


def run(command: str, cfg: Any, on_log: OnLog | None = None) -> dict[str, Any]:
    """Run a loaded config in this process (one rank of however many the launcher started)."""
    from .train import setup_logging

    setup_logging()
    if command in ("pretrain", "finetune"):
        from .train import train

        return train(cfg, on_log=on_log)
    from .evaluate import evaluate

    return evaluate(cfg)


def main(command: str, doc: str, argv: list[str] | None = None) -> dict[str, Any]:
    """``launch/<command>.py --config FILE [a.b=c ...]`` under deepspeed, torchrun, srun or python."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    folder = {"evaluate": "eval"}.get(command, command)
    p.add_argument("--config", help=f"YAML config (configs/{folder}/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher; read from env")
    example = "max_batches=10 data.batch_size=8" if command == "evaluate" else "steps=100 data.batch_size=8"
    p.add_argument("overrides", nargs="*", help=f"a.b=c overrides, e.g. {example}")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    with exit_on_startup_error():  # a wrong key or input: its message alone, on every rank
        with start_up():
            share_cores()  # before torch and numpy's BLAS start their threads (they load with the config)
            cfg = load(command, args.config, args.overrides)
        return run(command, cfg)
