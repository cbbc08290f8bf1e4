"""Rank discovery under each launcher's environment (real process groups are exercised in
test_train.py and test_objectives.py)."""

from __future__ import annotations

import pytest

from multi_dist.dist import discover


def test_torch_style_launchers() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    info = discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.master_addr, info.master_port) == (3, 1, 8, "node7", 1234)
    assert info.launcher == "torch" and not info.is_main


def test_slurm_tasks_find_the_first_node_and_a_shared_port() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[003-004,010]",
    }
    info = discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (5, 1, 8, "slurm")
    assert info.master_addr == "gpu003"
    assert info.master_port == 20000 + 123456 % 20000
    assert discover({**env, "SLURM_PROCID": "0"}).master_port == info.master_port  # every task agrees
    assert discover({**env, "SLURM_JOB_NODELIST": "solo"}).master_addr == "solo"


def test_plain_python_is_a_world_of_one() -> None:
    info = discover({})
    assert (info.rank, info.world_size, info.launcher, info.is_main) == (0, 1, "single", True)


def test_an_impossible_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 4 is outside the world size 4"):
        discover({"RANK": "4", "WORLD_SIZE": "4"})
