"""Training data: labelled image lists, P×K batch sampling, augmentations and synthesis."""

from vestis.data.datasets import (
    UNUSABLE_LABELS,
    ImageDataset,
    from_inshop,
    read_clothing,
    read_luma,
    read_training_csv,
    seed_worker,
    split_by_group,
)
from vestis.data.samplers import PKSampler, source_balanced_weights
from vestis.data.synthesis import ConsumerStyle, SyntheticViews, garment_mask, list_backgrounds
from vestis.data.transforms import (
    AugmentConfig,
    TrainTransform,
    build_eval_transform,
    build_train_transform,
)

__all__ = [
    "UNUSABLE_LABELS",
    "AugmentConfig",
    "ConsumerStyle",
    "ImageDataset",
    "PKSampler",
    "SyntheticViews",
    "TrainTransform",
    "build_eval_transform",
    "build_train_transform",
    "from_inshop",
    "garment_mask",
    "list_backgrounds",
    "read_clothing",
    "read_luma",
    "read_training_csv",
    "seed_worker",
    "source_balanced_weights",
    "split_by_group",
]
