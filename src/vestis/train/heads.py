"""Train the small heads that read frozen ``lite0`` features: attributes and Comp-Net.

``vestis train configs/attributes.yaml`` and ``vestis train configs/compnet.yaml`` land here
(their ``task`` key). Both read a Luma-layout shop: ``catalog.csv`` (images, ``product``,
``category``), ``products.csv`` (attributes) and, for outfits, ``related.csv``. Products are
split exactly as the default model's recipe split them (by product, ``val_fraction``, seed),
so the held-out products are unseen by the backbone's fine-tuning, by these heads and by
the links they learn from. Features are computed once and cached.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vestis.data.datasets import read_luma, split_by_group
from vestis.data.products import Product, read_products, read_related
from vestis.evaluation.attributes import attribute_report
from vestis.evaluation.outfits import outfit_report, related_map
from vestis.losses.compnet import CostSensitiveOutfitLoss, SemanticLabelLoss
from vestis.models.attributes import FEATURE_MODEL, AttributeHead, AttributeModel, LabelSpace
from vestis.models.compnet import CompNet, OutfitModel, cooccurrence, known_distribution
from vestis.recipe_files import deep_merge, read_recipe, refuse_unknown_keys, require_paths
from vestis.records import ImageRecord
from vestis.taxonomy import leaf_key

#: Every key a head recipe may set (anything else is refused, naming it). The data files
#: have no default: the recipe names them (configs/attributes.yaml, configs/compnet.yaml).
HEAD_DEFAULTS: dict[str, Any] = {
    "task": "attributes",  # or "outfits"
    "seed": 0,
    "data": {
        "catalog": None,
        "products": None,
        "related": None,  # outfits only
        "val_fraction": 0.2,
        "split_seed": 0,  # the default model's split: keep it, or held-out products leak
        "cache_dir": "runs/feature-cache",
    },
    "features": FEATURE_MODEL,
    "attributes": {
        "columns": ["material", "pattern", "climate", "style_general", "style_bottom"],
        "eval_columns": ["climate", "pattern", "material"],
        "min_count": 2,
        "dropout": 0.3,
        "category_weight": 1.0,
    },
    "outfits": {
        "columns": ["climate", "style_general", "style_bottom"],
        "embed_dim": 64,
        "hidden_dim": 128,
        "conditional": True,
        "cost_beta": 2.0,  # extra cost of a candidate whose category pair never forms an outfit
        "temperature": 0.1,
        "label_weight": 1.0,
        "known_label_rate": 0.5,  # share of training rows composed with their known labels
        # The semantic labels' own share of the compatibility vector (0: composed only).
        "semantic_weight": 2.0,
        "exclude_category": True,
        # Pairs of the same kind of garment (category leaf) as negatives too. Completion
        # never suggests them, so by default they are left out of the loss as well.
        "same_kind_negatives": False,
    },
    "optimizer": {"lr": 1e-3, "weight_decay": 1e-4},
    "epochs": 300,
}
TASKS = ("attributes", "outfits")


def load_head_config(source: str | Path | dict, overrides: dict | None = None) -> dict:
    """The recipe and ``overrides`` over :data:`HEAD_DEFAULTS`; an unknown key, an unknown
    task or a missing data file is refused before any work starts."""
    recipe = read_recipe(source) if not isinstance(source, dict) else dict(source)
    recipe = deep_merge(recipe, overrides or {})
    refuse_unknown_keys(recipe, HEAD_DEFAULTS)
    config = deep_merge(HEAD_DEFAULTS, recipe)
    if config["task"] not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {config['task']!r}")
    needed = ("catalog", "products", "related") if config["task"] == "outfits" else (
        "catalog", "products")
    require_paths(config["data"], needed, "data")
    if config["epochs"] < 1:
        raise ValueError("epochs must be at least 1")
    return config


@dataclass
class ShopData:
    """The shop's images with their product rows, split into train and held-out."""

    samples: list[ImageRecord]
    products: dict[str, Product]
    held_out: np.ndarray  # bool per sample
    links: list[tuple[str, str]] = field(default_factory=list)

    def product(self, i: int) -> str:
        return self.samples[i].group or self.samples[i].item_id

    @property
    def train_products(self) -> set[str]:
        return {self.product(i) for i in np.flatnonzero(~self.held_out)}

    @property
    def held_out_products(self) -> set[str]:
        return {self.product(i) for i in np.flatnonzero(self.held_out)}


def load_shop(data: dict, with_links: bool = False) -> ShopData:
    samples = read_luma(data["catalog"])
    products = read_products(data["products"])
    unknown = sorted({s.group for s in samples} - set(products))
    if unknown:
        raise ValueError(f"{data['products']}: no row for product(s) {', '.join(unknown[:5])}")
    _, val = split_by_group(samples, lambda s: s.group or s.item_id, data["val_fraction"],
                            data.get("split_seed", 0))
    held = {s.path for s in val}
    links = read_related(data["related"], products) if with_links else []
    return ShopData(samples, products, np.array([s.path in held for s in samples]), links)


def cached_features(paths: list[Path], model: str, cache_dir: str | Path) -> np.ndarray:
    """``model``'s vectors of ``paths``, computed once per (model, paths, file sizes)."""
    from vestis.models.encoder import Encoder

    key = hashlib.sha256(json.dumps(
        [model, [(str(p), p.stat().st_size) for p in paths]]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"heads-{model}-{key}.npy"
    if cache.is_file():
        return np.load(cache)
    features = Encoder.from_name(model).embed(list(paths), progress=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, features)
    return features


@dataclass
class HeadResult:
    path: Path
    metrics: dict
    seconds: float


def train_heads(recipe: str | Path | dict, out: str | Path,
                overrides: dict | None = None) -> HeadResult:
    config = load_head_config(recipe, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    started = time.perf_counter()
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"])
    if config["task"] == "attributes":
        model, metrics = fit_attributes(config)
    else:
        model, metrics = fit_outfits(config)
    path = model.save(out / "best.pt")
    seconds = time.perf_counter() - started
    (out / "metrics.json").write_text(json.dumps({**metrics, "seconds": seconds}, indent=2))
    return HeadResult(path, metrics, seconds)


def _shop_features(config: dict, with_links: bool = False) -> tuple[ShopData, np.ndarray]:
    shop = load_shop(config["data"], with_links)
    features = cached_features([s.path for s in shop.samples], config["features"],
                               config["data"]["cache_dir"])
    return shop, features


# -- attributes ---------------------------------------------------------------------------
def fit_attributes(config: dict) -> tuple[AttributeModel, dict]:
    shop, features = _shop_features(config)
    settings = config["attributes"]
    train_rows = np.flatnonzero(~shop.held_out)
    train_products = {p: shop.products[p] for p in shop.train_products}
    labels = LabelSpace.from_products(train_products, settings["columns"], settings["min_count"])
    targets = _targets(shop, labels)
    categories = sorted({shop.samples[i].category for i in train_rows if shop.samples[i].category})
    head = AttributeHead(features.shape[1], len(labels), len(categories), settings["dropout"])
    x = torch.as_tensor(features, dtype=torch.float32)
    head.set_statistics(x[train_rows])
    category_index = {c: i for i, c in enumerate(categories)}
    y_cat = torch.tensor([category_index.get(shop.samples[i].category, -100) for i in train_rows])
    y_attr = torch.as_tensor(targets[train_rows])
    optimizer = torch.optim.Adam(head.parameters(), lr=config["optimizer"]["lr"] * 10,
                                 weight_decay=config["optimizer"]["weight_decay"])
    for _ in range(config["epochs"]):
        head.train()
        attr_logits, cat_logits = head(x[train_rows])
        loss = F.binary_cross_entropy_with_logits(attr_logits, y_attr)
        if cat_logits is not None:
            loss = loss + settings["category_weight"] * F.cross_entropy(cat_logits, y_cat)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model = AttributeModel(head, labels, categories, config["features"],
                           prior=targets[train_rows].mean(0))
    held = np.flatnonzero(shop.held_out)
    metrics = evaluate_attributes(model, features[held], targets[held],
                                  [shop.samples[i].category for i in held],
                                  settings["eval_columns"])
    model.meta = {"metrics": metrics, "recipe": config}
    return model, metrics


def _targets(shop: ShopData, labels: LabelSpace) -> np.ndarray:
    return np.stack([labels.encode(shop.products[shop.product(i)].attributes)
                     for i in range(len(shop.samples))])


def evaluate_attributes(model: AttributeModel, features: np.ndarray, targets: np.ndarray,
                        categories: list[str | None], columns: list[str]) -> dict:
    """Per-family mAP and top-k recall of the given images against the label-frequency
    prior of the model's training images, over ``columns``; category accuracy."""
    attribute_p, category_p = model.probabilities(features)
    slices = {c: s for c, s in model.labels.slices().items() if c in columns}
    missing = sorted(set(columns) - set(slices))
    if missing:
        raise ValueError(f"the attribute model has no family {', '.join(missing)}; it knows "
                         f"{', '.join(model.labels.families)}")
    report = attribute_report(attribute_p, targets, slices, prior=model.prior)
    report["all_families_mAP"] = attribute_report(
        attribute_p, targets, model.labels.slices(), prior=model.prior)["mAP"]
    if category_p is not None:
        predicted = [model.categories[j] for j in category_p.argmax(1)]
        report["category_accuracy"] = float(np.mean([a == b for a, b in
                                                     zip(predicted, categories, strict=True)]))
    return report


def evaluate_attribute_csv(model: AttributeModel, catalog: str | Path, products: str | Path,
                           columns: list[str], held_out_only: bool = False,
                           val_fraction: float = 0.2, seed: int = 0,
                           progress: bool = False) -> dict:
    """``vestis eval-attributes``: the images of a Luma-layout ``catalog`` whose product is in
    ``products``; with ``held_out_only``, only the products the recipes hold out."""
    shop = load_shop({"catalog": catalog, "products": products, "related": None,
                      "val_fraction": val_fraction, "split_seed": seed})
    rows = np.flatnonzero(shop.held_out) if held_out_only else np.arange(len(shop.samples))
    features = model.features([shop.samples[i].path for i in rows], progress=progress)
    targets = _targets(shop, model.labels)[rows]
    report = evaluate_attributes(model, features, targets,
                                 [shop.samples[i].category for i in rows], columns)
    report["products"] = len({shop.product(i) for i in rows})
    return report


# -- outfits (Comp-Net) -------------------------------------------------------------------
def fit_outfits(config: dict) -> tuple[OutfitModel, dict]:
    shop, features = _shop_features(config, with_links=True)
    settings = config["outfits"]
    train_products = sorted(shop.train_products)
    labels = LabelSpace.from_products({p: shop.products[p] for p in train_products},
                                      settings["columns"])
    model = _fit_compnet(config, shop, features, labels, train_products, outfit_weight=1.0)
    # The baseline's labels come from the same label head trained on the labels alone, so
    # that the outfit links never shape them.
    label_only = _fit_compnet(config, shop, features, labels, train_products, outfit_weight=0.0)
    metrics = evaluate_outfits(model, features, shop, settings["exclude_category"],
                               label_model=label_only, attribute_model=_shipped_attributes())
    model.meta = {"metrics": metrics, "recipe": config}
    return model, metrics


def _fit_compnet(config: dict, shop: ShopData, features: np.ndarray, labels: LabelSpace,
                 train_products: list[str], outfit_weight: float) -> OutfitModel:
    settings = config["outfits"]
    torch.manual_seed(config["seed"])
    known = _targets(shop, labels)
    rows_of = {p: [] for p in train_products}
    for i in np.flatnonzero(~shop.held_out):
        rows_of[shop.product(i)].append(i)
    product_rows = np.stack([labels.encode(shop.products[p].attributes) for p in train_products])
    net = CompNet(features.shape[1], labels, cooccurrence(product_rows),
                  settings["embed_dim"], settings["hidden_dim"],
                  conditional=settings["conditional"],
                  semantic_weight=settings["semantic_weight"])
    x = torch.as_tensor(features, dtype=torch.float32)
    net.set_statistics(x[np.flatnonzero(~shop.held_out)])
    positives, negatives, cost = _pair_tables(train_products, shop.links,
                                              _product_categories(shop), settings["cost_beta"],
                                              settings["same_kind_negatives"])
    outfit_loss = CostSensitiveOutfitLoss(settings["temperature"])
    label_loss = SemanticLabelLoss(net.slices)
    optimizer = torch.optim.Adam(net.parameters(), lr=config["optimizer"]["lr"],
                                 weight_decay=config["optimizer"]["weight_decay"])
    generator = np.random.default_rng(config["seed"])
    for _ in range(config["epochs"]):
        net.train()
        pick = np.array([generator.choice(rows_of[p]) for p in train_products])
        given = torch.as_tensor(known[pick])
        use_known = torch.as_tensor(generator.random(len(pick)) < settings["known_label_rate"])
        vectors, logits = net(x[pick], given, use_known & (given.sum(1) > 0))
        loss = settings["label_weight"] * label_loss(logits, given)
        if outfit_weight:
            loss = loss + outfit_weight * outfit_loss(vectors, positives, negatives, cost)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    kept = ("embed_dim", "hidden_dim", "conditional", "cost_beta", "semantic_weight")
    return OutfitModel(net, labels, {k: settings[k] for k in kept}, config["features"])


def _shipped_attributes() -> AttributeModel | None:
    from vestis.models.attributes import load_attribute_model

    try:
        return load_attribute_model()
    except ValueError:
        return None


def _product_categories(shop: ShopData) -> dict[str, str | None]:
    return {shop.product(i): shop.samples[i].category for i in range(len(shop.samples))}


def _pair_tables(products: list[str], links, category: dict, beta: float,
                 same_kind: bool = True):
    """(positives, negatives, cost) over ``products``: linked pairs; every other pair of two
    products; cost 1 + beta where the two categories never form a training outfit (two
    hoodies, or a hoodie and a jacket: pushed apart, so that the space does not simply
    cluster look-alikes)."""
    index = {p: i for i, p in enumerate(products)}
    n = len(products)
    positives = torch.zeros(n, n, dtype=torch.bool)
    outfit_pairs = set()
    for a, b in links:
        if a in index and b in index:
            positives[index[a], index[b]] = positives[index[b], index[a]] = True
            outfit_pairs |= {(category[a], category[b]), (category[b], category[a])}
    cats = [category[p] for p in products]
    negatives = ~positives & ~torch.eye(n, dtype=torch.bool)
    if not same_kind:
        leaves = [leaf_key(c) for c in cats]
        negatives &= ~torch.tensor([[a == b for b in leaves] for a in leaves])
    cost = torch.tensor([[1.0 + beta * ((ci, cj) not in outfit_pairs) for cj in cats]
                         for ci in cats])
    return positives, negatives, cost


def evaluate_outfits(model: OutfitModel, features: np.ndarray, shop: ShopData,
                     exclude_category: bool = True,
                     label_model: OutfitModel | None = None,
                     attribute_model: AttributeModel | None = None) -> dict:
    """Held-out product photos against the whole shop, with the related products as truth
    (the links touching held-out products were never trained on). Three rankings: Comp-Net;
    the attribute-similarity baseline (cosine of the same label distributions); plain visual
    similarity of the features. Gallery items use their known labels ("known") or, as a
    photo-only catalog would, predicted ones ("predicted"). The baselines' predicted labels
    come from ``label_model``, a label head trained on the labels alone (``attribute_*``
    rows), and from ``attribute_model``, the attribute heads (``attribute_model_*`` rows)."""
    queries = np.flatnonzero(shop.held_out)
    products = [shop.product(i) for i in range(len(shop.samples))]
    categories = [s.category for s in shop.samples]
    related = related_map(shop.links)
    known_labels = [shop.products[p].attributes for p in products]

    def report(scores):
        return outfit_report(scores[queries], [products[i] for i in queries],
                             [categories[i] for i in queries], products, categories, related,
                             exclude_category=exclude_category)

    predicted = model.embed_features(features)
    with_known = model.embed_features(features, known_labels)
    with_known[queries] = predicted[queries]  # a query photo has no labels
    given = known_distribution(torch.as_tensor(np.stack([
        model.labels.encode(v) for v in known_labels])), model.net.slices).numpy()
    has = given.sum(1) > 0

    def with_given(label_p: np.ndarray) -> np.ndarray:
        label_known = label_p.copy()
        label_known[has] = given[has]
        label_known[queries] = label_p[queries]
        return label_known

    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    out = {
        "compnet_predicted": report(predicted @ predicted.T),
        "compnet_known": report(with_known @ with_known.T),
        "visual": report(unit @ unit.T),
        "held_out_products": len(shop.held_out_products),
    }
    if label_model is not None:
        label_p = _label_distributions(label_model, features)
        out["attribute_predicted"] = report(_cosine(label_p))
        out["attribute_known"] = report(_cosine(with_given(label_p)))
    if attribute_model is not None:
        heads_p = attribute_distributions(attribute_model, features, model.labels)
        out["attribute_model_predicted"] = report(_cosine(heads_p))
        out["attribute_model_known"] = report(_cosine(with_given(heads_p)))
    return out


def attribute_distributions(attribute_model: AttributeModel, features: np.ndarray,
                            labels: LabelSpace) -> np.ndarray:
    """The attribute heads' probabilities of ``labels``' values, as per-family distributions
    (values the heads do not know get 0)."""
    probabilities, _ = attribute_model.probabilities(features)
    out = np.zeros((len(features), len(labels)), dtype=np.float32)
    known = {label: i for i, label in enumerate(attribute_model.labels.labels)}
    for j, label in enumerate(labels.labels):
        if label in known:
            out[:, j] = probabilities[:, known[label]]
    for part in labels.slices().values():
        total = out[:, part].sum(1, keepdims=True)
        out[:, part] = np.where(total > 0, out[:, part] / np.maximum(total, 1e-12), 0.0)
    return out


def evaluate_outfit_csv(model: OutfitModel, catalog: str | Path, related: str | Path,
                        products: str | Path | None = None,
                        attribute_model: AttributeModel | None = None,
                        held_out_only: bool = False, progress: bool = False) -> dict:
    """``vestis eval-outfits``: every photo of a Luma-layout ``catalog`` whose product has
    ``related`` links queries all its photos (with ``held_out_only``, only the products the
    recipes hold out query). ``products`` gives the catalog items' known labels."""
    samples = read_luma(catalog)
    present = {s.group or s.item_id for s in samples}
    table = read_products(products) if products else {}
    shop_products = {p: table.get(p, Product(p)) for p in present}
    if held_out_only:
        _, val = split_by_group(samples, lambda s: s.group or s.item_id, 0.2, 0)
        held = {s.path for s in val}
        held_out = np.array([s.path in held for s in samples])
    else:
        held_out = np.ones(len(samples), dtype=bool)
    shop = ShopData(samples, shop_products, held_out, read_related(related, present))
    if not shop.links:
        raise ValueError(f"{related}: no links between products of {catalog}")
    features = _encoder_features(model.feature_model, [s.path for s in samples], progress)
    return evaluate_outfits(model, features, shop, attribute_model=attribute_model)


def _encoder_features(name: str, paths: list[Path], progress: bool) -> np.ndarray:
    from vestis.models.encoder import Encoder

    return Encoder.from_name(name).embed(list(paths), progress=progress)


@torch.no_grad()
def _label_distributions(model: OutfitModel, features: np.ndarray) -> np.ndarray:
    _, probabilities = model.net.label_logits(torch.as_tensor(features, dtype=torch.float32))
    return probabilities.numpy()


def _cosine(rows: np.ndarray) -> np.ndarray:
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T
