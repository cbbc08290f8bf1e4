"""Multi-label video classification: binary cross-entropy over the label set; mAP, micro/macro F1
and a per-class report.

The head reads the multimodal CLS (``model.heads.label_source: fusion``; the text is the clip's
caption or title, or ``task.prompt`` for every clip) or the video's global feature alone
(``label_source: video``). The label set is ``task.labels`` or every label of the training split.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from ..model.multi import MuLTI
from .base import (
    START_UP_SHARDS,
    EvalContext,
    Task,
    TaskConfig,
    check_list,
    named,
    parse_field,
    sample_fields,
    tokenize,
)
from .metrics import multilabel_metrics

log = logging.getLogger("multi_dist.tasks")


LABELS_FORM = '["cat", "dog"]'


def read_labels(value: Any, where: str) -> list[str] | None:
    """A sample's ``labels`` field, parsed (a JSON string too) as names; an error naming ``where``
    if it is no list."""
    labels = check_list(parse_field(value, "labels", where), "labels", where, LABELS_FORM)
    return None if labels is None else [str(x) for x in labels]


def _labels(path: str | list[str], max_shards: int = 0) -> list[list[str] | None]:
    return [read_labels(fields["labels"], where) for where, fields in sample_fields(path, ("labels",), max_shards)]


class LabelsTask(Task):
    name = "labels"
    needs_vocab = True

    @classmethod
    def build_vocab(cls, cfg: TaskConfig, train_path: str | list[str]) -> list[str]:
        if cfg.labels:
            return list(cfg.labels)
        names = {x for value in _labels(train_path) for x in value or []}
        if not names:
            raise ValueError(f"{train_path}: no 'labels' in the training split; set task.labels or convert labels")
        return sorted(names)

    def heads(self) -> dict[str, int]:
        return {"num_labels": len(self.vocab)}

    def check_data(self, path: str | list[str], split: str, training: bool, quiet: bool = False) -> None:
        values = _labels(path, START_UP_SHARDS if training else 0)
        if not any(values):
            raise ValueError(
                f"{split} {named(path)}: no sample has labels ('labels', e.g. {LABELS_FORM}): task labels needs them"
            )
        given = sum(len(v) for v in values if v)
        outside = sorted({x for v in values if v for x in v if x not in self.index})
        dropped = sum(x not in self.index for v in values if v for x in v)
        if dropped and not quiet:
            log.warning(
                "%s: %d of %d labels (%.1f%%; %d classes, e.g. %s) are outside the %d-class label set%s: they are "
                "neither trained nor scored",
                split,
                dropped,
                given,
                100 * dropped / given,
                len(outside),
                ", ".join(outside[:5]),
                len(self.vocab),
                "" if self.cfg.labels else " of the training split",
            )

    def collate(
        self, samples: list[dict[str, Any]], tokenizer: Any, max_len: int, epoch: int, training: bool
    ) -> dict[str, Any]:
        targets = torch.zeros(len(samples), len(self.vocab))
        for i, s in enumerate(samples):
            try:
                labels = read_labels(s["meta"].get("labels"), f"sample {s['key']}") or []
            except ValueError as e:  # the start-up check read this split whole, or its first shards
                log.warning("%s", e)
                labels = []
            for x in labels:
                if x in self.index:
                    targets[i, self.index[x]] = 1.0
        texts = [self.cfg.prompt or s["caption"] for s in samples]
        ids, mask = tokenize(tokenizer, texts, max_len)
        return {"label_targets": targets, "label_input_ids": ids, "label_attention_mask": mask}

    def _logits(self, model: MuLTI, batch: dict[str, Any]) -> torch.Tensor:
        video = model.encode_video(batch["video"], batch.get("frame_mask"), batch.get("frame_index"))
        text = None
        if model.cfg.heads.label_source == "fusion":
            text = model.encode_text(batch["label_input_ids"], batch["label_attention_mask"])
        return model.label_logits(video, text).float()

    def loss(self, model: MuLTI, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self._logits(model, batch)
        targets = batch["label_targets"].float()
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        acc = ((logits >= 0).float() == targets).float().mean()  # per-decision accuracy: a cheap progress signal
        return {"loss": loss, "objective": loss, "loss_labels": loss, "acc_labels": acc}

    def eval_step(self, model: MuLTI, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        probs = self._logits(model, batch).sigmoid().cpu()
        targets = batch["label_targets"].cpu()
        return [
            {"key": key, "scores": probs[i], "targets": targets[i].bool()} for i, key in enumerate(batch["key"])
        ], {}

    def finish(
        self, model: MuLTI, records: list[dict[str, Any]], local: dict[str, Any], ctx: EvalContext
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        scores = torch.stack([r["scores"] for r in records])
        targets = torch.stack([r["targets"] for r in records])
        report = multilabel_metrics(scores, targets, self.vocab, self.cfg.threshold)
        metrics: dict[str, Any] = {
            k: report[k] for k in ("map", "micro_precision", "micro_recall", "micro_f1", "macro_f1")
        }
        metrics["clips"] = float(len(records))
        # chance level of mAP: the mean base rate of the classes that occur
        present = targets.float().mean(0)[targets.any(0)]
        metrics["chance_map"] = float(present.mean()) if len(present) else 0.0
        metrics["per_class"] = report["per_class"]
        predictions = [
            {
                "key": r["key"],
                "labels": [self.vocab[j] for j in r["targets"].nonzero().flatten().tolist()],
                "predicted": [self.vocab[j] for j in (r["scores"] >= self.cfg.threshold).nonzero().flatten().tolist()],
                "scores": {self.vocab[j]: round(float(s), 4) for j, s in enumerate(r["scores"])},
            }
            for r in records
        ]
        return metrics, predictions
