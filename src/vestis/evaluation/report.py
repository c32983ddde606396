"""Evaluation reports: metrics JSON, a Markdown summary, a Recall@K plot, the worst queries."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageOps

from vestis.evaluation.datasets import EvalDataset
from vestis.evaluation.metrics import RetrievalResult
from vestis.evaluation.uncertainty import Comparison
from vestis.images import ImageError, crop_box, load_image
from vestis.records import ImageRecord

RECALL_CURVE_MAX_K = 50
THUMBNAIL = 128
BORDER = 5
CAPTION = 14
GAP = 12
CORRECT = (46, 160, 67)
WRONG = (215, 58, 73)
QUERY = (60, 110, 200)
PLACEHOLDER = (170, 170, 170)


def write_report(
    result: RetrievalResult,
    dataset: EvalDataset,
    out_dir: str | Path,
    *,
    model_name: str,
    title: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``metrics.json``, ``recall_at_k.png``, ``worst_queries.png`` and ``report.md``.

    Returns the path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or f"Retrieval evaluation: {dataset.name} with {model_name}"
    write_metrics_json(
        out_dir / "metrics.json", result, dataset, model_name=model_name, extra=extra
    )
    plot_recall_curve(result, out_dir / "recall_at_k.png", title=f"{dataset.name}, {model_name}")
    plot_worst_queries(result, dataset, out_dir / "worst_queries.png")
    report = out_dir / "report.md"
    report.write_text(_markdown(result, dataset, model_name, title, extra), encoding="utf-8")
    return report


def metrics_payload(
    result: RetrievalResult, dataset: EvalDataset, *, model_name: str, extra: dict | None = None
) -> dict:
    """Everything worth keeping about a run, as plain JSON types."""
    return _plain(
        {
            "dataset": dataset.name,
            "protocol": dataset.protocol,
            "model": model_name,
            "n_query_images": len(dataset.queries),
            "n_gallery_images": len(dataset.gallery),
            "metrics": result.metrics,
            "intervals": result.intervals,
            "interval_method": INTERVAL_METHOD if result.intervals else None,
            "recall_at_k": result.recall_curve(RECALL_CURVE_MAX_K),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "extra": extra or {},
        }
    )


def write_metrics_json(
    path: str | Path,
    result: RetrievalResult,
    dataset: EvalDataset,
    *,
    model_name: str,
    extra: dict | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = metrics_payload(result, dataset, model_name=model_name, extra=extra)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def format_table(metrics: dict[str, float],
                 intervals: dict[str, tuple[float, float]] | None = None) -> str:
    """A console table; rates get 4 decimals, counts none; with ``intervals``, a 95 % CI
    column."""
    intervals = intervals or {}
    header = ["metric", "value"] + (["95% CI"] if intervals else [])
    rows = [[name, _format_value(value)] + ([_format_interval(intervals.get(name))]
                                            if intervals else [])
            for name, value in metrics.items()]
    return _aligned([header, *rows])


def _aligned(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(rows[0]), line(["-" * w for w in widths]),
                      *(line(row) for row in rows[1:])])


def _format_interval(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def format_comparison(comparison: Comparison, names: tuple[str, str]) -> str:
    """Each metric for both models, ``a - b`` with its interval, and the rank-1 wins."""
    rows = [["metric", names[0], names[1], "difference", "95% CI", ""]]
    for name, difference in comparison.difference.items():
        rows.append([name, f"{comparison.metrics_a[name]:.4f}",
                     f"{comparison.metrics_b[name]:.4f}", f"{difference:+.4f}",
                     _format_interval(comparison.intervals[name]),
                     "" if comparison.significant(name) else "(within noise)"])
    return "\n".join([
        _aligned(rows),
        "",
        f"{comparison.n_queries} queries; right at rank 1 only with {names[0]}: "
        f"{len(comparison.only_a)}, only with {names[1]}: {len(comparison.only_b)}",
    ])


INTERVAL_METHOD = ("95 % percentile bootstrap over queries (whole items resampled together "
                   "on instance benchmarks), 2000 resamples")


def comparison_payload(comparison: Comparison, result: RetrievalResult, dataset: EvalDataset,
                       names: tuple[str, str]) -> dict:
    def queries(rows: np.ndarray) -> list[str]:
        return [str(dataset.queries[result.query_indices[row]].path) for row in rows]

    return _plain({
        "dataset": dataset.name,
        "protocol": dataset.protocol,
        "models": list(names),
        "n_queries": comparison.n_queries,
        "metrics": {names[0]: comparison.metrics_a, names[1]: comparison.metrics_b},
        "difference": comparison.difference,
        "difference_intervals": comparison.intervals,
        "significant": {name: comparison.significant(name) for name in comparison.difference},
        "interval_method": INTERVAL_METHOD + ", paired (same resamples for both models)",
        "right_at_rank_1_only_with": {names[0]: queries(comparison.only_a),
                                      names[1]: queries(comparison.only_b)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })


def write_comparison_json(path: str | Path, comparison: Comparison, result: RetrievalResult,
                          dataset: EvalDataset, names: tuple[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = comparison_payload(comparison, result, dataset, names)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def write_comparison_report(comparison: Comparison, result: RetrievalResult,
                            dataset: EvalDataset, out_dir: Path, names: tuple[str, str]) -> Path:
    """``comparison.md`` and ``comparison.json`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = write_comparison_json(out_dir / "comparison.json", comparison, result, dataset,
                                    names)
    only = json.loads(payload.read_text())["right_at_rank_1_only_with"]
    lines = [
        f"# {names[0]} against {names[1]} on {dataset.name}",
        "",
        f"{comparison.n_queries} queries ({dataset.protocol}), both models on the same "
        f"queries. Difference: {names[0]} minus {names[1]}, with its {INTERVAL_METHOD}, "
        "paired. A difference whose interval contains 0 is within the noise.",
        "",
        f"| metric | {names[0]} | {names[1]} | difference | 95% CI |",
        "|---|---:|---:|---:|---|",
    ]
    for name, difference in comparison.difference.items():
        marker = "" if comparison.significant(name) else " (within noise)"
        lines.append(f"| {name} | {comparison.metrics_a[name]:.4f} | "
                     f"{comparison.metrics_b[name]:.4f} | {difference:+.4f} | "
                     f"{_format_interval(comparison.intervals[name])}{marker} |")
    for name in names:
        lines += ["", f"## Right at rank 1 only with {name} ({len(only[name])})", ""]
        lines += [f"- `{path}`" for path in only[name]]
    report = out_dir / "comparison.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def plot_recall_curve(
    result: RetrievalResult, path: Path, *, max_k: int = RECALL_CURVE_MAX_K, title: str = ""
) -> Path:
    ks = np.arange(1, max_k + 1)
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(ks, 100 * result.recall_curve(max_k), marker="o", markersize=3)
    axes.set(xlabel="K", ylabel="Recall@K (%)", xlim=(1, max_k), ylim=(0, 100.5))
    axes.set_title(title or "Recall@K", fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


def worst_query_rows(result: RetrievalResult, n_rows: int) -> np.ndarray:
    """Rows of ``result`` with the lowest AP, ties broken by the worst first-positive rank."""
    order = np.lexsort((-result.first_positive_rank, result.average_precision))
    return order[:n_rows]


def plot_worst_queries(
    result: RetrievalResult,
    dataset: EvalDataset,
    path: Path,
    *,
    n_rows: int = 8,
    top_k: int = 5,
) -> Path:
    """A grid: per row a query (blue), then its top results (green correct, red wrong)."""
    rows = worst_query_rows(result, n_rows)
    top_k = min(top_k, result.top_indices.shape[1])
    tile_w, tile_h = THUMBNAIL + 2 * BORDER, THUMBNAIL + 2 * BORDER + CAPTION
    width = tile_w * (1 + top_k) + GAP
    sheet = Image.new("RGB", (width, max(1, len(rows)) * tile_h), "white")
    for row_number, row in enumerate(rows):
        query = dataset.queries[result.query_indices[row]]
        y = row_number * tile_h
        ap, first_hit = result.average_precision[row], result.first_positive_rank[row]
        sheet.paste(_tile(query, QUERY, f"AP {ap:.2f}, 1st hit #{first_hit:g}"), (0, y))
        for rank, gallery_index in enumerate(result.top_indices[row][:top_k], start=1):
            match = dataset.gallery[gallery_index]
            colour = CORRECT if match.item_id == query.item_id else WRONG
            tile = _tile(match, colour, f"#{rank} {match.item_id}")
            sheet.paste(tile, (GAP + rank * tile_w, y))
    sheet.save(path)
    return path


def _tile(sample: ImageRecord, colour: tuple[int, int, int], caption: str) -> Image.Image:
    tile = Image.new("RGB", (THUMBNAIL + 2 * BORDER, THUMBNAIL + 2 * BORDER + CAPTION), "white")
    tile.paste(colour, (0, 0, tile.width, THUMBNAIL + 2 * BORDER))
    tile.paste(_thumbnail(sample), (BORDER, BORDER))
    draw = ImageDraw.Draw(tile)
    while len(caption) > 1 and draw.textlength(caption) > tile.width - BORDER:
        caption = caption[:-1]
    draw.text((BORDER, THUMBNAIL + 2 * BORDER + 1), caption, fill=(0, 0, 0))
    return tile


def _thumbnail(sample: ImageRecord) -> Image.Image:
    canvas = Image.new("RGB", (THUMBNAIL, THUMBNAIL), "white")
    # Draft decoding shrinks the image, which would move a box: only use it without one.
    draft_size = THUMBNAIL if sample.box is None else None
    try:
        image = crop_box(load_image(sample.path, draft_size=draft_size), sample.box)
    except (ImageError, OSError, ValueError):
        canvas.paste(PLACEHOLDER, (0, 0, THUMBNAIL, THUMBNAIL))
        return canvas
    image = ImageOps.contain(image, (THUMBNAIL, THUMBNAIL))
    canvas.paste(image, ((THUMBNAIL - image.width) // 2, (THUMBNAIL - image.height) // 2))
    return canvas


def _markdown(result, dataset: EvalDataset, model_name: str, title: str, extra) -> str:
    metrics = result.metrics
    lines = [
        f"# {title}",
        "",
        f"- **Dataset:** {dataset.name}",
        f"- **Protocol:** {dataset.protocol}",
        f"- **Model:** {model_name}",
        f"- **Queries evaluated:** {metrics['n_queries']} of {len(dataset.queries)} "
        f"({metrics['n_queries_skipped']} skipped: no positive in the gallery)",
        f"- **Gallery:** {metrics['n_gallery']} images",
        "",
        "## Metrics",
        "",
        "Recall@K is a hit rate: a query counts when at least one correct item is in its top K. "
        "Ties count at their expected value over random orders of the tied images.",
        "",
        f"Intervals: {INTERVAL_METHOD}." if result.intervals else "",
        "",
        "| Metric | Value | 95% CI |",
        "|---|---:|---|",
    ]
    lines += [f"| {name} | {_format_value(value)} | "
              f"{_format_interval(result.intervals.get(name))} |"
              for name, value in metrics.items()]
    lines += [
        "",
        "## Recall@K",
        "",
        "![Recall@K for K = 1..50](recall_at_k.png)",
        "",
        "## Worst queries",
        "",
        "Each row is one of the queries with the lowest average precision (blue border, "
        "captioned with its AP and the rank of its first correct result), followed by its top 5 "
        "results: green when the result is the same item, red when it is not.",
        "",
        "![Worst queries](worst_queries.png)",
        "",
    ]
    if extra:
        lines += ["## Details", "", "| Key | Value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in _plain(extra).items()]
        lines.append("")
    return "\n".join(lines)


def _format_value(value) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.4f}"


def _plain(value):
    """Convert numpy scalars and arrays (recursively) to plain JSON types."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(item) for item in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    return value
