"""Rank discovery under each launcher's environment (real process groups are exercised in
test_train.py and test_objectives.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from multi_dist.dist import PORTS_ENV, SHM_SEGMENT, discover, free_port, remove_shm_segments
from multi_dist.threads import share_cores, threads_per_rank, usable_cores

from .conftest import ROOT


def test_torch_style_launchers() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    info = discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.master_addr, info.master_port) == (3, 1, 8, "node7", 1234)
    assert info.launcher == "torch" and not info.is_main


def test_several_ranks_on_a_node_share_its_cores_unless_told() -> None:
    """The deepspeed launcher (LOCAL_SIZE) leaves each rank torch's thread per core; the ranks take
    their share (at least one). A thread count the user set (OMP_NUM_THREADS, MKL_NUM_THREADS; or
    torchrun, Slurm, Ray) wins, and one rank keeps torch's default. The training processes of
    test_train check it end to end."""
    assert threads_per_rank({"LOCAL_SIZE": "2"}, 2) == 1
    assert threads_per_rank({"LOCAL_SIZE": "4"}, 16) == 4
    assert threads_per_rank({"LOCAL_WORLD_SIZE": "3", "LOCAL_SIZE": "8"}, 16) == 5  # torchrun's and Ray's name first
    assert threads_per_rank({"LOCAL_SIZE": "8"}, 2) == 1
    assert threads_per_rank({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": ""}, 16) == 8  # empty: unset
    assert threads_per_rank({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "7"}, 16) is None
    assert threads_per_rank({"LOCAL_SIZE": "2", "MKL_NUM_THREADS": "3"}, 16) is None
    assert threads_per_rank({"LOCAL_SIZE": "1"}, 16) is None
    assert threads_per_rank({}, 16) is None
    for bad in ("abc", "2.0", "0", "-1"):
        with pytest.raises(ValueError, match=f"LOCAL_SIZE='{bad}': the launcher's count of this node's ranks"):
            threads_per_rank({"LOCAL_SIZE": bad}, 16)
    env = {"LOCAL_SIZE": "2"}
    assert share_cores(env) == max(1, usable_cores() // 2) and env["OMP_NUM_THREADS"] == str(
        share_cores({"LOCAL_SIZE": "2"})
    )
    assert share_cores(env) is None  # set now: a second call leaves it
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


def test_the_launch_scripts_share_the_cores_before_torch_and_blas_start_their_threads() -> None:
    """Under the deepspeed launcher (LOCAL_SIZE=2, no OMP_NUM_THREADS) the command line sets each
    rank's share before the config loads torch and numpy, so their thread pools (OpenMP, OpenBLAS)
    start at it: set in dist.init only, torch's could be changed later but OpenBLAS's stayed at a
    thread per core. A config error stops this run at start-up, before dist.init."""
    script = (
        "import os, sys\n"
        "from multi_dist.cli import main\n"
        "try:\n"
        "    main('pretrain', '', ['--config', 'configs/pretrain/tiny.yaml', 'stepz=1'])\n"
        "except SystemExit as stop:\n"
        "    assert 'stepz' in str(stop.code), stop.code\n"
        "import json, threadpoolctl, torch\n"
        "pools = {i['internal_api']: i['num_threads'] for i in threadpoolctl.threadpool_info()}\n"
        "print(json.dumps([os.environ['OMP_NUM_THREADS'], torch.get_num_threads(), pools]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["LOCAL_SIZE"] = "2"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    share = max(1, usable_cores() // 2)
    omp, torch_threads, pools = json.loads(proc.stdout.splitlines()[-1])
    assert (omp, torch_threads) == (str(share), share)
    assert pools.get("openblas") == share, pools  # (numpy's)


def test_slurm_tasks_find_the_first_node_and_a_shared_port() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[003-004,010]",
    }
    info = discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (5, 1, 8, "slurm")
    assert info.master_addr == "gpu003"
    assert info.master_port == 20000 + 31 * 123456 % 12768
    assert discover({**env, "SLURM_PROCID": "0"}).master_port == info.master_port  # every task agrees
    # concurrent jobs and steps get their own port, below the ephemeral range (32768 and up)
    ports = {
        discover({**env, "SLURM_JOB_ID": str(j), "SLURM_STEP_ID": str(s)}).master_port
        for j in range(123456, 123556)
        for s in range(3)
    }
    assert len(ports) == 300 and max(ports) < 32768 and min(ports) >= 20000
    assert discover({**env, "SLURM_JOB_NODELIST": "solo"}).master_addr == "solo"


def test_plain_python_in_a_batch_script_is_a_world_of_one() -> None:
    """A batch script's shell (and salloc's) has SLURM_PROCID=0 and the allocation's SLURM_NTASKS
    but no job step: plain python there took world size 2 and waited forever for rank 1."""
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "vm"}
    info = discover(env)
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")
    step = {**env, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}  # srun --ntasks=1
    assert (discover(step).world_size, discover(step).launcher) == (1, "slurm")


def test_plain_python_is_a_world_of_one() -> None:
    info = discover({})
    assert (info.rank, info.world_size, info.launcher, info.is_main) == (0, 1, "single", True)


def test_an_impossible_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 4 is outside the world size 4"):
        discover({"RANK": "4", "WORLD_SIZE": "4"})


def test_the_shared_memory_of_a_killed_run_is_removed_by_its_port() -> None:
    """A run killed in start-up leaves DeepSpeed's segments (one per rank, named by uid, address,
    port and rank); removing them by port takes that run's and no other's."""
    port = free_port()
    other = port + 1  # a name only: another run's port
    uid = os.getuid()
    mine = [Path("/dev/shm") / f"{SHM_SEGMENT}_{uid}_127.0.0.1_{port}_{rank}" for rank in (0, 1)]
    theirs = Path("/dev/shm") / f"{SHM_SEGMENT}_{uid}_127.0.0.1_{other}_0"
    try:
        for path in (*mine, theirs):
            path.write_bytes(b"\0" * 64)
        assert remove_shm_segments(port) == mine
        assert not any(p.exists() for p in mine) and theirs.exists()
        assert remove_shm_segments(port) == []
    finally:
        for path in (*mine, theirs):
            path.unlink(missing_ok=True)


def test_a_lock_left_by_a_killed_start_up_does_not_hang_the_next_run(tmp_path: Path) -> None:
    """torch's JIT build of DeepSpeed's shared-memory op guards its folder with a plain lock file,
    which a rank killed during start-up leaves behind; every later start of this environment then
    waited for it forever (a sweep test hung so). A real one-process DeepSpeed start (gloo) with
    such a file in place completes, removes it, and says so.

    The start gets its own extensions folder (a copy of the built op, so nothing is rebuilt): in
    the shared one, any other test's DeepSpeed start running at the same moment may find the lock
    first and remove it, saying so in its own log (CI saw that)."""
    import shutil

    from torch.utils.cpp_extension import _get_build_directory

    built = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    extensions = tmp_path / "torch_extensions"
    shutil.copytree(built, extensions / built.name)  # keeps times: ninja sees nothing to build
    lock = extensions / built.name / "lock"
    lock.touch()  # what a process killed inside torch's build or load leaves
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    script = "from multi_dist import dist; info = dist.init(); print('WORLD', info.world_size, info.launcher)"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WORLD 1 single" in proc.stdout
    assert not lock.exists() and f"removing {lock}: left by a process killed" in proc.stderr


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_free_ports_come_from_the_given_block_in_turn_skipping_ports_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``MULTI_DIST_PORTS`` (the suite gives each worker a block above the ephemeral range),
    a port is one of the block's, the next call's another, a port someone holds is passed over,
    and a block all in use or a malformed one is an error naming the variable."""
    held = socket.socket()
    for _ in range(100):  # a port held here, its next two free (a busy machine may hold one of them)
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        if port + 2 <= 65535 and all(_bindable(p) for p in (port + 1, port + 2)):
            break
        held.close()
        held = socket.socket()
    with held:
        monkeypatch.setenv(PORTS_ENV, f"{port}-{port + 2}")
        got = [free_port() for _ in range(4)]
        assert port not in got and set(got) <= {port + 1, port + 2} and got[0] != got[1] and got[:2] == got[2:]
        monkeypatch.setenv(PORTS_ENV, f"{port}-{port}")
        with pytest.raises(OSError, match=f"{PORTS_ENV}={port}-{port}: no port of that range is free"):
            free_port()
    for bad in ("61000", "70000-70010", "62000-61000"):
        monkeypatch.setenv(PORTS_ENV, bad)
        with pytest.raises(ValueError, match=f"{PORTS_ENV}='{bad}': give a range FIRST-LAST"):
            free_port()
