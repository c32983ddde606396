"""Benchmark ``vestis.evaluation.retrieval_metrics`` on synthetic clustered embeddings.

Usage::

    python bench/bench_eval.py [--queries 10000 --gallery 10000 --dim 512 --repeats 3]

Two label sets are timed: instance-style (about 4 images per item, query-gallery) and
category-style (few classes with hundreds of positives per query, leave-one-out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from vestis.evaluation import retrieval_metrics


def clustered_embeddings(
    labels: np.ndarray, n_classes: int, dim: int, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Unit vectors scattered around one random centre per class."""
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32)
    vectors = centres[labels] + noise * rng.standard_normal((len(labels), dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def time_metrics(repeats: int, *args, **kwargs):
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = retrieval_metrics(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
    return result, seconds


def report(title: str, n_queries: int, result, seconds: list[float]) -> None:
    median = statistics.median(seconds)
    metrics = result.metrics
    print(title)
    print(
        f"  median {median:.3f} s over {len(seconds)} runs "
        f"(min {min(seconds):.3f}, max {max(seconds):.3f})  ->  {n_queries / median:,.0f} queries/s"
    )
    print(
        f"  R@1 {metrics['R@1']:.3f}  R@10 {metrics['R@10']:.3f}  mAP {metrics['mAP']:.3f}  "
        f"MAP@R {metrics['MAP@R']:.3f}  (evaluated {metrics['n_queries']}, "
        f"skipped {metrics['n_queries_skipped']})"
    )


def bench_instance(args, rng: np.random.Generator) -> None:
    n_classes = max(1, round(args.gallery / args.images_per_item))
    gallery_labels = rng.integers(0, n_classes, args.gallery)
    query_labels = rng.choice(gallery_labels, args.queries)
    embeddings = clustered_embeddings(
        np.concatenate([query_labels, gallery_labels]), n_classes, args.dim, args.noise, rng
    )
    queries, gallery = embeddings[: args.queries], embeddings[args.queries :]
    result, seconds = time_metrics(
        args.repeats, queries, query_labels, gallery, gallery_labels, block_size=args.block_size
    )
    report(
        f"instance labels: {args.queries} queries x {args.gallery} gallery, dim {args.dim}, "
        f"{n_classes} items (~{args.gallery / n_classes:.1f} gallery images per item)",
        args.queries,
        result,
        seconds,
    )


def bench_category(args, rng: np.random.Generator) -> None:
    labels = rng.integers(0, args.category_classes, args.category_images)
    embeddings = clustered_embeddings(
        labels, args.category_classes, args.dim, args.category_noise, rng
    )
    result, seconds = time_metrics(
        args.repeats,
        embeddings,
        labels,
        embeddings,
        labels,
        query_gallery_index=np.arange(len(labels)),
        block_size=args.block_size,
    )
    report(
        f"category labels: {args.category_images} images leave-one-out, dim {args.dim}, "
        f"{args.category_classes} classes "
        f"(~{args.category_images / args.category_classes - 1:.0f} positives per query)",
        args.category_images,
        result,
        seconds,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images-per-item", type=float, default=4.0)
    parser.add_argument("--category-images", type=int, default=4_000)
    parser.add_argument("--category-classes", type=int, default=20)
    parser.add_argument("--noise", type=float, default=2.5, help="within-item spread")
    parser.add_argument("--category-noise", type=float, default=5.0, help="within-class spread")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    print(
        f"retrieval_metrics benchmark: {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}"
    )
    bench_instance(args, rng)
    bench_category(args, rng)


if __name__ == "__main__":
    main()
