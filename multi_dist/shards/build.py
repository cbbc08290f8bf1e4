"""Build video2dataset-compatible webdataset shards from a table of videos and captions.

Row ``i`` of the input goes to shard ``i // samples_per_shard`` under key
``{shard:05d}{index:0Nd}``, so a rerun rebuilds exactly the shards that did not finish (a shard
is finished when its ``_stats.json`` exists; tar and parquet are written under temporary names
and renamed first). Every row ends up either in a tar or, with its reason, in the shard's
parquet as a failed row; nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..data.video import HAVE_DECORD, VIDEO_EXTS, DecodeError, VideoInfo, decode_frames, probe

# Failure statuses recorded in the parquet and stats (video2dataset uses the same field names).
SUCCESS = "success"
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
FAILED_TO_DECODE = "failed_to_decode"
FAILED_TO_REENCODE = "failed_to_reencode"
INVALID_ROW = "invalid_row"


class SampleError(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class BuildOptions:
    output: str
    samples_per_shard: int = 1000
    processes: int = 1
    video_col: str = "video"
    caption_col: str = "caption"
    start_col: str = "start"
    end_col: str = "end"
    fps: float | None = None
    short_side: int | None = None
    crf: int = 23
    preset: str = "veryfast"
    progress: bool = True

    @property
    def reencode(self) -> bool:
        return self.fps is not None or self.short_side is not None


# ----------------------------------------------------------------------------------------------
# Input


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL, CSV or Parquet file; relative video paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON: {err}") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object per line")
            rows.append(row)
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: unknown input format '{suffix}' (use .jsonl, .csv, .tsv or .parquet)")
    for row in rows:
        row["_base_dir"] = str(path.parent)
    return rows


def rows_from_dir(folder: str | Path, video_col: str = "video", caption_col: str = "caption") -> list[dict[str, Any]]:
    """A folder of videos, each with a sidecar ``.txt`` caption of the same stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder not found: {folder}")
    rows = []
    for video in sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in VIDEO_EXTS):
        side = video.with_suffix(".txt")
        caption = side.read_text().strip() if side.is_file() else None
        rows.append({video_col: str(video), caption_col: caption, "_base_dir": str(folder)})
    if not rows:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTS)}) under {folder}")
    return rows


def check_columns(rows: list[dict[str, Any]], opts: BuildOptions, source: str) -> None:
    if not rows:
        raise ValueError(f"{source}: no rows")
    for col in (opts.video_col, opts.caption_col):
        if col not in rows[0]:
            cols = [c for c in rows[0] if not c.startswith("_")]
            raise ValueError(
                f"{source}: no column '{col}' (columns: {', '.join(cols)}); name it with --video-col / --caption-col"
            )


# ----------------------------------------------------------------------------------------------
# One sample


def _clip_window(row: dict[str, Any], opts: BuildOptions) -> tuple[float | None, float | None]:
    def num(col: str) -> float | None:
        value = row.get(col)
        if value is None or value == "":
            return None
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise SampleError(INVALID_ROW, f"column '{col}' is not a number: {value!r}") from err

    start, end = num(opts.start_col), num(opts.end_col)
    if start is not None and end is not None and end <= start:
        raise SampleError(INVALID_ROW, f"clip end {end} is not after start {start}")
    return start, end


def prepare_video(row: dict[str, Any], opts: BuildOptions) -> tuple[bytes, str, VideoInfo]:
    """Read, optionally re-encode, and validate one row's video. Raises :class:`SampleError`."""
    raw = row.get(opts.video_col)
    if not raw:
        raise SampleError(INVALID_ROW, f"empty '{opts.video_col}' column")
    path = Path(str(raw)).expanduser()
    if not path.is_absolute():
        path = Path(row.get("_base_dir", ".")) / path
    if not path.is_file():
        raise SampleError(MISSING_FILE, f"no such file: {path}")
    data = path.read_bytes()
    if not data:
        raise SampleError(EMPTY_FILE, f"zero-byte file: {path}")
    start, end = _clip_window(row, opts)
    ext = path.suffix.lower().lstrip(".") or "mp4"
    if opts.reencode or start is not None or end is not None:
        data = reencode(data, path, opts, start, end)
        ext = "mp4"
    try:
        info = probe(data, full_decode=True)
        if HAVE_DECORD:  # the training decoder must read it too
            decode_frames(data, 2, "uniform", backend="decord")
    except DecodeError as err:
        raise SampleError(FAILED_TO_DECODE, f"{path}: {err}") from err
    return data, ext, info


def reencode(data: bytes, path: Path, opts: BuildOptions, start: float | None, end: float | None) -> bytes:
    """Re-encode to H.264 mp4: optional clip window, frame rate and shorter side."""
    import av

    try:
        src = av.open(io.BytesIO(data))
        stream = src.streams.video[0]
        stream.thread_type = "AUTO"
    except Exception as err:
        raise SampleError(FAILED_TO_DECODE, f"{path}: {type(err).__name__}: {err}") from err
    try:
        w, h = stream.codec_context.width, stream.codec_context.height
        if opts.short_side and min(w, h) > opts.short_side:
            scale = opts.short_side / min(w, h)
            w, h = round(w * scale), round(h * scale)
        w, h = w - w % 2, h - h % 2  # yuv420p needs even sides
        src_rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        rate = Fraction(opts.fps).limit_denominator(1000) if opts.fps else Fraction(src_rate)
        out_buf = io.BytesIO()
        with av.open(out_buf, "w", format="mp4") as out:
            ostream = out.add_stream("libx264", rate=rate)
            ostream.width, ostream.height, ostream.pix_fmt = w, h, "yuv420p"
            # fastdecode (no CABAC, no deblocking) about halves training-time decode cost for ~10% more bytes
            ostream.options = {"crf": str(opts.crf), "preset": opts.preset, "tune": "fastdecode"}
            t0, period, half = start or 0.0, 1 / float(rate), 0.5 / float(src_rate)
            next_t, written = t0, 0
            for frame in src.decode(stream):
                t = frame.time
                if t is None or t + half < t0:
                    continue
                if end is not None and t >= end:
                    break
                # the frame stands for [t - half, t + half): emit it once per output tick inside
                # that span (drops frames to lower the rate, repeats them to raise it)
                while next_t < t + half and (end is None or next_t < end):
                    img = frame.reformat(width=w, height=h, format="yuv420p")
                    img.pts, img.time_base = written, 1 / rate
                    out.mux(ostream.encode(img))
                    written += 1
                    next_t = t0 + written * period
            out.mux(ostream.encode(None))
        src.close()
    except SampleError:
        raise
    except Exception as err:
        raise SampleError(FAILED_TO_DECODE, f"{path}: {type(err).__name__}: {err}") from err
    if written == 0:
        raise SampleError(FAILED_TO_REENCODE, f"{path}: no frames in the clip window [{start}, {end}]")
    return out_buf.getvalue()


# ----------------------------------------------------------------------------------------------
# One shard


def _key_digits(samples_per_shard: int) -> int:
    return max(1, math.ceil(math.log10(samples_per_shard)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):  # numpy scalars from parquet / pandas
        return value.item()
    return value


def _metadata(row: dict[str, Any], key: str, opts: BuildOptions) -> dict[str, Any]:
    meta = {k: _jsonable(v) for k, v in row.items() if not k.startswith("_")}
    meta["source"] = meta.pop(opts.video_col, None)
    meta.update(key=key, caption=row.get(opts.caption_col), status=SUCCESS, error_message=None)
    return meta


def build_shard(shard_id: int, rows: list[dict[str, Any]], opts: BuildOptions, progress: Any = None) -> dict[str, Any]:
    """Write ``{shard_id:05d}.tar``, its ``.parquet`` and ``_stats.json``; returns the stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    out = Path(opts.output)
    name = f"{shard_id:05d}"
    digits = _key_digits(opts.samples_per_shard)
    t_start = time.time()
    records: list[dict[str, Any]] = []
    statuses: Counter[str] = Counter()
    total_bytes, total_duration = 0, 0.0
    tmp_tar = out / f"{name}.tar.tmp"
    with wds.TarWriter(str(tmp_tar)) as sink:
        for index, row in enumerate(rows):
            key = f"{name}{index:0{digits}d}"
            meta = _metadata(row, key, opts)
            try:
                caption = row.get(opts.caption_col)
                if caption is None or not str(caption).strip():
                    raise SampleError(INVALID_ROW, f"empty caption in column '{opts.caption_col}'")
                data, ext, info = prepare_video(row, opts)
                meta.update(
                    duration=round(info.duration, 3),
                    fps=round(info.fps, 3),
                    num_frames=info.num_frames,
                    width=info.width,
                    height=info.height,
                    bytes=len(data),
                )
                sink.write({"__key__": key, ext: data, "txt": str(caption).strip(), "json": meta})
                total_bytes += len(data)
                total_duration += info.duration
            except SampleError as err:
                meta.update(status=err.status, error_message=str(err))
            statuses[meta["status"]] += 1
            records.append(meta)
            if progress is not None:
                progress(1)
    successes = statuses.pop(SUCCESS, 0)
    pq.write_table(pa.Table.from_pylist(_parquet_rows(records)), out / f"{name}.parquet.tmp")
    stats = {
        "shard": f"{name}.tar",
        "count": len(rows),
        "successes": successes,
        "failed": dict(statuses),
        "status_dict": {SUCCESS: successes, **statuses},
        "bytes": total_bytes,
        "video_duration_s": round(total_duration, 3),
        "start_time": t_start,
        "end_time": time.time(),
    }
    os.replace(out / f"{name}.parquet.tmp", out / f"{name}.parquet")
    os.replace(tmp_tar, out / f"{name}.tar")
    _write_json_atomic(out / f"{name}_stats.json", stats)  # last: marks the shard finished
    return stats


def _parquet_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that Arrow can type: nested values as JSON text, and a column whose values mix types
    (e.g. ids that are sometimes numbers, sometimes names) as text throughout."""
    rows = [{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in records]
    columns = {k for r in rows for k in r}
    for col in columns:
        kinds = {type(r[col]) for r in rows if r.get(col) is not None}
        if len(kinds) > 1 and kinds != {int, float}:
            for r in rows:
                if r.get(col) is not None:
                    r[col] = str(r[col])
    return rows


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The dataset

_progress_queue: Any = None


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _shard_task(args: tuple[int, list[dict[str, Any]], BuildOptions]) -> dict[str, Any]:
    shard_id, rows, opts = args
    return build_shard(shard_id, rows, opts, progress=_progress_queue.put)


def _fingerprint(rows: list[dict[str, Any]], opts: BuildOptions) -> str:
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(opts).items() if k not in ("output", "processes", "progress")}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()


def build(rows: list[dict[str, Any]], opts: BuildOptions) -> dict[str, Any]:
    """Build (or finish building) the dataset in ``opts.output``; returns the summary."""
    if opts.samples_per_shard <= 0:
        raise ValueError(f"--samples-per-shard must be positive, got {opts.samples_per_shard}")
    out = Path(opts.output)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(rows, opts)
    marker = out / "build.json"
    if marker.is_file():
        previous = json.loads(marker.read_text()).get("fingerprint")
        if previous != fingerprint:
            raise ValueError(
                f"{out} was built from a different input or options; "
                "build into a new folder (or delete this one) to start over"
            )
    _write_json_atomic(marker, {"fingerprint": fingerprint, "rows": len(rows), "options": asdict(opts)})

    n_shards = math.ceil(len(rows) / opts.samples_per_shard)
    tasks, stats = [], {}
    for shard_id in range(n_shards):
        chunk = rows[shard_id * opts.samples_per_shard : (shard_id + 1) * opts.samples_per_shard]
        done = out / f"{shard_id:05d}_stats.json"
        if done.is_file():
            stats[shard_id] = json.loads(done.read_text())
        else:
            tasks.append((shard_id, chunk, opts))
    resumed = len(stats)
    todo_rows = sum(len(t[1]) for t in tasks)
    bar = tqdm(
        total=todo_rows,
        desc=f"building {out.name}",
        unit="video",
        disable=not opts.progress,
        file=sys.stderr,
        mininterval=1.0,
    )
    t0 = time.time()
    if opts.processes <= 1 or len(tasks) <= 1:
        for task in tasks:
            stats[task[0]] = build_shard(*task, progress=bar.update)
    else:
        ctx = mp.get_context("spawn")  # no forked copies of a threaded parent (tqdm, decoders)
        queue = ctx.Queue()
        with ctx.Pool(min(opts.processes, len(tasks)), initializer=_init_worker, initargs=(queue,)) as pool:
            pending = pool.map_async(_shard_task, tasks, chunksize=1)
            while not pending.ready() or not queue.empty():
                with contextlib.suppress(queue_module.Empty):
                    bar.update(queue.get(timeout=0.2))
            for s in pending.get():
                stats[int(s["shard"].split(".")[0])] = s
    bar.close()

    sizes = {s["shard"]: s["successes"] for _, s in sorted(stats.items()) if s["successes"] > 0}
    for shard_id, s in stats.items():  # a shard where every row failed keeps no tar
        if s["successes"] == 0:
            (out / f"{shard_id:05d}.tar").unlink(missing_ok=True)
    _write_json_atomic(out / "sizes.json", sizes)
    failed: Counter[str] = Counter()
    for s in stats.values():
        failed.update(s["failed"])
    summary = {
        "output": str(out),
        "rows": len(rows),
        "written": sum(s["successes"] for s in stats.values()),
        "failed": dict(failed),
        "shards": len(sizes),
        "shards_resumed": resumed,
        "bytes": sum(s["bytes"] for s in stats.values()),
        "video_duration_s": round(sum(s["video_duration_s"] for s in stats.values()), 3),
        "seconds": round(time.time() - t0, 2),
    }
    _write_json_atomic(out / "summary.json", summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    failed = ", ".join(f"{k}: {v}" for k, v in sorted(summary["failed"].items())) or "none"
    return (
        f"{summary['output']}: {summary['written']}/{summary['rows']} videos written in "
        f"{summary['shards']} shard(s) ({summary['bytes'] / 1e6:.1f} MB, "
        f"{summary['video_duration_s'] / 60:.1f} min of video; {summary['shards_resumed']} shard(s) "
        f"already done); failed: {failed}; {summary['seconds']} s"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="shards/build.py")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="JSONL, CSV/TSV or Parquet with a video path and a caption per row")
    src.add_argument("--input-dir", help="folder of videos, each with a sidecar .txt caption")
    p.add_argument("--output", required=True, help="dataset folder to write (or finish writing)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--video-col", default="video")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--start-col", default="start", help="clip start seconds (optional column)")
    p.add_argument("--end-col", default="end", help="clip end seconds (optional column)")
    p.add_argument("--fps", type=float, help="re-encode to this frame rate (e.g. 4)")
    p.add_argument("--short-side", type=int, help="re-encode with this shorter side (e.g. 224)")
    p.add_argument("--crf", type=int, default=23, help="x264 quality when re-encoding")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    opts = BuildOptions(
        output=args.output,
        samples_per_shard=args.samples_per_shard,
        processes=args.processes,
        video_col=args.video_col,
        caption_col=args.caption_col,
        start_col=args.start_col,
        end_col=args.end_col,
        fps=args.fps,
        short_side=args.short_side,
        crf=args.crf,
        progress=not args.no_progress,
    )
    if args.input:
        rows = read_rows(args.input)
        check_columns(rows, opts, args.input)
    else:
        rows = rows_from_dir(args.input_dir, opts.video_col, opts.caption_col)
    summary = build(rows, opts)
    print(format_summary(summary))
    return summary
