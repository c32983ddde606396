"""Attribute and category heads: the label space, the metrics, the shipped heads on real
photos, catalog annotation and the commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from vestis.cli import app
from vestis.data.products import product_split, products_of, read_products, read_related
from vestis.evaluation.attributes import average_precision, prior_map, top_k_recall
from vestis.models.attributes import LabelSpace, load_attribute_model


@pytest.fixture(scope="module")
def products(data_dir):
    return read_products(data_dir / "luma" / "products.csv")


def test_products_table_splits_multi_values_and_drops_missing(products):
    hoodie = products["mh06"]
    assert hoodie.values("material") == ("Wool", "Polyester", "Nylon")
    assert hoodie.values("style_bottom") == ()
    assert "Stark Fundamental Hoodie" in hoodie.text("Men/Tops/Hoodies & Sweatshirts")


def test_product_split_matches_the_default_recipe_and_keeps_products_whole(data_dir):
    train, held = product_split(data_dir / "luma" / "catalog.csv")
    assert not products_of(train) & products_of(held)
    assert 0.15 < len(held) / (len(train) + len(held)) < 0.3
    again = product_split(data_dir / "luma" / "catalog.csv")[1]
    assert [s.path for s in again] == [s.path for s in held]


def test_related_links_keep_only_known_products(data_dir, products):
    links = read_related(data_dir / "luma" / "related.csv", ["wh01", "wp06"])
    assert links == [("wh01", "wp06")]


def test_label_space_encodes_known_values_and_ignores_unknown(products):
    labels = LabelSpace.from_products(products, ["pattern", "climate"], min_count=2)
    row = labels.encode({"pattern": ["Solid"], "climate": ["Cool", "never-seen"]})
    assert {labels.labels[i] for i in np.flatnonzero(row)} == {
        ("pattern", "Solid"), ("climate", "Cool")}
    assert "Graphic Print" not in labels.families["pattern"]  # seen once: below min_count


def test_average_precision_and_top_k_recall_by_hand():
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 1])) == \
        pytest.approx((1 + 2 / 3) / 2)
    scores = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.9]])
    truth = np.array([[0, 1, 0], [0, 0, 1]])
    assert top_k_recall(scores, truth, slice(0, 3), 1) == 0.5
    assert top_k_recall(scores, truth, slice(0, 3), 2) == 1.0
    assert prior_map(truth, [0, 1, 2]) == pytest.approx(0.5)  # columns 1 and 2: prevalence 0.5


def test_shipped_heads_beat_the_label_prior_on_held_out_products(data_dir):
    """The acceptance figure, on held-out products neither the backbone nor the heads saw."""
    from vestis.train.heads import evaluate_attribute_csv

    model = load_attribute_model()
    report = evaluate_attribute_csv(model, data_dir / "luma" / "catalog.csv",
                                    data_dir / "luma" / "products.csv",
                                    ["climate", "pattern", "material"], held_out_only=True)
    assert report["products"] >= 10
    assert report["mAP"] > report["prior_mAP"]
    assert report["families"]["climate"]["mAP"] > report["families"]["climate"]["prior_mAP"]


def test_describe_names_a_hoodie_a_top_and_stores_filterable_predictions(
        tmp_path, luma_subset_csv, data_dir):
    from vestis.catalog import Catalog
    from vestis.catalog.annotate import annotate_attributes, join_products

    model = load_attribute_model()
    description = model.describe(data_dir / "luma" / "images" / "mh06-black_main.jpg")
    assert "Tops" in description.category
    assert all(0.5 <= p <= 1 for values in description.attributes.values() for _, p in values)
    with Catalog(tmp_path / "cat", model="lite0") as catalog:
        catalog.add(luma_subset_csv)
        joined = join_products(catalog, read_products(data_dir / "luma" / "products.csv"))
        assert joined == len(catalog)
        assert annotate_attributes(catalog, model) == len(catalog)
        assert annotate_attributes(catalog, model) == 0  # already annotated
        item = catalog.get(catalog.item_ids()[0])
        assert item.metadata["material"] and item.metadata["predicted.category"]
        category = item.metadata["predicted.category"]
        hits = catalog.search(item.images[0].path, k=50,
                              where={"predicted.category": category})
        assert hits and all(h.metadata["predicted.category"] == category for h in hits)


def test_describe_and_eval_attributes_commands(data_dir, tmp_path):
    runner = CliRunner()
    photo = str(data_dir / "luma" / "images" / "mh06-black_main.jpg")
    result = runner.invoke(app, ["describe", photo, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["category"]["name"]
    report = tmp_path / "attributes.json"
    result = runner.invoke(app, ["eval-attributes", str(data_dir / "luma" / "catalog.csv"),
                                 "--products", str(data_dir / "luma" / "products.csv"),
                                 "--held-out", "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert "climate" in result.output and json.loads(report.read_text())["mAP"] > 0
    missing = runner.invoke(app, ["describe", str(tmp_path / "nope.jpg")])
    assert missing.exit_code == 2 and "error:" in missing.output
