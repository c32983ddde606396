"""``vestis adapt``: a shop's own items teach the map; it refuses to ship one that does not
help; the written checkpoint is a model name like any other."""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import write_luma_subset
from vestis.cli import app
from vestis.models import Encoder
from vestis.train.adapt import adapt, choose_shares, fit_map, part_scales


def separable_shop(folder: Path, n_items: int = 10) -> Path:
    """Items a plain model already tells apart: each a distinct colour, two photos each."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in range(n_items):
        colour = rng.integers(0, 256, 3)
        for photo in range(2):
            pixels = np.clip(colour + rng.normal(0, 3, (64, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{item}-{photo}.png")
            rows.append((f"{item}-{photo}.png", f"item{item}"))
    with (folder / "catalog.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("image", "item_id"), *rows])
    return folder / "catalog.csv"


def test_adapt_refuses_when_it_does_not_help_and_keeps_the_base(tmp_path):
    source = separable_shop(tmp_path / "shop")
    out = tmp_path / "shop.pt"
    result = CliRunner().invoke(app, ["adapt", str(source), "--out", str(out), "--model",
                                      "lite0", "--holdout", "0.5"])
    assert result.exit_code == 0, result.output
    assert "did not help" in result.output
    meta = torch.load(out, weights_only=True)["meta"]["adapt"]
    assert meta["kept"] is False and meta["base_metrics"]["R@1"] == 1.0
    photos = sorted(str(path) for path in source.parent.glob("*.png"))[:4]
    base = Encoder.from_name("lite0", backend="torch").embed(photos)
    unchanged = Encoder.from_name(str(out), backend="torch").embed(photos)
    np.testing.assert_allclose(unchanged, base, atol=1e-5)
    assert out.stat().st_size < 100_000  # the base's name and settings, no map


def test_adapt_needs_enough_multi_photo_items_and_known_settings(tmp_path):
    source = separable_shop(tmp_path / "tiny", n_items=5)
    with pytest.raises(ValueError, match="at least 8 items"):
        adapt(source, tmp_path / "x.pt", base="lite0", progress=False)
    with pytest.raises(ValueError, match="unknown adapt setting"):
        adapt(source, tmp_path / "x.pt", base="lite0", progress=False, epochs=3)
    assert not (tmp_path / "x.pt").exists()


def test_the_map_shrinks_what_varies_within_items():
    """Vectors whose items differ along axis 0 and whose views differ along axis 1: the
    whitening keeps axis 0 and shrinks axis 1; shrinkage 1 is the identity."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 5)
    vectors = np.zeros((100, 2))
    vectors[:, 0] = rng.normal(0, 1, 20)[labels] + rng.normal(0, 0.05, 100)
    vectors[:, 1] = rng.normal(0, 1, 100)
    weight = fit_map(torch.from_numpy(vectors), torch.from_numpy(labels), 0.1).numpy()
    assert abs(weight[0, 0]) > 2 * abs(weight[1, 1])
    identity = fit_map(torch.from_numpy(vectors), torch.from_numpy(labels), 1.0).numpy()
    np.testing.assert_allclose(identity, np.eye(2), atol=1e-9)


def test_the_shares_lean_on_the_block_that_tells_the_items_apart():
    """Two blocks, one telling 20 items apart and one noise: whichever comes first, the
    chosen shares give the telling block nearly all the weight."""
    rng = np.random.default_rng(0)
    labels = [str(item) for item in np.repeat(np.arange(20), 3)]
    telling = rng.normal(0, 1, (20, 8))[np.repeat(np.arange(20), 3)] + rng.normal(0, 0.3, (60, 8))
    noise = rng.normal(0, 1, (60, 8))
    unit = [block / np.linalg.norm(block, axis=1, keepdims=True) for block in (telling, noise)]
    for order in ((0, 1), (1, 0)):
        parts = [("first", 8, 0.7), ("second", 8, 0.3)]
        vectors = np.hstack([unit[order[0]] * 0.7 ** 0.5, unit[order[1]] * 0.3 ** 0.5])
        shares = choose_shares(parts, vectors, labels)
        assert abs(sum(shares) - 1) < 1e-9
        assert shares[order.index(0)] >= 0.9
    scaled = vectors * part_scales(parts, (0.2, 0.8))
    np.testing.assert_allclose(np.linalg.norm(scaled[:, :8], axis=1) ** 2, 0.2)


def test_adapting_the_default_to_luma_photos_reweights_its_imagenet_blend(
        luma_rows, data_dir, tmp_path):
    """The default model's trained vector knows Luma's studio shots far better than its
    ImageNet half: adapting to Luma photos must move the share toward the trained vector
    and score better on products the map did not learn from."""
    source = write_luma_subset(luma_rows, data_dir, tmp_path / "shop.csv", n_products=24)
    report = adapt(source, tmp_path / "shop.pt", holdout=0.4, views=1, progress=False)
    assert report.base == "vestis-lite0"
    assert report.kept and report.map == "reweight"
    assert report.shares["imagenet"] < 0.7
    assert report.adapted_metrics["R@1"] > report.base_metrics["R@1"]
    meta = torch.load(tmp_path / "shop.pt", weights_only=True)["meta"]["adapt"]
    assert meta["shares"] == report.shares and meta["map"] == report.map

    # The checkpoint is a model: the base's vectors through the saved map.
    photos = [line.split(",")[0] for line in source.read_text().splitlines()[1:4]]
    base = Encoder.from_name("vestis-lite0", backend="torch").embed(photos)
    adapted = Encoder.from_name(str(tmp_path / "shop.pt"), backend="torch").embed(photos)
    scale = torch.load(tmp_path / "shop.pt", weights_only=True)["state_dict"]["scale"].float()
    expected = torch.nn.functional.normalize(torch.from_numpy(base) * scale, dim=1)
    np.testing.assert_allclose(adapted, expected.numpy(), atol=1e-4)
    assert not np.allclose(adapted, base, atol=1e-3)
    # A re-weighting is stored as its diagonal: kilobytes, not a square matrix of the width.
    assert (tmp_path / "shop.pt").stat().st_size < 100_000


# -- vestis adapt --catalog: adapt on a catalog's images, then re-embed it, crash-safe ------

def shop_catalog(folder: Path, n_items: int = 10, location: str | None = None,
                 store=None) -> Path | str:
    """A lite0 catalog of :func:`separable_shop` (at ``location``, default ``folder``;
    photos beside ``folder``), with an item whose metadata was updated after ingest and an
    upload stored relative to the catalog (as the server stores it). ``store``: as for
    :class:`Catalog`."""
    from vestis.catalog import Catalog
    from vestis.catalog.catalog import content_hash

    source = separable_shop(folder.parent / f"{folder.name}-photos", n_items)
    with Catalog(location or folder, model="lite0", store=store) as catalog:
        catalog.add(source, metadata={"shop": "test"})
        catalog.update("item0", {"price": 10, "shop": None})
        upload = catalog.path / "uploads" / "up.png"
        upload.parent.mkdir(parents=True)
        upload.write_bytes((source.parent / "3-0.png").read_bytes())
        catalog.add_vectors(["upload"], catalog.encoder.embed([upload]),
                            model_id=catalog.model_id, paths=["uploads/up.png"],
                            metadata=[{"colour": "blue"}],
                            hashes=[content_hash(upload.read_bytes())])
    return location or folder


def snapshot(folder: Path | str) -> dict:
    """Everything a catalog holds but its vectors: items, their metadata and images."""
    from vestis.catalog import Catalog

    with Catalog(folder) as catalog:
        return {item_id: (catalog.get(item_id).metadata,
                          [(row.path, row.sha256, row.box, row.metadata)
                           for row in catalog.get(item_id).images])
                for item_id in catalog.item_ids()}


def write_during_the_build(monkeypatch, location) -> Callable:
    """Make re-embedding's build write to the catalog from another handle before it returns;
    the original build function, to put back."""
    from vestis.catalog import Catalog
    from vestis.catalog import reembed as module

    build = module._build

    def write_meanwhile(*args):
        count = build(*args)
        with Catalog(location) as other:
            other.update("item1", {"price": 5})
        return count

    monkeypatch.setattr(module, "_build", write_meanwhile)
    return build


def mapped_checkpoint(path: Path, seed: int = 0) -> Path:
    """lite0 followed by a random rotation: other vectors, same neighbours."""
    from vestis.models import save_checkpoint
    from vestis.models.adapted import AdaptedNet

    model = AdaptedNet("lite0")
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(model.embed_dim, model.embed_dim,
                                              generator=generator))
    with torch.no_grad():
        model.transform.weight.copy_(rotation)
    return save_checkpoint(model, path, include_backbone=False)


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(folder.name + "."))


@pytest.mark.slow
def test_adapt_catalog_reembeds_the_catalog_with_the_kept_map(luma_rows, data_dir, tmp_path):
    from vestis.catalog import Catalog
    from vestis.train.adapt import adapt_catalog
    from vestis.views import context_vectors

    source = write_luma_subset(luma_rows, data_dir, tmp_path / "shop.csv", n_products=24)
    folder = tmp_path / "catalog"
    with Catalog(folder) as catalog:
        catalog.add(source)
        before_id = catalog.model_id
    before = snapshot(folder)
    out = tmp_path / "shop.pt"
    done = adapt_catalog(folder, out, minutes=5, progress=False, holdout=0.4, views=2)
    assert done.adapt.kept and done.adapt.base == "vestis-lite0"
    assert done.reembedded == sum(len(images) for _, images in before.values())
    assert snapshot(folder) == before
    assert siblings(folder) == []
    photo = next(iter(before.values()))[1][0][0]
    with Catalog(folder) as catalog:
        assert catalog.model_name == str(out.resolve()) and catalog.model_id != before_id
        row = catalog.get(next(iter(before))).images[0]
        # the garment box its category named at ingest is kept: embedded in context again
        expected = context_vectors(Encoder.from_name(str(out)), [row.path], [row.box])
        np.testing.assert_allclose(
            catalog._store.vectors_by_id([row.image_id]), expected, atol=1e-4)
        assert catalog.search(photo, k=1)[0].item_id == next(iter(before))
        assert catalog.info()["index_in_sync"]


def test_adapting_a_source_learns_from_the_vectors_its_catalog_stores(
        luma_rows, data_dir, tmp_path):
    """`vestis adapt SOURCE` crops and embeds photos as `vestis index` stores them (here the
    garment each category names, in context), so it checks and learns exactly what
    `vestis adapt --catalog` does on the catalog indexed from that source."""
    from vestis.catalog import Catalog
    from vestis.catalog.reembed import catalog_records

    source = write_luma_subset(luma_rows, data_dir, tmp_path / "shop.csv", n_products=16)
    with Catalog(tmp_path / "catalog") as catalog:
        catalog.add(source)
        assert catalog.crop_mode == "auto"
        records = catalog_records(catalog)  # what adapt --catalog learns from
    assert any(record.in_context for record in records)
    settings = {"holdout": 0.5, "views": 1, "progress": False}
    from_source = adapt(source, tmp_path / "a.pt", **settings)
    from_catalog = adapt(records, tmp_path / "b.pt", crop="none", **settings)
    assert from_source.queries == from_catalog.queries > 0
    for name in ("R@1", "mAP"):
        assert from_source.base_metrics[name] == pytest.approx(
            from_catalog.base_metrics[name], abs=1e-6)
    whole = adapt(source, tmp_path / "c.pt", crop="none", **settings)
    assert whole.base_metrics != from_source.base_metrics


def test_adapt_catalog_that_does_not_help_leaves_the_catalog_untouched(tmp_path):
    from vestis.catalog import Catalog

    folder = shop_catalog(tmp_path / "catalog")
    with Catalog(folder) as catalog:
        model_id, generation = catalog.model_id, catalog.generation
    before = snapshot(folder)
    out = tmp_path / "shop.pt"
    result = CliRunner().invoke(app, ["adapt", "--catalog", str(folder), "--out", str(out),
                                      "--holdout", "0.5", "--minutes", "0"])
    assert result.exit_code == 0, result.output
    assert "did not help" in result.output and "is unchanged" in result.output
    assert torch.load(out, weights_only=True)["meta"]["adapt"]["base"] == "lite0"
    with Catalog(folder) as catalog:
        assert (catalog.model_id, catalog.generation) == (model_id, generation)
    assert snapshot(folder) == before


def test_adapt_takes_a_source_or_a_catalog(tmp_path):
    source = separable_shop(tmp_path / "shop")
    runner = CliRunner()
    both = runner.invoke(app, ["adapt", str(source), "--catalog", str(tmp_path / "c"),
                               "--out", str(tmp_path / "x.pt")])
    neither = runner.invoke(app, ["adapt", "--out", str(tmp_path / "x.pt")])
    assert both.exit_code == neither.exit_code == 2
    assert "exactly one" in both.output
    assert not (tmp_path / "x.pt").exists()
    if importlib.util.find_spec("milvus_lite") is not None:
        missing = runner.invoke(app, ["adapt", "--catalog", f"milvus-lite:{tmp_path}/no.db#s",
                                      "--out", str(tmp_path / "x.pt")])
        assert missing.exit_code != 0 and "no such Milvus catalog" in missing.output
        assert not (tmp_path / "x.pt").exists() and not (tmp_path / "no.db").exists()


def test_a_catalog_whose_model_file_changed_says_so_and_reembed_updates_it(tmp_path):
    """A model name that now loads another file than the catalog was built with (as after an
    upgrade of the default model): a search says so in one line naming ``vestis reembed``,
    and ``vestis reembed`` re-embeds every image, keeping items and metadata."""
    from vestis.catalog import Catalog

    model = mapped_checkpoint(tmp_path / "shop-model.pt", seed=0)
    source = separable_shop(tmp_path / "photos", n_items=6)
    folder = tmp_path / "catalog"
    with Catalog(folder, model=str(model)) as catalog:
        catalog.add(source, metadata={"shop": "test"})
        old_id = catalog.model_id
    before = snapshot(folder)
    mapped_checkpoint(model, seed=1)  # the same name, another file
    photo = str(source.parent / "3-1.png")
    runner = CliRunner()
    refused = runner.invoke(app, ["search", photo, "--catalog", str(folder)])
    assert refused.exit_code != 0 and "was built with" in refused.output
    assert f"vestis reembed --catalog {folder}" in refused.output
    done = runner.invoke(app, ["reembed", "--catalog", str(folder)])  # its own model name
    assert done.exit_code == 0 and "12 images" in done.output, done.output
    assert snapshot(folder) == before and siblings(folder) == []
    with Catalog(folder) as catalog:
        assert catalog.model_id == Encoder.from_name(str(model)).model_id != old_id
        assert catalog.search(photo, k=1)[0].item_id == "item3"


@pytest.mark.slow
def test_reembed_swaps_in_a_complete_copy_and_open_handles_notice(tmp_path):
    """Every item, metadata value and upload is kept; a catalog opened before the swap
    refuses writes (they would reach the new files); a server reopens it."""
    from vestis.catalog import Catalog
    from vestis.catalog.local import CatalogReplacedError
    from vestis.catalog.reembed import reembed
    from vestis.serve.service import CatalogService

    folder = shop_catalog(tmp_path / "catalog")
    before = snapshot(folder)
    model = mapped_checkpoint(tmp_path / "rotated.pt")
    service = CatalogService(folder)
    service.load()
    assert service.ready
    old_model = service.catalog.model_name
    stale = Catalog(folder)
    assert reembed(Catalog(folder), str(model)) == 21
    assert snapshot(folder) == before and siblings(folder) == []
    with pytest.raises(CatalogReplacedError, match="open it again"):
        stale.update("item1", {"price": 3})
    stale.close()
    assert service.catalog.model_name == str(model) != old_model
    hits = service.catalog.search(folder / "uploads" / "up.png", k=2)
    assert {hit.item_id for hit in hits} == {"upload", "item3"}
    service.close()
    with Catalog(folder) as catalog:
        assert catalog.get("upload").images[0].path == "uploads/up.png"
        assert catalog.file_of(catalog.get("upload").images[0]).is_file()


def test_a_failed_reembedding_leaves_the_old_catalog_whole(tmp_path, monkeypatch):
    """A failure at the swap, a photo gone bad, or a write meanwhile: the catalog stays as
    it was (model, generation, contents, searches) and no temporary directory is left."""
    from vestis.catalog import Catalog
    from vestis.catalog import reembed as module
    from vestis.catalog.reembed import CatalogChangedError, reembed

    folder = shop_catalog(tmp_path / "catalog")
    before = snapshot(folder)
    with Catalog(folder) as catalog:
        state = (catalog.model_id, catalog.generation)
    model = str(mapped_checkpoint(tmp_path / "rotated.pt"))

    def unchanged() -> None:
        assert snapshot(folder) == before and siblings(folder) == []
        with Catalog(folder) as catalog:
            assert (catalog.model_id, catalog.generation) == state
            assert catalog.search(tmp_path / "catalog-photos" / "2-1.png", k=1)[0].item_id \
                == "item2"

    def crash(new: Path, path: Path) -> None:
        raise OSError("crashed at the swap")

    with pytest.raises(OSError, match="crashed at the swap"):
        reembed(Catalog(folder), model, swap=crash)
    unchanged()

    build = write_during_the_build(monkeypatch, folder)
    with pytest.raises(CatalogChangedError, match="changed while"):
        reembed(Catalog(folder), model)
    monkeypatch.setattr(module, "_build", build)
    with Catalog(folder) as catalog:
        catalog.update("item1", {"price": None})
        state = (catalog.model_id, catalog.generation)
    before = snapshot(folder)

    photo = tmp_path / "catalog-photos" / "5-0.png"
    good = photo.read_bytes()
    photo.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot be re-embedded"):
        reembed(Catalog(folder), model)
    photo.write_bytes(good)
    unchanged()


def test_the_two_rename_swap_recovers_from_a_crash_between_them(tmp_path, monkeypatch):
    """Without the atomic exchange: two renames; a crash between them leaves no catalog
    directory, and opening it puts the old one back. A killed run's copy is removed."""
    import os

    from vestis.catalog import Catalog
    from vestis.catalog import reembed as module

    folder = shop_catalog(tmp_path / "catalog", n_items=4)
    before = snapshot(folder)
    os.rename(folder, tmp_path / "catalog.old-999999")  # the first rename, then a crash
    assert snapshot(folder) == before and siblings(folder) == []
    os.rename(folder, tmp_path / "catalog.old-999999")  # again: `vestis info` finds it back
    result = CliRunner().invoke(app, ["info", "--catalog", str(folder)])
    assert result.exit_code == 0, result.output
    assert snapshot(folder) == before and siblings(folder) == []

    monkeypatch.setattr(module, "_renameat2", lambda a, b: False)
    model = mapped_checkpoint(tmp_path / "rotated.pt")
    (tmp_path / "catalog.adapting-999999").mkdir()  # left by a killed run: removed
    module.reembed(Catalog(folder), str(model))
    assert snapshot(folder) == before and siblings(folder) == []
    with Catalog(folder) as catalog:
        assert catalog.model_name == str(model)


@pytest.mark.slow
def test_reembedding_a_garment_crop_catalog_equals_indexing_it_anew(luma_subset_csv, tmp_path):
    """Parser boxes are embedded in their photo's context again, as ``add(crop="garment")``
    embeds them: the re-embedded catalog holds the vectors a new index with the model has."""
    from vestis.catalog import Catalog
    from vestis.catalog.reembed import reembed

    model = str(mapped_checkpoint(tmp_path / "rotated.pt"))
    with Catalog(tmp_path / "catalog", model="lite0") as catalog:
        catalog.add(luma_subset_csv, crop="garment")
        assert catalog.has_garment_groups
    reembed(Catalog(tmp_path / "catalog"), model)
    with Catalog(tmp_path / "fresh", model=model) as fresh:
        fresh.add(luma_subset_csv, crop="garment")
    vectors = []
    for folder in ("catalog", "fresh"):
        with Catalog(tmp_path / folder) as catalog:
            assert catalog.crop_mode == "garment" and catalog.has_garment_groups
            rows = sorted((row.item_id, row.sha256, row.box, row.image_id)
                          for item_id in catalog.item_ids()
                          for row in catalog.get(item_id).images)
            assert any(row[2] is not None for row in rows)
            vectors.append((rows, catalog._store.vectors_by_id([row[3] for row in rows])))
    assert [row[:3] for row in vectors[0][0]] == [row[:3] for row in vectors[1][0]]
    np.testing.assert_allclose(vectors[0][1], vectors[1][1], atol=1e-4)


# -- on a Milvus catalog: a new generation of collections, switched in by aliases -----------

def milvus_shop(tmp_path: Path, *, legacy: bool = False, n_items: int = 10) -> str:
    """:func:`shop_catalog` in a Milvus Lite database; ``legacy``: with plain collections
    named after the catalog, as catalogs were made before generations."""
    pytest.importorskip("milvus_lite")
    from vestis.catalog.milvus import MilvusStore

    location = f"milvus-lite:{tmp_path / 'shop.db'}#shop"
    store = (lambda: MilvusStore(location, aliased=False)) if legacy else None
    return shop_catalog(tmp_path / "catalog", n_items, location=location, store=store)


def collections(tmp_path: Path) -> dict[str, str]:
    """Every collection of the database, and what each catalog name reads."""
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp_path / "shop.db"))
    try:
        names = {name: name for name in client.list_collections()}
        for kind in ("images", "items", "meta"):
            if client.has_collection(f"shop_{kind}"):
                names[f"shop_{kind}"] = client.describe_collection(
                    f"shop_{kind}")["collection_name"]
        return names
    finally:
        client.close()


def generation(prefix: str) -> dict[str, str]:
    """The collections of one generation, each catalog name reading its own."""
    return {**{f"{prefix}_{kind}": f"{prefix}_{kind}" for kind in ("images", "items", "meta")},
            **{f"shop_{kind}": f"{prefix}_{kind}" for kind in ("images", "items", "meta")}}


@pytest.mark.slow
def test_a_milvus_catalog_is_reembedded_and_open_handles_notice(tmp_path):
    """Every item, metadata value and upload is kept in a new generation the catalog's names
    now read; a catalog opened before refuses writes and searches (never the new vectors
    with the old model); a server opens the new generation."""
    from vestis.catalog import Catalog
    from vestis.catalog.local import CatalogReplacedError
    from vestis.catalog.reembed import reembed
    from vestis.serve.service import CatalogService

    location = milvus_shop(tmp_path)
    before = snapshot(location)
    assert collections(tmp_path) == generation("shop_g0")
    model = str(mapped_checkpoint(tmp_path / "rotated.pt"))
    service = CatalogService(location)
    service.load()
    assert service.ready
    old_model = service.catalog.model_name
    stale = Catalog(location)
    photo = tmp_path / "catalog-photos" / "3-1.png"
    assert stale.search(photo, k=1)[0].item_id == "item3"

    assert reembed(Catalog(location), model) == 21
    assert snapshot(location) == before
    assert collections(tmp_path) == generation("shop_g1")
    with pytest.raises(CatalogReplacedError, match="open it again"):
        stale.update("item1", {"price": 3})
    with pytest.raises(CatalogReplacedError, match="open it again"):
        stale.search(photo, k=1)
    stale.close()
    assert service.catalog.model_name == model != old_model
    upload = service.catalog.path / "uploads" / "up.png"
    assert {hit.item_id for hit in service.catalog.search(upload, k=2)} == {"upload", "item3"}
    service.close()
    with Catalog(location) as catalog:
        assert catalog.model_name == model
        expected = Encoder.from_name(model).embed([photo])
        row = next(r for r in catalog.get("item3").images if r.path.endswith("3-1.png"))
        np.testing.assert_allclose(catalog._store.vectors_by_id([row.image_id]), expected,
                                   atol=1e-4)
        assert catalog.info()["index_in_sync"]
        catalog.update("item1", {"price": 4})  # the new generation takes writes
    assert reembed(Catalog(location), "lite0") == 21  # and is re-embedded in its turn
    assert collections(tmp_path) == generation("shop_g2")


@pytest.mark.parametrize("legacy", [False, True], ids=["generations", "legacy-collections"])
def test_a_milvus_switch_cut_short_is_finished_when_the_catalog_is_opened(
        tmp_path, monkeypatch, legacy):
    """A crash after the images name moved to the new generation (a legacy catalog: after
    its plain items collection was dropped, before the alias took its name): opening the
    catalog finishes the switch and drops the old generation."""
    from vestis.catalog import Catalog, milvus_switch
    from vestis.catalog.local import CatalogReplacedError
    from vestis.catalog.reembed import reembed

    location = milvus_shop(tmp_path, legacy=legacy, n_items=4)
    old = "shop" if legacy else "shop_g0"
    assert collections(tmp_path)["shop_meta"] == f"{old}_meta"
    before = snapshot(location)
    model = str(mapped_checkpoint(tmp_path / "rotated.pt"))
    point, calls = milvus_switch.point, []

    def crash_at_the_second(client, name, kind, prefix):
        calls.append(kind)
        if len(calls) == 2:
            if legacy:
                client.drop_collection(f"{name}_{kind}")
            raise OSError("crashed between two alias moves")
        point(client, name, kind, prefix)

    catalog = Catalog(location)  # opening it points its names too
    stale = Catalog(location)
    photo = tmp_path / "catalog-photos" / "2-1.png"
    monkeypatch.setattr(milvus_switch, "point", crash_at_the_second)
    with pytest.raises(OSError, match="crashed between"):
        reembed(catalog, model)
    assert calls == ["images", "items"]
    monkeypatch.setattr(milvus_switch, "point", point)
    cut = collections(tmp_path)
    assert cut["shop_images"] == "shop_g1_images" and cut["shop_meta"] == f"{old}_meta"
    assert ("shop_items" in cut) != legacy
    if legacy:  # its images name reads the new vectors: refused, not searched
        with pytest.raises(CatalogReplacedError):
            stale.search(photo, k=1)
    else:  # it reads its own generation, still whole
        assert stale.search(photo, k=1)[0].item_id == "item2"

    assert snapshot(location) == before  # opening it finished the switch
    assert collections(tmp_path) == generation("shop_g1")
    with Catalog(location) as catalog:
        assert catalog.model_name == model
        assert catalog.search(photo, k=1)[0].item_id == "item2"
    with pytest.raises(CatalogReplacedError):
        stale.search(photo, k=1)
    stale.close()


def test_a_failed_milvus_reembedding_leaves_the_catalog_whole(tmp_path, monkeypatch):
    """A failure at the switch, a write meanwhile, or a process killed while it builds: the
    catalog stays as it was; the new collections are dropped (a killed run's by the next
    re-embedding)."""
    from vestis.catalog import Catalog
    from vestis.catalog import reembed as module
    from vestis.catalog.milvus_switch import MilvusBeside
    from vestis.catalog.reembed import CatalogChangedError, reembed

    location = milvus_shop(tmp_path, n_items=4)
    model = str(mapped_checkpoint(tmp_path / "rotated.pt"))

    def state() -> tuple:
        with Catalog(location) as catalog:
            return (catalog.model_id, catalog.generation,
                    catalog.search(tmp_path / "catalog-photos" / "2-1.png", k=1)[0].item_id)

    before, kept = snapshot(location), state()

    def crash(new: str, old: str) -> None:
        raise OSError("crashed at the switch")

    with pytest.raises(OSError, match="crashed at the switch"):
        reembed(Catalog(location), model, swap=crash)
    assert (snapshot(location), state()) == (before, kept)
    assert collections(tmp_path) == generation("shop_g0")

    build = write_during_the_build(monkeypatch, location)
    with pytest.raises(CatalogChangedError, match="changed while"):
        reembed(Catalog(location), model)
    assert collections(tmp_path) == generation("shop_g0")
    with Catalog(location) as catalog:
        assert catalog.model_id == kept[0] and catalog.get("item1").metadata["price"] == 5

    def killed(*args):
        build(*args)
        raise KeyboardInterrupt  # the process dies: nothing of it cleans up
    monkeypatch.setattr(module, "_build", killed)
    monkeypatch.setattr(MilvusBeside, "discard", lambda self: None)
    with pytest.raises(KeyboardInterrupt):
        reembed(Catalog(location), model)
    monkeypatch.undo()
    half_built = sorted(set(collections(tmp_path)) - set(generation("shop_g0")))
    assert [name.rsplit("_", 1)[1] for name in half_built] == ["images", "items", "meta"]
    assert (snapshot(location), state()[0]) == ({**before, "item1": snapshot_item1(before)},
                                                 kept[0])
    assert reembed(Catalog(location), model) == 9
    now = collections(tmp_path)
    assert now == generation(now["shop_meta"][: -len("_meta")])
    assert not set(now) & {*half_built, "shop_g0_meta"}

    # A store that resolved the old generation just before that switch dropped it: it
    # neither makes the old collections again nor moves the catalog's names back.
    from vestis.catalog import milvus_switch
    from vestis.catalog.local import CatalogReplacedError
    from vestis.catalog.milvus import MilvusStore

    resolved = milvus_switch.current_prefix
    stale = iter(["shop_g0"])
    monkeypatch.setattr(milvus_switch, "current_prefix",
                        lambda client, name: next(stale, None) or resolved(client, name))
    with pytest.raises(CatalogReplacedError):
        MilvusStore(location)
    assert collections(tmp_path) == now


def snapshot_item1(before: dict) -> tuple:
    """Item 1 of a :func:`snapshot` after ``update("item1", {"price": 5})``."""
    metadata, images = before["item1"]
    return {**metadata, "price": 5}, images


def test_adapt_catalog_on_milvus_that_does_not_help_leaves_it_untouched(tmp_path):
    from vestis.catalog import Catalog

    location = milvus_shop(tmp_path)
    with Catalog(location) as catalog:
        model_id, generation_ = catalog.model_id, catalog.generation
    before = snapshot(location)
    out = tmp_path / "shop.pt"
    result = CliRunner().invoke(app, ["adapt", "--catalog", location, "--out", str(out),
                                      "--holdout", "0.5", "--minutes", "0"])
    assert result.exit_code == 0, result.output
    assert "did not help" in result.output and "is unchanged" in result.output
    with Catalog(location) as catalog:
        assert (catalog.model_id, catalog.generation) == (model_id, generation_)
    assert snapshot(location) == before
    assert collections(tmp_path) == generation("shop_g0")


@pytest.mark.slow
def test_vestis_adapt_reembeds_a_milvus_catalog_with_the_kept_map(
        luma_rows, data_dir, tmp_path):
    pytest.importorskip("milvus_lite")
    from vestis.catalog import Catalog

    source = write_luma_subset(luma_rows, data_dir, tmp_path / "shop.csv", n_products=24)
    location = f"milvus-lite:{tmp_path / 'shop.db'}#shop"
    with Catalog(location) as catalog:
        catalog.add(source)
    before = snapshot(location)
    out = tmp_path / "shop.pt"
    result = CliRunner().invoke(app, ["adapt", "--catalog", location, "--out", str(out),
                                      "--minutes", "5", "--holdout", "0.4"])
    assert result.exit_code == 0, result.output
    assert f"re-embedded catalog {location}" in result.output
    assert snapshot(location) == before
    assert collections(tmp_path) == generation("shop_g1")
    with Catalog(location) as catalog:
        assert catalog.model_name == str(out.resolve())
