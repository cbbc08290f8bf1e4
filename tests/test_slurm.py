"""launch/slurm.py on a real Slurm cluster started by the test (munged, slurmctld, slurmd): a
2-rank DeepSpeed pretraining job that reaches its time limit, checkpoints on the warning signal,
is requeued and finishes from its checkpoint; an evaluation job array over two of its checkpoints;
a bad config that fails before anything is submitted; the dry run.

Nothing is skipped: without Slurm installed the cluster fixture fails, saying how to install it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT
from .slurm_cluster import SlurmCluster

STEPS = 50
THROTTLE_S = 5
"""The training shards (20 clips: 5 steps of one rank, no shuffle buffer reading ahead) are read
through ``pipe:sleep 5 && cat``, as from a slow store: a step takes at least 1 s however fast the
CPU, so the first run is still training when the warning comes (at most 40 s into the job)."""
TIME_MIN = 1
SIGNAL_DELAY_S = 20
"""Slurm checks time limits every 30 s and warns at the first check within delay + 30 s of the
limit: 10 to 40 s into a 1-minute job, after the task has installed its handlers."""


def slurm_launch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python launch/slurm.py ...`` from the repository root, as a user runs it."""
    cmd = [sys.executable, "launch/slurm.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A one-node cluster for this module; SLURM_CONF is exported while it runs. Requeued jobs
    are held for ``cred_expire`` before they run again and started by the next scheduler pass: 5 s
    each here (Slurm's defaults: 120 s and 60 s)."""
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), cred_expire_s=5, sched_interval_s=5)
    c.start()
    before = os.environ.get("SLURM_CONF")
    os.environ.update(c.env)
    try:
        yield c
    finally:
        c.stop()
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before


def job_ids(cluster: SlurmCluster) -> list[str]:
    env = {**os.environ, **cluster.env}
    out = subprocess.run(["scontrol", "show", "jobs", "-o"], env=env, capture_output=True, text=True, timeout=30)
    return re.findall(r"JobId=(\d+)", out.stdout)


@pytest.fixture(scope="module")
def requeued_run(cluster: SlurmCluster, demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``launch/slurm.py pretrain`` of the tiny preset as 2 tasks (2 CPU ranks over gloo) with a
    1-minute limit and one requeue allowed. The requeued job keeps its 1-minute limit; on a real
    cluster each rerun is warned and requeued again until training ends (``--max-requeues``).
    Here, to requeue once only, the test lifts the requeued job's limit as the cluster's admin so
    that the rerun finishes."""
    run = tmp_path_factory.mktemp("slurm_pretrain") / "run"
    shards = ",".join(p.stem for p in sorted((demo_corpus / "train").glob("*.tar")))
    proc = slurm_launch(
        "pretrain",
        "--config",
        "configs/pretrain/tiny.yaml",
        f"data.path=pipe:sleep {THROTTLE_S} && cat {demo_corpus / 'train'}/{{{shards}}}.tar",
        "data.epoch_samples=120",
        "data.shuffle_buffer=0",
        "val=null",
        "data.num_workers=1",
        f"steps={STEPS}",
        "ckpt_every=25",
        "log_every=10",
        f"run_dir={run}",
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--partition",
        cluster.partition,
        "--time",
        str(TIME_MIN),
        "--signal-delay-s",
        str(SIGNAL_DELAY_S),
        "--max-requeues",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    deadline = time.time() + 600
    lifted = False
    while True:
        info = cluster.job(job)
        if info.get("Restarts") == "1" and not lifted:
            subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=15"], env=os.environ, check=True)
            lifted = True
        if info.get("JobState") not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", None):
            break
        assert time.time() < deadline, f"job {job} still {info.get('JobState')} after 600 s"
        time.sleep(1)
    logs = run / "slurm" / "logs"
    return {
        "job": job,
        "run": run,
        "launch": proc.stdout,
        "info": info,
        "lifted": lifted,
        "rank0": _read(logs / f"{job}_0_log.out"),
        "rank1": _read(logs / f"{job}_1_log.out"),
        "err": _read(logs / f"{job}_0_log.err"),
    }


def test_the_submit_time_data_check_fits_a_small_validation_set(demo_corpus: Path) -> None:
    """The validation set (4 shards, asked for 5 loader workers a rank) gets fewer workers where it
    has fewer shards than ranks x workers; below a shard a rank it fails, naming it and what can
    change there."""
    from multi_dist import slurm
    from multi_dist.cli import load

    over = [f"data.path={demo_corpus / 'train'}", f"val.path={demo_corpus / 'val'}", "val.num_workers=5"]
    cfg = load("pretrain", str(ROOT / "configs/pretrain/tiny.yaml"), over)
    slurm.check_data("pretrain", cfg, 2)  # 2 ranks x 2 workers
    with pytest.raises(
        ValueError, match=r"/val: 4 shard\(s\) cannot feed 5 rank\(s\).* or fewer ranks, or val=null\.$"
    ):
        slurm.check_data("pretrain", cfg, 5)


def test_dry_run_prints_the_batch_script_and_submits_nothing(demo_corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = slurm_launch(
        "evaluate",
        "--config",
        "configs/eval/demo_pretrain.yaml",
        f"data.path={demo_corpus / 'val'}",
        f"out_dir={run}",
        "--checkpoints",
        str(ROOT / "configs"),  # any existing path: the dry run only names it
        str(ROOT / "launch"),
        "--nodes",
        "2",
        "--gpus-per-node",
        "2",  # 4 ranks x 1 loader worker: the 4 validation shards feed them
        "--time",
        "30",
        "--partition",
        "gpu",
        "--mem",
        "64",
        "--dry-run",
        env={**os.environ, "SLURM_CONF": "/nonexistent"},  # off a cluster: no sinfo to ask about "gpu"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for line in (
        "#SBATCH --array=0-1%2",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --time=30",
        "#SBATCH --partition=gpu",
        "#SBATCH --mem=64G",
        "-u -m submitit.core._submit",
        "srun --unbuffered --output",  # (submitit's)
        "--kill-on-bad-exit=1",
    ):
        assert line in out, line
    assert f"init={ROOT / 'configs'}" in out and f"init={ROOT / 'launch'}" in out
    assert not run.exists()


def test_requeue_only_after_the_time_limit_warning_and_within_max_requeues(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The refusals (no scontrol call); the requeue itself runs in the cluster test below."""
    import signal

    from multi_dist import slurm

    env = {"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "2"}
    assert slurm.slurm_job_id(env) == "7_1" and slurm.slurm_job_id({"SLURM_JOB_ID": "9"}) == "9"
    monkeypatch.setattr(slurm, "_RECEIVED", [signal.SIGTERM])
    assert not slurm.requeue(5, env)
    assert "not requeueing job 7_1: stopped by SIGTERM" in capsys.readouterr().out
    monkeypatch.setattr(slurm, "_RECEIVED", [signal.SIGUSR2])
    assert not slurm.requeue(2, env)
    assert "restarted 2 time(s) already (--max-requeues 2)" in capsys.readouterr().out


def test_requeue_without_scontrol_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """No scontrol on the node (or one that hangs): 'could not requeue', not a traceback that
    fails the job after its checkpoint."""
    import signal

    from multi_dist import slurm

    monkeypatch.setattr(slurm, "_RECEIVED", [signal.SIGUSR2])
    monkeypatch.setenv("PATH", "/nonexistent")
    assert not slurm.requeue(3, {"SLURM_JOB_ID": "9"})
    assert "could not requeue job 9: [Errno 2] No such file or directory: 'scontrol'" in capsys.readouterr().out


def test_an_evaluation_array_whose_elements_share_a_report_is_refused(tmp_path: Path) -> None:
    """Two runs' checkpoints of the same step, one out_dir: both reports were
    {out_dir}/pretrain-step_00000100.json, the last element to finish overwriting the other."""
    from multi_dist.slurm import SlurmConfig, plan

    ckpts = []
    for run in ("runA", "runB"):
        ckpt = tmp_path / run / "checkpoints" / "step_00000100"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer.json").write_text("{}")
        ckpts.append(str(ckpt))
    config, out = "configs/eval/demo_pretrain.yaml", f"out_dir={tmp_path / 'eval'}"
    with pytest.raises(ValueError, match=r"would both write .*/eval/pretrain-step_00000100.json: give them different"):
        plan("evaluate", str(ROOT / config), [out], checkpoints=ckpts)
    later = Path(ckpts[1]).rename(Path(ckpts[1]).parent / "step_00000200")  # other steps: other reports
    assert len(plan("evaluate", str(ROOT / config), [out], checkpoints=[ckpts[0], str(later)])) == 2
    for flag, field in (("--cpus-per-task", "cpus_per_task"), ("--mem", "mem_gb")):
        with pytest.raises(ValueError, match=f"{flag} must be positive, got -1"):
            SlurmConfig(**{field: -1}).validate()


def test_the_partition_and_its_cpus_come_from_sinfo(
    cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What the pre-submit check reads of the test cluster: its default partition, a hidden one
    (which plain ``sinfo`` shows root but no other user: ``--all`` is what lets those submit, and
    the tests run as root, so they cannot tell), ``SBATCH_PARTITION`` as sbatch reads it,
    ``SINFO_PARTITION`` ignored (plain ``sinfo`` would list that partition alone), a list, and
    nothing off a cluster."""
    from multi_dist.slurm import partition_cpus

    n, default = cluster.cpus, cluster.partition
    assert partition_cpus(None) == (default, n)
    assert partition_cpus("hidden") == ("hidden", n)
    assert partition_cpus(f"hidden,{default}") == ("hidden", n)  # (as large: the first)
    monkeypatch.setenv("SBATCH_PARTITION", "hidden")
    assert partition_cpus(None) == ("hidden", n)
    monkeypatch.setenv("SINFO_PARTITION", "hidden")  # would make sinfo list that one alone
    assert partition_cpus(default) == (default, n)
    with pytest.raises(ValueError, match=rf"--partition {default},gpu: sinfo lists no partition gpu \(it lists"):
        partition_cpus(f"{default},gpu")
    # the real sinfo behind a wrapper that notes each call
    calls, wrapper = tmp_path / "sinfo_calls", tmp_path / "bin" / "sinfo"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho called >> {calls}\nexec {shutil.which("sinfo")} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))  # sinfo fails: no cluster to ask
    (tmp_path / "slurm.conf").write_text("")
    assert partition_cpus("gpu") is None
    assert calls.read_text() == "called\n"
    monkeypatch.setenv("SLURM_CONF", "/nonexistent")  # sinfo would retry it for a minute: not asked
    assert partition_cpus("gpu") is None
    assert calls.read_text() == "called\n"


@pytest.mark.parametrize("problem", ["config", "cpus", "partition"])
def test_a_bad_job_fails_before_anything_is_submitted(
    cluster: SlurmCluster, demo_corpus: Path, tmp_path: Path, problem: str
) -> None:
    """A typo in the config; more CPUs per node than the test cluster's node has (tasks per node
    x data.num_workers + 1 = 2 CPUs each), which Slurm would take and keep pending for ever; a
    partition the cluster lacks. The data exists (a clean clone has no data/demo), so each job
    passes every check but the one it breaks."""
    p, fits = cluster.partition, ["--tasks-per-node", "1", "--cpus-per-task", "1"]
    args, message = {
        "config": (["optim.lrr=1", *fits], "error: unknown config key 'optim.lrr'"),
        "cpus": (
            ["--tasks-per-node", str(cluster.cpus)],
            f"error: {cluster.cpus} task(s) per node x --cpus-per-task 2 (its default: data.num_workers + 1) = "
            f"{2 * cluster.cpus} CPUs per node, but the nodes of partition '{p}' have at most {cluster.cpus} (sinfo)",
        ),
        "partition": (
            [*fits, "--partition", f"{p},gpu"],
            f"error: --partition {p},gpu: sinfo lists no partition gpu (it lists {p}, hidden)",
        ),
    }[problem]
    before = job_ids(cluster)
    run = tmp_path / "run"
    data = [f"data.path={demo_corpus / 'train'}", f"val.path={demo_corpus / 'val'}"]
    config = ["--config", "configs/pretrain/tiny.yaml", f"run_dir={run}", *data]
    proc = slurm_launch("pretrain", *config, "--time", "5", *args)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "submitted" not in proc.stdout
    assert job_ids(cluster) == before
    assert not run.exists()


def test_time_limit_checkpoints_requeues_once_and_resumes(requeued_run: dict) -> None:
    r = requeued_run
    diagnosis = (r["info"], r["rank0"][-3000:], r["err"][-3000:])
    assert r["info"]["JobState"] == "COMPLETED" and r["info"]["ExitCode"] == "0:0", diagnosis
    assert r["info"]["Restarts"] == "1" and r["lifted"], diagnosis
    rank0, rank1 = r["rank0"], r["rank1"]
    # both ranks took part in both runs
    for log, rank in ((rank0, 0), (rank1, 1)):
        for restart in (0, 1):
            assert re.search(rf"rank {rank}/2 \(local {rank}\) on \S+, restart {restart}, code ", log), log[-3000:]
    # the first run was warned (USR2), checkpointed at the next step and requeued itself
    first, second = rank0.split("restart 1, code ")
    stopped = re.search(r"checkpoint (\S+/step_(\d+))\nstopped at step (\d+) on request \(signal 12\)", first)
    assert stopped, first[-3000:]
    step = int(stopped.group(3))
    assert int(stopped.group(2)) == step and 0 < step < STEPS
    assert f"requeued job {r['job']} (1 of at most 1)" in first
    assert "Job has timed out" not in r["err"] and "UncompletedJobError" not in r["err"]
    # the rerun resumed from that checkpoint and finished all the steps
    assert f"resumed from {stopped.group(1)} at step {step}" in second, second[-3000:]
    assert f"step {STEPS}/{STEPS}" in second
    summary = json.loads((r["run"] / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["samples"] == STEPS * 4 * 2
    last = r["run"] / "checkpoints" / f"step_{STEPS:08d}"
    assert (last / "rank_00000.pt").is_file() and (last / "rank_00001.pt").is_file()
    # the run folder: resolved config and the code the job ran
    stamp = next((r["run"] / "slurm").glob("2*"))
    assert (stamp / "config.yaml").is_file() and (stamp / "code" / "multi_dist" / "slurm.py").is_file()
    assert f"code {stamp / 'code'}: pretrain {stamp / 'config.yaml'}" in rank0  # the job ran the snapshot
    submission = json.loads((stamp / "submission.json").read_text())
    assert submission["jobs"][0]["job_id"] == r["job"]


def test_an_evaluation_array_over_two_checkpoints_writes_two_reports(
    requeued_run: dict, cluster: SlurmCluster, demo_corpus: Path, tmp_path: Path
) -> None:
    ckpts = requeued_run["run"] / "checkpoints"
    tags = ("step_00000025", f"step_{STEPS:08d}")  # kept whatever the step of the stop checkpoint
    out = tmp_path / "eval"
    proc = slurm_launch(
        "evaluate",
        "--config",
        "configs/eval/demo_pretrain.yaml",
        f"data.path={demo_corpus / 'val'}",
        "data.num_workers=1",
        "data.image_size=32",
        "data.num_frames=4",
        f"out_dir={out}",
        "--checkpoints",
        *(str(ckpts / t) for t in tags),
        "--cpus-per-task",
        "1",
        "--time",
        "10",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    array = re.search(r"submitted array job (\d+) \(2 elements\)", proc.stdout)
    assert array, proc.stdout
    states = cluster.wait_done(array.group(1), timeout=600)
    assert states == ["COMPLETED", "COMPLETED"], (states, _logs(out))
    for tag in tags:  # one report per element, each of its own checkpoint, over all 40 held-out clips
        report = json.loads((out / f"pretrain-{tag}.json").read_text())
        assert report["tag"] == tag and report["init"] == str(ckpts / tag)
        assert report["metrics"]["clips"] == 40 and 0 <= report["metrics"]["t2v_r1"] <= 1


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else f"({path} was not written)"


def _logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((out / "slurm" / "logs").glob("*log*")))
