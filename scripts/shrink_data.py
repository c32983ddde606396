"""Copy training sources of ``../shared/data`` with their photos shrunk, same layout.

    python scripts/shrink_data.py OUT [--sets luma,clothing] [--max-side 288] [--quality 85]

For runs on a machine the full-size photos cannot travel to (a lent GPU takes at most
64 MiB): each photo is resized so that its longer side is at most ``--max-side`` and saved
as WebP, and every CSV of the set is copied with its ``image`` column pointing at the new
files. Recipes read the copy through ``bench/kfold.py --data OUT`` or ``bench/serving_cv.py
--data OUT``. Shrinking changes the pixels the models see: figures from a copy are labelled
as such and not mixed with full-size ones.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shrink_photo(source: Path, target: Path, max_side: int, quality: int) -> None:
    with Image.open(source) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, "WEBP", quality=quality, method=6)


def shrink_set(name: str, out: Path, max_side: int, quality: int) -> int:
    """Shrink every photo named by the set's CSVs; returns the bytes written."""
    folder, written = DATA / name, 0
    for table in sorted(folder.glob("*.csv")):
        with table.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows, columns = list(reader), reader.fieldnames or []
        if "image" in columns:
            for row in tqdm(rows, desc=f"{name}/{table.name}", unit="img"):
                new = Path(row["image"]).with_suffix(".webp")
                target = out / name / new
                if not target.exists():
                    shrink_photo(folder / row["image"], target, max_side, quality)
                written += target.stat().st_size
                row["image"] = str(new)
        (out / name).mkdir(parents=True, exist_ok=True)
        with (out / name / table.name).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sets", default="luma,clothing")
    parser.add_argument("--max-side", type=int, default=288)
    parser.add_argument("--quality", type=int, default=85)
    args = parser.parse_args()
    total = sum(shrink_set(name, args.out, args.max_side, args.quality)
                for name in args.sets.split(","))
    print(f"wrote {total / 2**20:.1f} MiB of photos under {args.out}")


if __name__ == "__main__":
    main()
