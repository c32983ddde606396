from __future__ import annotations

import csv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "luma" / "catalog.csv").exists():
        pytest.skip(f"real photos not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def luma_rows(data_dir) -> list[dict[str, str]]:
    with open(data_dir / "luma" / "catalog.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def write_luma_subset(rows, data_dir: Path, out: Path, n_products: int) -> Path:
    """A Luma-format CSV (absolute image paths) with every image of the first products."""
    products = sorted({row["product"] for row in rows})[:n_products]
    chosen = [row for row in rows if row["product"] in products]
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in chosen:
            writer.writerow({**row, "image": str(data_dir / "luma" / row["image"])})
    return out


@pytest.fixture(scope="session")
def luma_subset_csv(tmp_path_factory, luma_rows, data_dir) -> Path:
    out = tmp_path_factory.mktemp("luma") / "catalog.csv"
    return write_luma_subset(luma_rows, data_dir, out, n_products=8)


@pytest.fixture(scope="session")
def encoder():
    from vestis.models import Encoder

    return Encoder.from_name("lite0")
