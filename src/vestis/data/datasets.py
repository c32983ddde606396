"""Training samples: read labelled image lists, split them and serve tensors.

A training sample is a :class:`vestis.records.ImageRecord`: one image with its instance
label (``item_id``, e.g. a Luma item or a clothing class), an optional ``category`` and an
optional ``group``: labels of one group are *different* instances of one design (the
colours of a Luma product), the hardest negatives. Columns that matter only for splitting,
such as the clothing set's ``sender_id``, are kept in ``metadata`` (a read-only mapping,
left out of equality and hashing).
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vestis.evaluation.datasets import UNUSABLE_LABELS
from vestis.images import Box, Preprocess, crop_box, load_image
from vestis.records import ImageRecord

BOX_COLUMNS = ("x1", "y1", "x2", "y2")

ImageTransform = Callable[[Image.Image], "np.ndarray | torch.Tensor"]


def read_training_csv(
    path: str | Path,
    *,
    label_column: str = "item_id",
    category_column: str | None = None,
    group_column: str | None = None,
    extra_columns: Sequence[str] = (),
    drop_labels: Iterable[str] = UNUSABLE_LABELS,
) -> list[ImageRecord]:
    """Read a CSV with an ``image`` column (paths relative to the CSV) and label columns.

    Rows whose label is in ``drop_labels`` are skipped. Optional ``x1,y1,x2,y2`` columns
    give a box; empty cells mean none.
    """
    path = Path(path).expanduser().absolute()
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        wanted = ["image", label_column, category_column, group_column, *extra_columns]
        missing = [name for name in wanted if name and name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        dropped = set(drop_labels)
        samples = []
        for line, row in enumerate(reader, start=2):
            label = (row[label_column] or "").strip()
            if not label:
                raise ValueError(f"{path}, line {line}: empty {label_column!r}")
            if label in dropped:
                continue
            samples.append(
                ImageRecord(
                    path=_resolve(path.parent, row["image"], path, line),
                    item_id=label,
                    category=_cell(row, category_column),
                    group=_cell(row, group_column),
                    box=_row_box(row, path, line),
                    metadata=MappingProxyType({name: row[name] for name in extra_columns}),
                )
            )
    if not samples:
        raise ValueError(f"{path}: no usable rows")
    return samples


def read_luma(path: str | Path) -> list[ImageRecord]:
    """Luma ``catalog.csv``: label ``item_id``, category ``category``, group ``product``."""
    return read_training_csv(
        path, label_column="item_id", category_column="category", group_column="product"
    )


def read_clothing(path: str | Path) -> list[ImageRecord]:
    """Clothing ``labels.csv``: the class is both label and category; ``sender_id`` in metadata.

    Split it with ``split_by_group(samples, key=lambda s: s.metadata["sender_id"])``.
    """
    return read_training_csv(
        path, label_column="label", category_column="label", extra_columns=("sender_id",)
    )


def from_inshop(source: str | Path) -> list[ImageRecord]:
    """The training split of DeepFashion In-shop; the category is ``MEN/Denim`` and such."""
    from vestis.evaluation.datasets import read_inshop

    dataset = read_inshop(Path(source).expanduser().absolute(), split="train")
    return [
        ImageRecord(sample.path, sample.item_id, sample.box, _inshop_category(sample.path))
        for sample in dataset.gallery
    ]


def _inshop_category(path: Path) -> str | None:
    # img/<GENDER>/<Category>/<item_id>/<view>.jpg
    parts = path.parts
    return "/".join(parts[-4:-2]) if len(parts) >= 4 else None


def _resolve(folder: Path, image: str, path: Path, line: int) -> Path:
    image = (image or "").strip()
    if not image:
        raise ValueError(f"{path}, line {line}: empty 'image'")
    return (folder / image).absolute()


def _cell(row: Mapping[str, str], column: str | None) -> str | None:
    if column is None:
        return None
    return (row[column] or "").strip() or None


def _row_box(row: Mapping[str, str], path: Path, line: int) -> Box | None:
    cells = [(row.get(name) or "").strip() for name in BOX_COLUMNS]
    if not any(cells):
        return None
    try:
        x1, y1, x2, y2 = (int(round(float(cell))) for cell in cells)
    except ValueError:
        raise ValueError(f"{path}, line {line}: bad box {cells}") from None
    return (x1, y1, x2, y2)


def split_by_group(
    samples: Sequence[ImageRecord],
    key: Callable[[ImageRecord], str],
    val_fraction: float = 0.2,
    seed: int = 0,
    *,
    fold: int | None = None,
    folds: int | None = None,
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split into (train, val) so that all samples with the same ``key`` are on one side.

    Keys are shuffled with ``seed`` and moved to val until it holds about ``val_fraction``
    of the samples. With ``folds`` (k-fold), the shuffled keys are dealt into ``folds``
    parts of about equal sample counts, and part ``fold`` is val: the ``folds`` splits of one
    seed hold out every key exactly once. The result depends only on the samples, the keys,
    the seed (and the fold).
    """
    by_key: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        by_key.setdefault(str(key(sample)), []).append(index)
    if len(by_key) < 2:
        raise ValueError(f"need at least two distinct keys to split, got {len(by_key)}")
    keys = sorted(by_key)
    random.Random(seed).shuffle(keys)
    if folds is not None:
        val_keys = _fold_keys(keys, by_key, fold, folds)
    else:
        val_keys = _fraction_keys(keys, by_key, val_fraction * len(samples), val_fraction)
    train = [s for s in samples if str(key(s)) not in val_keys]
    val = [s for s in samples if str(key(s)) in val_keys]
    return train, val


def _fraction_keys(keys: list[str], by_key: dict, target: float, fraction: float) -> set[str]:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {fraction}")
    val_keys: set[str] = set()
    size = 0
    for name in keys[:-1]:  # the last key always stays in train, so train is never empty
        if size >= target:
            break
        val_keys.add(name)
        size += len(by_key[name])
    return val_keys


def _fold_keys(keys: list[str], by_key: dict, fold: int | None, folds: int) -> set[str]:
    """Keys of part ``fold``: each key goes to the part with the fewest samples so far."""
    if not isinstance(folds, int) or folds < 2 or folds > len(keys):
        raise ValueError(f"folds must be an integer from 2 to {len(keys)} keys, got {folds}")
    if not isinstance(fold, int) or not 0 <= fold < folds:
        raise ValueError(f"fold must be an integer from 0 to {folds - 1}, got {fold}")
    sizes = [0] * folds
    val_keys: set[str] = set()
    for name in keys:
        part = sizes.index(min(sizes))
        sizes[part] += len(by_key[name])
        if part == fold:
            val_keys.add(name)
    return val_keys


def _codes(values: Sequence[str | None]) -> tuple[list[int], list[str]]:
    """Integer codes in sorted-name order; ``None`` becomes -1."""
    names = sorted({value for value in values if value is not None})
    lookup = {name: code for code, name in enumerate(names)}
    return [lookup[value] if value is not None else -1 for value in values], names


class ImageDataset(Dataset):
    """Samples served as ``(float32 CHW tensor, label index)``.

    ``labels``, ``categories`` and ``groups`` are per-sample integer codes (-1 when absent),
    numbered in the sorted order of ``label_names``, ``category_names`` and ``group_names``.
    A broken image raises :class:`vestis.images.ImageError`.
    """

    def __init__(
        self,
        samples: Sequence[ImageRecord],
        transform: ImageTransform | None = None,
        *,
        draft_size: int | None = None,
    ):
        if not samples:
            raise ValueError("ImageDataset needs at least one sample")
        self.samples = list(samples)
        self.transform = transform or Preprocess().to_array
        self.draft_size = draft_size
        self.labels, self.label_names = _codes([s.item_id for s in self.samples])
        self.categories, self.category_names = _codes([s.category for s in self.samples])
        self.groups, self.group_names = _codes([s.group for s in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        # Draft decoding rescales pixels, which would move a box: only without one.
        draft = self.draft_size if sample.box is None else None
        image = crop_box(load_image(sample.path, draft_size=draft), sample.box)
        return to_tensor(self.transform(image)), self.labels[index]

    def reseed(self, seed: int) -> None:
        """Reseed a random transform (see :func:`vestis.data.seed_worker`)."""
        if hasattr(self.transform, "reseed"):
            self.transform.reseed(seed)


def to_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.float()
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: give each worker its own augmentations.

    Without it every worker would copy the same transform random state and repeat it.
    """
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(torch.initial_seed() % 2**32)
