"""Hyperparameter sweeps of pretraining or finetuning runs on Ray Tune, with ASHA early stopping.

A sweep config (:class:`SweepConfig`, YAML, strict like every config here) names a run config
(``base`` + ``overrides``, exactly what ``launch/pretrain.py --config BASE a.b=c`` takes) and a
search ``space`` over the same dotted keys. Every trial is an ordinary run of :func:`cli.run`
whose ``run_dir`` lies in the trial's folder, so a trial's run folder is a normal run folder
(resolved config, metrics.jsonl, checkpoints, export).

How Tune and Ray Train meet (Ray 2.60, where Ray Train V2 is the default): a Ray Train trainer
is no longer handed to the ``Tuner``. A Tune trial is a driver that launches its own ``TorchTrainer``;
Ray's own ``TuneReportCallback`` forwards the workers' ``ray.train.report`` calls back to a
*function* trainable. Here a trial is a *class* trainable (:class:`SweepTrial`) instead, for one reason: a class
trainable learns that it is being stopped (Tune calls ``cleanup()`` before it ends the actor),
while a function trainable is simply terminated, and its Train controller and workers, which the
trial actor owns, die with it mid-step. On ``cleanup()`` the trial asks the training loop to stop
(:func:`multi_dist.train.request_stop`): the loop checkpoints at the next step boundary and
returns, the workers leave their process group and exit, and only then does the trial end.

* ``workers_per_trial: 1``: the trial runs the training loop itself, in a thread of the trial
  actor (a real single-process DeepSpeed run). Each report waits for Tune's verdict, as Tune's
  function API does, so a trial that ASHA stops stops at the very step it was judged on.
* ``workers_per_trial: N > 1``: the trial starts a ``TorchTrainer`` with N workers (Ray Train forms
  the gloo/NCCL group, :mod:`multi_dist.dist` finds it through RANK/WORLD_SIZE, DeepSpeed trains in
  it). At every log step rank 0 puts its metrics (already averaged over ranks) into a Ray queue
  that the trial reads; a stop reaches the workers through a small flag actor they poll once a
  second, so here a stopped trial runs on for a moment before it stops. (Not through
  ``ray.train.report``: a worker holds one report until the Train controller collects it, and the
  controller polls every 2 s, so a run that logged more often than that waited 2 s a log: measured
  2.0 s between logs for 0.18 s of training.)

The trial actor of a multi-worker trial takes no CPU (it only waits; it reserves some memory,
as Tune needs a non-empty request); Tune cannot see the workers' resources, so the sweep caps
concurrent trials at what the cluster holds (``max_concurrent_trials``).

ASHA's time attribute is the training ``step``. Results: ``sweep_dir/results.csv`` (one row per
trial, best first) and ``sweep_dir/best.yaml`` (the best trial's full run config, runnable with
``launch/<command>.py --config``); trials live in ``sweep_dir/tune/trial_<id>/`` with their run in
``run/``. An interrupted sweep continues with ``--resume`` (``Tuner.restore``): unfinished
trials restart in the same folder and their runs resume from their last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import queue
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from . import cli
from .config import ConfigError, exit_on_startup_error, load_config, save_config, start_up, to_dict

EXPERIMENT = "tune"
"""The Tune experiment folder inside ``sweep_dir``."""
RUN = "run"
"""A trial's run folder inside the trial folder."""
STEP = "step"
"""ASHA's time attribute: the training step of each report."""


@dataclass
class Domain:
    """One search dimension: exactly one of the fields, e.g. ``{loguniform: [1.0e-4, 1.0e-2]}``."""

    grid: list[Any] | None = None
    """Every value, in every combination with the other grid keys (``tune.grid_search``)."""
    choice: list[Any] | None = None
    """One value drawn at random per trial."""
    uniform: list[float] | None = None
    """``[lo, hi]``: a float drawn uniformly."""
    loguniform: list[float] | None = None
    """``[lo, hi]``: a float drawn uniformly in log space (``lo > 0``)."""
    randint: list[int] | None = None
    """``[lo, hi]``: an integer in ``lo .. hi - 1`` (``hi`` excluded, as in ``tune.randint``)."""

    @property
    def kind(self) -> str:
        return next(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def validate(self) -> None:
        given = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        if len(given) != 1:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise ValueError(f"needs exactly one of {names}; got {given or 'none'}")
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("grid", "choice"):
            if not values:
                raise ValueError(f"{kind} needs at least one value")
            return
        if len(values) != 2 or not values[0] < values[1]:
            raise ValueError(f"{kind} needs [lo, hi] with lo < hi, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform needs lo > 0, got {values[0]}")

    def candidates(self) -> list[Any]:
        """Values that span the domain: every listed value, or both ends of a range."""
        values = getattr(self, self.kind)
        if self.kind == "randint":
            return [values[0], values[1] - 1]
        return list(values)

    def to_tune(self) -> Any:
        values = getattr(self, self.kind)
        if self.kind == "grid":
            return tune.grid_search(values)
        if self.kind == "choice":
            return tune.choice(values)
        return getattr(tune, self.kind)(*values)


@dataclass
class AshaConfig:
    """Asynchronous successive halving: at each rung (``grace_period`` x ``reduction_factor``^k
    steps) a trial continues only if its metric is in the best 1/``reduction_factor`` so far."""

    max_t: int | None = None
    """Steps after which no trial runs on (default: the runs' ``steps``, the largest if swept)."""
    grace_period: int = 1
    """Steps every trial runs before it can be stopped."""
    reduction_factor: float = 3.0

    def validate(self) -> None:
        if self.max_t is not None and self.max_t <= 0:
            raise ValueError(f"max_t must be positive, got {self.max_t}")
        if self.grace_period <= 0:
            raise ValueError(f"grace_period must be positive, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass
class SweepConfig:
    command: Literal["pretrain", "finetune"] = "pretrain"
    base: str = ""
    """The run config every trial starts from (as ``--config`` of ``launch/<command>.py``)."""
    overrides: list[str] = field(default_factory=list)
    """``a.b=c`` overrides applied to ``base`` in every trial, before the sampled values."""
    space: dict[str, Domain] = field(default_factory=dict)
    """Dotted run-config keys (as in overrides) -> their domain."""
    search: Literal["grid", "random"] = "random"
    """Both are Tune's ``BasicVariantGenerator`` (the one search algorithm Ray ships without extra
    packages): ``grid`` requires every domain to be a grid; ``random`` draws the other domains
    ``num_samples`` times (grid keys are still crossed with every draw)."""
    num_samples: int = 1
    seed: int | None = None
    """Seed of the random draws (none: different draws each sweep)."""
    metric: str = "train/loss"
    """A key the training loop logs (``train/loss``, ``train/loss_vtc``, ``eval/t2v_r1``, ...)."""
    mode: Literal["min", "max"] = "min"
    asha: AshaConfig | None = field(default_factory=AshaConfig)
    """Early stopping; ``null`` runs every trial to the end."""
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 0
    """0: as many as the cluster's CPUs (and GPUs) hold."""
    num_cpus: int | None = None
    """CPUs of the local Ray instance (default: all of this machine's); ignored with ``--address``."""
    stop_timeout_s: float = 600.0
    """How long a stopped trial waits for its run to checkpoint and exit."""
    sweep_dir: str = "runs/sweep"

    def validate(self) -> None:
        if not self.base:
            raise ValueError("base: name the run config every trial starts from")
        for name in ("num_samples", "workers_per_trial"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        if self.max_concurrent_trials < 0:
            raise ValueError("max_concurrent_trials must be >= 0")
        if "run_dir" in self.space:
            raise ValueError("space: run_dir is set per trial (inside its trial folder)")
        if self.search == "grid":
            for key, domain in self.space.items():
                if domain.kind != "grid":
                    raise ValueError(f"search grid needs every domain to be a grid; space '{key}' is {domain.kind}")


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """The sweep config from YAML and ``a.b=c`` overrides, with its paths made absolute (trials
    run in other processes); :func:`run_sweep` checks every trial config before it starts Ray."""
    sweep = load_config(SweepConfig, path, overrides)
    return dataclasses.replace(
        sweep, base=str(Path(sweep.base).resolve()), sweep_dir=str(Path(sweep.sweep_dir).resolve())
    )


def value_text(value: Any) -> str:
    """``value`` as the right-hand side of an ``a.b=c`` override that reads back unchanged."""
    value = _plain(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31 - 1).strip()
    return text.removesuffix("...").strip()  # a bare scalar's document-end marker


def _plain(value: Any) -> Any:
    """numpy scalars (as samplers may return) -> Python values."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def trial_overrides(sweep: SweepConfig, values: dict[str, Any], run_dir: str | None = None) -> list[str]:
    """The overrides that turn ``base`` into one trial's config (what the CLI would be given)."""
    out = [*sweep.overrides, *(f"{key}={value_text(v)}" for key, v in values.items())]
    if run_dir is not None:
        out.append(f"run_dir={value_text(run_dir)}")
    return out


def trial_config(sweep: SweepConfig, values: dict[str, Any], run_dir: str | None = None) -> Any:
    """One trial's run config, loaded exactly as ``launch/<command>.py`` loads it (strict)."""
    return cli.load(sweep.command, sweep.base, trial_overrides(sweep, values, run_dir))


def _error_line(error: BaseException) -> str:
    """A failed trial's cause in one line: Ray wraps it in a RayTaskError whose first line is
    Ray's own header (the actor, its pid), in terminal colours."""
    cause = getattr(error, "cause", None) or error
    text = f"{type(cause).__name__}: {cause}".strip()
    return re.sub(r"\x1b\[[0-9;]*m", "", text.splitlines()[0] if text else type(cause).__name__)


MAX_CHECKED_COMBINATIONS = 256


def check(sweep: SweepConfig) -> list[Any]:
    """Load the run config with the overrides alone, then with every combination of the space's
    values (range ends for ranges; beyond ``MAX_CHECKED_COMBINATIONS``, each value with the first
    of the others), so that a typo or a bad value fails now, naming the keys; returns the configs."""
    try:
        configs = [cli.load(sweep.command, sweep.base, sweep.overrides)]
    except ConfigError as err:
        raise ConfigError(f"overrides: {err}") from err
    keys = list(sweep.space)
    candidates = [sweep.space[key].candidates() for key in keys]
    if math.prod(len(c) for c in candidates) <= MAX_CHECKED_COMBINATIONS:
        # every combination: values valid alone may not be together (grad_accum=2 with on_nan=skip)
        checks = [(dict(zip(keys, combo, strict=True)), keys) for combo in itertools.product(*candidates)]
    else:  # too many to load: each value with the first of the others
        first = {key: c[0] for key, c in zip(keys, candidates, strict=True)}
        checks = [({**first, key: v}, [key]) for key, c in zip(keys, candidates, strict=True) for v in c]
    for values, named in checks:
        try:
            configs.append(trial_config(sweep, values))
        except ConfigError as err:
            raise ConfigError(f"space {', '.join(f'{k!r} = {values[k]!r}' for k in named)}: {err}") from err
    if sweep.asha is not None:
        max_t = sweep.asha.max_t or max(c.steps for c in configs)
        if sweep.asha.grace_period > max_t:
            raise ConfigError(f"asha.grace_period={sweep.asha.grace_period} exceeds max_t={max_t}")
        if sweep.metric.startswith("eval/") and not all(_evaluates(c) and c.eval_every > 0 for c in configs):
            raise ConfigError(
                f"metric {sweep.metric} is only logged at the end unless the runs evaluate during training: "
                "set val and eval_every in the run config (or asha: null)"
            )
    if sweep.metric.startswith("eval/") and not all(_evaluates(c) for c in configs):
        raise ConfigError(f"metric {sweep.metric} needs an evaluation, but a run has none: set val in the run config")
    return configs


def _evaluates(cfg: Any) -> bool:
    """Whether a run logs eval/ metrics: one with no validation set does not."""
    return cfg.val is not None and bool(cfg.val.path or cfg.val.corpora)


# ---------------------------------------------------------------------------------------------
# A trial


class SweepTrial(tune.Trainable):
    """One trial: a run of the sampled config, reporting each logged dict that holds the metric.

    ``step()`` returns the next such report (ASHA judges it); ``cleanup()`` stops the run at a step
    boundary with a checkpoint and waits for it to exit."""

    def setup(self, config: dict[str, Any], sweep: SweepConfig, cwd: str) -> None:
        if Path(cwd).is_dir():  # relative paths in the run config mean what they mean to the CLI
            os.chdir(cwd)
        self._sweep = sweep
        values = {key: _plain(config[key]) for key in sweep.space}
        self._cfg = trial_config(sweep, values, str(trial_dir(sweep, self.trial_id) / RUN))
        self._logged: dict[str, Any] = {}
        if sweep.workers_per_trial == 1:
            self._run: _LocalRun | _TrainerRun = _LocalRun(sweep.command, self._cfg)
        else:
            self._run = _TrainerRun(sweep, self._cfg, cwd, self.trial_id)
        self._run.start()

    def step(self) -> dict[str, Any]:
        while True:
            event = self._run.next_event()
            if event is None:  # the run ended
                if self._sweep.metric not in self._logged:
                    raise ValueError(
                        f"the run never logged the sweep's metric {self._sweep.metric!r}; "
                        f"it logged: {', '.join(sorted(self._logged))}"
                    )
                return {**self._logged, "done": True}
            step, metrics = event
            self._logged.update(metrics)
            self._logged[STEP] = step
            if self._sweep.metric in metrics:
                return dict(self._logged)
            section = self._sweep.metric.split("/")[0] + "/"
            kin = sorted(k for k in metrics if k.startswith(section))
            if kin:  # its kind was logged without it (a typo): fail now, not after the whole run
                raise ValueError(
                    f"the sweep's metric {self._sweep.metric!r} is not among what the run logs with it: "
                    f"{', '.join(kin)}"
                )

    def cleanup(self) -> None:
        run = getattr(self, "_run", None)  # None: setup failed before the run started
        if run is not None:
            # stopped at its last step (ASHA's max_t): let it finish its final evaluation and export
            finish = self._logged.get(STEP, 0) >= self._cfg.steps
            run.stop(self._sweep.stop_timeout_s, finish)


def trial_dir(sweep: SweepConfig, trial_id: str) -> Path:
    return Path(sweep.sweep_dir) / EXPERIMENT / _trial_dirname_of(trial_id)


def _trial_dirname_of(trial_id: str) -> str:
    return f"trial_{trial_id}"


def _trial_dirname(trial: Any) -> str:
    return _trial_dirname_of(trial.trial_id)


class _LocalRun:
    """The training loop in a thread of the trial actor; each report waits for Tune's verdict."""

    def __init__(self, command: str, cfg: Any) -> None:
        self.command, self.cfg = command, cfg
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.verdict = threading.Semaphore(0)
        self.waiting = False
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._main, name="sweep-trial-run", daemon=True)

    def start(self) -> None:
        from .train import clear_stop

        clear_stop()  # this actor's previous trial's; this one's may come from now on
        self.thread.start()

    def _on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.events.put(("log", (step, dict(metrics))))
        if not self.stopping.is_set():
            self.verdict.acquire()  # released by the next step() (go on) or by stop()

    def _main(self) -> None:
        try:
            self.events.put(("done", cli.run(self.command, self.cfg, on_log=self._on_log)))
        except BaseException as err:  # handed to step(), which raises it in the trial
            self.events.put(("error", err))

    def next_event(self) -> tuple[int, dict[str, float]] | None:
        if self.waiting:
            self.verdict.release()
        kind, payload = self.events.get()
        self.waiting = kind == "log"
        if kind == "error":
            raise payload
        return payload if kind == "log" else None

    def stop(self, timeout: float, finish: bool) -> None:
        from .train import request_stop

        if self.thread.is_alive():
            self.stopping.set()
            if not finish:
                request_stop()
            self.verdict.release()
            self.thread.join(timeout)


class _StopFlag:
    """Set by a trial that is being stopped; polled by its Ray Train workers."""

    def __init__(self) -> None:
        self.stopped = False

    def set(self) -> None:
        self.stopped = True

    def is_set(self) -> bool:
        return self.stopped


def _train_worker(config: dict[str, Any]) -> None:
    """A Ray Train worker: the training loop on one rank of the group Ray Train formed."""
    import torch.distributed as dist

    from .config import from_dict
    from .train import clear_stop, request_stop

    clear_stop()  # a previous trial's, in a reused worker process
    if Path(config["cwd"]).is_dir():
        os.chdir(config["cwd"])
    cfg = from_dict(cli.config_class(config["command"]), config["cfg"])
    flag, reports, finished = config["flag"], config["reports"], threading.Event()

    def watch() -> None:
        while not finished.wait(1.0):
            if ray.get(flag.is_set.remote()):
                request_stop()
                return

    def on_log(step: int, metrics: dict[str, float]) -> None:
        if dist.get_rank() == 0:  # the same dict on every rank
            reports.put((step, {**metrics, "world_size": dist.get_world_size()}))

    watcher = threading.Thread(target=watch, name="sweep-stop-watch", daemon=True)
    watcher.start()
    try:
        cli.run(config["command"], cfg, on_log=on_log)
    finally:
        finished.set()
        watcher.join()


class _TrainerRun:
    """A ``TorchTrainer`` with ``workers_per_trial`` workers, fitted in a thread of the trial."""

    def __init__(self, sweep: SweepConfig, cfg: Any, cwd: str, trial_id: str) -> None:
        from ray.util.queue import Queue

        self._sweep, self.cfg, self.cwd, self.trial_id = sweep, cfg, cwd, trial_id
        self.reports = Queue(actor_options={"num_cpus": 0})
        self.flag = ray.remote(num_cpus=0)(_StopFlag).remote()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="sweep-trial-fit", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        s = self._sweep
        resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.gpus_per_worker else {})}
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "command": s.command,
                "cfg": to_dict(self.cfg),
                "cwd": self.cwd,
                "flag": self.flag,
                "reports": self.reports,
            },
            scaling_config=ScalingConfig(
                num_workers=s.workers_per_trial, use_gpu=s.gpus_per_worker > 0, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name="train",
                storage_path=str(Path(self.cfg.run_dir).parent),
            ),
        )
        try:
            trainer.fit()
        except BaseException as err:
            self.error = err

    def next_event(self) -> tuple[int, dict[str, float]] | None:
        from ray.util.queue import Empty

        while True:
            alive = self.thread.is_alive()  # read first: once fit returned, every report is queued
            try:
                return self.reports.get(timeout=1.0)
            except Empty:
                if alive:
                    continue
            if self.error is not None:
                raise self.error
            return None

    def stop(self, timeout: float, finish: bool) -> None:
        if self.thread.is_alive():
            if not finish:
                self.flag.set.remote()
            self.thread.join(timeout)
        self.reports.shutdown()
        ray.kill(self.flag)


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepOutcome:
    rows: list[dict[str, Any]]
    """One per trial, best first (as in ``results.csv``)."""
    results_csv: Path
    best_config: Path | None
    """``None`` when no trial logged the metric."""
    unfinished: int
    """Trials an interruption left pending or running: ``--resume`` continues them."""


# Ray's unix sockets live in <temp>/session_<date>_<time>_<usec>_<pid>/sockets/<name> (names up to
# about 20 bytes, e.g. dash_UsageStatsHead) and a socket path has at most 103 bytes on macOS (107 on
# Linux): keep the temp dir this short.
_SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/") + 24
_MAX_RAY_TEMP = 103 - _SOCKET_SUFFIX


def ray_temp_dir(sweep_dir: Path) -> Path:
    """``sweep_dir/tmp`` when its path is short enough for Ray's sockets, else a short folder in
    /tmp named after the sweep, linked from ``sweep_dir/tmp``."""
    wanted = sweep_dir / "tmp"
    if len(str(wanted).encode()) <= _MAX_RAY_TEMP:
        wanted.mkdir(parents=True, exist_ok=True)
        return wanted
    short = Path("/tmp") / f"ray-{hashlib.sha1(str(sweep_dir).encode()).hexdigest()[:10]}"
    short.mkdir(exist_ok=True)
    if not wanted.is_symlink():
        wanted.symlink_to(short, target_is_directory=True)
    return short


def _check_resume(sweep: SweepConfig, resume: bool) -> None:
    sweep_dir = Path(sweep.sweep_dir)
    experiment = sweep_dir / EXPERIMENT
    if not resume:
        if experiment.exists():
            raise ConfigError(f"{experiment} already holds a sweep: pass --resume to continue it, or set sweep_dir")
        return
    if not tune.Tuner.can_restore(experiment):
        raise ConfigError(f"--resume: no sweep to resume in {experiment}")
    saved = load_config(SweepConfig, sweep_dir / "sweep.yaml")
    ignore = {"num_cpus", "stop_timeout_s"}
    differ = [k for k, v in to_dict(sweep).items() if k not in ignore and to_dict(saved)[k] != v]
    if differ:
        raise ConfigError(f"--resume: the sweep differs from {sweep_dir / 'sweep.yaml'} in {', '.join(differ)}")


def _save_sweep(sweep: SweepConfig, path: Path) -> None:
    """The resolved sweep config (what ``--resume`` compares against), each domain as written."""
    data = to_dict(sweep)
    data["space"] = {key: {domain.kind: getattr(domain, domain.kind)} for key, domain in sweep.space.items()}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _start_ray(sweep: SweepConfig, address: str | None) -> bool:
    """Connect to ``address`` or start a local Ray; True if this call started or joined it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        temp = ray_temp_dir(Path(sweep.sweep_dir))
        # the dashboard starts where ray[default] is installed: Ray Train's placement-group cleaner
        # asks its state API whether a run's controller is alive (and warns each second without it)
        ray.init(num_cpus=sweep.num_cpus, _temp_dir=str(temp))
    return True


def _max_concurrent(sweep: SweepConfig) -> int:
    """Trials that fit the cluster at once; 0 lets Tune count (one-worker trials reserve their
    worker's resources themselves)."""
    total = ray.cluster_resources()
    cpus, gpus = sweep.cpus_per_worker * sweep.workers_per_trial, sweep.gpus_per_worker * sweep.workers_per_trial
    fits = math.floor(total.get("CPU", 0) / cpus + 1e-9)
    if gpus:
        fits = min(fits, math.floor(total.get("GPU", 0) / gpus + 1e-9))
    if fits < 1:
        raise ConfigError(
            f"a trial needs {cpus:g} CPU(s) and {gpus:g} GPU(s) ({sweep.workers_per_trial} workers); "
            f"the cluster has {total.get('CPU', 0):g} CPU(s) and {total.get('GPU', 0):g} GPU(s)"
        )
    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    return fits if sweep.workers_per_trial > 1 else 0


_TRIAL_DRIVER_MEMORY = 256 * 2**20


def _trainable(sweep: SweepConfig) -> Any:
    if sweep.workers_per_trial == 1:
        resources = {"cpu": sweep.cpus_per_worker, "gpu": sweep.gpus_per_worker}
    else:
        # the trial only waits on its TorchTrainer, whose workers hold the CPUs and GPUs; Tune needs a
        # non-empty request, so the trial asks for some memory and no CPU
        resources = {"cpu": 0, "memory": _TRIAL_DRIVER_MEMORY}
    return tune.with_resources(tune.with_parameters(SweepTrial, sweep=sweep, cwd=os.getcwd()), resources)


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive ``--resume``. Tune does not keep a scheduler's state with the
    experiment: a restored sweep got the scheduler pickled at its start, rungs empty, so trials
    were compared only with reports made after the restart, and a bad trial begun again ran to
    max_t. Each trial Tune adds back brings its earlier reports (its ``result.json``) into its
    bracket, in order, as they were first judged."""

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for result in _reports(trial):
            if self._time_attr in result and result.get(self._metric) is not None:
                bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])


def _reports(trial: Any) -> list[dict[str, Any]]:
    """What a trial reported before (none for a new trial), from its folder in the sweep."""
    if trial.storage is None or not trial.has_reported_at_least_once:
        return []
    path = Path(trial.path) / "result.json"
    if not path.is_file():
        return []
    reports = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by the kill
            reports.append(json.loads(line))
    return reports


def _tuner(sweep: SweepConfig, configs: list[Any]) -> tune.Tuner:
    from ray.tune.search import BasicVariantGenerator

    scheduler = None
    if sweep.asha is not None:
        scheduler = ResumableASHA(
            time_attr=STEP,
            max_t=sweep.asha.max_t or max(c.steps for c in configs),
            grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor,
        )
    return tune.Tuner(
        _trainable(sweep),
        param_space={key: domain.to_tune() for key, domain in sweep.space.items()},
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            # the generator's own cap: TuneConfig.max_concurrent_trials applies to Searchers only
            search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=_max_concurrent(sweep)),
            scheduler=scheduler,
            num_samples=sweep.num_samples,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=sweep.sweep_dir,
            # the runs checkpoint themselves (in run_dir/checkpoints) and resume from there
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
        ),
    )


def run_sweep(sweep: SweepConfig, address: str | None = None, resume: bool = False) -> SweepOutcome:
    """Run (or, with ``resume``, continue) the sweep; write ``results.csv`` and ``best.yaml``."""
    with start_up():
        configs = check(sweep)
        if sweep.workers_per_trial > 1 and os.environ.get("RAY_TRAIN_V2_ENABLED") == "0":
            raise ConfigError("workers_per_trial > 1 needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED=0")
        _check_resume(sweep, resume)
    sweep_dir = Path(sweep.sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        _save_sweep(sweep, sweep_dir / "sweep.yaml")
    with _signal_handlers_kept():
        started = _start_ray(sweep, address)
        try:
            if resume:
                tuner = tune.Tuner.restore(
                    str(sweep_dir / EXPERIMENT),
                    trainable=_trainable(sweep),
                    resume_unfinished=True,
                    resume_errored=True,
                )
            else:
                tuner = _tuner(sweep, configs)
            grid = tuner.fit()
        finally:
            if started:
                ray.shutdown()
    return _write_results(sweep, grid)


@contextlib.contextmanager
def _signal_handlers_kept() -> Any:
    """Put back the signal handlers that a sweep replaces: ``Tuner.fit`` installs its own for SIGINT
    and SIGUSR1 (a Ctrl+C ends the sweep gracefully) and restores them only when one arrives, so a
    process that ran a sweep to its end kept Tune's, and a later Ctrl+C only logged "Stop signal
    received"; ``ray.init`` turns SIGTERM into ``sys.exit`` and leaves that after ``ray.shutdown``."""
    kept = {}
    if threading.current_thread() is threading.main_thread():  # (neither installs any elsewhere)
        kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            # None: one set outside Python, which Python cannot put back: the default, not Tune's
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, default if handler is None else handler)


def _write_results(sweep: SweepConfig, grid: Any) -> SweepOutcome:
    sweep_dir = Path(sweep.sweep_dir)
    tune_status = {t.trial_id: t.status for t in tune.ExperimentAnalysis(grid.experiment_path).trials}
    rows = []
    for result in grid:
        values = {key: _plain(result.config.get(key)) for key in sweep.space}
        trial_id = Path(result.path).name.removeprefix("trial_")
        steps = trial_config(sweep, values).steps
        last = result.metrics or {}
        history = result.metrics_dataframe
        metric = last.get(sweep.metric)
        if history is not None and sweep.metric in history:
            column = history[sweep.metric].dropna()
            best = column.min() if sweep.mode == "min" else column.max()
        else:
            best = None
        step = last.get(STEP, 0)
        if result.error:
            status = "error"
        elif tune_status.get(trial_id) != "TERMINATED":
            status = "unfinished"
        else:  # ended before its last step: stopped by ASHA
            status = "completed" if step >= steps else "stopped"
        rows.append(
            {
                "trial": trial_id,
                "status": status,
                "step": step,
                "steps": steps,
                sweep.metric: metric,
                f"best {sweep.metric}": _plain(best),
                **values,
                "world_size": last.get("world_size", 1),
                "run_dir": str(Path(result.path) / RUN),
                "overrides": " ".join(trial_overrides(sweep, values)),
                "error": _error_line(result.error) if result.error else "",
            }
        )
    sign = 1 if sweep.mode == "min" else -1

    def rank(row: dict[str, Any]) -> tuple[bool, float]:  # by the last reported metric; failed trials last
        value = row[sweep.metric]
        return value is None or row["status"] == "error", sign * value if value is not None else 0.0

    rows.sort(key=rank)
    results_csv = sweep_dir / "results.csv"
    with results_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    best_config = None
    if rows and not rank(rows[0])[0]:
        best = rows[0]
        # its own run folder: the base config's may hold another run, which the command would resume
        cfg = trial_config(sweep, {key: best[key] for key in sweep.space}, str(sweep_dir / "best_run"))
        best_config = sweep_dir / "best.yaml"
        save_config(cfg, best_config)
        header = (
            f"# The best trial of the sweep {sweep_dir} ({sweep.metric} {best[sweep.metric]:.6g} at step "
            f"{best['step']}/{best['steps']}): trial {best['trial']}, run in {best['run_dir']}\n"
            f"# Run it: python launch/{sweep.command}.py --config {best_config}\n"
        )
        best_config.write_text(header + best_config.read_text())
    unfinished = sum(row["status"] == "unfinished" for row in rows)
    return SweepOutcome(rows=rows, results_csv=results_csv, best_config=best_config, unfinished=unfinished)


def main(doc: str, argv: list[str] | None = None) -> SweepOutcome:
    """``launch/sweep.py --config SWEEP.yaml [--address ADDR] [--resume] [a.b=c ...]``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="sweep config (configs/sweep/*.yaml)")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in sweep_dir")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides of the sweep config, e.g. num_samples=8")
    args = p.parse_intermixed_args(argv)
    with exit_on_startup_error():
        with start_up():
            sweep = load(args.config, args.overrides)
        t0 = time.time()
        outcome = run_sweep(sweep, address=args.address, resume=args.resume)
    print(f"sweep of {len(outcome.rows)} trial(s) ended after {time.time() - t0:.0f} s: {outcome.results_csv}")
    for row in outcome.rows[:5]:
        values = ", ".join(f"{k}={row[k]}" for k in sweep.space)
        status = f"{row['status']:>9} at step {row['step']:>5}"
        print(f"  {row['trial']} {status}  {sweep.metric} {row[sweep.metric]}  {values}")
    if outcome.best_config is not None:
        print(f"best run config: {outcome.best_config}")
    if outcome.unfinished:
        raise SystemExit(f"interrupted: {outcome.unfinished} trial(s) unfinished; continue with --resume")
    if outcome.best_config is None:  # e.g. every trial failed: a script's next step needs best.yaml
        raise SystemExit(f"no trial reported {sweep.metric}: no best config (see {outcome.results_csv})")
    return outcome
