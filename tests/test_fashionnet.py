"""FashionNet-style landmark pooling: where the local features are sampled, what the parser's
landmarks look like on real photos, and the recipe end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.smoke import smoke, smoke_log_rows
from vestis.detect.landmarks import LANDMARKS
from vestis.images import load_image
from vestis.models import Encoder, create_model
from vestis.models.fashionnet import FashionNet, described_garment

SMOKE = smoke(max_images=32, batches_per_epoch=4)


@pytest.fixture(scope="module")
def model() -> FashionNet:
    return create_model("fashionnet", levels=[4, "head"], pooling="gem", embed_dim=64)


def test_local_features_are_the_map_at_each_visible_landmark(model):
    height, width = 14, 14
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    stage_map = torch.stack([xs.float(), ys.float(), torch.ones(height, width)])[None]
    # pixel centres: x = (i + 0.5) / width * 2 - 1 lands exactly on column i
    columns, rows = [1, 3, 5, 7, 9, 11, 12, 13], [2, 2, 4, 4, 8, 8, 13, 13]
    points = torch.tensor([[[(c + 0.5) / width * 2 - 1, (r + 0.5) / height * 2 - 1]
                            for c, r in zip(columns, rows, strict=True)]])
    visible = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    local = model.local_features(stage_map, points, visible).reshape(len(LANDMARKS), 3)
    scale = local[0, 2]  # every visible landmark's third channel is 1 x the same norm factor
    assert torch.allclose(local[:6, 0] / scale, torch.tensor(columns[:6]).float(), atol=1e-4)
    assert torch.allclose(local[:6, 1] / scale, torch.tensor(rows[:6]).float(), atol=1e-4)
    assert torch.count_nonzero(local[6:]) == 0  # invisible landmarks contribute nothing
    assert torch.linalg.norm(local) == pytest.approx(1.0, abs=1e-5)


def test_landmarks_of_a_real_garment_and_of_an_empty_image(model, data_dir):
    photo = load_image(data_dir / "luma" / "images" / "mh06-black_main.jpg")
    blank = Image.new("RGB", photo.size, (200, 200, 200))
    batch = torch.from_numpy(np.stack([model.preprocess(photo), model.preprocess(blank)]))
    points, visible = model.landmarks(batch)
    assert points.shape == (2, len(LANDMARKS), 2) and visible.shape == (2, len(LANDMARKS))
    assert visible[0].sum() >= 6 and visible[1].sum() == 0
    seen = points[0][visible[0] > 0]
    assert seen.abs().max() <= 1
    names = dict(zip(LANDMARKS, points[0].tolist(), strict=True))
    assert names["left_collar"][1] < names["left_hem"][1]  # the collar is above the hem
    assert names["left_sleeve"][0] < names["right_sleeve"][0]


def test_the_described_garment_is_the_largest_body_garment():
    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[2:10, 2:10] = 6  # footwear: never described
    labels[10:20, 5:35] = 2  # upper, 300 pixels
    labels[20:38, 10:30] = 4  # lower, 360 pixels
    group, mask = described_garment(labels)
    assert group == "lower" and mask.sum() == 360
    assert described_garment(np.zeros((8, 8), dtype=np.uint8)) == (None, None)


def test_the_parser_is_not_part_of_the_state_and_onnx_is_refused(model):
    assert model.parser is not None
    assert not any("parser" in key for key in model.state_dict())
    assert Encoder(model).backend_name == "torch"
    with pytest.raises(ValueError, match="does not export to ONNX"):
        Encoder(model, backend="onnx")


@pytest.mark.train
def test_the_fashionnet_recipe_trains_end_to_end_on_a_smoke_budget(tmp_path, data_dir):
    rows = smoke_log_rows("fashionnet", tmp_path, SMOKE)
    assert all(np.isfinite(float(row["triplet"])) for row in rows)
    encoder = Encoder.from_name(str(tmp_path / "best.pt"))
    photos = [data_dir / "luma" / "images" / "mh06-black_main.jpg",
              data_dir / "luma" / "images" / "mh06-blue_main.jpg"]
    vectors = encoder.embed(photos)
    assert vectors.shape == (2, 256) and np.allclose(np.linalg.norm(vectors, axis=1), 1)
    assert encoder.backend_name == "torch"
