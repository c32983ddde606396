"""The ``vestis`` command line."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import typer

from vestis._env import configure as configure_environment
from vestis.defaults import (
    BATCH_SIZE,
    DEFAULT_ATTRIBUTE_MODEL,
    DEFAULT_EVERY,
    DEFAULT_MODEL,
    DEFAULT_OUTFIT_MODEL,
    DEFAULT_PARSER,
    EVAL_BATCH_SIZE,
    LINK_MODEL,
)

# Heavy modules (torch, FAISS, matplotlib, onnxruntime) are imported inside the commands, so
# --help and argument errors answer at once.

app = typer.Typer(
    name="vestis",
    help="Clothing image retrieval: index a catalog, search it with a photo, evaluate models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CatalogOption = typer.Option(
    ..., "--catalog", "-c", help="Catalog: a directory, milvus://HOST:PORT/COLLECTION (a "
    "Milvus server) or milvus-lite:PATH (a Milvus Lite database).")
RerankKOption = typer.Option(50, "--rerank-k", min=1,
                             help="With --rerank: items re-ranked per garment or query.")
MatcherOption = typer.Option("rerank-lite0", "--matcher",
                             help="The matcher of --rerank: a name or a matcher.pt.")
RayOption = typer.Option(
    None, "--ray", metavar="[ADDRESS]", help="Embed on Ray Data (pip install "
    "'vestis\\[ray]'): --ray alone starts a local Ray on all cores; --ray ADDRESS joins a "
    "cluster (auto, ray://head:10001, HOST:PORT). Same vectors as without.")
RayWorkersOption = typer.Option(
    None, "--ray-workers", min=1, help="Embedding actors with --ray (default: one per CPU, or "
    "per GPU when the cluster has GPUs).")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def friendly_errors(command: Callable) -> Callable:
    """Turn expected failures into a one-line message and exit code 2, never a traceback."""

    @wraps(command)
    def run(*args, **kwargs):
        import sqlite3

        from vestis.catalog import ModelMismatchError
        from vestis.catalog.index import DiskFullError, is_disk_full
        from vestis.images import ImageError

        try:
            return command(*args, **kwargs)
        except (ImageError, ModelMismatchError, FileNotFoundError, PermissionError,
                ValueError, DiskFullError) as exc:
            fail(str(exc))  # VideoError is a ValueError; ReadOnlyCatalogError a PermissionError
        except (sqlite3.OperationalError, OSError) as exc:
            if is_disk_full(exc):
                fail(f"the disk is full ({exc}): the batch being written was rolled back; "
                     "free some space and run the command again")
            if isinstance(exc, sqlite3.OperationalError):
                fail(f"the catalog's database failed: {exc}")
            raise
        except ImportError as exc:  # an optional model package missing (TextEncoderMissing)
            fail(str(exc))
        except KeyError as exc:
            fail(str(exc.args[0]) if exc.args else "not found")
        except Exception as exc:
            if type(exc).__module__.startswith("pymilvus"):  # server down, bad collection
                fail(f"Milvus failed: {getattr(exc, 'message', None) or exc}")
            raise

    return run


def parse_where(pairs: list[str] | None, option: str = "--where") -> dict[str, str]:
    """``key=value`` pairs of a repeatable ``option`` (named in errors)."""
    where = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects key=value, got {pair!r}")
        where[key.strip()] = value
    return where


def ray_runner(address: str | None, workers: int | None, backend: str = "auto"):
    """``--ray`` / ``--ray-workers`` as a factory: given a catalog, a RayRunner (a context
    that starts and stops it) embedding with its model; None without ``--ray``."""
    if address is None:
        if workers is not None:
            raise ValueError("--ray-workers needs --ray")
        return None
    from vestis.catalog.ray_ingest import RayRunner, require_ray

    require_ray()

    def make(cat):
        return RayRunner.for_encoder(cat.encoder, cat.model_name, backend=backend,
                                     address=address, workers=workers)

    return make


def open_catalog(
    location: str | Path,
    model: str | None = None,
    index: str | None = None,
    *,
    create: bool = False,
    backend: str = "auto",
):
    """The catalog at ``location``: a directory or a Milvus URI (kept a string: a Path would
    turn ``milvus://h:p/c`` into ``milvus:/h:p/c``)."""
    from vestis.catalog import Catalog
    from vestis.catalog.backend import store_kind
    from vestis.catalog.stores import store_exists

    location = str(location)
    if not create and not store_exists(location):
        what = "no such Milvus catalog" if store_kind(location) == "milvus" else "no catalog.db"
        raise FileNotFoundError(f"{location}: not a vestis catalog ({what}); run vestis index")
    return Catalog(location, model=model, index=index, backend=backend)


INDEX_HELP = (
    "Index of a new catalog: auto (by size: Flat, then HNSW32, then IVF-PQ), flat, fp16, "
    "hnsw, hnsw-fp16, ivfpq, or a FAISS factory string such as 'HNSW32,SQfp16'."
)
BackendOption = typer.Option(
    "auto", "--backend", help="Inference: auto (ONNX Runtime if installed), onnx or torch."
)


@app.command()
@friendly_errors
def index(
    source: Path = typer.Argument(..., help="Folder of photos or CSV with image,item_id columns."),
    catalog: str = CatalogOption,
    model: str | None = typer.Option(None, help="Model name or checkpoint (new catalogs)."),
    index_choice: str | None = typer.Option(None, "--index", help=INDEX_HELP),
    batch_size: int = typer.Option(BATCH_SIZE, min=1, help="Images per embedding batch."),
    backend: str = BackendOption,
    crop: str | None = typer.Option(
        None, "--crop", help="auto: index each photo by the garment its item's category "
        "names (found by the garment parser), the whole photo when the category names none; "
        "garment: the same, but the largest garment when it names none; none: the whole "
        "photo. Kept for later runs (default: the catalog's choice, at first auto)."),
    products: Path | None = typer.Option(
        None, "--products", help="A products.csv (product,name,description,attributes...): "
        "each item with a matching 'product' value gets its description and attributes."),
    attributes: bool = typer.Option(
        False, "--attributes", help="Predict each item's category and attributes and store "
        "them as predicted.<family> metadata (filter with --where predicted.pattern=Solid)."),
    ray: str | None = RayOption,
    ray_workers: int | None = RayWorkersOption,
) -> None:
    """Add the images of SOURCE to the catalog (created if missing); prints images/s."""
    from tqdm.auto import tqdm

    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or file")

    def report_bad(path: str, reason: str) -> None:
        tqdm.write(f"failed: {path}: {reason}", file=sys.stderr)

    runner = ray_runner(ray, ray_workers, backend)  # before a new catalog is created
    with open_catalog(catalog, model, index_choice, create=True, backend=backend) as cat:
        cat.encoder.batch_size = batch_size
        with runner(cat) if runner else contextlib.nullcontext() as embedder:
            report = cat.add(source, progress=True, on_error=report_bad, crop=crop,
                             runner=embedder)
        typer.echo(
            f"indexed {report.added} images ({report.skipped} already present, "
            f"{len(report.failed)} failed) in {report.seconds:.1f} s "
            f"({report.images_per_second:.1f} images/s, {cat.encoder.backend_name}); "
            f"catalog has {len(cat)} items, {cat.num_images} images; index {cat.factory}; "
            f"crop {cat.crop_mode}"
        )
        _annotate(cat, products, attributes)
    if report.failed:
        raise typer.Exit(1)


def _annotate(cat, products: Path | None, attributes: bool) -> None:
    from vestis.catalog.annotate import annotate_attributes, join_products

    if products is not None:
        from vestis.data.products import read_products

        joined = join_products(cat, read_products(products))
        typer.echo(f"joined {joined} items with {products}")
    if attributes:
        from vestis.models.attributes import load_attribute_model

        count = annotate_attributes(cat, load_attribute_model(), progress=True)
        typer.echo(f"predicted attributes of {count} items")


TEXT_HELP = ("Search by words ('navy full-zip hoodie'); with a photo: the photo changed by "
             "the words ('but in red').")


@app.command()
@friendly_errors
def search(
    image: Path | None = typer.Argument(
        None, help="Query photo or video (.mp4, .mov, .webm, ...); omit it with --text."),
    catalog: str = CatalogOption,
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of items per garment."),
    where: list[str] | None = typer.Option(None, "--where", help="Filter key=value (AND)."),
    garment: str | None = typer.Option(
        None, "--garment", help="Search only this garment group (upper, outer, lower, dress, "
        "footwear, bag, headwear)."),
    whole: bool = typer.Option(False, "--whole", help="Search the whole photo as one query."),
    any_group: bool = typer.Option(
        False, "--any-group", help="Match garments with catalog items of any group (by "
        "default only compatible groups: shoes never return hoodies)."),
    mask: str = typer.Option(
        "none", "--mask", help="Paint each crop's non-garment pixels: none, grey or white."),
    text: str | None = typer.Option(None, "--text", help=TEXT_HELP),
    text_mode: str = typer.Option(
        "hybrid", "--text-mode", help="Text search: hybrid (BM25 fused with the aligned "
        "embedding), bm25 or embedding."),
    text_weight: float = typer.Option(
        0.5, "--text-weight", min=0.0, max=1.0, help="Photo + text: the text's share."),
    fusion: str = typer.Option(
        "learned", "--fusion", help="Video: how a track's frames are fused (learned, max, "
        "mean)."),
    every: int = typer.Option(DEFAULT_EVERY, "--every", min=1,
                              help="Video: sample every Nth frame."),
    thumbnails: Path | None = typer.Option(
        None, "--thumbnails", help="Video: write each track's best frame crop here."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    rerank: bool = typer.Option(
        False, "--rerank", help="Re-rank each garment's top --rerank-k items with the learned "
        "matcher rerank-lite0 (scores become its logits); see BENCHMARKS.md."),
    rerank_k: int = RerankKOption,
    matcher: str = MatcherOption,
) -> None:
    """Find the catalog items that best match each garment of a photo, or a text.

    The garment parser finds the garments; each is searched on its own (its group, box and
    top-k are printed). A photo with no garment found is searched whole. --text searches by
    words, or with a photo, for items like the photo as the words change it. A video is
    sampled every --every frames, its garments are tracked, and each track is matched."""
    from vestis.catalog.garments import WHOLE_IMAGE, GarmentHits, mask_fill
    from vestis.images import load_image

    mask_fill(mask)  # a bad value fails before any model loads
    if image is None and text is None:
        raise ValueError("give a photo, --text, or both")
    if rerank and (text is not None or is_video(image)):
        raise ValueError("--rerank re-ranks photo searches (not --text, not videos)")
    reranker = {"rerank": matcher if rerank else None, "rerank_k": rerank_k}
    if text is not None:
        _search_text(image, catalog, k, parse_where(where), text, text_mode, text_weight,
                     as_json)
        return
    if is_video(image):
        _search_video(image, catalog, k, parse_where(where), not any_group, fusion, every,
                      thumbnails, as_json)
        return
    with open_catalog(catalog) as cat:
        if whole:
            photo = load_image(image)
            hits = [GarmentHits(WHOLE_IMAGE, (0, 0, photo.width, photo.height), 1.0,
                                cat.search(photo, k=k, where=parse_where(where), **reranker))]
        else:
            hits = cat.search_garments(image, k, garment=garment, compatible=not any_group,
                                       where=parse_where(where), mask=mask, **reranker)
    if as_json:
        typer.echo(json.dumps({"query": str(image), "garments": [h.to_dict() for h in hits]},
                              indent=2))
        return
    if not hits:
        typer.echo(f"no {garment} garment found" if garment else "no results")
    for hit in hits:
        typer.echo(f"{hit.group}  box {' '.join(map(str, hit.box))}  score {hit.score:.2f}")
        _print_matches(hit.matches)


def is_video(path: Path) -> bool:
    from vestis.video.crops import VIDEO_SUFFIXES

    return path.suffix.lower() in VIDEO_SUFFIXES


def _search_video(video: Path, catalog: str, k: int, where: dict, compatible: bool,
                  fusion: str, every: int, thumbnails: Path | None, as_json: bool) -> None:
    from vestis.video.search import search_video

    if not video.is_file():
        raise FileNotFoundError(f"{video}: no such video")
    with open_catalog(catalog) as cat:
        tracks = search_video(cat, video, k, fusion=fusion, every=every, progress=True,
                              where=where or None, compatible=compatible)
    if thumbnails is not None:
        thumbnails.mkdir(parents=True, exist_ok=True)
        for track in tracks:
            if track.thumbnail is not None:
                track.thumbnail.convert("RGB").save(thumbnails / f"track-{track.track_id}.jpg")
    if as_json:
        typer.echo(json.dumps({"query": str(video), "fusion": fusion,
                               "tracks": [t.to_dict(thumbnail=thumbnails is None)
                                          for t in tracks]}, indent=2))
        return
    if not tracks:
        typer.echo("no garment tracked in the video")
    for track in tracks:
        span = f"{track.times[0]:.1f}-{track.times[-1]:.1f} s" if track.times else ""
        shot = (f"  thumbnail {thumbnails / f'track-{track.track_id}.jpg'}"
                if thumbnails is not None and track.thumbnail is not None else "")
        typer.echo(f"track {track.track_id}  {track.group}  {span}  {len(track.frames)} "
                   f"frames  best frame {track.best_frame_index}{shot}")
        _print_matches(track.matches)


def _print_matches(matches) -> None:
    if not matches:
        typer.echo("       no results")
    for rank, match in enumerate(matches, start=1):
        label = match.metadata.get("name") or match.metadata.get("category") or ""
        colour = f" ({match.metadata['colour']})" if match.metadata.get("colour") else ""
        box = f"  [{' '.join(map(str, match.box))}]" if match.box else ""
        typer.echo(f"  {rank:>3}  {match.score:.4f}  {match.item_id}  {label}{colour}  "
                   f"{match.path}{box}")


def _search_text(image: Path | None, catalog: str, k: int, where: dict, text: str,
                 mode: str, text_weight: float, as_json: bool) -> None:
    from vestis.images import load_image
    from vestis.text.search import search_image_text, search_text

    with open_catalog(catalog) as cat:
        if image is None:
            matches = search_text(cat, text, k, where=where or None, mode=mode)
        else:
            photo = load_image(image)
            photo_mode = "embedding" if mode == "embedding" else "hybrid"
            matches = search_image_text(cat, photo, text, k, text_weight, where=where or None,
                                        mode=photo_mode)
    if as_json:
        typer.echo(json.dumps({"query": str(image) if image else None, "text": text,
                               "results": [m.to_dict() for m in matches]}, indent=2))
        return
    typer.echo(f"text {text!r}" + (f" with photo {image}" if image else ""))
    _print_matches(matches)


@app.command()
@friendly_errors
def remove(item_id: str, catalog: str = CatalogOption) -> None:
    """Remove an item (and all its images) from the catalog."""
    with open_catalog(catalog) as cat:
        removed = cat.remove(item_id)
    typer.echo(f"removed item {item_id} ({removed} images)")


@app.command()
@friendly_errors
def update(
    item_id: str,
    catalog: str = CatalogOption,
    set_: list[str] = typer.Option(..., "--set", help="Metadata key=value to set."),
) -> None:
    """Set metadata fields of an item."""
    with open_catalog(catalog) as cat:
        metadata = cat.update(item_id, parse_where(set_, "--set"))
    typer.echo(json.dumps({"item_id": item_id, "metadata": metadata}))


@app.command()
@friendly_errors
def reindex(
    catalog: str = CatalogOption,
    index_choice: str | None = typer.Option(
        None, "--index", help="New index (default: the catalog's own choice). " + INDEX_HELP
    ),
    search_params: str | None = typer.Option(
        None, "--search-params", help="FAISS search parameters, e.g. efSearch=256 or nprobe=32."
    ),
) -> None:
    """Rebuild the vector index from the stored vectors, without re-embedding any image."""
    import time

    started = time.perf_counter()
    with open_catalog(catalog) as cat:
        cat.rebuild_index(index_choice, search_params)
        typer.echo(
            f"index {cat.factory} ({cat.index_choice}; {cat.search_params or 'no parameters'}) "
            f"over {cat.num_images} vectors in {time.perf_counter() - started:.1f} s"
        )


@app.command()
@friendly_errors
def reembed(
    catalog: str = CatalogOption,
    model: str | None = typer.Option(None, help="The model to embed the catalog with (a "
                                     "name or checkpoint; default: the catalog's own model "
                                     "name, as it loads now)."),
    ray: str | None = RayOption,
    ray_workers: int | None = RayWorkersOption,
) -> None:
    """Re-embed every image of a catalog with a model (after an upgrade of the default model,
    say), crash-safe: searches use the old vectors until the new catalog is complete."""
    import time

    from vestis.catalog.reembed import reembed as reembed_catalog

    started = time.perf_counter()
    runner = ray_runner(ray, ray_workers)
    old = open_catalog(catalog)
    model = model or old.model_name
    count = reembed_catalog(old, model, progress=True, runner=runner)
    typer.echo(f"re-embedded catalog {catalog} with {model}: {count} images in "
               f"{time.perf_counter() - started:.0f} s; servers open it again on their next "
               "request")


@app.command()
@friendly_errors
def info(
    catalog: str = CatalogOption,
    as_json: bool = typer.Option(False, "--json"),
    recall: int = typer.Option(
        0, "--recall", min=0, help="Also measure recall@10 against Flat with N stored vectors."
    ),
) -> None:
    """Describe a catalog: counts, model, index (and its recall against exact search)."""
    with open_catalog(catalog) as cat:
        details = cat.info(recall_queries=recall)
    if as_json:
        typer.echo(json.dumps(details, indent=2))
    else:
        for key, value in details.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            typer.echo(f"{key:>22}: {shown}")
    if not details["index_in_sync"]:
        fail(f"the index of {catalog} does not hold exactly the stored images; "
             f"run vestis reindex --catalog {catalog}", code=1)


@app.command()
@friendly_errors
def embed(
    source: Path = typer.Argument(..., help="CSV with image,item_id columns, or a folder."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model name or checkpoint path."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npz file."),
    batch_size: int = typer.Option(BATCH_SIZE, min=1),
    backend: str = BackendOption,
) -> None:
    """Embed images into an .npz: embeddings, item_ids and paths, in row order."""
    import numpy as np

    from vestis.atomic import atomic_path
    from vestis.catalog import read_source
    from vestis.models import Encoder

    records = read_source(source)
    if not records:
        raise ValueError(f"{source}: no images found")
    encoder = Encoder.from_name(model, batch_size=batch_size, backend=backend)
    vectors = encoder.embed([r.path for r in records], [r.box for r in records], progress=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".tmp.npz") as tmp:
        np.savez(
            tmp,
            embeddings=vectors,
            item_ids=np.array([r.item_id for r in records]),
            paths=np.array([str(r.path) for r in records]),
            model=np.array(encoder.model_id),
        )
    typer.echo(f"wrote {len(records)} embeddings of dimension {vectors.shape[1]} to {out}")


@app.command()
@friendly_errors
def export(
    model: str = typer.Argument(DEFAULT_MODEL, help="Model name or checkpoint path."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .onnx file."),
) -> None:
    """Export a model to ONNX (the normalised vector the encoder gives), checked against torch.

    The file works as a model name: vestis index --model FILE.onnx, Encoder.from_name(FILE).
    """
    from vestis.models import create_model
    from vestis.models.backends import OnnxBackend
    from vestis.models.onnx_export import agreement, export_onnx, model_metadata

    network = create_model(model)
    data = export_onnx(network, out)
    cosine = agreement(network, OnnxBackend(data))
    dim = model_metadata(network)["vestis_dim"]
    typer.echo(f"wrote {out} ({len(data) / 1e6:.1f} MB, {network.preprocess.size} px input, "
               f"dimension {dim}); cosine to torch {cosine:.6f}")
    if cosine < 0.999:
        fail(f"the ONNX vectors disagree with torch (cosine {cosine:.6f} < 0.999)")


@app.command(name="eval")
@friendly_errors
def eval_(
    dataset: Path = typer.Argument(..., help="CSV, DeepFashion folder or DeepFashion2 folder."),
    format: str | None = typer.Option(None, "--format", help="csv | inshop | c2s | df2."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model name or checkpoint path."),
    compare: str | None = typer.Option(
        None, "--compare", help="A second model scored on the same queries: both models' "
        "metrics, the difference with its 95% interval, and the queries only one gets right."),
    split: str = typer.Option("test", help="Split to evaluate (c2s)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write metrics as JSON."),
    report: Path | None = typer.Option(None, "--report", help="Write a Markdown report."),
    batch_size: int = typer.Option(EVAL_BATCH_SIZE, min=1),
    crop: str = typer.Option(
        "auto", "--crop", help="Images without a box, as vestis index --crop stores them: "
        "auto (the garment each image's category names, else the whole photo: what vestis "
        "index does by default), garment (the same, else the largest garment), none (whole "
        "photos) or largest (the largest garment found)."),
    rerank: bool = typer.Option(
        False, "--rerank", help="Re-rank each query's top --rerank-k with the learned matcher "
        "rerank-lite0: its metrics, and the paired difference against the plain ranking."),
    rerank_k: int = RerankKOption,
    matcher: str = MatcherOption,
) -> None:
    """Measure retrieval quality: Recall@K (hit rate), P@1, mAP, MAP@R, R-precision, each with
    a 95% bootstrap interval; ties count at their expected value."""
    from vestis.evaluation.report import format_comparison, format_table
    from vestis.evaluation.run import compare as compare_models
    from vestis.evaluation.run import evaluate

    if format is not None and format not in ("csv", "inshop", "c2s", "df2"):
        raise ValueError(f"--format must be csv, inshop, c2s or df2, got {format!r}")
    if rerank:
        from vestis.evaluation.run import compare_rerank

        if compare is not None or report is not None:
            raise ValueError("--rerank compares the model with and without re-ranking: it "
                             "takes neither --compare nor --report")
        reranked, _, comparison = compare_rerank(
            dataset, model, matcher, rerank_k=rerank_k, format=format, split=split,
            batch_size=batch_size, json_path=json_out, crop=crop)
        typer.echo(format_table(reranked.metrics, reranked.intervals))
        typer.echo(format_comparison(comparison, (f"{model} --rerank", model)))
        return
    options = dict(format=format, split=split, batch_size=batch_size, progress=True,
                   report_dir=report, json_path=json_out, crop=crop)
    if compare is None:
        result = evaluate(dataset, model, **options)
        typer.echo(format_table(result.metrics, result.intervals))
        return
    result_a, result_b, comparison = compare_models(dataset, model, compare, **options)
    typer.echo(format_comparison(comparison, (model, compare)))


@app.command()
@friendly_errors
def explain(
    image: Path = typer.Argument(..., help="Photo to explain."),
    model: str = typer.Option(..., help="Model with an attention map (name or checkpoint)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output image (PNG)."),
) -> None:
    """Overlay a model's attention map on a photo (Impdrop; ABE-M: one panel per learner).

    Colours span the map's own range (blue: lowest, red: highest), which is printed."""
    from vestis.explain import write_explanation

    explanation = write_explanation(image, model, out)
    count, height, width = explanation.maps.shape
    typer.echo(f"wrote {out}: {count} attention map(s) of {height}x{width}, mean "
               f"{explanation.maps.mean():.2f}, range {explanation.maps.min():.2f}-"
               f"{explanation.maps.max():.2f}")


@app.command(name="train")
@friendly_errors
def train_(
    recipe: Path = typer.Argument(..., help="Training recipe (YAML), e.g. configs/triplet.yaml."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default runs/NAME)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (retrieval)."),
    epochs: int | None = typer.Option(None, help="Override the recipe's epochs."),
    minutes: float | None = typer.Option(None, help="Override the time budget (minutes; "
                                         "retrieval)."),
) -> None:
    """Train any recipe into --out, on the recipe's ``task``: retrieval (the default; best.pt,
    last.pt, config.yaml, log.csv), parser, text, attributes, outfits or video-fusion.

    Nothing is written into the package: ``vestis ship RUN NAME`` stores a run as a named
    artifact."""
    from vestis.train.tasks import train_recipe

    typer.echo(train_recipe(recipe, out, epochs=epochs, minutes=minutes,
                            resume=resume).message)


@app.command()
@friendly_errors
def serve(
    catalog: str = CatalogOption,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="File holding the bearer token for writes (else no writes)."
    ),
    private: bool = typer.Option(False, "--private", help="Searches and reads need the token."),
    max_upload_mb: float = typer.Option(20.0, min=0.01, help="Largest request body, in MB."),
    workers: int = typer.Option(2, min=1, max=64, help="Requests that decode photos or run "
                                "the model at once (each holds one photo in memory)."),
    queue: int = typer.Option(16, min=0, max=1000, help="Further such requests that wait "
                              "for a worker; beyond them the server answers 503 at once."),
) -> None:
    """Serve the catalog over HTTP: the API (documented at /docs) and a search page at /."""
    configure_environment()  # before the catalog loads FAISS
    import threading

    import uvicorn

    from vestis.serve import create_app, read_token

    token = read_token(token_file) if token_file else None
    if private and token is None:
        raise ValueError("--private needs --token-file")
    application = create_app(catalog, token=token, private=private, max_upload_mb=max_upload_mb,
                             workers=workers, queue=queue)
    service = application.state.service

    def announce_ready() -> None:
        service.wait_until_loaded()
        state = "ready" if service.ready else f"failed to load the model: {service.error}"
        typer.echo(f"vestis serve: {state}", err=True)

    threading.Thread(target=announce_ready, daemon=True).start()
    if not private and not is_loopback(host):
        typer.echo(
            f"vestis serve: warning: {host} is not a loopback address and reads are open: "
            "anyone who can reach it can search the catalog and fetch its images (use "
            "--private with --token-file, or --host 127.0.0.1)",
            err=True,
        )
    writes = "writes need the token" if token else "writes disabled (no --token-file)"
    typer.echo(
        f"vestis serve: {catalog} on http://{host}:{port}/ (API docs at /docs); {writes}; "
        "loading the model, /health says when ready",
        err=True,
    )
    uvicorn.run(application, host=host, port=port, log_level="info")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- garment parser (vestis.detect) ----------------------------------------------------------
@app.command()
@friendly_errors
def detect(
    image: Path = typer.Argument(..., help="Photo to parse."),
    parser: str = typer.Option(DEFAULT_PARSER, help="Parser name or checkpoint path."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Draw masks and boxes (PNG)."),
    landmarks: bool = typer.Option(
        False, "--landmarks", help="Also find each garment's FashionNet landmarks (collar, "
        "sleeves, waistline, hem), read off its mask: in the JSON and the drawing."),
) -> None:
    """Find the garments in a photo: group, box (x1 y1 x2 y2) and score of each."""
    from vestis.detect import draw_garments, load_parser
    from vestis.images import load_image

    photo = load_image(image)
    garments = load_parser(parser).parse(photo)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        draw_garments(photo, garments, landmarks=landmarks).save(out)
    if as_json:
        found = [{**g.to_dict(), **({"landmarks": g.landmarks().to_dict()} if landmarks else {})}
                 for g in garments]
        typer.echo(json.dumps({"image": str(image), "width": photo.width,
                               "height": photo.height, "garments": found}, indent=2))
    else:
        if not garments:
            typer.echo("no garments found")
        for garment in garments:
            x1, y1, x2, y2 = garment.box
            typer.echo(f"{garment.group:<9} {x1:>5} {y1:>5} {x2:>5} {y2:>5}  "
                       f"{garment.score:.3f}")
    if out is not None:
        typer.echo(f"wrote {out}", err=True)


@app.command()
@friendly_errors
def describe(
    image: Path = typer.Argument(..., help="Photo of a garment."),
    model: str = typer.Option(DEFAULT_ATTRIBUTE_MODEL, help="Attribute model name or checkpoint."),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0,
                                    help="Show values at least this likely (the best always)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Predict a garment's category and attributes (material, pattern, climate, style)."""
    from vestis.images import load_image
    from vestis.models.attributes import load_attribute_model

    load_image(image)  # a bad file fails before the model loads
    description = load_attribute_model(model).describe(image, threshold=threshold)
    if as_json:
        typer.echo(json.dumps({"image": str(image), **description.to_dict()}, indent=2))
        return
    if description.category:
        typer.echo(f"category  {description.category}  ({description.category_probability:.2f})")
    for family, values in description.attributes.items():
        shown = ", ".join(f"{value} ({p:.2f})" for value, p in values)
        typer.echo(f"{family:<9} {shown}")


@app.command(name="eval-attributes")
@friendly_errors
def eval_attributes(
    catalog_csv: Path = typer.Argument(..., help="Luma-layout catalog.csv (image, product, "
                                       "category)."),
    products: Path = typer.Option(..., "--products", help="products.csv with the true "
                                  "attributes."),
    model: str = typer.Option(DEFAULT_ATTRIBUTE_MODEL, help="Attribute model name or checkpoint."),
    families: str = typer.Option("climate,pattern,material",
                                 help="Attribute families to report, comma-separated."),
    held_out: bool = typer.Option(False, "--held-out", help="Only the products the training "
                                  "recipes hold out (split by product, 0.2, seed 0)."),
    as_json: Path | None = typer.Option(None, "--json", help="Also write the report here."),
) -> None:
    """Per-attribute top-k recall and mAP, against the label-frequency prior."""
    from vestis.models.attributes import load_attribute_model
    from vestis.train.heads import evaluate_attribute_csv

    columns = [c.strip() for c in families.split(",") if c.strip()]
    report = evaluate_attribute_csv(load_attribute_model(model), catalog_csv, products,
                                    columns, held_out_only=held_out, progress=True)
    if as_json:
        as_json.write_text(json.dumps(report, indent=2))
    typer.echo(f"{report['images']} images of {report['products']} products")
    typer.echo(f"{'family':<14}{'values':>7}{'mAP':>8}{'prior':>8}{'top3':>8}{'prior':>8}"
               f"{'top5':>8}{'prior':>8}")
    for family, row in report["families"].items():
        typer.echo(f"{family:<14}{row['values']:>7}{row['mAP']:>8.3f}{row['prior_mAP']:>8.3f}"
                   f"{row['top3_recall']:>8.3f}{row['prior_top3_recall']:>8.3f}"
                   f"{row['top5_recall']:>8.3f}{row['prior_top5_recall']:>8.3f}")
    typer.echo(f"{'all':<14}{'':>7}{report['mAP']:>8.3f}{report['prior_mAP']:>8.3f}")
    if "category_accuracy" in report:
        typer.echo(f"category accuracy {report['category_accuracy']:.3f}")


@app.command()
@friendly_errors
def complete(
    image: Path = typer.Argument(..., help="Photo of a garment."),
    catalog: str = CatalogOption,
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of items."),
    model: str = typer.Option(DEFAULT_OUTFIT_MODEL, help="Outfit model name or checkpoint."),
    same_category: bool = typer.Option(
        False, "--same-category", help="Also suggest items of the photo's own category."),
    where: list[str] | None = typer.Option(None, "--where", help="Filter key=value (AND)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Complete the look: the catalog items that go with the garment in the photo (Comp-Net)."""
    from vestis.catalog.outfits import complete_outfit
    from vestis.images import load_image
    from vestis.models.compnet import load_outfit_model

    photo = load_image(image)
    with open_catalog(catalog) as cat:
        result = complete_outfit(cat, photo, k, model=load_outfit_model(model),
                                 exclude_category=not same_category, where=parse_where(where),
                                 progress=True)
    if as_json:
        typer.echo(json.dumps({"query": str(image), **result.to_dict()}, indent=2))
        return
    typer.echo(f"goes with a {result.category or 'garment'}:")
    _print_matches(result.matches)


@app.command(name="eval-outfits")
@friendly_errors
def eval_outfits(
    catalog_csv: Path = typer.Argument(..., help="Luma-layout catalog.csv (image, product, "
                                       "category)."),
    related: Path = typer.Option(..., "--related", help="related.csv: product,related_product."),
    products: Path | None = typer.Option(None, "--products", help="products.csv: the catalog "
                                         "items' known climate and style labels."),
    model: str = typer.Option(DEFAULT_OUTFIT_MODEL, help="Outfit model name or checkpoint."),
    held_out: bool = typer.Option(False, "--held-out", help="Only the products the training "
                                  "recipes hold out query (split by product, 0.2, seed 0)."),
    as_json: Path | None = typer.Option(None, "--json", help="Also write the report here."),
) -> None:
    """Related-product Recall@K and mAP of Comp-Net against attribute similarity."""
    from vestis.models.attributes import load_attribute_model
    from vestis.models.compnet import load_outfit_model
    from vestis.train.heads import evaluate_outfit_csv

    report = evaluate_outfit_csv(load_outfit_model(model), catalog_csv, related, products,
                                 attribute_model=load_attribute_model(),
                                 held_out_only=held_out, progress=True)
    if as_json:
        as_json.write_text(json.dumps(report, indent=2))
    names = {"compnet_predicted": "Comp-Net", "compnet_known": "Comp-Net, shop's labels",
             "attribute_model_predicted": "attribute similarity",
             "attribute_model_known": "attribute sim., shop's labels",
             "visual": "visual similarity"}
    if products is None:  # without the table, "known" labels are the predicted ones
        names = {k: v for k, v in names.items() if not k.endswith("_known")}
    rows = {label: report[key] for key, label in names.items()}
    queries = rows["Comp-Net"]["queries"]
    typer.echo(f"{queries} query photos; the query's own kind of garment is left out")
    typer.echo(f"{'ranking':<31}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'mAP':>7}")
    for name, row in rows.items():
        typer.echo(f"{name:<31}{row['R@1']:>7.3f}{row['R@5']:>7.3f}{row['R@10']:>7.3f}"
                   f"{row['mAP']:>7.3f}")


@app.command(name="video-crops")
@friendly_errors
def video_crops(
    videos: list[Path] = typer.Argument(..., help="Video files or folders of videos."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the crops and crops.csv."),
    every: int = typer.Option(DEFAULT_EVERY, "--every", min=1, help="Sample every Nth frame."),
    parser: str | None = typer.Option(None, "--parser", help="Garment parser name or file."),
    model: str = typer.Option(LINK_MODEL, "--model", help="Model that links garments across "
                              "frames."),
) -> None:
    """Garment crops of unlabelled videos, one instance per tracked garment: the data of the
    video-triplet recipe (configs/video_triplet.yaml)."""
    from vestis.video.crops import make_crops

    summary = make_crops(videos, out, every, parser, model)
    if not summary["crops"]:
        raise ValueError("no garment crop came out of these videos (skipped ones are named "
                         "above)")
    typer.echo(f"wrote {out / 'crops.csv'}: " + ", ".join(
        f"{key} {value:g}" for key, value in summary.items()))


@app.command(name="eval-parsing")
@friendly_errors
def eval_parsing(
    dataset: Path = typer.Argument(..., help="CSV with image,mask columns (CCP format)."),
    parser: str = typer.Option(DEFAULT_PARSER, help="Parser name or checkpoint path."),
    labels: Path | None = typer.Option(None, help="labels.txt (default: beside the CSV)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write metrics as JSON."),
) -> None:
    """Per-group IoU, mIoU over the garment groups and pixel accuracy of a garment parser."""
    from vestis.detect import format_metrics, load_parser

    metrics = load_parser(parser).evaluate(dataset, labels, progress=True)
    typer.echo(format_metrics(metrics))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(metrics.to_dict(), indent=2) + "\n")


@app.command(name="train-parser")
@friendly_errors
def train_parser_(
    recipe: Path = typer.Argument(..., help="Parser recipe, e.g. configs/parser-lite0.yaml."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default runs/NAME)."),
    epochs: int | None = typer.Option(None, help="Override the recipe's epochs."),
) -> None:
    """Train the garment parser: an alias of ``vestis train`` for parser recipes; writes
    last.pt, log.csv, val.csv."""
    from vestis.train.tasks import train_recipe

    typer.echo(train_recipe(recipe, out, task="parser", epochs=epochs).message)


@app.command()
@friendly_errors
def adapt(
    source: Path | None = typer.Argument(None, help="Folder or CSV of the shop's photos (as "
                                         "for vestis index); photos sharing an item_id are one "
                                         "product. Or --catalog."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write; then use it as "
                             "a model name anywhere (--model OUT)."),
    model: str | None = typer.Option(None, "--model", help=f"Base model to adapt (default "
                                     f"{DEFAULT_MODEL}; with --catalog, the catalog's own)."),
    catalog: str | None = typer.Option(None, "--catalog", "-c", help="Adapt on a catalog's "
                                       "own images instead of SOURCE (a directory or a Milvus "
                                       "URI), then re-embed it with the adapted model (when "
                                       "kept), crash-safe."),
    minutes: float = typer.Option(10.0, min=0.0, help="Time for augmented views; every "
                                  "photo keeps its own vector whatever the budget."),
    holdout: float = typer.Option(0.3, help="Share of the products each fold of the check "
                                  "holds out (round(1 / holdout) folds, every product "
                                  "checked once)."),
    seed: int = typer.Option(0, help="Seed of the held-out choice and the augmentations."),
    crop: str = typer.Option(
        "auto", "--crop", help="SOURCE's photos as vestis index --crop stores them: auto "
        "(the garment each photo's category names, else the whole photo), garment or none. "
        "With --catalog, the catalog's stored views."),
    ray: str | None = RayOption,
    ray_workers: int | None = RayWorkersOption,
) -> None:
    """Adapt a model to a shop from its own catalog; keeps the base when it does not help.
    With --catalog, --ray re-embeds the catalog on Ray Data."""
    from vestis.train.adapt import adapt as adapt_model
    from vestis.train.adapt import adapt_catalog

    if (source is None) == (catalog is None):
        raise typer.BadParameter("give either SOURCE or --catalog DIR (exactly one)")
    if ray is not None and catalog is None:
        raise typer.BadParameter("--ray re-embeds a catalog: it needs --catalog")
    if catalog is not None:
        done = adapt_catalog(catalog, out, base=model, minutes=minutes, holdout=holdout,
                             seed=seed, progress=True,
                             runner=ray_runner(ray, ray_workers))
        report, model = done.adapt, done.adapt.base
    else:
        model = model or DEFAULT_MODEL
        report = adapt_model(source, out, base=model, minutes=minutes, holdout=holdout,
                             seed=seed, crop=crop, progress=True)
    typer.echo(f"checked on {report.items} items ({report.queries} queries), each by a map "
               f"learnt without it ({report.check_folds} folds); {report.photos} photos")
    for name in ("R@1", "R@10", "mAP"):
        low, high = report.intervals[name]
        typer.echo(f"{name:<4} base {report.base_metrics[name]:.4f}  adapted "
                   f"{report.adapted_metrics[name]:.4f}  difference "
                   f"{report.difference[name]:+.4f} [{low:+.4f}, {high:+.4f}]")
    if report.kept:
        shares = ", ".join(f"{name} {share:.1f}" for name, share in report.shares.items())
        typer.echo(f"wrote {out}: {report.map} map ({shares}) learnt on all {report.items} "
                   f"items ({report.seconds:.0f} s); use --model {out}")
    else:
        typer.echo(f"adapting did not help on the held-out products: wrote {out} with "
                   f"{model}'s vectors unchanged ({report.seconds:.0f} s)")
    if catalog is not None and report.kept:
        typer.echo(f"re-embedded catalog {catalog} with {out}: {done.reembedded} images "
                   f"({done.seconds:.0f} s in all); servers open it again on their next "
                   "request")
    elif catalog is not None:
        typer.echo(f"catalog {catalog} is unchanged")


@app.command()
@friendly_errors
def ship(
    run: Path = typer.Argument(..., help="Run folder (as vestis train wrote it) or checkpoint."),
    name: str = typer.Argument(..., help="Artifact to store it as (vestis models --all), "
                               "e.g. vestis-lite0 or parser-lite0."),
    fp16: bool = typer.Option(False, "--fp16", help="Retrieval models: fp16 weights instead "
                              "of int8."),
) -> None:
    """Store a training run as a named artifact inside the package: the one explicit step
    between training (always into a run folder) and shipping."""
    from vestis.train.ship import ship as ship_run

    path = ship_run(run, name, fp16=fp16)
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")


@app.command()
def models(
    all_: bool = typer.Option(False, "--all", help="Every shipped artifact, with its kind, "
                              "file and recipe."),
) -> None:
    """List the registered models (with --all, every shipped artifact)."""
    if all_:
        from vestis.artifacts import artifacts

        for entry in artifacts():
            missing = "" if entry.exists() else "  (missing)"
            typer.echo(f"{entry.name:<18} {entry.kind:<12} {entry.file}  <- {entry.recipe}"
                       f"{missing}")
        return
    from vestis.models import list_models

    for name in list_models():
        typer.echo(name)


#: What may follow ``--ray`` as its address; anything else (another option, the source)
#: leaves ``--ray`` alone, meaning a local Ray instance.
RAY_ADDRESS = re.compile(r"^(auto|local|[A-Za-z][\w+.-]*://\S+|[\w.-]+:\d+)$")


def ray_argv(argv: list[str]) -> list[str]:
    """``--ray`` takes an optional address: a bare ``--ray`` becomes ``--ray=local``."""
    out = []
    for position, arg in enumerate(argv):
        after = argv[position + 1] if position + 1 < len(argv) else None
        if arg == "--ray" and (after is None or not RAY_ADDRESS.match(after)):
            arg = "--ray=local"
        out.append(arg)
    return out


def main() -> None:
    configure_environment()
    sys.argv[1:] = ray_argv(sys.argv[1:])
    app()


if __name__ == "__main__":
    sys.exit(main())
