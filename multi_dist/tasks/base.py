"""What every task shares: its config, the interface the loop and the evaluation call, reading
task fields from shards, and the evaluation driver that keeps ranks in step.

A task is four pieces, each small:

    collate(samples, tokenizer, max_len, epoch)   in the data workers: the task's batch fields
    loss(model, batch)                             the training objective (a dict with ``loss``
                                                   and ``objective``, plus per-task metrics)
    eval_step(model, batch)                        per-sample records (gathered from every rank)
    finish(records, ctx)                           metrics and predictions from all records

Task fields live in each sample's json (and the parquet beside the shards), as written by
``shards/convert.py`` and the demo corpus: ``qa`` (open-ended questions), ``mc`` or
``options``/``answer`` (multiple choice), ``captions`` (retrieval) and ``labels``.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from ..config import start_up
from ..data.pipeline import DataConfig, VideoTextStream
from ..data.shardlist import is_url, list_shards, parquet_column
from ..metrics import Progress
from ..model.multi import MuLTI

log = logging.getLogger("multi_dist.tasks")
START_UP_SHARDS = 2  # a training split without parquet files: the shards whose task fields start-up reads
TaskName = Literal["pretrain", "qa", "choice", "retrieval", "labels"]


@dataclass
class TaskConfig:
    name: TaskName = "pretrain"
    """``pretrain`` (VTC/VTM/MLM/MCM), ``qa`` (open-ended video QA), ``choice`` (multiple-choice
    QA, scored by the MCM head), ``retrieval`` (text-video, VTC + VTM re-ranking) or ``labels``
    (multi-label classification)."""
    answers: int = 1000
    """qa: the answer vocabulary is the top-K answers of the training split."""
    labels: list[str] = field(default_factory=list)
    """labels: the class names (empty: every label seen in the training split, sorted)."""
    threshold: float = 0.5
    """labels: a class is predicted when its probability is at least this."""
    prompt: str = ""
    """labels with ``model.heads.label_source: fusion``: the text fused with the video for every
    clip (empty: the sample's caption, e.g. a title)."""
    max_questions: int = 8
    """qa/choice training: at most this many of a clip's questions per step (drawn per epoch);
    evaluation always asks all of them."""
    choice_score: Literal["mcm", "mcm+vtc"] = "mcm+vtc"
    """choice: score options with the MCM head alone, or plus their VTC similarity to the clip."""
    rerank_k: int = 16
    """retrieval evaluation: re-rank each query's top-k VTC candidates with the VTM head (0: VTC only)."""

    def validate(self) -> None:
        if self.answers <= 0 or self.max_questions <= 0 or self.rerank_k < 0:
            raise ValueError("answers and max_questions must be positive, rerank_k >= 0")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels has duplicates")


@dataclass
class EvalContext:
    """What evaluation code needs to know about the process it runs in."""

    rank: int
    world: int
    device: torch.device
    bf16: bool
    batch_size: int


def item_rng(*parts: Any) -> random.Random:
    """Per-sample randomness (which questions, which caption) seeded like the pipeline's: the same
    choice whatever the number of ranks and workers, and after a resume."""
    return random.Random(":".join(str(p) for p in ("task", *parts)))


def tokenize(tokenizer: Any, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return tok["input_ids"], tok["attention_mask"]


def parse_field(value: Any, name: str, where: str) -> Any:
    """A list-valued task field (``qa``, ``mc``, ``options``, ``labels``, ``captions``) as a sample
    holds it: the json's list, or the same list written as a JSON string (a corpus built from a
    CSV file; the parquet beside the shards stores lists so). ``''`` and None are no value. The one
    reading of these fields for vocabularies, start-up checks and the workers' collates, so that
    what the vocabulary was built from is what training sees."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text[0] in "[{":
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: {name!r} is a string that is not JSON ({e.msg}): {value[:80]!r}") from None
    return value


def check_list(value: Any, name: str, where: str, example: str) -> list[Any] | None:
    """``value`` (parsed) when it is a list or absent; else an error naming the sample and the
    field, with the form expected (``example``)."""
    if value is None or isinstance(value, list):
        return value
    raise ValueError(
        f"{where}: {name!r} must be a list, e.g. {example}; got a {type(value).__name__}: {str(value)[:80]!r} "
        "(a CSV column of several values must be written as a JSON list)"
    )


def named(path: str | list[str]) -> str:
    """A split's shard sets as a message names them."""
    return path if isinstance(path, str) else ", ".join(path)


def sample_fields(
    path: str | list[str], names: tuple[str, ...], max_shards: int = 0
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, {name: value})`` of every sample of a shard set, or several, for task fields as
    stored (None where a sample lacks one); ``where`` names the shard and the sample's key. Read
    from the parquet file beside each selected local shard (fast: no tar is opened), else from the
    json members (``max_shards``: of the first shards only; 0, all). Only the selected shards are
    read: a split given as some of a folder's shards (``{00000..00007}.tar``) must not take answers
    or labels from the others."""
    if isinstance(path, list):
        for p in path:
            yield from sample_fields(p, names, max_shards)
        return
    shards = list_shards(path)
    parquets = [os.path.splitext(s)[0] + ".parquet" for s in shards]
    if not is_url(shards[0]) and all(map(os.path.isfile, parquets)):
        for shard, file in zip(shards, parquets):
            columns = [list(parquet_column(file, name)) for name in ("key", *names)]
            for key, *values in zip(*columns):
                yield f"{shard} sample {key}", dict(zip(names, values))
        return
    from webdataset import tariterators

    for sample in tariterators.tarfile_samples([{"url": u} for u in shards[: max_shards or None]]):
        meta = json.loads(sample["json"]) if "json" in sample else {}
        key = meta.get("key", sample.get("__key__"))
        yield f"{sample.get('__url__')} sample {key}", {name: meta.get(name) for name in names}


def field_values(path: str | list[str], name: str) -> Iterator[Any]:
    """Every sample's value of a list-valued task field over a shard set, or several, parsed as
    the collates parse it (:func:`parse_field`; None where a sample lacks it)."""
    for where, values in sample_fields(path, (name,)):
        yield parse_field(values[name], name, where)


class Task(abc.ABC):
    """The interface; see the module docstring. ``vocab`` is the task's state that must travel
    with the weights (QA answers, label names): saved in checkpoints and exported models."""

    name = "task"
    needs_vocab = False

    def __init__(self, cfg: TaskConfig, vocab: list[str] | None = None, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = seed
        if self.needs_vocab and not vocab:
            raise ValueError(f"task {self.name}: empty vocabulary")
        self.vocab = list(vocab or [])
        self.index = {v: i for i, v in enumerate(self.vocab)}

    # -- set-up ---------------------------------------------------------------------------------
    @classmethod
    def build_vocab(cls, cfg: TaskConfig, train_path: str | list[str]) -> list[str] | None:
        """The vocabulary from the training split, one shard set or several (tasks that need one)."""
        return None

    def heads(self) -> dict[str, int]:
        """``model.heads`` sizes this task needs."""
        return {}

    def check_data(  # noqa: B027 (pretraining reads no task field: nothing to check)
        self, path: str | list[str], split: str, training: bool, quiet: bool = False
    ) -> None:
        """At start-up, before any heavy work: an error naming the split (and the shard and sample)
        when its task fields cannot serve the task: absent from every sample, or of the wrong form;
        warnings (unless ``quiet``: ranks but the first) for what will be neither trained nor
        scored. A training split without parquet files is checked on its first shards
        (``START_UP_SHARDS``), a held-out one whole."""

    def state(self) -> dict[str, Any]:
        """What travels with the weights (``task.json``, checkpoints): the task, its vocabulary,
        and the prompt its text inputs were made with (evaluation warns when its own differs)."""
        return {"task": self.name, "vocab": self.vocab, "prompt": self.cfg.prompt}

    def data_config(self, data: DataConfig, training: bool) -> DataConfig:
        """Downstream tasks do not need MLM masks or MCM questions in their batches."""
        return dataclasses.replace(
            data, mlm_probability=0.0, mcm=dataclasses.replace(data.mcm, enabled=False), require_caption=False
        )

    def collate_fn(self, training: bool) -> TaskCollate:
        return TaskCollate(self, training)

    # -- the four pieces ------------------------------------------------------------------------
    def collate(
        self, samples: list[dict[str, Any]], tokenizer: Any, max_len: int, epoch: int, training: bool
    ) -> dict[str, Any]:
        return {}

    @abc.abstractmethod
    def loss(self, model: MuLTI, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The training objective: ``loss`` (logged), ``objective`` (backpropagated), metrics."""

    @abc.abstractmethod
    def eval_step(self, model: MuLTI, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(records gathered from every rank: one per sample with its ``key``, local state kept
        on this rank only)."""

    @abc.abstractmethod
    def finish(
        self, model: MuLTI, records: list[dict[str, Any]], local: dict[str, Any], ctx: EvalContext
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """(metrics, predictions) from the records of every rank; the same on every rank."""


class TaskCollate:
    """A task's worker-side collate (picklable: a DataLoader worker may receive it by pickle)."""

    def __init__(self, task: Task, training: bool) -> None:
        self.task, self.training = task, training

    def __call__(self, samples: list[dict[str, Any]], tokenizer: Any, max_len: int, epoch: int) -> dict[str, Any]:
        return self.task.collate(samples, tokenizer, max_len, epoch, self.training)


def zero_loss(like: torch.Tensor) -> torch.Tensor:
    """A zero that keeps the graph (every rank must run backward, even with nothing to learn)."""
    return like.float().sum() * 0.0


class EvaluationStopped(Exception):
    """An evaluation given up because a stop was asked (:func:`run_evaluation`'s ``stop``)."""


@torch.no_grad()
def run_evaluation(
    model: MuLTI,
    task: Task,
    data: DataConfig,
    ctx: EvalContext,
    max_batches: int = 0,
    key: str = "data",
    stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Evaluate ``task`` on an epoch of ``data``: every rank runs the same number of forward passes
    (ZeRO-3 gathers parameters collectively, so a rank that runs out of batches repeats its last
    one and discards the result); records are gathered, samples seen twice counted once. A
    sample is known by its key, which in a mixture of corpora is ``corpus/key``: corpora built
    apart number their samples alike (``000000``, ...), and a bare key would merge one corpus's
    samples into another's. ``stop``: asked before each batch, on every rank together (a collective
    may agree it); True gives the evaluation up with :class:`EvaluationStopped` (a training run
    asked to checkpoint and stop before its time limit)."""
    from ..evaluate import to_device

    was_training = model.training
    model.eval()
    pin = ctx.device.type == "cuda"
    collate = task.collate_fn(training=False)
    with start_up():  # missing or unfit shards, named
        source = VideoTextStream(data, ctx.rank, ctx.world, collate, pin_memory=pin, key=key, evaluation=True)
    try:  # rank 0's batches (every rank runs about as many)
        total: int | None = min(len(source), max_batches) if max_batches else len(source)
    except TypeError:  # no sizes.json: the epoch's length is unknown
        total = max_batches or None
    progress = Progress(f"evaluating {task.name} on {source.where()}", total, "batches", enabled=ctx.rank == 0)
    stream = iter(source)
    records: list[dict[str, Any]] = []
    local: dict[str, Any] = {}
    last = None
    n = 0
    while True:
        if stop is not None and stop():
            model.train(was_training)
            raise EvaluationStopped(f"evaluation on {source.where()} stopped on request after {n} batches")
        batch = next(stream, None) if not (max_batches and n >= max_batches) else None
        more = torch.tensor([batch is not None], dtype=torch.float32, device=ctx.device)
        if ctx.world > 1:
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if more.item() == 0:
            break
        n += 1
        if batch is None:
            if last is not None:
                model(to_device(last, ctx.device, ctx.bf16), task.eval_step)  # keep step with the other ranks
            else:
                raise RuntimeError(f"rank {ctx.rank} got no evaluation batch from {data.path}")
            continue
        if len(source.corpora) > 1:
            batch["key"] = [f"{c}/{k}" for c, k in zip(batch["corpus"], batch["key"])]
        last = batch
        recs, loc = model(to_device(batch, ctx.device, ctx.bf16), task.eval_step)
        progress.update()
        for r in recs:
            r["rank"] = ctx.rank
        records += recs
        for k, v in loc.items():
            local.setdefault(k, v)
    progress.close()
    parts: list[Any] = [None] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(parts, records)
    else:
        parts = [records]
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for r in part:
            merged.setdefault(r["key"], r)
    # key order: the same matrices, ties and predictions whatever the number of ranks
    merged = [merged[k] for k in sorted(merged)]
    metrics, predictions = task.finish(model, merged, local, ctx)
    model.train(was_training)
    return metrics, predictions
