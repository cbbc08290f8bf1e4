"""Downstream metrics against hand-computed cases (the arithmetic is in the comments), a brute-force
reference for the retrieval ranks, and invariances that any correct implementation must keep."""

from __future__ import annotations

import json
import math

import pytest
import torch

from multi_dist.tasks import metrics as M
from multi_dist.tasks.metrics import (
    accuracy_by_type,
    average_precision,
    multilabel_metrics,
    retrieval_metrics,
    retrieval_ranks,
    topk_accuracy,
)

# ---------------------------------------------------------------- retrieval


def test_ties_rank_pessimistically() -> None:
    sim = torch.tensor(
        [
            [0.5, 0.5, 0.1],  # text 0 -> video 0: video 1 ties at 0.5 and ranks ahead -> rank 2
            [0.2, 0.9, 0.4],  # text 1 -> video 1: 0.9 is the only score >= 0.9 -> rank 1
            [0.4, 0.4, 0.4],  # text 2 -> video 2: constant row, all 3 >= 0.4 -> rank 3 (the worst)
        ]
    )
    t2v, v2t = retrieval_ranks(sim, torch.tensor([0, 1, 2]))
    assert t2v.tolist() == [2, 1, 3]
    # columns: video 0 [.5 .2 .4], truth .5, nothing else >= .5 -> 1
    #          video 1 [.5 .9 .4], truth .9 -> 1
    #          video 2 [.1 .4 .4], truth .4 (text 2), text 1 ties at .4 -> 2
    assert v2t.tolist() == [1, 1, 2]
    m = retrieval_metrics(sim, torch.tensor([0, 1, 2]), ks=(1, 2))
    assert m["t2v_r1"] == pytest.approx(1 / 3)  # one of [2, 1, 3] is <= 1
    assert m["t2v_r2"] == pytest.approx(2 / 3)  # two of [2, 1, 3] are <= 2
    assert m["t2v_medr"] == 2.0 and m["t2v_meanr"] == 2.0  # sorted [1, 2, 3]; 6 / 3
    assert m["v2t_r1"] == pytest.approx(2 / 3) and m["v2t_r2"] == 1.0
    assert m["n_text"] == 3 and m["n_video"] == 3 and m["n_video_captioned"] == 3


def test_constant_scores_are_the_worst_case() -> None:
    # 5 texts over 3 videos (captions per video: 2, 2, 1), every score equal:
    # t2v: all 3 videos >= the truth -> rank 3; v2t: every other video's caption ranks ahead -> 1 + (5 - caps)
    text_video = torch.tensor([0, 0, 1, 1, 2])
    t2v, v2t = retrieval_ranks(torch.zeros(5, 3), text_video)
    assert t2v.tolist() == [3] * 5
    assert v2t.tolist() == [4, 4, 5]
    m = retrieval_metrics(torch.zeros(5, 3), text_video)
    assert m["t2v_r1"] == 0.0 and m["v2t_r1"] == 0.0


def test_multiple_captions_and_a_video_without_caption() -> None:
    # 5 texts, 4 videos: video 0 has texts 0, 1; video 1 has texts 2, 3; video 2 has text 4; video 3 none
    text_video = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # truth v0 = .9, nothing else >= .9 -> 1
            [0.2, 0.8, 0.1, 0.5],  # truth v0 = .2; .2 .8 .5 are >= .2 -> 3
            [0.7, 0.6, 0.0, 0.1],  # truth v1 = .6; .7 .6 -> 2
            [0.1, 0.3, 0.2, 0.9],  # truth v1 = .3; .3 .9 -> 2
            [0.3, 0.2, 0.4, 0.4],  # truth v2 = .4; the caption-less video 3 ties at .4 -> 2
        ]
    )
    t2v, v2t = retrieval_ranks(sim, text_video)
    assert t2v.tolist() == [1, 3, 2, 2, 2]
    # v2t, ranking all 5 texts in each column, the video's best caption counts:
    #   v0 [.9 .2 .7 .1 .3]: best caption text 0 (.9), no other text >= .9 -> 1
    #   v1 [.1 .8 .6 .3 .2]: best caption text 2 (.6); of the other videos' texts only text 1 (.8) >= .6 -> 2
    #      (its other caption, text 3 at .3, alone would rank 4: .8 .6 .3 and itself)
    #   v2 [.2 .1 .0 .2 .4]: text 4 (.4) is the top -> 1
    #   v3 has no caption: skipped
    assert v2t.tolist() == [1, 2, 1]
    m = retrieval_metrics(sim, text_video)
    assert m["t2v_r1"] == pytest.approx(1 / 5)
    assert m["t2v_r5"] == 1.0
    assert m["t2v_medr"] == 2.0  # sorted [1, 2, 2, 2, 3]
    assert m["t2v_meanr"] == pytest.approx(2.0)  # 10 / 5
    assert m["v2t_r1"] == pytest.approx(2 / 3)
    assert m["v2t_medr"] == 1.0  # sorted [1, 1, 2]
    assert m["v2t_meanr"] == pytest.approx(4 / 3)
    assert m["n_text"] == 5 and m["n_video"] == 4 and m["n_video_captioned"] == 3


def test_tied_captions_of_the_same_video_cost_nothing() -> None:
    # video 0 has texts 0 and 1, tied at the top of its column: either first is a hit -> rank 1;
    # video 1's caption (text 2, .3) ties with text 0 of another video -> that one ranks ahead -> 2
    sim = torch.tensor([[0.5, 0.3], [0.5, 0.2], [0.1, 0.3]])
    _, v2t = retrieval_ranks(sim, torch.tensor([0, 0, 1]))
    assert v2t.tolist() == [1, 2]


def test_median_and_mean_rank_on_an_even_count() -> None:
    sim = torch.tensor(
        [
            [4.0, 1.0, 2.0, 3.0],  # truth 4 is the top -> 1
            [1.0, 4.0, 2.0, 3.0],  # -> 1
            [4.0, 3.0, 2.0, 1.0],  # truth 2, with 4 and 3 above -> 3
            [2.0, 3.0, 4.0, 1.0],  # truth 1 is the bottom -> 4
        ]
    )
    m = retrieval_metrics(sim, torch.arange(4))
    # t2v ranks [1, 1, 3, 4]: median = (1 + 3) / 2 = 2 (not the lower median 1), mean = 9 / 4
    assert m["t2v_medr"] == 2.0
    assert m["t2v_meanr"] == 2.25
    assert m["t2v_r1"] == 0.5
    # v2t columns: v0 [4 1 4 2] truth 4 tied by text 2 -> 2; v1 [1 4 3 3] -> 1;
    #              v2 [2 2 2 4] truth 2, texts 0, 1 tie and text 3 is above -> 4; v3 [3 3 1 1] truth 1 -> 4
    # ranks [2, 1, 4, 4] -> sorted [1, 2, 4, 4]: median (2 + 4) / 2 = 3, mean 11 / 4
    assert m["v2t_medr"] == 3.0
    assert m["v2t_meanr"] == 2.75
    assert m["v2t_r1"] == 0.25
    json.dumps(m, allow_nan=False)


def _brute_force_ranks(sim: torch.Tensor, text_video: torch.Tensor) -> tuple[list[int], list[int]]:
    """The definitions, one comparison at a time."""
    n_text, n_video = sim.shape
    tv = text_video.tolist()
    t2v = [sum(1 for v in range(n_video) if sim[i, v] >= sim[i, tv[i]]) for i in range(n_text)]
    v2t = []
    for v in range(n_video):
        caps = [i for i in range(n_text) if tv[i] == v]
        if not caps:
            continue
        best = max(float(sim[i, v]) for i in caps)
        v2t.append(1 + sum(1 for j in range(n_text) if tv[j] != v and sim[j, v] >= best))
    return t2v, v2t


@pytest.mark.parametrize("chunk", [M._CHUNK_ELEMENTS, 7])
def test_matches_brute_force_with_many_ties(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", chunk)  # 7 entries per block: a row or so at a time
    g = torch.Generator().manual_seed(1)
    sim = torch.randint(0, 4, (23, 9), generator=g).float()  # 4 distinct values: ties everywhere
    text_video = torch.randint(0, 8, (23,), generator=g)  # video 8 never has a caption
    t2v, v2t = retrieval_ranks(sim, text_video)
    ref_t2v, ref_v2t = _brute_force_ranks(sim, text_video)
    assert t2v.tolist() == ref_t2v
    assert v2t.tolist() == ref_v2t


def test_a_large_bonus_on_the_true_pair_gives_perfect_recall() -> None:
    g = torch.Generator().manual_seed(0)
    n_text, n_video = 40, 12
    text_video = torch.cat([torch.arange(n_video), torch.randint(0, n_video, (n_text - n_video,), generator=g)])
    sim = torch.randn(n_text, n_video, generator=g)
    sim[torch.arange(n_text), text_video] += 100.0
    m = retrieval_metrics(sim, text_video)
    assert m["t2v_r1"] == 1.0 and m["v2t_r1"] == 1.0
    assert m["t2v_medr"] == 1.0 and m["v2t_medr"] == 1.0
    assert m["t2v_meanr"] == 1.0 and m["v2t_meanr"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_consistent_permutation_of_texts_and_videos_changes_nothing(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_text, n_video = 30, 10
    sim = torch.randint(0, 5, (n_text, n_video), generator=g).double()  # ties, so tie-breaking by order would show
    text_video = torch.randint(0, n_video - 1, (n_text,), generator=g)  # the last video has no caption
    p = torch.randperm(n_video, generator=g)  # new column j is old video p[j]
    q = torch.randperm(n_text, generator=g)  # new row i is old text q[i]
    new_index = torch.argsort(p)  # old video v sits at column new_index[v]
    sim2 = sim[:, p][q]
    text_video2 = new_index[text_video][q]
    before, after = retrieval_metrics(sim, text_video), retrieval_metrics(sim2, text_video2)
    assert before == after
    t2v, v2t = retrieval_ranks(sim, text_video)
    t2v2, v2t2 = retrieval_ranks(sim2, text_video2)
    assert t2v2.tolist() == t2v[q].tolist()
    assert sorted(v2t2.tolist()) == sorted(v2t.tolist())


def test_retrieval_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_ranks(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="text_video"):
        retrieval_ranks(torch.zeros(2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 1]), ks=(0,))


# ---------------------------------------------------------------- average precision


def test_average_precision_by_hand() -> None:
    # ranked: + - + - +; precision at each positive 1/1, 2/3, 3/5 -> AP = (1 + 2/3 + 3/5) / 3 = 34/45
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), torch.tensor([1, 0, 1, 0, 1]))
    assert ap == pytest.approx(34 / 45)


def test_average_precision_ties_follow_sklearn() -> None:
    # scores .9 .9 .9 .2, targets + + - +. sklearn's thresholds are the distinct scores:
    #   >= .9: tp 2, fp 1 -> P 2/3, R 2/3;  >= .2: tp 3, fp 1 -> P 3/4, R 1
    #   AP = (2/3 - 0) * 2/3 + (1 - 2/3) * 3/4 = 4/9 + 1/4 = 25/36 = 0.6944
    # (breaking the tie pessimistically, - + + +, would give (1/2 + 2/3 + 3/4) / 3 = 0.6389,
    #  optimistically, + + - +, (1 + 1 + 3/4) / 3 = 0.9167)
    scores = torch.tensor([0.9, 0.9, 0.9, 0.2])
    assert average_precision(scores, torch.tensor([1, 1, 0, 1])) == pytest.approx(25 / 36)
    # the order of the items inside the tied group cannot matter
    assert average_precision(scores, torch.tensor([0, 1, 1, 1])) == pytest.approx(25 / 36)
    # one threshold for all: P = base rate, R jumps 0 -> 1, so AP = 2/5
    assert average_precision(torch.zeros(5), torch.tensor([1, 0, 0, 1, 0])) == pytest.approx(2 / 5)


def test_average_precision_without_positive_is_nan() -> None:
    assert math.isnan(average_precision(torch.tensor([0.3, 0.1]), torch.tensor([False, False])))


# ---------------------------------------------------------------- multi-label


def test_map_excludes_an_absent_class() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.2, 0.6],
            [0.8, 0.7, 0.1],
            [0.3, 0.6, 0.2],
            [0.1, 0.4, 0.3],
        ]
    )
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    out = multilabel_metrics(scores, targets, names=["a", "b", "c"])
    # a: ranked .9+ .8- .3+ .1-: precision at the positives 1, 2/3 -> AP 5/6
    # b: its one positive (.7) is ranked first -> AP 1
    # c: no positive -> no AP, left out: mAP = (5/6 + 1) / 2 = 11/12 (counting c as 0 would give 11/18)
    assert out["map"] == pytest.approx(11 / 12)
    assert out["absent_classes"] == ["c"]
    pc = out["per_class"]
    assert pc["a"]["ap"] == pytest.approx(5 / 6) and pc["b"]["ap"] == 1.0
    assert pc["c"] == {"ap": None, "precision": 0.0, "recall": None, "f1": 0.0, "support": 0}  # 1 false positive
    # decisions at .5: a predicts rows 0, 1 (tp 1, fp 1, fn 1); b rows 1, 2 (tp 1, fp 1); c row 0 (fp 1)
    assert pc["a"]["precision"] == 0.5 and pc["a"]["recall"] == 0.5 and pc["a"]["f1"] == 0.5
    assert pc["b"]["precision"] == 0.5 and pc["b"]["recall"] == 1.0 and pc["b"]["f1"] == pytest.approx(2 / 3)
    assert pc["a"]["support"] == 2 and pc["b"]["support"] == 1
    # micro: tp 2, fp 3, fn 1 -> P 2/5, R 2/3, F1 4 / (4 + 3 + 1) = 1/2
    assert out["micro_precision"] == pytest.approx(2 / 5)
    assert out["micro_recall"] == pytest.approx(2 / 3)
    assert out["micro_f1"] == pytest.approx(1 / 2)
    # macro: c has a prediction, so it counts: (1/2 + 2/3 + 0) / 3 = 7/18
    assert out["macro_f1"] == pytest.approx(7 / 18)
    json.dumps(out, allow_nan=False)  # None, never NaN


def test_micro_and_macro_f1() -> None:
    targets = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]])
    decided = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]])
    scores = torch.where(decided.bool(), 0.9, 0.1)
    out = multilabel_metrics(scores, targets)
    # class 0: tp 3, fp 0, fn 1 -> F1 6/7; class 1: tp 0, fp 1, fn 1 -> F1 0;
    # class 2: no positive, no prediction -> F1 undefined, not in the macro mean
    assert out["per_class"]["0"]["f1"] == pytest.approx(6 / 7)
    assert out["per_class"]["1"]["f1"] == 0.0
    assert out["per_class"]["2"]["f1"] is None and out["per_class"]["2"]["precision"] is None
    assert out["macro_f1"] == pytest.approx((6 / 7 + 0) / 2)  # 3/7 = 0.43
    # micro pools the decisions: tp 3, fp 1, fn 2 -> P 3/4, R 3/5, F1 6 / (6 + 1 + 2) = 2/3: the frequent
    # class 0 dominates, the missed rare class 1 pulls the macro mean down
    assert out["micro_precision"] == 0.75 and out["micro_recall"] == 0.6
    assert out["micro_f1"] == pytest.approx(2 / 3)
    assert out["absent_classes"] == ["2"]
    assert out["n"] == 4 and out["n_classes"] == 3 and out["threshold"] == 0.5


def test_multilabel_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="0/1"):
        multilabel_metrics(torch.zeros(2, 2), torch.tensor([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="distinct"):
        multilabel_metrics(torch.zeros(2, 2), torch.zeros(2, 2), names=["x", "x"])


# ---------------------------------------------------------------- accuracy


def test_accuracy_by_type() -> None:
    correct = torch.tensor([1, 0, 1, 1, 0])
    types = ["what", "who", "what", "how", "what"]
    out = accuracy_by_type(correct, types)
    # overall 3 of 5; what: answers 0, 2, 4 -> 1 + 1 + 0 = 2 of 3; who: 0 of 1; how: 1 of 1
    assert out["acc"] == pytest.approx(3 / 5) and out["count"] == 5
    assert out["acc_by_type"] == {"how": 1.0, "what": pytest.approx(2 / 3), "who": 0.0}
    assert out["count_by_type"] == {"how": 1, "what": 3, "who": 1}
    plain = accuracy_by_type([True, False, True, True])
    assert plain == {"acc": 0.75, "count": 4, "acc_by_type": {}, "count_by_type": {}}
    json.dumps(out, allow_nan=False)
    with pytest.raises(ValueError):
        accuracy_by_type([True, False], ["what"])
    with pytest.raises(ValueError):
        accuracy_by_type([])


def test_topk_accuracy() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.2],  # target 1 is the top -> hit at every k
            [0.3, 0.3, 0.1, 0.0],  # target 1 ties class 0, which ranks ahead -> a miss at k=1, hit at k=2
            [0.4, 0.3, 0.2, 0.1],  # target 3 is last: 3 classes ahead -> a hit only at k=4
            [0.9, 0.0, 0.0, 0.0],  # ignored
        ]
    )
    target = torch.tensor([1, 1, 3, -100])
    assert topk_accuracy(logits, target) == pytest.approx(1 / 3)  # 1 hit of 3 counted rows
    assert topk_accuracy(logits, target, k=2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, target, k=3) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, target, k=4) == 1.0
    assert topk_accuracy(logits, target, count_ignored=True) == pytest.approx(1 / 4)  # the ignored row is a miss
    # per-token logits (B, L, C) with (B, L) targets read the same rows
    assert topk_accuracy(logits.reshape(2, 2, 4), target.reshape(2, 2), k=2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="outside"):
        topk_accuracy(logits, torch.tensor([1, 1, 4, 0]))
    with pytest.raises(ValueError, match="at least one"):
        topk_accuracy(logits, torch.full((4,), -100))
