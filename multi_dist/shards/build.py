"""Build webdataset shards from a table of videos (or images) and captions: video2dataset's
layout for videos, img2dataset's for images (``KEY.jpg``/``.png``/``.webp`` + ``KEY.txt`` +
``KEY.json``), so that shards built here and shards those tools wrote read alike.

Row ``i`` of the input goes to shard ``i // samples_per_shard`` under key
``{shard:05d}{index:0Nd}``, so a rerun rebuilds exactly the shards that did not finish (a shard
is finished when its ``_stats.json`` exists; tar and parquet are written under temporary names
and renamed first). Every row ends up either in a tar or, with its reason, in the shard's
parquet as a failed row; nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import datetime
import decimal
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from ..config import exit_on_startup_error, start_up
from ..data.images import IMAGE_EXTS, KEPT_FORMATS, ImageInfo, decode_image, probe_image
from ..data.video import HAVE_DECORD, VIDEO_EXTS, DecodeError, VideoInfo, decode_frames, probe
from ..threads import cpuinfo as machine_cpuinfo

# Failure statuses recorded in the parquet and stats (video2dataset uses the same field names).
SUCCESS = "success"
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
UNREADABLE_FILE = "unreadable_file"
FAILED_TO_DECODE = "failed_to_decode"
FAILED_TO_REENCODE = "failed_to_reencode"
INVALID_ROW = "invalid_row"

IMAGE_INPUT_EXTS = (*IMAGE_EXTS, "bmp", "gif", "tif", "tiff")
"""Image files a folder input picks up; formats other than JPEG, PNG and WebP are stored as PNG."""
JPEG_QUALITY = 95  # images resized by --short-side are re-encoded in their own format at this quality


class SampleError(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class BuildOptions:
    output: str
    samples_per_shard: int = 1000
    processes: int = 1
    kind: Literal["video", "image"] = "video"
    """What the rows point at: videos (``video_col``) or images (``image_col``)."""
    video_col: str = "video"
    image_col: str = "image"
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

    @property
    def path_col(self) -> str:
        """The column holding each row's media file."""
        return self.image_col if self.kind == "image" else self.video_col


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
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
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
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: unknown input format '{suffix}' (use .jsonl, .csv, .tsv or .parquet)")
    for row in rows:
        row["_base_dir"] = str(path.parent)
    return rows


def rows_from_dir(
    folder: str | Path, video_col: str = "video", caption_col: str = "caption", kind: str = "video"
) -> list[dict[str, Any]]:
    """A folder of videos (``kind="image"``: images), each with a sidecar ``.txt`` caption of the
    same stem; the file's path goes in column ``video_col`` (pass the image column for images)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder not found: {folder}")
    exts = IMAGE_INPUT_EXTS if kind == "image" else VIDEO_EXTS
    rows = []
    for media in sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in exts):
        side = media.with_suffix(".txt")
        caption = side.read_text(encoding="utf-8-sig").strip() if side.is_file() else None
        rows.append({video_col: str(media.relative_to(folder)), caption_col: caption, "_base_dir": str(folder)})
    if not rows:
        other = "images" if kind == "video" else "videos"
        hint = " (images? build them with --kind image)" if kind == "video" else ""
        raise FileNotFoundError(f"no {kind}s ({', '.join(exts)}) under {folder}{hint}; {other} are not picked up")
    return rows


# What the builder writes in each sample's json (and parquet row) itself: an input column of one
# of these names would be lost under it.
WRITTEN_FIELDS = {
    "video": ("source", "key", "status", "error_message", "duration", "fps", "num_frames", "width", "height", "bytes"),
    "image": (
        *("source", "key", "status", "error_message", "width", "height"),
        *("original_width", "original_height", "sha256", "bytes"),
    ),
}


def check_columns(rows: list[dict[str, Any]], opts: BuildOptions, source: str) -> None:
    if not rows:
        raise ValueError(f"{source}: no rows")
    taken = sorted(set(WRITTEN_FIELDS[opts.kind]) & set(rows[0]) - {opts.path_col, opts.caption_col})
    if taken:
        raise ValueError(
            f"{source}: column(s) {', '.join(repr(c) for c in taken)} would be overwritten: the builder writes "
            "fields of those names in each sample's json; rename them"
        )
    for col in (opts.path_col, opts.caption_col):
        if col not in rows[0]:
            cols = [c for c in rows[0] if not c.startswith("_")]
            flag = "--image-col" if opts.kind == "image" else "--video-col"
            raise ValueError(
                f"{source}: no column '{col}' (columns: {', '.join(cols)}); name it with {flag} / --caption-col"
            )


# ----------------------------------------------------------------------------------------------
# One sample


def _clip_window(row: dict[str, Any], opts: BuildOptions) -> tuple[float | None, float | None]:
    def num(col: str) -> float | None:
        value = row.get(col)
        if value is None or value == "":
            return None
        try:
            number = float(value)
        except (TypeError, ValueError) as err:
            raise SampleError(INVALID_ROW, f"column '{col}' is not a number: {value!r}") from err
        return None if math.isnan(number) else number  # NaN: a table's missing value

    start, end = num(opts.start_col), num(opts.end_col)
    if start is not None and end is not None and end <= start:
        raise SampleError(INVALID_ROW, f"clip end {end} is not after start {start}")
    return start, end


def _read_media(row: dict[str, Any], opts: BuildOptions) -> tuple[Path, bytes]:
    """The row's file and its bytes. Raises :class:`SampleError` (invalid_row, missing_file,
    unreadable_file, empty_file)."""
    col = opts.path_col
    raw = row.get(col)
    if not raw:
        raise SampleError(INVALID_ROW, f"empty '{col}' column")
    path = Path(str(raw)).expanduser()
    if not path.is_absolute():
        path = Path(row.get("_base_dir", ".")) / path
    try:
        if not path.is_file():
            raise SampleError(MISSING_FILE, f"no such file: {path}")
        data = path.read_bytes()
    except OSError as err:  # a name too long, no permission, an I/O error: this row only
        raise SampleError(UNREADABLE_FILE, f"cannot read {path}: {err.strerror or err}") from err
    if not data:
        raise SampleError(EMPTY_FILE, f"zero-byte file: {path}")
    return path, data


def prepare_video(row: dict[str, Any], opts: BuildOptions) -> tuple[bytes, str, VideoInfo]:
    """Read, optionally re-encode, and validate one row's video. Raises :class:`SampleError`."""
    path, data = _read_media(row, opts)
    start, end = _clip_window(row, opts)
    ext = path.suffix.lower().lstrip(".") or "mp4"
    # a container the stream does not look for (.m4v, .3gp, .ts, .flv, .mpg, ...) is made an mp4:
    # kept as it was, its sample would be skipped at every read
    if opts.reencode or start is not None or end is not None or ext not in VIDEO_EXTS:
        data = reencode(data, path, opts, start, end)
        ext = "mp4"
    try:
        info = probe(data, full_decode=True)
        if HAVE_DECORD:  # the training decoder must read it too
            decode_frames(data, 2, "uniform", backend="decord")
    except DecodeError as err:
        raise SampleError(FAILED_TO_DECODE, f"{path}: {err}") from err
    return data, ext, info


def prepare_image(row: dict[str, Any], opts: BuildOptions) -> tuple[bytes, str, ImageInfo, ImageInfo]:
    """Read, validate (a full decode, then the training decoder) and, where asked, shrink one
    row's image. JPEG, PNG and WebP bytes are stored as they are unless ``short_side`` shrinks
    them; other formats are stored as PNG. Returns (bytes, extension, stored info, original info).
    Raises :class:`SampleError`."""
    path, data = _read_media(row, opts)
    try:
        original = probe_image(data)
        decode_image(data)  # what training runs
    except DecodeError as err:
        raise SampleError(FAILED_TO_DECODE, f"{path}: {err}") from err
    ext = KEPT_FORMATS.get(original.format)
    shrink = opts.short_side is not None and min(original.width, original.height) > opts.short_side
    if ext is not None and not shrink:
        return data, ext, original, original
    ext = ext or "png"
    try:
        data = _encode_image(data, ext, opts.short_side if shrink else None)
        stored = probe_image(data)
    except (DecodeError, OSError, ValueError) as err:
        raise SampleError(FAILED_TO_REENCODE, f"{path}: {type(err).__name__}: {err}") from err
    return data, ext, stored, original


def _encode_image(data: bytes, ext: str, short_side: int | None) -> bytes:
    """Re-encode as ``ext`` (jpg, png or webp), with the shorter side scaled down to ``short_side``."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img = img.convert("RGB") if ext == "jpg" or img.mode not in ("RGB", "RGBA", "L", "LA") else img
    if short_side is not None:
        scale = short_side / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    out = io.BytesIO()
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    img.save(out, format=fmt, **({"quality": JPEG_QUALITY} if fmt in ("JPEG", "WEBP") else {}))
    return out.getvalue()


# x264's names for its instruction sets up to AVX2, and the /proc/cpuinfo flags each needs: a name
# turns on the sets x264 puts under it too (AVX2 = FMA3 | BMI2 | AVX2 in its table, BMI1 includes
# LZCNT), so each needs all of theirs (LZCNT is cpuinfo's abm, SSE3 its pni)
_SSE = {"mmx", "sse"}
_X264_NEEDS: dict[str, set[str]] = {"MMX2": _SSE, "SSE": _SSE}
for _name, _flag, _under in (
    ("SSE2", "sse2", "SSE"),
    ("SSE3", "pni", "SSE2"),
    ("SSSE3", "ssse3", "SSE3"),
    ("SSE4.1", "sse4_1", "SSSE3"),
    ("SSE4.2", "sse4_2", "SSE4.1"),
    ("AVX", "avx", "SSE4.2"),
    ("FMA3", "fma", "AVX"),
):
    _X264_NEEDS[_name] = _X264_NEEDS[_under] | {_flag}
_X264_NEEDS.update(LZCNT={"abm"}, BMI1={"abm", "bmi1"}, BMI2={"abm", "bmi1", "bmi2"})
_X264_NEEDS["AVX2"] = _X264_NEEDS["FMA3"] | _X264_NEEDS["BMI2"] | {"avx2"}


def x264_options(cpuinfo: str | None = None) -> dict[str, str]:
    """libx264 options that make its output the same bytes every time on this CPU: on a CPU with
    AVX-512, x264 is kept to its code up to AVX2. Its AVX-512 code gives other bytes from one
    encode of the same frames to the next (measured on a 2-core AMD EPYC with AVX-512, x264 core
    165 in PyAV 18.1's wheel: 2 of 40 demo clips came out in 2-4 versions over 8 encodes each, with
    ``threads=1``; none with the AVX2 code or without asm), so the demo corpus of two fresh clones
    differed (116 of 1,600 clips), and with it their runs. The set is the CPU's own up to AVX2:
    no name whose sets the CPU lacks in part. ``cpuinfo``: /proc/cpuinfo's text (where there is none: x264's
    default)."""
    line = next(
        (ln for ln in (machine_cpuinfo() if cpuinfo is None else cpuinfo).splitlines() if ln.startswith("flags")), ""
    )
    flags = set(line.partition(":")[2].split())
    if "avx512f" not in flags:
        return {}
    kept = [name for name, needs in _X264_NEEDS.items() if needs <= flags]
    return {"x264-params": "asm=" + ",".join(kept)}


def reencode(data: bytes, path: Path, opts: BuildOptions, start: float | None, end: float | None) -> bytes:
    """Re-encode to H.264 mp4: optional clip window, frame rate and shorter side."""
    import av

    try:
        src = av.open(io.BytesIO(data))
    except Exception as err:
        raise SampleError(FAILED_TO_DECODE, f"{path}: {type(err).__name__}: {err}") from err
    if not src.streams.video:
        src.close()
        raise SampleError(FAILED_TO_DECODE, f"{path}: no video stream")
    if src.format.name == "image2" or src.format.name.endswith("_pipe"):  # re-encoded, a still was a 1-frame clip
        src.close()
        raise SampleError(FAILED_TO_DECODE, f"{path}: an image ({src.format.name}), not a video")
    stream = src.streams.video[0]
    stream.thread_type = "AUTO"
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
            ostream.options = {"crf": str(opts.crf), "preset": opts.preset, "tune": "fastdecode", **x264_options()}
            t0, period, half = start or 0.0, 1 / float(rate), 0.5 / float(src_rate)
            next_t, written = t0, 0
            # times from the stream's first frame, as the window and ffmpeg's -ss count them: MPEG-TS
            # streams and cut files start at an offset, which froze the first frame that long
            origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else None
            for frame in src.decode(stream):
                if frame.time is None:
                    continue
                if origin is None:
                    origin = frame.time
                t = frame.time - origin
                if t + half < t0:
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
    """A table cell as JSON: NaN as null, numpy scalars as numbers, dates and times as ISO text,
    decimals as numbers, bytes as base64, lists and dicts cell by cell, anything else as text."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays (parquet / pandas): Python values, lists
        return _jsonable(value.tolist())
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _metadata(row: dict[str, Any], key: str, opts: BuildOptions) -> dict[str, Any]:
    meta = {k: _jsonable(v) for k, v in row.items() if not k.startswith("_")}
    meta["source"] = meta.pop(opts.path_col, None)
    caption = row.get(opts.caption_col)
    caption = str(caption).strip() if caption is not None else None  # as the txt member has it
    meta.update(key=key, caption=caption, status=SUCCESS, error_message=None)
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
    with wds.TarWriter(str(tmp_tar), mtime=0) as sink:  # the same input gives the same bytes
        for index, row in enumerate(rows):
            key = f"{name}{index:0{digits}d}"
            meta = _metadata(row, key, opts)
            try:
                caption = row.get(opts.caption_col)
                if caption is None or not str(caption).strip():
                    raise SampleError(INVALID_ROW, f"empty caption in column '{opts.caption_col}'")
                if opts.kind == "image":
                    data, ext, stored, original = prepare_image(row, opts)
                    # img2dataset's fields: the stored size, and the size before any resizing
                    meta.update(
                        width=stored.width,
                        height=stored.height,
                        original_width=original.width,
                        original_height=original.height,
                        sha256=hashlib.sha256(data).hexdigest(),
                        bytes=len(data),
                    )
                else:
                    data, ext, info = prepare_video(row, opts)
                    meta.update(
                        duration=round(info.duration, 3),
                        fps=round(info.fps, 3),
                        num_frames=info.num_frames,
                        width=info.width,
                        height=info.height,
                        bytes=len(data),
                    )
                    total_duration += info.duration
                sink.write({"__key__": key, ext: data, "txt": str(caption).strip(), "json": meta})
                total_bytes += len(data)
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
    columns = list(dict.fromkeys(k for r in records for k in r))  # Arrow takes its schema from the first row
    rows = [
        {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in ((k, r.get(k)) for k in columns)}
        for r in records
    ]
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
    # Ctrl+C reaches the whole process group: the parent stops the pool, its workers print nothing
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _shard_task(args: tuple[int, list[dict[str, Any]], BuildOptions]) -> dict[str, Any]:
    shard_id, rows, opts = args
    return build_shard(shard_id, rows, opts, progress=_progress_queue.put)


class WorkerDied(RuntimeError):
    """A build process died: the message says which shards were left and how to go on."""


def _build_in_processes(tasks: list[tuple], processes: int, progress: Any) -> list[dict[str, Any]]:
    """The shards' stats, built by a process pool. A worker that dies (killed for memory, a
    decoder's crash) fails the build with the shards it left, instead of leaving the pool waiting
    for them forever (multiprocessing.Pool replaces the worker and loses its task)."""
    ctx = mp.get_context("spawn")  # no forked copies of a threaded parent (tqdm, decoders)
    queue = ctx.Queue()
    pool = ProcessPoolExecutor(min(processes, len(tasks)), mp_context=ctx, initializer=_init_worker, initargs=(queue,))
    futures = {pool.submit(_shard_task, t): t[0] for t in tasks}
    try:
        while not all(f.done() for f in futures) or not queue.empty():
            with contextlib.suppress(queue_module.Empty):
                progress(queue.get(timeout=0.2))
        broken = sorted(shard for f, shard in futures.items() if isinstance(f.exception(), BrokenProcessPool))
        if broken:
            raise WorkerDied(
                f"a build process died (killed, out of memory, or a decoder crashed) while shard(s) "
                f"{', '.join(f'{n:05d}' for n in broken)} were unfinished; finished shards are kept: "
                "run the same command again to build the rest"
            )
        return [f.result() for f in futures]
    finally:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):  # Ctrl+C: stop the workers now
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def _fingerprint(rows: list[dict[str, Any]], opts: BuildOptions, portable: bool = True) -> str:
    """What a build folder was made from: the options and the rows. ``portable``: each row's media
    file is named by its path relative to the output folder, so that an interrupted build is
    finished from another working directory, with its input file named another way, or after the
    project (input and output together) moved. Without it, the paths as given (build.json before
    portable fingerprints, still accepted)."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(opts).items() if k not in ("output", "processes", "progress")}
    if opts.kind == "video":  # a video build's fingerprint is the one it had before image builds existed
        del settings["kind"], settings["image_col"]
    h.update(json.dumps(settings, sort_keys=True).encode())
    out = os.path.abspath(opts.output)
    for row in rows:
        if portable:
            row = dict(row)
            base = row.pop("_base_dir", ".")
            media = row.get(opts.path_col)
            if isinstance(media, str) and media:
                path = os.path.join(base, os.path.expanduser(media))  # an absolute media path stays itself
                row[opts.path_col] = os.path.relpath(os.path.abspath(path), out)
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _same_build(built: dict[str, Any], rows: list[dict[str, Any]], opts: BuildOptions, fingerprint: str) -> bool:
    """Whether build.json says the folder was made from these rows and options. A build.json from
    before portable fingerprints holds the media paths as then given: they are checked as they
    were, and as they would have been spelled from the folder's recorded place (a corpus whose
    project moved, e.g. data/demo/raw/... built into data/demo/train)."""
    previous = built.get("fingerprint")
    if previous == fingerprint or previous == _fingerprint(rows, opts, portable=False):  # (hashed only if needed)
        return True
    then = built.get("options", {}).get("output")
    if not isinstance(then, str) or then == opts.output:
        return False
    now, col = os.path.abspath(opts.output), opts.path_col
    moved = [
        {**r, col: os.path.normpath(os.path.join(then, os.path.relpath(os.path.abspath(r[col]), now)))}
        if isinstance(r.get(col), str) and r[col] and "_base_dir" not in r
        else r
        for r in rows
    ]
    return previous == _fingerprint(moved, opts, portable=False)


@contextlib.contextmanager
def _kept_interrupts() -> Any:
    """Ctrl+C as usual, and remembered: the list it yields holds what the SIGINT handler raised
    (KeyboardInterrupt under Python's default handler). Python drops an exception raised inside a
    finaliser ("Exception ignored in"), and a Ctrl+C that lands in decord's ``VideoReader.__del__``
    was lost so: the build went on to the end (seen in the test suite). The build checks the list
    after each video and raises what it holds.

    The handler in place (Python's, or a caller's own) still runs first and decides: only an
    exception it raises is kept; a caller's handler that does not raise (a graceful stop of its
    own) leaves the build running. Ray Tune's ``tune.run`` used to leave its handler behind, so a
    Python-level handler other than the default is to be expected here."""
    import threading

    received: list[BaseException] = []
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield received  # not ours to change: a thread, or SIGINT ignored or set outside Python
        return

    def handler(signum: int, frame: Any) -> None:
        try:
            previous(signum, frame)
        except BaseException as err:
            received.append(err)
            raise

    signal.signal(signal.SIGINT, handler)
    try:
        yield received
    finally:
        if signal.getsignal(signal.SIGINT) is handler:  # (a handler that put back its own, as Tune's does, stays)
            signal.signal(signal.SIGINT, previous)


def build(rows: list[dict[str, Any]], opts: BuildOptions) -> dict[str, Any]:
    """Build (or finish building) the dataset in ``opts.output``; returns the summary. Wrong
    options, or a folder built from other rows, raise a ``ValueError`` (a start-up error:
    :func:`~multi_dist.config.start_up`) before any shard is written."""
    with start_up():
        if opts.samples_per_shard <= 0:
            raise ValueError(f"--samples-per-shard must be positive, got {opts.samples_per_shard}")
        out = Path(opts.output)
        out.mkdir(parents=True, exist_ok=True)
        fingerprint = _fingerprint(rows, opts)
        marker = out / "build.json"
        if marker.is_file() and not _same_build(json.loads(marker.read_text()), rows, opts, fingerprint):
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
    # the bar is closed before an interrupt's message is printed (not whenever it is collected)
    with bar, _kept_interrupts() as interrupted:

        def progress(n: int = 1) -> None:
            bar.update(n)
            if interrupted:  # a Ctrl+C that a finaliser swallowed (see _kept_interrupts)
                raise interrupted[0].with_traceback(None)  # (its old frames, the finaliser's, go)

        if opts.processes <= 1 or len(tasks) <= 1:
            for task in tasks:
                stats[task[0]] = build_shard(*task, progress=progress)
        else:
            for s in _build_in_processes(tasks, opts.processes, progress):
                stats[int(s["shard"].split(".")[0])] = s

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
        "kind": opts.kind,
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
    kind = summary.get("kind", "video")
    minutes = f", {summary['video_duration_s'] / 60:.1f} min of video" if kind == "video" else ""
    return (
        f"{summary['output']}: {summary['written']}/{summary['rows']} {kind}s written in "
        f"{summary['shards']} shard(s) ({summary['bytes'] / 1e6:.1f} MB{minutes}; {summary['shards_resumed']} "
        f"shard(s) already done); failed: {failed}; {summary['seconds']} s"
    )


def add_writing_options(p: argparse.ArgumentParser) -> None:
    """How shards are written: shared by ``shards/build.py`` and ``shards/convert.py``."""
    p.add_argument("--output", required=True, help="dataset folder to write (or finish writing)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--fps", type=float, help="re-encode to this frame rate (e.g. 4)")
    p.add_argument("--short-side", type=int, help="re-encode with this shorter side (e.g. 224; images: shrink only)")
    p.add_argument("--crf", type=int, default=23, help="x264 quality when re-encoding")
    p.add_argument("--no-progress", action="store_true")


def writing_options(args: argparse.Namespace, **fields: Any) -> BuildOptions:
    """:class:`BuildOptions` from :func:`add_writing_options`' arguments (plus ``fields``)."""
    return BuildOptions(
        output=args.output,
        samples_per_shard=args.samples_per_shard,
        processes=args.processes,
        fps=args.fps,
        short_side=args.short_side,
        crf=args.crf,
        progress=not args.no_progress,
        **fields,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="shards/build.py")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="JSONL, CSV/TSV or Parquet with a video (or image) path and a caption per row")
    src.add_argument("--input-dir", help="folder of videos (or images), each with a sidecar .txt caption")
    p.add_argument(
        "--kind",
        choices=["video", "image"],
        default="video",
        help="image: the rows (or the folder) hold images; written in img2dataset's layout",
    )
    add_writing_options(p)
    p.add_argument("--video-col", default="video")
    p.add_argument("--image-col", default="image", help="the image path column (--kind image)")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--start-col", default="start", help="clip start seconds (optional column)")
    p.add_argument("--end-col", default="end", help="clip end seconds (optional column)")
    args = p.parse_args(argv)
    opts = writing_options(
        args,
        kind=args.kind,
        video_col=args.video_col,
        image_col=args.image_col,
        caption_col=args.caption_col,
        start_col=args.start_col,
        end_col=args.end_col,
    )
    try:
        with exit_on_startup_error():  # bad input: 'error: MESSAGE' alone
            with start_up():
                if args.input:
                    rows = read_rows(args.input)
                    check_columns(rows, opts, args.input)
                else:
                    rows = rows_from_dir(args.input_dir, opts.path_col, opts.caption_col, opts.kind)
            summary = build(rows, opts)  # (its own start-up checks are marked too)
    except KeyboardInterrupt:  # finished shards are kept (their _stats.json): a rerun builds the rest
        sys.exit("interrupted; run the same command again to resume")
    except WorkerDied as err:
        sys.exit(f"error: {err}")
    print(format_summary(summary))
    return summary
