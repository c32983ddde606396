from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import require_data
from vestis.data import (
    AugmentConfig,
    ConsumerStyle,
    ImageDataset,
    PKSampler,
    SyntheticViews,
    build_eval_transform,
    build_train_transform,
    from_inshop,
    garment_mask,
    read_clothing,
    read_luma,
    source_balanced_weights,
    split_by_group,
)
from vestis.images import ImageError, Preprocess, load_image
from vestis.records import ImageRecord

SMALL = Preprocess(size=64)


@pytest.fixture(scope="module")
def luma(data_dir) -> list[ImageRecord]:
    return read_luma(data_dir / "luma" / "catalog.csv")


@pytest.fixture(scope="module")
def clothing(data_dir) -> list[ImageRecord]:
    return read_clothing(require_data(data_dir / "clothing" / "labels.csv"))


@pytest.fixture(scope="module")
def luma_dataset(luma) -> ImageDataset:
    return ImageDataset(luma, build_eval_transform(SMALL))


@pytest.fixture(scope="module")
def backgrounds(data_dir) -> list[Path]:
    return sorted(require_data(data_dir / "ccp" / "photos").glob("*.jpg"))[:3]


# --- datasets ----------------------------------------------------------------------------


def test_read_luma(luma):
    assert len(luma) == 413
    assert len({s.item_id for s in luma}) == 258
    first = luma[0]
    assert first.path.is_absolute() and first.path.exists()
    assert first.group == first.item_id.split("-")[0]
    assert first.category is not None and "/" in first.category


def test_read_clothing_drops_unusable_labels_and_keeps_sender(clothing):
    labels = {s.item_id for s in clothing}
    assert not labels & {"Not sure", "Skip", "Other"}
    assert {"T-Shirt", "Pants", "Shoes"} <= labels
    assert all(s.category == s.item_id for s in clothing)
    assert all(s.metadata["sender_id"] for s in clothing)


def test_split_keeps_groups_disjoint(luma, clothing):
    train, val = split_by_group(luma, key=lambda s: s.group, val_fraction=0.2, seed=0)
    assert len(train) + len(val) == len(luma)
    assert not {s.group for s in train} & {s.group for s in val}
    assert 0.1 < len(val) / len(luma) < 0.35
    assert split_by_group(luma, key=lambda s: s.group, seed=0) == (train, val)
    assert split_by_group(luma, key=lambda s: s.group, seed=1) != (train, val)

    sender = lambda s: s.metadata["sender_id"]  # noqa: E731
    train, val = split_by_group(clothing, key=sender, val_fraction=0.25)
    assert not {sender(s) for s in train} & {sender(s) for s in val}
    assert 0.2 < len(val) / len(clothing) < 0.35


def test_k_fold_holds_out_every_group_once(luma):
    folds = [split_by_group(luma, key=lambda s: s.group, seed=3, fold=k, folds=5)
             for k in range(5)]
    held_out = [s.path for _, val in folds for s in val]
    assert sorted(held_out) == sorted(s.path for s in luma)  # each photo once
    for train, val in folds:
        assert not {s.group for s in train} & {s.group for s in val}
        assert len(train) + len(val) == len(luma)
        assert abs(len(val) - len(luma) / 5) < 0.05 * len(luma)
    assert split_by_group(luma, key=lambda s: s.group, seed=3, fold=2, folds=5) == folds[2]
    with pytest.raises(ValueError, match="fold must be"):
        split_by_group(luma, key=lambda s: s.group, fold=5, folds=5)
    with pytest.raises(ValueError, match="folds must be"):
        split_by_group(luma, key=lambda s: s.group, fold=0, folds=1)


def test_split_rejects_bad_fraction(luma):
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_group(luma, key=lambda s: s.group, val_fraction=1.0)


def test_image_dataset_codes_and_items(luma, luma_dataset):
    assert luma_dataset.label_names == sorted({s.item_id for s in luma})
    assert len(luma_dataset.category_names) == 12
    assert min(luma_dataset.categories) >= 0 and min(luma_dataset.groups) >= 0
    tensor, label = luma_dataset[0]
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert luma_dataset.label_names[label] == luma[0].item_id


def test_image_dataset_raises_on_bad_image(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    dataset = ImageDataset([ImageRecord(broken, "a")], build_eval_transform(SMALL))
    with pytest.raises(ImageError):
        dataset[0]


def test_from_inshop_reads_the_train_split(tmp_path):
    rows = [
        ("img/MEN/Denim/id_1/01_1_front.jpg", "id_1", "train"),
        ("img/MEN/Denim/id_1/01_2_side.jpg", "id_1", "train"),
        ("img/WOMEN/Dresses/id_2/01_1_front.jpg", "id_2", "query"),
        ("img/WOMEN/Dresses/id_2/01_2_side.jpg", "id_2", "gallery"),
    ]
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    (tmp_path / "list_eval_partition.txt").write_text("\n".join([*lines, *map(" ".join, rows)]))
    samples = from_inshop(tmp_path)
    assert [s.item_id for s in samples] == ["id_1", "id_1"]
    assert samples[0].category == "MEN/Denim"


# --- samplers ----------------------------------------------------------------------------


def luma_sampler(dataset: ImageDataset, hard: float, seed: int = 0) -> PKSampler:
    return PKSampler(
        dataset.labels,
        p=8,
        k=2,
        groups=dataset.groups,
        categories=dataset.categories,
        hard_negative_fraction=hard,
        min_per_label=1,
        seed=seed,
    )


def test_pk_batches_have_p_labels_with_k_images(luma_dataset):
    sampler = PKSampler(luma_dataset.labels, p=8, k=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 92 // 8
    for batch in batches:
        counts = Counter(luma_dataset.labels[i] for i in batch)
        assert len(batch) == 24 and len(counts) == 8 and set(counts.values()) == {3}
        assert all(Counter(luma_dataset.labels)[label] >= 2 for label in counts)


def shared_product_rate(dataset: ImageDataset, hard: float) -> float:
    hits = total = 0
    for epoch in range(4):
        sampler = luma_sampler(dataset, hard)
        sampler.set_epoch(epoch)
        for batch in sampler:
            labels = {dataset.labels[i] for i in batch}
            products = Counter(
                dataset.groups[next(i for i in batch if dataset.labels[i] == x)] for x in labels
            )
            hits += max(products.values()) >= 2
            total += 1
    return hits / total


def test_hard_negative_batches_hold_colours_of_one_product(luma_dataset):
    hard = shared_product_rate(luma_dataset, 1.0)
    random_rate = shared_product_rate(luma_dataset, 0.0)
    assert hard >= 0.9
    assert random_rate <= 0.5
    assert hard - random_rate >= 0.4


def test_pk_is_deterministic_by_seed_and_epoch(luma_dataset):
    first = list(luma_sampler(luma_dataset, 0.5, seed=3))
    assert list(luma_sampler(luma_dataset, 0.5, seed=3)) == first
    assert list(luma_sampler(luma_dataset, 0.5, seed=4)) != first
    sampler = luma_sampler(luma_dataset, 0.5, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_pk_uses_custom_neighbours():
    labels = [label for label in range(20) for _ in range(2)]
    sampler = PKSampler(
        labels,
        p=4,
        k=2,
        hard_negative_fraction=1.0,
        neighbours=lambda label: [(label + 1) % 20, (label + 2) % 20],
    )
    for batch in sampler:
        chosen = sorted({labels[i] for i in batch})
        assert len(chosen) == 4
        # Each label after the first is a near successor of one already chosen.
        assert max(np.diff(sorted(chosen))) <= 2 or 19 in chosen


def test_source_balanced_weights_give_a_small_source_half_the_batches():
    # Source "a" has 4 labels, source "b" 36: uniform draws would give "a" a tenth.
    sources = ["a"] * 4 + ["b"] * 36
    labels = [label for label in range(40) for _ in range(2)]
    balanced = PKSampler(labels, p=8, k=2, batches_per_epoch=50, seed=0,
                         label_weights=source_balanced_weights(sources))
    uniform = PKSampler(labels, p=8, k=2, batches_per_epoch=50, seed=0)

    def share_of_a(sampler: PKSampler) -> float:
        drawn = [labels[i] for batch in sampler for i in batch]
        return float(np.mean([label < 4 for label in drawn]))

    assert 0.35 < share_of_a(balanced) <= 0.5  # at most 4 distinct "a" labels per batch
    assert share_of_a(uniform) < 0.2
    assert source_balanced_weights(["x", "y", "y"]) == [1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="label_weights"):
        PKSampler(labels, p=8, k=2, label_weights=[1.0] * 3)


def test_pk_rejects_too_few_labels():
    with pytest.raises(ValueError, match="labels"):
        PKSampler([0, 0, 1, 1], p=3, k=2)


# --- transforms --------------------------------------------------------------------------


def test_train_transform_shape_dtype_and_seed(luma):
    image = load_image(luma[0].path)
    config = {
        "crop_scale": [0.6, 1.0],
        "flip": 0.5,
        "rotate": 10,
        "perspective": 0.1,
        "blur": 0.2,
        "brightness": 0.2,
        "contrast": 0.2,
    }
    first = build_train_transform(config, SMALL, seed=1)(image)
    assert first.shape == (3, 64, 64) and first.dtype == np.float32
    np.testing.assert_array_equal(build_train_transform(config, SMALL, seed=1)(image), first)
    assert not np.array_equal(build_train_transform(config, SMALL, seed=2)(image), first)
    np.testing.assert_array_equal(build_eval_transform(SMALL)(image), SMALL.to_array(image))


def test_augmentations_keep_red_red():
    red = Image.new("RGB", (90, 120), (220, 20, 30))
    transform = build_train_transform(
        {"brightness": 0.4, "contrast": 0.4, "blur": 1.0, "perspective": 0.3, "rotate": 30},
        SMALL,
        seed=0,
    )
    for _ in range(40):
        pixels = transform(red) * 128 + 127  # back to 0..255
        r, g, b = pixels.reshape(3, -1).mean(axis=1)
        assert r > 3 * max(g, b) and r - max(g, b) > 80


def test_config_refuses_colour_and_unknown_keys():
    with pytest.raises(ValueError, match="colour"):
        AugmentConfig.from_dict({"hue": 0.1})
    with pytest.raises(ValueError, match="unknown"):
        AugmentConfig.from_dict({"rotat": 10})
    with pytest.raises(ValueError, match="rotate"):
        AugmentConfig.from_dict({"rotate": 90})


# --- synthesis ---------------------------------------------------------------------------


def test_garment_mask_separates_studio_background(luma):
    image = load_image(luma[0].path)
    fraction = np.asarray(garment_mask(image)).mean() / 255
    assert 0.05 < fraction < 0.9


def test_consumer_style_makes_a_different_photo(luma, backgrounds):
    shop = load_image(luma[0].path)
    synthetic = ConsumerStyle(backgrounds, rng=0)(shop)
    assert synthetic.mode == "RGB" and synthetic.size == shop.size
    difference = np.abs(np.asarray(synthetic, float) - np.asarray(shop, float)).mean()
    assert difference > 10
    again = ConsumerStyle(backgrounds, rng=random.Random(0))(shop)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(synthetic))
    sized = ConsumerStyle(backgrounds, rng=1, size=(96, 128))(shop)
    assert sized.size == (96, 128)


def test_synthetic_views_pair_with_pk_sampler(luma, backgrounds):
    paths = [s.path for s in luma[:4]]
    dataset = SyntheticViews(
        paths,
        ConsumerStyle(backgrounds, rng=0, size=(96, 128)),
        build_eval_transform(SMALL),
        views=2,
    )
    batch = next(iter(PKSampler(dataset.labels, p=2, k=2, seed=0)))
    items = [dataset[i] for i in batch]
    assert [label for _, label in items] == [dataset.labels[i] for i in batch]
    assert all(tensor.shape == (3, 64, 64) for tensor, _ in items)
