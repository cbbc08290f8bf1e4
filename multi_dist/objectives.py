"""Pretraining objectives: VTC, VTM with hard negatives, MLM and MCM.

The only module that talks to other ranks (the model never does): VTC gathers the unimodal
embeddings of the whole global batch, keeping the gradient on the local slice, so every rank's
loss sees every negative. With one process (or no process group) the same code runs without
communication.

Hard negatives for VTM are drawn by VTC similarity from the local slice of the gathered batch.
Drawing them from other ranks would mean shipping those ranks' video tokens (for the ``base``
preset at 64 frames, 8 clips x 12,608 tokens x 768 x 2 bytes = 155 MB per rank and step) to fuse
them locally: a cost that defeats the model's point, for negatives that are no harder on average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .model.encoders import mask_index
from .model.multi import MuLTI


@dataclass
class LossConfig:
    """Weights of the pretraining losses (0 switches one off and skips its computation)."""

    vtc: float = 1.0
    vtm: float = 1.0
    mlm: float = 1.0
    mcm: float = 1.0

    def validate(self) -> None:
        for name in ("vtc", "vtm", "mlm", "mcm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} weight must be >= 0")
        if self.vtc + self.vtm + self.mlm + self.mcm == 0:
            raise ValueError("vtc, vtm, mlm and mcm are all 0: nothing to train")


def _world(group: Any = None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def gather_with_local_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """All-gather ``x`` (B, ...) from every rank into (world*B, ...); the local slice is ``x``
    itself, so gradients flow to this rank's inputs. Every rank must pass the same B."""
    rank, world = _world(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[rank] = x
    return torch.cat(parts)


def caption_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """An int64 fingerprint per caption (a linear hash of its token ids): equal captions, true
    positives for each other, share it. The coefficients, scattered over [1, 2**31 - 1) by a
    multiplicative hash of the position, are made on the ids' device: a tensor made on the host
    and copied there would make the host wait for the GPU's queue. No overflow: with ids below
    2**22 and up to 2**9 positions the sum stays below 2**22 * 2**31 * 2**9 = 2**62."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.int64)
    coeff = (pos * 2654435761 + 1013904223) % (2**31 - 1) + 1
    return ((input_ids.long() + 1) * attention_mask.long() * coeff).sum(1)


def vtc_loss(
    text_embed: torch.Tensor,
    video_embed: torch.Tensor,
    logit_scale: torch.Tensor,
    fingerprints: torch.Tensor,
    group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over the whole global batch, computed in full on every rank (as
    open_clip does): its value is the same everywhere, and the gradient reaches this rank's slice.
    Pairs with identical captions (equal ``fingerprints``) share the target instead of being
    pushed apart. Returns (loss, text->video logits (world*B, world*B), text->video accuracy).

    Each rank's gradient covers only its own slice, so summing over ranks gives the exact gradient
    of the loss; the data-parallel engine averages instead, hence :class:`PretrainLoss` scales this
    term by the world size for the backward pass. ``logit_scale`` is the exception: it scales the
    whole matrix on every rank, so each rank has its whole gradient; it gets a 1/world share of it
    here, and the product is exact for it too (else it had world x its gradient, which also
    inflated the gradient norm that clipping reads).
    """
    all_text = gather_with_local_grad(text_embed, group)
    all_video = gather_with_local_grad(video_embed, group)
    all_fp = gather_with_local_grad(fingerprints, group)
    same = all_fp[:, None] == all_fp[None, :]
    share = 1 / _world(group)[1]  # the scale's value, with a 1/world share of its gradient (above)
    scale = (logit_scale * share + (logit_scale * (1 - share)).detach()).exp().clamp(max=100)
    t2v = scale * all_text @ all_video.t()
    target = same.float() / same.float().sum(1, keepdim=True)
    t2v32 = t2v.float()
    loss = (
        torch.sum(-target * F.log_softmax(t2v32, 1), 1).mean()
        + torch.sum(-target * F.log_softmax(t2v32.t(), 1), 1).mean()
    ) / 2
    rows = torch.arange(t2v.shape[0], device=t2v.device)
    acc = same[rows, t2v.argmax(1)].float().mean()
    return loss, t2v, acc


def sample_hard_negatives(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """For each row, one column drawn with probability softmax(sim) among columns that are not a
    positive (an identical caption counts as positive). Rows with no negative get -1. The softmax
    is over the negatives alone: over the whole row, a positive ahead by more than float32's
    ``exp`` range (about 103, reached at scale 100) left every negative a weight of 0, and the row
    without one."""
    has_neg = (~same).any(1)
    weights = sim.float().masked_fill(same, float("-inf")).softmax(1)  # (a row of positives only: NaN)
    weights = torch.where(has_neg[:, None], weights, torch.ones_like(weights))
    # torch.multinomial(weights, 1) draws exactly this (argmax of p / q, q ~ Exp(1): the Gumbel-max
    # trick), after two .item() checks of the weights that make the host wait for the GPU
    picks = (weights / torch.empty_like(weights).exponential_()).argmax(1)
    return torch.where(has_neg, picks, torch.full_like(picks, -1))


class PretrainLoss(nn.Module):
    """Computes the weighted pretraining losses for one batch; returns a flat dict with ``loss``
    (the weighted sum), each loss (``loss_vtc``, ...), accuracies (``acc_vtc``, ...) and
    ``objective``: what to backpropagate (``loss`` with the VTC term scaled by the world size,
    see :func:`vtc_loss`; equal to ``loss`` in a single process)."""

    def __init__(self, cfg: LossConfig, group: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.group = group

    def forward(self, model: MuLTI, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One encoder pass over every text of the step (captions, masked captions, MCM options)
        and one fusion pass over every text paired with its own clip (VTM's positive and
        hard-negative captions, the masked captions, the options: G texts per clip, the sampler
        reading each clip's long sequence once for all G); only VTM's hard-negative clips need a
        second fusion pass. Each row is computed as it would be alone; fewer, larger passes
        launch half the kernels (at small batches a GPU step waits on its launches). The dense
        baseline (``fusion.sampler: none``) fuses one pass per objective instead."""
        cfg = self.cfg
        video = model.encode_video(batch["video"], batch.get("frame_mask"), batch.get("frame_index"))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b = ids.shape[0]
        parts = [(ids, mask)]
        mcm = cfg.mcm > 0 and "mcm_input_ids" in batch
        if mcm:
            options = batch["mcm_input_ids"].shape[1]
            parts.append((batch["mcm_input_ids"].flatten(0, 1), batch["mcm_attention_mask"].flatten(0, 1)))
        mlm_index = self._mlm_index(batch)
        if mlm_index is not None:
            parts.insert(1, (batch["mlm_input_ids"], mask))
        texts = model.encode_text(*_stack_rows(parts))  # rows: captions, [masked], [options]
        text = texts.select(slice(0, b))
        out: dict[str, torch.Tensor] = {}
        total = video.tokens.new_zeros((), dtype=torch.float32)
        extra = total  # the VTC term's share beyond its weight: (world - 1) x weight x VTC
        rank, world = _world(self.group)
        fp = caption_ids(ids, mask)
        if cfg.vtc > 0 or cfg.vtm > 0:
            vtc, t2v, acc = vtc_loss(text.embed, video.embed, model.logit_scale, fp, self.group)
            if cfg.vtc > 0:
                out["loss_vtc"], out["acc_vtc"] = vtc, acc
                total = total + cfg.vtc * vtc
                extra = (world - 1) * cfg.vtc * vtc  # see vtc_loss: the engine averages over ranks
        idx = torch.arange(b, device=ids.device)
        slots = []  # per clip, the rows of ``texts`` fused with it: (b, G) once concatenated
        vtm = cfg.vtm > 0 and b > 1
        if vtm:
            local = slice(rank * b, (rank + 1) * b)
            sim, same = t2v[local, local].detach(), fp[:, None] == fp[None, :]
            neg_text = sample_hard_negatives(sim.t(), same.t())  # for each video, a caption
            neg_video = sample_hard_negatives(sim, same)  # for each caption, a video
            slots.append(torch.stack([idx, torch.where(neg_text >= 0, neg_text, idx)], 1))
        start = b
        if mlm_index is not None:
            slots.append((start + idx)[:, None])
            start += b
        if mcm:
            slots.append(start + idx[:, None] * options + torch.arange(options, device=ids.device))
        if not slots:
            out["loss"], out["objective"] = total, total + extra
            return out
        # dense concat (the benchmark's baseline) fuses every video token of a clip in each row:
        # one pass per objective, as a dense model would, bounds the transient memory of a pass
        passes = slots if model.cfg.fusion.sampler == "none" else [torch.cat(slots, 1)]
        fused = [model.fuse(texts.select(rows.flatten()), video, groups=rows.shape[1]) for rows in passes]
        n_text = fused[0].n_text
        cls = torch.cat([f.cls.view(b, r.shape[1], -1) for f, r in zip(fused, passes)], 1)  # (b, G, D)
        col = 0
        if vtm:
            neg = model.fuse(text, video.select(torch.where(neg_video >= 0, neg_video, idx))).cls
            out["loss_vtm"], out["acc_vtm"] = self.vtm(model, cls[:, 0], cls[:, 1], neg, neg_text >= 0, neg_video >= 0)
            total = total + cfg.vtm * out["loss_vtm"]
            col = 2
        if mlm_index is not None:
            labels = batch["mlm_labels"]
            states = torch.cat([f.text_states.view(b, r.shape[1], n_text, -1) for f, r in zip(fused, passes)], 1)
            states = states[:, col]  # (b, n_text, D): a caption the fusion passed whole at its own positions
            row, pos = mlm_index // labels.shape[1], mlm_index % labels.shape[1]
            # a condensed caption has no per-token positions left to predict: weight 0, not
            # dropped, so that no shape depends on the data (no host sync)
            keep = (~model.long_text(mask)[row] & (pos < n_text)).float()
            logits = model.mlm_head(states.flatten(0, 1)[row * n_text + pos.clamp_max(n_text - 1)])
            target = labels.flatten()[mlm_index]
            n = keep.sum().clamp_min(1)
            out["loss_mlm"] = (F.cross_entropy(logits.float(), target, reduction="none") * keep).sum() / n
            out["acc_mlm"] = ((logits.argmax(1) == target).float() * keep).sum() / n
            total = total + cfg.mlm * out["loss_mlm"]
            col += 1
        if mcm:
            logits = model.mcm_head(cls[:, col : col + options]).squeeze(-1)  # (b, options)
            answer = batch["mcm_answer"]
            valid = answer.ne(-100)  # clips whose caption gave no question; 0 of them: loss 0
            n = valid.sum().clamp_min(1)
            out["loss_mcm"] = F.cross_entropy(logits.float(), answer, ignore_index=-100, reduction="sum") / n
            out["acc_mcm"] = ((logits.argmax(1) == answer) & valid).sum() / n
            total = total + cfg.mcm * out["loss_mcm"]
        out["loss"] = total
        out["objective"] = total + extra
        return out

    @staticmethod
    def vtm(
        model: MuLTI,
        pos: torch.Tensor,
        neg_text: torch.Tensor,
        neg_video: torch.Tensor,
        ok_text: torch.Tensor,
        ok_video: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Matching over the fused CLS of the positive pairs, each clip with a hard-negative
        caption and each caption with a hard-negative clip (``ok_*``: whether one was found)."""
        logits = model.vtm_head(torch.cat([pos, neg_text, neg_video]))
        zeros = torch.zeros(pos.shape[0], dtype=torch.long, device=logits.device)
        labels = torch.cat([torch.ones_like(zeros), zeros, zeros])
        # rows without a negative (every other caption identical) fused a stand-in pair: weight 0,
        # not dropped, so that no shape depends on the data (no host sync)
        weight = torch.cat([torch.ones_like(ok_text), ok_text, ok_video]).float()
        n = weight.sum()
        loss = (F.cross_entropy(logits.float(), labels, reduction="none") * weight).sum() / n
        return loss, ((logits.argmax(1) == labels).float() * weight).sum() / n

    def _mlm_index(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The masked positions (flat over the captions), or None when MLM does not run: weight 0,
        no masked captions, or nothing masked."""
        if self.cfg.mlm == 0 or "mlm_input_ids" not in batch:
            return None
        index = batch.get("mlm_index")  # found on the host by to_device
        if index is None:
            index = mask_index(batch["mlm_labels"].ne(-100))  # a host sync on GPU
        return index if index.numel() else None  # a shape: known on the host


def _stack_rows(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and masks of several text batches as one, padded to the longest (padding
    is masked: each row encodes as it would alone)."""
    length = max(ids.shape[1] for ids, _ in parts)
    ids = torch.cat([F.pad(i, (0, length - i.shape[1])) for i, _ in parts])
    mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for _, m in parts])
    return ids, mask
