from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def require_data(path: Path) -> Path:
    """*path* under the shared data, or skip when it is missing; under CI (``CI=true``) fail
    instead, so that a broken data path cannot pass as a run of skipped tests."""
    if not path.exists():
        message = f"shared data not found at {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: missing data fails, it is not skipped)")
        pytest.skip(message)
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reads the shared data, directly or through another fixture, does so
    through ``data_dir``: mark it ``data``."""
    for item in items:
        if "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    require_data(DATA / "luma" / "catalog.csv")
    return DATA


@pytest.fixture(scope="session")
def luma_rows(data_dir) -> list[dict[str, str]]:
    with open(data_dir / "luma" / "catalog.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def write_luma_rows(rows, data_dir: Path, out: Path) -> Path:
    """A Luma-format CSV of ``rows`` with absolute image paths."""
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "image": str(data_dir / "luma" / row["image"])})
    return out


def write_luma_subset(rows, data_dir: Path, out: Path, n_products: int) -> Path:
    """A Luma-format CSV (absolute image paths) with every image of the first products."""
    products = sorted({row["product"] for row in rows})[:n_products]
    return write_luma_rows([row for row in rows if row["product"] in products], data_dir, out)


@pytest.fixture(scope="session")
def luma_subset_csv(tmp_path_factory, luma_rows, data_dir) -> Path:
    out = tmp_path_factory.mktemp("luma") / "catalog.csv"
    return write_luma_subset(luma_rows, data_dir, out, n_products=8)


@pytest.fixture(scope="session")
def encoder():
    from vestis.models import Encoder

    return Encoder.from_name("lite0")


def _has_milvus_lite() -> bool:
    try:
        import milvus_lite  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError:
        return False
    return True


#: The stores a behavioural test runs on: the embedded directory and Milvus Lite (skipped
#: where pymilvus and milvus-lite are not installed; ``make test`` installs them).
STORES = ["local", pytest.param("milvus-lite", marks=pytest.mark.skipif(
    not _has_milvus_lite(), reason="pymilvus and milvus-lite are not installed"))]


def catalog_location(store: str, folder: Path, name: str = "cat") -> str | Path:
    """Where a test catalog of that store lives: a directory, or a Milvus Lite file."""
    return folder / name if store == "local" else f"milvus-lite:{folder / name}.db"


@pytest.fixture(params=STORES)
def store(request) -> str:
    return request.param
