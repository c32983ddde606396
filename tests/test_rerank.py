"""The learned re-ranker (models/matcher.py, train/rerank.py): it learns what the cosine
misses, re-orders a search's top-k as its logits say, and ``--rerank`` works end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vestis.evaluation.datasets import leave_one_out
from vestis.evaluation.run import rerank_metrics
from vestis.models.matcher import (
    Matcher,
    MatchHead,
    load_matcher,
    read_matcher,
    rerank_scores,
    save_matcher,
)
from vestis.records import ImageRecord
from vestis.train.rerank import RECIPE_DEFAULTS, PairData, candidate_lists, fit, list_figures

VESTIS = str(Path(sys.executable).with_name("vestis"))
DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def colour_variants(seed: int, products: int = 40, colours: int = 3, views: int = 3
                    ) -> PairData:
    """Products in several colours (each colour an item with two photos): the shape dims
    are shared by a product's colours and carry most of the norm plus noise, the colour
    lives in 4 weak dims. The cosine confuses colours; a head that weighs the colour dims
    does not."""
    rng = np.random.default_rng(seed)
    rows, items, groups = [], [], []
    for product in range(products):
        shape = rng.normal(size=DIM - 4)
        for colour in range(colours):
            code = rng.choice([-1.0, 1.0], size=4) * 0.35
            for photo in range(2):
                noise = rng.normal(scale=0.45, size=(views, DIM - 4))
                vec = np.concatenate([shape + noise, np.tile(code, (views, 1))
                                      + rng.normal(scale=0.03, size=(views, 4))], axis=1)
                rows.append(unit(vec))
                items.append(f"p{product}-c{colour}")
                groups.append(f"p{product}")
                del photo
    return PairData(torch.tensor(np.stack(rows), dtype=torch.float32), items, groups)


RECIPE = {**RECIPE_DEFAULTS, "hidden": 32, "epochs": 30, "lr": 0.005, "dropout": 0.0}


@pytest.fixture(scope="module")
def trained():
    lists = candidate_lists(colour_variants(0), top_k=10)
    head, _ = fit(lists, RECIPE, RECIPE["epochs"])
    return head


def test_an_untrained_head_ranks_exactly_as_the_cosine():
    data = colour_variants(1, products=5)
    lists = candidate_lists(data, top_k=8)
    head = MatchHead(DIM)
    with torch.no_grad():
        logits = head(lists.queries, lists.candidates)
    cosine = (lists.queries[:, None] * lists.candidates).sum(-1)
    assert torch.equal(logits.argsort(dim=1, descending=True, stable=True),
                       cosine.argsort(dim=1, descending=True, stable=True))


@pytest.mark.train
def test_a_trained_head_separates_the_pairs_the_cosine_confuses(trained):
    check = candidate_lists(colour_variants(7), top_k=10)  # unseen products
    base, learned = list_figures(None, check), list_figures(trained, check)
    assert base["R@1"] < 0.75
    assert learned["R@1"] > base["R@1"] + 0.15
    assert learned["MRR"] > base["MRR"] + 0.1
    # Per pair: a positive's logit beats its list's hardest negative far more often.
    with torch.no_grad():
        logits = trained(check.queries, check.candidates)
    has_both = check.positive.any(1) & (~check.positive).any(1)
    pos = logits.masked_fill(~check.positive, -1e9).max(1).values[has_both]
    neg = logits.masked_fill(check.positive, -1e9).max(1).values[has_both]
    assert float((pos > neg).float().mean()) > 0.8


def reversing_matcher(dim: int = DIM) -> Matcher:
    """A head whose logit is minus the cosine: it reverses any top-k."""
    head = MatchHead(dim)
    with torch.no_grad():
        head.scale.fill_(-5.0)
    return Matcher(head, {"model_id": None}, "reverse")


def test_rerank_scores_reorder_the_top_k_and_keep_the_rest_below_in_order():
    rng = np.random.default_rng(0)
    queries, gallery = unit(rng.normal(size=(4, DIM))), unit(rng.normal(size=(30, DIM)))
    sims = queries @ gallery.T
    scores = rerank_scores(sims, queries, gallery, reversing_matcher(), k=5)
    for row in range(4):
        plain = np.argsort(-sims[row], kind="stable")
        ranked = np.argsort(-scores[row], kind="stable")
        assert list(ranked[:5]) == list(plain[:5][::-1])  # the head's order: reversed
        assert list(ranked[5:]) == list(plain[5:])  # the rest below, as they were


def test_eval_rerank_metrics_follow_the_head():
    rng = np.random.default_rng(3)
    vectors = unit(rng.normal(size=(12, DIM)))
    vectors[1] = unit(vectors[0] + 0.05 * rng.normal(size=DIM))  # item a's two photos
    samples = [ImageRecord(Path(f"{i}.jpg"), "a" if i < 2 else f"x{i}") for i in range(12)]
    dataset = leave_one_out("toy", samples)
    query = vectors[dataset.query_gallery_index]
    plain = rerank_metrics(query, vectors, dataset, Matcher(MatchHead(DIM)), rerank_k=5)
    reversed_ = rerank_metrics(query, vectors, dataset, reversing_matcher(), rerank_k=5)
    assert plain.metrics["R@1"] == 1.0  # the zero head keeps the cosine's order
    assert reversed_.metrics["R@1"] == 0.0 and reversed_.metrics["R@5"] == 1.0


def test_catalog_search_reorders_as_the_head_says(tmp_path):
    from vestis.catalog import Catalog
    from vestis.models import Encoder

    encoder = Encoder.from_name("lite0")
    rng = np.random.default_rng(5)
    gallery = unit(rng.normal(size=(20, encoder.dim))).astype(np.float32)
    ids = [f"item{i}" for i in range(20)]
    catalog = Catalog(tmp_path / "c", encoder=encoder, index="Flat")
    catalog.add_vectors(ids, gallery, model_id=encoder.model_id)
    query = unit(gallery[3] + 0.3 * rng.normal(size=encoder.dim)).astype(np.float32)
    plain = catalog.search(query, k=6)
    matcher = reversing_matcher(encoder.dim)
    reranked = catalog.search(query, k=6, rerank=matcher, rerank_k=6)
    assert [m.item_id for m in reranked] == [m.item_id for m in plain][::-1]
    logits = matcher.scores(query, gallery[[ids.index(m.item_id) for m in reranked]])
    assert [m.score for m in reranked] == pytest.approx(list(logits), abs=1e-5)
    other = Matcher(MatchHead(encoder.dim), {"model_id": "another-model"}, "other")
    with pytest.raises(ValueError, match="trained on"):
        catalog.search(query, k=3, rerank=other)


@pytest.mark.train
def test_a_saved_matcher_is_small_and_loads_by_name_or_file(tmp_path, trained):
    path = save_matcher(trained, tmp_path / "matcher.pt", {"model_id": "m"})
    assert path.stat().st_size < 1_000_000
    again = read_matcher(path)
    assert again.model_id == "m" and load_matcher(str(path)).dim == DIM
    check = candidate_lists(colour_variants(9, products=5), top_k=6)
    with torch.no_grad():
        expected = trained(check.queries, check.candidates)
    assert np.allclose(again.scores(check.queries.numpy(), check.candidates.numpy()),
                       expected.numpy(), atol=0.05)  # fp16 weights
    shipped = load_matcher()
    assert shipped.name == "rerank-lite0" and shipped.meta["model"] == "vestis-lite0"
    with pytest.raises(ValueError, match="unknown matcher"):
        load_matcher("no-such-matcher")


def generated_catalog_csv(folder: Path) -> Path:
    """Six items, two photos each: a shape in a colour on a plain background."""
    folder.mkdir()
    rows = []
    colours = [(200, 30, 30), (30, 160, 40), (40, 60, 200), (220, 200, 40), (20, 20, 20),
               (200, 100, 180)]
    for item, colour in enumerate(colours):
        for photo in range(2):
            image = Image.new("RGB", (160, 200), (235, 235, 235))
            draw = ImageDraw.Draw(image)
            offset = 8 * photo
            if item % 2:
                draw.ellipse((30 + offset, 40, 130 + offset, 170), fill=colour)
            else:
                draw.rectangle((30, 30 + offset, 130, 170 + offset), fill=colour)
            path = folder / f"item{item}-{photo}.jpg"
            image.save(path)
            rows.append({"image": str(path), "item_id": f"item{item}"})
    out = folder / "catalog.csv"
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "item_id"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def vestis(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([VESTIS, *map(str, args)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, Path]:
    """A catalog (default model) of the generated photos, and their CSV."""
    folder = tmp_path_factory.mktemp("rerank")
    catalog_csv = generated_catalog_csv(folder / "photos")
    vestis("index", catalog_csv, "--catalog", folder / "catalog")
    return catalog_csv, folder / "catalog"


@pytest.mark.slow
def test_search_and_eval_rerank_end_to_end(generated, tmp_path):
    catalog_csv, catalog = generated
    query = catalog_csv.parent / "item2-1.jpg"
    plain = json.loads(vestis("search", query, "-c", catalog, "--whole", "-k", "4",
                              "--json").stdout)["garments"][0]["results"]
    found = json.loads(vestis("search", query, "-c", catalog, "--whole", "-k", "4",
                              "--json", "--rerank", "--rerank-k", "8").stdout)
    results = found["garments"][0]["results"]
    assert len(results) == 4
    # Scores are the shipped matcher's logits on the stored vectors, best first: not the
    # plain search's cosines (a no-op re-rank would leave those).
    from vestis.catalog import Catalog

    with Catalog(catalog) as cat:
        vector = cat.embed(query)
        stored = cat._store.vectors_by_id([r["image_id"] for r in results])
    logits = load_matcher().scores(vector, stored)
    assert [r["score"] for r in results] == pytest.approx(list(logits), abs=1e-4)
    assert logits.tolist() == sorted(logits.tolist(), reverse=True)
    assert [r["score"] for r in results] != pytest.approx([r["score"] for r in plain])
    report = vestis("eval", catalog_csv, "--rerank", "--json", tmp_path / "rerank.json")
    assert "vestis-lite0 --rerank" in report.stdout and "R@1" in report.stdout
    payload = json.loads((tmp_path / "rerank.json").read_text())
    assert payload["n_queries"] == 12


@pytest.mark.slow
def test_http_search_takes_a_rerank_field(generated):
    from tests.test_serve import serving
    from vestis.catalog import Catalog
    from vestis.serve import create_app

    catalog_csv, catalog = generated
    photo = (catalog_csv.parent / "item3-0.jpg").read_bytes()
    with serving(create_app(catalog)) as client:
        def search(**form):
            response = client.post("/search", files={"image": ("q.jpg", photo)},
                                   data={"whole": "true", "k": "3", **form})
            assert response.status_code == 200, response.text
            return response.json()["garments"][0]["matches"]

        plain, reranked = search(), search(rerank="true")
        refused = client.post("/search", files={"image": ("q.jpg", photo)},
                              data={"rerank": "true", "text": "in red"})
    assert refused.status_code == 422
    with Catalog(catalog) as cat:
        expected = cat.search(photo, k=3, rerank=True)
    assert [r["item_id"] for r in reranked] == [m.item_id for m in expected]
    assert [r["score"] for r in reranked] == pytest.approx([m.score for m in expected],
                                                           abs=1e-4)
    assert [r["score"] for r in plain] != pytest.approx([r["score"] for r in reranked])


@pytest.mark.train
def test_the_rerank_recipe_is_typed_and_trains_into_its_run_folder(tmp_path, monkeypatch):
    import yaml

    from vestis.train import rerank, tasks

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "rerank.yaml")
                            .read_text())
    assert tasks.recipe_task(recipe) == "rerank"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**recipe, "hiden": 8}))
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\): hiden"):
        tasks.train_recipe(bad, tmp_path / "run")
    with pytest.raises(ValueError, match="does not apply"):
        tasks.train_recipe(bad, tmp_path / "run", minutes=1.0)
    # The training path on generated vectors (no photos): it chooses its epochs on held-back
    # products, refits and writes a small matcher bound to its model.
    monkeypatch.setattr(rerank, "pair_data", lambda recipe, progress=True: colour_variants(2))
    monkeypatch.setattr(rerank, "_model_id", lambda name: "generated")
    good = tmp_path / "rerank.yaml"
    good.write_text(yaml.safe_dump({**recipe, "epochs": 12, "hidden": 32, "lr": 0.005,
                                    "synthetic_views": 0, "base_recipe": str(bad)}))
    summary = tasks.train_recipe(good, tmp_path / "run")
    assert summary.checkpoint == tmp_path / "run" / "matcher.pt"
    matcher = load_matcher(str(summary.checkpoint))
    assert matcher.model_id == "generated" and summary.checkpoint.stat().st_size < 100_000
    check = matcher.meta["check"]
    assert check["rerank"]["MRR"] > check["base"]["MRR"]
