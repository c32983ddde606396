"""Training: ``vestis train RECIPE.yaml`` runs data + model + loss into a checkpoint."""

from vestis.train.config import DEFAULTS, load_config
from vestis.train.trainer import TrainResult, train

__all__ = ["DEFAULTS", "TrainResult", "load_config", "train"]
