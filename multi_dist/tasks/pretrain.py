"""Pretraining as a task: the VTC/VTM/MLM/MCM losses, and zero-shot evaluation (text<->video
retrieval by VTC, MCM accuracy) on held-out clips.

Clips whose captions read the same to the model (the same tokens: one caption for several clips,
as the demo's 200 held-out clips have 156) are one text with several true videos: text-to-video
finds any of them, and each of them finds that text. Counting a clip's twin as a miss capped
video-to-text recall of a perfect model at the share of unique captions."""

from __future__ import annotations

from typing import Any

import torch

from ..data.pipeline import DataConfig
from ..model.multi import MuLTI
from ..objectives import LossConfig, PretrainLoss
from .base import EvalContext, Task, TaskConfig
from .metrics import retrieval_metrics


class PretrainTask(Task):
    name = "pretrain"

    def __init__(
        self, cfg: TaskConfig, vocab: list[str] | None = None, seed: int = 0, loss: LossConfig | None = None
    ) -> None:
        super().__init__(cfg, vocab, seed)
        self.loss_fn = PretrainLoss(loss or LossConfig())

    def data_config(self, data: DataConfig, training: bool) -> DataConfig:
        return data  # MLM masks and MCM questions as configured

    def loss(self, model: MuLTI, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.loss_fn(model, batch)

    def eval_step(self, model: MuLTI, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        video = model.encode_video(batch["video"], batch.get("frame_mask"), batch.get("frame_index"))
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        correct = None
        if "mcm_input_ids" in batch:
            logits = model.mcm_logits(video, batch["mcm_input_ids"], batch["mcm_attention_mask"])
            answer = batch["mcm_answer"]
            correct = torch.where(answer.ne(-100), (logits.argmax(1) == answer).long(), -1).tolist()
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        records = []
        for i, key in enumerate(batch["key"]):
            r = {
                "key": key,
                "caption": batch["caption"][i],
                "tokens": tuple(ids[i][mask[i]].tolist()),
                "text": text.embed[i].float().cpu(),
                "video": video.embed[i].float().cpu(),
            }
            if correct is not None and correct[i] >= 0:
                r["mcm_correct"] = bool(correct[i])
                r["mcm_options"] = logits.shape[1]
            records.append(r)
        return records, {}

    def finish(
        self, model: MuLTI, records: list[dict[str, Any]], local: dict[str, Any], ctx: EvalContext
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        texts: dict[tuple[int, ...], int] = {}  # each distinct text (its tokens) -> its row
        clip_text = [texts.setdefault(r["tokens"], len(texts)) for r in records]
        first = {t: i for i, t in reversed(list(enumerate(clip_text)))}
        text = torch.stack([records[first[t]]["text"] for t in range(len(texts))])
        video = torch.stack([r["video"] for r in records])
        sim = text @ video.t()
        # each clip has one text, a text may have several clips: ranked with the clips as the queries
        # of their text, retrieval_metrics' "v2t" (best rank among a column's rows) is text-to-video
        m = retrieval_metrics(sim.t(), torch.tensor(clip_text))
        flip = {"t2v_": "v2t_", "v2t_": "t2v_"}
        metrics = {flip[k[:4]] + k[4:]: v for k, v in m.items() if k[:4] in flip}
        metrics["texts"] = float(len(texts))
        metrics["clips"] = float(len(records))
        metrics["chance_r1"] = 1.0 / len(texts)  # both ways: a text's k clips of n, averaged over the texts
        asked = [r for r in records if "mcm_correct" in r]
        if asked:
            metrics["mcm_acc"] = sum(r["mcm_correct"] for r in asked) / len(asked)
            metrics["mcm_chance"] = sum(1 / r["mcm_options"] for r in asked) / len(asked)
        best = sim.argmax(1).tolist()
        predictions = [
            {"key": r["key"], "caption": r["caption"], "t2v_top1": records[best[t]]["key"]}
            for r, t in zip(records, clip_text)
        ]
        return metrics, predictions
