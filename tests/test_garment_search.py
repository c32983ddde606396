"""Garments in catalog and query photos: categories to groups, the product's box, crops at
ingest, per-garment search with compatible groups, the parser's ONNX runner, eval crops."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vestis.catalog import Catalog
from vestis.cli import app
from vestis.detect import load_parser
from vestis.detect.categories import (
    category_group,
    category_mapping,
    compatible_groups,
    product_box,
)
from vestis.evaluation import evaluate
from vestis.evaluation.datasets import load_dataset
from vestis.evaluation.run import embed_dataset, prepare_dataset, with_garment_boxes
from vestis.models import Encoder

runner = CliRunner()


@dataclass
class Blob:
    group: str
    box: tuple[int, int, int, int]
    mask: np.ndarray
    score: float


def blob(group: str, box: tuple[int, int, int, int], size=(200, 300), score=0.95) -> Blob:
    mask = np.zeros((size[1], size[0]), dtype=bool)
    mask[box[1]:box[3], box[0]:box[2]] = True
    return Blob(group, box, mask, score)


@pytest.fixture(scope="module")
def parser():
    return load_parser()


@pytest.fixture(scope="module")
def ccp_photo(data_dir) -> Path:
    return data_dir / "ccp" / "photos" / "0001.jpg"


@pytest.fixture(scope="module")
def luma_by_category(tmp_path_factory, luma_rows, data_dir) -> Path:
    """Every photo of the first product of each Luma category (tops and bottoms)."""
    first: dict[str, str] = {}
    for row in sorted(luma_rows, key=lambda r: r["product"]):
        first.setdefault(row["category"], row["product"])
    out = tmp_path_factory.mktemp("luma-categories") / "catalog.csv"
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(luma_rows[0]))
        writer.writeheader()
        for row in luma_rows:
            if row["product"] == first[row["category"]]:
                writer.writerow({**row, "image": str(data_dir / "luma" / row["image"])})
    return out


@pytest.fixture(scope="module")
def cropped_catalog(tmp_path_factory, luma_by_category) -> Path:
    path = tmp_path_factory.mktemp("garments") / "catalog"
    with Catalog(path) as catalog:
        report = catalog.add(luma_by_category, crop="garment")
        assert report.added > 0 and not report.failed
    return path


# -- categories and the product's box -------------------------------------------------------
@pytest.mark.parametrize("category, group", [
    ("Men/Tops/Jackets", "outer"),
    ("Women/Tops/Hoodies & Sweatshirts", "upper"),
    ("Women/Tops/Bras & Tanks", "upper"),
    ("Women/Bottoms/Shorts", "lower"),
    ("T-Shirt", "upper"),
    ("Outwear", "outer"),
    ("Dresses", "dress"),
    ("Shoes", "footwear"),
    ("Not sure", None),
    ("", None),
])
def test_categories_map_to_garment_groups_by_their_most_specific_word(category, group):
    assert category_group(category) == group


def test_exact_category_entries_override_the_keywords_and_bad_groups_are_refused():
    mapping = category_mapping({"Men/Tops/Jackets": "upper", "Other": "none"})
    assert mapping("Men/Tops/Jackets") == "upper"
    assert mapping("Other") is None
    assert mapping("Women/Bottoms/Pants") == "lower"
    with pytest.raises(ValueError, match="unknown group"):
        category_mapping({"Hats": "hats"})


def test_compatible_groups_keep_shoes_away_from_tops():
    assert "footwear" not in compatible_groups("upper")
    assert compatible_groups("footwear") == ("footwear",)
    assert "outer" in compatible_groups("upper")


def test_product_box_joins_the_parts_of_a_top_and_ignores_other_garments():
    top, jacket = blob("upper", (60, 40, 140, 120)), blob("outer", (40, 30, 160, 160))
    trousers = blob("lower", (50, 160, 150, 290))
    box, group = product_box([top, jacket, trousers], "upper", (200, 300))
    x1, y1, x2, y2 = box
    assert x1 < 40 and y1 < 30 and 160 < x2 and 160 < y2 < 170  # jacket + top, plus margin
    assert group == "upper"
    box, group = product_box([top, jacket, trousers], "lower", (200, 300))
    assert group == "lower" and 150 < box[1] < 160 and box[3] == 295


def test_product_box_without_a_category_takes_the_largest_garment():
    small, large = blob("footwear", (10, 250, 40, 290)), blob("lower", (50, 120, 150, 290))
    box, group = product_box([small, large], None, (200, 300))
    assert group == "lower" and box[0] < 50 < 150 < box[2]


def test_product_box_gives_up_on_close_ups_and_empty_parses():
    speck = blob("upper", (10, 10, 20, 20))
    assert product_box([speck], "upper", (200, 300)) is None
    assert product_box([], "upper", (200, 300)) is None


def test_the_stricter_trust_tests_refuse_unsure_and_minor_products(monkeypatch):
    from vestis.detect import categories

    top, jacket = blob("upper", (60, 40, 140, 120)), blob("outer", (40, 30, 160, 160))
    trousers = blob("lower", (50, 160, 150, 290))
    unsure = blob("upper", (40, 30, 160, 160), score=0.6)
    assert product_box([unsure], "upper", (200, 300)) is not None
    assert product_box([top, jacket, trousers], "lower", (200, 300)) is not None
    monkeypatch.setattr(categories, "MIN_PRODUCT_SCORE", 0.85)
    monkeypatch.setattr(categories, "MIN_DOMINANCE", 0.6)
    assert product_box([unsure], "upper", (200, 300)) is None
    # trousers under a larger jacket are not the photo's main garment
    assert product_box([top, jacket, trousers], "lower", (200, 300)) is None
    small_top = blob("upper", (70, 60, 130, 110))
    assert product_box([small_top, trousers], "lower", (200, 300))[1] == "lower"


# -- the parser on ONNX Runtime -------------------------------------------------------------
def test_the_parsers_onnx_runner_gives_torchs_garments(ccp_photo):
    onnx_parser, torch_parser = load_parser(backend="onnx"), load_parser(backend="torch")
    assert onnx_parser.backend_name == "onnxruntime" and torch_parser.backend_name == "torch"
    for photo in (ccp_photo, Image.open(ccp_photo).rotate(90, expand=True)):
        image = photo if isinstance(photo, Image.Image) else Image.open(photo)
        a, b = onnx_parser.logits(image), torch_parser.logits(image)
        assert a.shape == b.shape
        assert float((a - b).abs().max()) < 1e-2
        found = [(g.group, g.box) for g in onnx_parser.parse(image)]
        assert found == [(g.group, g.box) for g in torch_parser.parse(image)]


def test_the_parsers_onnx_runner_splits_a_photo_and_its_mirror_over_two_streams():
    from vestis.detect.onnx import OnnxParserRunner, export_parser

    model = export_parser(load_parser(backend="torch").net)
    one, two = OnnxParserRunner(model, streams=1), OnnxParserRunner(model, streams=2)
    assert two.streams == 2 and two.session.get_session_options().intra_op_num_threads == 1
    x = np.random.default_rng(0).standard_normal((2, 3, 384, 256)).astype(np.float32)
    assert np.array_equal(one(x), two(x))  # the same logits, whatever the split
    assert np.array_equal(two(x[:1]), one(x[:1]))


# -- catalog side ---------------------------------------------------------------------------
def test_garment_crops_store_a_box_and_a_group_per_image(cropped_catalog, luma_by_category,
                                                         parser):
    with Catalog(cropped_catalog) as catalog:
        assert catalog.crop_mode == "garment" and catalog.has_garment_groups
        images = [image for item_id in catalog.item_ids()
                  for image in catalog.get(item_id).images]
        assert any(image.box is not None for image in images)
        for image in images:
            photo = Image.open(image.path).convert("RGB")
            group = category_group(image.metadata["category"])
            assert image.metadata["garment"] == group
            # the stored box is the trusted product box; an untrusted parse stays whole
            found = product_box(parser.parse(photo), group, photo.size)
            assert image.box == (found[0] if found else None), image.path
            if image.box is not None:
                x1, y1, x2, y2 = image.box
                assert 0 <= x1 < x2 <= photo.width and 0 <= y1 < y2 <= photo.height
                assert 0.05 < (x2 - x1) * (y2 - y1) / (photo.width * photo.height) <= 1
        # a re-run finds every photo already indexed and parses nothing
        report = catalog.add(luma_by_category)
        assert report.added == 0 and report.skipped == len(images)


def test_a_catalog_without_crops_still_knows_its_garment_groups(tmp_path, luma_subset_csv):
    with Catalog(tmp_path / "catalog") as catalog:
        catalog.add(luma_subset_csv, crop="none")
        assert catalog.crop_mode == "none" and catalog.has_garment_groups
        item = catalog.get(catalog.item_ids()[0])
        assert all(image.box is None for image in item.images)
        assert item.images[0].metadata["garment"] == category_group(item.metadata["category"])


def with_uncategorised_product(csv_path: Path, out: Path) -> tuple[Path, str]:
    """``csv_path`` with the category of its first product's photos emptied."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    bare = rows[0]["product"]
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "category": "" if row["product"] == bare else row["category"]}
                         for row in rows)
    return out, bare


def test_a_new_catalog_crops_the_garment_its_category_names_and_keeps_the_rest_whole(
        tmp_path, luma_subset_csv, parser):
    source, bare = with_uncategorised_product(luma_subset_csv, tmp_path / "mixed.csv")
    with Catalog(tmp_path / "catalog") as catalog:
        assert catalog.crop_mode == "auto"
        catalog.add(source)
        assert catalog.crop_mode == "auto" and catalog.has_garment_groups
        boxed = 0
        for item_id in catalog.item_ids():
            item = catalog.get(item_id)
            for image in item.images:
                if item_id.startswith(bare):
                    assert image.box is None and "garment" not in image.metadata
                    continue
                photo = Image.open(image.path).convert("RGB")
                group = category_group(item.metadata["category"])
                found = product_box(parser.parse(photo), group, photo.size)
                assert image.box == (found[0] if found else None)
                boxed += image.box is not None
        assert boxed > 0


def test_a_catalog_that_stored_photos_before_its_crop_choice_was_recorded_keeps_whole_photos(
        tmp_path, luma_subset_csv):
    with Catalog(tmp_path / "catalog") as catalog:
        catalog.add(luma_subset_csv, crop="none")
        catalog._store.set_meta({"crop": ""})  # as written before the choice was recorded
        catalog._store.commit()
    with Catalog(tmp_path / "catalog") as catalog:
        assert catalog.crop_mode == "none"


def test_list_filters_match_any_of_their_values(cropped_catalog):
    with Catalog(cropped_catalog) as catalog:
        query = catalog.get(catalog.item_ids()[0]).images[0].path
        groups = {m.metadata["garment"] for m in catalog.search(query, k=50)}
        assert len(groups) >= 2
        wanted = sorted(groups)[:1]
        found = catalog.search(query, k=50, where={"garment": wanted})
        assert found and {m.metadata["garment"] for m in found} == set(wanted)
        assert catalog.search(query, k=5, where={"garment": []}) == []


# -- query side -----------------------------------------------------------------------------
def test_a_street_photo_gives_one_result_list_per_garment_from_compatible_groups(
        cropped_catalog, ccp_photo, parser):
    with Catalog(cropped_catalog) as catalog:
        hits = catalog.search_garments(ccp_photo, k=5)
    found = parser.parse(ccp_photo)
    assert len(hits) == len(found) >= 3
    assert {h.group for h in hits} == {g.group for g in found}
    assert {"lower", "footwear"} <= {h.group for h in hits}
    for hit in hits:
        for match in hit.matches:
            assert match.metadata["garment"] in compatible_groups(hit.group), hit.group
    by_group = {h.group: h for h in hits}
    assert by_group["lower"].matches  # the catalog sells shorts and pants
    assert by_group["footwear"].matches == []  # and no shoes


def test_a_product_photo_of_one_hoodie_gives_one_result_list_per_garment(cropped_catalog,
                                                                          data_dir):
    """The issue's photo: it gave four lists (upper, outer twice for the jacket's halves,
    lower for a strip of trousers at the photo's bottom edge)."""
    with Catalog(cropped_catalog) as catalog:
        hits = catalog.search_garments(data_dir / "luma" / "images" / "mh06-black_main.jpg",
                                       k=3)
    groups = [h.group for h in hits]
    assert len(groups) == len(set(groups)) and 1 <= len(groups) <= 3, groups


def test_any_group_and_one_group_options(cropped_catalog, ccp_photo):
    with Catalog(cropped_catalog) as catalog:
        everything = catalog.search_garments(ccp_photo, k=5, compatible=False)
        only_lower = catalog.search_garments(ccp_photo, k=5, garment="lower")
        with pytest.raises(ValueError, match="unknown garment group"):
            catalog.search_garments(ccp_photo, garment="socks")
    assert all(len(h.matches) == 5 for h in everything)
    assert only_lower and {h.group for h in only_lower} == {"lower"}


def test_a_masked_crop_paints_everything_but_the_garment(ccp_photo, parser):
    image = Image.open(ccp_photo).convert("RGB")
    garment = max(parser.parse(image), key=lambda g: g.area)
    painted = np.asarray(garment.crop(image, (255, 0, 255)))
    x1, y1, x2, y2 = garment.box
    inside = garment.mask[y1:y2, x1:x2]
    magenta = np.all(painted == (255, 0, 255), axis=-1)
    assert magenta[~inside].all() and not magenta[inside].all()
    assert garment.crop(image).size == (x2 - x1, y2 - y1)


def test_vestis_search_prints_each_garment_and_json(cropped_catalog, ccp_photo):
    result = runner.invoke(app, ["search", str(ccp_photo), "-c", str(cropped_catalog), "-k",
                                 "2", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    groups = [g["group"] for g in body["garments"]]
    assert "lower" in groups and len(groups) >= 3
    text = runner.invoke(app, ["search", str(ccp_photo), "-c", str(cropped_catalog), "-k", "2",
                               "--garment", "lower"])
    assert text.exit_code == 0 and text.output.startswith("lower  box ")
    whole = runner.invoke(app, ["search", str(ccp_photo), "-c", str(cropped_catalog), "-k",
                                "2", "--whole", "--json"])
    assert [g["group"] for g in json.loads(whole.output)["garments"]] == ["whole image"]
    bad = runner.invoke(app, ["search", str(ccp_photo), "-c", str(cropped_catalog), "--mask",
                              "blue"])
    assert bad.exit_code == 2 and "mask must be one of" in bad.output


# -- evaluation with crops ------------------------------------------------------------------
def clothing_subset(data_dir: Path, out: Path, per_label: int = 6) -> Path:
    with open(data_dir / "clothing" / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen, counts = [], {}
    for row in rows:
        label = row["label"]
        if label in ("T-Shirt", "Pants", "Shoes") and counts.get(label, 0) < per_label:
            counts[label] = counts.get(label, 0) + 1
            chosen.append({"image": str(data_dir / "clothing" / row["image"]),
                           "label": row["label"]})
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label"])
        writer.writeheader()
        writer.writerows(chosen)
    return out


def test_eval_crops_box_every_image_by_its_category(data_dir, tmp_path, parser):
    dataset = load_dataset(clothing_subset(data_dir, tmp_path / "clothing.csv"))
    assert {s.category for s in dataset.gallery} == {"T-Shirt", "Pants", "Shoes"}
    boxed = with_garment_boxes(dataset, parser=parser)
    for sample in boxed.gallery:
        photo = Image.open(sample.path).convert("RGB")
        found = product_box(parser.parse(photo), category_group(sample.category), photo.size)
        assert sample.box == (found[0] if found else None)
        assert sample.in_context == (sample.box is not None)
    plain = evaluate(dataset, "lite0", progress=False, crop="none")
    cropped = evaluate(dataset, "lite0", progress=False, crop="garment")
    assert plain.metrics["n_queries"] == cropped.metrics["n_queries"]
    assert 0 <= cropped.metrics["R@1"] <= 1
    with pytest.raises(ValueError, match="crop must be one of"):
        evaluate(dataset, "lite0", progress=False, crop="tight")


def test_eval_with_no_flag_scores_the_vectors_a_catalog_indexed_with_no_flag_stores(
        tmp_path, luma_subset_csv):
    """The benchmark is the product: ``vestis eval CSV`` and ``vestis index CSV`` (no crop
    choice) embed every photo alike, cropped where its category names a garment."""
    source, bare = with_uncategorised_product(luma_subset_csv, tmp_path / "mixed.csv")
    dataset = prepare_dataset(source)
    encoder = Encoder.from_name("lite0")
    _, gallery = embed_dataset(encoder, dataset)
    assert {s.box is None for s in dataset.gallery if s.item_id.startswith(bare)} == {True}
    assert any(s.box is not None for s in dataset.gallery)
    with Catalog(tmp_path / "catalog", model="lite0") as catalog:
        catalog.add(source)
        rows = {str(image.path): image for item_id in catalog.item_ids()
                for image in catalog.get(item_id).images}
        for sample, vector in zip(dataset.gallery, gallery, strict=True):
            image = rows[str(sample.path)]
            assert image.box == sample.box
            stored = catalog._store.vectors_by_id([image.image_id])[0]
            np.testing.assert_allclose(stored, vector, atol=1e-5)


def test_ingest_uploads_and_queries_embed_a_garment_by_one_rule(cropped_catalog):
    """A cropped catalog image's stored vector (``vestis index --crop garment``) is what the
    upload path (:func:`vestis.views.product_view`) gives for its photo, with the same box
    and group, and what :func:`vestis.views.context_vectors` gives for that box."""
    from vestis.catalog.ingest import photo_view
    from vestis.views import context_vectors, in_context

    with Catalog(cropped_catalog) as catalog:
        row = next(image for item_id in catalog.item_ids()
                   for image in catalog.get(item_id).images if image.box is not None)
        metadata = catalog.get(row.item_id).metadata
        stored = catalog._store.vectors_by_id([row.image_id])[0]
        vector, box, fields = photo_view(catalog.encoder, catalog.cropper, row.path,
                                         metadata, "garment")
        assert box == row.box and fields["garment"] == row.metadata["garment"]
        np.testing.assert_allclose(vector, stored, atol=1e-5)
        whole, crop = catalog.encoder.embed([row.path, row.path], [None, row.box])
        np.testing.assert_allclose(in_context(whole, crop[None])[0], stored, atol=1e-5)
        both = context_vectors(catalog.encoder, [row.path, row.path], [row.box, None])
        np.testing.assert_allclose(both[0], stored, atol=1e-5)
        np.testing.assert_allclose(both[1], whole, atol=1e-5)
