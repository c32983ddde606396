"""Video-triplet pretraining data: synthetic clips of real street photos -> garment crops of
each tracked garment -> a smoke-budget stage-1 run of configs/video_triplet.yaml."""

from __future__ import annotations

import csv
import importlib.util
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import require_data
from tests.smoke import CONFIGS, smoke
from vestis.recipe_files import read_recipe
from vestis.train import load_config, train
from vestis.train.sources import build_sources
from vestis.video.crops import COLUMNS, SkippedVideoWarning, clip_crops, read_crops_csv

REPO = Path(__file__).resolve().parents[1]
#: Tiny clips: 3.2 s at 25 fps gives sampled frames 25, 50 and 75 after the 0.5 s opening.
SECONDS, SIZE = 3.2, (160, 240)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def parser():
    from vestis.detect import load_parser

    return load_parser()


@pytest.fixture(scope="module")
def clips(tmp_path_factory, data_dir) -> list[Path]:
    """Four tiny synthetic clips of ccp street photos, made by scripts/make_clips.py."""
    require_data(data_dir / "ccp" / "annotations.csv")
    script = load_script("make_clips")
    photos = script.choose(script.ccp_photos(data_dir / "ccp"), 4, seed=0)
    assert photos == script.choose(script.ccp_photos(data_dir / "ccp"), 4, seed=0)
    out = tmp_path_factory.mktemp("clips")
    rows = script.make_clips(photos, out, SECONDS, SIZE, seed=0, progress=False)
    assert [row["motion"] for row in rows] == ["pan", "zoom", "pan", "zoom"]
    return [out / row["clip"] for row in rows]


@pytest.fixture(scope="module")
def crops_csv(tmp_path_factory, clips, parser, encoder) -> Path:
    return clip_crops(clips, tmp_path_factory.mktemp("crops"), parser=parser, encoder=encoder,
                      progress=False)


def test_each_tracked_garment_becomes_an_instance_of_crops_25_frames_apart(crops_csv, clips):
    with open(crops_csv, newline="") as handle:
        assert tuple(csv.DictReader(handle).fieldnames) == COLUMNS
    rows = read_crops_csv(crops_csv)
    by_item: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_item[row["item_id"]].append(row)
    assert {row["clip"] for row in rows} <= {clip.stem for clip in clips}
    assert by_item, "no garment was tracked"
    for item, crops in by_item.items():
        clip, track = item.split(":")
        assert len(crops) >= 2 and track.isdigit()
        assert {row["clip"] for row in crops} == {clip}
        assert len({row["group"] for row in crops}) == 1
        frames = sorted(int(row["frame"]) for row in crops)
        assert all(b - a >= 25 for a, b in pairwise(frames))
        for row in crops:
            with Image.open(crops_csv.parent / row["image"]) as image:
                assert min(image.size) >= 2


def test_a_corrupt_video_is_reported_and_skipped(tmp_path, clips, parser, encoder):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.warns(SkippedVideoWarning, match="broken.mp4"):
        path = clip_crops([broken, clips[0]], tmp_path / "out", parser=parser, encoder=encoder,
                          progress=False)
    rows = read_crops_csv(path)
    assert rows and {row["clip"] for row in rows} == {clips[0].stem}


def stage1_overrides(crops_csv: Path) -> dict:
    """The smoke budget, the recipe's sources with the test's crops, hard negatives forced
    from the second epoch."""
    sources = read_recipe(CONFIGS / "video_triplet.yaml")["data"]["sources"]
    assert sources[0]["name"] == "video"
    sources[0] = {**sources[0], "path": str(crops_csv)}
    budget = smoke(max_images=64)
    return {**budget, "data": {**budget["data"], "sources": sources},
            "loss": {"hard_from_epoch": 1}}


@pytest.mark.train
def test_stage1_trains_on_clips_only_and_switches_to_hard_negatives(crops_csv, tmp_path):
    overrides = stage1_overrides(crops_csv)
    train_samples, validation = build_sources(load_config(CONFIGS / "video_triplet.yaml",
                                                          overrides))
    assert train_samples and all(s.item_id.startswith("video:") for s in train_samples)
    assert [v.name for v in validation] == ["video", "luma", "clothing"]

    result = train(CONFIGS / "video_triplet.yaml", tmp_path, overrides=overrides,
                   progress=False)
    assert result.epochs_run == 2
    with open(tmp_path / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["hard"]) for row in rows] == [0.0, 1.0]
    assert all(float(row["video_triplet"]) >= 0.0 for row in rows)
    assert "luma_R@1" in rows[0] and "clothing_R@1" in rows[0]


def test_video_crops_command_writes_the_csv_and_its_summary(clips, tmp_path):
    from typer.testing import CliRunner

    from vestis.cli import app

    result = CliRunner().invoke(app, ["video-crops", str(clips[0]), "--out",
                                      str(tmp_path / "crops")])
    assert result.exit_code == 0, result.output
    rows = read_crops_csv(tmp_path / "crops" / "crops.csv")
    assert rows and {row["clip"] for row in rows} == {clips[0].stem}
    assert f"crops {len(rows)}" in result.output
    with pytest.warns(SkippedVideoWarning, match="no such file"):
        missing = CliRunner().invoke(app, ["video-crops", str(tmp_path / "none.mp4"), "--out",
                                           str(tmp_path / "x")])
    assert missing.exit_code == 2 and "no garment crop" in missing.output
