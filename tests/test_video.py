"""Video queries: frame sampling (every N, opening skip, duplicates, rotation, variable frame
rate, damaged files), garment tracks, fusion of per-frame scores, and search on a small
Luma catalog. Clips are synthetic (vestis.video.synth): real shop photos under a moving
virtual camera."""

from __future__ import annotations

import csv
import json
import types
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from vestis.catalog import Catalog
from vestis.catalog.garments import WHOLE_IMAGE
from vestis.detect import load_parser
from vestis.detect.categories import category_group, compatible_groups
from vestis.models import Encoder
from vestis.video import (
    FusionTree,
    VideoError,
    VideoWarning,
    load_fusion,
    probe,
    sample_frames,
    search_tracks,
    search_video,
    track_garments,
)
from vestis.video.fusion import (
    SHIPPED,
    LearnedFusion,
    TrackExample,
    collate,
    fit_fusion,
    frame_quality,
    fuse_max,
    fuse_mean,
    ranking_loss,
    recall_at_1,
)
from vestis.video.search import track_for_group
from vestis.video.synth import make_clip, write_clip

#: The item filmed in the tracking and search tests: a hoodie with three views.
ITEM = "mh07-gray"
SMALL = (96, 72)


def plain_clip(out: Path, seconds: float = 3.0, **kwargs) -> Path:
    """A small clip of a flat two-tone picture with a still camera (fast to write)."""
    picture = Image.new("RGB", (120, 80), (200, 40, 40))
    picture.paste((40, 40, 200), (0, 40, 120, 80))
    options = {"motion": "static", "occlusion": False, "lighting_drift": False,
               "size": SMALL, **kwargs}
    return make_clip(picture, out, seconds=seconds, **options)


@pytest.fixture(scope="module")
def moving_clip(tmp_path_factory) -> Path:
    """3 s of a changing picture (noise bands scrolling) so no frame is a duplicate."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (SMALL[1], SMALL[0] * 4, 3), dtype=np.uint8)
    frames = ((i / 25, np.ascontiguousarray(base[:, 4 * i % (3 * SMALL[0]):][:, :SMALL[0]]))
              for i in range(75))
    return write_clip(frames, tmp_path_factory.mktemp("moving") / "moving.mkv", 25, SMALL)


# -- reader ---------------------------------------------------------------------------------
def test_every_nth_frame_after_the_opening(moving_clip):
    frames = sample_frames(moving_clip, every=10, skip_seconds=0.5, dedup=None)
    assert isinstance(frames, types.GeneratorType)
    frames = list(frames)
    assert [f.index for f in frames] == [20, 30, 40, 50, 60, 70]
    assert [f.time_s for f in frames] == pytest.approx([i / 25 for i in range(20, 71, 10)])
    assert all(f.image.mode == "RGB" and f.image.size == SMALL for f in frames)
    info = probe(moving_clip)
    assert (info.width, info.height, info.rotation) == (*SMALL, 0)
    assert info.duration_s == pytest.approx(3.0, abs=0.05) and info.fps == pytest.approx(25)


def test_a_short_clip_is_never_skipped_entirely(tmp_path, moving_clip):
    # the skip is capped at a quarter of the clip: 0.75 s here, so frames from 0.8 s remain
    assert [f.index for f in sample_frames(moving_clip, every=20, skip_seconds=60,
                                           dedup=None)] == [20, 40, 60]
    one_second = plain_clip(tmp_path / "short.mp4", seconds=1.0)
    # nothing sampled after the (capped) opening: the opening's last sample is kept
    assert [f.index for f in sample_frames(one_second, every=25, skip_seconds=60)] == [0]


def test_max_side_downscales(moving_clip):
    frame = next(sample_frames(moving_clip, max_side=48, dedup=None))
    assert frame.image.size == (48, 36)


def test_duplicates_of_a_static_shot_are_dropped(tmp_path):
    clip = plain_clip(tmp_path / "static.mp4", seconds=4.0)
    assert len(list(sample_frames(clip, every=10, skip_seconds=0, dedup=None))) == 10
    assert len(list(sample_frames(clip, every=10, skip_seconds=0))) == 1


@pytest.mark.parametrize("turn", [90, -90])
def test_rotation_metadata_is_applied(tmp_path, turn):
    clip = plain_clip(tmp_path / f"rot{turn}.mp4", seconds=1.0, rotation_deg=turn)
    with av.open(str(clip)) as container:  # stored sideways, the display matrix says so
        raw = next(container.decode(video=0))
        assert (raw.width, raw.height) == SMALL[::-1] and raw.rotation == turn
    info = probe(clip)
    assert (info.width, info.height, info.rotation) == (*SMALL, turn)  # -90: a phone's portrait
    image = np.asarray(next(sample_frames(clip, skip_seconds=0)).image, dtype=float)
    assert image.shape[:2] == SMALL[::-1]
    top, bottom = image[:20].mean(axis=(0, 1)), image[-20:].mean(axis=(0, 1))
    assert top[0] > top[2] + 80 and bottom[2] > bottom[0] + 80  # red above blue, upright


def test_variable_frame_rate_times_come_from_pts(tmp_path):
    clip = plain_clip(tmp_path / "vfr.mp4", seconds=4.0, vfr=True)
    frames = list(sample_frames(clip, every=1, skip_seconds=0, dedup=None))
    times = np.array([f.time_s for f in frames])
    steps = np.diff(times)
    assert (steps > 0).all() and steps.max() > 1.5 * steps.min()  # irregular, increasing
    assert not np.allclose(times, np.arange(len(times)) / 25, atol=0.01)
    gridded = [f.time_s for f in sample_frames(clip, every_seconds=1.0, skip_seconds=0,
                                               dedup=None)]
    assert len(gridded) == 4
    for n, t in enumerate(gridded):
        assert n <= t < n + 0.1


def test_unreadable_files_raise_clear_errors(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        sample_frames(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty file \(0 bytes\)"):
        sample_frames(tmp_path / "empty.mp4")
    (tmp_path / "notes.mp4").write_text("not a video at all\n" * 50)
    with pytest.raises(VideoError, match="not a readable video"):
        probe(tmp_path / "notes.mp4")
    with pytest.raises(VideoError, match="not a file"):
        sample_frames(tmp_path)
    with av.open(str(tmp_path / "sound.wav"), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoError, match=r"has no video stream \(only audio\)"):
        sample_frames(tmp_path / "sound.wav")


def test_a_truncated_file_yields_what_came_before_then_warns(tmp_path, moving_clip):
    data = moving_clip.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.warns(VideoWarning, match="looks truncated"):
        frames = list(sample_frames(cut, every=5, skip_seconds=0, dedup=None))
    assert 4 <= len(frames) <= 11 and frames[0].index == 0
    with pytest.raises(VideoError, match="read in part"):
        list(sample_frames(cut, every=5, skip_seconds=0, dedup=None, strict=True))
    # An MP4 cut before its index (written last) cannot be opened at all.
    whole = plain_clip(tmp_path / "whole.mp4")
    (tmp_path / "cut.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(VideoError, match="not a readable video"):
        sample_frames(tmp_path / "cut.mp4")


def test_damage_midway_is_skipped_and_reported(tmp_path, moving_clip):
    frames = ((f.time_s, np.asarray(f.image)) for f in sample_frames(moving_clip, every=1,
                                                                      skip_seconds=0, dedup=None))
    data = bytearray(write_clip(frames, tmp_path / "moving.mp4", 25, SMALL).read_bytes())
    middle = len(data) // 2
    data[middle:middle + 3000] = np.random.default_rng(1).integers(0, 256, 3000,
                                                                   dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    with pytest.warns(VideoWarning, match="damaged packet"):
        frames = list(sample_frames(damaged, every=5, skip_seconds=0, dedup=None))
    indices = [f.index for f in frames]
    assert indices[0] == 0 and len(indices) >= 8  # before and after the damage
    seen = []
    with pytest.raises(VideoError, match="damaged data after"):
        for frame in sample_frames(damaged, every=5, skip_seconds=0, dedup=None, strict=True):
            seen.append(frame.index)
    assert seen and seen[0] == 0 and len(seen) < len(indices)


# -- tracking -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parser():
    return load_parser()


@pytest.fixture(scope="module")
def encoder():
    """The catalog's default model (conftest's ``encoder`` is the ImageNet one)."""
    return Encoder.from_name("vestis-lite0")


@pytest.fixture(scope="module")
def item_photos(luma_rows, data_dir) -> tuple[list[Path], str]:
    rows = sorted((r for r in luma_rows if r["item_id"] == ITEM), key=lambda r: r["view"] != "main")
    return [data_dir / "luma" / r["image"] for r in rows], rows[0]["category"]


@pytest.fixture(scope="module")
def item_clip(tmp_path_factory, item_photos) -> Path:
    photos, _ = item_photos
    return make_clip(photos[:1], tmp_path_factory.mktemp("item") / "pan.mp4", seconds=6,
                     size=(320, 240), motion="pan", seed=1)


@pytest.fixture(scope="module")
def item_tracks(item_clip, parser, encoder):
    return track_garments(sample_frames(item_clip), parser, encoder)


def test_one_garment_is_one_track_across_a_pan(item_tracks, item_photos, encoder):
    _, category = item_photos
    group = category_group(category)
    track = track_for_group(item_tracks, group)
    assert track is not None and track.group in compatible_groups(group)
    assert track.frames == [25, 50, 75, 100, 125]  # every sampled frame, one track
    assert track.vectors.shape == (5, encoder.dim)
    assert np.allclose(np.linalg.norm(track.vectors, axis=1), 1, atol=1e-4)
    assert track.best_observation.frame_index in track.frames
    assert track.thumbnail is not None and max(track.thumbnail.size) <= 256
    assert len({t.track_id for t in item_tracks}) == len(item_tracks)
    assert all(len(t) >= 2 for t in item_tracks)  # one-frame flickers dropped


def test_a_frame_without_garments_is_a_whole_image_observation(tmp_path, parser, encoder):
    clip = plain_clip(tmp_path / "plain.mp4", seconds=2.0, size=(160, 120))
    tracks = track_garments(sample_frames(clip, every=25, skip_seconds=0, dedup=None),
                            parser, encoder)
    assert [(t.group, t.frames) for t in tracks] == [(WHOLE_IMAGE, [0, 25])]
    assert tracks[0].best_observation.box == (0, 0, 160, 120)


# -- fusion ---------------------------------------------------------------------------------
def test_max_and_mean_are_exact():
    scores = np.random.default_rng(0).uniform(-1, 1, (7, 5)).astype(np.float32)
    assert np.array_equal(load_fusion("max")(scores, None), scores.max(axis=0))
    assert np.allclose(load_fusion("mean")(scores, None), scores.mean(axis=0))
    assert np.array_equal(fuse_max(scores), scores.max(axis=0))
    assert np.allclose(fuse_mean(scores), scores.mean(axis=0))


@pytest.mark.parametrize("frames", [1, 4, 7, 9])
def test_the_untrained_tree_is_the_mean(frames):
    scores = np.random.default_rng(frames).uniform(0, 1, (frames, 6)).astype(np.float32)
    fused = LearnedFusion(FusionTree(window=4))(scores)
    assert fused == pytest.approx(scores.mean(axis=0), abs=1e-6)


def test_tree_shape_and_padding():
    tree = FusionTree(window=4)
    assert tree.tree_shape(7) == (2, [4, 3])
    assert tree.tree_shape(1) == (1, [1])
    assert tree.tree_shape(8) == (2, [4, 4])
    # padded frames of a shorter track in a batch do not change its score
    rng = np.random.default_rng(0)
    short = TrackExample(rng.random((2, 3), np.float32), rng.random((2, 1), np.float32))
    long = TrackExample(rng.random((9, 3), np.float32), rng.random((9, 1), np.float32))
    with torch.no_grad():
        tree.clip_node.sharpness.fill_(0.7)
        tree.root_node.quality.fill_(0.3)
        scores, quality, frame_mask, _ = collate([short, long])
        batched = tree(scores, quality, frame_mask)[0]
        alone = tree(torch.from_numpy(short.scores)[None], torch.from_numpy(short.quality)[None])
    assert torch.allclose(batched, alone, atol=1e-6)


@pytest.mark.parametrize("loss", ["softmax", "bce"])
def test_gradients_reach_every_node(loss):
    rng = np.random.default_rng(0)
    examples = [TrackExample.from_scores(rng.random((6, 8), np.float32), 0,
                                         rng.random(6, np.float32)) for _ in range(4)]
    tree = FusionTree()
    ranking_loss(tree, collate(examples), loss).backward()
    grads = {name: p.grad for name, p in tree.named_parameters()}
    for name in ("clip_node.sharpness", "clip_node.quality", "root_node.sharpness",
                 "root_node.quality"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    if loss == "bce":
        assert grads["bias"].abs().sum() > 0 and grads["log_scale"].abs().sum() > 0


def test_learning_finds_the_one_telling_frame():
    """Tracks where the item shows clearly in one frame only (the others are occluded and
    rank every item alike, with noise): max beats mean, and the tree learns to do so."""
    rng = np.random.default_rng(0)

    def example() -> TrackExample:
        scores = rng.normal(0.5, 0.15, (6, 10)).astype(np.float32)
        clear = rng.integers(0, 6)
        scores[clear] = rng.normal(0.4, 0.03, 10)
        scores[clear, 0] = 0.95
        return TrackExample(scores, frame_quality(scores))

    train, test = [example() for _ in range(80)], [example() for _ in range(80)]
    mean = recall_at_1(test, load_fusion("mean"))
    assert mean < 0.7 < recall_at_1(test, load_fusion("max"))
    tree = fit_fusion(train, epochs=20, lr=0.1)
    assert recall_at_1(test, LearnedFusion(tree)) > mean + 0.2
    assert tree.clip_node.sharpness.item() > 0  # it moved from averaging towards max


def test_the_shipped_fusion_is_small_and_loads():
    assert SHIPPED["learned"].is_file() and SHIPPED["learned"].stat().st_size < 8_000
    fusion = load_fusion("learned")
    scores = np.random.default_rng(0).random((5, 4), np.float32)
    assert fusion(scores, None).shape == (4,)
    with pytest.raises(ValueError, match="unknown fusion"):
        load_fusion("median")


# -- search ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory, luma_rows, data_dir) -> Catalog:
    """The filmed item, its product's other colours and a few other tops and bottoms."""
    products = {ITEM.split("-")[0], "mh01", "mh02", "mp01", "wh01"}
    rows = [r for r in luma_rows if r["product"] in products]
    folder = tmp_path_factory.mktemp("video-catalog")
    source = folder / "items.csv"
    with open(source, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "image": str(data_dir / "luma" / row["image"])})
    catalog = Catalog(folder / "catalog", model="vestis-lite0")
    report = catalog.add(source)
    assert report.added == len(rows) and not report.failed
    yield catalog
    catalog.close()


def test_search_video_ranks_the_filmed_item_first(small_catalog, item_clip, item_tracks,
                                                  item_photos):
    assert len(small_catalog) == 9  # mh07 in 3 colours, 6 other items
    group = category_group(item_photos[1])
    hits = search_video(small_catalog, item_clip, k=3)
    assert [h.frames for h in hits] == [t.frames for t in item_tracks]
    main = next(h for h in hits if h.group in compatible_groups(group))
    assert main.matches[0].item_id == ITEM and len(main.matches) == 3
    assert main.best_frame_index in main.frames and main.thumbnail is not None
    for fusion in ("max", "mean"):
        track = track_for_group(item_tracks, group)
        assert search_tracks(small_catalog, [track], k=1, fusion=fusion)[0].matches[0].item_id \
            == ITEM
    payload = json.loads(json.dumps(main.to_dict(thumbnail=True)))
    assert payload["results"][0]["item_id"] == ITEM
    assert payload["thumbnail"].startswith("data:image/jpeg;base64,")
    assert payload["group"] == main.group and payload["frames"] == main.frames


def test_vestis_search_takes_a_video_and_names_bad_ones(small_catalog, item_clip, tmp_path):
    from typer.testing import CliRunner

    from vestis.cli import app

    runner = CliRunner()
    shots = tmp_path / "thumbs"
    result = runner.invoke(app, ["search", str(item_clip), "--catalog", str(small_catalog.path),
                                 "-k", "2", "--json", "--thumbnails", str(shots)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    assert payload["tracks"] and ITEM in {t["results"][0]["item_id"] for t in payload["tracks"]}
    assert sorted(p.name for p in shots.iterdir()) == sorted(
        f"track-{t['track_id']}.jpg" for t in payload["tracks"])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for bad in (broken, empty):
        failed = runner.invoke(app, ["search", str(bad), "--catalog", str(small_catalog.path)])
        assert failed.exit_code == 2 and "error:" in failed.output and bad.name in failed.output
