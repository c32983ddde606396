"""Comp-Net: conditional normalisation, cost-sensitive loss, training on the shop's links, and
`vestis complete` on a real catalog."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vestis.cli import app
from vestis.evaluation.outfits import outfit_report, related_map
from vestis.losses.compnet import CostSensitiveOutfitLoss, SemanticLabelLoss
from vestis.models.attributes import LabelSpace
from vestis.models.compnet import (
    CompNet,
    ConditionalNormalization,
    cooccurrence,
    family_softmax,
    load_outfit_model,
)
from vestis.taxonomy import category_leaf, leaf_key

LABELS = LabelSpace({"style": ["hoodie", "tank"], "climate": ["cool", "hot", "mild"]})
# hoodies are cool, tanks hot
ROWS = np.array([[1, 0, 1, 0, 0], [1, 0, 1, 0, 1], [0, 1, 0, 1, 0], [0, 1, 0, 1, 0]], float)


def test_cooccurrence_is_conditional_probability_with_zero_diagonal():
    table = cooccurrence(ROWS)
    assert table[2, 0] == pytest.approx(1.0)  # P(cool | hoodie)
    assert table[4, 0] == pytest.approx(0.5)  # P(mild | hoodie)
    assert table[0, 4] == pytest.approx(1.0)  # P(hoodie | mild)
    assert np.all(np.diag(table) == 0)


def test_conditional_normalisation_moves_climate_toward_what_the_style_implies():
    slices = list(LABELS.slices().values())
    norm = ConditionalNormalization(cooccurrence(ROWS), slices)
    logits = torch.tensor([[4.0, -4.0, 0.0, 0.0, 0.0]])  # sure it is a hoodie, no climate clue
    plain = family_softmax(logits, slices)
    with torch.no_grad():
        _, conditioned = norm(logits)
    assert plain[0, 2] == pytest.approx(1 / 3, abs=1e-5)
    assert conditioned[0, 2] > 0.6 and conditioned[0, 3] < 0.05  # cool up, hot down
    # each family is still a distribution, and a family never conditions itself
    assert float(conditioned[0, :2].sum()) == pytest.approx(1.0)
    assert float(conditioned[0, 2:].sum()) == pytest.approx(1.0)
    assert norm.cooccur[0, 1] == 0 and norm.cooccur[2, 4] == 0


def test_cost_sensitive_loss_weights_wrong_matches_and_reduces_to_infonce():
    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    positives = torch.zeros(4, 4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True
    negatives = ~positives & ~torch.eye(4, dtype=torch.bool)
    loss = CostSensitiveOutfitLoss(temperature=0.5)
    plain = loss(vectors, positives, negatives, torch.ones(4, 4))
    logits = vectors @ vectors.T / 0.5
    expected = torch.stack([
        -torch.log_softmax(torch.stack([logits[0, 1], logits[0, 2], logits[0, 3]]), 0)[0],
        -torch.log_softmax(torch.stack([logits[1, 0], logits[1, 2], logits[1, 3]]), 0)[0]]).mean()
    assert plain == pytest.approx(float(expected), rel=1e-5)
    costly = torch.ones(4, 4)
    costly[:, 2] = 3.0
    assert loss(vectors, positives, negatives, costly) > plain


def test_semantic_label_loss_skips_families_without_values():
    loss = SemanticLabelLoss(list(LABELS.slices().values()))
    logits = torch.zeros(1, 5, requires_grad=True)
    only_style = torch.tensor([[1.0, 0, 0, 0, 0]])
    value = loss(logits, only_style)
    assert value.item() == pytest.approx(np.log(2))  # climate has no value: not counted
    value.backward()
    assert logits.grad[0, 2:].abs().sum() == 0


def test_compnet_uses_known_labels_only_where_given():
    torch.manual_seed(0)
    net = CompNet(6, LABELS, cooccurrence(ROWS), embed_dim=4, hidden_dim=8).eval()
    features = torch.randn(2, 6)
    predicted, _ = net(features)
    known = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    given, _ = net(features, known)
    assert not torch.allclose(given[0], predicted[0])
    assert torch.allclose(given[1], predicted[1])  # no labels: predicted ones are used
    assert torch.allclose(given.norm(dim=1), torch.ones(2))


def test_outfit_report_ranks_products_and_leaves_out_the_same_kind():
    related = related_map([("hoodie", "pants")])
    scores = np.array([[0.9, 0.8, 0.1]])
    report = outfit_report(scores, ["hoodie"], ["Men/Tops/Hoodies"],
                           ["hoodie2", "pants", "tee"],
                           ["Women/Tops/Hoodies", "Men/Bottoms/Pants", "Men/Tops/Tees"],
                           related, ks=(1,))
    assert report["R@1"] == 1.0 and report["mAP"] == 1.0  # the other hoodie is left out
    assert leaf_key("Men/Tops/Hoodies ") == "hoodies"
    assert category_leaf("Men/Tops/Hoodies ") == "Hoodies"
    assert leaf_key("Men/Tops/") == "tops" and leaf_key(None) is None and leaf_key("/") is None


@pytest.mark.train
@pytest.mark.usefixtures("data_dir")  # the recipe reads ../shared/data/luma
def test_training_learns_the_shop_links_and_beats_attribute_similarity(tmp_path):
    """A short run of the recipe: it learns its training links, and the shipped head's
    held-out figures favour Comp-Net over the attribute-similarity baseline."""
    from vestis.train.heads import train_heads

    result = train_heads("configs/compnet.yaml", tmp_path, {"epochs": 40})
    assert result.path.is_file()
    metrics = result.metrics
    assert metrics["compnet_predicted"]["queries"] > 20
    shipped = load_outfit_model().meta["metrics"]
    assert shipped["compnet_predicted"]["R@10"] >= shipped["attribute_predicted"]["R@10"]


@pytest.fixture(scope="module")
def mixed_csv(tmp_path_factory, luma_rows, data_dir):
    """Every image of the first product of each category: a small shop with all kinds."""
    first: dict[str, str] = {}
    for row in luma_rows:
        first.setdefault(row["category"], row["product"])
    out = tmp_path_factory.mktemp("mixed") / "catalog.csv"
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(luma_rows[0]))
        writer.writeheader()
        for row in luma_rows:
            if row["product"] in first.values():
                writer.writerow({**row, "image": str(data_dir / "luma" / row["image"])})
    return out


def test_complete_command_suggests_other_kinds_of_garment(tmp_path, mixed_csv, data_dir):
    runner = CliRunner()
    catalog = tmp_path / "cat"
    assert runner.invoke(app, ["index", str(mixed_csv), "--catalog", str(catalog),
                               "--model", "lite0"]).exit_code == 0
    photo = str(data_dir / "luma" / "images" / "mh06-black_main.jpg")
    result = runner.invoke(app, ["complete", photo, "--catalog", str(catalog), "--json", "-k",
                                 "3"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    leaves = {leaf_key(m["metadata"]["category"]) for m in payload["results"]}
    assert payload["results"] and leaf_key(payload["category"]) not in leaves
    again = runner.invoke(app, ["complete", photo, "--catalog", str(catalog), "--json",
                                "--same-category", "-k", "50"])
    assert again.exit_code == 0
    everything = json.loads(again.output[again.output.index("{"):])["results"]
    assert len(everything) > len(payload["results"])
    assert (catalog / "outfit-features-lite0.npz").is_file()  # cached for the next query


def test_eval_outfits_command_reports_comp_net_beside_attribute_similarity(data_dir, tmp_path):
    report = tmp_path / "outfits.json"
    result = CliRunner().invoke(app, [
        "eval-outfits", str(data_dir / "luma" / "catalog.csv"),
        "--related", str(data_dir / "luma" / "related.csv"), "--held-out",
        "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert "Comp-Net" in result.output and "attribute similarity" in result.output
    payload = json.loads(report.read_text())
    assert payload["compnet_predicted"]["queries"] == payload["attribute_model_predicted"][
        "queries"] > 20
    unrelated = tmp_path / "related.csv"
    unrelated.write_text("product,related_product\nnope,nada\n")
    refused = CliRunner().invoke(app, ["eval-outfits", str(data_dir / "luma" / "catalog.csv"),
                                       "--related", str(unrelated)])
    assert refused.exit_code == 2 and "no links" in refused.output
