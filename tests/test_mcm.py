"""MCM questions and MLM masking: the data-side halves of two pretraining objectives.

Everything runs on the real packaged lexicon, the real bert-base-uncased vocabulary and real
demo captions; nothing is mocked."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from multi_dist.config import ConfigError, from_dict
from multi_dist.data.mcm import (
    CONTENT_CLASSES,
    MASK,
    VOCAB_CACHE,
    AnswerVocab,
    MCMConfig,
    MCMQuestion,
    build_question,
    collate_mcm,
    load_lexicon,
    mask_tokens,
    same_meaning,
    word_form,
    words,
)
from multi_dist.data.text import load_tokenizer
from multi_dist.shards.demo import COLORS, DIRECTIONS, REAL_CLIPS, SHAPES, SIZES, caption_of, clip_spec, make_demo

from .conftest import ROOT, TOKENIZER

FREE_FORM = [
    "A Man walks his DOG along the beach.",
    "two women cook pasta in a small kitchen",
    "a dog runs after a ball, then jumps into the lake",
    "children play football in the park while their parents watch",
    "close-up of hands slicing fresh tomatoes on a wooden board",
    "timelapse of clouds moving over the mountains at sunset",
    "a man in a red jacket rides a motorcycle down a wet road",
    "the cat sleeps on the sofa",
    "a chef's knife chops onions",
    "a man talks to a man",
    "Zorblax quux of the glorp",
    "it is what it is",
    "sunset",
    "3 kids jump on a trampoline",
    "a woman is talking to the camera about her new phone",
    "a drone flies over a busy city street at night",
    "traffic moves slowly on the highway",
    "an old man plays the piano on stage",
    "a large brown bear catches fish in a river",
    "people dance at a wedding party",
]
DEMO_CAPTIONS = [caption_of(clip_spec("train", i)) for i in range(300)] + [
    caption_of(clip_spec("val", i)) for i in range(60)
]
CAPTIONS = DEMO_CAPTIONS + list(REAL_CLIPS.values()) + FREE_FORM
KEYS = ("000", "123", "x")
"""Key prefixes: a sample's key is a prefix and the caption's index (keys are unique per sample, as in a
dataset; the question's randomness comes from the key alone)."""


@pytest.fixture(scope="module")
def lexicon():
    return load_lexicon()


@pytest.fixture(scope="module")
def vocab(lexicon):
    return AnswerVocab.from_captions(CAPTIONS, lexicon)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def all_questions(vocab, lexicon, cfg: MCMConfig) -> list[tuple[str, str, MCMQuestion | None]]:
    keys = [(c, f"{k}{i:05d}") for i, c in enumerate(CAPTIONS) for k in KEYS]
    return [(c, k, build_question(c, k, vocab, lexicon, cfg)) for c, k in keys]


# ----------------------------------------------------------------------------------------------
# Lexicon, words, config


def test_lexicon_is_well_formed(lexicon) -> None:
    assert set(lexicon.classes) == {"noun", "verb", "adjective", "direction"}
    for cls, least in (("noun", 300), ("verb", 300), ("adjective", 150), ("direction", 20)):
        assert len(lexicon.words_of(cls)) >= least, cls
    stop = lexicon.words_of("stopword")
    assert 80 <= len(stop) <= 250
    seen: dict[str, str] = {}
    for cls in lexicon.classes:
        for w in lexicon.words_of(cls):
            assert words(w) == [w], f"lexicon word {w!r} can never match a caption word"
            assert w not in seen, f"{w!r} in {seen.get(w)} and {cls}"
            seen[w] = cls
            assert lexicon.word_class(w) == cls and not lexicon.is_stopword(w)
    for w in stop:
        assert words(w) == [w] and lexicon.is_stopword(w) and lexicon.word_class(w) is None
    for w in ("walks", "runs", "moves", "moving", "talks", "rides", "plays", "cooks", "talking", "riding"):
        assert lexicon.word_class(w) == "verb", w
    for w in ("man", "men", "woman", "women", "dog", "car", "phone", "street", "people"):
        assert lexicon.word_class(w) == "noun", w
    for w in ("a", "an", "the", "then", "of", "in", "on", "is"):
        assert lexicon.is_stopword(w), w
    assert lexicon.word_class("Man") == "noun"  # lookups ignore case
    assert lexicon.word_class("zorblax") is None and not lexicon.is_stopword("zorblax")


def test_lexicon_covers_the_demo_corpus(lexicon) -> None:
    for w in [*COLORS, *SIZES]:
        assert lexicon.word_class(w) == "adjective", w
    for w in SHAPES:
        assert lexicon.word_class(w) == "noun", w
    for w in DIRECTIONS:
        assert lexicon.word_class(w) == "direction", w
    for caption in DEMO_CAPTIONS + list(REAL_CLIPS.values()):
        for w in words(caption):
            assert lexicon.category(w) != "other", f"{w!r} of {caption!r} is not in the lexicon"


def test_lexicon_pickles(lexicon) -> None:
    copy = pickle.loads(pickle.dumps(lexicon))
    assert copy.fingerprint == lexicon.fingerprint
    assert [copy.category(w) for w in words(" ".join(CAPTIONS))] == [
        lexicon.category(w) for w in words(" ".join(CAPTIONS))
    ]


def test_words() -> None:
    assert words("A Man's dog, runs--LEFT!") == ["a", "man's", "dog", "runs", "left"]
    assert words("close-up of snake_case 3D") == ["close", "up", "of", "snake", "case", "3d"]
    assert words("  ...  ") == []
    assert words("") == []


def test_config_validation() -> None:
    MCMConfig().validate()
    with pytest.raises(ValueError, match="num_options"):
        MCMConfig(num_options=1).validate()
    with pytest.raises(ValueError, match="max_answer_vocab"):
        MCMConfig(max_answer_vocab=0).validate()
    cfg = from_dict(MCMConfig, {"num_options": 5, "seed": 3, "enabled": False})
    assert (cfg.num_options, cfg.seed, cfg.enabled, cfg.max_answer_vocab) == (5, 3, False, 5000)
    with pytest.raises(ConfigError, match="num_options"):
        from_dict(MCMConfig, {"num_options": 1})
    with pytest.raises(ConfigError, match="num_option"):
        from_dict(MCMConfig, {"num_option": 4})


# ----------------------------------------------------------------------------------------------
# Questions


def test_questions_are_well_formed(vocab, lexicon) -> None:
    cfg = MCMConfig()
    for caption, key, q in all_questions(vocab, lexicon, cfg):
        assert q is not None, caption
        where = f"{caption!r} key {key}: {q}"
        assert len(q.options) == 4 and len(q.candidates) == 4, where
        assert len(set(q.options)) == 4 and len(set(q.candidates)) == 4, where
        assert q.options.count(caption) == 1 and q.options[q.answer] == caption, where
        assert q.question.count(MASK) == 1, where
        head, tail = q.question.split(MASK)
        caption_words = words(caption)
        for i, (option, cand) in enumerate(zip(q.options, q.candidates)):
            assert option.startswith(head) and option.endswith(tail), where
            assert option[len(head) : len(option) - len(tail)].lower() == cand, where
            if i != q.answer:
                assert cand not in caption_words, f"distractor {cand!r} is a word of the caption: {where}"
        assert q.candidates[q.answer] in caption_words, where
        assert q.word_class == lexicon.category(q.candidates[q.answer]), where
        if any(lexicon.word_class(w) for w in caption_words):
            assert q.word_class in CONTENT_CLASSES, where


def test_distractors_have_the_class_of_the_true_word(vocab, lexicon) -> None:
    same_class = from_vocab = 0
    for caption, _, q in all_questions(vocab, lexicon, MCMConfig()):
        cls = lexicon.word_class(q.candidates[q.answer])
        if cls is None:
            continue
        assert all(lexicon.word_class(c) == cls for c in q.candidates), q  # lexicon top-up keeps the class
        same_class += 1
        available = [w for w in vocab.words_of(cls) if w not in words(caption)]
        if len(available) >= 3:
            assert all(c in vocab.counts[cls] for c in q.candidates), f"vocab had {available}: {q}"
            from_vocab += 1
    assert same_class > 1000 and from_vocab > 500  # the checks above did run, many times


def test_no_option_means_another(vocab, lexicon) -> None:
    """The lexicon's directions come in several words each (up, upward, upwards): drawn as a
    distractor of "up", "upward" was a second right option (13 of the demo's 406 direction
    questions), which the loss taught is wrong. No option may mean the answer or another option,
    whether the corpus's vocabulary or the lexicon gives the distractors."""
    asked = 0
    for _, _, q in all_questions(vocab, lexicon, MCMConfig()):
        if q.word_class == "direction":
            meanings = [frozenset(same_meaning(c)) for c in q.candidates]
            assert len(set(meanings)) == len(meanings), q
            asked += 1
    narrow = AnswerVocab({})  # no corpus words: every distractor from the lexicon's 39 directions
    for key in KEYS:
        q = build_question("upward", key, narrow, lexicon, MCMConfig(num_options=8))
        assert q.candidates[q.answer] == "upward" and not {"up", "upwards"} & set(q.candidates), q
        assert len({frozenset(same_meaning(c)) for c in q.candidates}) == 8, q
        asked += 1
    assert asked > 250  # the checks ran (273 demo direction questions, 3 keys)


def test_distractors_share_the_true_words_form(vocab, lexicon) -> None:
    """Grammar alone must not give the answer away: a plural noun's distractors are plural, an
    -ing verb's are -ing, and so on (the lexicon has hundreds of words of each form to top up
    from), preferring the corpus's words of that form."""
    assert [word_form(w, "noun") for w in ("dogs", "people", "dog", "glass", "bus")] == ["plural"] * 2 + [
        "singular"
    ] * 3
    assert [word_form(w, "verb") for w in ("runs", "running", "jumped", "run", "kiss")] == [
        "s",
        "ing",
        "ed",
        "base",
        "base",
    ]
    checked: Counter[tuple[str, str]] = Counter()
    for caption, _, q in all_questions(vocab, lexicon, MCMConfig()):
        form = word_form(q.candidates[q.answer], q.word_class)
        if form:
            assert all(word_form(c, q.word_class) == form for c in q.candidates), q
            checked[q.word_class, form] += 1
            alike = [w for w in vocab.words_of(q.word_class) if word_form(w, q.word_class) == form]
            if len([w for w in alike if w not in words(caption)]) >= 3:
                assert all(c in alike for c in q.candidates), q
    assert checked["noun", "singular"] > 100 and checked["verb", "s"] > 100  # the demo's shapes and moves
    assert checked["noun", "plural"] >= 3 and checked["verb", "base"] >= 3
    for caption, cls, form in [("the dogs", "noun", "plural"), ("it is running", "verb", "ing")]:
        for key in KEYS:
            q = build_question(caption, key, vocab, lexicon, MCMConfig())
            assert q.word_class == cls and {word_form(c, cls) for c in q.candidates} == {form}, q


def test_demo_shape_questions_top_up_from_the_lexicon(lexicon) -> None:
    # the demo corpus has only 3 shape nouns: 2 are left as distractors, the 3rd comes from the lexicon
    demo_vocab = AnswerVocab.from_captions(DEMO_CAPTIONS, lexicon)
    shapes = demo_vocab.words_of("noun")
    assert sorted(shapes) == sorted(SHAPES)
    seen = 0
    for i, caption in enumerate(DEMO_CAPTIONS):
        q = build_question(caption, str(i), demo_vocab, lexicon, MCMConfig())
        if q.word_class == "noun":
            seen += 1
            extra = [c for c in q.candidates if c not in SHAPES]
            assert len(extra) == 1 and lexicon.word_class(extra[0]) == "noun", q
    assert seen > 20


def test_distractors_are_drawn_by_frequency(lexicon) -> None:
    counts = {"dog": 800, "cat": 150, "cow": 40, "pig": 10}
    vocab = AnswerVocab({"noun": counts})
    cfg = MCMConfig(num_options=2)
    n = 3000
    drawn = Counter(
        c
        for i in range(n)
        for q in [build_question("a horse", str(i), vocab, lexicon, cfg)]
        for c in q.candidates
        if c != "horse"
    )
    assert set(drawn) <= set(counts)
    total = sum(counts.values())
    for w, c in counts.items():
        # binomial, n = 3000: the standard deviation is at most 0.009; 0.035 is ~4 of them
        assert abs(drawn[w] / n - c / total) < 0.035, (w, drawn)


def test_max_answer_vocab_limits_the_distractor_pool(lexicon) -> None:
    vocab = AnswerVocab({"noun": {"dog": 800, "cat": 150, "cow": 40, "pig": 10}})
    cfg = MCMConfig(num_options=2, max_answer_vocab=1)
    for i in range(200):
        q = build_question("a horse", str(i), vocab, lexicon, cfg)
        assert sorted(q.candidates) == ["dog", "horse"], q
    # 4 options and only the top word: the other two come from the lexicon's nouns
    q = build_question("a horse", "k", vocab, lexicon, MCMConfig(max_answer_vocab=1))
    assert "dog" in q.candidates
    assert all(lexicon.word_class(c) == "noun" for c in q.candidates)


def test_without_content_words_the_rarest_non_stopword_is_asked(lexicon) -> None:
    vocab = AnswerVocab({"other": {"zorblax": 50, "quux": 2, "glorp": 9, "frob": 30}})
    for i in range(50):
        q = build_question("Zorblax quux of the glorp", str(i), vocab, lexicon, MCMConfig())
        assert q.question == f"Zorblax {MASK} of the glorp" and q.candidates[q.answer] == "quux", q
        assert q.word_class == "other"
        distractors = [c for c in q.candidates if c != "quux"]
        assert "frob" in distractors and not {"zorblax", "glorp"} & set(distractors), q
    # a word the corpus never saw is rarer still
    q = build_question("zorblax blerg", "k", vocab, lexicon, MCMConfig())
    assert q.candidates[q.answer] == "blerg"
    # only stopwords: still a question, about a stopword, with stopword distractors
    q = build_question("it is what it is", "k", vocab, lexicon, MCMConfig())
    assert q is not None and q.word_class == "stopword"
    assert all(lexicon.is_stopword(c) for c in q.candidates)


@pytest.mark.parametrize("caption", ["", "   ", "!!! -- ..."])
def test_no_question_without_words(caption: str, vocab, lexicon) -> None:
    assert build_question(caption, "k", vocab, lexicon, MCMConfig()) is None


def test_case_and_punctuation_are_kept(vocab, lexicon) -> None:
    caption = "The Man walks his DOG, then waits."
    cased = 0
    for i in range(60):
        q = build_question(caption, str(i), vocab, lexicon, MCMConfig())
        assert q.options[q.answer] == caption
        head, tail = q.question.split(MASK)
        assert tail.endswith(", then waits.") or tail.endswith(".")
        original = caption[len(head) : len(caption) - len(tail)]
        for option in q.options:
            filled = option[len(head) : len(option) - len(tail)]
            if len(original) > 1 and original.isupper():
                assert filled.isupper(), q
                cased += 1
            elif original[0].isupper():
                assert filled[0].isupper() and filled[1:].islower(), q
                cased += 1
    assert cased > 0


def test_answer_slot_is_uniform(vocab, lexicon) -> None:
    answers = Counter(q.answer for _, _, q in all_questions(vocab, lexicon, MCMConfig()))
    n = sum(answers.values())
    assert set(answers) == {0, 1, 2, 3}
    for slot in range(4):
        # binomial with p = 1/4 and n > 1300: standard deviation < 0.012; 0.05 is over 4 of them
        assert abs(answers[slot] / n - 0.25) < 0.05, answers
    five = Counter(q.answer for _, _, q in all_questions(vocab, lexicon, MCMConfig(num_options=5)))
    assert set(five) == {0, 1, 2, 3, 4}


def test_questions_are_reproducible(vocab, lexicon) -> None:
    cfg = MCMConfig(seed=7)
    first = all_questions(vocab, lexicon, cfg)
    assert first == all_questions(vocab, lexicon, cfg)
    # a pickled vocabulary and lexicon (what a DataLoader worker receives) give the same questions
    vocab2, lexicon2 = pickle.loads(pickle.dumps((vocab, lexicon)))
    assert first == all_questions(vocab2, lexicon2, cfg)
    # the seed and the key matter
    other_seed = all_questions(vocab, lexicon, MCMConfig(seed=8))
    assert sum(a != b for a, b in zip(first, other_seed)) > len(first) // 2
    by_prefix = {k: [q for _, key, q in first if key.startswith(k)] for k in KEYS}
    assert sum(a != b for a, b in zip(by_prefix[KEYS[0]], by_prefix[KEYS[1]])) > len(CAPTIONS) // 2


def test_questions_are_the_same_in_a_fresh_process(vocab, lexicon) -> None:
    captions = CAPTIONS[::7]
    cfg = MCMConfig(seed=3)
    here = [dataclasses.asdict(build_question(c, f"{i:08d}", vocab, lexicon, cfg)) for i, c in enumerate(captions)]
    code = (
        "import dataclasses, json, sys\n"
        "from multi_dist.data.mcm import AnswerVocab, MCMConfig, build_question, load_lexicon\n"
        "captions, vocab_json = json.load(sys.stdin)\n"
        "vocab, lex, cfg = AnswerVocab.from_json(vocab_json), load_lexicon(), MCMConfig(seed=3)\n"
        "qs = [dataclasses.asdict(build_question(c, f'{i:08d}', vocab, lex, cfg)) for i, c in enumerate(captions)]\n"
        "print(json.dumps(qs))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different set/dict hash order than this process
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([captions, vocab.to_json()]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout) == here


def test_vocab_json_round_trip(vocab) -> None:
    text = vocab.to_json()
    back = AnswerVocab.from_json(text)
    assert back == vocab and back.to_json() == text
    assert back.frequency("moves") == sum(words(c).count("moves") for c in CAPTIONS)
    with pytest.raises(ValueError, match="format"):
        AnswerVocab.from_json(json.dumps({"counts": {}}))


def test_vocab_counts_words_by_class(vocab, lexicon) -> None:
    expected = Counter(w for c in CAPTIONS for w in words(c))
    flat = {w: n for ws in vocab.counts.values() for w, n in ws.items()}
    assert flat == dict(expected)
    for cls, ws in vocab.counts.items():
        assert all(lexicon.category(w) == cls for w in ws), cls
        assert list(ws.values()) == sorted(ws.values(), reverse=True)
    assert vocab.counts["other"].keys() >= {"zorblax", "quux", "glorp", "3"}
    assert "a" in vocab.counts["stopword"] and "a" not in vocab.counts["other"]


# ----------------------------------------------------------------------------------------------
# The vocabulary of a built dataset


@pytest.fixture(scope="module")
def demo_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mcm_demo")
    make_demo(out, train=40, val=8, processes=1, progress=False)
    return out / "train"


def test_vocab_from_dataset_counts_and_caches(demo_train: Path, lexicon) -> None:
    expected = AnswerVocab.from_captions([caption_of(clip_spec("train", i)) for i in range(40)], lexicon)
    cache = demo_train / VOCAB_CACHE
    assert not cache.exists()
    vocab = AnswerVocab.from_dataset(str(demo_train))
    assert vocab == expected and vocab.frequency("moves") == 40
    assert cache.is_file() and AnswerVocab.from_json(cache.read_text()) == expected

    # a valid cache is read, not recomputed: doctor it and see the doctored counts come back
    data = json.loads(cache.read_text())
    data["counts"]["verb"]["moves"] = 12345
    cache.write_text(json.dumps(data))
    assert AnswerVocab.from_dataset(demo_train).frequency("moves") == 12345

    # a parquet newer than the cache (one more shard) forces a recount; failed rows do not count
    rows = [
        {"key": "0099000", "caption": "a purple hexagon spins", "status": "success", "error_message": None},
        {"key": "0099001", "caption": "zebra xylophone", "status": "failed_to_decode", "error_message": "bad"},
    ]
    extra = demo_train / "00099.parquet"
    pq.write_table(pa.Table.from_pylist(rows), extra)
    try:
        newer = cache.stat().st_mtime + 2
        os.utime(extra, (newer, newer))
        vocab = AnswerVocab.from_dataset(demo_train)
        assert vocab.frequency("moves") == 40
        assert vocab.counts["adjective"]["purple"] == 1 and vocab.counts["noun"]["hexagon"] == 1
        assert vocab.frequency("zebra") == 0 and vocab.frequency("xylophone") == 0
        assert json.loads(cache.read_text())["parquets"][-1] == "00099.parquet"

        # a parquet removed: the cache no longer describes the folder
        data = json.loads(cache.read_text())
        data["counts"]["verb"]["moves"] = 777
        cache.write_text(json.dumps(data))
    finally:
        extra.unlink()  # the folder is shared with the next test
    assert AnswerVocab.from_dataset(demo_train) == expected


def test_vocab_from_dataset_without_a_writable_cache(demo_train: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    for p in demo_train.glob("*.parquet"):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / VOCAB_CACHE).mkdir()  # the cache path cannot become a file (as root, chmod would not stop us)
    expected = AnswerVocab.from_captions([caption_of(clip_spec("train", i)) for i in range(40)])
    assert AnswerVocab.from_dataset(folder) == expected
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_a_split_that_samples_part_of_a_folder_counts_only_its_shards_words(
    tmp_path: Path, lexicon, caplog: pytest.LogCaptureFixture
) -> None:
    """Training and held-out shards in one folder, each split a brace pattern: the vocabulary of
    one split was the whole folder's, so MCM drew distractors from the held-out captions. Now a
    split counts its own shards' parquet files, cached apart from the whole folder's."""
    from multi_dist.data.pipeline import DataConfig, VideoTextStream

    make_demo(tmp_path, train=12, val=4, processes=1, train_per_shard=4, val_per_shard=4, progress=False)
    folder = tmp_path / "train"
    assert sorted(p.name for p in folder.glob("*.parquet")) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    rows = {p.stem: pq.read_table(p).to_pylist() for p in folder.glob("*.parquet")}
    first_two = [r["caption"] for stem in ("00000", "00001") for r in rows[stem] if r["status"] == "success"]
    assert len(first_two) == 8
    expected = AnswerVocab.from_captions(first_two, lexicon)
    everything = AnswerVocab.from_captions([r["caption"] for rs in rows.values() for r in rs], lexicon)
    assert expected != everything  # the third shard has words of its own

    part = AnswerVocab.from_dataset(folder, shards=[str(folder / "00000.tar"), str(folder / "00001.tar")])
    assert part == expected and not (folder / VOCAB_CACHE).exists()
    (cached,) = folder.glob("mcm_vocab.*.json")
    assert AnswerVocab.from_json(cached.read_text()) == expected
    assert AnswerVocab.from_dataset(folder, shards=[str(p) for p in folder.glob("*.tar")]) == everything
    assert (folder / VOCAB_CACHE).is_file()  # all of them: the folder's own cache
    with pytest.raises(FileNotFoundError, match=f"{folder}: no \\*.parquet files to read captions from for its"):
        AnswerVocab.from_dataset(folder, shards=[str(folder / "00007.tar")])

    stream = VideoTextStream(DataConfig(path=f"{folder}/{{00000..00001}}.tar", tokenizer=TOKENIZER, num_workers=0))
    assert stream._answer_vocab() == expected
    whole = VideoTextStream(DataConfig(path=str(folder), tokenizer=TOKENIZER, num_workers=0))
    assert whole._answer_vocab() == everything

    # names with dots: only the archive's suffix goes (train.00001.tar.gz: train.00001.parquet)
    dotted = tmp_path / "dotted"
    dotted.mkdir()
    for stem in ("00000", "00001", "00002"):
        shutil.copy(folder / f"{stem}.parquet", dotted / f"train.{stem}.parquet")
        shutil.copy(folder / f"{stem}.tar", dotted / f"train.{stem}.tar")
    tars = [str(dotted / "train.00000.tar"), str(dotted / "train.00001.tar.gz")]
    assert AnswerVocab.from_dataset(dotted, shards=tars) == expected

    # parquet files named otherwise than the shards: the folder's words, as before, with a warning
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for stem in ("00000", "00001", "00002"):
        shutil.copy(folder / f"{stem}.parquet", renamed / f"{stem}.parquet")
        shutil.copy(folder / f"{stem}.tar", renamed / f"clips-{stem}.tar")
    caplog.set_level(logging.WARNING, logger="multi_dist")
    stream = VideoTextStream(DataConfig(path=str(renamed), tokenizer=TOKENIZER, num_workers=0, epoch_samples=12))
    assert stream._answer_vocab() == everything
    assert f"{renamed}: no parquet file is named as its shards are" in caplog.text


def test_vocab_from_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="parquet"):
        AnswerVocab.from_dataset(tmp_path)
    with pytest.raises(NotADirectoryError):
        AnswerVocab.from_dataset(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# Collation


def test_collate_mcm(vocab, lexicon, tokenizer) -> None:
    captions = CAPTIONS[:5] + [""] + CAPTIONS[-3:]
    questions = [build_question(c, str(i), vocab, lexicon, MCMConfig()) for i, c in enumerate(captions)]
    assert questions[5] is None and all(q is not None for i, q in enumerate(questions) if i != 5)
    max_len = 24
    out = collate_mcm(questions, captions, tokenizer, max_len)
    b = len(captions)
    assert out["mcm_input_ids"].shape == (b, 4, max_len) and out["mcm_input_ids"].dtype == torch.int64
    assert out["mcm_attention_mask"].shape == (b, 4, max_len)
    assert out["mcm_answer"].dtype == torch.int64
    assert out["mcm_answer"].tolist() == [q.answer if q else -100 for q in questions]
    # the true option tokenises exactly as the pipeline tokenises the caption
    plain = tokenizer(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    for i, q in enumerate(questions):
        if q is None:
            assert (out["mcm_input_ids"][i] == plain["input_ids"][i]).all()
            continue
        assert torch.equal(out["mcm_input_ids"][i, q.answer], plain["input_ids"][i])
        assert torch.equal(out["mcm_attention_mask"][i, q.answer], plain["attention_mask"][i])
        for j, option in enumerate(q.options):
            ids = tokenizer(option, padding="max_length", truncation=True, max_length=max_len)["input_ids"]
            assert out["mcm_input_ids"][i, j].tolist() == ids


def test_collate_mcm_ignores_questions_that_truncation_erased(vocab, lexicon, tokenizer) -> None:
    long = "a " * 30 + "red square"  # the only content words lie past max_len
    short = "a red square moves left"
    questions = [build_question(c, "k", vocab, lexicon, MCMConfig()) for c in (long, short)]
    out = collate_mcm(questions, [long, short], tokenizer, max_len=16)
    assert out["mcm_answer"].tolist() == [-100, questions[1].answer]
    out = collate_mcm(questions, [long, short], tokenizer, max_len=40)
    assert out["mcm_answer"].tolist() == [questions[0].answer, questions[1].answer]


def test_collate_mcm_shape_without_questions(tokenizer) -> None:
    out = collate_mcm([None, None], ["a b", "c"], tokenizer, 8, num_options=5)
    assert out["mcm_input_ids"].shape == (2, 5, 8) and out["mcm_answer"].tolist() == [-100, -100]
    with pytest.raises(ValueError):
        collate_mcm([None], ["a", "b"], tokenizer, 8)


# ----------------------------------------------------------------------------------------------
# MLM


def mlm_batch(tokenizer, lexicon, rows: int = 2000, max_len: int = 64) -> dict[str, torch.Tensor]:
    """Captions of 1 to 70 lexicon words (some truncated at max_len), plus two empty rows."""
    rng = random.Random(0)
    pool = [w for cls in lexicon.classes for w in lexicon.words_of(cls)] + list(lexicon.words_of("stopword"))
    texts = [" ".join(rng.choices(pool, k=rng.randint(1, 70))) for _ in range(rows)] + ["", ""]
    return tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")


def test_mlm_masks_only_real_tokens_and_labels_exactly_the_chosen(tokenizer, lexicon) -> None:
    tok = mlm_batch(tokenizer, lexicon)
    ids, attn = tok["input_ids"], tok["attention_mask"]
    masked, labels = mask_tokens(ids, attn, tokenizer, rng=torch.Generator().manual_seed(0))
    assert masked.shape == labels.shape == ids.shape and masked.dtype == labels.dtype == torch.int64
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    eligible = attn.bool() & ~special
    chosen = labels != -100
    assert not (chosen & ~eligible).any(), "a special or padding position was chosen"
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen]), "an unchosen position changed"
    assert (labels[~chosen] == -100).all()
    n = eligible.sum(1)
    k = chosen.sum(1)
    assert ((k >= 1) == (n >= 1)).all(), "a row with real tokens has nothing to predict (or an empty row has)"
    assert (k[-2:] == 0).all() and (n[-2:] == 0).all()
    # per row: floor or ceil of 15% of its real tokens, at least 1
    low = torch.clamp(torch.floor(n.double() * 0.15), min=1).long()
    high = torch.clamp(torch.ceil(n.double() * 0.15), min=1).long()
    assert ((k >= torch.minimum(low, n)) & (k <= torch.minimum(high, n))).all()


def test_mlm_rates(tokenizer, lexicon) -> None:
    tok = mlm_batch(tokenizer, lexicon)
    ids, attn = tok["input_ids"], tok["attention_mask"]
    masked, labels = mask_tokens(ids, attn, tokenizer, rng=torch.Generator().manual_seed(1))
    eligible = attn.bool() & ~torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    chosen = labels != -100
    long_rows = eligible.sum(1) >= 20
    # rows with >= 7 tokens are masked 15% in expectation; with a stochastic-rounded count per row
    # (error within 1 token, independent per row) the rate over ~70k tokens is within +-0.002 at 4 sd
    rate = chosen[long_rows].sum() / eligible[long_rows].sum()
    assert abs(rate.item() - 0.15) < 0.005, rate
    n_chosen = chosen.sum().item()
    assert n_chosen > 10_000
    to_mask = (masked == tokenizer.mask_token_id) & chosen
    unchanged = (masked == ids) & chosen
    replaced = chosen & ~to_mask & ~unchanged
    # binomial over > 10k chosen positions: sd <= 0.004 for 80%, <= 0.003 for 10%; tolerance ~5 sd
    assert abs(to_mask.sum().item() / n_chosen - 0.8) < 0.02
    assert abs(replaced.sum().item() / n_chosen - 0.1) < 0.015
    assert abs(unchanged.sum().item() / n_chosen - 0.1) < 0.015
    random_ids = masked[replaced]
    assert not torch.isin(random_ids, torch.tensor(tokenizer.all_special_ids)).any()
    assert (random_ids < len(tokenizer)).all()
    assert len(set(random_ids.tolist())) > 0.9 * len(random_ids)  # spread over the ~30k-word vocabulary
    # another probability is honoured too
    _, labels_half = mask_tokens(ids, attn, tokenizer, 0.5, rng=torch.Generator().manual_seed(1))
    half = (labels_half != -100)[long_rows].sum() / eligible[long_rows].sum()
    assert abs(half.item() - 0.5) < 0.005


def test_mlm_is_deterministic_given_the_generator(tokenizer, lexicon) -> None:
    tok = mlm_batch(tokenizer, lexicon, rows=64)
    ids, attn = tok["input_ids"], tok["attention_mask"]
    a = mask_tokens(ids, attn, tokenizer, rng=torch.Generator().manual_seed(5))
    b = mask_tokens(ids, attn, tokenizer, rng=torch.Generator().manual_seed(5))
    c = mask_tokens(ids, attn, tokenizer, rng=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(ids, tok["input_ids"])  # the input is not modified in place


def test_mlm_rejects_bad_arguments(tokenizer) -> None:
    ids = torch.tensor([[101, 2000, 102]])
    attn = torch.ones_like(ids)
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(ids, attn, tokenizer, 0.0, rng=torch.Generator())
    with pytest.raises(ValueError, match="shape"):
        mask_tokens(ids, attn[:, :2], tokenizer, rng=torch.Generator())
