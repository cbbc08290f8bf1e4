"""Video question answering: open-ended (a classifier over the training split's top-K answers)
and multiple choice (each candidate scored by the MCM head, as in pretraining).

A sample carries all its questions (``qa``: ``[{"question", "answer", "type"}]``; ``mc``:
``[{"question", "options", "answer", "type"}]`` or the demo's single ``options``/``answer``). The
video is encoded once and fused with each question (``groups``); a batch pads clips to the same
question count, and padding rows carry the ignore index.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
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
    item_rng,
    named,
    parse_field,
    sample_fields,
    tokenize,
    zero_loss,
)
from .metrics import accuracy_by_type

log = logging.getLogger("multi_dist.tasks")
IGNORE = -100
OUT_OF_VOCAB = -1  # evaluation: a real question whose answer the head cannot give (always wrong)
OPTION_PAD = -1e4  # logit of a padding option (finite: no NaN in the masked-out rows' gradients)


QA_FORM = '[{"question": "what is the man doing?", "answer": "cooking"}]'
MC_FIELDS = ("mc", "options", "question", "answer")
MC_FORM = '[{"question": "...", "options": ["a", "b"], "answer": 1}]'


def read_qa(value: Any, where: str) -> list[Any] | None:
    """A sample's ``qa`` field, parsed (a JSON string too); an error naming ``where`` if it is no list."""
    return check_list(parse_field(value, "qa", where), "qa", where, QA_FORM)


def read_mc(meta: dict[str, Any], where: str) -> list[Any] | None:
    """A sample's multiple-choice questions as stored: ``mc``, or top-level ``options``/``answer``."""
    raw = check_list(parse_field(meta.get("mc"), "mc", where), "mc", where, MC_FORM)
    if raw is None and meta.get("options") not in (None, ""):
        options = check_list(parse_field(meta["options"], "options", where), "options", where, '["a", "b"]')
        raw = [{"question": meta.get("question", ""), "options": options, "answer": meta.get("answer")}]
    return raw


def qa_items(meta: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The open-ended questions of a sample (``where``: the sample named); a malformed field or
    item is logged and dropped (the start-up check refuses a split whose fields are of the wrong
    form)."""
    try:
        raw = read_qa(meta.get("qa"), where)
    except ValueError as e:
        log.warning("%s", e)
        raw = None
    items = []
    for i, item in enumerate(raw or []):
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or "answer" not in item:
            log.warning("%s: qa item %d is malformed (needs question and answer): %r", where, i, item)
            continue
        items.append(
            {"question": item["question"], "answer": str(item["answer"]), "type": str(item.get("type", "all"))}
        )
    return items


def mc_items(meta: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The multiple-choice questions of a sample (``mc``, or top-level ``options``/``answer``)."""
    try:
        raw = read_mc(meta, where)
    except ValueError as e:
        log.warning("%s", e)
        raw = None
    items = []
    for i, item in enumerate(raw or []):
        options = item.get("options") if isinstance(item, dict) else None
        answer = item.get("answer") if isinstance(item, dict) else None
        if (
            not isinstance(options, list)
            or len(options) < 2
            or not isinstance(answer, int)
            or not 0 <= answer < len(options)
        ):
            log.warning("%s: multiple-choice item %d is malformed (options, answer index): %r", where, i, item)
            continue
        items.append(
            {
                "question": str(item.get("question") or ""),
                "options": [str(o) for o in options],
                "answer": answer,
                "type": str(item.get("type", "all")),
            }
        )
    return items


def _questions(path: str | list[str], max_shards: int) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """``(where, well-formed open-ended questions)`` of each sample of a split; an error naming the
    sample for a ``qa`` field that is no list."""
    for where, fields in sample_fields(path, ("qa",), max_shards):
        read_qa(fields["qa"], where)
        yield where, qa_items(fields, where)


def _choose(items: list[Any], limit: int, training: bool, seed: int, epoch: int, key: str) -> list[Any]:
    if training and len(items) > limit:
        return item_rng(seed, epoch, key).sample(items, limit)
    return items


class OpenQATask(Task):
    name = "qa"
    needs_vocab = True

    @classmethod
    def build_vocab(cls, cfg: TaskConfig, train_path: str | list[str]) -> list[str]:
        counts: Counter[str] = Counter()
        for _, items in _questions(train_path, 0):
            counts.update(item["answer"] for item in items)
        if not counts:
            raise ValueError(f"{train_path}: no 'qa' answers in the training split (is it a QA corpus?)")
        # most frequent first, ties alphabetical: the same vocabulary on every rank and rerun
        return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: cfg.answers]]

    def heads(self) -> dict[str, int]:
        return {"qa_answers": len(self.vocab)}

    def check_data(self, path: str | list[str], split: str, training: bool, quiet: bool = False) -> None:
        asked = outside = samples = 0
        for _, items in _questions(path, START_UP_SHARDS if training else 0):
            samples += bool(items)
            asked += len(items)
            outside += sum(item["answer"] not in self.index for item in items)
        if not samples:
            raise ValueError(
                f"{split} {named(path)}: no sample has open-ended questions ('qa', e.g. {QA_FORM}): task qa needs them"
            )
        if outside and not training and not quiet:
            log.warning(
                "%s: %d of %d answers (%.1f%%) are outside the %d-answer vocabulary of the training split: those "
                "questions count as wrong",
                split,
                outside,
                asked,
                100 * outside / asked,
                len(self.vocab),
            )

    def collate(
        self, samples: list[dict[str, Any]], tokenizer: Any, max_len: int, epoch: int, training: bool
    ) -> dict[str, Any]:
        rows = []
        for s in samples:
            items = qa_items(s["meta"], f"sample {s['key']}")
            if training:  # an answer outside the vocabulary teaches the head nothing
                items = [it for it in items if it["answer"] in self.index]
            rows.append(_choose(items, self.cfg.max_questions, training, self.seed, epoch, s["key"]))
        q = max(1, max(len(r) for r in rows))
        texts, answers = [], []
        for items in rows:
            for i in range(q):
                if i < len(items):
                    texts.append(items[i]["question"])
                    answers.append(self.index.get(items[i]["answer"], OUT_OF_VOCAB))
                else:
                    texts.append("")
                    answers.append(IGNORE)
        ids, mask = tokenize(tokenizer, texts, max_len)
        b = len(samples)
        return {
            "qa_input_ids": ids.view(b, q, -1),
            "qa_attention_mask": mask.view(b, q, -1),
            "qa_answer": torch.tensor(answers).view(b, q),
            "qa_items": rows,
        }

    def _logits(self, model: MuLTI, batch: dict[str, Any]) -> torch.Tensor:
        video = model.encode_video(batch["video"], batch.get("frame_mask"), batch.get("frame_index"))
        b, q, seq = batch["qa_input_ids"].shape
        text = model.encode_text(batch["qa_input_ids"].view(b * q, seq), batch["qa_attention_mask"].view(b * q, seq))
        return model.qa_logits(text, video, groups=q)

    def loss(self, model: MuLTI, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self._logits(model, batch)
        answer = batch["qa_answer"].view(-1)
        valid = answer >= 0
        if valid.any():
            loss = F.cross_entropy(logits[valid].float(), answer[valid])
            acc = (logits[valid].argmax(1) == answer[valid]).float().mean()
        else:
            loss, acc = zero_loss(logits), logits.new_zeros((), dtype=torch.float32)
        return {"loss": loss, "objective": loss, "loss_qa": loss, "acc_qa": acc}

    def eval_step(self, model: MuLTI, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        logits = self._logits(model, batch)
        q = batch["qa_input_ids"].shape[1]
        pred = logits.argmax(1).view(-1, q).tolist()
        records = []
        for i, key in enumerate(batch["key"]):
            items = [
                {**item, "prediction": self.vocab[pred[i][j]], "correct": self.vocab[pred[i][j]] == item["answer"]}
                for j, item in enumerate(batch["qa_items"][i])
            ]
            records.append({"key": key, "items": items})
        return records, {}

    def finish(
        self, model: MuLTI, records: list[dict[str, Any]], local: dict[str, Any], ctx: EvalContext
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        return _accuracy_report(records)


class ChoiceTask(Task):
    name = "choice"

    def check_data(self, path: str | list[str], split: str, training: bool, quiet: bool = False) -> None:
        samples = 0
        for where, fields in sample_fields(path, MC_FIELDS, START_UP_SHARDS if training else 0):
            read_mc(fields, where)
            samples += bool(mc_items(fields, where))
        if not samples:
            raise ValueError(
                f"{split} {named(path)}: no sample has multiple-choice questions ('mc', e.g. {MC_FORM}, or top-level "
                "'options' and 'answer'): task choice needs them"
            )

    def collate(
        self, samples: list[dict[str, Any]], tokenizer: Any, max_len: int, epoch: int, training: bool
    ) -> dict[str, Any]:
        rows = []
        for s in samples:
            items = mc_items(s["meta"], f"sample {s['key']}")
            rows.append(_choose(items, self.cfg.max_questions, training, self.seed, epoch, s["key"]))
        q = max(1, max(len(r) for r in rows))
        o = max([2] + [len(it["options"]) for r in rows for it in r])
        texts, valid, answers = [], [], []
        for items in rows:
            for i in range(q):
                item = items[i] if i < len(items) else None
                answers.append(item["answer"] if item else IGNORE)
                for j in range(o):
                    option = item["options"][j] if item and j < len(item["options"]) else None
                    valid.append(option is not None)
                    # the question and a candidate as one text, the way MCM saw its filled-in questions
                    texts.append(f"{item['question']} {option}".strip() if option is not None else "")
        ids, mask = tokenize(tokenizer, texts, max_len)
        b = len(samples)
        return {
            "mc_input_ids": ids.view(b, q * o, -1),
            "mc_attention_mask": mask.view(b, q * o, -1),
            "mc_option_mask": torch.tensor(valid).view(b, q, o),
            "mc_answer": torch.tensor(answers).view(b, q),
            "mc_items": rows,
        }

    def _logits(self, model: MuLTI, batch: dict[str, Any]) -> torch.Tensor:
        """Each option's score: the MCM head on the fused CLS, plus (``task.choice_score:
        mcm+vtc``) the option's scaled VTC similarity to the clip. Pretrained VTC already ranks
        whole captions; the fusion learns what similarity misses (e.g. temporal order)."""
        video = model.encode_video(batch["video"], batch.get("frame_mask"), batch.get("frame_index"))
        b, q, o = batch["mc_option_mask"].shape
        ids, mask = batch["mc_input_ids"], batch["mc_attention_mask"]
        text = model.encode_text(ids.flatten(0, 1), mask.flatten(0, 1))
        logits = model.mcm_head(model.fuse(text, video, groups=q * o).cls).view(b, q, o).float()
        if self.cfg.choice_score == "mcm+vtc":
            sim = (text.embed.view(b, q * o, -1) * video.embed[:, None]).sum(-1).view(b, q, o)
            logits = logits + model.logit_scale.exp().clamp(max=100).float() * sim.float()
        return logits.masked_fill(~batch["mc_option_mask"], OPTION_PAD)

    def loss(self, model: MuLTI, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self._logits(model, batch)
        o = logits.shape[2]
        logits, answer = logits.view(-1, o), batch["mc_answer"].view(-1)
        valid = answer >= 0
        if valid.any():
            loss = F.cross_entropy(logits[valid], answer[valid])
            acc = (logits[valid].argmax(1) == answer[valid]).float().mean()
        else:
            loss, acc = zero_loss(logits), logits.new_zeros(())
        return {"loss": loss, "objective": loss, "loss_choice": loss, "acc_choice": acc}

    def eval_step(self, model: MuLTI, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        logits = self._logits(model, batch)
        pred = logits.argmax(2).tolist()
        # correct only when the answer scores above every other option: two options that read the
        # same once truncated to the text length tie, and a tie counts against the model. Tied by
        # their tokens, not only by their scores: a CPU's matmul may round two identical rows of
        # one batch differently (seen on AVX-512), and the larger of the two is then noise
        b, q, o = logits.shape
        answer = batch["mc_answer"].clamp(min=0)
        ids = batch["mc_input_ids"].view(b, q, o, -1)
        mask = batch["mc_attention_mask"].view(b, q, o, -1)
        pick = answer[..., None, None].expand(b, q, 1, ids.shape[-1])
        alike = ((ids == ids.gather(2, pick)) & (mask == mask.gather(2, pick))).all(-1)
        alike &= batch["mc_option_mask"]  # (padding options of an empty answer read as it, and are none)
        twins = alike.scatter(2, answer[..., None], False)  # (b, q, o): other options that read as the answer
        own = logits.gather(2, answer[..., None])
        rivals = logits.scatter(2, answer[..., None], float("-inf")).masked_fill(twins, float("inf"))
        beaten = rivals.amax(2, keepdim=True) < own
        # a tie: the top score is the answer's or a twin's, whichever rounding put first
        tied = (alike.gather(2, logits.argmax(2, keepdim=True)) & ~beaten).squeeze(2).tolist()
        beaten = beaten.squeeze(2).tolist()
        records = []
        for i, key in enumerate(batch["key"]):
            items = [
                {
                    **item,
                    "prediction": pred[i][j],
                    "correct": beaten[i][j],
                    **({"tied": True} if tied[i][j] else {}),
                }
                for j, item in enumerate(batch["mc_items"][i])
            ]
            records.append({"key": key, "items": items})
        return records, {}

    def finish(
        self, model: MuLTI, records: list[dict[str, Any]], local: dict[str, Any], ctx: EvalContext
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        metrics, predictions = _accuracy_report(records)
        options = [len(p["options"]) for p in predictions]
        if options:
            metrics["chance"] = sum(1 / n for n in options) / len(options)
        return metrics, predictions


def _accuracy_report(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    predictions = [{"key": r["key"], **item} for r in records for item in r["items"]]
    if not predictions:
        raise ValueError("no questions in the evaluation split (do its samples carry the task's fields?)")
    report = accuracy_by_type([p["correct"] for p in predictions], [p["type"] for p in predictions])
    metrics: dict[str, Any] = {"acc": report["acc"], "questions": float(report["count"])}
    by_type = report.get("acc_by_type") or {}
    if len(by_type) > 1:
        metrics.update({f"acc_{t}": v for t, v in sorted(by_type.items())})
    # TGIF-QA Count is reported as the mean squared error of the predicted number (lower is better)
    counts = [p for p in predictions if p["type"] == "count" and str(p["answer"]).isdigit()]
    if counts:
        numbers = [(int(p["prediction"]), int(p["answer"])) for p in counts if str(p["prediction"]).isdigit()]
        metrics["mse_count"] = sum((a - b) ** 2 for a, b in numbers) / len(numbers) if numbers else float("nan")
        metrics["count_not_a_number"] = float(len(counts) - len(numbers))  # predictions left out of the MSE
    return metrics, predictions
