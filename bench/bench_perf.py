"""Performance, side by side in one run: encoder backends, ingest, search, end to end, memory.

    python bench/bench_perf.py [--quick] [--only encoder,ingest,search,e2e,compressed]
                               [--update BENCHMARKS.md]

- encoder: torch eager against ONNX Runtime on real photos (model alone, and the whole
  encoder with decoding), images/s, their ratio and the cosine between their vectors;
- ingest: ``vestis index FOLDER`` on real photo folders, the rate it prints;
- search: p50/p99 latency of one query at a time, recall@10 against Flat, build time and
  bytes per vector (index file, and process memory growth) for each index type over 10k,
  100k and 1M synthetic vectors (``--quick``: 10k and 100k);
- e2e: decode + embed + search of real photos in a 100k catalog (``auto`` index), and the
  same with garment detection (one search per garment found);
- compressed: held-out Luma R@10 with IVF-PQ against Flat, and IVF-PQ's bytes per vector.

Synthetic vectors imitate the model's: categories, items and views in a 32-dimensional
latent space embedded in the model's dimension (``--dim``, default 1565: the default model's
285-d trained vector and its 1280-d ImageNet features), plus noise; on the real photos' 285-d
vectors the same statistics are top-1 cosine 0.90, top-10 0.74, median 0.00 and 25 principal
components for 90% of the variance (synthetic: 0.91, 0.69, 0.02, 27).
Timings are medians over alternating repeats; ``--update`` replaces the performance section
of BENCHMARKS.md and leaves the others as they are.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SECTION = "## Performance (`bench/bench_perf.py`)"
MODEL = "vestis-lite0"
DIM = 1565  # the default model's vectors
SEARCH_TYPES = ("Flat", "fp16", "hnsw", "hnsw-fp16", "ivfpq")
SLOW_BUILD = {"hnsw-fp16": 200_000}  # skipped above this size (fp16 graph build is slow)


# -- helpers ---------------------------------------------------------------------------
def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = _cpu_model() or platform.machine()
    return (f"{os.cpu_count()} CPU cores ({cpu}), {_memory_gb():.0f} GB RAM, Python "
            f"{platform.python_version()}; load average {load:.1f} when the run started")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    found = re.search(r"model name\s*:\s*(.+)", text)
    return found.group(1).strip() if found else ""


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        return float("nan")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def median_rate(count: int, runs: list[float]) -> float:
    return count / statistics.median(runs)


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def synthetic_vectors(n: int, dim: int = DIM, seed: int = 0, views: int = 3) -> np.ndarray:
    """``n`` unit vectors: 29 categories, n/views items, views per item, in a 32-d latent
    space rotated into ``dim`` dimensions, plus isotropic noise (see the module docstring)."""
    rng = np.random.default_rng(seed)
    latent = 32
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)
    categories = rng.standard_normal((29, latent)).astype(np.float32)
    items = max(1, n // views)
    centres = categories[rng.integers(0, 29, items)]
    centres += 0.8 * rng.standard_normal((items, latent)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        count = min(100_000, n - start)
        z = centres[rng.integers(0, items, count)]
        z = z + 0.35 * rng.standard_normal((count, latent)).astype(np.float32)
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        x = z @ basis + 0.15 * rng.standard_normal((count, dim)).astype(np.float32) / dim**0.5
        out[start:start + count] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def luma_photos(limit: int | None = None) -> list[Path]:
    photos = sorted((DATA / "luma" / "images").glob("*.jpg"))
    return photos[:limit] if limit else photos


# -- encoder ---------------------------------------------------------------------------
def bench_encoder(repeats: int) -> list[str]:
    from vestis.models import Encoder, create_model

    model = create_model(MODEL)
    encoders = {kind: Encoder(model, backend=kind) for kind in ("torch", "onnx")}
    photos = [str(p) for p in luma_photos(96)]
    batch = np.stack([encoders["torch"].preprocess(p) for p in photos[:32]])
    model_runs: dict[str, list[float]] = {kind: [] for kind in encoders}
    embed_runs: dict[str, list[float]] = {kind: [] for kind in encoders}
    vectors = {}
    for _ in range(repeats):  # alternate, so that both see the same machine load
        for kind, encoder in encoders.items():
            model_runs[kind].append(timed(lambda e=encoder: _embed_batches(e, batch)))
            started = time.perf_counter()
            vectors[kind] = encoder.embed(photos)
            embed_runs[kind].append(time.perf_counter() - started)
    cosine = float(np.min(np.sum(vectors["torch"] * vectors["onnx"], axis=1)))
    return _encoder_lines(model_runs, embed_runs, len(batch), len(photos), cosine,
                          encoders["onnx"].backend)


def _embed_batches(encoder, batch: np.ndarray) -> None:
    for start in range(0, len(batch), encoder.batch_size):
        encoder.embed_arrays(batch[start:start + encoder.batch_size])


def _encoder_lines(model_runs, embed_runs, n_batch, n_photos, cosine, onnx) -> list[str]:
    import torch

    rates = {kind: (median_rate(n_batch, model_runs[kind]), median_rate(n_photos, embed_runs[kind]))
             for kind in model_runs}
    return [
        f"encoder {MODEL}: torch {torch.__version__} eager ({torch.get_num_threads()} threads) "
        f"against onnxruntime {_ort_version()} ({onnx.streams} streams x "
        f"{onnx.threads} thread), batches of 16, median of {len(model_runs['torch'])}",
        "| | torch eager | ONNX Runtime | ratio |",
        "|---|---:|---:|---:|",
        f"| model alone (preprocessed batch), images/s | {rates['torch'][0]:.1f} | "
        f"{rates['onnx'][0]:.1f} | {rates['onnx'][0] / rates['torch'][0]:.2f}x |",
        f"| encoder on {n_photos} Luma photos (decode + preprocess + embed), images/s | "
        f"{rates['torch'][1]:.1f} | {rates['onnx'][1]:.1f} | "
        f"{rates['onnx'][1] / rates['torch'][1]:.2f}x |",
        f"| lowest cosine between the two backends' vectors, {n_photos} photos | "
        f"{cosine:.6f} | | |",
    ]


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# -- ingest ----------------------------------------------------------------------------
def bench_ingest(folders: list[Path], repeats: int) -> list[str]:
    lines = ["| folder | photos | size | `vestis index` images/s (median) | runs | wall s |",
             "|---|---:|---|---:|---|---:|"]
    for folder in folders:
        rates, walls = [], []
        for _ in range(repeats):
            rate, wall = _index_once(folder)
            rates.append(rate)
            walls.append(wall)
        photos = sorted(folder.glob("*.jpg"))
        size = _size_range(photos)
        lines.append(f"| `{folder.relative_to(DATA.parent)}` | {len(photos)} | {size} | "
                     f"{statistics.median(rates):.1f} | {', '.join(f'{r:.1f}' for r in rates)} "
                     f"| {statistics.median(walls):.1f} |")
    return lines


def _index_once(folder: Path) -> tuple[float, float]:
    vestis = Path(sys.executable).with_name("vestis")
    with tempfile.TemporaryDirectory() as catalog:
        started = time.perf_counter()
        result = subprocess.run([str(vestis), "index", str(folder), "--catalog", catalog],
                                capture_output=True, text=True, check=True)
        wall = time.perf_counter() - started
    rate = re.search(r"\(([\d.]+) images/s", result.stdout)
    if rate is None:
        raise RuntimeError(f"vestis index printed no rate: {result.stdout}")
    return float(rate.group(1)), wall


def _size_range(photos: list[Path]) -> str:
    from PIL import Image

    sides = [max(Image.open(p).size) for p in photos[:200]]
    return f"{min(sides)}-{max(sides)} px (longer side)"


# -- search ----------------------------------------------------------------------------
def bench_search(sizes: list[int], dim: int = DIM, n_queries: int = 200) -> list[str]:
    lines = ["| vectors | index (choice: factory) | build s | p50 ms | p99 ms | recall@10 "
             "| file bytes/vector | RAM bytes/vector |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        lines.extend(_search_rows(n, n_queries, dim))
    return lines


def _search_rows(n: int, n_queries: int, dim: int) -> list[str]:
    from vestis.catalog.index import auto_factory, resolve_factory

    data = synthetic_vectors(n + n_queries, dim, seed=n)
    queries, data = data[:n_queries], data[n_queries:]
    exact, measured, rows = None, {}, []
    for choice in (*SEARCH_TYPES, "auto"):
        if n > SLOW_BUILD.get(choice, n):
            continue
        factory = resolve_factory(choice, n, dim)
        label = f"{choice}: {factory}" if choice.lower() != factory.lower() else factory
        if choice == "auto":
            label = f"**auto: {auto_factory(n, dim)}**"
        if factory not in measured:  # auto is one of the others: same index, same figures
            measured[factory] = _measure_index(factory, data, queries, exact)
        result = measured[factory]
        exact = exact if exact is not None else result["ids"]
        rows.append(f"| {n:,} | {label} | {result['build']:.1f} | {result['p50']:.2f} | "
                    f"{result['p99']:.2f} | {result['recall']:.3f} | {result['file']:.0f} | "
                    f"{result['ram']:.0f} |")
        print(rows[-1], flush=True)
    return rows


def _measure_index(factory: str, data, queries, exact) -> dict:
    from vestis.catalog.index import FaissIndex, default_search_params, recall_at_k

    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    index = FaissIndex(data.shape[1], factory, default_search_params(factory, len(data)))
    index.train(data[np.random.default_rng(0).permutation(len(data))[:65_536]])
    ids = np.arange(len(data), dtype=np.int64)
    for start in range(0, len(data), 100_000):
        index.add(ids[start:start + 100_000], data[start:start + 100_000])
    build = time.perf_counter() - started
    ram = (rss_bytes() - before) / len(data)
    latencies, found = [], []
    for query in queries:
        started = time.perf_counter()
        _, hits = index.search(query[None], 10)
        latencies.append(time.perf_counter() - started)
        found.append(hits[0])
    found = np.array(found)
    file_bytes = _file_size(index) / len(data)
    recall = 1.0 if exact is None else recall_at_k(found, exact)
    del index
    return {"build": build, "p50": 1000 * np.percentile(latencies, 50), "ram": ram,
            "p99": 1000 * np.percentile(latencies, 99), "recall": recall, "file": file_bytes,
            "ids": found}


def _file_size(index) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index.faiss"
        index.save(path)
        return path.stat().st_size


# -- end to end ------------------------------------------------------------------------
def bench_e2e(n: int, n_queries: int = 40) -> list[str]:
    """A catalog of ``n`` vectors (the real Luma photos plus synthetic ones), queried with
    Luma photos through ``Catalog.search``: decode, embed and search, one at a time."""
    from vestis.catalog import Catalog
    from vestis.models import Encoder

    encoder = Encoder.from_name(MODEL)
    photos = luma_photos()
    with tempfile.TemporaryDirectory() as folder, Catalog(folder, encoder=encoder) as catalog:
        catalog.add([str(p) for p in photos])
        fill = synthetic_vectors(n - len(photos), encoder.dim, seed=7)
        started = time.perf_counter()
        catalog.add_vectors([f"synthetic-{i}" for i in range(len(fill))], fill,
                            model_id=encoder.model_id)
        build = time.perf_counter() - started
        queries = photos[::max(1, len(photos) // n_queries)]
        latencies, hits = _query_catalog(catalog, queries)
        detected, detected_hits, garments = _query_garments(catalog, queries)
        street = sorted((DATA / "ccp" / "photos").glob("*.jpg"))[:n_queries]
        street_latencies, _, street_garments = _query_garments(catalog, street)
        factory, images = catalog.factory, catalog.num_images
    return [
        f"catalog of {images:,} images ({len(photos)} real Luma photos + synthetic vectors), "
        f"index `auto` = {factory} (stored vectors added and indexed in {build:.0f} s), "
        f"model {MODEL} on {encoder.backend_name}; {len(latencies)} Luma photos as queries, "
        "one at a time, k=10",
        "| query path | queries | garments per photo | p50 ms | p99 ms | the photo itself "
        "first |",
        "|---|---|---:|---:|---:|---:|",
        _e2e_row("decode + embed + search (no garment detection)", "Luma photos", 1.0,
                 latencies, f"{hits}/{len(latencies)}"),
        _e2e_row("decode + detect + embed each garment + search each", "Luma photos",
                 garments, detected, f"{detected_hits}/{len(detected)} (any garment)"),
        _e2e_row("decode + detect + embed each garment + search each", "CCP street photos",
                 street_garments, street_latencies, "-"),
    ]


def _e2e_row(path: str, queries: str, garments: float, latencies: list[float], hits: str
             ) -> str:
    return (f"| {path} | {queries} | {garments:.1f} | {1000 * np.percentile(latencies, 50):.1f} "
            f"| {1000 * np.percentile(latencies, 99):.1f} | {hits} |")


def _query_garments(catalog, photos: list[Path]) -> tuple[list[float], int, float]:
    """``Catalog.search_garments`` per photo: latencies, photos whose own image is some
    garment's first match, and the mean number of garments."""
    catalog.search_garments(str(photos[0]), k=10)  # warm-up: loads the parser
    latencies, hits, garments = [], 0, 0
    for photo in photos:
        started = time.perf_counter()
        found = catalog.search_garments(str(photo), k=10)
        latencies.append(time.perf_counter() - started)
        hits += any(h.matches and h.matches[0].path == str(photo) for h in found)
        garments += len(found)
    return latencies, hits, garments / len(photos)


def _query_catalog(catalog, photos: list[Path]) -> tuple[list[float], int]:
    catalog.search(str(photos[0]), k=10)  # warm-up: loads nothing new, primes caches
    latencies, hits = [], 0
    for photo in photos:
        started = time.perf_counter()
        matches = catalog.search(str(photo), k=10)
        latencies.append(time.perf_counter() - started)
        hits += bool(matches) and matches[0].path == str(photo)
    return latencies, hits


# -- compressed index on real vectors ---------------------------------------------------
def bench_compressed() -> list[str]:
    """Held-out Luma products (the validation split of configs/vestis-lite0.yaml) query, leave
    one out, a gallery of every Luma and clothing photo; Flat against IVF-PQ."""
    from vestis.models import Encoder

    queries, labels, gallery = _heldout_luma()
    encoder = Encoder.from_name(MODEL)
    vectors = encoder.embed([str(p) for p in gallery])
    position = {str(p): n for n, p in enumerate(gallery)}
    query_rows = np.array([position[str(q)] for q in queries])
    rows = ["| index | held-out Luma R@10 | R@1 | file bytes/vector |", "|---|---:|---:|---:|"]
    for choice in ("Flat", "ivfpq"):
        rows.append(_compressed_row(choice, vectors, query_rows, labels, gallery))
    return [f"{len(queries)} held-out Luma photos (products never trained on, each with another "
            f"view) query {len(gallery)} photos (all Luma + clothing), leave-one-out; the index "
            "trains on these gallery vectors", *rows]


def _heldout_luma() -> tuple[list[Path], dict[str, str], list[Path]]:
    """Held-out Luma photos whose item has another photo, every photo's item id (Luma
    only), and the gallery: all Luma and clothing photos."""
    from vestis.catalog import read_source
    from vestis.train import load_config
    from vestis.train.sources import build_sources

    here = Path.cwd()
    os.chdir(REPO)  # the recipe names its data relative to the repository
    try:
        _, validation = build_sources(load_config(REPO / "configs" / "vestis-lite0.yaml"))
    finally:
        os.chdir(here)
    held_out = {str(Path(s.path).resolve())
                for s in next(split for split in validation if split.name == "luma").samples}
    records = read_source(DATA / "luma" / "catalog.csv")
    labels = {str(Path(r.path).resolve()): r.item_id for r in records}
    counts: dict[str, int] = {}
    for path in held_out:
        counts[labels[path]] = counts.get(labels[path], 0) + 1
    queries = sorted(Path(p) for p in held_out if counts[labels[p]] > 1)
    gallery = [Path(p) for p in labels] + sorted((DATA / "clothing" / "images").glob("*.jpg"))
    return queries, labels, [p.resolve() for p in gallery]


def _compressed_row(choice, vectors, query_rows, labels, gallery) -> str:
    from vestis.catalog.index import FaissIndex, default_search_params, resolve_factory

    factory = resolve_factory(choice, len(vectors), vectors.shape[1])
    index = FaissIndex(vectors.shape[1], factory, default_search_params(factory))
    index.train(vectors)
    index.add(np.arange(len(vectors)), vectors)
    _, found = index.search(vectors[query_rows], 11)
    names = [str(p) for p in gallery]
    r1 = r10 = 0
    for row, hits in zip(query_rows, found, strict=True):
        own = labels[names[row]]
        ranked = [labels.get(names[h]) for h in hits if h != row and h >= 0][:10]
        r1 += bool(ranked) and ranked[0] == own
        r10 += own in ranked
    size = _file_size(index) / len(vectors)
    label = factory if choice == "Flat" else f"{choice}: {factory} ({index.search_params})"
    return f"| {label} | {r10 / len(query_rows):.4f} | {r1 / len(query_rows):.4f} | {size:.0f} |"


# -- report ----------------------------------------------------------------------------
def run(args) -> list[str]:
    only = set(args.only.split(",")) if args.only else {"encoder", "ingest", "search", "e2e",
                                                        "compressed"}
    sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    dim = args.dim or DIM
    command = "python bench/bench_perf.py" + (" --quick" if args.quick else "")
    lines = [SECTION, "", f"Generated by `{command}` on {datetime.date.today()}; {machine()}.", ""]
    if args.note:
        lines += [args.note, ""]
    steps = [
        ("encoder", "### Encoder: torch eager against ONNX Runtime",
         lambda: bench_encoder(args.repeats)),
        ("ingest", "### Ingest: `vestis index FOLDER` (no garment detection)",
         lambda: bench_ingest(_ingest_folders(args.quick), args.repeats)),
        ("search", f"### Search: one query at a time, synthetic vectors of dimension {dim}",
         lambda: bench_search(sizes, dim)),
        ("e2e", "### End to end: a photo in, matches out, 100k catalog",
         lambda: bench_e2e(100_000)),
        ("compressed", "### Compressed index on real vectors", bench_compressed),
    ]
    for key, title, step in steps:
        if key in only:
            print(title, flush=True)
            body = step()
            print("\n".join(body), flush=True)
            lines += [title, "", *body, ""]
    return lines


def _ingest_folders(quick: bool) -> list[Path]:
    folders = [DATA / "luma" / "images"]
    return folders if quick else [*folders, DATA / "clothing" / "images"]


def replace_section(path: Path, section: list[str]) -> None:
    """Put ``section`` in place of the old one (or at the end); other sections stay. Of the
    old section, the subsections (``### ``) this run did not measure are kept."""
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmarks", ""]
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        lines = [*lines, "", *section]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        lines = [*lines[:start], *_merge(lines[start:end], section), *lines[end:]]
    path.write_text("\n".join(lines).rstrip() + "\n")


def _subsections(lines: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    head, parts, title = [], {}, None
    for line in lines:
        if line.startswith("### "):
            title = line
            parts[title] = []
        if title is None:
            head.append(line)
        else:
            parts[title].append(line)
    return head, parts


def _merge(old: list[str], new: list[str]) -> list[str]:
    _, old_parts = _subsections(old)
    head, new_parts = _subsections(new)
    kept = {title: body for title, body in old_parts.items() if title not in new_parts}
    if kept:
        head = [*head, "Subsections not re-run keep their earlier figures: "
                + ", ".join(title.removeprefix("### ") for title in kept) + ".", ""]
    merged = {**old_parts, **new_parts}  # the file's order, new subsections at the end
    return [*head, *[line for body in merged.values() for line in body]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k and 100k vectors only; "
                        "one ingest folder")
    parser.add_argument("--only", help="Comma-separated steps: encoder,ingest,search,e2e,"
                        "compressed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dim", type=int, default=DIM,
                        help="Dimension of the synthetic vectors of the search step.")
    parser.add_argument("--note", help="A line to print under the machine line.")
    parser.add_argument("--update", type=Path, help="Replace this section in a BENCHMARKS.md.")
    args = parser.parse_args()
    section = run(args)
    if args.update:
        replace_section(args.update, section)
        print(f"updated {args.update}")


if __name__ == "__main__":
    main()
