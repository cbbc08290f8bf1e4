"""Text-video retrieval: finetuned with VTC (+ VTM hard negatives) on one caption per clip and
epoch; evaluated by ranking everything with VTC, then re-ranking each query's top-k with VTM.

A sample carries all its captions (``captions``; else its ``caption``): MSR-VTT has 20 per video,
DiDeMo's paragraph is one. Evaluation ranks every caption against every video (t2v: the rank of
the caption's video) and every video against every caption (v2t: the best rank among the video's
own captions), ties counted against the model.

Re-ranking adds the VTM head's match log-odds to the (scaled) VTC score of each query's top-k
candidates, which stay ahead of the rest: a confident VTM reorders them, an uncertain one (early
in training) leaves the VTC order as it was. Candidates tied at the k-th place are re-ranked all
or none (:func:`top_k_mask`), so that ties keep counting against the model.

Re-ranking across ranks: text embeddings, token ids and video embeddings are gathered (small);
video tokens stay on the rank that encoded them. For each query's top-k pairs, the rank owning
the video fuses it with the re-encoded text; the VTM scores are summed over ranks. Every rank
runs the same number of fusion chunks (ZeRO-3 gathers weights collectively).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist

from ..data.pipeline import DataConfig
from ..metrics import Progress
from ..model.multi import MuLTI, VideoOutput
from ..objectives import LossConfig, PretrainLoss
from .base import (
    START_UP_SHARDS,
    EvalContext,
    Task,
    TaskConfig,
    check_list,
    item_rng,
    parse_field,
    sample_fields,
    tokenize,
)
from .metrics import retrieval_metrics

log = logging.getLogger("multi_dist.tasks")
TOP = 10  # rankings written per query
RERANKED = 1e4  # added to re-ranked candidates' scores: they stay ahead of the rest


CAPTIONS_FORM = '["a man cooks", "someone makes dinner"]'


def read_captions(value: Any, where: str) -> list[Any] | None:
    """A sample's ``captions`` field, parsed (a JSON string too); an error naming ``where`` if it
    is no list."""
    return check_list(parse_field(value, "captions", where), "captions", where, CAPTIONS_FORM)


def captions_of(sample: dict[str, Any]) -> list[str]:
    """A sample's captions: ``captions``, else its caption (also for a malformed field, logged)."""
    try:
        caps = read_captions(sample["meta"].get("captions"), f"sample {sample['key']}")
    except ValueError as e:
        log.warning("%s", e)
        caps = None
    if caps:
        return [str(c) for c in caps if str(c).strip()] or [sample["caption"]]
    return [sample["caption"]]


def _first_of_equal_texts(records: list[dict[str, Any]]) -> torch.Tensor:
    """For each text of the records (in order), the index of the first text with the same tokens."""
    ids = torch.cat([r["ids"] for r in records])
    mask = torch.cat([r["mask"] for r in records]).bool()
    seen: dict[tuple[int, ...], int] = {}
    return torch.tensor([seen.setdefault(tuple(ids[i][mask[i]].tolist()), i) for i in range(len(ids))])


class RetrievalTask(Task):
    name = "retrieval"

    def __init__(
        self, cfg: TaskConfig, vocab: list[str] | None = None, seed: int = 0, loss: LossConfig | None = None
    ) -> None:
        super().__init__(cfg, vocab, seed)
        w = loss or LossConfig()
        self.loss_fn = PretrainLoss(LossConfig(vtc=w.vtc, vtm=w.vtm, mlm=0.0, mcm=0.0))

    def data_config(self, data: DataConfig, training: bool) -> DataConfig:
        cfg = super().data_config(data, training)
        cfg.require_caption = True
        return cfg

    def check_data(self, path: str | list[str], split: str, training: bool, quiet: bool = False) -> None:
        for where, fields in sample_fields(path, ("captions",), START_UP_SHARDS if training else 0):
            read_captions(fields["captions"], where)

    def collate(
        self, samples: list[dict[str, Any]], tokenizer: Any, max_len: int, epoch: int, training: bool
    ) -> dict[str, Any]:
        if training:  # one caption per clip, drawn per (key, epoch): VTC/VTM read input_ids
            chosen = [item_rng(self.seed, epoch, s["key"]).choice(captions_of(s)) for s in samples]
            ids, mask = tokenize(tokenizer, chosen, max_len)
            return {"input_ids": ids, "attention_mask": mask, "caption": chosen}
        texts, owner = [], []
        for i, s in enumerate(samples):
            caps = captions_of(s)
            texts += caps
            owner += [i] * len(caps)
        ids, mask = tokenize(tokenizer, texts, max_len)
        return {"ret_input_ids": ids, "ret_attention_mask": mask, "ret_owner": torch.tensor(owner), "ret_texts": texts}

    def loss(self, model: MuLTI, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.loss_fn(model, batch)

    def eval_step(self, model: MuLTI, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        video = model.encode_video(batch["video"], batch.get("frame_mask"), batch.get("frame_index"))
        text = model.encode_text(batch["ret_input_ids"], batch["ret_attention_mask"])
        owner = batch["ret_owner"].tolist()
        # read inside the forward: under ZeRO-3 parameters are only whole there
        scale = float(model.logit_scale.detach().float().exp().clamp(max=100))
        records, local = [], {}
        for i, key in enumerate(batch["key"]):
            rows = [j for j, o in enumerate(owner) if o == i]
            records.append(
                {
                    "key": key,
                    "video": video.embed[i].float().cpu(),
                    "texts": batch["ret_texts"][rows[0] : rows[-1] + 1],
                    "text": text.embed[rows].float().cpu(),
                    "ids": batch["ret_input_ids"][rows].cpu(),
                    "mask": batch["ret_attention_mask"][rows].cpu(),
                    "scale": scale,
                }
            )
            # what fusion needs of this clip later, kept on this rank only
            local[key] = (video.tokens[i].cpu(), video.mask[i].cpu())
        return records, local

    def finish(
        self, model: MuLTI, records: list[dict[str, Any]], local: dict[str, Any], ctx: EvalContext
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        videos = torch.stack([r["video"] for r in records])
        # a caption that several clips share (the same tokens) must score alike for each of them:
        # encoded in other batches, or fused in other chunks (which depend on the number of ranks),
        # its copies differed in their last bits, and their exact tie (counted against the model)
        # became a rank that flipped with the number of processes. Each copy takes the first's.
        first = _first_of_equal_texts(records)
        text = torch.cat([r["text"] for r in records])[first]
        text_video = torch.cat([torch.full((len(r["texts"]),), i) for i, r in enumerate(records)])
        texts = [t for r in records for t in r["texts"]]
        sim = text @ videos.t()
        vtc = retrieval_metrics(sim, text_video)
        metrics: dict[str, float] = {f"vtc_{k}": v for k, v in vtc.items() if k.startswith(("t2v_", "v2t_"))}
        t2v, v2t = sim, sim
        k = min(self.cfg.rerank_k, sim.shape[1])
        if k > 1:
            # each text's top-k videos, each video's top-k texts
            in_t2v = top_k_mask(sim, k, dim=1)
            in_v2t = top_k_mask(sim, min(self.cfg.rerank_k, sim.shape[0]), dim=0)
            vtm = self._vtm_scores(model, records, local, in_t2v | in_v2t, ctx)[first]
            # in float64: float32 steps by 1e-3 near RERANKED, which would tie scores that differ
            scaled = records[0]["scale"] * sim.double()
            reranked = RERANKED + scaled + vtm.double()
            t2v = torch.where(in_t2v, reranked, scaled)
            v2t = torch.where(in_v2t, reranked, scaled)
        m_t2v = retrieval_metrics(t2v, text_video)
        m_v2t = retrieval_metrics(v2t, text_video)
        metrics.update({k_: v for k_, v in m_t2v.items() if k_.startswith("t2v_")})
        metrics.update({k_: v for k_, v in m_v2t.items() if k_.startswith("v2t_")})
        metrics["texts"], metrics["videos"] = float(len(texts)), float(len(records))
        metrics["chance_r1"] = 1.0 / len(records)
        top = t2v.topk(min(TOP, t2v.shape[1]), dim=1)
        keys = [r["key"] for r in records]
        rankings = [
            {
                "text": texts[i],
                "video": keys[int(text_video[i])],
                "ranking": [keys[j] for j in top.indices[i].tolist()],
                "scores": [round(float(s), 5) for s in top.values[i]],
            }
            for i in range(len(texts))
        ]
        return metrics, rankings

    def _vtm_scores(
        self,
        model: MuLTI,
        records: list[dict[str, Any]],
        local: dict[str, Any],
        chosen: torch.Tensor,
        ctx: EvalContext,
    ) -> torch.Tensor:
        """VTM match log-odds of the ``chosen`` (text, video) pairs (zeros elsewhere), computed
        where the videos live and summed over ranks."""
        mine = [(t, v) for t, v in chosen.nonzero().tolist() if records[v]["rank"] == ctx.rank]
        ids = torch.cat([r["ids"] for r in records])
        mask = torch.cat([r["mask"] for r in records])
        chunk = max(1, ctx.batch_size * 4)
        n_chunks = torch.tensor([math.ceil(len(mine) / chunk)], device=ctx.device)
        if ctx.world > 1:
            dist.all_reduce(n_chunks, op=dist.ReduceOp.MAX)
        scores = torch.zeros(chosen.shape)
        width = model.cfg.fusion.width
        progress = Progress("VTM re-ranking", int(n_chunks.item()), "chunks", enabled=ctx.rank == 0)
        for c in range(int(n_chunks.item())):
            part = mine[c * chunk : (c + 1) * chunk]
            if part:
                t_idx = [t for t, _ in part]
                tokens = torch.stack([local[records[v]["key"]][0] for _, v in part])
                vmask = torch.stack([local[records[v]["key"]][1] for _, v in part])
            else:  # nothing left here: a dummy pass keeps step with the other ranks
                t_idx = [0]
                tokens, vmask = torch.zeros(1, 1, width), torch.ones(1, 1, dtype=torch.bool)
            batch = {
                "input_ids": ids[t_idx].to(ctx.device),
                "attention_mask": mask[t_idx].to(ctx.device),
                "tokens": tokens.to(ctx.device, torch.bfloat16 if ctx.bf16 else torch.float32),
                "video_mask": vmask.to(ctx.device),
            }
            prob = model(batch, _vtm_match).float().cpu()
            for (t, v), p in zip(part, prob.tolist()):
                scores[t, v] = p
            progress.update()
        progress.close()
        if ctx.world > 1:
            scores = scores.to(ctx.device)
            dist.all_reduce(scores)
            scores = scores.cpu()
        return scores


def top_k_mask(sim: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Each row's (``dim=1``) or column's (``dim=0``) ``k`` highest scores of ``sim``, as a mask.
    Scores tied with the k-th are all in or all out, never some of them by position, which would
    lift whichever came first above its equals: in when they add at most ``k`` beyond the k-th,
    else out (a degenerate model's equal scores re-rank nothing; ties count against it)."""
    kth = sim.topk(k, dim=dim).values.narrow(dim, k - 1, 1)
    with_ties = sim >= kth
    return torch.where(with_ties.sum(dim, keepdim=True) <= 2 * k, with_ties, sim > kth)


def _vtm_match(model: MuLTI, batch: dict[str, Any]) -> torch.Tensor:
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    b = batch["tokens"].shape[0]
    empty = batch["tokens"].new_zeros(b, 1)
    video = VideoOutput(batch["tokens"], batch["video_mask"], empty, empty)
    logits = model.vtm_head(model.fuse(text, video).cls).float()
    return logits[:, 1] - logits[:, 0]
