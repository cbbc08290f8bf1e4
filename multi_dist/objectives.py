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
from .model.multi import MuLTI, TextOutput, VideoOutput


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
            raise ValueError("every loss weight is 0: nothing to train")


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
    """An int64 fingerprint per caption (a random linear hash of its token ids): equal captions,
    true positives for each other, share it."""
    gen = torch.Generator().manual_seed(1234)
    coeff = torch.randint(1, 2**31 - 1, (input_ids.shape[1],), generator=gen).to(input_ids.device)
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
    term by the world size for the backward pass.
    """
    all_text = gather_with_local_grad(text_embed, group)
    all_video = gather_with_local_grad(video_embed, group)
    all_fp = gather_with_local_grad(fingerprints, group)
    same = all_fp[:, None] == all_fp[None, :]
    scale = logit_scale.exp().clamp(max=100)
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
    positive (an identical caption counts as positive). Rows with no negative get -1."""
    weights = sim.float().softmax(1).masked_fill(same, 0.0)
    has_neg = weights.sum(1) > 0
    weights = torch.where(has_neg[:, None], weights, torch.ones_like(weights))
    picks = torch.multinomial(weights, 1).squeeze(1)
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
        cfg = self.cfg
        video = model.encode_video(batch["video"], batch.get("frame_mask"), batch.get("frame_index"))
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        out: dict[str, torch.Tensor] = {}
        total = video.tokens.new_zeros((), dtype=torch.float32)
        extra = total  # the VTC term's share beyond its weight: (world - 1) x weight x VTC
        rank, world = _world(self.group)
        b = text.embed.shape[0]
        fp = caption_ids(batch["input_ids"], batch["attention_mask"])
        if cfg.vtc > 0 or cfg.vtm > 0:
            vtc, t2v, acc = vtc_loss(text.embed, video.embed, model.logit_scale, fp, self.group)
            if cfg.vtc > 0:
                out["loss_vtc"], out["acc_vtc"] = vtc, acc
                total = total + cfg.vtc * vtc
                extra = (world - 1) * cfg.vtc * vtc  # see vtc_loss: the engine averages over ranks
        if cfg.vtm > 0 and b > 1:
            local = slice(rank * b, (rank + 1) * b)
            sim = t2v[local, local].detach()
            same = fp[:, None] == fp[None, :]
            out["loss_vtm"], out["acc_vtm"] = self.vtm(model, text, video, sim, same)
            total = total + cfg.vtm * out["loss_vtm"]
        if cfg.mlm > 0 and "mlm_input_ids" in batch:
            mlm = self.mlm(model, video, batch)
            if mlm is not None:
                out["loss_mlm"], out["acc_mlm"] = mlm
                total = total + cfg.mlm * out["loss_mlm"]
        if cfg.mcm > 0 and "mcm_input_ids" in batch:
            logits = model.mcm_logits(video, batch["mcm_input_ids"], batch["mcm_attention_mask"])
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
        model: MuLTI, text: TextOutput, video: VideoOutput, sim: torch.Tensor, same: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive pairs, plus per clip a hard negative caption and per caption a hard negative clip."""
        b = sim.shape[0]
        neg_text = sample_hard_negatives(sim.t(), same.t())  # for each video, a caption
        neg_video = sample_hard_negatives(sim, same)  # for each caption, a video
        idx = torch.arange(b, device=sim.device)
        ok_t, ok_v = neg_text >= 0, neg_video >= 0
        rows = torch.stack([idx, torch.where(ok_t, neg_text, idx)], 1).flatten()  # [pos, neg] per video
        pos_neg = model.fuse(text.select(rows), video, groups=2).cls.view(b, 2, -1)
        neg = model.fuse(text, video.select(torch.where(ok_v, neg_video, idx))).cls
        logits = model.vtm_head(torch.cat([pos_neg[:, 0], pos_neg[:, 1], neg]))
        zeros = torch.zeros(b, dtype=torch.long, device=logits.device)
        labels = torch.cat([torch.ones_like(zeros), zeros, zeros])
        # rows without a negative (every other caption identical) fused a stand-in pair: weight 0,
        # not dropped, so that no shape depends on the data (no host sync)
        weight = torch.cat([torch.ones_like(ok_t), ok_t, ok_v]).float()
        n = weight.sum()
        loss = (F.cross_entropy(logits.float(), labels, reduction="none") * weight).sum() / n
        return loss, ((logits.argmax(1) == labels).float() * weight).sum() / n

    @staticmethod
    def mlm(model: MuLTI, video: VideoOutput, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Masked words predicted from the fused text positions (skipped for condensed text)."""
        labels = batch["mlm_labels"]
        fc = model.cfg.fusion
        if fc.sampler != "none" and labels.shape[1] > fc.text_tokens:
            return None  # the text will be condensed: there are no per-token positions to predict
        index = batch.get("mlm_index")  # the masked positions, flat; found on the host by to_device
        if index is None:
            index = mask_index(labels.ne(-100))  # a host sync on GPU
        if index.numel() == 0:  # a shape: known on the host
            return None
        masked = model.encode_text(batch["mlm_input_ids"], batch["attention_mask"])
        fused = model.fuse(masked, video)
        logits = model.mlm_head(fused.text_states.flatten(0, 1)[index])
        target = labels.flatten()[index]
        return F.cross_entropy(logits.float(), target), (logits.argmax(1) == target).float().mean()
