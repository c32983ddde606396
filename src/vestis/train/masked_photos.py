"""A seeded choice of CCP photos with garment masks, as a model's input tensors: the data of
the attention (Impdrop) and landmark (FashionNet) pre-training stages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vestis.detect.metrics import dataset_lookup, read_parsing_csv


def masked_photos(model, csv_path: str | Path, max_images: int, seed: int = 0,
                  skip: int = 0) -> Iterator[tuple[object, torch.Tensor, dict]]:
    """``(row, pixels, lookup)`` of ``max_images`` photos of the parsing CSV in a seeded order
    (``skip`` leaves out the first ``skip`` of that order, for held-out photos): ``pixels``
    is a batch of one on the model's device, ``lookup`` maps the CSV's labels to groups. The
    model is in eval mode meanwhile and gets its own mode back afterwards."""
    rows = read_parsing_csv(csv_path)
    order = np.random.default_rng(seed).permutation(len(rows))[skip:skip + max_images]
    lookup = dataset_lookup(csv_path)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for index in order:
            row = rows[int(index)]
            with Image.open(row.image) as photo:
                pixels = torch.as_tensor(model.preprocess.to_array(photo.convert("RGB")))
            yield row, pixels[None].to(device), lookup
    finally:
        model.train(was_training)
