"""Evaluation during pretraining: zero-shot text<->video retrieval (R@1/5/10) and MCM accuracy on
a held-out shard set, gathered across ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .data.pipeline import DataConfig, VideoTextStream
from .model.multi import MuLTI


def to_device(batch: dict[str, Any], device: torch.device, bf16: bool) -> dict[str, Any]:
    """Tensors to ``device`` (floating ones in bf16 when training in bf16); lists stay as they are."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if bf16 and v.is_floating_point():
                v = v.to(torch.bfloat16)
        out[k] = v
    return out


def ranks_of_truth(sim: torch.Tensor) -> torch.Tensor:
    """For a square similarity matrix whose diagonal holds the true pairs: the 1-based rank of the
    true column in each row (ties counted pessimistically: an equal score ranks ahead)."""
    truth = sim.diagonal().unsqueeze(1)
    return (sim >= truth).sum(1)


def recall_at(ranks: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    return {f"r{k}": float((ranks <= k).float().mean()) for k in ks}


def _eval_step(model: MuLTI, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    video = model.encode_video(batch["video"], batch.get("frame_mask"))
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    out = {"text": text.embed.float(), "video": video.embed.float()}
    if "mcm_input_ids" in batch:
        logits = model.mcm_logits(video, batch["mcm_input_ids"], batch["mcm_attention_mask"])
        answer = batch["mcm_answer"]
        valid = answer.ne(-100)
        out["mcm_correct"] = ((logits.argmax(1) == answer) & valid).sum()
        out["mcm_total"] = valid.sum()
    return out


@torch.no_grad()
def evaluate_pretraining(
    model: MuLTI, cfg: DataConfig, rank: int, world: int, device: torch.device, bf16: bool, max_batches: int = 0
) -> dict[str, float]:
    """Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively):
    a rank that runs out of batches repeats its last one and discards the result."""
    was_training = model.training
    model.eval()
    stream = iter(VideoTextStream(cfg, rank, world))
    keys: list[str] = []
    texts, videos = [], []
    correct = total = 0
    last = None
    n = 0
    while True:
        batch = next(stream, None) if not (max_batches and n >= max_batches) else None
        more = torch.tensor([batch is not None], dtype=torch.float32, device=device)
        if world > 1:
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if more.item() == 0:
            break
        n += 1
        if batch is None:
            model(to_device(last, device, bf16), _eval_step)  # keep step with the other ranks
            continue
        last = batch
        out = model(to_device(batch, device, bf16), _eval_step)
        keys += batch["key"]
        texts.append(out["text"].cpu())
        videos.append(out["video"].cpu())
        if "mcm_correct" in out:
            correct += int(out["mcm_correct"])
            total += int(out["mcm_total"])
    local = (
        keys,
        torch.cat(texts) if texts else torch.zeros(0),
        torch.cat(videos) if videos else torch.zeros(0),
        correct,
        total,
    )
    parts = [None] * world
    if world > 1:
        dist.all_gather_object(parts, local)
    else:
        parts = [local]
    seen: set[str] = set()
    t_rows, v_rows = [], []
    for part_keys, t, v, _, _ in parts:
        for i, key in enumerate(part_keys):
            if key not in seen:  # resampled or capped streams may repeat a sample
                seen.add(key)
                t_rows.append(t[i])
                v_rows.append(v[i])
    text = torch.stack(t_rows)
    video = torch.stack(v_rows)
    sim = text @ video.t()
    metrics = {f"eval/t2v_{k}": v for k, v in recall_at(ranks_of_truth(sim)).items()}
    metrics.update({f"eval/v2t_{k}": v for k, v in recall_at(ranks_of_truth(sim.t())).items()})
    metrics["eval/clips"] = float(len(t_rows))
    metrics["eval/chance_r1"] = 1.0 / len(t_rows)
    mcm_total = sum(p[4] for p in parts)
    if mcm_total:
        metrics["eval/mcm_acc"] = sum(p[3] for p in parts) / mcm_total
    model.train(was_training)
    return metrics
