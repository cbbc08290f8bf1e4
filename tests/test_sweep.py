"""Ray Tune sweeps (multi_dist.sweep, launch/sweep.py) for real: a local Ray, ASHA, Ray Train's
TorchTrainer, DeepSpeed on CPU, the tiny preset on the demo corpus."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from multi_dist import cli, sweep
from multi_dist.config import ConfigError

from .conftest import ROOT

# token auth would write a token into the home folder; usage stats are not needed
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(autouse=True)
def ray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Paths in the configs are relative to the repository, as for a user who runs the scripts there."""
    monkeypatch.chdir(ROOT)
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a path short enough to hold Ray's temp dir (and its unix sockets) itself."""
    path = Path(tempfile.mkdtemp(prefix="sw", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_overrides(corpus: Path, *extra: str) -> str:
    """The sweep's ``overrides`` list: short runs, no validation, no DataLoader processes."""
    items = [f"data.path={corpus / 'train'}", "val=null", "data.num_workers=0", "data.batch_size=2", *extra]
    return f"overrides=[{', '.join(items)}]"


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_asha_stops_the_worse_trials_early_and_writes_the_results(demo_corpus: Path, tmp_path: Path) -> None:
    """Four one-worker trials, two at a time on 2 CPUs. The MLM weight scales ``train/loss`` (MLM is
    about 10 of the initial 12.9), so the order of the trials is known before they run: the two
    heavier weights start after the first two and are judged at their first report (step 1, ASHA's
    first rung) against better values, so ASHA stops them there; one-worker trials wait for each
    verdict, so they stop at exactly that step, with a checkpoint."""
    sweep_dir = tmp_path / "sweep"  # too long a path for Ray's sockets: the temp dir goes to /tmp
    cfg = sweep.load(
        "configs/sweep/tiny.yaml",
        [
            f"sweep_dir={sweep_dir}",
            "num_cpus=2",
            run_overrides(demo_corpus, "steps=6", "log_every=1", "ckpt_every=100"),
            "space={loss.mlm: {grid: [0.25, 0.5, 1.0, 2.0]}}",
            "search=grid",
            "num_samples=1",
            "asha={grace_period: 1, reduction_factor: 2}",
        ],
    )

    def ours(signum: int, frame: object) -> None:  # a caller's handler, which the sweep must leave
        raise KeyboardInterrupt

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    signal.signal(signal.SIGINT, ours)
    try:
        outcome = sweep.run_sweep(cfg)
        # Tune's and Ray's handlers are gone (Tune's were left behind: a later Ctrl+C only logged a line)
        assert signal.getsignal(signal.SIGINT) is ours
        assert all(signal.getsignal(sig) is before[sig] for sig in (signal.SIGTERM, signal.SIGUSR1))
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        temp = sweep_dir / "tmp"
        if temp.is_symlink():
            shutil.rmtree(temp.resolve(), ignore_errors=True)
    assert not ray.is_initialized()  # the sweep shut down the Ray it started
    assert temp.is_symlink()

    rows = {r["loss.mlm"]: r for r in outcome.rows}
    assert sorted(rows) == [0.25, 0.5, 1.0, 2.0] and outcome.unfinished == 0
    best = outcome.rows[0]
    assert best["loss.mlm"] == 0.25 and best["status"] == "completed" and best["step"] == 6
    for weight in (1.0, 2.0):
        assert rows[weight]["status"] == "stopped" and rows[weight]["step"] == 1, rows[weight]
    # a stopped trial's run checkpointed at the step it was stopped and ended without an export
    for weight in (1.0, 2.0):
        run = Path(rows[weight]["run_dir"])
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
        assert not (run / "summary.json").exists()
    best_run = Path(best["run_dir"])
    assert best_run.parent.parent == sweep_dir / "tune" and best_run.name == "run"
    assert json.loads((best_run / "summary.json").read_text())["steps"] == 6
    assert (best_run / "model").is_dir()

    table = read_rows(sweep_dir / "results.csv")
    assert [r["trial"] for r in table] == [r["trial"] for r in outcome.rows]
    assert {"status", "step", "train/loss", "best train/loss", "loss.mlm", "run_dir", "overrides"} <= set(table[0])
    assert "loss.mlm=0.25" in table[0]["overrides"]

    best_cfg = cli.load("pretrain", str(outcome.best_config))  # a full run config, as the CLI loads it
    assert best_cfg.loss.mlm == 0.25 and best_cfg.steps == 6
    assert best_cfg.data.path == str(demo_corpus / "train")
    assert best_cfg.run_dir == str(sweep_dir / "best_run")  # its own: the base's runs/tiny may hold another run

    with pytest.raises(ConfigError, match="already holds a sweep: pass --resume"):
        sweep.run_sweep(cfg)


# long enough that Ctrl+C, sent at the first log (step 2), stops the run before its end: the stop
# lands about 1 s later (measured at step 6 alone, 0.2 s a step), more under load
TWO_WORKER_STEPS = 60


def _sweep_command(sweep_dir: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "launch/sweep.py",
        "--config",
        "configs/sweep/tiny.yaml",
        f"sweep_dir={sweep_dir}",
        "num_cpus=2",
        "workers_per_trial=2",
        "space={}",
        "num_samples=1",
        run_overrides(corpus, f"steps={TWO_WORKER_STEPS}", "log_every=2", "ckpt_every=100"),
        *extra,
    ]


def test_a_two_worker_trial_trains_in_one_group_and_an_interrupted_sweep_resumes(
    demo_corpus: Path, short_dir: Path
) -> None:
    """One trial of two Ray Train workers (TorchTrainer, gloo, DeepSpeed ZeRO-2). Ctrl+C once its
    run has logged: Tune stops the trial, whose workers checkpoint at the next step boundary and
    exit. ``--resume`` restarts the trial in its folder and the run resumes from that checkpoint."""
    sweep_dir = short_dir / "sweep"
    env = {**os.environ, **RAY_ENV}
    cmd = _sweep_command(sweep_dir, demo_corpus)
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 300
    while not any(p.stat().st_size for p in sweep_dir.glob("tune/trial_*/run/metrics.jsonl")):
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.time() < deadline, "the trial never logged"
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 1 and "interrupted: 1 trial(s) unfinished; continue with --resume" in err, err[-3000:]
    assert (sweep_dir / "tmp").is_dir() and not (sweep_dir / "tmp").is_symlink()  # a short path: Ray's temp is here
    (run,) = sweep_dir.glob("tune/trial_*/run")
    assert "stopped at step" in out  # the workers stopped at a step boundary, with a checkpoint
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 2 <= stopped_at < TWO_WORKER_STEPS and not (run / "summary.json").exists()
    assert read_rows(sweep_dir / "results.csv")[0]["status"] == "unfinished"

    again = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints'}/step_{stopped_at:08d} at step {stopped_at}" in again.stdout
    (row,) = read_rows(sweep_dir / "results.csv")
    assert row["status"] == "completed" and row["step"] == str(TWO_WORKER_STEPS)
    assert row["world_size"] == "2"  # both ranks in one group: torch.distributed's world size
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == TWO_WORKER_STEPS and summary["samples"] == TWO_WORKER_STEPS * 2 * 2  # 2 clips, 2 ranks
    assert cli.load("pretrain", str(sweep_dir / "best.yaml")).steps == TWO_WORKER_STEPS


ASHA_SCRIPT = """
import sys, time
from pathlib import Path
import ray
from ray import tune
from ray.tune.search import BasicVariantGenerator
from multi_dist.sweep import ResumableASHA

folder, how = Path(sys.argv[1]), sys.argv[2]

class Trial(tune.Trainable):  # x is its loss; the bad trial takes a while to set up, as a run does
    def setup(self, config):
        self.x = config["x"]
        if self.x > 0:
            (folder / "bad_started").touch()
            time.sleep(4)

    def step(self):
        return {"step": self.iteration + 1, "loss": float(self.x), "done": self.iteration + 1 >= 8}

ray.init(num_cpus=1, include_dashboard=False)
trainable = tune.with_resources(Trial, {"cpu": 1})
if how == "resume":
    tuner = tune.Tuner.restore(str(folder / "tune"), trainable=trainable, resume_unfinished=True, resume_errored=True)
else:
    tuner = tune.Tuner(
        trainable,
        param_space={"x": tune.grid_search([0.0, 5.0])},
        tune_config=tune.TuneConfig(
            metric="loss",
            mode="min",
            search_alg=BasicVariantGenerator(max_concurrent=1),
            scheduler=ResumableASHA(time_attr="step", max_t=8, grace_period=1, reduction_factor=2),
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(folder),
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
        ),
    )
for result in tuner.fit():
    print("x", (result.config or {}).get("x"), "step", (result.metrics or {}).get("step"))
ray.shutdown()
"""


def test_asha_judges_a_resumed_sweeps_trials_against_the_reports_before_the_interruption(short_dir: Path) -> None:
    """Tune restores a scheduler as it was pickled at the sweep's start: ASHA's rungs were empty
    after --resume, so a bad trial begun again was compared with nothing and ran to max_t.
    Interrupted while the bad trial sets up (the good one done), then resumed: the bad trial is
    stopped at its first rung, as in a sweep never interrupted."""
    script = short_dir / "asha.py"
    script.write_text(ASHA_SCRIPT)
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, str(script), str(short_dir), "start"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (short_dir / "bad_started").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
    assert "x 0.0 step 8" in out and "x 5.0" not in out, out + err[-3000:]  # the bad one had not reported
    again = subprocess.run(
        [sys.executable, str(script), str(short_dir), "resume"], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    results = sorted(line for line in again.stdout.splitlines() if line.startswith("x "))
    assert results == ["x 0.0 step 8", "x 5.0 step 1"], again.stdout + again.stderr[-3000:]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("space={optim.lrr: {grid: [0.1]}}", "space 'optim.lrr' = 0.1: unknown config key 'optim.lrr'"),
        ("space={optim.lr: {grdi: [0.1]}}", "unknown config key 'space.optim.lr.grdi'; did you mean 'grid'?"),
        ("space={zero.stage: {choice: [2, 4]}}", "space 'zero.stage' = 4: zero.stage must be 0, 1, 2 or 3"),
        ("overrides=[steps=4, optim.warmup=2]", "overrides: unknown config key 'optim.warmup'"),
        ("metrc=train/loss", "unknown config key 'metrc'; did you mean 'metric'?"),
        (  # values valid alone, not together: every combination is loaded
            "space={grad_accum: {grid: [1, 2]}, on_nan: {choice: [stop, skip]}}",
            "space 'grad_accum' = 2, 'on_nan' = 'skip': on_nan=skip needs grad_accum=1",
        ),
    ],
)
def test_a_bad_key_or_value_fails_before_ray_starts(tmp_path: Path, override: str, message: str) -> None:
    """As ``launch/sweep.py`` says it: ``error: MESSAGE`` and status 1, no traceback."""
    sweep_dir = tmp_path / "sweep"
    with pytest.raises(SystemExit) as err:
        sweep.main("", ["--config", "configs/sweep/tiny.yaml", f"sweep_dir={sweep_dir}", override])
    assert str(err.value.code).startswith("error: ") and message in str(err.value.code)
    assert type(err.value.__context__) is ConfigError  # (as run_sweep raises it)
    assert not ray.is_initialized() and not sweep_dir.exists()


def test_a_metric_the_runs_do_not_log_fails_the_trial_at_its_first_report(demo_corpus: Path, short_dir: Path) -> None:
    """A typo in ``metric``: the trial trained to its last step and exported before it failed, and
    the sweep then exited 0 with no best.yaml and Ray's header line as the error. Now the first
    logged dict of the metric's kind (train/) fails it, the error column holds the cause, and
    the command fails; an eval/ metric with no validation set fails before Ray starts."""
    sweep_dir = short_dir / "s"
    cmd = [
        sys.executable,
        "launch/sweep.py",
        "--config",
        "configs/sweep/tiny.yaml",
        f"sweep_dir={sweep_dir}",
        "num_cpus=1",
        "space={}",
        "num_samples=1",
        "asha=null",
        "metric=train/los",
        run_overrides(demo_corpus, "steps=4", "log_every=1", "ckpt_every=100"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **RAY_ENV})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"no trial reported train/los: no best config (see {sweep_dir / 'results.csv'})" in proc.stderr
    (row,) = read_rows(sweep_dir / "results.csv")
    assert row["status"] == "error" and row["error"].startswith(
        "ValueError: the sweep's metric 'train/los' is not among what the run logs with it: "
    ), row["error"]
    assert "train/loss" in row["error"] and "\x1b" not in row["error"]
    run = Path(row["run_dir"])
    assert len((run / "metrics.jsonl").read_text().splitlines()) < 4 and not (run / "summary.json").exists()
    assert not (sweep_dir / "best.yaml").exists()
    no_val = sweep.load("configs/sweep/tiny.yaml", ["metric=eval/t2v_r1", "asha=null", "overrides=[val=null]"])
    with pytest.raises(ConfigError, match="metric eval/t2v_r1 needs an evaluation, but a run has none: set val"):
        sweep.check(no_val)


def test_the_example_sweep_checks() -> None:
    """configs/sweep/tiny.yaml: every trial config it can produce loads (base + overrides, then
    every combination of the space's values and range ends)."""
    cfg = sweep.load("configs/sweep/tiny.yaml")
    configs = sweep.check(cfg)
    assert len(configs) == 1 + 2 * 3 * 2 and {c.steps for c in configs} == {30}
    assert {c.optim.warmup_steps for c in configs} == {5, 2, 10}  # tiny.yaml's 5, then the choices
