"""Data-side pieces of two pretraining objectives: Multiple Choice Modeling (MCM) and Masked
Language Modeling (MLM).

Both run inside the DataLoader workers, so everything here is a pure, picklable function of its
inputs (no model, no ``torch.distributed``), and every random choice comes from a seeded RNG:

- MCM (model.md section 4): one content word of a caption (noun, verb, adjective or direction,
  as the packaged lexicon says; else the rarest non-stopword) becomes ``[MASK]`` in a question,
  and ``num_options`` full captions are offered, the true one plus distractors that replace that
  word by others of the same class, drawn from the corpus answer vocabulary by frequency. The
  randomness comes from ``random.Random(f"{seed}:{key}")``, so a sample's question is the same in
  every worker, process and run.
- MLM: BERT masking (15% of the real tokens; of those 80% ``[MASK]``, 10% a random token, 10%
  unchanged), driven by a ``torch.Generator``.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .shardlist import parquet_column

SAME_MEANING = (
    ("up", "upward", "upwards"),
    ("down", "downward", "downwards"),
    ("left", "leftward", "leftwards"),
    ("right", "rightward", "rightwards"),
    ("forward", "forwards", "ahead"),
    ("backward", "backwards", "back"),
    ("anticlockwise", "counterclockwise"),
    ("east", "eastward"),
    ("west", "westward"),
    ("north", "northward"),
    ("south", "southward"),
)
"""Lexicon words that mean the same: never a distractor of one another (an option that means the
answer is a second right option, which the loss would teach is wrong)."""
_SAME = {w: set(group) for group in SAME_MEANING for w in group}


def same_meaning(word: str) -> set[str]:
    """``word`` and the words of :data:`SAME_MEANING` that mean the same."""
    return _SAME.get(word, {word})


CONTENT_CLASSES = ("noun", "verb", "adjective", "direction")
"""The word classes an MCM question prefers to ask about (directions count: "moves left")."""
OTHER = "other"
"""Vocabulary class of words the lexicon does not know."""
STOPWORD = "stopword"
"""Vocabulary class of the lexicon's stopwords (asked about only when a caption has nothing else)."""
MASK = "[MASK]"
IGNORE_INDEX = -100
"""Label that cross-entropy ignores (PyTorch's default ``ignore_index``)."""
VOCAB_CACHE = "mcm_vocab.json"
_VOCAB_FORMAT = "multi_dist.mcm_vocab/1"

_PLURALS = frozenset({"people", "children", "men", "women", "feet", "teeth", "mice", "geese", "police", "cattle"})


def word_form(word: str, cls: str) -> str:
    """The inflection a distractor should share with the answer, so that grammar alone ("two
    [MASK] run": dogs, not woman) does not give the answer away: a noun's number, a verb's -ing,
    -ed or -s; "" for the other classes. Spelling decides (irregular past tenses count as base
    forms), which is enough to keep the forms of a question alike."""
    if cls == "noun":
        plural = word in _PLURALS or (word.endswith("s") and not word.endswith(("ss", "us", "is")))
        return "plural" if plural else "singular"
    if cls == "verb":
        for suffix in ("ing", "ed"):
            if word.endswith(suffix):
                return suffix
        return "s" if word.endswith("s") and not word.endswith("ss") else "base"
    return ""


# A word: letters and digits, with apostrophes inside ("don't", "man's"); "_" is not a letter.
_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def _word_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, lowercased word) for each word of ``text``; the spans index the original text so
    a word can be replaced without touching the rest of the caption (case, punctuation)."""
    return [(m.start(), m.end(), m.group().lower()) for m in _WORD_RE.finditer(text)]


def words(text: str) -> list[str]:
    """The words of a caption, lowercased, split on anything that is not a letter or digit
    (apostrophes inside a word are kept). The one tokenisation used for counting and masking, so
    the vocabulary and the questions always agree on what a word is."""
    return [w for _, _, w in _word_spans(text)]


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class MCMConfig:
    """Multiple Choice Modeling questions built in the data workers."""

    enabled: bool = True
    """Whether the pipeline builds questions at all (read by the caller; ``build_question`` itself
    always builds one)."""
    num_options: int = 4
    """Options per question: the true caption plus ``num_options - 1`` distractors."""
    seed: int = 0
    """With the sample key, seeds each question's RNG: the same sample gets the same question."""
    max_answer_vocab: int = 5000
    """Distractors come from the most frequent ``max_answer_vocab`` corpus words of each class."""

    def validate(self) -> None:
        if self.num_options < 2:
            raise ValueError(f"num_options must be at least 2 (the answer and a distractor), got {self.num_options}")
        if self.max_answer_vocab < 1:
            raise ValueError(f"max_answer_vocab must be positive, got {self.max_answer_vocab}")


# ----------------------------------------------------------------------------------------------
# Lexicon


class Lexicon:
    """Word -> class for a few thousand common caption words, plus a stopword list.

    Classes are disjoint (a word has at most one class), so the class of a masked word and of its
    distractors is never ambiguous."""

    def __init__(self, classes: Mapping[str, Iterable[str]], stopwords: Iterable[str]) -> None:
        self._words: dict[str, tuple[str, ...]] = {}
        self._class_of: dict[str, str] = {}
        for cls, members in classes.items():
            if cls in (OTHER, STOPWORD):
                raise ValueError(f"'{cls}' is a reserved class name")
            ordered = tuple(dict.fromkeys(w.lower() for w in members))
            for w in ordered:
                if self._class_of.setdefault(w, cls) != cls:
                    raise ValueError(f"lexicon word '{w}' is in two classes: {self._class_of[w]} and {cls}")
            self._words[cls] = ordered
        self._stopwords = tuple(dict.fromkeys(w.lower() for w in stopwords))
        self._forms: dict[tuple[str, str], tuple[str, ...]] = {}
        both = sorted(set(self._stopwords) & set(self._class_of))
        if both:
            raise ValueError(f"lexicon words that are both stopwords and content words: {both[:10]}")
        self._stopword_set = frozenset(self._stopwords)
        text = json.dumps({"classes": self._words, "stopwords": self._stopwords}, sort_keys=True)
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
        """Identifies the lexicon's content: a cached vocabulary built with another is rebuilt."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lexicon:
        """``{"noun": [...], "verb": [...], ..., "stopwords": [...]}`` (the packaged file's layout)."""
        return cls({k: v for k, v in data.items() if k != "stopwords"}, data.get("stopwords", ()))

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self._words)

    def word_class(self, word: str) -> str | None:
        """The word's class ("noun", "verb", "adjective", "direction"), or None (unknown or stopword)."""
        return self._class_of.get(word.lower())

    def is_stopword(self, word: str) -> bool:
        return word.lower() in self._stopword_set

    def category(self, word: str) -> str:
        """The class a vocabulary files the word under: its lexicon class, "stopword" or "other"."""
        w = word.lower()
        return self._class_of.get(w) or (STOPWORD if w in self._stopword_set else OTHER)

    def words_of(self, cls: str, form: str = "") -> tuple[str, ...]:
        """The lexicon's words of a class in a fixed order (the stopwords for "stopword"); of those,
        the words of ``form`` (see :func:`word_form`) when given."""
        if cls == STOPWORD:
            return self._stopwords
        if not form:
            return self._words.get(cls, ())
        if (cls, form) not in self._forms:
            self._forms[cls, form] = tuple(w for w in self._words.get(cls, ()) if word_form(w, cls) == form)
        return self._forms[cls, form]

    def __reduce__(self) -> tuple[Any, ...]:  # pickle the content, not the derived indexes
        return (Lexicon, (self._words, self._stopwords))


@lru_cache(maxsize=1)
def load_lexicon() -> Lexicon:
    """The lexicon shipped with the package (``multi_dist/data/lexicon.json``), read once per process."""
    text = resources.files("multi_dist.data").joinpath("lexicon.json").read_text(encoding="utf-8")
    return Lexicon.from_dict(json.loads(text))


# ----------------------------------------------------------------------------------------------
# Answer vocabulary


class AnswerVocab:
    """Corpus word frequencies by class: where MCM distractors come from, and what "rarest" means.

    ``counts[cls][word]`` is how often ``word`` occurs in the corpus captions; classes are the
    lexicon's, plus "other" (unknown words) and "stopword"."""

    def __init__(self, counts: Mapping[str, Mapping[str, int]], lexicon_fingerprint: str | None = None) -> None:
        self.counts: dict[str, dict[str, int]] = {
            cls: {w: int(n) for w, n in sorted(ws.items(), key=lambda kv: (-kv[1], kv[0])) if n > 0}
            for cls, ws in sorted(counts.items())
        }
        self.lexicon_fingerprint = lexicon_fingerprint
        self._freq: dict[str, int] = {}
        for ws in self.counts.values():
            for w, n in ws.items():
                self._freq[w] = self._freq.get(w, 0) + n
        self._top: dict[tuple[str, int, str], tuple[tuple[str, ...], tuple[int, ...], list[int]]] = {}

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_captions(cls, captions: Iterable[str], lexicon: Lexicon | None = None) -> AnswerVocab:
        """Count every word of every caption under its lexicon class ("other" when unknown)."""
        lexicon = lexicon or load_lexicon()
        totals: Counter[str] = Counter()
        for caption in captions:
            totals.update(words(caption))
        counts: dict[str, dict[str, int]] = {}
        for w, n in totals.items():
            counts.setdefault(lexicon.category(w), {})[w] = n
        return cls(counts, lexicon.fingerprint)

    @classmethod
    def from_dataset(
        cls, path: str | os.PathLike[str], lexicon: Lexicon | None = None, shards: Iterable[str] | None = None
    ) -> AnswerVocab:
        """The vocabulary of a shard folder's captions, read from its ``*.parquet`` files (rows
        with ``status == "success"``; the layout of ``shards/build.py`` and video2dataset).
        ``shards``: only these shards' files (``00007.tar``'s is ``00007.parquet``), for a split
        that samples part of a folder (``path: shards/{00000..00089}.tar``): the other part's
        captions, a held-out split's say, are not its words.

        The result is cached in ``path/mcm_vocab.json`` when the folder is writable (for part of
        the folder, ``mcm_vocab.<hash of the files>.json``), and rebuilt when a parquet file is
        newer than the cache, the set of parquet files changed, or the lexicon changed. Only
        parquet is read (no video bytes): counting runs at about 170k short captions a second on
        one core."""
        lexicon = lexicon or load_lexicon()
        folder = Path(path)
        if not folder.is_dir():
            raise NotADirectoryError(
                f"{path}: the MCM answer vocabulary is read from a local shard folder's *.parquet files"
            )
        every = sorted(folder.glob("*.parquet"))
        parquets = every
        if shards is not None:
            stems = {re.sub(r"\.(tar(\.\w+)?|tgz)$", "", Path(s).name) for s in shards}  # a.0007.tar.gz: a.0007
            parquets = [p for p in every if p.stem in stems]
        if not parquets:
            raise FileNotFoundError(
                f"{folder}: no *.parquet files to read captions from{' for its sampled shards' if every else ''} "
                "(shards/build.py and video2dataset write one beside each tar)"
            )
        names = [p.name for p in parquets]
        cache = folder / VOCAB_CACHE
        if len(parquets) < len(every):
            cache = folder / f"mcm_vocab.{hashlib.sha1(' '.join(names).encode()).hexdigest()[:12]}.json"
        cached = _read_cache(cache, names, max(p.stat().st_mtime_ns for p in parquets), lexicon.fingerprint)
        if cached is not None:
            return cached
        vocab = cls.from_captions(_parquet_captions(parquets), lexicon)
        data = {**vocab._to_dict(), "parquets": names}
        tmp = cache.with_name(f".{VOCAB_CACHE}.{os.getpid()}.tmp")  # ranks may race: each its own file
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, cache)
        except OSError:  # read-only dataset: the vocabulary still works, it is just not cached
            with contextlib.suppress(OSError):
                tmp.unlink()
        return vocab

    # -- serialisation -------------------------------------------------------------------------
    def _to_dict(self) -> dict[str, Any]:
        return {"format": _VOCAB_FORMAT, "lexicon": self.lexicon_fingerprint, "counts": self.counts}

    def to_json(self) -> str:
        """JSON text (classes sorted, words by falling frequency), read back by :meth:`from_json`."""
        return json.dumps(self._to_dict())

    @classmethod
    def from_json(cls, text: str) -> AnswerVocab:
        data = json.loads(text)
        if data.get("format") != _VOCAB_FORMAT:
            raise ValueError(f"not an MCM answer vocabulary (format {data.get('format')!r}, expected {_VOCAB_FORMAT})")
        return cls(data["counts"], data.get("lexicon"))

    # -- queries -------------------------------------------------------------------------------
    def frequency(self, word: str) -> int:
        """Occurrences of ``word`` in the corpus (0 if never seen)."""
        return self._freq.get(word.lower(), 0)

    def words_of(self, cls: str) -> list[str]:
        """The corpus words of a class, most frequent first."""
        return list(self.counts.get(cls, {}))

    def top(self, cls: str, n: int, form: str = "") -> tuple[tuple[str, ...], tuple[int, ...], list[int]]:
        """The ``n`` most frequent words of a class (of its words of ``form``, see :func:`word_form`,
        when given), their counts and cumulative counts (cached: every question of a worker
        samples from the same tables)."""
        key = (cls, n, form)
        if key not in self._top:
            items = list(self.counts.get(cls, {}).items())[:n]
            if form:
                items = [(w, c) for w, c in items if word_form(w, cls) == form]
            ws, ns = tuple(w for w, _ in items), tuple(c for _, c in items)
            cum, total = [], 0
            for c in ns:
                total += c
                cum.append(total)
            self._top[key] = (ws, ns, cum)
        return self._top[key]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnswerVocab) and self.counts == other.counts

    def __repr__(self) -> str:
        sizes = ", ".join(f"{cls}: {len(ws)}" for cls, ws in self.counts.items())
        return f"AnswerVocab({sizes})"

    def __getstate__(self) -> dict[str, Any]:  # ship counts to workers, not the sampling tables
        return {"counts": self.counts, "lexicon_fingerprint": self.lexicon_fingerprint}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["counts"], state["lexicon_fingerprint"])


def _parquet_captions(parquets: Sequence[Path]) -> Iterable[str]:
    for path in parquets:
        yield from (str(c) for c in parquet_column(path, "caption", required=True) if c is not None)


def _read_cache(cache: Path, names: list[str], newest_ns: int, fingerprint: str) -> AnswerVocab | None:
    """The cached vocabulary if it is still valid for these parquet files and this lexicon."""
    try:
        if not cache.is_file() or cache.stat().st_mtime_ns < newest_ns:
            return None
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    if data.get("format") != _VOCAB_FORMAT or data.get("parquets") != names or data.get("lexicon") != fingerprint:
        return None
    return AnswerVocab(data["counts"], fingerprint)


# ----------------------------------------------------------------------------------------------
# Questions


@dataclass
class MCMQuestion:
    """One multiple-choice question built from a caption.

    ``options[answer]`` is the caption itself; every other option differs from it in exactly the
    masked word, replaced by ``candidates[i]`` (the candidates are lowercased words)."""

    question: str
    options: list[str]
    candidates: list[str]
    answer: int
    word_class: str


def build_question(caption: str, key: str, vocab: AnswerVocab, lexicon: Lexicon, cfg: MCMConfig) -> MCMQuestion | None:
    """The MCM question for one sample, a pure function of (caption, key, vocab, lexicon, cfg).

    The masked word is a random content word of the caption (noun, verb, adjective, direction);
    with none, the rarest non-stopword by corpus frequency; with only stopwords, the rarest word.
    Distractors never equal the true word or any other word of the caption (so no option is the
    caption again, and none is a trivially odd repeat). They are drawn, by frequency and without
    replacement, from the class's corpus words of the true word's form (:func:`word_form`: a
    plural noun's distractors are plural, an -ing verb's are -ing); then uniformly from the
    lexicon's words of the class and form; then from the class's words of any form, corpus then
    lexicon; then from the corpus's "other" words; then from any lexicon content word. The answer
    slot is uniform over the options. Returns None only for a caption without a single word."""
    spans = _word_spans(caption)
    if not spans:
        return None
    rng = random.Random(f"{cfg.seed}:{key}")  # str seeds hash with sha512: stable across processes
    cats = [lexicon.category(w) for _, _, w in spans]
    content = [i for i, c in enumerate(cats) if c in CONTENT_CLASSES]
    if content:
        index = rng.choice(content)
    else:
        pool = [i for i, c in enumerate(cats) if c != STOPWORD] or list(range(len(spans)))
        rarest = min(vocab.frequency(spans[i][2]) for i in pool)
        index = rng.choice([i for i in pool if vocab.frequency(spans[i][2]) == rarest])
    start, end, word = spans[index]
    cls = cats[index]
    k = cfg.num_options - 1
    distractors = _distractors(rng, word, cls, {w for _, _, w in spans}, k, vocab, lexicon, cfg.max_answer_vocab)
    if len(distractors) < k:
        return None  # only with a tiny custom lexicon: the packaged one has thousands of words
    answer = rng.randrange(cfg.num_options)
    candidates = distractors[:answer] + [word] + distractors[answer:]
    original = caption[start:end]
    fills = [original if i == answer else _match_case(w, original) for i, w in enumerate(candidates)]
    if len(set(fills)) < len(fills):  # case mapping merged two words (exotic Unicode): use them as they are
        fills = [original if i == answer else w for i, w in enumerate(candidates)]
    head, tail = caption[:start], caption[end:]
    return MCMQuestion(
        question=head + MASK + tail,
        options=[head + f + tail for f in fills],
        candidates=candidates,
        answer=answer,
        word_class=cls,
    )


def _distractors(
    rng: random.Random,
    word: str,
    cls: str,
    banned: set[str],
    k: int,
    vocab: AnswerVocab,
    lexicon: Lexicon,
    max_vocab: int,
) -> list[str]:
    banned = {v for w in (*banned, word) for v in same_meaning(w)}
    chosen: list[str] = []

    def take(new: list[str]) -> None:
        for w in new:
            if w not in banned:  # (a word meaning the same as one drawn with it)
                chosen.append(w)
                banned.update(same_meaning(w))

    form = word_form(word, cls)
    if form:
        take(_weighted_sample(rng, *vocab.top(cls, max_vocab, form), k, banned))
        if len(chosen) < k:
            take(_uniform_sample(rng, lexicon.words_of(cls, form), k - len(chosen), banned))
    if len(chosen) < k:
        take(_weighted_sample(rng, *vocab.top(cls, max_vocab), k - len(chosen), banned))
    if len(chosen) < k:
        take(_uniform_sample(rng, lexicon.words_of(cls), k - len(chosen), banned))
    if len(chosen) < k and cls != OTHER:
        take(_weighted_sample(rng, *vocab.top(OTHER, max_vocab), k - len(chosen), banned))
    if len(chosen) < k:
        everything = [w for c in CONTENT_CLASSES for w in lexicon.words_of(c)]
        take(_uniform_sample(rng, everything, k - len(chosen), banned))
    return chosen


def _weighted_sample(
    rng: random.Random, ws: Sequence[str], counts: Sequence[int], cum: Sequence[int], k: int, banned: set[str]
) -> list[str]:
    """Up to ``k`` distinct words not in ``banned``, drawn one after another with probability
    proportional to their counts among those left (sampling without replacement). Draws by
    bisection on the cumulative counts and rejects banned or repeated words; should a few words
    hold most of the mass and be banned, it finishes exactly over the remaining words."""
    if k <= 0 or not ws:
        return []
    out: list[str] = []
    seen = set(banned)
    total = cum[-1]
    for _ in range(8 * k + 8):
        if len(out) == k:
            return out
        w = ws[min(bisect.bisect_right(cum, rng.random() * total), len(ws) - 1)]
        if w not in seen:
            out.append(w)
            seen.add(w)
    rest = [(w, c) for w, c in zip(ws, counts) if w not in seen]
    while rest and len(out) < k:
        r = rng.random() * sum(c for _, c in rest)
        j = 0
        while j < len(rest) - 1 and r >= rest[j][1]:
            r -= rest[j][1]
            j += 1
        out.append(rest.pop(j)[0])
    return out


def _uniform_sample(rng: random.Random, pool: Sequence[str], k: int, banned: set[str]) -> list[str]:
    eligible = [w for w in dict.fromkeys(pool) if w not in banned]
    return rng.sample(eligible, min(k, len(eligible)))


def _match_case(word: str, original: str) -> str:
    """``word`` cased like the caption's word it replaces ("Man" -> "Dog", "TV" -> "RADIO")."""
    if len(original) > 1 and original.isupper():
        return word.upper()
    if original[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def collate_mcm(
    questions: Sequence[MCMQuestion | None],
    captions: Sequence[str],
    tokenizer: Any,
    max_len: int,
    num_options: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise a batch of questions: ``mcm_input_ids`` and ``mcm_attention_mask`` of shape
    ``(B, num_options, max_len)`` and ``mcm_answer`` ``(B,)`` int64.

    Padded to ``max_len`` like the pipeline's captions, so shapes match on every rank and step.
    A sample without a question gets its caption in every slot and answer -100 (ignored by the
    loss); so does one whose options truncation made identical (the masked word fell past
    ``max_len``). Pass ``num_options`` (the config's) so that a batch in which no caption gave a
    question still has the configured shape; by default it is the questions' own count, else 4."""
    if len(questions) != len(captions):
        raise ValueError(f"{len(questions)} questions for {len(captions)} captions")
    sizes = {len(q.options) for q in questions if q is not None}
    if len(sizes) > 1 or (num_options is not None and sizes and sizes != {num_options}):
        raise ValueError(f"questions with different numbers of options in one batch: {sorted(sizes)}")
    k = num_options or (next(iter(sizes)) if sizes else MCMConfig.num_options)
    texts: list[str] = []
    answers: list[int] = []
    for q, caption in zip(questions, captions):
        if q is None:
            texts += [caption] * k
            answers.append(IGNORE_INDEX)
        else:
            texts += q.options
            answers.append(q.answer)
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    b = len(captions)
    ids = tok["input_ids"].reshape(b, k, max_len)
    mask = tok["attention_mask"].reshape(b, k, max_len)
    answer = torch.tensor(answers, dtype=torch.int64)
    same = (ids[:, :, None, :] == ids[:, None, :, :]).all(-1)  # (B, k, k): option i tokenises like j
    clash = (same & ~torch.eye(k, dtype=torch.bool)).flatten(1).any(1)
    answer[clash] = IGNORE_INDEX
    return {"mcm_input_ids": ids.to(torch.int64), "mcm_attention_mask": mask, "mcm_answer": answer}


# ----------------------------------------------------------------------------------------------
# MLM


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: Any,
    probability: float = 0.15,
    *,
    rng: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a ``(B, L)`` batch: returns ``(masked_ids, labels)``.

    Only real tokens are chosen (never ``tokenizer.all_special_ids`` nor padding). Like BERT's
    reference implementation, each row gets an exact count of positions rather than a coin flip
    per token, but with the count ``floor(n * probability + u)``, ``u ~ U(0, 1)``: its
    expectation is exactly ``n * probability``, and at least one position is chosen in every
    row with a real token (so no row has nothing to predict; rows with fewer than
    ``1 / probability`` tokens are thus masked a bit more than ``probability``). Of the chosen
    positions 80% become the mask token, 10% a random non-special token, 10% stay; ``labels``
    holds the original id there and -100 everywhere else. Deterministic given the generator."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"expected input_ids and attention_mask of the same (B, L) shape, got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if not 0 < probability <= 1:
        raise ValueError(f"masking probability must be in (0, 1], got {probability}")
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token; MLM needs one")
    b, length = input_ids.shape
    ids = input_ids.cpu()
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=ids.dtype)
    eligible = attention_mask.cpu().bool() & ~torch.isin(ids, special)
    n = eligible.sum(1)
    count = torch.floor(n.double() * probability + torch.rand(b, generator=rng, dtype=torch.float64)).long()
    count = torch.minimum(count.clamp(min=1), n)
    keys = torch.rand(b, length, generator=rng).masked_fill(~eligible, 2.0)  # ineligible sort last
    rank = keys.argsort(dim=1).argsort(dim=1)
    chosen = rank < count[:, None]
    action = torch.rand(b, length, generator=rng)
    vocab = torch.arange(len(tokenizer), dtype=ids.dtype)
    allowed = vocab[~torch.isin(vocab, special)]
    random_ids = allowed[torch.randint(len(allowed), (b, length), generator=rng)]
    masked = ids.clone()
    masked[chosen & (action < 0.8)] = tokenizer.mask_token_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    masked[swap] = random_ids[swap]
    labels = ids.masked_fill(~chosen, IGNORE_INDEX)
    return masked.to(input_ids.device), labels.to(input_ids.device)
