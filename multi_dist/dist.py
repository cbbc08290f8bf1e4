"""The one place that knows ranks and worlds, under every launcher.

``deepspeed`` and ``torchrun`` export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
``srun`` (and submitit) exports SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS and a node list;
Ray Train sets the torch variables itself; plain ``python`` has none of them and is a world of
one. :func:`discover` reads whichever is there, :func:`init` starts the process group (gloo on
CPU, NCCL on GPU) through DeepSpeed so that its engine finds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .threads import share_cores

log = logging.getLogger("multi_dist.dist")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``node[003-005,7]`` -> ``node003``."""
    m = re.match(r"([^\[,]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


PORTS_ENV = "MULTI_DIST_PORTS"
_next_port: dict[tuple[int, int], int] = {}


def free_port() -> int:
    """A TCP port free now, for a run's rendezvous (rank 0's store binds it seconds later, once
    the launcher and the ranks have started). By default the kernel picks it from its ephemeral
    range, as it picks every ``bind(0)``: another program's may take it in those seconds.
    ``MULTI_DIST_PORTS=FIRST-LAST`` gives a block of ports outside that range
    (``/proc/sys/net/ipv4/ip_local_port_range``), which no ``bind(0)`` takes: its ports are tried in
    turn, each process from its own starting point, and the first that binds is returned. The test
    suite gives each of its workers a block, so that the two never pick the same port."""
    block = os.environ.get(PORTS_ENV)
    if not block:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    match = re.fullmatch(r"(\d+)-(\d+)", block.strip())
    first, last = (int(match[1]), int(match[2])) if match else (0, -1)
    if not 1024 <= first <= last <= 65535:
        raise ValueError(f"{PORTS_ENV}={block!r}: give a range FIRST-LAST of ports within 1024-65535")
    size = last - first + 1
    start = _next_port.get((first, last), os.getpid() % size)
    for i in range(size):
        port = first + (start + i) % size
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _next_port[(first, last)] = (start + i + 1) % size  # the next call tries the ports after it
        return port
    raise OSError(f"{PORTS_ENV}={block}: no port of that range is free")


def deepspeed_command(nproc: int, port: int | None = None) -> list[str]:
    """The ``deepspeed`` launcher for ``nproc`` local processes, as a command prefix. Run as a
    module of this interpreter: a ``deepspeed`` console script may belong to another install."""
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(port or free_port()),
    ]


def slurm_port(env: dict[str, str]) -> int:
    """The rendezvous port of a Slurm job step, derived from its ids: the same on every task,
    different for concurrent jobs and steps (unless their ids differ by a multiple of 12,768),
    below Linux's ephemeral ports (32,768 and up), which any socket on the node may hold already,
    and above Ray's worker ports (10,002-19,999)."""
    step = env.get("SLURM_STEP_ID", "")
    job, step = int(env.get("SLURM_JOB_ID", "0")), int(step) if step.isdigit() else 0
    return 20000 + (31 * job + step) % 12768


def discover(env: dict[str, str] | None = None) -> DistInfo:
    """Rank, local rank, world size and rendezvous address from the launcher's environment."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torch"  # deepspeed, torchrun, Ray Train, or a user who set them
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT", 29500))
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        # a task of an srun step; a batch script's (or salloc's) own shell has SLURM_PROCID=0 and
        # the allocation's SLURM_NTASKS too, but no step: plain python there is a world of one
        launcher = "slurm"
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        addr = env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        port = int(env.get("MASTER_PORT") or slurm_port(env))
    else:
        launcher = "single"
        rank, local, world = 0, 0, 1
        addr, port = "127.0.0.1", int(env.get("MASTER_PORT") or free_port())
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the world size {world} (from the {launcher} launcher's env)")
    return DistInfo(rank, local, world, addr or "127.0.0.1", port, launcher)


def init(info: DistInfo | None = None) -> DistInfo:
    """Start the default process group (gloo on CPU, NCCL on GPU) via DeepSpeed; idempotent.
    Where the launcher left each of this node's ranks a thread per core, sets its share instead
    (:func:`multi_dist.threads.share_cores`)."""
    import deepspeed
    import torch.distributed as dist

    info = info or discover()
    threads = share_cores()  # (the launch scripts did it before torch loaded; a run started otherwise)
    if threads is not None:
        torch.set_num_threads(threads)
    if info.rank == 0:
        log.info("%d torch thread(s) per rank (OMP_NUM_THREADS sets it)", torch.get_num_threads())
    os.environ.update(
        RANK=str(info.rank),
        LOCAL_RANK=str(info.local_rank),
        WORLD_SIZE=str(info.world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    # what DeepSpeed's communication set-up loads next (init_distributed here, or deepspeed.initialize
    # where a process group exists already, as under Ray Train): here, under our lock. A load outside
    # it could have its torch lock file taken for a stale one and removed by another run's start
    load_op("ShareMemCommBuilder")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        _unlink_shm_segment(info)
    return info


def load_op(builder_name: str) -> Any:
    """DeepSpeed's op ``builder_name`` (e.g. ``ShareMemCommBuilder``, ``CPUAdamBuilder``), built
    or loaded under a lock that the kernel releases when its holder dies; None where this
    accelerator has no such op. DeepSpeed keeps the loaded op, so its own later ``load()`` of it
    returns at once.

    torch's JIT build guards an op's build folder with a plain lock file. A process killed while
    it holds that file (a run killed during start-up: kill -9, a Slurm preemption, a benchmark's
    timeout; each rank's start-up takes it, even when there is nothing to build) leaves it behind,
    and every later run of this environment then waits for it forever, printing nothing (seen in
    this project's test suite, where a 4-second timeout killed a run's start-up). Here the whole
    load runs under an ``flock`` beside the folder: whoever holds it is the only one of our
    processes in torch's build, so a lock file found then was left by a dead process, and goes."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    folder = Path(_get_build_directory(builder.name, verbose=False))
    with open(folder.parent / f".{builder.name}.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released when this process exits, however it exits
        try:
            stale = folder / "lock"
            if stale.exists():
                log.warning("removing %s: left by a process killed while it built or loaded %s", stale, builder.name)
                stale.unlink(missing_ok=True)
            return builder.load(verbose=False)
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


SHM_SEGMENT = "deepspeed_allreduce_buffer"


def _unlink_shm_segment(info: DistInfo) -> None:
    """DeepSpeed's CPU all-reduce over shared memory (``ops/csrc/cpu/comm/shm.cpp``) creates
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank at start-up and
    never removes it: 69 MB of RAM per rank and run that outlive the processes (one day of test
    runs on this machine left 310 of them, 20 GB). Once every rank has mapped every segment
    (start-up returned everywhere: the barrier), the names can go; the mappings stay valid until
    each process exits, however it exits, and then the memory is freed."""
    import torch.distributed as dist

    path = Path("/dev/shm") / f"{SHM_SEGMENT}_{os.getuid()}_{info.master_addr}_{info.master_port}_{info.rank}"
    if not Path("/dev/shm").is_dir():
        return
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def remove_shm_segments(port: int) -> list[Path]:
    """The shared-memory segments of a local run on ``port`` that were killed before its ranks
    unlinked them (killed during start-up, see :func:`_unlink_shm_segment`): removed, and returned.
    Only for a run that is over: a live run's ranks may not have mapped them yet."""
    found = sorted(Path("/dev/shm").glob(f"{SHM_SEGMENT}_{os.getuid()}_*_{port}_*"))
    for path in found:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return found


def host_group() -> Any:
    """A process group for small host-side messages (flags, counters) that must not wait for the
    GPU: the default group where it is gloo, else a gloo group made once (every rank must call
    this at the same point, like any group creation)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    global _HOST_GROUP
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


_HOST_GROUP: Any = None


def device(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")
