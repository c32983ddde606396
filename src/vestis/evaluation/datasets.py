"""Retrieval benchmarks as query and gallery lists: readers and protocols.

Two images match when their ``item_id`` is equal. Readers only list files; they never open
images. Supported formats (``load_dataset(source, format=None)`` detects them):

``csv``
    A CSV with the columns ``image,item_id`` (others are ignored, so the Luma
    ``catalog.csv`` works as is), or ``image,label`` (the clothing format: images match by
    category; rows labelled ``Not sure``, ``Skip`` or ``Other`` are not ground truth and are
    left out); image paths are relative to the CSV's folder. Optional
    box columns ``x1,y1,x2,y2`` (empty cells mean no box). Protocols:

    * no ``split`` column: **leave-one-out**. Every image whose item has at least two images
      is a query against all the other images; the gallery is every image, single-image
      items included as distractors.
    * a ``split`` column with ``query`` and ``gallery`` values: those rows are the queries
      and the gallery (other values, such as ``train``, are ignored).
    * a ``split`` column without ``query`` values: leave-one-out among the rows whose split
      equals the ``split`` argument.

``inshop``
    DeepFashion In-shop Clothes Retrieval: ``list_eval_partition.txt`` (a count line, the
    header ``image_name item_id evaluation_status``, then rows) and the optional
    ``list_bbox_inshop.txt``. Files are looked up in the root, ``Eval/`` and ``Anno/``;
    images are resolved against the root or ``Img/``. ``split="test"`` gives the official
    query/gallery split; ``split="train"`` gives leave-one-out over the training images.

``c2s``
    DeepFashion Consumer-to-shop: ``list_eval_partition.txt`` with the header
    ``image_pair_name_1 image_pair_name_2 item_id evaluation_status`` and the optional
    ``list_bbox_consumer2shop.txt``. Queries are the consumer images (``image_pair_name_1``)
    of the chosen split (``train``, ``val`` or ``test``), the gallery its shop images.

``df2``
    DeepFashion2 clothes retrieval, with the ground-truth boxes (no detector):

    * ``query_gt.json`` / ``gallery_gt.json`` (also ``val_query.json`` / ``val_gallery.json``
      and ``test_*``), as published in switchablenorms/DeepFashion2: a JSON list of
      ``{"query_image_id" | "gallery_image_id": int, "pair_id", "style", "bbox":
      [x1, y1, x2, y2]}``. Integer ids name six-digit files (``000001.jpg``); ``image_id``,
      ``image_name`` or ``file_name`` (a path) are accepted as well.
    * the same files as a dict of per-image annotations, ``{image: {"pair_id": ..., "item1":
      {"style": ..., "bounding_box": [...]}, ...}}``;
    * a folder with ``annos/*.json`` per-image annotations: images whose ``source`` is
      ``user`` give the queries, ``shop`` the gallery.

    Images are looked up in the folder, ``image/`` and ``images/``. Two boxes match when
    they have the same ``pair_id`` and the same ``style`` greater than 0 (item id
    ``"{pair_id}-{style}"``). As in the official protocol, query boxes of style 0 are dropped;
    gallery boxes of style 0 stay as distractors, each with an item id of its own.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vestis.records import ImageRecord

BBox = tuple[int, int, int, int]
FORMATS = ("csv", "inshop", "c2s", "df2")
PROTOCOLS = ("leave-one-out", "query-gallery")

# Which column says that two images match: the item, or (clothing format) the category label.
LABEL_COLUMNS = ("item_id", "label")
#: Clothing-format labels that are not ground truth: rows with them are left out.
UNUSABLE_LABELS = frozenset({"Not sure", "Skip", "Other"})
INSHOP_HEADER = ("image_name", "item_id", "evaluation_status")
C2S_HEADER = ("image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status")
PARTITION_FILE = "list_eval_partition.txt"
DF2_FILE_PAIRS = (
    ("query_gt.json", "gallery_gt.json"),
    ("val_query.json", "val_gallery.json"),
    ("test_query.json", "test_gallery.json"),
)


@dataclass
class EvalDataset:
    """Queries ranked against a gallery; ``query_gallery_index[i] = j`` means query i IS
    gallery item j (leave-one-out), ``-1`` that it is not in the gallery."""

    name: str
    queries: list[ImageRecord]
    gallery: list[ImageRecord]
    query_gallery_index: np.ndarray | None
    protocol: str  # "leave-one-out" | "query-gallery"
    # "item": item_id names a product (instance retrieval; its views are resampled together
    # by the bootstrap); "category": it names a class (the clothing format's label).
    match: str = "item"

    def __post_init__(self) -> None:
        if not self.queries:
            raise ValueError(f"dataset {self.name!r} has no queries")
        if not self.gallery:
            raise ValueError(f"dataset {self.name!r} has an empty gallery")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.match not in ("item", "category"):
            raise ValueError(f"match must be 'item' or 'category', got {self.match!r}")
        if self.query_gallery_index is not None:
            index = np.asarray(self.query_gallery_index, dtype=np.int64)
            if index.shape != (len(self.queries),):
                raise ValueError(
                    f"query_gallery_index has shape {index.shape}, expected ({len(self.queries)},)"
                )
            self.query_gallery_index = index

    @property
    def query_ids(self) -> list[str]:
        return [sample.item_id for sample in self.queries]

    @property
    def gallery_ids(self) -> list[str]:
        return [sample.item_id for sample in self.gallery]

    def summary(self) -> str:
        n_items = len(set(self.gallery_ids) | set(self.query_ids))
        return (
            f"{self.name}: {len(self.queries)} queries, {len(self.gallery)} gallery images, "
            f"{n_items} items ({self.protocol})"
        )


def load_dataset(
    source: str | Path, format: str | None = None, *, split: str = "test"
) -> EvalDataset:
    """Read a retrieval benchmark; ``format=None`` detects it (see the module docstring)."""
    source = Path(source).expanduser().absolute()
    if not source.exists():
        raise FileNotFoundError(f"dataset not found: {source}")
    format = format or detect_format(source)
    readers: dict[str, Callable[..., EvalDataset]] = {
        "csv": read_csv,
        "inshop": read_inshop,
        "c2s": read_consumer_to_shop,
        "df2": read_deepfashion2,
    }
    if format not in readers:
        raise ValueError(f"unknown dataset format {format!r}; choose one of {FORMATS}")
    return readers[format](source, split=split)


def detect_format(source: Path) -> str:
    """Guess the format of a dataset file or folder."""
    if source.is_file():
        if source.suffix.lower() == ".csv":
            return "csv"
        if source.suffix.lower() == ".json":
            return "df2"
        return _partition_format(source)
    partition = _find_file(source, PARTITION_FILE)
    if partition is not None:
        return _partition_format(partition)
    if _df2_json_pair(source) is not None or (source / "annos").is_dir():
        return "df2"
    if _folder_csv(source) is not None:
        return "csv"
    raise ValueError(
        f"cannot detect the dataset format of {source}: expected a .csv file, a "
        f"{PARTITION_FILE} (DeepFashion), or query_gt.json/gallery_gt.json (DeepFashion2)"
    )


# --- csv ---------------------------------------------------------------------------------


def read_csv(source: Path, *, split: str = "test") -> EvalDataset:
    dataset = _read_csv_protocol(source, split)
    if _label_column(source) == "label":
        dataset.match = "category"
    return dataset


def _label_column(source: Path) -> str:
    path = source if source.is_file() else _folder_csv(source)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        columns = csv.DictReader(handle).fieldnames or []
    return next(column for column in LABEL_COLUMNS if column in columns)


def _read_csv_protocol(source: Path, split: str) -> EvalDataset:
    path = source if source.is_file() else _folder_csv(source)
    if path is None:
        raise FileNotFoundError(f"no catalog.csv (or single .csv file) in {source}")
    rows = [(line, row) for line, row in _csv_rows(path) if not _unusable(row)]
    if not rows:
        raise ValueError(f"{path}: every row's label is one of {sorted(UNUSABLE_LABELS)}")
    folder = path.parent
    samples = [_csv_sample(row, folder, path, line) for line, row in rows]
    name = f"{path.parent.name}/{path.stem}"
    if "split" not in rows[0][1]:
        return leave_one_out(name, samples)
    splits = [(row.get("split") or "").strip().lower() for _, row in rows]
    if "query" in splits:
        return _query_gallery_split(name, samples, splits, path)
    chosen = [
        sample for sample, value in zip(samples, splits, strict=True) if value == split.lower()
    ]
    if not chosen:
        raise ValueError(
            f"{path}: no rows with split {split!r} (found {sorted(set(splits))}); use "
            "'query'/'gallery' values, or pick one of the present splits"
        )
    return leave_one_out(f"{name}:{split}", chosen)


def _folder_csv(folder: Path) -> Path | None:
    if (folder / "catalog.csv").is_file():
        return folder / "catalog.csv"
    candidates = sorted(folder.glob("*.csv"))
    return candidates[0] if len(candidates) == 1 else None


def _csv_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "image" not in columns or not any(c in columns for c in LABEL_COLUMNS):
            raise ValueError(
                f"{path}: needs an image column and one of {LABEL_COLUMNS}; found {columns}"
            )
        box_columns = [column for column in ("x1", "y1", "x2", "y2") if column in columns]
        if box_columns and len(box_columns) != 4:
            raise ValueError(f"{path}: box columns need all of x1,y1,x2,y2; found {box_columns}")
        rows = [(reader.line_num, row) for row in reader]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _unusable(row: dict[str, str]) -> bool:
    return "item_id" not in row and (row.get("label") or "").strip() in UNUSABLE_LABELS


def _csv_sample(row: dict[str, str], folder: Path, path: Path, line: int) -> ImageRecord:
    image = (row.get("image") or "").strip()
    column = next(c for c in LABEL_COLUMNS if c in row)
    item_id = (row.get(column) or "").strip()
    if not image or not item_id:
        raise ValueError(f"{path}, line {line}: empty image or {column}")
    box_cells = [(row.get(column) or "").strip() for column in ("x1", "y1", "x2", "y2")]
    bbox = _parse_box(box_cells, f"{path}, line {line}") if any(box_cells) else None
    category = (row.get("category") or "").strip() or (item_id if column == "label" else None)
    return ImageRecord(folder / image, item_id, bbox, category)


def _query_gallery_split(name, samples, splits, path) -> EvalDataset:
    queries = [sample for sample, value in zip(samples, splits, strict=True) if value == "query"]
    gallery = [sample for sample, value in zip(samples, splits, strict=True) if value == "gallery"]
    if not gallery:
        raise ValueError(f"{path}: has 'query' rows but no 'gallery' rows")
    return EvalDataset(name, queries, gallery, None, "query-gallery")


def leave_one_out(name: str, samples: list[ImageRecord]) -> EvalDataset:
    """Every sample whose item has another sample is a query against all the others."""
    counts = Counter(sample.item_id for sample in samples)
    rows = [i for i, sample in enumerate(samples) if counts[sample.item_id] >= 2]
    if not rows:
        raise ValueError(f"{name}: no item has two or more images, so there is no query")
    queries = [samples[i] for i in rows]
    return EvalDataset(name, queries, list(samples), np.asarray(rows), "leave-one-out")


# --- DeepFashion In-shop and Consumer-to-shop --------------------------------------------


def read_inshop(source: Path, *, split: str = "test") -> EvalDataset:
    partition = _require_partition(source)
    root = _dataset_root(partition)
    rows = read_listing(partition, INSHOP_HEADER)
    boxes = _optional_boxes(root, partition, "list_bbox_inshop.txt")
    image_root = _image_root(root, rows[0][0])

    def sample(name: str, item: str) -> ImageRecord:
        return ImageRecord(image_root / name, item, boxes.get(name))

    if split == "train":
        train = [sample(name, item) for name, item, status in rows if status == "train"]
        return leave_one_out("deepfashion-inshop:train", train)
    if split != "test":
        raise ValueError(
            f"In-shop has the splits 'test' (query/gallery) and 'train', not {split!r}"
        )
    queries = [sample(name, item) for name, item, status in rows if status == "query"]
    gallery = [sample(name, item) for name, item, status in rows if status == "gallery"]
    if not queries or not gallery:
        raise ValueError(f"{partition}: needs rows with the status 'query' and 'gallery'")
    return EvalDataset("deepfashion-inshop", queries, gallery, None, "query-gallery")


def read_consumer_to_shop(source: Path, *, split: str = "test") -> EvalDataset:
    partition = _require_partition(source)
    root = _dataset_root(partition)
    rows = [row for row in read_listing(partition, C2S_HEADER) if row[3] == split]
    if not rows:
        raise ValueError(f"{partition}: no pairs with evaluation_status {split!r}")
    boxes = _optional_boxes(root, partition, "list_bbox_consumer2shop.txt")
    image_root = _image_root(root, rows[0][0])
    # An image paired with two items is a query (or gallery entry) for each of them.
    consumer = dict.fromkeys((name, item) for name, _, item, _ in rows)
    shop = dict.fromkeys((name, item) for _, name, item, _ in rows)
    queries = [ImageRecord(image_root / name, item, boxes.get(name)) for name, item in consumer]
    gallery = [ImageRecord(image_root / name, item, boxes.get(name)) for name, item in shop]
    return EvalDataset(f"deepfashion-c2s:{split}", queries, gallery, None, "query-gallery")


def read_listing(path: Path, header: Iterable[str]) -> list[tuple[str, ...]]:
    """Rows of a DeepFashion listing: a count line, a header line, then rows."""
    header = tuple(header)
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise ValueError(f"{path}: line 1 must be the number of rows")
    found = tuple(lines[1].split())
    if found != header:
        raise ValueError(f"{path}: line 2 must be the header {' '.join(header)!r}, got {found}")
    rows = []
    for number, line in enumerate(lines[2:], start=3):
        fields = tuple(line.split())
        if not fields:
            continue
        if len(fields) != len(header):
            raise ValueError(f"{path}, line {number}: expected {len(header)} fields: {line!r}")
        rows.append(fields)
    if len(rows) != int(lines[0]):
        raise ValueError(f"{path}: line 1 announces {lines[0].strip()} rows, found {len(rows)}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_box_listing(path: Path) -> dict[str, BBox]:
    """``image_name -> (x1, y1, x2, y2)`` from a DeepFashion ``list_bbox_*.txt`` file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[1].split() if len(lines) > 1 else []
    wanted = ("image_name", "x_1", "y_1", "x_2", "y_2")
    if any(column not in header for column in wanted):
        raise ValueError(f"{path}: line 2 must be a header with the columns {wanted}")
    columns = [header.index(column) for column in wanted]
    boxes = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(header):
            raise ValueError(f"{path}, line {number}: expected {len(header)} fields: {line!r}")
        name, *coords = (fields[i] for i in columns)
        boxes[name] = _parse_box(coords, f"{path}, line {number}")
    return boxes


def _partition_format(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()[:2]
    header = tuple(lines[1].split()) if len(lines) == 2 else ()
    if header == C2S_HEADER:
        return "c2s"
    if header == INSHOP_HEADER:
        return "inshop"
    raise ValueError(
        f"{path}: unknown header {header}; expected {' '.join(INSHOP_HEADER)!r} (In-shop) "
        f"or {' '.join(C2S_HEADER)!r} (Consumer-to-shop)"
    )


def _require_partition(source: Path) -> Path:
    partition = source if source.is_file() else _find_file(source, PARTITION_FILE)
    if partition is None:
        raise FileNotFoundError(f"no {PARTITION_FILE} in {source}, {source}/Eval or {source}/Anno")
    return partition


def _find_file(root: Path, name: str) -> Path | None:
    for folder in (root, root / "Eval", root / "Anno"):
        if (folder / name).is_file():
            return folder / name
    return None


def _dataset_root(annotation: Path) -> Path:
    folder = annotation.parent
    return folder.parent if folder.name in ("Eval", "Anno") else folder


def _optional_boxes(root: Path, partition: Path, name: str) -> dict[str, BBox]:
    path = _find_file(root, name)
    if path is None and (partition.parent / name).is_file():
        path = partition.parent / name
    return read_box_listing(path) if path is not None else {}


def _image_root(root: Path, first_image: str) -> Path:
    """The root or ``Img/``: whichever holds the images (``Img/`` when neither does yet)."""
    for candidate in (root, root / "Img"):
        if (candidate / first_image).exists():
            return candidate
    return root / "Img" if (root / "Img").is_dir() else root


# --- DeepFashion2 -------------------------------------------------------------------------


def read_deepfashion2(source: Path, *, split: str = "test") -> EvalDataset:
    folder = source.parent if source.is_file() else source
    if source.is_file():
        query_file, gallery_file = _df2_partner(source)
    else:
        pair = _df2_json_pair(source)
        if pair is None:
            if (source / "annos").is_dir():
                return _df2_from_annos(source)
            raise FileNotFoundError(f"no query_gt.json/gallery_gt.json or annos/ in {source}")
        query_file, gallery_file = pair
    query_boxes = _df2_boxes(_load_json(query_file), query_file, "query")
    gallery_boxes = _df2_boxes(_load_json(gallery_file), gallery_file, "gallery")
    return _df2_dataset(f"deepfashion2:{query_file.stem}", folder, query_boxes, gallery_boxes)


def _df2_json_pair(folder: Path) -> tuple[Path, Path] | None:
    for query_name, gallery_name in DF2_FILE_PAIRS:
        if (folder / query_name).is_file() and (folder / gallery_name).is_file():
            return folder / query_name, folder / gallery_name
    return None


def _df2_partner(path: Path) -> tuple[Path, Path]:
    name = path.name
    if "query" in name:
        partner = path.with_name(name.replace("query", "gallery"))
        query_file, gallery_file = path, partner
    elif "gallery" in name:
        partner = path.with_name(name.replace("gallery", "query"))
        query_file, gallery_file = partner, path
    else:
        raise ValueError(f"{path}: a DeepFashion2 file name must contain 'query' or 'gallery'")
    if not partner.is_file():
        raise FileNotFoundError(f"{path} needs its partner file {partner}")
    return query_file, gallery_file


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc


# A DeepFashion2 box before it gets a path: (image reference, pair_id, style, bbox).
_Df2Box = tuple[str, int, int, BBox]


def _df2_boxes(data, path: Path, role: str) -> list[_Df2Box]:
    if isinstance(data, list):
        return [_df2_record(record, path, role, i) for i, record in enumerate(data)]
    if isinstance(data, dict):
        boxes = []
        for image, annotation in data.items():
            boxes.extend(_df2_image_items(annotation, image, f"{path}, image {image!r}"))
        return boxes
    raise ValueError(f"{path}: expected a JSON list of boxes or a dict of per-image annotations")


def _df2_record(record, path: Path, role: str, index: int) -> _Df2Box:
    where = f"{path}, entry {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    keys = (f"{role}_image_id", "image_id", "image_name", "file_name")
    image = next((record[key] for key in keys if key in record), None)
    if image is None:
        raise ValueError(f"{where}: no image reference (one of {keys})")
    box = record.get("bbox", record.get("bounding_box"))
    return (_df2_image_name(image), *_df2_identity(record, where), _parse_box(box, where))


def _df2_image_items(annotation, image, where: str) -> list[_Df2Box]:
    if not isinstance(annotation, dict) or "pair_id" not in annotation:
        raise ValueError(f"{where}: expected a per-image annotation with 'pair_id'")
    items = [key for key in annotation if key.startswith("item")]
    boxes = []
    for key in sorted(items, key=lambda key: int(key[4:]) if key[4:].isdigit() else 0):
        if not isinstance(annotation[key], dict):
            raise ValueError(f"{where}, {key}: expected an object with 'style' and 'bounding_box'")
        item = {"pair_id": annotation["pair_id"], **annotation[key]}
        box = item.get("bounding_box", item.get("bbox"))
        identity = _df2_identity(item, f"{where}, {key}")
        boxes.append((_df2_image_name(image), *identity, _parse_box(box, f"{where}, {key}")))
    return boxes


def _df2_identity(record: dict, where: str) -> tuple[int, int]:
    try:
        return int(record["pair_id"]), int(record["style"])
    except KeyError as exc:
        raise ValueError(f"{where}: missing {exc.args[0]!r}") from None
    except (TypeError, ValueError):
        raise ValueError(f"{where}: pair_id and style must be integers") from None


def _df2_image_name(image) -> str:
    if isinstance(image, int) or (isinstance(image, str) and image.isdigit()):
        return f"{int(image):06d}.jpg"
    return str(image)


def _df2_from_annos(folder: Path) -> EvalDataset:
    queries, gallery = [], []
    for path in sorted((folder / "annos").glob("*.json")):
        annotation = _load_json(path)
        source = annotation.get("source") if isinstance(annotation, dict) else None
        if source not in ("user", "shop"):
            raise ValueError(f"{path}: 'source' must be 'user' or 'shop', got {source!r}")
        items = _df2_image_items(annotation, f"{path.stem}.jpg", str(path))
        (queries if source == "user" else gallery).extend(items)
    return _df2_dataset(f"deepfashion2:{folder.name}", folder, queries, gallery)


def _df2_dataset(name: str, folder: Path, query_boxes, gallery_boxes) -> EvalDataset:
    if not gallery_boxes:
        raise ValueError(f"{name}: the gallery has no boxes")
    image_dir = _df2_image_dir(folder, gallery_boxes[0][0])
    queries = [
        ImageRecord(image_dir / image, f"{pair}-{style}", box)
        for image, pair, style, box in query_boxes
        if style > 0
    ]
    gallery = [
        ImageRecord(image_dir / image, f"{pair}-{style}" if style > 0 else f"{pair}-0#{i}", box)
        for i, (image, pair, style, box) in enumerate(gallery_boxes)
    ]
    if not queries:
        raise ValueError(f"{name}: no query box has a style greater than 0")
    return EvalDataset(name, queries, gallery, None, "query-gallery")


def _df2_image_dir(folder: Path, first_image: str) -> Path:
    candidates = (folder, folder / "image", folder / "images")
    for candidate in candidates:
        if (candidate / first_image).exists():
            return candidate
    return next((c for c in candidates[1:] if c.is_dir()), folder)


# --- shared -------------------------------------------------------------------------------


def _parse_box(values, where: str) -> BBox:
    try:
        coords = tuple(int(round(float(value))) for value in values)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: a box must be 4 numbers x1, y1, x2, y2, got {values!r}"
        ) from None
    if len(coords) != 4:
        raise ValueError(f"{where}: a box must be 4 numbers x1, y1, x2, y2, got {values!r}")
    return coords
