from __future__ import annotations

import csv
import datetime
import decimal
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multi_dist.data.video import probe
from multi_dist.shards.build import BuildOptions, build, read_rows
from multi_dist.shards.demo import clip_spec, encode_mp4, render_frames

from .conftest import ROOT, run_script


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def parquet_rows(folder: Path) -> list[dict]:
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def faststart_mp4(path: Path, frames: int = 48) -> Path:
    """An mp4 with its index (moov) first: truncating it leaves a file that opens but is short."""
    img = render_frames(clip_spec("fixture", 1), frames, 64)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        s = out.add_stream("libx264", rate=8)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for im in img:
            out.mux(s.encode(av.VideoFrame.from_ndarray(im, format="rgb24")))
        out.mux(s.encode(None))
    return path


@pytest.fixture()
def mixed_input(tmp_path: Path, real_clips: dict[str, Path]) -> Path:
    """Real clips, synthetic clips, and every kind of bad file, listed in a JSONL manifest."""
    vids = tmp_path / "videos"
    vids.mkdir()
    rows = []
    for name, path in real_clips.items():
        shutil.copy(path, vids / name)
        rows.append({"video": f"videos/{name}", "caption": f"real clip {name}", "source_id": name})
    for i in range(3):
        (vids / f"syn{i}.mp4").write_bytes(encode_mp4(render_frames(clip_spec("fixture", i))))
        rows.append({"video": f"videos/syn{i}.mp4", "caption": f"synthetic {i}", "source_id": i})
    (vids / "zero.mp4").write_bytes(b"")
    (vids / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    bikes = real_clips["bikes.mp4"].read_bytes()
    (vids / "truncated.mp4").write_bytes(bikes[: len(bikes) // 2])  # index at the end: cannot open
    fast = faststart_mp4(tmp_path / "fast.mp4").read_bytes()
    (vids / "truncated_faststart.mp4").write_bytes(fast[: int(len(fast) * 0.6)])  # opens, then runs out
    bad = {
        "missing.mp4": "missing_file",
        "zero.mp4": "empty_file",
        "text.mp4": "failed_to_decode",
        "truncated.mp4": "failed_to_decode",
        "truncated_faststart.mp4": "failed_to_decode",
    }
    for i, name in enumerate(bad):
        rows.insert(2 * i + 1, {"video": f"videos/{name}", "caption": f"bad {name}", "source_id": name})
    rows.append({"video": "videos/syn0.mp4", "caption": "", "source_id": "no caption"})
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "expected.json").write_text(json.dumps({**bad, "syn0.mp4#nocaption": "invalid_row"}))
    return manifest


def test_every_row_is_written_or_recorded_as_failed(mixed_input: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    summary = build(read_rows(mixed_input), BuildOptions(output=str(out), samples_per_shard=4, progress=False))
    rows = parquet_rows(out)
    assert len(rows) == 13 == summary["rows"]
    status = {r["source_id"]: r["status"] for r in rows}
    assert status["missing.mp4"] == "missing_file"
    assert status["zero.mp4"] == "empty_file"
    assert status["text.mp4"] == "failed_to_decode"
    assert status["truncated.mp4"] == "failed_to_decode"
    assert status["truncated_faststart.mp4"] == "failed_to_decode"
    assert status["no caption"] == "invalid_row"
    assert summary["written"] == 7 and sum(summary["failed"].values()) == 6
    failed = [r for r in rows if r["status"] != "success"]
    assert all(r["error_message"] for r in failed)
    assert "truncated" in next(r for r in failed if r["source_id"] == "truncated_faststart.mp4")["error_message"]

    # the tars hold exactly the successes, each decodable, with txt + json beside the video
    sizes = json.loads((out / "sizes.json").read_text())
    in_tars: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        members = tar_members(shard)
        keys = {name.split(".")[0] for name in members}
        assert sizes[shard.name] == len(keys)
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            assert meta["key"] == key and meta["status"] == "success" and meta["error_message"] is None
            assert members[f"{key}.txt"].decode() == meta["caption"]
            info = probe(members[f"{key}.mp4"])
            assert (info.width, info.height) == (meta["width"], meta["height"])
            in_tars[key] = meta
    assert sorted(in_tars) == sorted(r["key"] for r in rows if r["status"] == "success")
    assert all(r["key"] not in in_tars for r in failed)
    # keys are shard id (5 digits) + index in the shard (video2dataset's layout)
    assert sorted(r["key"] for r in rows)[:5] == ["000000", "000001", "000002", "000003", "000010"]
    # extra columns travel in json; the 720p clip's metadata is measured, not guessed
    bbb = next(m for m in in_tars.values() if m["source_id"] == "bigbuckbunny.mp4")
    assert (bbb["width"], bbb["height"], bbb["fps"]) == (1280, 720, 25.0) and bbb["duration"] > 5
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == 4 and stats["successes"] + sum(stats["failed"].values()) == 4


def test_reencoding_sets_fps_short_side_and_clip_window(tmp_path: Path, real_clips: dict[str, Path]) -> None:
    rows = [
        {"video": str(real_clips["bigbuckbunny.mp4"]), "caption": "bunny"},
        {"video": str(real_clips["bikes.mp4"]), "caption": "bikes, seconds 2 to 5", "start": 2.0, "end": 5.0},
        {"video": str(real_clips["bikes.mp4"]), "caption": "bad window", "start": 5.0, "end": 2.0},
    ]
    out = tmp_path / "re"
    summary = build(rows, BuildOptions(output=str(out), fps=4, short_side=224, progress=False))
    assert summary["written"] == 2 and summary["failed"] == {"invalid_row": 1}
    metas = {
        json.loads(v)["caption"]: json.loads(v)
        for k, v in tar_members(out / "00000.tar").items()
        if k.endswith(".json")
    }
    bunny, bikes = metas["bunny"], metas["bikes, seconds 2 to 5"]
    assert (bunny["width"], bunny["height"]) == (398, 224)
    assert bunny["fps"] == 4.0 and bunny["num_frames"] == pytest.approx(5.28 * 4, abs=1.5)
    assert bikes["height"] == 224 and bikes["fps"] == 4.0
    assert bikes["num_frames"] == 12 and bikes["duration"] == pytest.approx(3.0)


def test_x264_writes_the_same_bytes_for_the_same_frames(tmp_path: Path) -> None:
    """Encoding is reproducible: the demo's clips and the builder's re-encodes come out the same
    bytes every time. On a CPU with AVX-512 x264's AVX-512 code did not (2 of 40 demo clips came out
    in 2-4 versions over 8 encodes, measured); there x264 is kept to its code up to AVX2, and asked
    for no set that the CPU lacks in part (a name turns on the sets x264 puts under it)."""
    import av.logging

    from multi_dist.shards.build import reencode, x264_options
    from multi_dist.threads import cpuinfo

    assert x264_options("flags\t\t: fpu mmx sse sse2 pni ssse3 avx avx2 fma bmi1 bmi2 abm") == {}  # no AVX-512
    zen4 = "processor\t: 0\nflags\t\t: fpu mmx sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma bmi1 bmi2 abm avx512f\n"
    up_to_fma3 = "MMX2,SSE,SSE2,SSE3,SSSE3,SSE4.1,SSE4.2,AVX,FMA3"
    assert x264_options(zen4) == {"x264-params": f"asm={up_to_fma3},LZCNT,BMI1,BMI2,AVX2"}
    no_bmi = zen4.replace(" bmi1 bmi2", "")  # (a VM that hides flags): no BMI1, nor AVX2, which turns BMI2 on
    assert x264_options(no_bmi) == {"x264-params": f"asm={up_to_fma3},LZCNT"}

    # x264 takes the list (it only logs a name it does not know, and goes on without any asm):
    # this CPU's own flags as if it had AVX-512 give its sets up to AVX2, and no AVX-512
    options = x264_options(cpuinfo().replace("flags\t\t:", "flags\t\t: avx512f", 1))
    level = av.logging.get_level()
    av.logging.set_level(av.logging.INFO)
    try:
        with av.logging.Capture() as logs, av.open(io.BytesIO(), "w", format="mp4") as out:
            s = out.add_stream("libx264", rate=8)
            s.width = s.height = 64
            s.pix_fmt, s.options = "yuv420p", options
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")))
            out.mux(s.encode(None))
    finally:
        av.logging.set_level(level)
    messages = [m for _, name, m in logs if name == "libx264"]
    assert not [m for m in messages if "rror" in m], messages
    caps = next(m for m in messages if m.startswith("using cpu capabilities:")).split(":")[1].split()
    assert "AVX512" not in caps and ("AVX2" in caps) == ("avx2" in cpuinfo().split()), caps

    clips = [encode_mp4(render_frames(clip_spec("train", i))) for i in range(24)]
    for i, clip in enumerate(clips):
        again = {encode_mp4(render_frames(clip_spec("train", i))) for _ in range(5)}
        assert again == {clip}, f"clip {i}: {len(again | {clip})} versions"
    path = tmp_path / "clip.mp4"
    path.write_bytes(clips[8])  # (one that came out in 4 versions on AVX-512)
    opts = BuildOptions(output=str(tmp_path), fps=6, short_side=48, progress=False)
    assert len({reencode(clips[8], path, opts, None, None) for _ in range(8)}) == 1


def offset_clip(path: Path, fmt: str, offset_s: float, frames: int = 16, rate: int = 8) -> Path:
    """A clip whose first frame is shown at ``offset_s`` (as MPEG-TS files and stream-copied cuts
    start); frame i is a flat grey of brightness 15 i."""
    with av.open(str(path), "w", format=fmt) as out:
        s = out.add_stream("libx264", rate=rate)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 15 * i, np.uint8), format="rgb24")
            frame.pts = i + round(offset_s * rate)
            out.mux(s.encode(frame))
        out.mux(s.encode(None))
    return path


def brightness(mp4: bytes) -> list[int]:
    with av.open(io.BytesIO(mp4)) as c:
        return [round(float(f.to_ndarray(format="rgb24")[..., 0].mean())) for f in c.decode(video=0)]


def test_reencoding_counts_time_from_the_first_frame_of_a_stream_that_starts_late(tmp_path: Path) -> None:
    """A 2 s clip at 8 fps whose stream starts at 3 s (MPEG-TS and Matroska): at 4 fps it is 8
    frames (0, 30, 60, ...), not 3 s of its first frame held, and the window [0.5, 1.5) is its
    frames 4 to 11, counted from its first frame as ffmpeg's -ss counts."""
    for fmt, ext in (("mpegts", "ts"), ("matroska", "mkv")):
        src = offset_clip(tmp_path / f"late.{ext}", fmt, 3.0)
        rows = [
            {"video": str(src), "caption": "all"},
            {"video": str(src), "caption": "window", "start": 0.5, "end": 1.5},
            {"video": str(src), "caption": "no window", "start": float("nan"), "end": float("nan")},
        ]
        out = tmp_path / f"out_{ext}"
        summary = build(rows, BuildOptions(output=str(out), fps=4, progress=False))
        assert summary["written"] == 3 and summary["failed"] == {}, summary
        members = tar_members(out / "00000.tar")
        by_caption = {members[k].decode(): k[: -len(".txt")] for k in members if k.endswith(".txt")}
        seen = {caption: brightness(members[f"{key}.mp4"]) for caption, key in by_caption.items()}
        for caption in ("all", "no window"):  # NaN: a table's missing value, not a window
            assert seen[caption] == pytest.approx([30 * i for i in range(8)], abs=3), (ext, caption)
        assert seen["window"] == pytest.approx([60, 90, 120, 150], abs=3), ext  # frames 4, 6, 8, 10 at 4 fps


def test_a_container_the_stream_does_not_read_by_name_is_made_an_mp4(tmp_path: Path) -> None:
    """.ts (and .m4v, .3gp, .flv, ...) rows are re-encoded to mp4: written as they were, the stream
    looks for mp4/webm/mkv/avi/mov members and skipped every one of them."""
    from multi_dist.data.pipeline import VideoTextStream

    from .conftest import small_data_config

    shutil.copy(offset_clip(tmp_path / "a.ts", "mpegts", 0.0), tmp_path / "b.m4v")
    rows = [{"video": str(tmp_path / name), "caption": f"clip {name}"} for name in ("a.ts", "b.m4v")]
    out = tmp_path / "out"
    assert build(rows, BuildOptions(output=str(out), progress=False))["written"] == 2
    videos = [k for k in tar_members(out / "00000.tar") if not k.endswith((".json", ".txt"))]
    assert len(videos) == 2 and all(k.endswith(".mp4") for k in videos), videos
    stream = VideoTextStream(small_data_config(path=str(out), resampled=False, batch_size=2, num_workers=1))
    assert [len(b["key"]) for b in stream] == [2] and stream.totals["skipped"] == 0


def test_a_still_image_named_like_a_video_is_not_a_video_when_reencoding(tmp_path: Path) -> None:
    """Kept as it was, a PNG named .mp4 failed to decode; re-encoded (--fps), it became a one-frame
    'video'. Both ways now it is failed_to_decode, named."""
    from PIL import Image

    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(tmp_path / "still.png", format="PNG")
    shutil.copy(tmp_path / "still.png", tmp_path / "still.mp4")
    rows = [{"video": str(tmp_path / "still.mp4"), "caption": "a still"}]
    for name, opts in (("as_is", {}), ("reencoded", {"fps": 4})):
        out = tmp_path / name
        assert build(rows, BuildOptions(output=str(out), progress=False, **opts))["failed"] == {"failed_to_decode": 1}
    (row,) = parquet_rows(tmp_path / "reencoded")
    assert row["error_message"].endswith("still.mp4: an image (png_pipe), not a video")


def test_extra_columns_of_any_parquet_type_are_kept_in_the_json(tmp_path: Path, real_clips: dict[str, Path]) -> None:
    """Timestamps, dates, decimals, bytes and lists from a Parquet table: kept as JSON (the build
    stopped on the first timestamp, leaving a .tar.tmp)."""
    clip = str(real_clips["bikes.mp4"])
    when = datetime.datetime(2026, 11, 27, 21, 30, tzinfo=datetime.timezone.utc)
    record = {"video": clip, "caption": "bikes", "shot_at": when, "day": when.date(), "price": decimal.Decimal("1.25")}
    record.update(raw=b"\x00\x01", tags=["a", "b"], scores=[0.5, float("nan")])
    pq.write_table(pa.Table.from_pylist([record]), tmp_path / "in.parquet")
    out = tmp_path / "out"
    assert build(read_rows(tmp_path / "in.parquet"), BuildOptions(output=str(out), progress=False))["written"] == 1
    (meta,) = [json.loads(v) for k, v in tar_members(out / "00000.tar").items() if k.endswith(".json")]
    assert meta["shot_at"] == "2026-11-27T21:30:00+00:00" and meta["day"] == "2026-11-27"
    assert meta["price"] == 1.25 and meta["raw"] == "AAE=" and meta["tags"] == ["a", "b"]
    assert meta["scores"] == [0.5, None]


def test_resume_rebuilds_only_unfinished_shards(mixed_input: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    rows = read_rows(mixed_input)
    opts = BuildOptions(output=str(out), samples_per_shard=4, progress=False)
    first = build(rows, opts)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "00001_stats.json").unlink()  # as if the run was killed while writing shard 1
    (out / "00001.tar").unlink()
    again = build(rows, opts)
    # 13 rows in 4 shards (the last holds only the caption-less row, so it keeps no tar): 3 resumed
    assert again["shards_resumed"] == 3
    assert again["written"] == first["written"] and again["failed"] == first["failed"]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert after["00000.tar"] == before["00000.tar"]  # untouched
    assert "00001.tar" in after
    with pytest.raises(ValueError, match="built from a different input"):
        build(rows[:-1], opts)


def test_parallel_build_matches_serial(mixed_input: Path, tmp_path: Path) -> None:
    rows = read_rows(mixed_input)
    build(rows, BuildOptions(output=str(tmp_path / "a"), samples_per_shard=3, processes=1, progress=False))
    build(rows, BuildOptions(output=str(tmp_path / "b"), samples_per_shard=3, processes=2, progress=False))

    def view(folder: Path) -> list:
        return sorted((r["key"], r["status"], r["caption"]) for r in parquet_rows(folder))

    assert view(tmp_path / "a") == view(tmp_path / "b")
    assert (tmp_path / "a" / "sizes.json").read_text() == (tmp_path / "b" / "sizes.json").read_text()


def test_csv_and_parquet_inputs_with_named_columns(tmp_path: Path, real_clips: dict[str, Path]) -> None:
    records = [{"path": str(p), "text": f"clip {n}", "label": n} for n, p in real_clips.items()]
    with (tmp_path / "in.csv").open("w", newline="", encoding="utf-8-sig") as f:  # a byte-order mark, as Excel writes
        writer = csv.DictWriter(f, fieldnames=["path", "text", "label"])
        writer.writeheader()
        writer.writerows(records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in.parquet")
    for name in ("in.csv", "in.parquet"):
        out = tmp_path / f"out_{name}"
        summary = build(
            read_rows(tmp_path / name),
            BuildOptions(output=str(out), video_col="path", caption_col="text", progress=False),
        )
        assert summary["written"] == 4
        assert sorted(r["label"] for r in parquet_rows(out)) == sorted(real_clips)


def test_cli_input_dir_with_sidecar_captions(tmp_path: Path, real_clips: dict[str, Path]) -> None:
    src = tmp_path / "folder"
    src.mkdir()
    for name, path in real_clips.items():
        shutil.copy(path, src / name)
        if name != "bikes.mp4":
            (src / name).with_suffix(".txt").write_text(f"caption of {name}\n", encoding="utf-8-sig")
    out = tmp_path / "out"
    # relative to the working directory, as a user types it: the folder was joined to paths that held it
    relative = [os.path.relpath(src, ROOT), "--output", os.path.relpath(out, ROOT)]
    proc = run_script("shards/build.py", "--input-dir", *relative, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "3/4 videos written" in proc.stdout and "invalid_row: 1" in proc.stdout
    again = run_script("shards/build.py", "--input-dir", str(src), "--output", str(out), "--no-progress")
    assert again.returncode == 0 and "1 shard(s) already done" in again.stdout, again.stderr  # named otherwise
    rows = {Path(r["source"]).name: r for r in parquet_rows(out)}
    assert rows["bikes.mp4"]["status"] == "invalid_row"
    assert rows["carphone_pristine.mp4"]["caption"] == "caption of carphone_pristine.mp4"


def test_a_failed_first_row_or_an_unreadable_file_loses_nothing(tmp_path: Path, real_clips: dict[str, Path]) -> None:
    """A shard whose first row failed had a parquet without the measured columns (Arrow took the
    schema from that row); a file name too long for the file system stopped the whole build, at
    every rerun. Captions are written as the txt member has them, in the json too."""
    clip = str(real_clips["bikes.mp4"])
    rows = [
        {"video": str(tmp_path / "missing.mp4"), "caption": "gone"},
        {"video": str(tmp_path / ("x" * 300 + ".mp4")), "caption": "too long a name"},
        {"video": clip, "caption": "  bikes on a street \n", "extra": 1},
    ]
    out = tmp_path / "out"
    summary = build(rows, BuildOptions(output=str(out), progress=False))
    assert summary["written"] == 1 and summary["failed"] == {"missing_file": 1, "unreadable_file": 1}
    table = pq.read_table(out / "00000.parquet")
    assert {"duration", "fps", "num_frames", "width", "height", "bytes", "extra"} <= set(table.column_names)
    by_status = {r["status"]: r for r in table.to_pylist()}
    assert by_status["success"]["width"] == 640 and by_status["missing_file"]["width"] is None
    assert "File name too long" in by_status["unreadable_file"]["error_message"]
    members = tar_members(out / "00000.tar")
    (meta,) = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert meta["caption"] == "bikes on a street" == next(v for k, v in members.items() if k.endswith(".txt")).decode()
    with tarfile.open(out / "00000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}  # the same bytes for the same input


def test_a_folder_built_elsewhere_resumes_where_it_is(tmp_path: Path, real_clips: dict[str, Path]) -> None:
    """An interrupted build finished from another working directory, or after the project (input
    and output) moved, or from a build.json of before portable fingerprints (the paths as then
    given, e.g. data/demo/raw/... into data/demo/train)."""
    from multi_dist.shards.build import _fingerprint

    project = tmp_path / "project"
    (project / "raw").mkdir(parents=True)
    for name, path in real_clips.items():
        shutil.copy(path, project / "raw" / name)
    opts = BuildOptions(output=str(project / "out"), samples_per_shard=2, progress=False)
    rows = [{"video": str(project / "raw" / n), "caption": n} for n in sorted(real_clips)]
    build(rows, opts)
    (project / "out" / "00001_stats.json").unlink()  # killed while writing shard 1
    moved = tmp_path / "moved"
    project.rename(moved)
    opts = BuildOptions(output=str(moved / "out"), samples_per_shard=2, progress=False)
    rows = [{"video": str(moved / "raw" / n), "caption": n} for n in sorted(real_clips)]
    assert build(rows, opts)["shards_resumed"] == 1
    # an old build.json: the rows' paths as given then, relative to where that command ran
    old_rows = [{"video": f"project/raw/{n}", "caption": n} for n in sorted(real_clips)]
    old_opts = BuildOptions(output="project/out", samples_per_shard=2, progress=False)
    marker = json.loads((moved / "out" / "build.json").read_text())
    marker.update(fingerprint=_fingerprint(old_rows, old_opts, portable=False), options={"output": "project/out"})
    (moved / "out" / "build.json").write_text(json.dumps(marker))
    assert build(rows, opts)["shards_resumed"] == 2
    with pytest.raises(ValueError, match="built from a different input"):
        build(rows[:-1], opts)


def test_a_build_process_that_dies_fails_the_build_instead_of_hanging(
    tmp_path: Path, real_clips: dict[str, Path]
) -> None:
    """A worker killed (the kernel's OOM killer, a decoder's crash) mid-shard: multiprocessing.Pool
    replaced it and waited forever for its shard. Now one error line names the shards left, and
    the rerun builds them."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    clip = real_clips["bikes.mp4"]
    rows = [{"video": str(clip), "caption": f"clip {i}"} for i in range(40)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "shards/build.py", "--input", str(tmp_path / "in.jsonl"), "--output", str(out)]
    cmd += ["--samples-per-shard", "2", "--processes", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob("*_stats.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    workers = [c for c in psutil.Process(proc.pid).children() if "resource_tracker" not in " ".join(c.cmdline())]
    assert workers and proc.poll() is None
    os.kill(workers[0].pid, signal.SIGKILL)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    assert stderr.startswith("error: a build process died") and "Traceback" not in stderr, stderr[-3000:]
    assert "run the same command again" in stderr
    again = run_script(*cmd[1:])
    assert again.returncode == 0 and "40/40 videos written" in again.stdout, again.stderr[-3000:]


def test_cli_names_the_missing_column(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps({"file": "a.mp4", "caption": "x"}) + "\n")
    proc = run_script("shards/build.py", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "no column 'video'" in proc.stderr and "--video-col" in proc.stderr


def test_cli_bad_input_is_one_error_line(tmp_path: Path) -> None:
    """A missing file or folder, a missing column or a bad option: ``error: ...`` naming it (the
    message ``sys.exit`` prints, without a traceback), before anything is written."""
    from multi_dist.shards.build import main

    manifest = tmp_path / "in.jsonl"
    manifest.write_text(json.dumps({"video": "a.mp4", "caption": "x"}) + "\n")
    clashing = tmp_path / "clash.jsonl"  # a dataset's name in 'source', a resolution in 'width'
    clashing.write_text(json.dumps({"video": "a.mp4", "caption": "x", "source": "youtube", "width": 1}) + "\n")
    out = ["--output", str(tmp_path / "out")]
    cases = {
        f"error: {clashing}: column(s) 'source', 'width' would be overwritten": ["--input", str(clashing)],
        "error: input file not found: ": ["--input", str(tmp_path / "nope.jsonl")],
        "error: input folder not found: ": ["--input-dir", str(tmp_path / "nodir")],
        f"error: {manifest}: no column 'captions'": ["--input", str(manifest), "--caption-col", "captions"],
        "error: --samples-per-shard must be positive, got 0": ["--input", str(manifest), "--samples-per-shard", "0"],
    }
    for message, argv in cases.items():
        with pytest.raises(SystemExit) as exc:
            main([*argv, *out])
        assert str(exc.value.code).startswith(message), (argv, exc.value.code)
    assert not (tmp_path / "out").exists()


def test_ctrl_c_stops_the_build_in_a_line_and_the_rerun_resumes(tmp_path: Path, real_clips: dict[str, Path]) -> None:
    """Ctrl+C (SIGINT to the terminal's process group) once the first shard is done: one line
    saying how to go on, no traceback; the same command again keeps the finished shards and
    writes the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    clip = real_clips["carphone_distorted.mp4"]  # 7 kB: 40 rows build in about 2 s
    rows = [{"video": str(clip), "caption": f"clip {i}"} for i in range(40)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "shards/build.py", "--input", str(tmp_path / "in.jsonl"), "--output", str(out)]
    cmd += ["--samples-per-shard", "2"]  # (one process: a pool's workers take seconds to start)
    proc = subprocess.Popen(
        cmd,
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job ignores it
    )
    deadline = time.time() + 60
    while not (out / "00000_stats.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.rstrip().endswith("\ninterrupted; run the same command again to resume"), stderr[-500:]
    done = len(list(out.glob("*_stats.json")))
    assert 1 <= done < 20 and stdout == ""
    again = run_script(*cmd[1:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "40/40 videos written in 20 shard(s)" in again.stdout
    assert f"{done} shard(s) already done" in again.stdout


# ----------------------------------------------------------------------------------------------
# Image-text shards (img2dataset's layout)


@pytest.fixture()
def image_input(tmp_path: Path) -> Path:
    """Real photos as jpg, png, webp and gif, and every kind of bad image file, in a JSONL manifest."""
    from PIL import Image

    from .test_mixing import sklearn_photos

    imgs = tmp_path / "images"
    imgs.mkdir()
    photos = sklearn_photos()
    china, flower = photos["china.jpg"], photos["flower.jpg"]
    shutil.copy(china, imgs / "china.jpg")
    Image.open(flower).save(imgs / "flower.png")
    Image.open(china).crop((100, 100, 260, 220)).save(imgs / "roof.webp")
    Image.open(flower).crop((200, 100, 360, 260)).save(imgs / "petal.gif")
    (imgs / "zero.jpg").write_bytes(b"")
    (imgs / "text.jpg").write_text("this is a text file, not an image\n" * 20)
    data = china.read_bytes()
    (imgs / "truncated.jpg").write_bytes(data[: len(data) // 2])  # a download cut half-way
    rows = [
        {"image": "images/china.jpg", "caption": "a chinese temple", "source_id": "china"},
        {"image": "images/missing.jpg", "caption": "gone", "source_id": "missing"},
        {"image": "images/flower.png", "caption": "a pink flower", "source_id": "flower"},
        {"image": "images/zero.jpg", "caption": "empty", "source_id": "zero"},
        {"image": "images/roof.webp", "caption": "a temple roof", "source_id": "roof"},
        {"image": "images/text.jpg", "caption": "not an image", "source_id": "text"},
        {"image": "images/petal.gif", "caption": "a petal", "source_id": "petal"},
        {"image": "images/truncated.jpg", "caption": "cut", "source_id": "truncated"},
        {"image": "images/china.jpg", "caption": "  ", "source_id": "no caption"},
        {"image": "", "caption": "no file", "source_id": "no image"},
    ]
    manifest = tmp_path / "images.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return manifest


def test_image_rows_are_written_as_img2dataset_shards_or_recorded_as_failed(image_input: Path, tmp_path: Path) -> None:
    from multi_dist.data.images import decode_image, probe_image

    out = tmp_path / "cc"
    summary = build(
        read_rows(image_input), BuildOptions(output=str(out), kind="image", samples_per_shard=4, progress=False)
    )
    rows = parquet_rows(out)
    assert len(rows) == 10 == summary["rows"] and summary["kind"] == "image"
    status = {r["source_id"]: r["status"] for r in rows}
    assert status == {
        "china": "success",
        "missing": "missing_file",
        "flower": "success",
        "zero": "empty_file",
        "roof": "success",
        "text": "failed_to_decode",
        "petal": "success",
        "truncated": "failed_to_decode",
        "no caption": "invalid_row",
        "no image": "invalid_row",
    }
    assert summary["written"] == 4 and summary["failed"] == {
        "missing_file": 1,
        "empty_file": 1,
        "failed_to_decode": 2,
        "invalid_row": 2,
    }
    assert all(r["error_message"] for r in rows if r["status"] != "success")
    assert "truncated" in next(r for r in rows if r["source_id"] == "truncated")["error_message"]

    # KEY.<image ext> + KEY.txt + KEY.json per sample; jpg/png/webp kept byte for byte, gif stored as png
    sizes = json.loads((out / "sizes.json").read_text())
    exts, originals = {}, {"china": "china.jpg", "flower": "flower.png", "roof": "roof.webp"}
    for shard in sorted(out.glob("*.tar")):
        tar = tar_members(shard)
        keys = {name.split(".")[0] for name in tar}
        assert sizes[shard.name] == len(keys)
        for key in keys:
            meta = json.loads(tar[f"{key}.json"])
            (ext,) = {n.split(".", 1)[1] for n in tar if n.startswith(key)} - {"txt", "json"}
            data = tar[f"{key}.{ext}"]
            exts[meta["source_id"]] = ext
            assert meta["key"] == key and meta["status"] == "success" and meta["error_message"] is None
            assert tar[f"{key}.txt"].decode() == meta["caption"]
            info = probe_image(data)
            assert (info.width, info.height) == (meta["width"], meta["height"])
            assert (meta["original_width"], meta["original_height"]) == (meta["width"], meta["height"])
            assert decode_image(data).shape == (1, meta["height"], meta["width"], 3)
            assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["bytes"] == len(data)
            if meta["source_id"] in originals:
                assert data == (image_input.parent / "images" / originals[meta["source_id"]]).read_bytes()
    assert exts == {"china": "jpg", "flower": "png", "roof": "webp", "petal": "png"}
    china = next(r for r in rows if r["source_id"] == "china")
    assert (china["width"], china["height"]) == (640, 427) and china["source"] == "images/china.jpg"
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == 4 and stats["successes"] == 2 and stats["failed"] == {"missing_file": 1, "empty_file": 1}


def test_images_shrink_to_the_short_side_and_keep_their_original_size(image_input: Path, tmp_path: Path) -> None:
    rows = [r for r in read_rows(image_input) if r["source_id"] in ("china", "roof")]
    out = tmp_path / "small"
    build(rows, BuildOptions(output=str(out), kind="image", short_side=96, progress=False))
    metas = {
        json.loads(v)["source_id"]: (k, json.loads(v))
        for k, v in tar_members(out / "00000.tar").items()
        if k.endswith(".json")
    }
    china, roof = metas["china"][1], metas["roof"][1]
    assert (china["width"], china["height"], china["original_width"], china["original_height"]) == (144, 96, 640, 427)
    assert (roof["width"], roof["height"]) == (128, 96)  # 160x120 crop, shrunk
    assert {k.split(".")[1] for k in tar_members(out / "00000.tar")} == {"jpg", "webp", "txt", "json"}


def test_cli_builds_images_from_a_folder_with_sidecar_captions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from multi_dist.shards.build import main, rows_from_dir

    from .test_mixing import photo_folder

    src = photo_folder(tmp_path / "photos", crops=3)
    (src / "flower_2.txt").unlink()  # one image without a caption
    out = tmp_path / "out"
    summary = main(["--input-dir", str(src), "--kind", "image", "--output", str(out), "--no-progress"])
    assert "7/8 images written" in capsys.readouterr().out and summary["failed"] == {"invalid_row": 1}
    rows = {Path(r["source"]).name: r for r in parquet_rows(out)}
    assert rows["flower_2.webp"]["status"] == "invalid_row"
    assert rows["china_1.png"]["caption"].startswith("a close view of")
    with pytest.raises(FileNotFoundError, match=r"no videos .* \(images\? build them with --kind image\)"):
        rows_from_dir(src)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed interrupt
def test_a_ctrl_c_that_a_finaliser_swallows_is_still_seen() -> None:
    """Python drops an exception raised inside ``__del__``; a Ctrl+C that landed in decord's
    ``VideoReader.__del__`` was lost so, and the build ran on to its end (seen once in the suite).
    Under ``_kept_interrupts`` the build sees it all the same, whichever Python handler is in place
    (CI once ran this after a Ray Tune sweep had left Tune's handler installed), and the handler in
    place is back after."""
    import os
    import signal

    from multi_dist.shards.build import _kept_interrupts

    class Finalised:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # its handler runs here, inside the finaliser
            for _ in range(1000):
                pass

    class Stop(Exception):
        pass

    def stop(signum: int, frame: object) -> None:
        raise Stop

    graceful: list[int] = []
    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with _kept_interrupts() as interrupted:
            Finalised()  # dropped at once: the KeyboardInterrupt goes no further than __del__
            assert [type(e) for e in interrupted] == [KeyboardInterrupt]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        signal.signal(signal.SIGINT, stop)  # a caller's handler that raises: its exception is kept
        with _kept_interrupts() as interrupted:
            Finalised()
            assert [type(e) for e in interrupted] == [Stop]
        assert signal.getsignal(signal.SIGINT) is stop

        signal.signal(signal.SIGINT, lambda signum, frame: graceful.append(signum))  # one that does not
        with _kept_interrupts() as interrupted:
            Finalised()
            assert interrupted == [] and graceful == [signal.SIGINT]

        def tune_like(signum: int, frame: object) -> None:  # stops gracefully, puts back the one it found
            graceful.append(signum)
            signal.signal(signal.SIGINT, signal.default_int_handler)

        signal.signal(signal.SIGINT, tune_like)
        with _kept_interrupts() as interrupted:
            Finalised()
            assert interrupted == [] and graceful == [signal.SIGINT] * 2
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not tune_like again
    finally:
        signal.signal(signal.SIGINT, before)
