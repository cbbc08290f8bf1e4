"""Downstream evaluation metrics: text<->video retrieval, multi-label classification (mAP, F1),
question-answering accuracy by question type, and top-k accuracy.

Every function is pure, takes tensors (moved to the CPU here) and returns plain Python floats, ints,
lists and dicts, so a result goes straight into ``json.dumps``. Counts and means are taken in float64
so that a large evaluation set does not lose precision in float32 sums. Ranks only compare scores, which
is exact in any dtype.

Ties are counted pessimistically everywhere a rank appears (a wrong candidate with a score equal to the
truth's ranks ahead of it): a model that outputs constant scores, or collapsed embeddings, then scores
at chance or below instead of perfectly, and the result does not depend on the order of the candidates.
Average precision follows sklearn instead (tied scores form one threshold), because mAP numbers are
compared with published ones that are computed with sklearn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "accuracy_by_type",
    "average_precision",
    "multilabel_metrics",
    "retrieval_metrics",
    "retrieval_ranks",
    "topk_accuracy",
]

# Rows of the similarity matrix are compared in blocks of about this many entries, so that a
# 25k-caption x 5k-video evaluation does not allocate several (n_text, n_video) float64/bool temporaries.
_CHUNK_ELEMENTS = 1 << 22


def _check_finite_order(x: torch.Tensor, what: str) -> None:
    """NaN compares false with everything: a NaN score would silently rank first (nothing is >= it),
    so it is an error rather than a metric."""
    if x.is_floating_point() and bool(torch.isnan(x).any()):
        raise ValueError(f"{what} contains NaN")


def _check_retrieval(sim: torch.Tensor, text_video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sim = torch.as_tensor(sim).detach().cpu()
    text_video = torch.as_tensor(text_video).detach().cpu()
    if sim.dim() != 2:
        raise ValueError(f"sim must be (n_text, n_video), got shape {tuple(sim.shape)}")
    n_text, n_video = sim.shape
    if n_text == 0 or n_video == 0:
        raise ValueError(f"retrieval needs at least one text and one video, got sim of shape {tuple(sim.shape)}")
    if text_video.dim() != 1 or text_video.numel() != n_text:
        raise ValueError(f"text_video must be ({n_text},), got shape {tuple(text_video.shape)}")
    if text_video.is_floating_point() or text_video.dtype == torch.bool:
        raise ValueError(f"text_video must hold integer video indices, got {text_video.dtype}")
    text_video = text_video.long()
    if bool((text_video < 0).any()) or bool((text_video >= n_video).any()):
        raise ValueError(f"text_video has indices outside [0, {n_video})")
    _check_finite_order(sim, "sim")
    return sim, text_video


def retrieval_ranks(sim: torch.Tensor, text_video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks of the truth for text->video and video->text retrieval.

    ``sim`` is ``(n_text, n_video)``; ``text_video[i]`` is the video of text ``i``. A video may have several
    captions (MSR-VTT's 20, MSVD's ~40) or none (it is then only a distractor for t2v and gets no v2t rank).

    Returns ``(t2v, v2t)``:

    - ``t2v`` ``(n_text,)``: in text ``i``'s row, the number of videos scoring ``>=`` its own video
      (its own included), i.e. its rank when every tied wrong video is put ahead of it.
    - ``v2t`` ``(n_video_with_captions,)``, in increasing video index: in the video's column, ranking all
      texts, the best rank among its captions, i.e. one plus the number of *other* videos' captions that
      score ``>=`` its best caption. A tie between two captions of the same video costs nothing: either of
      them first is a hit, so only wrong texts are put ahead of the truth.

    Ranking over all texts (rather than one candidate per video) is the protocol of ALBEF/BLIP-style
    multi-caption image->text evaluation. It agrees with CLIP4Clip's multi-sentence evaluation (which scores
    each caption group by its best caption) on R@1, and is stricter on R@5/R@10/MdR because a wrong video
    with several high-scoring captions counts once per caption.
    """
    sim, text_video = _check_retrieval(sim, text_video)
    n_text, n_video = sim.shape
    video_ids = torch.arange(n_video)
    truth = sim[torch.arange(n_text), text_video].to(torch.float64)
    captioned = torch.bincount(text_video, minlength=n_video) > 0
    # best[v]: the highest score any caption of v gets in v's column (-inf for a video without caption:
    # it is dropped below, the value only keeps the comparison well defined)
    best = torch.full((n_video,), -math.inf, dtype=torch.float64).scatter_reduce(0, text_video, truth, "amax")
    t2v = torch.empty(n_text, dtype=torch.long)
    ahead = torch.zeros(n_video, dtype=torch.long)  # other videos' captions scoring >= best, per column
    step = max(1, _CHUNK_ELEMENTS // n_video)
    for start in range(0, n_text, step):
        stop = min(start + step, n_text)
        block = sim[start:stop].to(torch.float64)
        t2v[start:stop] = (block >= truth[start:stop, None]).sum(1)
        other = text_video[start:stop, None] != video_ids[None, :]
        ahead += ((block >= best[None, :]) & other).sum(0)
    v2t = (ahead + 1)[captioned]
    return t2v, v2t


def _rank_summary(prefix: str, ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Recall@k as fractions, the median rank (the mean of the two middle ranks on an even count, as
    ``np.median`` in the usual evaluation code) and the mean rank."""
    r = ranks.to(torch.float64).sort().values
    n = r.numel()
    out = {f"{prefix}_r{k}": float((r <= k).to(torch.float64).mean()) for k in ks}
    out[f"{prefix}_medr"] = float((r[(n - 1) // 2] + r[n // 2]) / 2)
    out[f"{prefix}_meanr"] = float(r.mean())
    return out


def retrieval_metrics(sim: torch.Tensor, text_video: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@k (fractions in [0, 1]), median and mean rank in both directions (see :func:`retrieval_ranks`).

    Keys: ``t2v_r{k}`` for each k, ``t2v_medr``, ``t2v_meanr``, the same with ``v2t_``, and the counts
    ``n_text``, ``n_video`` (all columns, distractors included) and ``n_video_captioned`` (the videos
    ranked in v2t), so that a number can be told apart from one on a different split size.
    """
    ks = tuple(ks)
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    t2v, v2t = retrieval_ranks(sim, text_video)
    n_text, n_video = torch.as_tensor(sim).shape
    return {
        **_rank_summary("t2v", t2v, ks),
        **_rank_summary("v2t", v2t, ks),
        "n_text": int(n_text),
        "n_video": int(n_video),
        "n_video_captioned": int(v2t.numel()),
    }


def _as_bool(x: torch.Tensor | Sequence[Any], what: str) -> torch.Tensor:
    """Targets and correctness flags arrive as bool, 0/1 ints or 0./1. floats; anything else (a label
    index, a probability) is a caller bug that would otherwise be read as "true"."""
    t = torch.as_tensor(x).detach().cpu()
    if t.dtype != torch.bool:
        if bool(((t != 0) & (t != 1)).any()):
            raise ValueError(f"{what} must be bool or 0/1")
        t = t != 0
    return t


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Non-interpolated average precision, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds
    in decreasing order: the value of sklearn's ``average_precision_score``.

    Tied scores form one threshold, so a group of tied items is credited with the precision at the end of
    the group (neither the best nor the worst order inside it). NaN when there is no positive: AP is then
    undefined, and :func:`multilabel_metrics` leaves such a class out of the mean.
    """
    s = torch.as_tensor(scores).detach().cpu()
    t = _as_bool(targets, "targets")
    if s.dim() != 1 or s.shape != t.shape:
        raise ValueError(f"scores and targets must be 1-D of the same length, got {tuple(s.shape)}, {tuple(t.shape)}")
    _check_finite_order(s, "scores")
    n_pos = int(t.sum())
    if n_pos == 0:
        return math.nan
    order = torch.argsort(s, descending=True, stable=True)
    s, hits = s[order], t[order].to(torch.float64)
    tp = hits.cumsum(0)
    last = torch.ones(s.numel(), dtype=torch.bool)  # the last item of each run of equal scores
    last[:-1] = s[1:] != s[:-1]
    tp_at = tp[last]
    seen_at = (torch.nonzero(last).squeeze(1) + 1).to(torch.float64)
    recall_step = torch.diff(tp_at, prepend=tp_at.new_zeros(1)) / n_pos
    return float((recall_step * tp_at / seen_at).sum())


def _ratio(num: float, den: float) -> float | None:
    """``None`` (JSON null) for an undefined ratio, so that a result never carries a NaN."""
    return num / den if den > 0 else None


def multilabel_metrics(
    scores: torch.Tensor, targets: torch.Tensor, names: Sequence[str] | None = None, threshold: float = 0.5
) -> dict[str, Any]:
    """mAP and thresholded precision/recall/F1 for multi-label classification.

    ``scores`` ``(n, C)`` are probabilities (sigmoid already applied); ``targets`` ``(n, C)`` bool or 0/1;
    a decision is ``score >= threshold``.

    - ``map``: mean AP over the classes with at least one positive. A class without positive in the split
      has no AP; counting it as 0 (or 1) would move the mean by an amount that depends on the split, so
      it is excluded and listed by name in ``absent_classes`` (``map`` is ``None`` if every class is).
    - ``micro_precision``/``micro_recall``/``micro_f1``: over all ``n * C`` decisions pooled, dominated by
      the frequent classes.
    - ``macro_f1``: the mean per-class F1 over the classes that have a positive or a prediction (F1 is
      ``2tp / (2tp + fp + fn)``, undefined only when both are missing); every such class weighs the same.
    - ``per_class``: ``{name: {"ap", "precision", "recall", "f1", "support"}}``, ``support`` the number of
      positives; an undefined value (no prediction -> precision, no positive -> AP and recall) is ``None``.

    Also returned: ``threshold``, ``n`` and ``n_classes``.
    """
    s = torch.as_tensor(scores).detach().cpu()
    t = _as_bool(targets, "targets")
    if s.dim() != 2 or s.shape != t.shape:
        raise ValueError(f"scores and targets must be (n, C) of the same shape, got {tuple(s.shape)}, {tuple(t.shape)}")
    _check_finite_order(s, "scores")
    n, n_classes = s.shape
    if n == 0:
        raise ValueError("multilabel_metrics needs at least one sample")
    names = [str(c) for c in range(n_classes)] if names is None else [str(x) for x in names]
    if len(names) != n_classes or len(set(names)) != n_classes:
        raise ValueError(f"names must be {n_classes} distinct strings, got {len(names)} ({len(set(names))} distinct)")

    pred = s >= threshold
    tp = (pred & t).sum(0).tolist()
    fp = (pred & ~t).sum(0).tolist()
    fn = (~pred & t).sum(0).tolist()
    per_class: dict[str, dict[str, Any]] = {}
    aps: list[float] = []
    f1s: list[float] = []
    absent: list[str] = []
    for c, name in enumerate(names):
        support = tp[c] + fn[c]
        ap = average_precision(s[:, c], t[:, c]) if support > 0 else None
        if ap is None:
            absent.append(name)
        else:
            aps.append(ap)
        f1 = _ratio(2 * tp[c], 2 * tp[c] + fp[c] + fn[c])
        if f1 is not None:
            f1s.append(f1)
        per_class[name] = {
            "ap": ap,
            "precision": _ratio(tp[c], tp[c] + fp[c]),
            "recall": _ratio(tp[c], support),
            "f1": f1,
            "support": int(support),
        }
    tp_all, fp_all, fn_all = sum(tp), sum(fp), sum(fn)
    return {
        "map": math.fsum(aps) / len(aps) if aps else None,
        "micro_precision": _ratio(tp_all, tp_all + fp_all),
        "micro_recall": _ratio(tp_all, tp_all + fn_all),
        "micro_f1": _ratio(2 * tp_all, 2 * tp_all + fp_all + fn_all),
        "macro_f1": math.fsum(f1s) / len(f1s) if f1s else None,
        "absent_classes": absent,
        "per_class": per_class,
        "threshold": float(threshold),
        "n": int(n),
        "n_classes": int(n_classes),
    }


def accuracy_by_type(correct: torch.Tensor | Sequence[bool], types: Sequence[str] | None = None) -> dict[str, Any]:
    """Overall accuracy, and per question type (MSRVTT-QA's what/who/how/when/where, TGIF's action/
    transition/frameqa...) when ``types`` is given, because the overall number hides which kinds of
    question a model fails.

    Returns ``{"acc", "count", "acc_by_type", "count_by_type"}``, the per-type dicts sorted by type name
    and empty when ``types`` is None. An empty input is an error: it means the evaluation saw no data,
    which should not be reported as some accuracy.
    """
    c = _as_bool(correct, "correct")
    if c.dim() != 1:
        raise ValueError(f"correct must be 1-D, got shape {tuple(c.shape)}")
    n = c.numel()
    if n == 0:
        raise ValueError("accuracy_by_type needs at least one answer")
    flags = c.tolist()
    out: dict[str, Any] = {"acc": sum(flags) / n, "count": n, "acc_by_type": {}, "count_by_type": {}}
    if types is None:
        return out
    types = [str(x) for x in types]
    if len(types) != n:
        raise ValueError(f"types has {len(types)} entries for {n} answers")
    hits: dict[str, int] = {}
    counts: dict[str, int] = {}
    for ok, kind in zip(flags, types):
        hits[kind] = hits.get(kind, 0) + int(ok)
        counts[kind] = counts.get(kind, 0) + 1
    for kind in sorted(counts):
        out["acc_by_type"][kind] = hits[kind] / counts[kind]
        out["count_by_type"][kind] = counts[kind]
    return out


def topk_accuracy(
    logits: torch.Tensor, target: torch.Tensor, k: int = 1, ignore_index: int = -100, count_ignored: bool = False
) -> float:
    """Fraction of rows whose target class is among the ``k`` highest logits.

    ``logits`` ``(..., C)``, ``target`` of the leading shape (so per-token logits ``(B, L, V)`` with
    ``(B, L)`` targets work as they are). A row hits when fewer than ``k`` *other* classes score ``>=``
    the target's logit: ties are pessimistic, as in the retrieval ranks, unlike ``torch.topk`` whose pick
    among tied logits is arbitrary. Rows whose target is ``ignore_index`` (padding, unmasked tokens) are
    left out, unless ``count_ignored=True``, which keeps them in the denominator as misses (for a
    "fraction of all questions answered" where unanswerable ones were marked ignored).
    """
    x = torch.as_tensor(logits).detach().cpu()
    y = torch.as_tensor(target).detach().cpu()
    if x.dim() < 1 or tuple(y.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"target must have shape logits.shape[:-1], got {tuple(y.shape)} for {tuple(x.shape)}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    n_classes = x.shape[-1]
    x = x.reshape(-1, n_classes)
    y = y.reshape(-1).long()
    keep = y != ignore_index
    rows, labels = x[keep], y[keep]
    if bool(((labels < 0) | (labels >= n_classes)).any()):
        raise ValueError(f"target has classes outside [0, {n_classes}) that are not ignore_index={ignore_index}")
    _check_finite_order(rows, "logits")
    denominator = y.numel() if count_ignored else labels.numel()
    if denominator == 0:
        raise ValueError("topk_accuracy needs at least one row with a target")
    truth = rows.gather(1, labels[:, None])
    ahead = (rows >= truth).sum(1) - 1  # other classes scoring >= the target's logit
    return int((ahead < k).sum()) / denominator
