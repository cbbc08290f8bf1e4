from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from multi_dist.data.pipeline import DataConfig, VideoTextStream
from multi_dist.data.text import load_tokenizer, resolve_pretrained
from multi_dist.data.transforms import frames_to_uint8, normalize_frames
from multi_dist.data.video import decode_frames

from .conftest import ROOT, TOKENIZER, small_data_config


def cfg_for(path: Path, **kw) -> DataConfig:
    return small_data_config(**{"path": str(path), "num_workers": 2, **kw})


def all_keys(stream: VideoTextStream) -> list[str]:
    return [k for batch in stream for k in batch["key"]]


def test_batches_have_the_right_shapes_dtypes_and_normalisation(demo_corpus: Path) -> None:
    cfg = cfg_for(demo_corpus / "val", resampled=False, num_frames=6, image_size=48, shuffle_buffer=0)
    batch = next(iter(VideoTextStream(cfg)))
    assert batch["video"].shape == (4, 6, 3, 48, 48) and batch["video"].dtype == torch.uint8
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].shape == (4, 16)
    # one video corpus: every frame is real, every sample from the corpus named after its folder
    assert batch["frame_mask"].shape == (4, 6) and batch["frame_mask"].all()
    assert batch["corpus"] == ["val"] * 4
    # the same clip decoded by hand with the same functions gives the same tensor
    key = batch["key"][0]
    with tarfile.open(demo_corpus / "val" / f"{key[:5]}.tar") as tar:  # key = shard id + index
        data = tar.extractfile(f"{key}.mp4").read()
    expected = frames_to_uint8(decode_frames(data, 6, "uniform"), 48)
    torch.testing.assert_close(batch["video"][0], expected, rtol=0, atol=0)
    # uint8 pixels, the model normalises them; the dark background dominates
    pixels = batch["video"].float() / 255
    assert 0.05 < pixels.median() < 0.35 and pixels.max() > 0.5


def test_captions_use_the_real_bert_vocabulary(demo_corpus: Path) -> None:
    vocab = (Path(resolve_pretrained(TOKENIZER)) / "vocab.txt").read_text().splitlines()
    assert len(vocab) == 30522  # bert-base-uncased
    batch = next(iter(VideoTextStream(cfg_for(demo_corpus / "val", resampled=False))))
    tok = load_tokenizer(TOKENIZER)
    for caption, ids, mask in zip(batch["caption"], batch["input_ids"], batch["attention_mask"]):
        words = caption.split()
        n = int(mask.sum())
        assert [vocab[i] for i in ids[:n].tolist()] == ["[CLS]", *words, "[SEP]"]
        assert ids[n:].eq(tok.pad_token_id).all()


def test_a_tokenizer_or_encoder_that_does_not_load_is_named_by_its_config_field(
    demo_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local folder is one as written (``./tok`` does not become the hub name ``tok``), and one
    that is missing or holds no tokenizer or model fails at start-up, naming the field, in a start-up
    error's types (printed as one line): not in a loader worker, or as a failed download."""
    from multi_dist.model.encoders import EncoderConfig, build_backbone

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert resolve_pretrained("./empty") == "./empty"
    with pytest.raises(FileNotFoundError, match=r"^val\.tokenizer: \./no_tokenizer does not exist$"):
        VideoTextStream(cfg_for(demo_corpus / "val", tokenizer="./no_tokenizer"), key="val")
    with pytest.raises(ValueError, match=r"^data\.tokenizer: cannot load the tokenizer '\./empty': [^\n]+$"):
        VideoTextStream(cfg_for(demo_corpus / "val", tokenizer="./empty"))
    with pytest.raises(FileNotFoundError, match=r"^model\.text\.name: ~/no/encoder does not exist$"):
        build_backbone(EncoderConfig(name="~/no/encoder", kind="bert"), "model.text.name")
    with pytest.raises(ValueError, match=r"^model\.text\.name: cannot load the model '\./empty': Unrecognized model"):
        build_backbone(EncoderConfig(name="./empty", kind="bert"), "model.text.name")


def test_a_training_stream_drops_short_batches_and_its_length_says_so(demo_corpus: Path) -> None:
    """Epoch mode, 40 clips over 2 workers in batches of 3: every sample once (short last batches
    kept), or whole batches only (training); ``len`` counts what comes."""
    for drop_last in (False, True):
        stream = VideoTextStream(cfg_for(demo_corpus / "val", resampled=False, batch_size=3), drop_last=drop_last)
        sizes = [len(b["key"]) for b in stream]
        assert len(sizes) == len(stream)
        assert sum(sizes) == 40 if not drop_last else set(sizes) == {3} and 40 - 2 * 3 < sum(sizes) < 40


def test_real_clips_stream_at_any_resolution(demo_corpus: Path) -> None:
    cfg = cfg_for(demo_corpus / "real", resampled=False, num_workers=1, batch_size=2, image_size=64, num_frames=8)
    stream = VideoTextStream(cfg)
    batches = list(stream)
    assert sum(len(b["key"]) for b in batches) == 4
    assert all(b["video"].shape[1:] == (8, 3, 64, 64) for b in batches)
    assert {m["width"] for b in batches for m in b["meta"]} == {1280, 640, 176}
    assert stream.totals == {"decoded": 4, "skipped": 0, "tar_errors": 0}


def plant_corrupt_member(src: Path, dst: Path, victim_index: int = 2) -> str:
    """Copy a shard, replacing one sample's mp4 bytes by garbage. Returns the victim's key."""
    with tarfile.open(src) as tar_in, tarfile.open(dst, "w") as tar_out:
        members = tar_in.getmembers()
        victim = sorted({m.name.split(".")[0] for m in members})[victim_index]
        for m in members:
            data = tar_in.extractfile(m).read()
            if m.name == f"{victim}.mp4":
                data = b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 500
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tar_out.addfile(info, io.BytesIO(data))
    return victim


def test_corrupt_member_is_skipped_counted_and_logged(
    demo_corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shards = sorted((demo_corpus / "val").glob("*.tar"))
    bad = tmp_path / "bad"
    bad.mkdir()
    victim = plant_corrupt_member(shards[0], bad / "00000.tar")
    shutil.copy(shards[1], bad / "00001.tar")
    cfg = cfg_for(bad, resampled=False, num_workers=0, shuffle_buffer=0)
    stream = VideoTextStream(cfg)
    with caplog.at_level(logging.WARNING, logger="multi_dist.data"):
        keys = all_keys(stream)
    assert victim not in keys
    assert len(keys) == len(set(keys)) == 2 * 10 - 1  # everything else got through
    assert stream.totals == {"decoded": 19, "skipped": 1, "tar_errors": 0}
    assert list(stream.skipped_keys) == [victim]
    assert any(victim in r.getMessage() and "00000.tar" in r.getMessage() for r in caplog.records)


def test_a_cut_tar_does_not_stop_the_run(demo_corpus: Path, tmp_path: Path) -> None:
    shards = sorted((demo_corpus / "val").glob("*.tar"))
    bad = tmp_path / "cut"
    bad.mkdir()
    whole = shards[0].read_bytes()
    (bad / "00000.tar").write_bytes(whole[: len(whole) // 2])  # as if the copy died half-way
    shutil.copy(shards[1], bad / "00001.tar")
    stream = VideoTextStream(cfg_for(bad, resampled=False, num_workers=0, shuffle_buffer=0, shardshuffle=False))
    keys = all_keys(stream)
    # noticed and counted: as unreadable tar data, or as a sample whose video member was cut off
    assert stream.totals["tar_errors"] + stream.totals["skipped"] >= 1
    intact = {f"00001{i}" for i in range(10)}
    assert intact <= set(keys)  # the shard after the broken one is read whole
    assert 3 <= len(set(keys) - intact) < 10  # the members before the cut are kept


def test_two_ranks_two_workers_cover_the_epoch_exactly_once(demo_corpus: Path) -> None:
    seen: list[str] = []
    for rank in range(2):
        stream = VideoTextStream(cfg_for(demo_corpus / "train", resampled=False, batch_size=3), rank=rank, world_size=2)
        keys = all_keys(stream)
        assert len(stream) == len(list(VideoTextStream(stream.cfg, rank, 2)))  # __len__ predicts the batches
        seen += keys
    expected = [r["key"] for f in (demo_corpus / "train").glob("*.parquet") for r in _parquet(f)]
    assert len(seen) == len(expected) == 120
    assert sorted(seen) == sorted(expected)


def _parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_epochs_reshuffle_and_keys_differ_per_rank_in_resampled_mode(demo_corpus: Path) -> None:
    cfg = cfg_for(demo_corpus / "train", resampled=True, epoch_samples=50, batch_size=4)
    counts, keys = [], []
    for rank in range(2):
        stream = VideoTextStream(cfg, rank=rank, world_size=2)
        epoch1 = [all_keys(stream), all_keys(stream)]
        counts.append((len(stream), len(epoch1[0]), len(epoch1[1])))
        assert epoch1[0] != epoch1[1]  # a new epoch is a new draw
        keys.append(epoch1[0])
    # ceil(50 / (2 ranks * 2 workers * 4)) = 4 batches per worker: 8 per rank, every rank, every epoch
    assert counts == [(8, 32, 32), (8, 32, 32)]
    assert keys[0] != keys[1]


def test_resampled_mode_gives_every_rank_the_same_batch_count_despite_uneven_shards(
    demo_corpus: Path, tmp_path: Path
) -> None:
    uneven = tmp_path / "uneven"
    uneven.mkdir()
    shards = sorted((demo_corpus / "train").glob("*.tar"))
    for s in shards[:3]:
        shutil.copy(s, uneven / s.name)
    plant_corrupt_member(shards[3], uneven / shards[3].name, victim_index=0)
    (uneven / "sizes.json").write_text(json.dumps({s.name: 20 for s in shards[:4]}))
    cfg = cfg_for(uneven, resampled=True, num_workers=1, batch_size=5)
    counts = [sum(1 for _ in VideoTextStream(cfg, rank, 3)) for rank in range(3)]
    assert counts == [6, 6, 6]  # ceil(80 / (3 * 1 * 5))


def test_too_few_shards_in_epoch_mode_fails_clearly(
    demo_corpus: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multi_dist.data import pipeline

    monkeypatch.setattr(pipeline, "_WORKERS_CUT", set())  # (what earlier streams in this process said)
    few = cfg_for(demo_corpus / "val", resampled=False, num_workers=3)
    advice = r"fewer data\.num_workers, or data\.resampled=true\.$"
    with pytest.raises(
        ValueError, match=r"4 shard\(s\) cannot feed 2 rank\(s\) x 3 worker\(s\) in epoch mode: .*" + advice
    ):
        VideoTextStream(few, rank=0, world_size=2)
    # an evaluation's stream (epoch mode forced) cuts its loader workers to the shards instead: 4
    # shards feed 2 ranks x 2 workers, and every sample is read once; with fewer shards than ranks
    # it fails, advising what can change there
    with caplog.at_level(logging.WARNING, logger="multi_dist.data"):
        evaluation = [VideoTextStream(few, rank, 2, evaluation=True) for rank in (0, 1, 0)]  # (rank 0 twice)
    assert [s.num_workers for s in evaluation] == [2, 2, 2] and few.num_workers == 3
    said = [r.getMessage() for r in caplog.records if "loader worker(s)" in r.getMessage()]
    assert said == [
        f"{few.path}: 4 shard(s) feed 2 rank(s) x 2 loader worker(s), not the 3 of data.num_workers "
        "(evaluation reads every sample once: a shard per worker)"
    ]  # once, by rank 0
    evaluation = evaluation[:2]
    keys = [k for s in evaluation for batch in s for k in batch["key"]]
    assert len(keys) == len(set(keys)) == sum(json.loads((demo_corpus / "val" / "sizes.json").read_text()).values())
    with pytest.raises(
        ValueError, match=r"cannot feed 5 rank\(s\): evaluation reads every sample once.*or fewer ranks\.$"
    ):
        VideoTextStream(few, rank=0, world_size=5, evaluation=True)
    # resampled mode has no such limit
    VideoTextStream(cfg_for(demo_corpus / "val", resampled=True, num_workers=3), rank=0, world_size=2)


def test_missing_dataset_is_named(demo_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset path does not exist: .*nowhere"):
        VideoTextStream(cfg_for(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards in .*empty"):
        VideoTextStream(cfg_for(tmp_path / "empty"))
    (tmp_path / "cut").mkdir()  # a sizes.json cut short
    shutil.copy(next((demo_corpus / "val").glob("*.tar")), tmp_path / "cut")
    (tmp_path / "cut" / "sizes.json").write_text('{"00000.tar": ')
    with pytest.raises(ValueError, match=r"^.*cut/sizes\.json: not valid JSON \(Expecting value"):
        VideoTextStream(cfg_for(tmp_path / "cut"))


def test_an_epoch_with_no_full_batch_for_a_rank_fails_at_start_up(demo_corpus: Path) -> None:
    """Training in epoch mode whose share per rank is under a batch: the stream was empty and the
    loop died with a bare StopIteration at its first step."""
    cfg = cfg_for(demo_corpus / "val", resampled=False, batch_size=16)  # 40 clips: 10 per rank x worker
    with pytest.raises(ValueError, match=r"rank 1's share of an epoch holds no full batch of 16 .*data.batch_size"):
        VideoTextStream(cfg, rank=1, world_size=2, drop_last=True)
    assert len(VideoTextStream(cfg, rank=1, world_size=2)) == 2  # evaluation keeps short batches


def test_a_home_folder_in_a_brace_pattern_is_expanded(
    demo_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multi_dist.data.shardlist import list_shards

    (tmp_path / "data").symlink_to(demo_corpus / "val")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert list_shards("~/data/{00000..00001}.tar") == [str(tmp_path / "data" / f"0000{i}.tar") for i in (0, 1)]


def test_pipe_commands_outlive_the_jobs_stop_signals_without_loader_workers(demo_corpus: Path, tmp_path: Path) -> None:
    """Slurm sends USR2 (and SIGTERM) to every process of the step. With data.num_workers=0 the
    training process, whose handlers exec resets, started the ``pipe:`` commands: the signal
    ended them, and the shard being read was skipped as unreadable before the stop checkpoint."""
    import subprocess
    import sys

    script = tmp_path / "read.py"
    script.write_text(
        "import os, signal, sys, threading\n"
        "sys.path.insert(0, os.getcwd())\n"
        "from multi_dist.data.pipeline import VideoTextStream\n"
        "from tests.conftest import small_data_config\n"
        "signal.signal(signal.SIGUSR2, lambda *_: None)  # as the training loop: a handler\n"
        "signal.signal(signal.SIGTERM, lambda *_: None)\n"
        "path = f'pipe:sleep 1 && cat {sys.argv[1]}/{{00000..00001}}.tar'\n"
        "stream = VideoTextStream(small_data_config(path=path, resampled=False, num_workers=0, batch_size=5))\n"
        "def stop() -> None:\n"
        "    os.killpg(0, signal.SIGUSR2)\n"
        "    os.killpg(0, signal.SIGTERM)\n"
        "threading.Timer(0.5, stop).start()  # while the first shard's command sleeps\n"
        "keys = [k for batch in stream for k in batch['key']]\n"
        "print(len(keys), len(set(keys)), stream.totals['tar_errors'])\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(demo_corpus / "val")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # its own process group: the signals reach it and its commands only
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["20", "20", "0"], proc.stdout + proc.stderr[-3000:]


def test_a_json_that_is_not_an_object_or_a_bad_size_hint_does_not_stop_the_stream(
    demo_corpus: Path, tmp_path: Path
) -> None:
    """A sample whose json is a list is skipped and counted (it ended the loader worker); one whose
    width is not a number streams, decoded without the size hint; one with no txt and a null
    json caption is skipped as captionless (it trained on the caption "None")."""
    shard = sorted((demo_corpus / "val").glob("*.tar"))[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(shard) as tar_in, tarfile.open(bad / "00000.tar", "w") as tar_out:
        members = tar_in.getmembers()
        keys = sorted({m.name.split(".")[0] for m in members})
        for m in members:
            data = tar_in.extractfile(m).read()
            if m.name == f"{keys[1]}.json":
                data = b'["not", "an", "object"]'
            elif m.name == f"{keys[2]}.json":
                data = json.dumps({**json.loads(data), "width": [64], "height": 1e400}).encode()
            elif m.name == f"{keys[3]}.json":
                data = json.dumps({**json.loads(data), "caption": None}).encode()
            elif m.name == f"{keys[3]}.txt":
                continue
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tar_out.addfile(info, io.BytesIO(data))
    stream = VideoTextStream(cfg_for(bad, resampled=False, num_workers=1, shuffle_buffer=0))
    assert sorted(all_keys(stream)) == [k for k in keys if k not in (keys[1], keys[3])]
    assert stream.totals == {"decoded": len(keys) - 2, "skipped": 2, "tar_errors": 0}


def test_shards_that_cannot_be_read_fail_resampled_mode_instead_of_spinning(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"not a tar file\n" * 50)
    (tmp_path / "sizes.json").write_text('{"00000.tar": 4, "00001.tar": 4}')
    stream = VideoTextStream(cfg_for(tmp_path, resampled=True, num_workers=0))
    with pytest.raises(RuntimeError, match=r"1000 shard reads in a row failed with no sample between them"):
        next(iter(stream))


def test_a_restored_stream_counts_a_tar_error_before_its_position_once(demo_corpus: Path, tmp_path: Path) -> None:
    """Restoring reads the epoch again up to the saved position: the broken tar met before it was
    counted and logged then, and is not again."""
    broken = tmp_path / "broken"
    shutil.copytree(demo_corpus / "val", broken)
    (broken / "00000.tar").write_bytes(b"not a tar file\n" * 50)  # the first shard read
    cfg = cfg_for(broken, resampled=False, num_workers=0, shuffle_buffer=0, shardshuffle=False, batch_size=3)
    reference = VideoTextStream(cfg)
    keys = all_keys(reference)
    assert reference.totals["tar_errors"] == 1
    first = VideoTextStream(cfg)
    head = [k for batch in itertools.islice(first, 3) for k in batch["key"]]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["totals"]["tar_errors"] == 1  # met before the position
    resumed = VideoTextStream(cfg)
    resumed.load_state_dict(state)
    assert head + all_keys(resumed) == keys
    assert resumed.totals == reference.totals


def _batches(stream: VideoTextStream, n: int | None = None) -> list[dict]:
    out = []
    for batch in stream:
        out.append(
            {
                "key": batch["key"],
                "video": batch["video"],
                "ids": batch["input_ids"],
                "mlm": batch["mlm_input_ids"],
                "mcm": batch["mcm_input_ids"],
                "answer": batch["mcm_answer"],
            }
        )
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize(("resampled", "stop_after"), [(True, 5), (False, 3)])
def test_restoring_the_position_continues_the_uninterrupted_stream(
    demo_corpus: Path, resampled: bool, stop_after: int
) -> None:
    # random frames and crops, a shuffle buffer and 2 workers: everything that could drift
    cfg = cfg_for(
        demo_corpus / "train",
        resampled=resampled,
        epoch_samples=60,
        frame_sampling="random",
        crop="random",
        batch_size=3,
        shuffle_buffer=10,
        seed=7,
    )
    reference = VideoTextStream(cfg, rank=1, world_size=2)
    uninterrupted = _batches(reference) + _batches(reference)  # two epochs

    first = VideoTextStream(cfg, rank=1, world_size=2)
    head = _batches(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    del first
    resumed = VideoTextStream(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    tail = _batches(resumed) + _batches(resumed)

    got = head + tail
    assert [b["key"] for b in got] == [b["key"] for b in uninterrupted]
    for a, b in zip(got, uninterrupted):
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)
        for name in ("ids", "mlm", "mcm", "answer"):  # masking and questions resume alike too
            assert torch.equal(a[name], b[name]), name
    assert resumed.totals["decoded"] == reference.totals["decoded"]


def test_restoring_with_other_worker_count_is_refused(demo_corpus: Path) -> None:
    stream = VideoTextStream(cfg_for(demo_corpus / "train"))
    _batches(stream, 1)
    other = VideoTextStream(cfg_for(demo_corpus / "train", num_workers=1))
    with pytest.raises(ValueError, match="num_workers=2, this run has num_workers=1"):
        other.load_state_dict(stream.state_dict())


def test_pyav_backend_streams_the_same_clips(demo_corpus: Path) -> None:
    # at the clips' own 64 px: no resizing, which decord does while decoding and PyAV after
    base = cfg_for(demo_corpus / "val", resampled=False, num_workers=0, shuffle_buffer=0, image_size=64)
    a = next(iter(VideoTextStream(base)))
    b = next(iter(VideoTextStream(dataclasses.replace(base, decoder="pyav"))))
    assert a["key"] == b["key"]
    # the same frames, each (a one-frame shift of these slow clips is 0.03-0.08 for a frame)
    diff = (normalize_frames(a["video"]) - normalize_frames(b["video"])).abs()
    assert diff.flatten(2).mean(-1).max() < 0.01


def test_parquet_column_keeps_the_rows_the_builder_wrote(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from multi_dist.data.shardlist import parquet_column

    path = tmp_path / "00000.parquet"
    pq.write_table(
        pa.table({"caption": ["a dog", "broken", None], "status": ["success", "failed_to_decode", "success"]}), path
    )
    assert list(parquet_column(path, "caption")) == ["a dog", None]
    assert list(parquet_column(path, "answer")) == [None, None]  # a field the shards lack
    with pytest.raises(ValueError, match=r"00000\.parquet: no 'answer' column \(columns: caption, status\)"):
        list(parquet_column(path, "answer", required=True))
    plain = tmp_path / "plain.parquet"  # no status column: every row counts
    pq.write_table(pa.table({"caption": ["x", "y"]}), plain)
    assert list(parquet_column(plain, "caption")) == ["x", "y"]


def test_a_loader_worker_outlives_the_jobs_stop_signals_but_not_its_training_process(tmp_path: Path) -> None:
    """``outlive_job_signals``, as a loader worker runs it (first thing in a process forked from the
    training process, as torch's DataLoader forks): USR2, and a SIGTERM from anyone but its parent
    (Slurm signals every process of the step), leave it running, to be ended by its training
    process after the stop checkpoint; a SIGTERM from that process (the loader ending a worker
    that did not stop when asked) ends it at once, also while it sits in C code."""
    import os
    import signal
    import subprocess
    import time

    from multi_dist.data.pipeline import outlive_job_signals

    ready = tmp_path / "ready"
    pid = os.fork()
    if pid == 0:  # the worker: never back into pytest
        try:
            outlive_job_signals(0)
            ready.touch()
            time.sleep(600)  # in C, as a decoder
        finally:
            os._exit(3)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        os.kill(pid, signal.SIGUSR2)  # ignored whoever sends it
        subprocess.run(["kill", "-TERM", str(pid)], check=True)  # from another process
        time.sleep(2)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the worker died of a signal it should outlive"
        os.kill(pid, signal.SIGTERM)  # from its parent: this test, as the training process
        deadline = time.monotonic() + 30
        while (status := os.waitpid(pid, os.WNOHANG)) == (0, 0):
            assert time.monotonic() < deadline, "the worker outlived its parent's SIGTERM"
            time.sleep(0.05)
        pid = 0
        assert os.waitstatus_to_exitcode(status[1]) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
