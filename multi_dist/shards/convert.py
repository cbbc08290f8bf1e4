"""Convert the annotations of public video-language benchmarks into our shards (downstream tasks).

Each converter reads a benchmark's own annotation files, as its authors publish them, groups the
annotations by video and returns one row per video for :func:`multi_dist.shards.build.build`:
``{"video": <absolute path>, "caption": <str>, "video_id": <the benchmark's id>, ...task fields}``.
The builder carries the extra keys into each sample's ``json`` (nested values as they are) and
its parquet row (nested values as JSON text). The task fields, which the training code reads:

- ``qa``: ``[{"question": str, "answer": str, "type": str}]``, all open-ended questions of a video
  in one sample (MSRVTT-QA, MSVD-QA, TGIF-QA FrameQA and Count);
- ``mc``: ``[{"question": str, "options": [5 str], "answer": int, "type": str}]``, multiple
  choice (TGIF-QA Action and Transition, MSRVTT-MC);
- ``captions``: ``[str]``, every caption of the video in the split (MSR-VTT retrieval; DiDeMo
  paragraph retrieval: one paragraph);
- ``labels``: ``[str]`` (multi-label classification from a plain CSV).

The builder refuses an empty caption, and QA benchmarks have none: a QA sample's caption is its
first question, so that the sample is valid, the ``txt`` member says what the sample is about,
and no answer leaks into it.

Bad input: a malformed annotation row (missing field, wrong JSON type, unknown answer index, a
line with too few or too many columns) is logged with its file and row number and recorded in
``convert_errors.jsonl`` in the output folder; every other row is converted. The builder cannot
carry such a row as ``invalid_row`` with its own message (it only writes its own reasons), and a
row is often one question of a video whose other questions are fine, so it is no sample of its
own. A missing annotation file fails at once, naming it; a missing video is left to the builder,
which records it as ``missing_file``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.video import VIDEO_EXTS
from .build import BuildOptions, add_writing_options, build, format_summary, writing_options

log = logging.getLogger(__name__)

FORMATS = ("msrvtt-qa", "msvd-qa", "tgif-qa", "msrvtt-ret", "msrvtt-mc", "didemo", "labels-csv")
SPLITS = ("train", "val", "test")
TGIF_TASKS = ("frameqa", "count", "action", "transition")
QUESTION_WORDS = ("what", "who", "how", "when", "where")
FRAMEQA_TYPES = {"0": "object", "1": "number", "2": "color", "3": "location"}
NUM_OPTIONS = 5  # TGIF-QA Action/Transition and MSRVTT-MC both have five candidates
ERRORS_FILE = "convert_errors.jsonl"
LOGGED_ERRORS = 20  # log this many malformed rows one by one; the file has them all
NO_CAPTION = "a video"  # labels-csv's caption where the file has none: the same neutral text for every clip

# What a folder given as --annotations holds for each split (the names the authors publish).
DEFAULT_FILES: dict[str, dict[str, str]] = {
    "msrvtt-qa": {s: f"{s}_qa.json" for s in SPLITS},
    "msvd-qa": {s: f"{s}_qa.json" for s in SPLITS},
    "msrvtt-ret": {"train": "MSRVTT_train.9k.csv", "val": "MSRVTT_data.json", "test": "MSRVTT_JSFUSION_test.csv"},
    "msrvtt-mc": {"test": "MSR_MC_test.csv"},
    "didemo": {s: f"{s}_data.json" for s in SPLITS},
}


class RowError(ValueError):
    """One annotation row that cannot be converted; the message says why (file and row are added)."""


@dataclass
class Conversion:
    """What a converter read: one build row per video, and the annotation rows it had to skip."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    annotations: int = 0  # annotation rows read, malformed ones included

    def error(self, path: Path, unit: str, number: int, reason: str) -> None:
        """Record a malformed row: ``unit`` is "line" for text files (the header is line 1) and
        "entry" for JSON lists (1-based), so the number points at the row a user opens."""
        message = f"{path}: {unit} {number}: {reason}"
        self.errors.append({"file": str(path), "unit": unit, "row": number, "message": message})
        if len(self.errors) <= LOGGED_ERRORS:
            log.warning("skipped a malformed annotation row: %s", message)


# ----------------------------------------------------------------------------------------------
# Reading annotation files


def _require_file(path: Path, what: str) -> Path:
    """A missing annotation file stops the conversion before anything is built."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _load_json(path: Path) -> Any:
    try:
        with _require_file(path, "annotation file").open(encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); is it the right file?") from err


def _json_entries(
    path: Path, data: Any, conv: Conversion, what: str = "", count: bool = True
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based number, entry) for each object of a JSON list; an entry that is no object is a
    malformed row. ``what`` names the list inside the file (e.g. "sentences"); ``count`` False
    leaves a lookup table (MSR-VTT's sentences beside a split csv) out of the rows read."""
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list{' of ' + what if what else ''}, got {type(data).__name__}")
    for number, entry in enumerate(data, 1):
        conv.annotations += int(count)
        if isinstance(entry, dict):
            yield number, entry
        else:
            unit = f"{what} entry" if what else "entry"
            conv.error(path, unit, number, f"expected a JSON object, got {type(entry).__name__}")


def _sniff_delimiter(path: Path) -> str:
    """Tab or comma, from the header: the MSR-VTT csv files exist in both forms."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = f.readline()
    return "\t" if "\t" in header else ","


def _csv_rows(
    path: Path, required: list[str], delimiter: str, quoting: int = csv.QUOTE_MINIMAL
) -> Iterator[tuple[int, dict[str, str] | RowError]]:
    """(line number, row) for each data line; a line with too few or too many columns comes as a
    :class:`RowError` in place of the row. A header without a required column fails at once:
    that is the wrong file, not a bad row."""
    _require_file(path, "annotation file")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(
                f"{path}: no column {', '.join(repr(c) for c in missing)} in the header "
                f"({', '.join(header) or 'empty file'}); is it the right file?"
            )
        for row in reader:
            if None in row:
                yield reader.line_num, RowError(f"{len(header) + len(row[None])} columns, the header has {len(header)}")
            elif any(v is None for v in row.values()):
                got = sum(v is not None for v in row.values())
                yield reader.line_num, RowError(f"{got} columns, the header has {len(header)}")
            else:
                yield reader.line_num, row


def _text(entry: dict[str, Any], name: str) -> str:
    """A non-empty text field; a number is accepted as its text (some dumps store answers as
    numbers), anything else is a malformed row."""
    if name not in entry or entry[name] is None:
        raise RowError(f"missing field '{name}'")
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"field '{name}' should be text, got {type(value).__name__}: {value!r}")
    text = str(value).strip()
    if not text:
        raise RowError(f"empty field '{name}'")
    return text


def _index(entry: dict[str, Any], name: str, count: int) -> int:
    """An answer index in ``0 .. count-1`` (ints, or their text in CSV files)."""
    value = entry.get(name)
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        index = int(str(value).strip())
    except (TypeError, ValueError):
        raise RowError(f"answer index {value!r} in '{name}' is not a number 0-{count - 1}") from None
    if not 0 <= index < count:
        raise RowError(f"answer index {index} in '{name}' is not among the {count} options (0-{count - 1})")
    return index


def question_type(question: str) -> str:
    """The question word (what/who/how/when/where, else "other"): MSRVTT-QA and MSVD-QA report
    accuracy per question word."""
    words = question.strip().lower().split()
    first = words[0] if words else ""
    return first if first in QUESTION_WORDS else "other"


# ----------------------------------------------------------------------------------------------
# Videos and grouping


def _find_video(videos: Path, names: list[str]) -> Path:
    """The first of ``names`` that exists in ``videos`` (absolute); when none does, the first
    name, so that the builder records the expected path as ``missing_file``."""
    for name in names:
        path = videos / name
        if path.is_file():
            return path
    return videos / names[0]


def _group(groups: dict[str, dict[str, Any]], video_id: str, path: Path, caption: str) -> dict[str, Any]:
    """The build row of one video, created on its first annotation (so rows keep the order of
    first appearance, which makes a rerun see the same rows and resume)."""
    if video_id not in groups:
        row: dict[str, Any] = {"video": str(path), "caption": caption, "video_id": video_id}
        if path.suffix.lower() == ".gif":
            # the training reader takes mp4/webm/mkv/avi/mov and decord cannot read GIFs: a clip
            # window makes the builder re-encode the GIF to H.264 mp4 (start 0 keeps every frame)
            row["start"] = 0
        groups[video_id] = row
    return groups[video_id]


def _qa_item(question: str, answer: str, kind: str) -> dict[str, str]:
    return {"question": question, "answer": answer, "type": kind}


# ----------------------------------------------------------------------------------------------
# Converters, one per benchmark


def _msrvtt_name(value: Any) -> str:
    """MSRVTT-QA's ``video_id`` is the number in ``video{N}.mp4``; a "videoN" text is taken as is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"video{value}"
    if isinstance(value, str) and value.strip().isdigit():
        return f"video{value.strip()}"
    if isinstance(value, str) and value.strip().startswith("video") and value.strip()[5:].isdigit():
        return value.strip()
    raise RowError(f"field 'video_id' should be the number N of videoN.mp4, got {value!r}")


def convert_msrvtt_qa(path: Path, videos: Path) -> Conversion:
    """MSRVTT-QA ``{train,val,test}_qa.json``: ``[{"question", "answer", "video_id": N, ...}]``,
    video ``video{N}.mp4``. One sample per video with all its questions."""
    conv, groups = Conversion(), {}
    for number, entry in _json_entries(path, _load_json(path), conv):
        try:
            name = _msrvtt_name(entry.get("video_id"))
            question, answer = _text(entry, "question"), _text(entry, "answer")
        except RowError as err:
            conv.error(path, "entry", number, str(err))
            continue
        video = _find_video(videos, [f"{name}.mp4"])
        row = _group(groups, name, video, question)
        row.setdefault("qa", []).append(_qa_item(question, answer, question_type(question)))
    conv.rows = list(groups.values())
    return conv


def read_youtube_mapping(path: Path, conv: Conversion) -> dict[str, str]:
    """MSVD-QA's ``youtube_mapping.txt``: lines ``<clip name> vid<N>``; returns ``{"N": clip}``."""
    mapping: dict[str, str] = {}
    with _require_file(path, "video mapping file").open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].startswith("vid") or not parts[1][3:].isdigit():
                conv.error(path, "line", number, f"expected '<clip name> vid<N>', got {line.strip()!r}")
                continue
            mapping[parts[1][3:]] = parts[0]
    return mapping


def convert_msvd_qa(path: Path, videos: Path, mapping_path: Path) -> Conversion:
    """MSVD-QA ``{train,val,test}_qa.json`` (same shape as MSRVTT-QA, integer ``video_id``),
    mapped to the YouTube clip through ``youtube_mapping.txt``; video ``<clip>.avi`` (or the same
    name re-encoded as mp4)."""
    conv, groups = Conversion(), {}
    data = _load_json(path)
    mapping = read_youtube_mapping(mapping_path, conv)
    for number, entry in _json_entries(path, data, conv):
        try:
            vid = entry.get("video_id")
            if isinstance(vid, bool) or not (isinstance(vid, int) or (isinstance(vid, str) and vid.isdigit())):
                raise RowError(f"field 'video_id' should be an integer, got {vid!r}")
            clip = mapping.get(str(int(vid)))
            if clip is None:
                raise RowError(f"video_id {vid} (vid{vid}) is not in {mapping_path.name}")
            question, answer = _text(entry, "question"), _text(entry, "answer")
        except RowError as err:
            conv.error(path, "entry", number, str(err))
            continue
        video = _find_video(videos, [f"{clip}.{ext}" for ext in ("avi", "mp4", "webm", "mkv", "mov")])
        row = _group(groups, clip, video, question)
        row.setdefault("qa", []).append(_qa_item(question, answer, question_type(question)))
    conv.rows = list(groups.values())
    return conv


def convert_tgif_qa(path: Path, videos: Path, task: str) -> Conversion:
    """TGIF-QA ``{Train,Test}_{task}_question.csv``: tab-separated with a header (``gif_name``,
    ``question``, then per task ``answer`` and ``type`` 0-3 for FrameQA, ``answer`` for Count,
    ``a1``..``a5`` and the 0-based ``answer`` index for Action and Transition; the columns are
    read by name). Video ``<gif_name>.mp4`` when one was converted already, else the ``.gif``,
    which the builder re-encodes to mp4."""
    if task not in TGIF_TASKS:
        raise ValueError(f"tgif-qa needs --task, one of {', '.join(TGIF_TASKS)} (got {task!r})")
    options = [f"a{i}" for i in range(1, NUM_OPTIONS + 1)]
    required = {
        "frameqa": ["gif_name", "question", "answer", "type"],
        "count": ["gif_name", "question", "answer"],
        "action": ["gif_name", "question", *options, "answer"],
        "transition": ["gif_name", "question", *options, "answer"],
    }[task]
    conv, groups = Conversion(), {}
    # the files are plain tab-separated text: a quote inside a question is a character, not quoting
    for line, row_in in _csv_rows(path, required, "\t", quoting=csv.QUOTE_NONE):
        conv.annotations += 1
        try:
            if isinstance(row_in, RowError):
                raise row_in
            gif, question = _text(row_in, "gif_name"), _text(row_in, "question")
            if task == "frameqa":
                kind = FRAMEQA_TYPES.get(row_in["type"].strip())
                if kind is None:
                    raise RowError(f"unknown FrameQA type {row_in['type']!r} (0-3: object, number, color, location)")
                item: dict[str, Any] = _qa_item(question, _text(row_in, "answer"), f"frameqa-{kind}")
            elif task == "count":
                answer = _text(row_in, "answer")
                if not answer.isdigit():
                    raise RowError(f"count answer {answer!r} is not a whole number")
                item = _qa_item(question, answer, "count")
            else:
                item = {
                    "question": question,
                    "options": [_text(row_in, c) for c in options],
                    "answer": _index(row_in, "answer", NUM_OPTIONS),
                    "type": task,
                }
        except RowError as err:
            conv.error(path, "line", line, str(err))
            continue
        video = _find_video(videos, [f"{gif}.mp4", f"{gif}.gif"])
        row = _group(groups, gif, video, question)
        row.setdefault("qa" if task in ("frameqa", "count") else "mc", []).append(item)
    conv.rows = list(groups.values())
    return conv


def _msrvtt_sentences(path: Path, conv: Conversion, count: bool) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """``MSRVTT_data.json``: the whole file and ``{video_id: [captions in file order]}``."""
    data = _load_json(path)
    if not isinstance(data, dict) or "sentences" not in data:
        raise ValueError(f"{path}: expected an object with 'videos' and 'sentences' (MSRVTT_data.json)")
    captions: dict[str, list[str]] = {}
    for number, entry in _json_entries(path, data["sentences"], conv, "sentences", count):
        try:
            video_id, caption = _text(entry, "video_id"), _text(entry, "caption")
        except RowError as err:
            conv.error(path, "sentences entry", number, str(err))
            continue
        captions.setdefault(video_id, []).append(caption)
    return data, captions


def convert_msrvtt_ret(path: Path, videos: Path, data_json: Path | None, split: str) -> Conversion:
    """MSR-VTT retrieval. ``path`` is one of:

    - a split csv with a ``sentence`` column (``MSRVTT_JSFUSION_test.csv``, the 1k-A test: key,
      vid_key, video_id, sentence): each video has exactly the sentences of that csv;
    - a split csv of ``video_id`` only (``MSRVTT_train.9k.csv``): all captions of each video from
      ``MSRVTT_data.json`` (``data_json``);
    - ``MSRVTT_data.json`` itself: the videos whose ``split`` is ``split`` (train / validate /
      test: the official 6513 / 497 / 2990), with all their captions.

    Fields: ``captions`` (in annotation order); the caption is the first."""
    conv, groups = Conversion(), {}

    def add(video_id: str, captions: list[str]) -> None:
        video = _find_video(videos, [f"{video_id}.mp4"])
        _group(groups, video_id, video, captions[0]).setdefault("captions", []).extend(captions)

    if path.suffix.lower() == ".json":
        data, captions = _msrvtt_sentences(path, conv, count=False)
        wanted = {"val": "validate"}.get(split, split)
        for number, entry in _json_entries(path, data.get("videos"), conv, "videos"):
            try:
                video_id, video_split = _text(entry, "video_id"), _text(entry, "split")
                if video_split == wanted and video_id not in captions:
                    raise RowError(f"no sentences for {video_id}")
            except RowError as err:
                conv.error(path, "videos entry", number, str(err))
                continue
            if video_split == wanted:
                add(video_id, captions[video_id])
        conv.rows = list(groups.values())
        return conv

    delimiter = _sniff_delimiter(_require_file(path, "annotation file"))
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f, delimiter=delimiter), [])
    if "sentence" in header:
        for line, row in _csv_rows(path, ["video_id", "sentence"], delimiter):
            conv.annotations += 1
            try:
                if isinstance(row, RowError):
                    raise row
                add(_text(row, "video_id"), [_text(row, "sentence")])
            except RowError as err:
                conv.error(path, "line", line, str(err))
        conv.rows = list(groups.values())
        return conv

    if data_json is None:
        raise ValueError(f"{path} lists videos without sentences: name MSRVTT_data.json with --data-json")
    _, captions = _msrvtt_sentences(data_json, conv, count=False)
    for line, row in _csv_rows(path, ["video_id"], delimiter):
        conv.annotations += 1
        try:
            if isinstance(row, RowError):
                raise row
            video_id = _text(row, "video_id")
            if video_id not in captions:
                raise RowError(f"no sentences for {video_id} in {data_json.name}")
        except RowError as err:
            conv.error(path, "line", line, str(err))
            continue
        add(video_id, captions[video_id])
    conv.rows = list(groups.values())
    return conv


def convert_msrvtt_mc(path: Path, videos: Path) -> Conversion:
    """MSRVTT-MC (JSFusion's ``MSR_MC_test.csv``, tab-separated: key, vid_key, a1..a5, answer,
    where the 0-based ``answer`` picks the video's true caption). Video ``video{N}.mp4`` from the
    ``video_id`` column when present, else from ``vid_key`` ``msr{N}``. Field ``mc`` with an empty
    question. The caption is the true option: it is one of the video's MSR-VTT captions (as in
    the retrieval test split); multiple-choice evaluation scores the options of ``mc``."""
    options = [f"a{i}" for i in range(1, NUM_OPTIONS + 1)]
    delimiter = _sniff_delimiter(_require_file(path, "annotation file"))
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f, delimiter=delimiter), [])
    id_col = "video_id" if "video_id" in header else "vid_key"
    conv, groups = Conversion(), {}
    for line, row in _csv_rows(path, [id_col, *options, "answer"], delimiter):
        conv.annotations += 1
        try:
            if isinstance(row, RowError):
                raise row
            raw = _text(row, id_col)
            number = raw[3:] if raw.startswith("msr") else raw[5:] if raw.startswith("video") else raw
            if not number.isdigit():
                raise RowError(f"'{id_col}' should be msrN or videoN, got {raw!r}")
            texts = [_text(row, c) for c in options]
            answer = _index(row, "answer", NUM_OPTIONS)
        except RowError as err:
            conv.error(path, "line", line, str(err))
            continue
        video_id = f"video{number}"
        video = _find_video(videos, [f"{video_id}.mp4"])
        item = {"question": "", "options": texts, "answer": answer, "type": "caption"}
        _group(groups, video_id, video, texts[answer]).setdefault("mc", []).append(item)
    conv.rows = list(groups.values())
    return conv


def convert_didemo(path: Path, videos: Path) -> Conversion:
    """DiDeMo (LocalizingMoments) ``{train,val,test}_data.json``: ``[{"annotation_id",
    "description", "video": "<flickr name>.<ext>", "times", ...}]``. Paragraph retrieval: the
    descriptions of a video joined in file order into one paragraph, ``captions: [paragraph]``.
    The video is looked up as named, as ``<name>.mp4`` (what the authors' AWS download script
    writes) and as ``<stem>.<ext>`` for the usual extensions (re-encoded copies)."""
    conv, groups = Conversion(), {}
    for number, entry in _json_entries(path, _load_json(path), conv):
        try:
            name, description = _text(entry, "video"), _text(entry, "description")
        except RowError as err:
            conv.error(path, "entry", number, str(err))
            continue
        stem = Path(name).stem
        video = _find_video(videos, [name, f"{name}.mp4", *(f"{stem}.{ext}" for ext in VIDEO_EXTS)])
        _group(groups, name, video, description).setdefault("_descriptions", []).append(description)
    for row in groups.values():
        paragraph = " ".join(row.pop("_descriptions"))
        row.update(caption=paragraph, captions=[paragraph])
    conv.rows = list(groups.values())
    return conv


def convert_labels_csv(
    path: Path, videos: Path, label_col: str = "labels", delimiter: str = "|", video_col: str = "video"
) -> Conversion:
    """A plain CSV (``.tsv``: tab-separated) with a video column (relative to ``videos``, or
    absolute) and a label column whose labels are split on ``delimiter``. Rows of the same video
    are merged (labels in first-seen order, without repeats). The caption is a ``caption`` column
    when the file has one (a title, say), else ``NO_CAPTION``: never the labels, which the labels
    task would fuse with the video as its text and so read the answer."""
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    conv, groups = Conversion(), {}
    for line, row in _csv_rows(path, [video_col, label_col], sep):
        conv.annotations += 1
        try:
            if isinstance(row, RowError):
                raise row
            name = _text(row, video_col)
            labels = [x.strip() for x in (row[label_col] or "").split(delimiter) if x.strip()]
            if not labels:
                raise RowError(f"no labels in column '{label_col}' (split on {delimiter!r})")
        except RowError as err:
            conv.error(path, "line", line, str(err))
            continue
        video = Path(name).expanduser()
        video = video if video.is_absolute() else videos / video
        caption = (row.get("caption") or "").strip() or NO_CAPTION
        target = _group(groups, name, video, caption).setdefault("labels", [])
        target.extend(x for x in labels if x not in target)
    conv.rows = list(groups.values())
    return conv


# ----------------------------------------------------------------------------------------------
# The conversion


def annotation_file(fmt: str, annotations: str | Path, split: str, task: str | None = None) -> Path:
    """The annotation file: ``annotations`` itself, or the split's standard file inside it when it
    is a folder (e.g. ``test_qa.json``, ``Train_action_question.csv``)."""
    path = Path(annotations).expanduser()
    if not path.is_dir():
        return path
    if fmt == "tgif-qa":
        if split == "val":
            raise ValueError("TGIF-QA has train and test splits only (Train_/Test_*_question.csv)")
        if task not in TGIF_TASKS:
            raise ValueError(f"tgif-qa needs --task, one of {', '.join(TGIF_TASKS)}")
        return path / f"{split.capitalize()}_{task}_question.csv"
    names = DEFAULT_FILES.get(fmt)
    if names is None:
        raise ValueError(f"{fmt}: --annotations must name the file, not a folder ({path})")
    if split not in names:
        raise ValueError(f"{fmt} has no {split} split (splits: {', '.join(names)})")
    return path / names[split]


def read_annotations(
    fmt: str,
    annotations: str | Path,
    videos: str | Path,
    split: str | None = None,
    task: str | None = None,
    mapping: str | Path | None = None,
    data_json: str | Path | None = None,
    label_col: str = "labels",
    delimiter: str = "|",
    video_col: str = "video",
) -> Conversion:
    """Rows for the builder from one benchmark's annotations (see the module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    split = split or ("test" if fmt == "msrvtt-mc" else "train")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    videos = Path(videos).expanduser().resolve()
    if not videos.is_dir():
        raise FileNotFoundError(f"video folder not found: {videos}")
    path = annotation_file(fmt, annotations, split, task).resolve()
    _require_file(path, "annotation file")
    if fmt == "msrvtt-qa":
        return convert_msrvtt_qa(path, videos)
    if fmt == "msvd-qa":
        return convert_msvd_qa(
            path, videos, Path(mapping).expanduser() if mapping else path.parent / "youtube_mapping.txt"
        )
    if fmt == "tgif-qa":
        return convert_tgif_qa(path, videos, task or "")
    if fmt == "msrvtt-ret":
        side = path.parent / "MSRVTT_data.json"
        data = Path(data_json).expanduser() if data_json else (side if side.is_file() else None)
        if split == "val":
            log.warning(
                "msrvtt-ret val: the official validation videos are all in MSRVTT_train.9k.csv (it holds "
                "every video outside the 1k-A test); validate on them only a model trained on the official "
                "training split (--annotations MSRVTT_data.json --split train)"
            )
        return convert_msrvtt_ret(path, videos, data, split)
    if fmt == "msrvtt-mc":
        return convert_msrvtt_mc(path, videos)
    if fmt == "didemo":
        return convert_didemo(path, videos)
    return convert_labels_csv(path, videos, label_col, delimiter, video_col)


def convert(fmt: str, annotations: str | Path, videos: str | Path, opts: BuildOptions, **kwargs: Any) -> dict[str, Any]:
    """Read the annotations, build the shards into ``opts.output`` and write the malformed rows to
    ``convert_errors.jsonl`` there (after the build, so that a refused build leaves an existing
    dataset's file alone). Returns the builder's summary plus ``format``, ``annotation_rows``,
    ``videos`` and ``convert_errors`` (their count)."""
    conv = read_annotations(fmt, annotations, videos, **kwargs)
    out = Path(opts.output)
    if len(conv.errors) > LOGGED_ERRORS:
        log.warning("%d malformed annotation rows in all; every one is in %s", len(conv.errors), out / ERRORS_FILE)
    if not conv.rows:
        out.mkdir(parents=True, exist_ok=True)
        _write_errors(out, conv.errors)
        raise ValueError(
            f"{fmt}: nothing to convert in {annotations} ({conv.annotations} annotation rows, "
            f"{len(conv.errors)} malformed, listed in {out / ERRORS_FILE})"
        )
    summary = build(conv.rows, opts)
    _write_errors(out, conv.errors)
    summary.update(format=fmt, annotation_rows=conv.annotations, videos=len(conv.rows), convert_errors=len(conv.errors))
    return summary


def _write_errors(out: Path, errors: list[dict[str, Any]]) -> None:
    """Every malformed row, one JSON object a line (an empty file says none were found)."""
    tmp = out / f"{ERRORS_FILE}.tmp"
    tmp.write_text("".join(json.dumps(e) + "\n" for e in errors))
    tmp.replace(out / ERRORS_FILE)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        prog="shards/convert.py",
        epilog="--annotations may name a folder: the split's standard file in it is used "
        "({split}_qa.json, {Train,Test}_{task}_question.csv, MSRVTT_train.9k.csv / MSRVTT_JSFUSION_test.csv, "
        "MSR_MC_test.csv, {split}_data.json).",
    )
    p.add_argument("format", choices=FORMATS)
    p.add_argument("--videos", required=True, help="folder holding the benchmark's video files")
    add_writing_options(p)
    p.add_argument("--annotations", required=True, help="the annotation file, or the folder holding the standard files")
    p.add_argument(
        "--split", choices=SPLITS, help="which split's file to take from a folder (default train; test for msrvtt-mc)"
    )
    p.add_argument("--task", choices=TGIF_TASKS, help="tgif-qa: which question file")
    p.add_argument("--mapping", help="msvd-qa: youtube_mapping.txt (default: beside the annotation file)")
    p.add_argument("--data-json", help="msrvtt-ret: MSRVTT_data.json (default: beside the split csv)")
    p.add_argument("--label-col", default="labels", help="labels-csv: the label column")
    p.add_argument("--video-col", default="video", help="labels-csv: the video column")
    p.add_argument("--delimiter", default="|", help="labels-csv: what separates labels in a cell")
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    opts = writing_options(args)
    try:
        summary = convert(
            args.format,
            args.annotations,
            args.videos,
            opts,
            split=args.split,
            task=args.task,
            mapping=args.mapping,
            data_json=args.data_json,
            label_col=args.label_col,
            delimiter=args.delimiter,
            video_col=args.video_col,
        )
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(format_summary(summary))
    print(
        f"{args.format}: {summary['annotation_rows']} annotation rows -> {summary['videos']} videos; "
        f"{summary['convert_errors']} malformed row(s) skipped"
        + (f", listed in {Path(args.output) / ERRORS_FILE}" if summary["convert_errors"] else "")
    )
    return summary
