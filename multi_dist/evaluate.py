"""Evaluation: a task's metrics on a held-out split, during training (every ``eval_every`` steps
and at the end) and as its own command, ``launch/evaluate.py``, on a training checkpoint or an
exported model folder.

Every rank evaluates its share of the split; records are gathered and the metrics computed from
all of them, so 1 and N processes give the same numbers. A report is written per task and per
checkpoint: ``{out_dir}/{task}-{tag}.json`` (metrics, what was evaluated, where) and, beside it,
the predictions (QA, multiple choice, labels) or the rankings (retrieval) as JSON lines.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from .config import start_up
from .data.pipeline import DataConfig
from .model.multi import _TIED, MuLTI, read_config
from .tasks import EvalContext, Task, TaskConfig, make_task, run_evaluation, task_class

log = logging.getLogger("multi_dist.evaluate")
TASK_FILE = "task.json"  # beside exported weights: the task and its vocabulary (QA answers, label names)


def to_device(batch: dict[str, Any], device: torch.device, bf16: bool) -> dict[str, Any]:
    """Tensors to ``device`` (floating ones in bf16 when training in bf16); lists stay as they are.

    The indices that the step would otherwise find with ``nonzero`` on the device (a wait for the
    GPU each time: the count decides a shape) are found here, on the host: ``frame_index`` (the
    real frames of ``frame_mask``) and ``mlm_index`` (the masked positions of ``mlm_labels``)."""
    from .model.encoders import mask_index

    batch = dict(batch)
    if isinstance(batch.get("frame_mask"), torch.Tensor) and batch["frame_mask"].device.type == "cpu":
        batch["frame_index"] = mask_index(batch["frame_mask"].bool())
    if isinstance(batch.get("mlm_labels"), torch.Tensor) and batch["mlm_labels"].device.type == "cpu":
        batch["mlm_index"] = mask_index(batch["mlm_labels"].ne(-100))
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if bf16 and v.is_floating_point():
                v = v.to(torch.bfloat16)
        out[k] = v
    return out


def eval_data_config(data: DataConfig) -> DataConfig:
    """Every sample exactly once, the same frames and crops every time."""
    corpora = [dataclasses.replace(c, frame_sampling="uniform" if c.frame_sampling else None) for c in data.corpora]
    return dataclasses.replace(
        data,
        corpora=corpora,
        resampled=False,
        frame_sampling="uniform",
        crop="center",
        shardshuffle=False,
        shuffle_buffer=0,
    )


def evaluate_task(
    model: MuLTI,
    task: Task,
    data: DataConfig,
    ctx: EvalContext,
    max_batches: int = 0,
    key: str = "data",
    stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``key``: the config section ``data`` came from (``val`` during training), for its messages;
    ``stop``: see :func:`~multi_dist.tasks.base.run_evaluation`."""
    data = task.data_config(eval_data_config(data), training=False)
    return run_evaluation(model, task, data, ctx, max_batches, key, stop)


def scalars(metrics: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The loggable part of a report: finite numbers, prefixed (per-class tables stay in the report)."""
    return {
        f"{prefix}{k}": float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def write_report(
    out_dir: str | Path,
    task: str,
    tag: str,
    metrics: dict[str, Any],
    predictions: list[dict[str, Any]],
    info: dict[str, Any],
) -> Path:
    """``{out_dir}/{task}-{tag}.json`` and its predictions (``.predictions.jsonl``; retrieval:
    ``.rankings.jsonl``), each written whole under a temporary name, then renamed. A report there
    of other weights or other data (two runs' ``step_00000500``, say) is kept: this one's name
    then ends with a hash of its ``init`` and ``data`` (``{task}-{tag}-{hash}.json``); the same
    evaluation again replaces its own."""
    import hashlib

    from .checkpoint import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{task}-{tag}"
    if (out / f"{stem}.json").is_file():
        try:
            there = json.loads((out / f"{stem}.json").read_text())
        except ValueError:
            there = {}
        if (there.get("init"), there.get("data")) != (info.get("init"), info.get("data")):
            what = json.dumps([info.get("init"), info.get("data")]).encode()
            stem = f"{stem}-{hashlib.sha1(what).hexdigest()[:8]}"
    kind = "rankings" if task == "retrieval" else "predictions"
    pred_file = out / f"{stem}.{kind}.jsonl"
    atomic_write(pred_file, "".join(json.dumps(p) + "\n" for p in predictions))
    report = out / f"{stem}.json"
    atomic_write(
        report, json.dumps({"task": task, "tag": tag, **info, "metrics": metrics, kind: pred_file.name}, indent=1)
    )
    return report


# ----------------------------------------------------------------------------------------------
# What to evaluate: a checkpoint or an exported model


@dataclass
class Source:
    kind: Literal["model", "checkpoint"]
    folder: Path
    tag: str


def resolve(path: str | Path) -> Source:
    """An exported model folder, a checkpoint (``RUN/checkpoints/step_N``), a checkpoints folder
    or a run folder (their latest complete checkpoint, else the run's exported ``model/``)."""
    from . import checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"init: {p} does not exist")
    if (p / "model.safetensors").is_file():
        return Source("model", p, p.parent.name + "-model" if p.name == "model" else p.name)
    if (p / checkpoint.COMPLETE).is_file():
        return Source("checkpoint", p, p.name)
    for ckpts in (p, p / "checkpoints"):
        if (ckpts / checkpoint.LATEST).is_file():
            tag = checkpoint.latest_tag(ckpts)
            return Source("checkpoint", ckpts / tag, tag)
    if (p / "model" / "model.safetensors").is_file():
        return resolve(p / "model")
    raise FileNotFoundError(
        f"init: {p} is neither a model folder (model.safetensors), a checkpoint (trainer.json) nor a run "
        "or checkpoints folder with a 'latest' checkpoint"
    )


def trained_tokenizer(src: Source) -> str | None:
    """The tokenizer ``src``'s weights were trained with: an export's own (saved beside its
    weights), or a checkpoint run's ``data.tokenizer`` where that loads from here (a packaged
    model, or a folder that exists); None where neither is known (a hub name is not fetched)."""
    from . import checkpoint
    from .data.text import PACKAGED_MODELS, ships_tokenizer

    if src.kind == "model":
        return str(src.folder) if ships_tokenizer(src.folder) else None
    config = checkpoint.read_trainer(src.folder.parent, src.folder.name).get("config") or {}
    name = (config.get("data") or {}).get("tokenizer") or ""
    return name if name in PACKAGED_MODELS or (name and Path(name).expanduser().is_dir()) else None


def check_tokenizer_ids(model: MuLTI, splits: dict[str, DataConfig], encoder: str) -> None:
    """Each split's tokenizer gives only ids that ``model``'s text encoder embeds (``encoder``:
    whose encoder, for the message). A larger one trained or evaluated until a caption held such a
    token, then failed inside an embedding lookup, naming no setting."""
    from .data.text import load_tokenizer

    rows = model.text.word_embeddings.num_embeddings
    for split, data in splits.items():
        tokenizer = load_tokenizer(data.tokenizer, f"{split}.tokenizer")
        top = max(max(tokenizer.get_vocab().values(), default=-1), len(tokenizer) - 1)
        if top >= rows:
            raise ValueError(
                f"{split}.tokenizer: tokenizer '{data.tokenizer}' gives ids up to {top}, but {encoder} text encoder "
                f"embeds {rows}: ids from {rows} on have no embedding; use the encoder's own tokenizer"
            )


def check_tokenizers(src: Source, splits: dict[str, DataConfig | None]) -> None:
    """Each split's tokenizer gives the token ids ``src`` was trained with (see
    :func:`multi_dist.data.text.check_same_vocabulary`); unchecked where that is not known."""
    from .data.text import check_same_vocabulary

    trained = trained_tokenizer(src)
    for split, data in splits.items():
        if trained is not None and data is not None and data.tokenizer != trained:
            check_same_vocabulary(data.tokenizer, f"{split}.tokenizer", trained, f"init {src.folder}")


def source_task(src: Source) -> dict[str, Any] | None:
    """The task the weights were trained for, with its vocabulary (None for pretrained weights)."""
    if src.kind == "model":
        f = src.folder / TASK_FILE
        return json.loads(f.read_text()) if f.is_file() else None
    from .checkpoint import COMPLETE

    return json.loads((src.folder / COMPLETE).read_text()).get("task")


def source_weights(src: Source) -> dict[str, torch.Tensor]:
    """fp32 weights: safetensors of an export, or DeepSpeed's own consolidation of a (ZeRO)
    checkpoint, which works whatever the number of ranks that wrote it."""
    if src.kind == "model":
        from safetensors.torch import load_file

        return load_file(str(src.folder / "model.safetensors"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(src.folder.parent), tag=src.tag)


TASK_HEADS = ("qa_head.", "label_head.")  # a downstream task's own head: its outputs mean its vocabulary


def load_weights(model: MuLTI, state: dict[str, torch.Tensor], origin: str, new_heads: bool = False) -> None:
    """Strict, except for the tied MLM decoder and, when finetuning (``new_heads``), the heads the
    task adds: anything else missing or unexpected, or of another shape, is an error naming the
    parameters."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # sizes that differ: torch's message names each parameter, a line each
        lines = [line.strip() for line in str(err).splitlines()[1:]] or [str(err)]
        raise ValueError(f"{origin} does not fit the model: {'; '.join(lines)}") from None
    allowed = set(_TIED)
    if new_heads:
        allowed |= {k for k in missing if k.startswith(TASK_HEADS)}
        unexpected = [k for k in unexpected if not k.startswith(TASK_HEADS)]
    if set(missing) - allowed or unexpected:
        raise ValueError(
            f"{origin} does not fit the model: missing {sorted(set(missing) - allowed)}, "
            f"unexpected {sorted(unexpected)}"
        )


# ----------------------------------------------------------------------------------------------
# The evaluate command


@dataclass
class EvalConfig:
    init: str = ""
    """What to evaluate: an exported model folder, a checkpoint (``RUN/checkpoints/step_N``), or a
    run folder (its latest checkpoint)."""
    out_dir: str = "runs/eval"
    """Reports go to ``{out_dir}/{task}-{tag}.json`` (tag: the checkpoint's, e.g. step_00000200)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """The split to evaluate (read once, in order; ``data.batch_size`` per rank)."""
    max_batches: int = 0
    """Cap on batches per rank (0: the whole split)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = 0

    def validate(self) -> None:
        if not self.init:
            raise ValueError("init: set the checkpoint, run or model folder to evaluate")
        if not (self.data.path or self.data.corpora):
            raise ValueError("data.path: set the shards of the split to evaluate")
        if self.max_batches < 0:
            raise ValueError("max_batches must be >= 0")


def check_clips_fit(model: Any, data: DataConfig, split: str, whose: str = "") -> None:
    """Clips the model (a ``ModelConfig``; ``whose``: 'init X' when it is an init's) can take: no
    more frames than its max_frames, and frames of its vision encoder's image_size where its arch
    states one (a ViT or CLIP takes no other size: the run failed at its first forward)."""
    for i, corpus in enumerate(data.corpus_configs()):
        if corpus.num_frames > model.max_frames:
            where = f"{split}.corpora[{i}]" if data.corpora else split
            limit = f"the max_frames={model.max_frames} of {whose}" if whose else f"model.max_frames={model.max_frames}"
            raise ValueError(f"{where}.num_frames={corpus.num_frames} exceeds {limit}")
    size = model.vision.arch.get("image_size")
    if size is not None and data.image_size != size:
        encoder = f"{whose}'s vision encoder" if whose else "model.vision.arch"
        raise ValueError(f"{split}.image_size={data.image_size} does not match the image_size={size} of {encoder}")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.init`` on ``cfg.data`` for ``cfg.task``; returns the metrics (every rank) and
    writes the report (rank 0)."""
    from . import dist as distributed

    info = distributed.init()
    device = distributed.device(info)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    with start_up():  # a missing init, weights not finetuned for the task: named, before any work
        src = resolve(cfg.init)
        trained = source_task(src)
        vocab = None
        if task_class(cfg.task.name).needs_vocab:
            if not trained or trained.get("task") != cfg.task.name:
                found = trained.get("task") if trained else "none"
                raise ValueError(f"init: {src.folder} was not finetuned for task {cfg.task.name!r} (it was: {found})")
            vocab = trained["vocab"]
        if (
            info.rank == 0
            and trained
            and trained.get("task") == cfg.task.name
            and trained.get("prompt", "") != cfg.task.prompt
        ):
            log.warning(
                "task.prompt is %r here, but %s was trained with %r: the text fused with each clip is not "
                "what it learned from (set task.prompt as in training)",
                cfg.task.prompt,
                src.folder,
                trained.get("prompt", ""),
            )
        task = make_task(cfg.task, vocab, cfg.seed)
        task.check_data([c.path for c in cfg.data.corpus_configs()], "data", training=False, quiet=info.rank > 0)
        arch = read_config(src.folder)
        check_clips_fit(arch, cfg.data, "data", f"init {src.folder}")
        check_tokenizers(src, {"data": cfg.data})
        model = MuLTI(arch)
        check_tokenizer_ids(model, {"data": cfg.data}, f"init {src.folder}'s")  # (where its own is unknown)
        load_weights(model, source_weights(src), str(src.folder))
    model.to(device)
    if bf16:
        model.to(torch.bfloat16)
    ctx = EvalContext(info.rank, info.world_size, device, bf16, cfg.data.batch_size)
    metrics, predictions = evaluate_task(model, task, cfg.data, ctx, cfg.max_batches)
    if info.rank == 0:
        report = write_report(
            cfg.out_dir,
            task.name,
            src.tag,
            metrics,
            predictions,
            {"init": str(src.folder), "data": cfg.data.path, "world_size": info.world_size},
        )
        print(f"{task.name} on {cfg.data.path} ({src.folder}):", flush=True)
        print("  " + ", ".join(f"{k} {v:.4f}" for k, v in scalars(metrics, "").items()), flush=True)
        print(f"  report: {report}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return metrics
