"""Submitting ``pretrain``, ``finetune`` and ``evaluate`` to Slurm with submitit.

``launch/slurm.py pretrain --config FILE [a.b=c ...] --nodes 2 --gpus-per-node 8 --time 1440`` runs
one DeepSpeed job as one Slurm task per GPU (on CPU partitions, ``--tasks-per-node`` tasks): every
task is a rank, found by :func:`multi_dist.dist.discover` from ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS``,
with the first node as master and a port derived from the job id.

Nothing is submitted before every config of the submission loads strictly through
:func:`multi_dist.cli.load` (a typo fails here, naming the key), every ``--checkpoints`` path exists
and the data streams pass their start-up checks for the job's world size (:func:`check_data`).

The run folder (``run_dir``; ``out_dir`` for evaluate) gets::

    slurm/logs/                 submitit's folder: %j_submission.sh, %j_<task>_log.out/.err, pickles
    slurm/<stamp>/code/         multi_dist/, launch/ and configs/ as they were at submission
    slurm/<stamp>/config.yaml   the resolved config (an array: configs/NNN.yaml, one per element)
    slurm/<stamp>/submission.json   the command line, sbatch parameters, job ids and log paths

The job imports from the code snapshot, so editing the checkout does not change a queued job: the
batch script changes into the snapshot (``python -m submitit.core._submit`` puts the working
directory first on ``sys.path``) and :class:`RankTask` changes back to the directory the launcher
ran in, so relative paths in the config mean what they meant at the prompt.

Time limits and preemption. Slurm sends USR2 ``--signal-delay-s`` seconds before the time limit
(submitit's ``--signal=USR2@delay``; up to 60 s earlier, Slurm checks limits every 30 s) and, where
the cluster sets ``preempt_send_user_signal``, at preemption; SIGTERM comes with a preemption, a
``scancel`` or the limit itself. submitit's own answer is to call the callable's ``checkpoint()``
from rank 0's signal handler, requeue and exit at once (the DINOv2 pattern). That does not fit a
DeepSpeed job: its checkpoint is collective (every rank writes its ZeRO partition), so it cannot be
written by one rank in the middle of a step, and exiting there loses the steps since the last
periodic checkpoint. So :class:`RankTask` has no ``checkpoint()`` and replaces submitit's handlers
first thing in every task: USR2 and SIGTERM call :func:`multi_dist.train.request_stop`, the ranks
agree at the next step boundary, write a checkpoint and return ``{"stopped": True}``; after a
barrier rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` (what submitit's requeue does), but only
after USR2 (a SIGTERM alone is a cancellation, or a preemption that Slurm requeues itself) and only
while ``SLURM_RESTART_COUNT`` < ``--max-requeues``. Slurm holds the requeued job (same id, same
logs, appended) for ``cred_expire`` (120 s by default) and runs it again; ``train`` finds
``run_dir/checkpoints/latest`` and resumes. ``--signal-delay-s`` must cover one step plus a
checkpoint write. Evaluations are not resumable: they keep submitit's handlers.

Arrays: ``--configs A B`` and/or ``--checkpoints C D`` submit one job array with an element per
(config, checkpoint) pair, each with the override ``init=<checkpoint>``; evaluations write
``{out_dir}/{task}-{tag}.json``. Every element gets the same resources and requeues on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli import COMMANDS, load
from .config import exit_on_startup_error, save_config, start_up

RESUMABLE = ("pretrain", "finetune")
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
SNAPSHOT = ("multi_dist", "launch", "configs")
# rank variables of the shell that submitted the job must not override Slurm's
UNSET = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class SlurmConfig:
    """Resources and requeue policy of a submission (``launch/slurm.py`` options)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    """Ranks per node: one per GPU (the default with GPUs), or CPU ranks on a CPU partition."""
    time_min: int = 60
    partition: str | None = None
    cpus_per_task: int | None = None
    """Default: ``data.num_workers + 1`` (the rank's process and its loader workers)."""
    mem_gb: int | None = None
    account: str | None = None
    qos: str | None = None
    max_requeues: int = 10
    signal_delay_s: int = 120
    job_name: str | None = None

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def validate(self) -> None:
        positive = {"--nodes": self.nodes, "--time": self.time_min, "--signal-delay-s": self.signal_delay_s}
        for flag, value in positive.items():
            if value <= 0:
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(
                f"--signal-delay-s {self.signal_delay_s} is not shorter than --time {self.time_min} min: the job "
                "would be told to stop as soon as it starts"
            )
        for flag, value in {"--cpus-per-task": self.cpus_per_task, "--mem": self.mem_gb}.items():
            if value is not None and value <= 0:  # sbatch refuses it, after the code snapshot was written
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.gpus_per_node < 0 or self.max_requeues < 0:
            raise ValueError("--gpus-per-node and --max-requeues must be >= 0")
        if self.tasks_per_node is not None and self.tasks_per_node <= 0:
            raise ValueError(f"--tasks-per-node must be positive, got {self.tasks_per_node}")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                "a job runs one task (rank) per GPU"
            )


@dataclass(frozen=True)
class Element:
    """One job (or one array element): a resolved config and the checkpoint it starts from."""

    cfg: Any
    config_file: str | None
    checkpoint: str | None

    def describe(self) -> str:
        what = self.config_file or "defaults"
        return f"{what} init={self.checkpoint}" if self.checkpoint else what


def run_folder(command: str, cfg: Any) -> Path:
    return Path(cfg.out_dir if command == "evaluate" else cfg.run_dir).resolve()


def plan(
    command: str,
    config: str | None,
    overrides: list[str],
    configs: list[str] | None = None,
    checkpoints: list[str] | None = None,
) -> list[Element]:
    """Every job of the submission, its config loaded strictly; raises before anything is submitted."""
    if config and configs:
        raise ValueError("give --config for one job or --configs for an array, not both")
    files: list[str | None] = list(configs) if configs else [config]
    ckpts: list[str | None] = list(checkpoints) if checkpoints else [None]
    for ckpt in ckpts:
        if ckpt is not None and not Path(ckpt).exists():
            raise FileNotFoundError(f"--checkpoints: {ckpt} does not exist")
    elements = []
    for file in files:
        for ckpt in ckpts:
            extra = [f"init={ckpt}"] if ckpt is not None else []
            elements.append(Element(load(command, file, [*overrides, *extra]), file, ckpt))
    if command in RESUMABLE:  # array elements that share a run folder would overwrite each other's checkpoints
        seen: dict[Path, Element] = {}
        for e in elements:
            folder = run_folder(command, e.cfg)
            if folder in seen:
                raise ValueError(f"{seen[folder].describe()} and {e.describe()} share run_dir {folder}")
            seen[folder] = e
    if command == "evaluate":  # each writes {out_dir}/{task}-{tag}.json: the last to finish would win
        from .evaluate import resolve

        reports: dict[Path, Element] = {}
        for e in elements:
            try:
                tag = resolve(e.cfg.init).tag
            except FileNotFoundError:  # the job says so itself
                continue
            report = Path(e.cfg.out_dir).resolve() / f"{e.cfg.task.name}-{tag}.json"
            if report in reports:
                raise ValueError(
                    f"{reports[report].describe()} and {e.describe()} would both write {report}: "
                    "give them different out_dir"
                )
            reports[report] = e
    return elements


def check_data(command: str, cfg: Any, world_size: int) -> None:
    """The start-up checks of the data streams (:class:`multi_dist.data.pipeline.VideoTextStream`)
    for the job's world size, run before the job waits in the queue: the shards exist, their sizes
    are known or ``data.epoch_samples`` is set, and in epoch mode (``data.resampled=false``) every
    (rank, loader worker) has a shard of its own; a validation or evaluation set (always epoch
    mode) needs a shard per rank, and its loader workers are cut to fit."""
    from .data.pipeline import VideoTextStream
    from .evaluate import eval_data_config

    if command == "evaluate":
        streams = [("data", eval_data_config(cfg.data), True)]
    else:
        streams = [("data", cfg.data, False)]
        if cfg.val is not None and (cfg.val.path or cfg.val.corpora):
            streams.append(("val", eval_data_config(cfg.val), True))
    for key, data, evaluation in streams:
        # the shards are what is checked here: no MCM answer vocabulary is counted at submit time
        data = dataclasses.replace(data, mcm=dataclasses.replace(data.mcm, enabled=False))
        VideoTextStream(data, rank=0, world_size=world_size, key=key, evaluation=evaluation)


@dataclass(frozen=True)
class RankTask:
    """What every Slurm task runs: one rank of ``command`` on a resolved config. submitit pickles
    it by reference to this class, so the job runs the code snapshot's version."""

    command: str
    config: str
    workdir: str
    max_requeues: int

    def __call__(self) -> dict[str, Any]:
        resumable = self.command in RESUMABLE
        if resumable:
            for sig in STOP_SIGNALS:  # before the heavy imports: a signal during them is kept
                signal.signal(sig, _remember)
        from .cli import run
        from .dist import discover

        if resumable:
            from .train import request_stop

            def stop(signum: int, frame: Any) -> None:
                _remember(signum, frame)
                request_stop(signum, frame)

            for sig in STOP_SIGNALS:
                signal.signal(sig, stop)
            if _RECEIVED:
                request_stop(_RECEIVED[-1])
        os.chdir(self.workdir)
        info = discover()
        print(
            f"rank {info.rank}/{info.world_size} (local {info.local_rank}) on {socket.gethostname()}, "
            f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')}, code {repo_root()}: {self.command} {self.config}",
            flush=True,
        )
        result = run(self.command, load(self.command, self.config))
        if resumable and result.get("stopped"):
            _barrier()  # every rank is past its checkpoint before the requeue ends the job
            if info.rank == 0:
                result["requeued"] = requeue(self.max_requeues)
        return result


_RECEIVED: list[int] = []


def _remember(signum: int, frame: Any) -> None:
    _RECEIVED.append(signum)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def slurm_job_id(env: Mapping[str, str] = os.environ) -> str:
    """The id ``scontrol`` knows this job (or array element) by."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def requeue(max_requeues: int, env: Mapping[str, str] = os.environ) -> bool:
    """Put this job back in the queue after a time-limit warning (USR2), while it has restarted
    fewer than ``max_requeues`` times: ``SLURM_RESTART_COUNT``, which counts Slurm's own requeues
    (preemption, node failure) as well as ours. True when requeued."""
    job = slurm_job_id(env)
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    if signal.SIGUSR2 not in _RECEIVED:
        names = ", ".join(signal.Signals(s).name for s in _RECEIVED) or "a stop request"
        print(f"not requeueing job {job}: stopped by {names}, not by the time-limit warning (USR2)", flush=True)
        return False
    if restarts >= max_requeues:
        print(
            f"not requeueing job {job}: it has restarted {restarts} time(s) already (--max-requeues "
            f"{max_requeues}); submit the same command again to resume from the checkpoint",
            flush=True,
        )
        return False
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:  # no scontrol here, a controller that hangs
        print(f"could not requeue job {job}: {err}; submit the same command again to resume", flush=True)
        return False
    if proc.returncode != 0:
        print(f"could not requeue job {job}: {proc.stderr.strip() or proc.stdout.strip()}", flush=True)
        return False
    print(f"requeued job {job} ({restarts + 1} of at most {max_requeues}); it resumes from its checkpoint", flush=True)
    return True


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def snapshot_code(dest: Path, root: Path | None = None) -> Path:
    """Copy the package, the launch scripts and the configs to ``dest`` (what the job imports)."""
    root = root or repo_root()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SNAPSHOT:
        if (root / name).is_dir():
            shutil.copytree(root / name, dest / name, ignore=ignore)
    return dest


def task_cpus(s: SlurmConfig, cfg: Any) -> int:
    """CPUs per task: ``--cpus-per-task``, else the rank's process and its loader workers."""
    return s.cpus_per_task or cfg.data.num_workers + 1


def partition_cpus(partition: str | None) -> tuple[str, int] | None:
    """The partition the job goes to and the most CPUs one of its nodes has, from ``sinfo``;
    ``None`` where sinfo cannot tell (no Slurm here: a dry run off the cluster). The partition is
    ``partition``, else ``SBATCH_PARTITION``, else the cluster's default, as for sbatch; of a list
    (``a,b``: the job runs in whichever starts it first), the one with the largest nodes."""
    # --all: hidden partitions too (a user other than root sees them only so), and all of them
    # where SINFO_PARTITION would show one
    cmd = ["sinfo", "--all", "--noheader", "--Node", "--format=%P %c"]
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.exists(conf):  # sinfo would retry reading it for a minute, then fail
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    most: dict[str, int] = {}  # one line per node and partition it is in
    default = None
    for line in out.stdout.splitlines():
        name, _, cpus = line.strip().partition(" ")
        if not cpus.strip().isdigit():
            continue
        if name.endswith("*"):
            name = default = name[:-1]
        most[name] = max(most.get(name, 0), int(cpus))
    names = partition or os.environ.get("SBATCH_PARTITION") or default
    if not names:
        return None
    unknown = [n for n in names.split(",") if n not in most]
    if unknown:
        listed = ", ".join(sorted(most))
        raise ValueError(f"--partition {names}: sinfo lists no partition {', '.join(unknown)} (it lists {listed})")
    return max(((n, most[n]) for n in names.split(",")), key=lambda found: found[1])


def check_cpus(s: SlurmConfig, cfg: Any, found: tuple[str, int] | None) -> None:
    """Refuse a job that asks more CPUs of a node than the partition's nodes have (``found``:
    :func:`partition_cpus`): Slurm would take it and keep it pending for ever (reason
    ``PartitionConfig``)."""
    if found is None:
        return
    name, most = found
    cpus = task_cpus(s, cfg)
    if s.ranks_per_node * cpus > most:
        default = "" if s.cpus_per_task else " (its default: data.num_workers + 1)"
        raise ValueError(
            f"{s.ranks_per_node} task(s) per node x --cpus-per-task {cpus}{default} = "
            f"{s.ranks_per_node * cpus} CPUs per node, but the nodes of partition '{name}' have at most "
            f"{most} (sinfo): Slurm would keep the job pending. Lower --cpus-per-task or the tasks per node."
        )


def sbatch_parameters(s: SlurmConfig, command: str, cfg: Any, code: Path) -> dict[str, Any]:
    """submitit's sbatch parameters: one task per rank, USR2 before the limit, requeueable, run
    from the code snapshot."""
    params: dict[str, Any] = {
        "job_name": s.job_name or f"multi-{command}",
        "time": s.time_min,
        "nodes": s.nodes,
        "ntasks_per_node": s.ranks_per_node,
        "cpus_per_task": task_cpus(s, cfg),
        "signal_delay_s": s.signal_delay_s,
        "setup": [
            f"unset {' '.join(UNSET)}",
            "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK",  # a thread per CPU of the task, not per CPU of the node
            f"export PYTHONPATH={shlex.quote(str(code))}${{PYTHONPATH:+:$PYTHONPATH}}",
        ],
        "additional_parameters": {"requeue": True, "chdir": str(code)},
        # a rank that fails ends the step: the others would wait in their next collective (NCCL:
        # until its timeout, 30 min of the allocation)
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    for name in ("partition", "account", "qos"):
        if getattr(s, name):
            params[name] = getattr(s, name)
    if s.mem_gb:
        params["additional_parameters"]["mem"] = f"{s.mem_gb}G"
    return params


def sbatch_script(params: dict[str, Any], logs: Path, array_size: int | None = None) -> str:
    """The batch script submitit writes for these parameters (for ``--dry-run``)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(logs))])
    return _make_sbatch_string(command=command, folder=logs, map_count=array_size, **params)


def submit(
    command: str,
    elements: list[Element],
    s: SlurmConfig,
    dry_run: bool = False,
    argv: list[str] | None = None,
) -> list[dict[str, str]]:
    """Submit one job (one element) or one job array; returns, per element, its job id and logs."""
    import submitit

    first = elements[0].cfg
    folder = run_folder(command, first)
    stamp = folder / "slurm" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    logs = folder / "slurm" / "logs"
    code = stamp / "code"
    params = sbatch_parameters(s, command, first, code)
    array = len(elements) > 1
    config_files = (
        [stamp / "configs" / f"{i:03d}.yaml" for i in range(len(elements))] if array else [stamp / "config.yaml"]
    )
    if dry_run:
        print(f"# dry run: nothing submitted. run folder {folder}, code snapshot {code}")
        for i, (e, path) in enumerate(zip(elements, config_files)):
            print(f"# {f'element {i}: ' if array else ''}{e.describe()} -> {path}")
        print(json.dumps({k: v for k, v in params.items() if k != "setup"}, indent=1))
        print(sbatch_script(params, logs, len(elements) if array else None))
        return []
    snapshot_code(code)
    for e, path in zip(elements, config_files):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_config(e.cfg, path)
    executor = submitit.SlurmExecutor(folder=logs, max_num_timeout=s.max_requeues)
    executor.update_parameters(**params)
    workdir = os.getcwd()
    with executor.batch():
        jobs = [
            executor.submit(RankTask(command, str(path), workdir, s.max_requeues))
            for e, path in zip(elements, config_files)
        ]
    out = [
        {
            "job_id": job.job_id,
            "config": str(path),
            "source": e.describe(),
            "run_folder": str(run_folder(command, e.cfg)),
            "log_out": str(job.paths.stdout),
            "log_err": str(job.paths.stderr),
        }
        for job, e, path in zip(jobs, elements, config_files)
    ]
    record = {"command": command, "argv": argv or [], "parameters": params, "jobs": out}
    (stamp / "submission.json").write_text(json.dumps(record, indent=1))
    ranks = f"{s.world_size} rank(s) on {s.nodes} node(s)"
    head = f"array job {out[0]['job_id'].split('_')[0]} ({len(out)} elements)" if array else f"job {out[0]['job_id']}"
    print(f"submitted {head}: {command}, {ranks} each, {s.time_min} min, up to {s.max_requeues} requeue(s)")
    print(f"run folder: {folder}\ncode snapshot: {code}")
    for job in out:
        print(f"{job['job_id']}: {job['source']}\n  rank 0 log: {job['log_out']}\n  rank 0 err: {job['log_err']}")
        latest = Path(job["run_folder"]) / "checkpoints" / "latest"
        if command in RESUMABLE and latest.is_file():
            print(f"  resumes from {latest.parent / latest.read_text().strip()}")
    return out


def build_parser(doc: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--config", help="YAML config of the command (configs/pretrain, finetune or eval/*.yaml)")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides, applied to every job")
    p.add_argument("--configs", nargs="+", metavar="FILE", help="a job array: one element per config")
    p.add_argument(
        "--checkpoints", nargs="+", metavar="CKPT", help="a job array: one element per checkpoint (override init=CKPT)"
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="one task (rank) per GPU")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node on a CPU partition (default: one per GPU)")
    p.add_argument("--partition", help="default: the cluster's default partition")
    p.add_argument("--time", type=int, required=True, help="time limit in minutes (per run: a requeue starts afresh)")
    p.add_argument("--cpus-per-task", type=int, help="default: data.num_workers + 1")
    p.add_argument("--mem", type=int, help="memory per node in GB")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--job-name")
    p.add_argument(
        "--max-requeues",
        type=int,
        default=10,
        help="requeue after a time-limit warning while the job has restarted fewer times than this, whatever "
        "the cause: Slurm's SLURM_RESTART_COUNT counts its own requeues (preemption, node failure) too (default 10)",
    )
    p.add_argument(
        "--signal-delay-s",
        type=int,
        default=120,
        help="USR2 this long before the time limit: must cover a step and a checkpoint (default 120)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and parameters, submit nothing")
    return p


def main(argv: list[str] | None = None, doc: str | None = None) -> list[dict[str, str]]:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(doc).parse_intermixed_args(argv)
    s = SlurmConfig(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        time_min=args.time,
        partition=args.partition,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem,
        account=args.account,
        qos=args.qos,
        max_requeues=args.max_requeues,
        signal_delay_s=args.signal_delay_s,
        job_name=args.job_name,
    )
    with exit_on_startup_error(), start_up():  # nothing is written or submitted before these pass
        elements = plan(args.command, args.config, args.overrides, args.configs, args.checkpoints)
        s.validate()
        found = partition_cpus(s.partition)  # (sinfo once for the whole array)
        for e in elements:
            check_data(args.command, e.cfg, s.world_size)
            check_cpus(s, e.cfg, found)
    return submit(args.command, elements, s, dry_run=args.dry_run, argv=argv)
