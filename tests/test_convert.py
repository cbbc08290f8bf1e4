"""Annotation converters: each benchmark's public format, written small into tmp_path with tiny real
videos and one malformed row or more, converted, then read back from the tars and parquet files."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from multi_dist.shards.build import BuildOptions
from multi_dist.shards.convert import convert, question_type
from multi_dist.shards.demo import clip_spec, encode_mp4, render_frames

from .conftest import run_script


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return render_frames(clip_spec("convert", 0), 8, 32)


@pytest.fixture(scope="module")
def mp4_bytes(frames: np.ndarray) -> bytes:
    return encode_mp4(frames)


def write_with_pyav(path: Path, frames: np.ndarray, fmt: str, codec: str, pix_fmt: str) -> Path:
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def opts(out: Path) -> BuildOptions:
    return BuildOptions(output=str(out), samples_per_shard=3, progress=False)


def samples(out: Path) -> dict[str, dict]:
    """Written samples by video id: the json member, plus which members the sample has."""
    found: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for parts in members.values():
            meta = json.loads(parts["json"])
            meta["_members"] = sorted(parts)
            meta["_txt"] = parts["txt"].decode()
            found[meta["video_id"]] = meta
    return found


def parquet_rows(out: Path) -> dict[str, dict]:
    return {r["video_id"]: r for f in sorted(out.glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "convert_errors.jsonl").read_text().splitlines()]


def test_question_type() -> None:
    assert question_type("What is a man doing?") == "what"
    assert question_type("who is singing") == "who"
    assert question_type("is the man happy") == "other"
    assert question_type("") == "other"


def test_msrvtt_qa_through_the_script(tmp_path: Path, mp4_bytes: bytes) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for n in (0, 1):
        (videos / f"video{n}.mp4").write_bytes(mp4_bytes)
    ann = tmp_path / "ann"
    ann.mkdir()
    entries = [
        {"question": "what is a man doing?", "answer": "sing", "video_id": 0, "id": 0, "category_id": 3},
        {"question": "who is singing?", "answer": "man", "video_id": 0, "id": 1, "category_id": 3},
        {"question": "what color is the car?", "answer": "red", "video_id": 1, "id": 2, "category_id": 5},
        {"question": "is this a mistake?", "video_id": 1, "id": 3},  # entry 4: no answer
        {"question": "how many people dance?", "answer": "two", "video_id": 0, "id": 4, "category_id": 3},
        {"question": ["not", "text"], "answer": "x", "video_id": 1, "id": 5},  # entry 6: wrong type
        {"question": "where is the dog?", "answer": "park", "video_id": 7, "id": 6},  # video7.mp4 is missing
    ]
    (ann / "train_qa.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    args = ["--videos", str(videos), "--output", str(out), "--annotations", str(ann), "--no-progress"]
    proc = run_script("shards/convert.py", "msrvtt-qa", *args, "--split", "train")
    assert proc.returncode == 0, proc.stderr
    assert "7 annotation rows -> 3 videos; 2 malformed row(s)" in proc.stdout
    assert "train_qa.json: entry 4: missing field 'answer'" in proc.stderr
    got = samples(out)
    assert set(got) == {"video0", "video1"}
    assert got["video0"]["qa"] == [  # every question of the video in one sample, in file order
        {"question": "what is a man doing?", "answer": "sing", "type": "what"},
        {"question": "who is singing?", "answer": "man", "type": "who"},
        {"question": "how many people dance?", "answer": "two", "type": "how"},
    ]
    assert got["video0"]["_txt"] == "what is a man doing?"  # the first question is the caption
    assert got["video1"]["qa"] == [{"question": "what color is the car?", "answer": "red", "type": "what"}]
    rows = parquet_rows(out)
    assert rows["video7"]["status"] == "missing_file"
    assert json.loads(rows["video0"]["qa"])[2]["answer"] == "two"  # nested fields are JSON text in parquet
    errs = errors(out)
    assert [(e["unit"], e["row"]) for e in errs] == [("entry", 4), ("entry", 6)]
    assert all(e["file"].endswith("train_qa.json") for e in errs)
    assert "field 'question' should be text, got list" in errs[1]["message"]

    # a missing annotation file fails at once, naming it, and builds nothing
    proc = run_script(
        "shards/convert.py", "msrvtt-qa", *args[:3], str(tmp_path / "o2"), "--annotations", str(ann), "--split", "test"
    )
    assert proc.returncode == 1
    assert f"annotation file not found: {(ann / 'test_qa.json').resolve()}" in proc.stderr
    assert not (tmp_path / "o2").exists()


def test_msvd_qa_maps_ids_to_youtube_clips(
    tmp_path: Path, frames: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for clip in ("-4wsuPCjDBc_5_15", "00jrXRMlZOY_0_10"):
        write_with_pyav(videos / f"{clip}.avi", frames, "avi", "mpeg4", "yuv420p")
    (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n00jrXRMlZOY_0_10 vid2\nbroken line here\n")
    entries = [
        {"answer": "man", "id": 0, "question": "who is cutting a tomato?", "video_id": 1},
        {"answer": "tomato", "id": 1, "question": "what is a man cutting?", "video_id": 1},
        {"answer": "dog", "id": 2, "question": "what is running?", "video_id": 2},
        {"answer": "cat", "id": 3, "question": "what jumps?", "video_id": 9},  # entry 4: no vid9 in the mapping
        {"answer": "x", "id": 4, "question": "where?", "video_id": "two"},  # entry 5: not an integer
        {"answer": "ball", "id": 5, "question": "when does a dog play?", "video_id": 2},
    ]
    (tmp_path / "val_qa.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="multi_dist.shards.convert"):
        summary = convert("msvd-qa", tmp_path, videos, opts(out), split="val")
    assert summary["written"] == 2 and summary["convert_errors"] == 3 and summary["annotation_rows"] == 6
    got = samples(out)
    assert [q["answer"] for q in got["-4wsuPCjDBc_5_15"]["qa"]] == ["man", "tomato"]
    assert [q["type"] for q in got["00jrXRMlZOY_0_10"]["qa"]] == ["what", "when"]
    assert "avi" in got["00jrXRMlZOY_0_10"]["_members"]
    assert got["00jrXRMlZOY_0_10"]["source"] == str((videos / "00jrXRMlZOY_0_10.avi").resolve())
    messages = [e["message"] for e in errors(out)]
    assert messages[0].endswith("youtube_mapping.txt: line 3: expected '<clip name> vid<N>', got 'broken line here'")
    assert messages[1].endswith("val_qa.json: entry 4: video_id 9 (vid9) is not in youtube_mapping.txt")
    assert "val_qa.json: entry 5: field 'video_id' should be an integer" in messages[2]
    assert "val_qa.json: entry 4" in caplog.text


TGIF_FILES = {
    "frameqa": (
        "gif_name\tquestion\tanswer\ttype\tvid_id\tkey\tdescription\n"
        "tumblr_a\twhat is the color of the shirt ?\tblack\t2\tFRAMEQA1\t1\ta man in a black shirt .\n"
        "tumblr_b\thow many dogs are running ?\ttwo\t1\tFRAMEQA2\t2\ttwo dogs are running .\n"
        "tumblr_a\twhere is the man dancing . ?\troom\t3\tFRAMEQA3\t1\ta man dances in a room .\n"
        'tumblr_b\twhat is the "dog" eating ?\tbone\t0\tFRAMEQA4\t2\ta dog eats a bone .\n'
        "tumblr_a\twhat is this ?\tthing\t7\tFRAMEQA5\t1\tunknown type .\n"
        "tumblr_b\ttoo few columns\n"
    ),
    "count": (
        "gif_name\tquestion\tanswer\tvid_id\tkey\n"
        "tumblr_a\tHow many times does the man nod ?\t3\tCOUNT1\t1\n"
        "tumblr_b\tHow many times does the dog jump ?\tmany\tCOUNT2\t2\n"
        "tumblr_b\tHow many times does the dog bark ?\t10\tCOUNT3\t2\n"
    ),
    "action": (
        "gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey\n"
        "tumblr_a\tWhat does the man do 3 times ?\tnod\tjump\tclap\twave\tspin\t0\tACTION1\t1\n"
        "tumblr_a\tWhat does the man do 2 times ?\tnod\tjump\tclap\twave\tspin\t7\tACTION2\t1\n"
        "tumblr_b\tWhat does the dog do 10 or more than 10 times ?\tbark\trun\tsit\tlick\tdig\t4\tACTION3\t2\n"
    ),
    "transition": (
        "gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey\n"
        "tumblr_b\tWhat does the dog do after sit ?\tbark\trun\tsit\tlick\tdig\t1\tTRANS1\t2\n"
        "tumblr_b\tWhat does the dog do before sit ?\tbark\trun\tsit\tlick\tdig\t0\tTRANS2\t2\n"
        "tumblr_a\tWhat does the man do after nod ?\tnod\tjump\tclap\twave\tspin\t3\textra\tTRANS3\t1\n"
    ),
}


def test_tgif_qa_every_task(tmp_path: Path, frames: np.ndarray, mp4_bytes: bytes) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    write_with_pyav(videos / "tumblr_a.gif", frames, "gif", "gif", "rgb8")  # a GIF: re-encoded to mp4
    (videos / "tumblr_b.mp4").write_bytes(mp4_bytes)  # already converted: taken as is
    for task, text in TGIF_FILES.items():
        (tmp_path / f"Train_{task}_question.csv").write_text(text)
    got, errs = {}, {}
    for task in TGIF_FILES:
        out = tmp_path / task
        summary = convert("tgif-qa", tmp_path, videos, opts(out), split="train", task=task)
        got[task], errs[task] = samples(out), [(e["row"], e["message"]) for e in errors(out)]
        assert summary["written"] == (1 if task == "transition" else 2), (task, summary)
    a, b = got["frameqa"]["tumblr_a"], got["frameqa"]["tumblr_b"]
    assert a["qa"] == [
        {"question": "what is the color of the shirt ?", "answer": "black", "type": "frameqa-color"},
        {"question": "where is the man dancing . ?", "answer": "room", "type": "frameqa-location"},
    ]
    assert [q["type"] for q in b["qa"]] == ["frameqa-number", "frameqa-object"]
    assert b["qa"][1]["question"] == 'what is the "dog" eating ?'  # quotes are text in these files
    assert "mp4" in a["_members"] and "gif" not in a["_members"]
    assert a["source"].endswith("tumblr_a.gif") and b["source"].endswith("tumblr_b.mp4")
    assert [n for n, _ in errs["frameqa"]] == [6, 7]
    assert "unknown FrameQA type '7'" in errs["frameqa"][0][1]
    assert "Train_frameqa_question.csv: line 7: 2 columns, the header has 7" in errs["frameqa"][1][1]
    assert got["count"]["tumblr_b"]["qa"] == [
        {"question": "How many times does the dog bark ?", "answer": "10", "type": "count"}
    ]
    assert errs["count"] == [(3, errs["count"][0][1])] and "'many' is not a whole number" in errs["count"][0][1]
    assert got["action"]["tumblr_a"]["mc"] == [
        {
            "question": "What does the man do 3 times ?",
            "options": ["nod", "jump", "clap", "wave", "spin"],
            "answer": 0,
            "type": "action",
        }
    ]
    assert got["action"]["tumblr_b"]["mc"][0]["answer"] == 4
    assert "line 3: answer index 7 in 'answer' is not among the 5 options" in errs["action"][0][1]
    assert [(m["answer"], m["type"]) for m in got["transition"]["tumblr_b"]["mc"]] == [
        (1, "transition"),
        (0, "transition"),
    ]
    assert "line 4: 11 columns, the header has 10" in errs["transition"][0][1]
    assert "tumblr_a" not in got["transition"]  # its only question was malformed


def test_msrvtt_retrieval_train_and_1k_test(tmp_path: Path, mp4_bytes: bytes) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for n in (0, 1, 2, 7579):
        (videos / f"video{n}.mp4").write_bytes(mp4_bytes)
    data = {
        "info": {"year": "2016"},
        "videos": [
            {"video_id": f"video{n}", "id": n, "split": s, "category": 9}
            for n, s in ((0, "train"), (1, "train"), (2, "validate"), (3, "train"), (7579, "test"))
        ],
        "sentences": [
            {"caption": "a man sings", "video_id": "video0", "sen_id": 0},
            {"caption": "a cartoon cat runs", "video_id": "video1", "sen_id": 1},
            {"caption": "someone is singing on stage", "video_id": "video0", "sen_id": 2},
            {"video_id": "video1", "sen_id": 3},  # sentences entry 4: no caption
            {"caption": "a car drives", "video_id": "video2", "sen_id": 4},
            {"caption": "a girl puts a sweater on a dog", "video_id": "video7579", "sen_id": 5},
        ],
    }
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo3\n")  # video3 has no sentence
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n"
        'ret0,msr7579,video7579,"a girl wearing red top, black trouser puts a sweater on a dog"\n'
        "ret1,msr2,video2\n"
    )
    train = convert("msrvtt-ret", tmp_path, videos, opts(tmp_path / "train"), split="train")
    got = samples(tmp_path / "train")
    assert got["video0"]["captions"] == ["a man sings", "someone is singing on stage"]
    assert got["video0"]["_txt"] == "a man sings"
    assert got["video1"]["captions"] == ["a cartoon cat runs"]
    assert train["annotation_rows"] == 3 and train["videos"] == 2
    messages = [e["message"] for e in errors(tmp_path / "train")]
    assert messages[0].endswith("MSRVTT_data.json: sentences entry 4: missing field 'caption'")
    assert messages[1].endswith("MSRVTT_train.9k.csv: line 4: no sentences for video3 in MSRVTT_data.json")

    convert("msrvtt-ret", tmp_path, videos, opts(tmp_path / "test"), split="test")
    got = samples(tmp_path / "test")
    assert list(got) == ["video7579"]
    assert got["video7579"]["captions"] == ["a girl wearing red top, black trouser puts a sweater on a dog"]
    assert [e["row"] for e in errors(tmp_path / "test")] == [3]

    # the official split straight from MSRVTT_data.json ("validate")
    convert("msrvtt-ret", tmp_path / "MSRVTT_data.json", videos, opts(tmp_path / "val"), split="val")
    assert samples(tmp_path / "val")["video2"]["captions"] == ["a car drives"]


def test_msrvtt_multiple_choice(tmp_path: Path, mp4_bytes: bytes) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for n in (7020, 7021):
        (videos / f"video{n}.mp4").write_bytes(mp4_bytes)
    (tmp_path / "MSR_MC_test.csv").write_text(
        "key\tvid_key\ta1\ta2\ta3\ta4\ta5\tanswer\n"
        "mc0\tmsr7020\ta dog runs\ta man cooks\ta car races\ta cat sleeps\tkids play\t1\n"
        "mc1\tmsr7021\ta dog runs\ta man cooks\ta car races\ta cat sleeps\tkids play\t5\n"
        "mc2\tmsr7021\ta dog runs\ta man cooks\ta car races\ta cat sleeps\tkids play\t3\n"
    )
    summary = convert("msrvtt-mc", tmp_path, videos, opts(tmp_path / "out"))
    assert summary["written"] == 2
    got = samples(tmp_path / "out")
    assert got["video7020"]["mc"] == [
        {
            "question": "",
            "options": ["a dog runs", "a man cooks", "a car races", "a cat sleeps", "kids play"],
            "answer": 1,
            "type": "caption",
        }
    ]
    assert got["video7020"]["_txt"] == "a man cooks"
    assert got["video7021"]["mc"][0]["answer"] == 3
    assert "MSR_MC_test.csv: line 3: answer index 5" in errors(tmp_path / "out")[0]["message"]


def test_didemo_paragraphs(tmp_path: Path, mp4_bytes: bytes) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "10015567@N08_3655084291_d8b58466fa.mov.mp4").write_bytes(mp4_bytes)  # as the AWS script names it
    (videos / "2345@N01_777_abc.mp4").write_bytes(mp4_bytes)  # re-encoded copy under its stem
    entries = [
        {
            "annotation_id": 1,
            "description": "a girl jumps",
            "video": "10015567@N08_3655084291_d8b58466fa.mov",
            "times": [[0, 0], [0, 1]],
            "num_segments": 6,
        },
        {"annotation_id": 2, "description": "a dog barks", "video": "2345@N01_777_abc.avi", "times": [[2, 2]]},
        {
            "annotation_id": 3,
            "description": "the girl falls down",
            "times": [[3, 3]],
            "video": "10015567@N08_3655084291_d8b58466fa.mov",
        },
        {"annotation_id": 4, "description": None, "video": "2345@N01_777_abc.avi", "times": [[1, 1]]},
        {"annotation_id": 5, "description": "a bird sings", "video": "gone@N00_1_x.mp4", "times": [[0, 0]]},
    ]
    (tmp_path / "test_data.json").write_text(json.dumps(entries))
    summary = convert("didemo", tmp_path, videos, opts(tmp_path / "out"), split="test")
    assert summary["written"] == 2 and summary["failed"] == {"missing_file": 1}
    got = samples(tmp_path / "out")
    girl = got["10015567@N08_3655084291_d8b58466fa.mov"]
    assert girl["captions"] == ["a girl jumps the girl falls down"]
    assert girl["_txt"] == "a girl jumps the girl falls down"
    assert got["2345@N01_777_abc.avi"]["captions"] == ["a dog barks"]
    assert [(e["row"], e["message"].split(": ", 2)[2]) for e in errors(tmp_path / "out")] == [
        (4, "missing field 'description'")
    ]


def test_labels_csv(tmp_path: Path, mp4_bytes: bytes) -> None:
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    (videos / "a.mp4").write_bytes(mp4_bytes)
    (videos / "sub" / "b.mp4").write_bytes(mp4_bytes)
    (tmp_path / "labels.csv").write_text(  # with the byte-order mark that Excel's "CSV UTF-8" writes
        "\ufeffclip,tags\na.mp4,dog; running\nsub/b.mp4,cat\na.mp4,outdoor; dog\nsub/b.mp4\na.mp4, ; \n"
    )
    convert(
        "labels-csv",
        tmp_path / "labels.csv",
        videos,
        opts(tmp_path / "out"),
        label_col="tags",
        delimiter=";",
        video_col="clip",
    )
    got = samples(tmp_path / "out")
    assert got["a.mp4"]["labels"] == ["dog", "running", "outdoor"]
    assert got["a.mp4"]["_txt"] == got["sub/b.mp4"]["_txt"] == "a video"  # not the labels: the task fuses the text
    assert got["sub/b.mp4"]["labels"] == ["cat"]
    errs = errors(tmp_path / "out")
    assert [e["row"] for e in errs] == [5, 6]
    assert "1 columns, the header has 2" in errs[0]["message"] and "no labels in column 'tags'" in errs[1]["message"]


def test_bad_inputs_fail_at_once(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    with pytest.raises(FileNotFoundError, match="video mapping file not found: .*youtube_mapping.txt"):
        (tmp_path / "train_qa.json").write_text("[]")
        convert("msvd-qa", tmp_path, videos, opts(tmp_path / "o"))
    (tmp_path / "Train_count_question.csv").write_text("gif_name\tquestion\nx\ty\n")
    with pytest.raises(ValueError, match="no column 'answer' in the header"):
        convert("tgif-qa", tmp_path, videos, opts(tmp_path / "o"), task="count")
    with pytest.raises(ValueError, match="TGIF-QA has train and test splits only"):
        convert("tgif-qa", tmp_path, videos, opts(tmp_path / "o"), task="count", split="val")
    (tmp_path / "bad.json").write_text('[{"video": "a.mp4", "description": 3.5e}')
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        convert("didemo", tmp_path / "bad.json", videos, opts(tmp_path / "o"))
    # every row malformed: nothing to build, but the rows are listed
    (tmp_path / "val_data.json").write_text('[{"video": "a.mp4"}, 7]')
    with pytest.raises(ValueError, match="nothing to convert"):
        convert("didemo", tmp_path, videos, opts(tmp_path / "o"), split="val")
    assert [e["row"] for e in errors(tmp_path / "o")] == [1, 2]
    assert not list((tmp_path / "o").glob("*.tar"))
