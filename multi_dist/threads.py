"""Each rank's share of its node's cores, set before torch (or numpy's BLAS) starts its threads.

torch takes a thread per physical core in every process. The ``deepspeed`` launcher starts N ranks
on a node and sets no ``OMP_NUM_THREADS``, so the ranks ran N threads per core, spin-waiting on
each other, and two 2-rank runs on 2 cores were not bit-reproducible (measured on an AVX-512
machine: losses apart in the 7th digit from step 3; the same to the last digit with a thread a
rank). torchrun sets ``OMP_NUM_THREADS=1`` for several ranks, our Slurm scripts a task's CPUs, Ray
a worker's. This module is free of torch: :func:`multi_dist.cli.main` calls :func:`share_cores`
before anything loads torch, and :func:`multi_dist.dist.init` again for runs started otherwise.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

# what a user sets to choose the threads; any of them leaves the choice alone
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# the launchers' count of this node's ranks: torchrun's and Ray's, then deepspeed's
LOCAL_RANKS_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")


@functools.cache
def cpuinfo() -> str:
    """The text of /proc/cpuinfo (its model name, its flags), read once; empty where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def usable_cpus() -> int:
    """The logical CPUs this process may run on (a job's allocation or a cgroup's cpuset, not the
    machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def usable_cores() -> int:
    """The cores this process may run on, counting a core's hyperthreads once, as torch's default
    does."""
    logical = usable_cpus()
    try:
        import psutil  # (DeepSpeed's dependency)

        physical, total = psutil.cpu_count(logical=False), psutil.cpu_count()
    except ImportError:
        physical = total = None
    if physical and total and physical < total:  # SMT: the mask's share of the physical cores
        return max(1, logical * physical // total)
    return max(1, logical)


def threads_per_rank(env: Mapping[str, str], cores: int) -> int | None:
    """torch's threads for each rank when this node runs several and no thread count is set, or
    None to keep what is there: each rank's share of ``cores``, at least one."""
    if any(env.get(var) for var in THREAD_VARS):
        return None
    name = next((var for var in LOCAL_RANKS_VARS if env.get(var)), None)
    if name is None:
        return None
    value = env[name].strip()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={env[name]!r}: the launcher's count of this node's ranks must be a positive integer")
    local = int(value)
    return max(1, cores // local) if local > 1 else None


def share_cores(environ: MutableMapping[str, str] | None = None) -> int | None:
    """Set ``OMP_NUM_THREADS`` in ``environ`` (os.environ) to this rank's share where
    :func:`threads_per_rank` gives one; returns it, or None where nothing changed."""
    environ = os.environ if environ is None else environ
    threads = threads_per_rank(environ, usable_cores())
    if threads is not None:
        environ["OMP_NUM_THREADS"] = str(threads)
    return threads
