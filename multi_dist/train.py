"""Distributed pretraining with DeepSpeed ZeRO: the config, the DeepSpeed config built from it,
and the training loop (one function, :func:`train`, plus a small resumable :class:`TrainState`).

Works the same under ``deepspeed``, ``torchrun``, ``srun`` and plain ``python`` (see
:mod:`multi_dist.dist`), on CPU (gloo, fp32) and on GPUs (NCCL, bf16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist_

from . import checkpoint
from . import dist as distributed
from .config import save_config, start_up, to_dict
from .data.pipeline import DataConfig, VideoTextStream
from .evaluate import (
    TASK_FILE,
    TASK_HEADS,
    check_clips_fit,
    check_tokenizer_ids,
    check_tokenizers,
    eval_data_config,
    evaluate_task,
    load_weights,
    resolve,
    scalars,
    source_task,
    source_weights,
    to_device,
    write_report,
)
from .metrics import MetricLogger, WandbConfig
from .model.multi import ModelConfig, MuLTI, read_config
from .objectives import LossConfig
from .profile import ProfileConfig, StepProfiler, phase
from .tasks import EvalContext, Task, TaskConfig, make_task, task_class
from .tasks.base import EvaluationStopped

log = logging.getLogger("multi_dist.train")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate of the new modules (adapter, sampler, fusion, projections, heads)."""
    encoder_lr: float = 2e-5
    """Peak learning rate of pretrained encoder weights (random-init encoders use ``lr``)."""
    weight_decay: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at this fraction of the peak."""
    grad_clip: float = 1.0

    def validate(self) -> None:
        for name in ("lr", "encoder_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if len(self.betas) != 2:
            raise ValueError("betas needs two values")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("min_lr_ratio must be in [0, 1]")


@dataclass
class ZeroConfig:
    stage: int = 2
    offload_optimizer: bool = False
    """Optimizer states and step on the CPU (ZeRO-Offload; compiles DeepSpeed's cpu_adam once)."""
    offload_params: bool = False
    """Parameters on the CPU between uses (ZeRO-3 only)."""

    def validate(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3")


@dataclass
class TrainConfig:
    run_dir: str = "runs/pretrain"
    """Run folder: resolved config, metrics.jsonl, checkpoints/, model/ (the export), summary.json."""
    steps: int = 1000
    grad_accum: int = 1
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto``: bf16 on GPU, fp32 on CPU."""
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    checkpoints: bool = True
    """False: no checkpoint at all, not even at the end or on a stop request (benchmarks, smoke
    runs); such a run cannot resume."""
    export: bool = True
    """Write the final model folder (``run_dir/model``) at the end."""
    eval_every: int = 0
    """Evaluate on ``val`` every N steps (0: only at the end)."""
    eval_batches: int = 0
    """Cap on validation batches per rank (0: the whole validation set)."""
    on_nan: Literal["stop", "skip"] = "stop"
    """A non-finite loss: stop with an error naming the step, or skip that batch (no update)."""
    compile: bool = False
    """``torch.compile`` each transformer layer (see ``MuLTI.compile_layers``): the first steps
    compile (about a minute on CPU), later ones run each layer's elementwise work in fused
    kernels. Meant for GPUs."""
    resume: bool = True
    """Continue from the latest complete checkpoint in ``run_dir/checkpoints`` when there is one.
    False: start afresh, in a run folder that holds no checkpoint (refused otherwise: the two runs'
    checkpoints would mix)."""
    init: str = ""
    """Start from these weights (finetuning): an exported model folder, a checkpoint or a run
    folder (see ``launch/evaluate.py``). The architecture comes from there; ``model.checkpointing``,
    ``model.checkpoint_frames`` and ``model.heads.label_source`` apply, and the task adds its heads.
    A run's own checkpoints take precedence when it resumes."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """What to train: ``pretrain`` or a downstream task (qa, choice, retrieval, labels)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training shards; ``data.batch_size`` is the micro-batch per rank."""
    val: DataConfig | None = None
    """Held-out shards for zero-shot retrieval and MCM accuracy (epoch mode is forced)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """``profile.start=N``: trace steps N.. with ``torch.profiler`` (see :mod:`multi_dist.profile`)."""

    def validate(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.eval_every < 0 or self.eval_batches < 0:
            raise ValueError("eval_every and eval_batches must be >= 0")
        last = self.profile.start + self.profile.steps - 1
        if self.profile.start and last > self.steps:  # (the profile was dropped without a word)
            raise ValueError(
                f"profile.start={self.profile.start} with profile.steps={self.profile.steps} ends "
                f"at step {last}, after the run's last (steps={self.steps})"
            )
        if self.on_nan == "skip" and self.grad_accum > 1:
            raise ValueError(  # skipping one micro-batch moved DeepSpeed's accumulation boundary for good
                "on_nan=skip needs grad_accum=1: DeepSpeed counts the micro-batches of a step itself, and "
                "skipping one shifts every later step's boundary; use on_nan=stop"
            )


def use_bf16(cfg: TrainConfig) -> bool:
    if cfg.precision == "auto":
        return torch.cuda.is_available()
    return cfg.precision == "bf16"


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config, derived from ours (nothing in it is written twice).

    bf16 at ZeRO stage 1 accumulates gradients in fp32, and reduces them in fp32 (by default
    DeepSpeed would round the fp32 sums to bf16 for the all-reduce, even on one GPU). That makes
    DeepSpeed wrap the optimizer in its ``BF16_Optimizer``, the leanest of its bf16 wrappers on the
    host (README, Pretraining: the wrappers compared)."""
    zero: dict[str, Any] = {"stage": cfg.zero.stage}
    # not with CPU offload: that steps on the CPU, in ZeRO's own wrapper
    fp32_grads = use_bf16(cfg) and cfg.zero.stage == 1 and not cfg.zero.offload_optimizer
    if cfg.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.zero.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(cfg)},
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"} if fp32_grads else {}),
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


ALIGN_ELEMENTS = 8
"""16 bytes of bf16: the alignment the GPU's fast matmul kernels want of every operand."""


def param_groups(model: MuLTI, cfg: OptimConfig, initialized: bool = False) -> list[dict[str, Any]]:
    """Pretrained encoder weights (from the hub, or from ``init`` when ``initialized``) at
    ``encoder_lr``, everything new at ``lr``; no weight decay on biases, norms, scale-free
    parameters.

    Within a group, the parameters whose size is a multiple of :data:`ALIGN_ELEMENTS` come first,
    the others last, largest first. DeepSpeed (ZeRO-1/2, bf16) packs a group's parameters back to
    back in one flat buffer and makes each a view of it: with ``logit_scale`` (1 element) first,
    every bias and norm after it sat 2 bytes off 16-byte alignment, and on an H200 each matmul
    with such a bias ran cutlass's unaligned fallback kernel instead of cuBLAS's (469 ms of a
    1.1 s ZeRO-2 step at batch 64). In this order every parameter but the odd-sized tail starts
    aligned."""
    pretrained = set()
    for enc, enc_cfg in ((model.video, model.cfg.vision), (model.text, model.cfg.text)):
        if enc_cfg.pretrained or initialized:
            pretrained |= {id(p) for p in enc.backbone.parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() or name == "logit_scale"
        groups.setdefault((id(p) in pretrained, no_decay), []).append(p)

    def packing(p: torch.nn.Parameter) -> tuple[bool, int]:
        odd = p.numel() % ALIGN_ELEMENTS != 0
        return odd, -p.numel() if odd else 0  # stable: the aligned keep the model's order

    return [
        {
            "params": sorted(ps, key=packing),
            "lr": cfg.encoder_lr if enc else cfg.lr,
            "weight_decay": 0.0 if nd else cfg.weight_decay,
            "name": f"{'encoder' if enc else 'new'}{'_no_decay' if nd else ''}",
        }
        for (enc, nd), ps in sorted(groups.items())
    ]


def build_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (:func:`param_groups`), for DeepSpeed to wrap: on the CPU with ZeRO
    offload, else PyTorch's multi-tensor (``foreach``) step, which PyTorch picks by itself on a GPU
    only; on CPU too, so that a CPU run (the host floor in ``launch/bench_train.py``) dispatches the
    optimizer ops a GPU's does."""
    betas, eps = tuple(cfg.optim.betas), cfg.optim.eps
    if cfg.zero.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        distributed.load_op("CPUAdamBuilder")  # the op DeepSpeedCPUAdam loads, safe from a stale lock
        return DeepSpeedCPUAdam(groups, betas=betas, eps=eps, adamw_mode=True)
    return torch.optim.AdamW(groups, betas=betas, eps=eps, foreach=True)


def name_zero_stage(optimizer: Any) -> None:
    """Make DeepSpeed's ``BF16_Optimizer`` name its ZeRO stage (1) in its checkpoints.

    Its files leave the stage out, and DeepSpeed's ``zero_to_fp32.py`` refuses them ("... is not a
    zero checkpoint"), although they hold what it reads of a ZeRO-1 checkpoint: each rank's
    partition of each group's fp32 master weights, in the model's shapes' order, padded as ZeRO-1
    pads. With the stage named, ``zero_to_fp32.py`` converts them (``tests/test_train.py``: from two
    ranks, the fp32 master weights the run exports, bit for bit); loading a checkpoint reads only
    the keys it knows. Any other optimizer is left as it is."""
    from deepspeed.checkpoint.constants import ZERO_STAGE
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if isinstance(optimizer, BF16_Optimizer):
        state_dict = optimizer.state_dict
        optimizer.state_dict = lambda: {**state_dict(), ZERO_STAGE: 1}


def check_param_order(
    saved: list[list[str]] | None, current: list[list[str]], model_order: list[str], where: Path
) -> None:
    """Refuse to resume a checkpoint whose optimizer groups list the parameters in another order
    than this run's. DeepSpeed restores its flat buffers (ZeRO-1/2/3) and the optimizer's state by
    position, not by name, so such a checkpoint would load scrambled, silently. ``saved`` is None
    for a checkpoint written before the order was recorded, when each group followed the model's
    order of parameters (``model_order``; :func:`param_groups` packs odd-sized ones last since)."""
    if saved is None:
        rank = {n: i for i, n in enumerate(model_order)}
        saved = [sorted(group, key=rank.__getitem__) for group in current]
    if saved == current:
        return
    first = next(
        (
            f"group {i} position {j}: {a} where this run has {b}"
            for i, (old, new) in enumerate(zip(saved, current))
            for j, (a, b) in enumerate(zip(old, new))
            if a != b
        ),
        f"{len(saved)} groups of {[len(g) for g in saved]} where this run has {[len(g) for g in current]}",
    )
    raise RuntimeError(
        f"{where} holds the optimizer's parameters in another order than this run ({first}): DeepSpeed "
        "would restore them by position, scrambled. Resume it with the multi-dist version that wrote it, "
        "or start a new run from its weights (init=...)"
    )


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainState:
    """What the loop needs beyond DeepSpeed's checkpoint to continue exactly."""

    step: int = 0
    samples: int = 0
    skipped_steps: int = 0
    first_losses: dict[str, float] = field(default_factory=dict)
    last_losses: dict[str, float] = field(default_factory=dict)
    """Of the last log step: in the checkpoint, so that a run resumed at its end still reports them."""


_STOP: dict[str, int | None] = {"signal": None}


def request_stop(signum: int | None = None, frame: Any = None) -> None:
    """Ask the loop to checkpoint and return at the next step boundary (a signal handler: Slurm's
    warning before a time limit or preemption, a scheduler stopping a trial). Asked before the
    loop starts (a signal during the imports, a trial stopped while it set up), it stops after
    its first step."""
    _STOP["signal"] = signum if signum is not None else -1


def clear_stop() -> None:
    """Forget a stop request: for a process that runs one training after another (a sweep's
    trial actor), before it sets up the next, whose stop requests may come any time from then."""
    _STOP["signal"] = None


def _stop_agreed(world: int, group: Any) -> bool:
    """True on every rank once any rank was asked to stop (signals reach ranks at different steps).
    Agreed over a host (gloo) group: checking every step must not wait for the GPU."""
    flag = torch.tensor([1.0 if _STOP["signal"] is not None else 0.0])
    if world > 1:
        dist_.all_reduce(flag, op=dist_.ReduceOp.MAX, group=group)
    return flag.item() > 0


def _window_means(window: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """``train/<name>``: the mean of each metric over the log window, read from the device once."""
    if not window:
        return {}
    means = torch.stack([torch.stack(v).float().mean() for v in window.values()]).tolist()
    return {f"train/{k}": m for k, m in zip(window, means)}


INIT_SETTABLE = ("checkpointing", "checkpoint_frames", "heads.")
"""Model keys a run with ``init`` sets itself (the rest is the init's architecture)."""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted key: value} (an empty dict is a value)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _check_start(cfg: TrainConfig, rank: int = 0, resume_from: Path | None = None) -> None:
    """Clear start-up errors for settings the loop cannot honour, before any heavy work. The model
    checked is the one that will train: ``init``'s architecture when there is one, read from the
    checkpoint a run resumes from (``init`` itself may be gone by then)."""
    if cfg.init:
        model = read_config(resume_from or resolve(cfg.init).folder)
    else:
        model = cfg.model
    if cfg.init:  # the architecture is init's: a model key set to something else would be ignored
        given, default, init = (_flat(to_dict(m)) for m in (cfg.model, ModelConfig(), model))
        ignored = sorted(
            k for k, v in given.items() if v != default.get(k) and v != init.get(k) and not k.startswith(INIT_SETTABLE)
        )
        if ignored:
            raise ValueError(
                f"{', '.join(f'model.{k}' for k in ignored)}: with init the architecture is init's "
                f"({cfg.init}); only model.checkpointing, model.checkpoint_frames and model.heads.label_source "
                "may be set"
            )
    for name in ("vision", "text") if not cfg.init else ():
        if getattr(model, name).missing():
            raise ValueError(
                f"model.{name}: an encoder needs a name (pretrained) or pretrained=false with an arch "
                "(or give init, whose architecture is used)"
            )
    for split in ("data", "val"):
        data = getattr(cfg, split)
        if data is not None:
            check_clips_fit(model, data, split, f"init {cfg.init}" if cfg.init else "")
    if cfg.init and (resume_from is None or Path(cfg.init).exists()):  # (checked at the first start)
        check_tokenizers(resolve(cfg.init), {"data": cfg.data, "val": cfg.val})
    k = model.fusion.text_tokens
    if (
        rank == 0
        and cfg.task.name == "pretrain"
        and cfg.loss.mlm > 0
        and model.fusion.sampler != "none"
        and cfg.data.max_text_len > k
    ):
        log.warning(
            "data.max_text_len=%d is above fusion.text_tokens=%d: captions longer than %d tokens are condensed "
            "and take no part in MLM",
            cfg.data.max_text_len,
            k,
            k,
        )
    unfed = []  # a loss whose inputs the data does not make was skipped at every step, without a word
    if cfg.task.name == "pretrain" and cfg.loss.mcm > 0 and not cfg.data.mcm.enabled:
        unfed.append(f"loss.mcm={cfg.loss.mcm} needs data.mcm.enabled=true (the data workers make the questions)")
    if cfg.task.name == "pretrain" and cfg.loss.mlm > 0 and cfg.data.mlm_probability == 0:
        unfed.append(f"loss.mlm={cfg.loss.mlm} needs data.mlm_probability > 0 (the data workers mask the captions)")
    if cfg.task.name == "retrieval" and cfg.loss.vtc == cfg.loss.vtm == 0:
        unfed.append("task retrieval trains with loss.vtc and loss.vtm, which are both 0")
    if unfed:
        raise ValueError("; ".join(unfed) + ": set them, or the loss's weight to 0")
    if cfg.task.name in ("pretrain", "retrieval") and cfg.loss.vtm > 0 and cfg.data.batch_size < 2:
        raise ValueError(  # else VTM never runs, silently, and its head (retrieval's re-ranker) stays untrained
            f"loss.vtm={cfg.loss.vtm} needs data.batch_size >= 2: VTM draws its hard negatives from each "
            "rank's own batch. Set data.batch_size >= 2, or loss.vtm=0"
        )


# what a resumed run may change without a word: how long it runs, what it logs and keeps
_RUN_CONTROL = (
    *("steps", "resume", "log_every", "ckpt_every", "keep_checkpoints", "checkpoints", "export"),
    *("eval_every", "eval_batches"),
)
_RUN_CONTROL_SECTIONS = ("wandb.", "profile.")


def _changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each setting of a resumed run that differs from its checkpoint's,
    run control aside (``_RUN_CONTROL``)."""
    if not saved:
        return []
    old, new = _flat(saved), _flat(now)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    keys = [k for k in keys if k not in _RUN_CONTROL and not k.startswith(_RUN_CONTROL_SECTIONS)]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def _val_config(cfg: TrainConfig, task: Task) -> DataConfig | None:
    if cfg.val is None or not (cfg.val.path or cfg.val.corpora):
        return None
    return task.data_config(eval_data_config(cfg.val), training=False)


def _task_vocab(cfg: TrainConfig, resume_from: Path | None) -> list[str] | None:
    """The task's vocabulary: the one of the checkpoint this run resumes from, else from the
    training split. (Not the run folder's ``task.json``: one left by an earlier run in that folder,
    on another corpus, would give a fresh run a vocabulary its data does not have.)"""
    if resume_from is not None:
        saved = checkpoint.read_trainer(resume_from.parent, resume_from.name).get("task") or {}
        if saved.get("task") == cfg.task.name:
            return saved["vocab"]
    return task_class(cfg.task.name).build_vocab(cfg.task, _sampled_paths(cfg.data))


def _sampled_paths(data: DataConfig) -> list[str]:
    """The training corpora a run reads: a corpus mixed at weight 0 is left out, and so are its
    answers and labels (outputs the head would never learn) and its fields' start-up check."""
    return [c.path for c in data.corpus_configs() if c.weight > 0]


def _check_text_tokens(cfg: TrainConfig, model: MuLTI) -> None:
    """Each split's tokenizer fits the text encoder: its ids index the encoder's embeddings (see
    :func:`check_tokenizer_ids`), and where the encoder is pretrained (``model.text.name``) and
    ships its tokenizer, they are the ids it was trained with: another vocabulary of the same size
    trains on nonsense without a word. (With ``init``, the tokenizer saved with the weights is
    checked by ``_check_start``; a hub name is not checked here, which would mean a download.)"""
    from .data.text import check_same_vocabulary, resolve_pretrained, ships_tokenizer

    # (a val section that names no shards is no split)
    splits = {k: d for k, d in (("data", cfg.data), ("val", cfg.val)) if d is not None and (d.path or d.corpora)}
    check_tokenizer_ids(model, splits, f"init {cfg.init}'s" if cfg.init else "model.text's")
    text = cfg.model.text
    if cfg.init or not (text.pretrained and text.name):
        return
    if not ships_tokenizer(resolve_pretrained(text.name, "model.text.name")):
        return
    for split, data in splits.items():
        if data.tokenizer != text.name:
            check_same_vocabulary(data.tokenizer, f"{split}.tokenizer", text.name, "model.text")


def _build_model(cfg: TrainConfig, task: Task, resume_from: Path | None = None) -> MuLTI:
    """The model as configured, or (``init``) rebuilt from the given weights with the task's heads:
    new ones, unless the weights were trained for this task with this vocabulary (and, for labels,
    the same ``label_source``), whose heads then go on training. Another task's head, even of the
    same shape, is dropped: its outputs mean other answers. A run with ``init`` that resumes takes
    the architecture from its checkpoint (``resume_from``), which also holds the weights: ``init``
    is not read again, and may have been moved or removed."""
    if not cfg.init:
        cfg.model.heads = dataclasses.replace(cfg.model.heads, **task.heads())
        return MuLTI(cfg.model)
    if resume_from is not None:
        model_cfg = read_config(resume_from)
        model_cfg.checkpointing = cfg.model.checkpointing
        model_cfg.checkpoint_frames = cfg.model.checkpoint_frames
        cfg.model = model_cfg
        return MuLTI(model_cfg)
    src = resolve(cfg.init)
    model_cfg = read_config(src.folder)
    source_heads = model_cfg.heads
    model_cfg.checkpointing = cfg.model.checkpointing
    model_cfg.checkpoint_frames = cfg.model.checkpoint_frames
    # the task's own head only: another task's (a QA head of weights finetuned for QA, say) would be
    # dropped below, re-initialised, trained on nothing and exported with the model
    heads = {"qa_answers": 0, "num_labels": 0, **task.heads()}
    model_cfg.heads = dataclasses.replace(model_cfg.heads, label_source=cfg.model.heads.label_source, **heads)
    cfg.model = model_cfg  # the run's config records the architecture it really trains
    model = MuLTI(model_cfg)
    state = source_weights(src)
    trained_for = source_task(src) or {}
    same = (trained_for.get("task"), trained_for.get("vocab")) == (task.name, task.vocab)
    if not same or source_heads.label_source != model_cfg.heads.label_source:
        state = {k: v for k, v in state.items() if not k.startswith(TASK_HEADS)}
    load_weights(model, state, str(src.folder), new_heads=True)
    return model


def train(cfg: TrainConfig, on_log: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Pretrain (or finetune) MuLTI as configured; returns the summary (also written to
    ``run_dir/summary.json``). ``on_log(step, metrics)`` is called on every rank with each logged
    dict (already averaged over ranks): the hook for schedulers such as Ray Tune.

    After :func:`request_stop` (e.g. a signal), the loop checkpoints at the next step boundary and
    returns ``{"stopped": True, ...}`` without the final evaluation and export; running the same
    config again resumes from that checkpoint."""
    import deepspeed

    info = distributed.init()
    rank, world = info.rank, info.world_size
    host_group = distributed.host_group() if world > 1 else None
    device = distributed.device(info)
    bf16 = use_bf16(cfg)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume_tag = checkpoint.latest_tag(ckpt_dir) if cfg.resume else None
    resume_from = ckpt_dir / resume_tag if resume_tag else None
    with start_up():  # fails here, named, on wrong settings, missing or unfit shards, a missing init
        _check_start(cfg, rank, resume_from)
        if not cfg.resume and any(ckpt_dir.glob("step_*")):  # its checkpoints and ours would mix
            raise ValueError(
                f"resume=false, but {ckpt_dir} holds another run's checkpoints: use another run_dir, "
                "or remove that folder"
            )
        vocab = _task_vocab(cfg, resume_from)
        task = make_task(cfg.task, vocab, cfg.seed, loss=cfg.loss)
        task.check_data(_sampled_paths(cfg.data), "data", training=True, quiet=rank > 0)
        stream = VideoTextStream(
            task.data_config(cfg.data, training=True),
            rank,
            world,
            task.collate_fn(training=True),
            pin_memory=device.type == "cuda",
            drop_last=True,  # whole batches on every rank, epoch mode included
        )
        val_cfg = _val_config(cfg, task)
        if val_cfg is not None:
            VideoTextStream(val_cfg, rank, world, key="val", evaluation=True)  # its checks, before training
            task.check_data([c.path for c in val_cfg.corpus_configs()], "val", training=False, quiet=rank > 0)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = _build_model(cfg, task, resume_from)
        _check_text_tokens(cfg, model)
    if cfg.compile:
        model.compile_layers()
    task_state = task.state()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        checkpoint.atomic_write(run_dir / TASK_FILE, json.dumps(task_state))
    groups = param_groups(model, cfg.optim, initialized=bool(cfg.init))
    names = {id(p): n for n, p in model.named_parameters()}
    param_order = [[names[id(p)] for p in g["params"]] for g in groups]
    optimizer = build_optimizer(cfg, groups)
    o = cfg.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, cfg.steps, o.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=build_ds_config(cfg, world)
    )
    name_zero_stage(engine.optimizer)
    ctx = EvalContext(rank, world, device, bf16, val_cfg.batch_size if val_cfg else 1)
    state = TrainState()
    tag = resume_tag
    if tag is not None:
        saved_order = checkpoint.read_trainer(ckpt_dir, tag).get("param_order")
        with start_up():
            check_param_order(saved_order, param_order, list(names.values()), ckpt_dir / tag)
        trainer, rank_state = checkpoint.load(engine, ckpt_dir, tag)
        state = TrainState(**trainer["state"])
        stream.load_state_dict(rank_state["data"])
        checkpoint.set_rng_state(rank_state["rng"])
        if rank == 0:
            print(f"resumed from {ckpt_dir / tag} at step {state.step}", flush=True)
            changed = _changed_settings(trainer.get("config", {}), to_dict(cfg))
            if changed:
                log.warning(
                    "resumed with settings that differ from the checkpoint's: %s. The weights, optimizer and "
                    "learning-rate schedule states come from the checkpoint (its learning rates among them); "
                    "to train with new settings from these weights, use another run_dir with init=%s",
                    "; ".join(changed),
                    ckpt_dir / tag,
                )
    with start_up():  # wandb online without an API key, or out of reach: named, before the first step
        failed: ValueError | None = None
        try:
            logger = MetricLogger(
                run_dir, cfg.wandb, to_dict(cfg), total_steps=cfg.steps, enabled=rank == 0, resume_step=state.step
            )
        except ValueError as err:  # (rank 0's): every rank stops, none waits for it at the first step
            failed = err
        if _reduce_max([float(failed is not None)], world, device)[0] and failed is None:
            raise ValueError("rank 0 could not start its metrics logger (wandb): see its error")
        if failed is not None:
            raise failed
    global_batch = cfg.data.batch_size * world * cfg.grad_accum
    batches = iter(stream)

    def emit(step: int, metrics: dict[str, float]) -> None:
        logger.log(step, metrics)
        if on_log is not None:
            on_log(step, metrics)

    def asked() -> bool:  # collective: every rank asks at each step and before each evaluation batch
        return _stop_agreed(world, host_group)

    def stop(saved: bool) -> dict[str, Any]:
        """A stop was asked: checkpoint at this step unless done (or ``checkpoints=false``), and return."""
        if not saved and cfg.checkpoints:
            _save(engine, ckpt_dir, state, cfg, stream, rank, task, param_order)
        if rank == 0:
            print(f"stopped at step {state.step} on request (signal {_STOP['signal']})", flush=True)
        return {"stopped": True, "steps": state.step, "samples": state.samples}

    profiler = StepProfiler(cfg.profile, run_dir, rank, device)
    if cfg.profile.start and state.step >= cfg.profile.start and rank == 0:
        log.warning("profile.start=%d: the run resumed at step %d, past it; no profile", cfg.profile.start, state.step)
    # DeepSpeed keeps the global gradient norm in its ZeRO and bf16 wrappers; fp32 ZeRO-0 steps the
    # plain torch optimizer, whose gradients are whole on every rank (all-reduced): measured here
    own_norm = cfg.zero.stage == 0 and not bf16
    grad_norm = torch.zeros(())
    window: dict[str, list[torch.Tensor]] = {}
    t_window, wait_window, steps_window, frames_window = time.perf_counter(), 0.0, 0, 0
    try:
        while state.step < cfg.steps:
            engine.train()
            profiler.before(state.step + 1)
            for _ in range(cfg.grad_accum):
                t0 = time.perf_counter()
                with phase("data"):
                    batch = next(batches, None)
                    if batch is None:  # the epoch ended: the stream moves on to the next one
                        batches = iter(stream)
                        batch = next(batches)
                wait_window += time.perf_counter() - t0
                mask = batch.get("frame_mask")  # real frames only (images and short clips are padded)
                frames_window += (
                    int(mask.sum()) if mask is not None else batch["video"].shape[0] * batch["video"].shape[1]
                )
                with phase("forward"):
                    out = engine(to_device(batch, device, bf16), task.loss)
                loss = out["loss"]
                with phase("nan_check"):  # the step's one wait for the GPU: until its forward is done
                    finite = torch.isfinite(loss.detach()).float()
                    if world > 1:
                        dist_.all_reduce(finite, op=dist_.ReduceOp.MIN)
                    finite = finite.item()
                if finite < 1:
                    msg = f"non-finite loss at step {state.step + 1} (rank {rank}: {float(loss):.4g})"
                    if cfg.on_nan == "stop":
                        raise FloatingPointError(msg + "; set on_nan=skip to skip such batches")
                    log.warning("%s: skipping the batch", msg)
                    state.skipped_steps += 1
                    continue
                with phase("backward"):
                    engine.backward(out["objective"])
                with phase("optimizer"):
                    if own_norm and ((state.step + 1) % cfg.log_every == 0 or state.step + 1 == cfg.steps):
                        # before step() clips and clears the gradients; at log steps only
                        grad_norm = torch.linalg.vector_norm(
                            torch.stack([p.grad.norm() for p in engine.module.parameters() if p.grad is not None])
                        )
                    engine.step()
                for k, v in out.items():
                    if k != "objective":
                        window.setdefault(k, []).append(v.detach())  # read at log steps: no wait here
            state.step += 1
            state.samples += global_batch
            t_window += profiler.after(state.step)  # (writing a profile is no step's time)
            steps_window += 1
            if not state.first_losses and window:
                state.first_losses = {k: float(v[0]) for k, v in window.items() if k.startswith("loss")}
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                if device.type == "cuda":  # the window's kernels done before its time is read (a log step)
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - t_window
                means = _window_means(window)
                if len(stream.corpora) > 1:  # each corpus's share of the samples seen so far (all ranks)
                    means.update({f"data/share_{k}": v for k, v in stream.corpus_shares().items()})
                metrics = window_metrics(
                    means,
                    elapsed,
                    steps_window,
                    frames_window,
                    wait_window,
                    stream.totals["skipped"],
                    _peak_gib(device),
                    world,
                    device,
                )
                metrics["perf/clips_per_s"] = global_batch / metrics["perf/step_s"]
                state.last_losses = {
                    k.removeprefix("train/"): v for k, v in metrics.items() if k.startswith("train/loss")
                }
                metrics.update(
                    {
                        "optim/lr": max(scheduler.get_last_lr()),  # the new modules' (peak) rate
                        "optim/grad_norm": float(grad_norm if own_norm else engine.get_global_grad_norm()),
                        "progress/samples": state.samples,
                    }
                )
                emit(state.step, metrics)
                window, t_window, wait_window, steps_window, frames_window = {}, time.perf_counter(), 0.0, 0, 0
            t_aside = time.perf_counter()
            saved = cfg.checkpoints and (state.step % cfg.ckpt_every == 0 or state.step == cfg.steps)
            if saved:
                _save(engine, ckpt_dir, state, cfg, stream, rank, task, param_order)
            if asked():
                return stop(saved)
            if val_cfg is not None and cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
                try:
                    metrics, _ = evaluate_task(engine.module, task, val_cfg, ctx, cfg.eval_batches, "val", asked)
                except EvaluationStopped:
                    return stop(saved)
                emit(state.step, scalars(metrics))
            # checkpoints and evaluations are not training: the window's step time and rates leave them out
            t_window += time.perf_counter() - t_aside
        summary: dict[str, Any] = {
            "steps": state.step,
            "samples": state.samples,
            "skipped_steps": state.skipped_steps,
            "first_losses": state.first_losses,
            "last_losses": state.last_losses,
        }
        if val_cfg is not None:
            try:
                metrics, predictions = evaluate_task(engine.module, task, val_cfg, ctx, cfg.eval_batches, "val", asked)
            except EvaluationStopped:  # the last step is saved: the same command evaluates and exports
                return stop(saved=True)
            final = scalars(metrics)
            emit(state.step, final)
            summary["eval"] = final
            if rank == 0:
                info = {"init": str(run_dir), "data": val_cfg.path, "world_size": world}
                report = write_report(
                    run_dir / "eval", task.name, checkpoint.tag_of(state.step), metrics, predictions, info
                )
                summary["eval_report"] = str(report)
        if cfg.export:
            export = run_dir / "model"
            _export(engine, export, cfg, rank, task_state)
            summary["export"] = str(export)
        if rank == 0:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    finally:
        profiler.close()
        logger.close()


def window_metrics(
    means: dict[str, float],
    elapsed: float,
    steps: int,
    frames: int,
    wait: float,
    skipped: int,
    peak_gib: float,
    world: int,
    device: torch.device,
) -> dict[str, float]:
    """A log window's metrics over all ranks, from this rank's: the means of ``means`` (losses)
    and of the data-wait share, the sums of frames per second and of samples skipped so far, the
    slowest rank's step time and the largest peak memory (``peak_gib``). Collective when
    ``world > 1``."""
    out = _reduce_means(
        {**means, "perf/frames_per_s": frames / elapsed, "data/wait_frac": wait / elapsed, "data/skipped": skipped},
        world,
        device,
    )
    out["perf/frames_per_s"] *= world
    out["data/skipped"] = round(out["data/skipped"] * world)
    slowest, peak = _reduce_max([elapsed, peak_gib], world, device)
    return {**out, "perf/step_s": slowest / steps, "perf/mem_gib": peak}


def _reduce_means(metrics: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    if world == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist_.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def _reduce_max(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist_.all_reduce(t, op=dist_.ReduceOp.MAX)
    return t.tolist()


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)


def _save(
    engine: Any,
    ckpt_dir: Path,
    state: TrainState,
    cfg: TrainConfig,
    stream: VideoTextStream,
    rank: int,
    task: Task,
    param_order: list[list[str]],
) -> None:
    trainer = {
        "state": dataclasses.asdict(state),
        "config": to_dict(cfg),
        "task": task.state(),
        "param_order": param_order,  # the optimizer's groups, by name: checked on resume
    }
    rank_state = {"data": stream.state_dict(), "rng": checkpoint.rng_state()}
    # the model's self-contained config beside the weights: evaluation rebuilds it with no hub access
    files = {"config.json": json.dumps(engine.module.config_dict(), indent=1)}
    tag = checkpoint.save(engine, ckpt_dir, state.step, trainer, rank_state, cfg.keep_checkpoints, files)
    if rank == 0:
        print(f"checkpoint {ckpt_dir / tag}", flush=True)


def _export(engine: Any, folder: Path, cfg: TrainConfig, rank: int, task_state: dict[str, Any]) -> None:
    """The final model as a folder that ``MuLTI.from_pretrained`` loads (ZeRO-3 parameters are
    gathered first), with the tokenizer beside it. A bf16 run exports fp32 weights: the optimizer's
    fp32 master copy of each trained parameter, not its bf16 rounding."""
    import deepspeed

    from .data.text import load_tokenizer

    module: MuLTI = engine.module
    masters = master_weights(engine, keep=rank == 0) if use_bf16(cfg) else {}
    gather = (
        deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        if cfg.zero.stage == 3
        else contextlib.nullcontext()
    )
    with gather:
        if rank == 0:
            if use_bf16(cfg):
                module = _fp32_copy(module, masters)
            module.save_pretrained(folder, tokenizer=load_tokenizer(cfg.data.tokenizer))
            checkpoint.atomic_write(folder / TASK_FILE, json.dumps(task_state))
    if dist_.is_initialized():
        dist_.barrier()


def master_weights(engine: Any, keep: bool = True) -> dict[str, torch.Tensor]:
    """The fp32 master copy of each trained parameter of a bf16 engine, by name, on the CPU.

    ZeRO 1-3 (``BF16_Optimizer`` included) partition it across the ranks and DeepSpeed gathers
    each parameter's (``safe_get_full_fp32_param``, a collective: every rank calls this, and only
    those with ``keep`` hold the result); stage 0's ``FP16_UnfusedOptimizer`` keeps it whole, beside
    each bf16 parameter. Frozen parameters have none: their bf16 value is all the run holds."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    opt = engine.optimizer
    unfused = {}
    if isinstance(opt, FP16_UnfusedOptimizer):
        unfused = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
    masters = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        full = unfused.get(id(p)) if unfused else safe_get_full_fp32_param(p)
        if full is None:  # the same on every rank: the optimizer's kind decides
            log.warning("%s holds no fp32 master copy of %s: exporting its bf16 value", type(opt).__name__, name)
        elif keep:
            masters[name] = full.detach().float().cpu()
    return masters


def _fp32_copy(module: MuLTI, masters: dict[str, torch.Tensor]) -> MuLTI:
    """``module`` in fp32, each parameter in ``masters`` from there. Matched by tensor, not name:
    a tied weight (the MLM decoder's) appears in the state dict under a second name."""
    by_tensor = {id(p): masters[n] for n, p in module.named_parameters() if n in masters}
    state = module.state_dict(keep_vars=True)
    copy = MuLTI(module.cfg)
    copy.load_state_dict({k: by_tensor.get(id(v), v.detach()).float() for k, v in state.items()})
    return copy


def setup_logging() -> None:
    level = os.environ.get("MULTI_DIST_LOG", "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
