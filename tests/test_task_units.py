"""The tasks' pieces in one process: vocabularies from a real shard set, worker-side collation
(padding, out-of-vocabulary answers, several questions and captions per clip, reproducible draws),
and losses on the tiny model (padding never changes a loss)."""

from __future__ import annotations

import csv
import json
import logging
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from multi_dist.data.text import load_tokenizer
from multi_dist.model import MuLTI, model_config
from multi_dist.shards.build import BuildOptions, build, read_rows
from multi_dist.tasks import TaskConfig, make_task
from multi_dist.tasks.base import field_values
from multi_dist.tasks.labels import LabelsTask
from multi_dist.tasks.qa import IGNORE, OUT_OF_VOCAB, OpenQATask

from .conftest import ROOT, TOKENIZER


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(TOKENIZER)


def sample(key: str, meta: dict[str, Any], caption: str = "a clip", frames: int = 4) -> dict[str, Any]:
    return {"key": key, "video": torch.randn(frames, 3, 32, 32), "caption": caption, "meta": meta}


def qa(question: str, answer: str, kind: str = "what") -> dict[str, str]:
    return {"question": question, "answer": answer, "type": kind}


def test_vocabularies_come_from_the_training_split(demo_corpus: Path) -> None:
    answers = OpenQATask.build_vocab(TaskConfig(name="qa", answers=6), str(demo_corpus / "train"))
    counts: dict[str, int] = {}
    for items in field_values(str(demo_corpus / "train"), "qa"):
        for it in items:
            counts[it["answer"]] = counts.get(it["answer"], 0) + 1
    expected = sorted(counts, key=lambda a: (-counts[a], a))[:6]
    assert answers == expected  # most frequent first, ties alphabetical, top-K
    labels = LabelsTask.build_vocab(TaskConfig(name="labels"), str(demo_corpus / "train"))
    assert labels == sorted(labels) and {"red", "circle", "turns"} <= set(labels)
    assert LabelsTask.build_vocab(TaskConfig(name="labels", labels=["b", "a"]), "unused") == ["b", "a"]
    with pytest.raises(ValueError, match="no 'qa' answers"):
        OpenQATask.build_vocab(TaskConfig(name="qa"), str(demo_corpus / "real"))


def test_vocabularies_read_only_the_selected_shards(demo_corpus: Path) -> None:
    """A split given as some of a folder's shards takes its answers and labels from those alone
    (the parquet beside each), the same values as their tars' json members hold."""
    from webdataset import tariterators

    shards = sorted((demo_corpus / "train").glob("*.tar"))
    some = f"{demo_corpus / 'train'}/{{{shards[0].stem}..{shards[1].stem}}}.tar"
    from_tars = [
        json.loads(s["json"]).get("qa") for s in tariterators.tarfile_samples([{"url": str(u)} for u in shards[:2]])
    ]
    assert list(field_values(some, "qa")) == from_tars and len(from_tars) == 40  # of the folder's 120
    assert len(list(field_values(str(shards[2]), "labels"))) == 20  # a single tar: its own parquet


def test_a_fresh_run_takes_its_vocabulary_from_its_data_and_a_resumed_one_from_its_checkpoint(
    demo_corpus: Path, tmp_path: Path
) -> None:
    """The ``task.json`` an earlier run left in the run folder (one that failed before its first
    checkpoint, or whose checkpoints were removed) decided the answers of every later start there,
    on another corpus or with another ``task.answers`` too."""
    from multi_dist import checkpoint
    from multi_dist.train import TrainConfig, _task_vocab

    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.task, cfg.data.path = TaskConfig(name="qa", answers=3), str(demo_corpus / "train")
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.parent.mkdir()
    (ckpts.parent / "task.json").write_text(json.dumps({"task": "qa", "vocab": ["stale"], "prompt": ""}))
    fresh = OpenQATask.build_vocab(cfg.task, cfg.data.path)
    assert _task_vocab(cfg, None) == fresh and len(fresh) == 3
    (ckpts / "step_00000002").mkdir(parents=True)
    trainer = {"task": {"task": "qa", "vocab": ["yes", "no"], "prompt": ""}}
    (ckpts / "step_00000002" / checkpoint.COMPLETE).write_text(json.dumps(trainer))
    # resumed: the vocabulary its head was trained with
    assert _task_vocab(cfg, ckpts / "step_00000002") == ["yes", "no"]


def test_a_corpus_mixed_at_weight_zero_gives_no_answers_and_is_not_checked(
    demo_corpus: Path, tmp_path: Path, real_clips: dict[str, Path]
) -> None:
    """Weight 0 leaves a corpus out of the mixture: no sample of it is trained on. Its answers were
    in the vocabulary all the same (outputs the head never learns: here 'zebra'), and a corpus
    switched off so because it has no questions (the demo's real clips) failed the start-up check."""
    from multi_dist.data.pipeline import CorpusConfig
    from multi_dist.train import TrainConfig, _sampled_paths, _task_vocab

    zebras = csv_corpus(tmp_path / "z", real_clips, qa=[json.dumps([qa("what animal?", "zebra")])] * len(real_clips))
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.task, cfg.data.path = TaskConfig(name="qa"), ""
    cfg.data.corpora = [
        CorpusConfig(path=str(demo_corpus / "train")),
        CorpusConfig(path=str(zebras), weight=0),
        CorpusConfig(path=str(demo_corpus / "real"), weight=0),
    ]
    assert _sampled_paths(cfg.data) == [str(demo_corpus / "train")]
    assert _task_vocab(cfg, None) == OpenQATask.build_vocab(cfg.task, str(demo_corpus / "train"))
    assert "zebra" in OpenQATask.build_vocab(cfg.task, [str(demo_corpus / "train"), str(zebras)])  # the control
    task = make_task(cfg.task, _task_vocab(cfg, None))
    task.check_data(_sampled_paths(cfg.data), "data", training=True)
    with pytest.raises(ValueError, match="no sample has open-ended questions"):  # the control
        task.check_data([str(demo_corpus / "real")], "data", training=True)


def test_qa_collate_pads_questions_and_marks_unknown_answers(tokenizer: Any) -> None:
    task = make_task(TaskConfig(name="qa", max_questions=8), ["red", "blue", "circle"])
    batch = [
        sample("a", {"qa": [qa("what color?", "red"), qa("what shape?", "circle"), qa("how big?", "huge")]}),
        sample("b", {"qa": [qa("what color?", "blue")]}),
    ]
    ev = task.collate(batch, tokenizer, 12, epoch=0, training=False)
    assert ev["qa_input_ids"].shape == (2, 3, 12)
    assert ev["qa_answer"].tolist() == [[0, 2, OUT_OF_VOCAB], [1, IGNORE, IGNORE]]
    train = task.collate(batch, tokenizer, 12, epoch=0, training=True)
    assert train["qa_answer"].tolist() == [[0, 2], [1, IGNORE]]  # an answer the head cannot give is dropped
    assert [len(r) for r in train["qa_items"]] == [2, 1]


def test_training_draws_questions_per_epoch_reproducibly(tokenizer: Any) -> None:
    task = make_task(TaskConfig(name="qa", max_questions=2), [str(i) for i in range(10)])
    clip = [sample("k1", {"qa": [qa(f"question {i}?", str(i)) for i in range(10)]})]
    draws = [task.collate(clip, tokenizer, 8, epoch=e, training=True)["qa_answer"].tolist() for e in (0, 0, 1, 2)]
    assert draws[0] == draws[1]  # same (seed, epoch, key): same questions
    assert len({str(d) for d in draws}) > 1  # another epoch: other questions
    assert all(len(d[0]) == 2 for d in draws)


def test_choice_collate_masks_padding_options_and_skips_malformed_items(
    tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    task = make_task(TaskConfig(name="choice"))
    batch = [
        sample(
            "a",
            {
                "mc": [
                    {"question": "what?", "options": ["x", "y", "z"], "answer": 2, "type": "action"},
                    {"question": "bad", "options": ["x"], "answer": 0},
                ]
            },
        ),
        sample("b", {"options": ["p", "q", "r", "s", "t"], "answer": 4}),
    ]
    with caplog.at_level(logging.WARNING, logger="multi_dist.tasks"):
        out = task.collate(batch, tokenizer, 8, epoch=0, training=False)
    assert "sample a: multiple-choice item 1 is malformed" in caplog.text
    assert out["mc_option_mask"].tolist() == [[[True, True, True, False, False]], [[True] * 5]]
    assert out["mc_answer"].tolist() == [[2], [4]]
    assert out["mc_input_ids"].shape == (2, 5, 8)
    assert tokenizer.decode(out["mc_input_ids"][0, 2], skip_special_tokens=True) == "what? z"


def test_retrieval_collate_keeps_every_caption_for_evaluation(tokenizer: Any) -> None:
    task = make_task(TaskConfig(name="retrieval"))
    batch = [sample("a", {"captions": ["one", "two", "three"]}, "one"), sample("b", {}, "only caption")]
    ev = task.collate(batch, tokenizer, 8, epoch=0, training=False)
    assert ev["ret_texts"] == ["one", "two", "three", "only caption"]
    assert ev["ret_owner"].tolist() == [0, 0, 0, 1]
    picks = {task.collate(batch, tokenizer, 8, epoch=e, training=True)["caption"][0] for e in range(12)}
    assert picks <= {"one", "two", "three"} and len(picks) > 1  # one caption per clip and epoch
    again = task.collate(batch, tokenizer, 8, epoch=3, training=True)["caption"]
    assert again == task.collate(batch, tokenizer, 8, epoch=3, training=True)["caption"]


def test_label_targets_are_multi_hot_and_ignore_unknown_labels(tokenizer: Any) -> None:
    task = make_task(TaskConfig(name="labels", prompt="what is in the video?"), ["cat", "dog", "red"])
    out = task.collate([sample("a", {"labels": ["red", "cat", "zebra"]}), sample("b", {})], tokenizer, 8, 0, True)
    assert out["label_targets"].tolist() == [[1, 0, 1], [0, 0, 0]]
    assert tokenizer.decode(out["label_input_ids"][1], skip_special_tokens=True) == "what is in the video?"


def csv_corpus(folder: Path, clips: dict[str, Path], **columns: list[str]) -> Path:
    """Shards built from a CSV file whose extra columns hold the given strings, row by row."""
    folder.mkdir()
    rows = [{"video": str(p), "caption": f"clip {i}"} for i, p in enumerate(clips.values())]
    for name, values in columns.items():
        for row, value in zip(rows, values):
            row[name] = value
    with (folder / "in.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    build(read_rows(folder / "in.csv"), BuildOptions(output=str(folder / "shards"), progress=False))
    return folder / "shards"


def tar_samples(shards: Path) -> list[dict[str, Any]]:
    """Each sample's json as the training workers read it (not the parquet)."""
    metas = []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            metas += [json.loads(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".json")]
    return [sample(m["key"], m) for m in metas]


def test_task_fields_written_as_json_strings_read_alike_everywhere(
    tmp_path: Path, real_clips: dict[str, Path], tokenizer: Any
) -> None:
    """A corpus built from a CSV file holds its list fields as strings. Written as JSON lists they
    are read as lists alike by the vocabulary (from the parquet, or the tars without it) and by
    the workers' collate (the tars' json): the questions the vocabulary was built from are the ones
    trained on. An empty cell is no value."""
    questions = [json.dumps([qa("what animal?", a)]) for a in ("cat", "dog", "cat")] + [""]
    labels = [json.dumps(x) for x in (["cat", "dog"], ["bird"], ["cat"])] + [""]
    shards = csv_corpus(tmp_path / "c", real_clips, qa=questions, labels=labels)
    samples = tar_samples(shards)
    assert isinstance(samples[0]["meta"]["qa"], str)  # as written
    for with_parquet in (True, False):
        if not with_parquet:
            for f in shards.glob("*.parquet"):
                f.unlink()
        assert OpenQATask.build_vocab(TaskConfig(name="qa"), str(shards)) == ["cat", "dog"]
        assert LabelsTask.build_vocab(TaskConfig(name="labels"), str(shards)) == ["bird", "cat", "dog"]
    qa_task = make_task(TaskConfig(name="qa"), ["cat", "dog"])
    batch = qa_task.collate(samples, tokenizer, 8, 0, True)
    by_key = dict(zip((s["key"] for s in samples), batch["qa_items"]))
    assert sorted(len(v) for v in by_key.values()) == [0, 1, 1, 1]
    labels_task = make_task(TaskConfig(name="labels", prompt="p"), ["bird", "cat", "dog"])
    targets = labels_task.collate(samples, tokenizer, 8, 0, True)["label_targets"]
    assert sorted(targets.sum(1).tolist()) == [0, 1, 1, 2]
    for task in (qa_task, labels_task):
        task.check_data(str(shards), "val", training=False)  # no error


def test_task_fields_of_the_wrong_form_fail_at_start_up_naming_the_sample(
    tmp_path: Path, real_clips: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A CSV's ``cat|dog`` is no list of labels (it made a vocabulary of characters, or of
    ``cat|dog``): an error naming the shard, the sample and the field. A split without the task's
    fields at all (a captions corpus given to qa, choice or labels) is an error naming the split:
    it trained to a loss of 0, or failed at its final evaluation. Held-out labels outside the label
    set are counted in a warning (they were dropped without a word)."""
    shards = csv_corpus(tmp_path / "c", real_clips, labels=["cat|dog", "bird", "cat", "bird"])
    with pytest.raises(ValueError, match=r"shards/00000\.tar sample 00000000: 'labels' must be a list, e\.g\. "):
        LabelsTask.build_vocab(TaskConfig(name="labels"), str(shards))
    task = make_task(TaskConfig(name="labels", labels=["cat", "dog"]), ["cat", "dog"])
    with pytest.raises(ValueError, match=r"got a str: 'cat\|dog'"):
        task.check_data(str(shards), "val", training=False)

    plain = csv_corpus(tmp_path / "p", real_clips, labels=['["cat"]', '["bird"]', '["bird", "cat"]', ""])
    for name, field in (("qa", "open-ended questions"), ("choice", "multiple-choice questions")):
        with pytest.raises(ValueError, match=f"^val {re.escape(str(plain))}: no sample has {field}"):
            make_task(TaskConfig(name=name), ["cat"] if name == "qa" else None).check_data(str(plain), "val", False)
    bare = csv_corpus(tmp_path / "n", real_clips)
    with pytest.raises(ValueError, match=f"^data {re.escape(str(bare))}: no sample has labels"):
        make_task(TaskConfig(name="labels"), ["x"]).check_data(str(bare), "data", True)
    with caplog.at_level(logging.WARNING, logger="multi_dist.tasks"):
        task.check_data(str(plain), "val", training=False)
    assert "val: 2 of 4 labels (50.0%; 1 classes, e.g. bird) are outside the 2-class label set" in caplog.text


@pytest.mark.parametrize("answer", [0, 1])
def test_a_tie_between_the_answer_and_another_option_counts_as_wrong(
    tokenizer: Any, answer: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Options that read alike (or alike once truncated to the text length) score alike, up to
    rounding: a CPU's matmul may round two identical rows of one batch differently (an AVX-512
    machine gave -0.9577 for both here, apart in the last bits). Such a tie counts as wrong
    whichever option is the answer and whichever of the two rounds higher; options that read
    differently are judged by their scores."""
    torch.manual_seed(0)
    model = MuLTI(model_config("tiny")).eval()
    task = make_task(TaskConfig(name="choice"))
    clips = [sample("a", {"options": ["a red cube", "a red cube", "a blue ball"], "answer": answer})]
    batch = {
        "key": ["a"],
        "video": torch.stack([c["video"] for c in clips]),
        **task.collate(clips, tokenizer, 8, 0, False),
    }
    with torch.no_grad():
        logits = task._logits(model, batch)
        assert logits[0, 0, 0].item() == pytest.approx(logits[0, 0, 1].item(), rel=1e-5)
        for nudge in (0.0, 1e-6, -1e-6):  # the answer rounds level with, above or below its twin
            scores = logits.clone()
            scores[0, 0, 2] = scores[0, 0, :2].min() - 1  # the option that reads differently scores lowest
            scores[0, 0, answer] += nudge
            monkeypatch.setattr(task, "_logits", lambda model, batch, scores=scores: scores)
            records, _ = task.eval_step(model, batch)
            item = records[0]["items"][0]
            assert item | {"type": None, "prediction": None} == {
                "question": "",
                "options": ["a red cube", "a red cube", "a blue ball"],
                "answer": answer,
                "type": None,
                "prediction": None,
                "correct": False,
                "tied": True,  # whichever of the twins rounding put first
            }, nudge
            assert item["prediction"] == int(scores[0, 0].argmax())
        # an answer that reads differently from the rest and scores above them is right
        scores = logits.clone()
        scores[0, 0, 2] = scores[0, 0, :2].max() + 1e-6
        monkeypatch.setattr(task, "_logits", lambda model, batch: scores)
        batch["mc_answer"] = torch.full_like(batch["mc_answer"], 2)
        item = task.eval_step(model, batch)[0][0]["items"][0]
        assert item["prediction"] == 2 and item["correct"] is True and "tied" not in item

    # an empty answer has no twin in the padding options (which tokenise as it does)
    clips = [sample("e", {"options": ["", "a red cube"], "answer": 0})]
    clips.append(sample("f", {"options": ["a", "b", "c"], "answer": 0}))  # three options: "e" gets a padding one
    batch = {
        "key": ["e", "f"],
        "video": torch.stack([c["video"] for c in clips]),
        **task.collate(clips, tokenizer, 8, 0, False),
    }
    assert batch["mc_option_mask"][0, 0].tolist() == [True, True, False]  # a padding option slot
    scores = torch.full(batch["mc_option_mask"].shape, -1e4).masked_fill(batch["mc_option_mask"], 1.0)
    scores[0, 0, 0] = 5.0
    monkeypatch.setattr(task, "_logits", lambda model, batch: scores)
    item = task.eval_step(model, batch)[0][0]["items"][0]
    assert item["prediction"] == 0 and item["correct"] is True and "tied" not in item, item


def test_losses_train_every_head_and_padding_changes_nothing(tokenizer: Any) -> None:
    """Each task's loss on the tiny model: finite, with gradient to its head; adding a padding
    question (QA) or a padding option slot (choice) leaves the loss as it was (to 1e-5)."""
    torch.manual_seed(0)
    vocab = ["red", "blue", "green"]
    model = MuLTI(model_config("tiny", heads={"qa_answers": 3, "num_labels": 3}))
    model.eval()  # no dropout: compare exactly
    clips = [
        sample(
            "a",
            {
                "qa": [qa("what color?", "red")],
                "options": ["a red cube", "a blue cube"],
                "answer": 0,
                "labels": ["red"],
            },
        ),
        sample(
            "b",
            {
                "qa": [qa("what color?", "blue")],
                "options": ["a green ball", "a blue ball"],
                "answer": 1,
                "labels": ["blue", "green"],
            },
        ),
    ]
    padded = [dict(c) for c in clips]
    padded[1] = {
        **clips[1],
        "meta": {
            **clips[1]["meta"],
            "qa": [qa("what color?", "blue"), qa("other?", "nope")],
            "options": ["a green ball", "a blue ball", "a red ball"],
        },
    }
    for name, head in (("qa", "qa_head"), ("choice", "mcm_head"), ("labels", "label_head"), ("retrieval", "vtm_head")):
        task = make_task(TaskConfig(name=name, prompt="what is it?"), vocab if name in ("qa", "labels") else None)
        batch = {"video": torch.stack([c["video"] for c in clips]), "key": ["a", "b"], "caption": ["x", "y"]}
        tok = tokenizer(["a red cube", "a blue ball"], padding="max_length", max_length=8, return_tensors="pt")
        batch.update(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        batch.update(task.collate(clips, tokenizer, 8, 0, training=True))
        model.zero_grad()
        out = task.loss(model, batch)
        assert torch.isfinite(out["loss"]) and out["loss"] > 0, name
        out["objective"].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, head).parameters()), name
        if name == "qa":  # the second clip's out-of-vocabulary question is dropped, then padded
            more = task.collate(padded, tokenizer, 8, 0, training=False)
            base = task.collate(clips, tokenizer, 8, 0, training=False)
            with torch.no_grad():
                a = task.loss(model, {**batch, **base})["loss"]
                b = task.loss(model, {**batch, **more})["loss"]
            assert more["qa_answer"].tolist() == [[0, IGNORE], [1, OUT_OF_VOCAB]]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        if name == "choice":  # the first clip gets a padding option slot
            more = task.collate(padded, tokenizer, 8, 0, training=False)
            base = task.collate(clips, tokenizer, 8, 0, training=False)
            with torch.no_grad():
                a = task.loss(model, {**batch, **base})["loss"]
                b = task.loss(model, {**batch, **{**more, "mc_answer": more["mc_answer"]}})["loss"]
            assert more["mc_option_mask"][0].tolist() == [[True, True, False]]
            # the second clip has a third real option now, so compare the first clip alone
            first = {k: v[:1] if isinstance(v, torch.Tensor) else v[:1] for k, v in {**batch, **base}.items()}
            first_padded = {k: v[:1] if isinstance(v, torch.Tensor) else v[:1] for k, v in {**batch, **more}.items()}
            with torch.no_grad():
                torch.testing.assert_close(
                    task.loss(model, first)["loss"], task.loss(model, first_padded)["loss"], atol=1e-5, rtol=0
                )
            assert torch.isfinite(a) and torch.isfinite(b)


def test_finetune_needs_a_downstream_task() -> None:
    from multi_dist import cli

    with pytest.raises(ValueError, match="finetune: set task.name"):
        cli.load("finetune", str(ROOT / "configs/pretrain/tiny.yaml"))
    assert cli.load("finetune", str(ROOT / "configs/finetune/demo_qa.yaml")).task.name == "qa"


def test_choice_can_score_with_the_mcm_head_alone(tokenizer: Any) -> None:
    """``choice_score: mcm`` drops the similarity term: the scores are the head's alone."""
    torch.manual_seed(0)
    model = MuLTI(model_config("tiny")).eval()
    clips = [sample("a", {"options": ["a red cube", "a blue cube", "a green cube"], "answer": 1})]
    with_vtc = make_task(TaskConfig(name="choice"))
    head_only = make_task(TaskConfig(name="choice", choice_score="mcm"))
    batch = {"video": torch.stack([c["video"] for c in clips]), **with_vtc.collate(clips, tokenizer, 8, 0, False)}
    with torch.no_grad():
        both, alone = with_vtc._logits(model, batch), head_only._logits(model, batch)
        video = model.encode_video(batch["video"])
        expected = model.mcm_logits(video, batch["mc_input_ids"], batch["mc_attention_mask"]).view(1, 1, 3)
    torch.testing.assert_close(alone, expected.float())
    assert not torch.allclose(both, alone)


def test_progress_lines_rate_eta_and_silence(capsys: pytest.CaptureFixture) -> None:
    """A line per update at ``every_s=0``: done of total, the rate, the ETA while work is left; none
    without a total; a last line only after one was printed; nothing on a disabled rank."""
    from multi_dist.metrics import Progress

    bar = Progress("evaluating qa on val", total=4, unit="batches", every_s=0)
    bar.update()
    bar.update()
    bar.close()
    first, second, last = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"evaluating qa on val: 1/4 batches, [\d.]+ batches/s, ETA \d:\d\d:\d\d", first)
    assert second.startswith("evaluating qa on val: 2/4 batches, ")
    assert re.fullmatch(r"evaluating qa on val: 2/4 batches, [\d.]+ batches/s, ETA .* \(done in 0:00:00\)", last)
    bar = Progress("reading", total=None, unit="clips", every_s=0)
    bar.update(25)
    assert re.fullmatch(r"reading: 25 clips, [\d.]+ clips/s\n", capsys.readouterr().out)
    for quiet in (Progress("a", 2, "b", enabled=False, every_s=0), Progress("a", 2, "b", every_s=3600)):
        quiet.update()
        quiet.close()
    assert capsys.readouterr().out == ""


def _reranked(sim: torch.Tensor, k: int, scale: float) -> dict[str, float]:
    """Retrieval's finish on one caption per video with similarities ``sim`` (texts x videos),
    re-ranking with the tiny model's real fusion and a VTM head whose last layer is zeroed: its
    log-odds are 0 for every pair, an undecided head."""
    from multi_dist.tasks.base import EvalContext
    from multi_dist.tasks.retrieval import RetrievalTask

    torch.manual_seed(0)
    model = MuLTI(model_config("tiny")).eval()
    torch.nn.init.zeros_(model.vtm_head.weight)
    torch.nn.init.zeros_(model.vtm_head.bias)
    task = RetrievalTask(TaskConfig(name="retrieval", rerank_k=k))
    n, width = sim.shape[1], model.cfg.fusion.width
    records = [
        {
            "key": f"{v:06d}",
            "video": torch.eye(n)[v],  # so that text @ videos.T is sim
            "texts": [f"caption {v}"],
            "text": sim[v : v + 1],
            "ids": torch.tensor([[101, 1000 + v, 102, 0, 0, 0]]),  # a caption of its own
            "mask": torch.ones(1, 6, dtype=torch.long),
            "scale": scale,
            "rank": 0,
        }
        for v in range(n)
    ]
    local = {r["key"]: (torch.randn(3, width), torch.ones(3, dtype=torch.bool)) for r in records}
    ctx = EvalContext(rank=0, world=1, device=torch.device("cpu"), bf16=False, batch_size=4)
    metrics, _ = task.finish(model, records, local, ctx)
    return metrics


def test_an_undecided_vtm_head_leaves_the_vtc_ranking_as_it_was() -> None:
    """Re-ranking adds VTM's log-odds (0 here) to the top-k candidates' scaled VTC scores; the
    re-ranked metrics must then be VTC's:
    - two scores 2e-6 apart stay apart (scaled by 100, beside the re-ranking offset 1e4, float32
      would round both to 10060.0 and count the tie against the model);
    - candidates tied at the k-th place are re-ranked all or none: a pick by position lifted the
      truth of text 16 (tied with 10 others at the 10th place) into the top 10, and a collapsed
      model (all scores equal) got mean rank 16.8 of 20 instead of the worst case, 20."""
    close = torch.eye(3)
    close[0, :2] = torch.tensor([0.600002, 0.6])
    m = _reranked(close, 4, 100.0)
    assert m["vtc_t2v_r1"] == 1.0 and m["t2v_r1"] == 1.0

    tied = torch.eye(25)
    tied[16] = 0.0
    tied[16, 1:10], tied[16, [0, *range(10, 20)]] = 1.0, 0.5
    m = _reranked(tied, 10, 1.0)
    assert m["vtc_t2v_r10"] == m["t2v_r10"] == 24 / 25

    collapsed = _reranked(torch.zeros(20, 20), 16, 1.0)
    for key in ("t2v_meanr", "v2t_meanr", "t2v_r10", "v2t_r10"):
        assert collapsed[key] == collapsed[f"vtc_{key}"], key
    assert collapsed["t2v_meanr"] == 20.0


def test_zero_shot_evaluation_counts_clips_with_the_same_caption_as_one_text() -> None:
    """Four held-out clips, two with the same caption (the same tokens, hence the same text
    embedding): a model that puts each clip nearest its caption is perfect both ways. Ranked clip
    by clip, the twin's video tied with the clip's own (text-to-video) and the twin's caption was a
    wrong text ahead of the truth (video-to-text): at most 3 of 4 hits each way."""
    from multi_dist.tasks.base import EvalContext

    texts = {"a red cube": (1, 0, 0), "a blue ball": (0, 1, 0), "a green cone": (0, 0, 1)}
    captions = ["a red cube", "a red cube", "a blue ball", "a green cone"]
    videos = [(1.0, 0.1, 0.0), (1.0, 0.0, 0.1), (0.1, 1.0, 0.0), (0.0, 0.1, 1.0)]
    records = [
        {
            "key": f"{i:03d}",
            "caption": c,
            "tokens": (101, len(c), 102),
            "text": torch.tensor(texts[c], dtype=torch.float32),
            "video": torch.tensor(v),
        }
        for i, (c, v) in enumerate(zip(captions, videos))
    ]
    task = make_task(TaskConfig(name="pretrain"))
    m, predictions = task.finish(None, records, {}, EvalContext(0, 1, torch.device("cpu"), False, 4))
    assert (m["t2v_r1"], m["v2t_r1"], m["t2v_medr"], m["v2t_medr"]) == (1.0, 1.0, 1.0, 1.0)
    assert (m["texts"], m["clips"], m["chance_r1"]) == (3.0, 4.0, 1 / 3)
    assert [p["t2v_top1"] for p in predictions] == ["000", "000", "002", "003"]


def test_top_k_takes_ties_at_the_kth_place_all_or_none() -> None:
    from multi_dist.tasks.retrieval import top_k_mask

    sim = torch.tensor([[5.0, 3.0, 3.0, 1.0, 0.0], [5.0, 3.0, 3.0, 3.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    # k = 2. Row 0: two tied at the 2nd place, 3 in all (at most 2k): all in. Row 1: four tied, 5 in
    # all (more than 2k): the tied ones out, the one above them in
    assert top_k_mask(sim, 2, dim=1).tolist() == [
        [True, True, True, False, False],
        [True, False, False, False, False],
        [False, False, False, True, True],
    ]
    assert top_k_mask(sim.t(), 2, dim=0).tolist() == top_k_mask(sim, 2, dim=1).t().tolist()


def test_count_questions_report_their_mean_squared_error() -> None:
    """TGIF-QA Count's metric beside accuracy: the MSE of the predicted numbers; a prediction
    that is not a number is left out of it and counted."""
    from multi_dist.tasks.qa import _accuracy_report

    items = [
        {"question": "how many?", "answer": "3", "prediction": "5", "type": "count", "correct": False},
        {"question": "how many?", "answer": "2", "prediction": "2", "type": "count", "correct": True},
        {"question": "how many?", "answer": "4", "prediction": "red", "type": "count", "correct": False},
        {"question": "what color?", "answer": "red", "prediction": "red", "type": "what", "correct": True},
    ]
    metrics, _ = _accuracy_report([{"key": "a", "items": items}])
    assert metrics["mse_count"] == 2.0 and metrics["count_not_a_number"] == 1.0 and metrics["acc"] == 0.5
    metrics, _ = _accuracy_report([{"key": "a", "items": items[3:]}])
    assert "mse_count" not in metrics


def test_a_report_of_other_weights_under_the_same_name_is_kept(tmp_path: Path) -> None:
    """Two runs' ``step_00000002`` checkpoints evaluated into one folder: the second report took the
    first one's name and replaced it. Now it gets a name of its own; the same evaluation again
    replaces its own report."""
    from multi_dist.evaluate import write_report

    def report(run: str, acc: float) -> Path:
        info = {"init": f"/runs/{run}/checkpoints/step_00000002", "data": "/data/val"}
        return write_report(tmp_path, "qa", "step_00000002", {"acc": acc}, [{"key": "a"}], info)

    first, second, again = report("a", 0.5), report("b", 0.7), report("a", 0.6)
    assert first == again == tmp_path / "qa-step_00000002.json" and second != first
    assert re.fullmatch(r"qa-step_00000002-[0-9a-f]{8}\.json", second.name)
    assert json.loads(first.read_text())["metrics"] == {"acc": 0.6}
    assert json.loads(second.read_text())["metrics"] == {"acc": 0.7}
    assert (tmp_path / json.loads(second.read_text())["predictions"]).is_file()
    assert len(list(tmp_path.glob("*.predictions.jsonl"))) == 2


def test_copies_of_a_caption_score_alike_whatever_batch_computed_them() -> None:
    """Two clips share a caption. Its copies, encoded in different batches (or fused in chunks
    that depend on the number of processes), differed in their last bits, so their exact tie,
    counted against the model, became a rank that flipped between 1 and 2 processes. Each copy
    now takes the first copy's scores: the tie is exact, and the same everywhere."""
    from multi_dist.tasks.base import EvalContext
    from multi_dist.tasks.retrieval import RetrievalTask

    rows = torch.tensor([[0.9, 0.9, 0.1], [0.9, 0.9 + 1e-6, 0.1], [0.1, 0.2, 0.9]])
    tokens = [[101, 7, 102], [101, 7, 102], [101, 8, 102]]  # clips 0 and 1: the same caption
    records = [
        {
            "key": f"{v:06d}",
            "video": torch.eye(3)[v],
            "texts": ["a caption"],
            "text": rows[v : v + 1],
            "ids": torch.tensor([tokens[v]]),
            "mask": torch.ones(1, 3, dtype=torch.long),
            "scale": 1.0,
            "rank": 0,
        }
        for v in range(3)
    ]
    task = RetrievalTask(TaskConfig(name="retrieval", rerank_k=0))
    m, _ = task.finish(None, records, {}, EvalContext(0, 1, torch.device("cpu"), False, 3))
    assert m["t2v_r1"] == pytest.approx(1 / 3)  # both copies tie clips 0 and 1: rank 2 each
    assert m["vtc_t2v_meanr"] == pytest.approx(5 / 3)
