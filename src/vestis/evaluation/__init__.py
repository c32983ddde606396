"""Evaluate retrieval models on clothing benchmarks: datasets, metrics and reports."""

from vestis.evaluation.datasets import EvalDataset, load_dataset
from vestis.evaluation.metrics import RetrievalResult, retrieval_metrics
from vestis.evaluation.report import format_table, write_report
from vestis.evaluation.run import compare, evaluate
from vestis.evaluation.uncertainty import (
    Comparison,
    bootstrap_intervals,
    compare_results,
    compare_values,
)

__all__ = [
    "Comparison",
    "EvalDataset",
    "RetrievalResult",
    "bootstrap_intervals",
    "compare",
    "compare_results",
    "compare_values",
    "evaluate",
    "format_table",
    "load_dataset",
    "retrieval_metrics",
    "write_report",
]
