"""Read what to ingest: a folder of photos, a CSV, or a list of paths."""

from __future__ import annotations

import csv
import io
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from vestis.images import UNSUPPORTED_SUFFIXES, Box, is_image_path, is_uri
from vestis.records import ImageRecord

RESERVED_COLUMNS = ("image", "item_id")
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
#: A box coordinate is a pixel position: 0 to this (far above any decodable image).
MAX_COORDINATE = 2**31 - 1


def read_source(source: str | Path | Sequence[str | Path | ImageRecord]) -> list[ImageRecord]:
    """Records from a folder, a CSV file, or a list of paths or records."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_dir():
            return read_folder(path)
        if path.is_file() and path.suffix.lower() == ".csv":
            return read_csv(path)
        if path.is_file():
            return [record_for_path(path)]
        raise FileNotFoundError(f"{path}: no such folder, CSV or image file")
    return [
        item if isinstance(item, ImageRecord) else record_for_path(Path(item)) for item in source
    ]


def record_for_path(path: Path) -> ImageRecord:
    return ImageRecord(path=path.resolve(), item_id=clean_item_id(path.stem))


def clean_item_id(name: str) -> str:
    """An item id made from a file or folder name: control characters (a newline, a tab)
    become ``_``, so an id is always one printable line."""
    return "".join("_" if unicodedata.category(char) == "Cc" else char for char in name)


def read_folder(folder: Path) -> list[ImageRecord]:
    """``folder/<item_id>/*.jpg`` names items by sub-folder; files at the top by their stem."""
    folder = folder.resolve()
    records = []
    for path in sorted(folder.rglob("*")):
        wanted = is_image_path(path) or path.suffix.lower() in UNSUPPORTED_SUFFIXES
        if not path.is_file() or not wanted or _is_hidden(path, folder):
            continue  # HEIC/AVIF files are kept: the decoder reports each one, never silent
        relative = path.relative_to(folder)
        item_id = relative.parts[0] if len(relative.parts) > 1 else path.stem
        records.append(ImageRecord(path=path, item_id=clean_item_id(item_id)))
    return records


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def read_csv(csv_path: Path) -> list[ImageRecord]:
    """A CSV with ``image`` and ``item_id`` columns (paths relative to the CSV, or URIs such
    as ``file:///photos/a.jpg`` or ``s3://bucket/a.jpg``, kept as strings and read through
    fsspec) and any metadata columns. Optional ``x1,y1,x2,y2`` columns give a garment box.

    Errors name the file and line: text that is not UTF-8, a bad box, an id with a control
    character, or two rows for the same image (and box) that disagree on its item or
    metadata (identical rows are fine: one is kept)."""
    csv_path = csv_path.resolve()
    reader = csv.DictReader(io.StringIO(_utf8_text(csv_path), newline=""))
    columns = reader.fieldnames or []
    missing = [name for name in RESERVED_COLUMNS if name not in columns]
    if missing:
        raise ValueError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; "
            f"the CSV needs 'image,item_id' (found: {', '.join(columns) or 'no header'})"
        )
    records, first_line = [], {}
    for row in reader:
        line = reader.line_num  # the row's last physical line
        record = _csv_record(row, csv_path, line)
        key = (str(record.path), record.box)
        if key in first_line:
            earlier_line, earlier = first_line[key]
            if (earlier.item_id, earlier.metadata) != (record.item_id, record.metadata):
                raise ValueError(f"{csv_path}:{line}: image {row['image']!r} is also on line "
                                 f"{earlier_line} with a different item_id or metadata; keep "
                                 "one row")
            continue
        first_line[key] = (line, record)
        records.append(record)
    return records


def _utf8_text(csv_path: Path) -> str:
    data = csv_path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{csv_path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                         "save the CSV as UTF-8") from None


def _csv_record(row: dict[str, str], csv_path: Path, line: int) -> ImageRecord:
    image, item_id = (row.get("image") or "").strip(), (row.get("item_id") or "").strip()
    if not image or not item_id:
        raise ValueError(f"{csv_path}:{line}: empty 'image' or 'item_id'")
    if clean_item_id(item_id) != item_id:
        raise ValueError(f"{csv_path}:{line}: item_id {item_id!r} has a control character "
                         "(a newline or tab)")
    if is_uri(image):
        path: Path | str = image
    else:
        path = Path(image).expanduser()
        if not path.is_absolute():
            path = csv_path.parent / path
    metadata = {
        key: value
        for key, value in row.items()
        if key
        and key not in RESERVED_COLUMNS
        and key not in BOX_COLUMNS
        and value not in (None, "")
    }
    return ImageRecord(
        path=path, item_id=item_id, metadata=metadata, box=_csv_box(row, csv_path, line)
    )


def _csv_box(row: dict[str, str], csv_path: Path, line: int) -> Box | None:
    values = [row.get(name) for name in BOX_COLUMNS]
    if all(value in (None, "") for value in values):
        return None
    try:
        x1, y1, x2, y2 = (int(float(value)) for value in values)
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e309 is infinite
        raise ValueError(f"{csv_path}:{line}: bad box {values}: four numbers x1,y1,x2,y2 "
                         "are needed") from None
    if not (0 <= x1 < x2 <= MAX_COORDINATE and 0 <= y1 < y2 <= MAX_COORDINATE):
        raise ValueError(f"{csv_path}:{line}: bad box {values}: pixel positions with "
                         f"0 <= x1 < x2 and 0 <= y1 < y2 (at most {MAX_COORDINATE}) are needed")
    return (x1, y1, x2, y2)


def unique_records(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    seen, unique = set(), []
    for record in records:
        key = (str(record.path), record.item_id, record.box)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique
