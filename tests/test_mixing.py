"""Mixing corpora: real video clips and real photos (img2dataset layout) in one stream, weighted,
deterministic and resumable; images as one-frame clips with a frame mask the model honours."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from multi_dist.config import ConfigError, load_config
from multi_dist.data.images import decode_image
from multi_dist.data.pipeline import CorpusConfig, DataConfig, VideoTextStream, corpus_name
from multi_dist.data.transforms import decode_size, frames_to_uint8
from multi_dist.data.video import decode_frames
from multi_dist.model import MuLTI, model_config
from multi_dist.shards.build import BuildOptions, build, rows_from_dir
from multi_dist.train import TrainConfig

from .conftest import ROOT, TOKENIZER, run_script, small_data_config

PHOTO_CAPTIONS = {
    "china.jpg": "a chinese temple with a red roof among green trees",
    "flower.jpg": "a pink flower with a yellow centre",
}


def sklearn_photos() -> dict[str, Path]:
    """The two real photos shipped in the PyPI package scikit-learn (found without importing it)."""
    spec = importlib.util.find_spec("sklearn")
    assert spec is not None, "the tests need scikit-learn (pip install -e '.[dev]')"
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "images"
    return {name: folder / name for name in PHOTO_CAPTIONS}


def photo_folder(folder: Path, crops: int = 10, seed: int = 0) -> Path:
    """The two photos, and crops of them saved as jpg, png and webp, each with a sidecar caption."""
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for name, path in sklearn_photos().items():
        stem = Path(name).stem
        shutil.copy(path, folder / name)
        (folder / f"{stem}.txt").write_text(PHOTO_CAPTIONS[name])
        img = Image.open(path)
        for i in range(crops):
            side = rng.randint(48, 160)
            x, y = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
            img.crop((x, y, x + side, y + side)).save(folder / f"{stem}_{i}.{('jpg', 'png', 'webp')[i % 3]}")
            (folder / f"{stem}_{i}.txt").write_text(f"a close view of {PHOTO_CAPTIONS[name]}")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image-text corpus built by shards/build.py from real photos: 22 images in 4 shards."""
    root = tmp_path_factory.mktemp("photos")
    src = photo_folder(root / "src")
    out = root / "photos"
    summary = build(
        rows_from_dir(src, "image", "caption", kind="image"),
        BuildOptions(output=str(out), kind="image", samples_per_shard=6, progress=False),
    )
    assert summary["written"] == 22 and summary["shards"] == 4
    return out


def mixed_cfg(corpora: list[CorpusConfig], **kw: object) -> DataConfig:
    return small_data_config(**{"corpora": corpora, "batch_size": 8, **kw})


def members(folder: Path, key: str) -> dict[str, bytes]:
    """A sample's tar members by extension (keys are shard id + index, as the builder writes them)."""
    with tarfile.open(folder / f"{key[:5]}.tar") as tar:
        return {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.startswith(key)}


def test_a_mixed_batch_of_real_clips_and_photos(demo_corpus: Path, photos: Path) -> None:
    """Real 720p/CIF clips at 8 frames, synthetic clips at 2, photos as one padded frame: one
    batch, T = 8, and a frame mask that says which frames are real."""
    corpora = [
        CorpusConfig(path=str(demo_corpus / "real"), num_frames=8),
        CorpusConfig(path=str(demo_corpus / "val"), num_frames=2, name="synthetic"),
        CorpusConfig(path=str(photos), kind="image"),
    ]
    stream = VideoTextStream(mixed_cfg(corpora, resampled=False, batch_size=80, shuffle_buffer=0))
    (batch,) = list(stream)  # epoch mode: every sample once, here in one batch
    n = 4 + 40 + 22
    assert batch["video"].shape == (n, 8, 3, 32, 32) and batch["frame_mask"].shape == (n, 8)
    assert batch["frame_mask"].dtype == torch.bool
    assert sorted(set(batch["corpus"])) == ["photos", "real", "synthetic"]
    assert stream.corpus_counts == {"real": 4, "synthetic": 40, "photos": 22}
    real_frames = {"real": 8, "synthetic": 2, "photos": 1}
    for i, (corpus, key) in enumerate(zip(batch["corpus"], batch["key"])):
        t = real_frames[corpus]
        assert batch["frame_mask"][i].tolist() == [True] * t + [False] * (8 - t), (corpus, key)
        assert batch["video"][i, t:].eq(0).all()  # padding frames are zeros (and masked)
    # an image row is the photo decoded by hand; a synthetic row is its clip at 2 frames
    i = batch["corpus"].index("photos")
    files = members(photos, batch["key"][i])
    (ext,) = set(files) & {"jpg", "png", "webp"}
    torch.testing.assert_close(batch["video"][i, :1], frames_to_uint8(decode_image(files[ext], 32), 32))
    assert files["txt"].decode() == batch["caption"][i] and json.loads(files["json"])["status"] == "success"
    j = batch["corpus"].index("synthetic")
    clip, meta = members(demo_corpus / "val", batch["key"][j])["mp4"], batch["meta"][j]
    frames = decode_frames(clip, 2, "uniform", resize_to=decode_size(meta["width"], meta["height"], 32))
    torch.testing.assert_close(batch["video"][j, :2], frames_to_uint8(frames, 32))

    # repeat: a photo becomes a still clip, every frame real
    repeat = VideoTextStream(
        mixed_cfg(corpora, resampled=False, batch_size=80, shuffle_buffer=0, image_frames="repeat")
    )
    (again,) = list(repeat)
    assert again["key"] == batch["key"]
    rows = [i for i, c in enumerate(again["corpus"]) if c == "photos"]
    assert again["frame_mask"][rows].all()
    torch.testing.assert_close(again["video"][rows], batch["video"][rows, :1].expand(-1, 8, -1, -1, -1))


def test_the_model_ignores_padding_frames_of_real_photos(demo_corpus: Path, photos: Path) -> None:
    """A photo's outputs in a mixed batch (padded to T=8, beside 8-frame clips) equal its outputs
    alone at T=1, to float32 rounding (atol 1e-5; measured about 1e-6): the vision tower skips
    padding, the temporal embedding numbers real frames, the global feature averages real frames,
    and the sampler's blocks are cut from the real tokens."""
    corpora = [
        CorpusConfig(path=str(demo_corpus / "real"), num_frames=8),
        CorpusConfig(path=str(photos), kind="image", weight=3),
    ]
    batch = next(iter(VideoTextStream(mixed_cfg(corpora, batch_size=12, seed=1))))
    photo_rows = [i for i, c in enumerate(batch["corpus"]) if c == "photos"]
    clip_rows = [i for i, c in enumerate(batch["corpus"]) if c == "real"]
    assert photo_rows and clip_rows and batch["video"].shape[1] == 8
    torch.manual_seed(0)
    model = MuLTI(model_config("tiny")).eval()
    with torch.no_grad():
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        video = model.encode_video(batch["video"], batch["frame_mask"])
        fused = model.fuse(text, video)
        for i in photo_rows:
            one = torch.tensor([i])
            alone = model.encode_video(batch["video"][i : i + 1, :1])  # the photo as a 1-frame clip, no mask
            fused_alone = model.fuse(text.select(one), alone)
            tokens_per_frame = alone.tokens.shape[1]
            torch.testing.assert_close(video.glob[i], alone.glob[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(video.embed[i], alone.embed[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(video.tokens[i, :tokens_per_frame], alone.tokens[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fused.states[i], fused_alone.states[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                fused.video_weights[i, :, :tokens_per_frame], fused_alone.video_weights[0], atol=1e-5, rtol=1e-5
            )
            assert fused.video_weights[i, :, tokens_per_frame:].eq(0).all()
        # and a clip beside the photos is what it is alone
        i = clip_rows[0]
        alone = model.encode_video(batch["video"][i : i + 1])
        torch.testing.assert_close(video.embed[i], alone.embed[0], atol=1e-5, rtol=1e-5)


def share_bound(p: float, n: int) -> float:
    """4 binomial standard deviations: a fair draw lands outside with probability below 1e-4."""
    return 4 * math.sqrt(p * (1 - p) / n)


def test_each_corpus_share_matches_its_weight(demo_corpus: Path, photos: Path) -> None:
    weights = {"synthetic": 0.5, "photos": 0.3, "val": 0.2}
    corpora = [
        CorpusConfig(path=str(demo_corpus / "train"), name="synthetic", weight=5),
        CorpusConfig(path=str(photos), kind="image", weight=3),
        CorpusConfig(path=str(demo_corpus / "val"), weight=2, num_frames=1),
    ]
    n = 2400
    cfg = mixed_cfg(corpora, epoch_samples=n, batch_size=16, num_workers=2, num_frames=1, mlm_probability=0.0)
    stream = VideoTextStream(cfg)
    seen: dict[str, int] = dict.fromkeys(weights, 0)
    for batch in stream:
        for name in batch["corpus"]:
            seen[name] += 1
    assert sum(seen.values()) == n == stream.totals["decoded"]
    assert seen == stream.corpus_counts  # what the training loop logs as data/share_<name>
    for name, p in weights.items():
        assert abs(stream.corpus_shares()[name] - p) <= share_bound(p, n), (name, stream.corpus_shares())


def _take(stream: VideoTextStream, n: int | None = None) -> list[dict]:
    out = []
    for batch in stream:
        out.append({k: batch[k] for k in ("key", "corpus", "video", "frame_mask", "mlm_input_ids")})
        if n is not None and len(out) == n:
            break
    return out


def test_mixing_is_deterministic_and_resumes_exactly(demo_corpus: Path, photos: Path) -> None:
    corpora = [
        CorpusConfig(path=str(demo_corpus / "train"), weight=0.6, num_frames=3),
        CorpusConfig(path=str(photos), kind="image", weight=0.4),
    ]
    cfg = mixed_cfg(
        corpora, epoch_samples=72, batch_size=6, num_workers=2, frame_sampling="random", crop="random", seed=3
    )
    reference = VideoTextStream(cfg, rank=1, world_size=2)
    uninterrupted = _take(reference) + _take(reference)  # two epochs
    assert {c for b in uninterrupted for c in b["corpus"]} == {"train", "photos"}

    again = _take(VideoTextStream(cfg, rank=1, world_size=2))
    assert [b["key"] for b in again] == [b["key"] for b in uninterrupted[: len(again)]]
    assert [b["corpus"] for b in again] == [b["corpus"] for b in uninterrupted[: len(again)]]
    other_seed = _take(VideoTextStream(dataclasses.replace(cfg, seed=4), rank=1, world_size=2), 2)
    assert [b["key"] for b in other_seed] != [b["key"] for b in uninterrupted[:2]]

    first = VideoTextStream(cfg, rank=1, world_size=2)
    head = _take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert sum(state["corpus_counts"].values()) == 5 * 6
    resumed = VideoTextStream(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    got = head + _take(resumed) + _take(resumed)
    assert [b["key"] for b in got] == [b["key"] for b in uninterrupted]
    assert [b["corpus"] for b in got] == [b["corpus"] for b in uninterrupted]
    for a, b in zip(got, uninterrupted):
        for name in ("video", "frame_mask", "mlm_input_ids"):
            assert torch.equal(a[name], b[name]), name
    assert resumed.corpus_counts == reference.corpus_counts

    # another mixture cannot continue this position
    reweighted = [CorpusConfig(path=str(demo_corpus / "train"), weight=0.5, num_frames=3), corpora[1]]
    with pytest.raises(ValueError, match=r"corpora \(name, weight\)=\[\['train', 0\.6\]"):
        VideoTextStream(
            mixed_cfg(reweighted, epoch_samples=72, batch_size=6, num_workers=2, seed=3), 1, 2
        ).load_state_dict(state)


def test_epoch_mode_reads_every_sample_of_every_corpus_once(demo_corpus: Path, photos: Path) -> None:
    corpora = [
        CorpusConfig(path=str(demo_corpus / "val"), weight=1, num_frames=1),
        CorpusConfig(path=str(photos), kind="image", weight=1),
    ]
    cfg = mixed_cfg(corpora, resampled=False, num_workers=2, batch_size=5, num_frames=1)
    seen = []
    for rank in range(2):
        stream = VideoTextStream(cfg, rank, 2)
        expected = len(stream)  # __len__ predicts the batches of a mixture too
        batches = list(stream)
        assert len(batches) == expected
        seen += [(c, k) for b in batches for c, k in zip(b["corpus"], b["key"])]
    assert len(seen) == len(set(seen)) == 40 + 22


def test_bad_corpora_fail_at_start_up_naming_the_corpus(demo_corpus: Path, photos: Path, tmp_path: Path) -> None:
    video = {"path": str(demo_corpus / "train"), "weight": 0.6}
    missing = {"path": str(tmp_path / "cc3m"), "weight": 0.4, "kind": "image"}
    with pytest.raises(FileNotFoundError, match=r"corpus 'cc3m' \(data.corpora\[1\]\): dataset path does not exist"):
        VideoTextStream(DataConfig(corpora=[CorpusConfig(**video), CorpusConfig(**missing)], tokenizer=TOKENIZER))

    def load(*corpora: dict) -> TrainConfig:
        entries = ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in c.items()) + "}" for c in corpora)
        return load_config(
            TrainConfig, ROOT / "configs/pretrain/tiny.yaml", ["data.path=", f"data.corpora=[{entries}]"]
        )

    negative = {"path": str(photos), "weight": -0.4, "kind": "image"}
    with pytest.raises(
        ConfigError, match=r"data\.corpora\[1\]\.weight must be a number >= 0, got -0.4 \(corpus .*photos"
    ):
        load(video, negative)
    with pytest.raises(ConfigError, match=r"every weight is zero \(train, photos\)"):
        load({**video, "weight": 0}, {**negative, "weight": 0})
    with pytest.raises(ConfigError, match=r"two corpora are named 'train'"):
        load(video, {"path": str(demo_corpus / "val"), "name": "train"})
    with pytest.raises(ConfigError, match=r"data\.path .* and corpora are both set"):
        load_config(TrainConfig, ROOT / "configs/pretrain/tiny.yaml", [f"data.corpora=[{{path: {photos}}}]"])
    # the same checks when a stream is built from a config made in code
    with pytest.raises(ValueError, match=r"weight must be a number >= 0, got -1"):
        VideoTextStream(DataConfig(corpora=[CorpusConfig(path=str(photos), weight=-1)], tokenizer=TOKENIZER))
    cfg = load(video, {**negative, "weight": 0.4})
    assert [c.name for c in cfg.data.corpus_configs()] == ["train", "photos"]
    assert [c.kind for c in cfg.data.corpus_configs()] == ["video", "image"]


def test_corpus_names_come_from_their_paths() -> None:
    assert corpus_name("/data/webvid/", 0) == "webvid"
    assert corpus_name("/data/cc3m/{00000..00331}.tar", 1) == "cc3m"
    assert corpus_name("pipe:aws s3 cp s3://bucket/laion/{00000..00099}.tar -", 2) == "laion"
    assert corpus_name("/data/one.tar", 3) == "data"
    assert corpus_name("{a,b}.tar", 4) == "corpus4"


def test_inspect_decodes_image_shards(photos: Path) -> None:
    """``shards/inspect.py --kind image --decode`` streams an img2dataset corpus through the pipeline."""
    proc = run_script("shards/inspect.py", str(photos), "--kind", "image", "--decode", "--json", "--image-size", "32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["samples"] == 22 and report["decode"]["decoded"] == 22 and report["decode"]["skipped"] == 0


def test_evaluating_a_mixture_counts_every_sample_of_every_corpus(demo_corpus: Path, photos: Path) -> None:
    """The two corpora were built apart, so their keys overlap (``000000``, ...): each sample is
    known as ``corpus/key``, and all 40 + 22 are ranked, none merged into another corpus's sample.
    MCM's chance is that of its questions' option count (3 here)."""
    from multi_dist.data.mcm import MCMConfig
    from multi_dist.evaluate import eval_data_config
    from multi_dist.tasks import make_task
    from multi_dist.tasks.base import EvalContext, TaskConfig, run_evaluation

    def keys(folder: Path) -> set[str]:
        found = set()
        for shard in folder.glob("*.tar"):
            with tarfile.open(shard) as tar:
                found |= {m.name.split(".")[0] for m in tar}
        return found

    clips, stills = keys(demo_corpus / "val"), keys(photos)
    assert len(clips) == 40 and len(stills) == 22 and clips & stills  # (the overlap this is about)
    corpora = [
        CorpusConfig(path=str(demo_corpus / "val"), name="synthetic"),
        CorpusConfig(path=str(photos), kind="image"),
    ]
    torch.manual_seed(0)
    model = MuLTI(model_config("tiny"))
    task = make_task(TaskConfig(name="pretrain"), None, 0)
    ctx = EvalContext(rank=0, world=1, device=torch.device("cpu"), bf16=False, batch_size=8)
    data = eval_data_config(mixed_cfg(corpora, mcm=MCMConfig(num_options=3)))
    metrics, predictions = run_evaluation(model, task, data, ctx)
    assert metrics["clips"] == 62 and metrics["chance_r1"] == 1 / metrics["texts"] and metrics["texts"] <= 62
    assert metrics["mcm_chance"] == pytest.approx(1 / 3) and 0 <= metrics["mcm_acc"] <= 1
    assert {p["key"] for p in predictions} == {f"synthetic/{k}" for k in clips} | {f"photos/{k}" for k in stills}


def test_training_on_a_mix_logs_shares_and_counts_real_frames(demo_corpus: Path, photos: Path, tmp_path: Path) -> None:
    """``perf/frames_per_s`` counts the frames the vision tower runs on: a photo is one frame, not
    ``num_frames``. Over a log window, frames / clips is the mean count of real frames a sample,
    between 1 (photos) and 4 (demo clips, all long enough for 4 frames) for this even mix."""
    run = tmp_path / "run"
    corpora = f"[{{path: {demo_corpus / 'train'}, weight: 0.5}}, {{path: {photos}, kind: image, weight: 0.5}}]"
    args = ["--config", "configs/pretrain/tiny.yaml", f"run_dir={run}", "data.path=", f"data.corpora={corpora}"]
    args += ["val=null", "steps=6", "log_every=3", "ckpt_every=6"]
    proc = subprocess.run(
        [sys.executable, "launch/pretrain.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "perf/frames_per_s" in r]
    assert [r["step"] for r in logged] == [3, 6]
    for r in logged:
        per_clip = r["perf/frames_per_s"] / r["perf/clips_per_s"]
        assert 1.0 < per_clip < 4.0, r
        shares = [r[k] for k in r if k.startswith("data/share_")]
        assert len(shares) == 2 and sum(shares) == pytest.approx(1.0)
