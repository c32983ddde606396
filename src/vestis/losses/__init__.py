"""Metric-learning losses, one small class per method, composable like pytorch-metric-learning.

Each method's loss is registered by name and built by :func:`create_loss` from a YAML config.
"""

from vestis.losses.abe import ABELoss
from vestis.losses.base import EpochContext, LossOutput, MethodLoss, TrainBatch
from vestis.losses.bier import BIERLoss
from vestis.losses.capsule import CapsuleLoss
from vestis.losses.fashionnet import FashionNetLoss
from vestis.losses.hdc import HDCLoss
from vestis.losses.htl import ClassTree, HierarchicalTripletLoss, anchor_neighbour_classes
from vestis.losses.landmark import LandmarkLoss
from vestis.losses.os_is import FeatureRelaxation, OSISLoss
from vestis.losses.registry import create_loss, list_losses, register_loss
from vestis.losses.triplet import MINING_STRATEGIES, TripletLoss, TripletMethod, create_miner
from vestis.losses.video_triplet import VideoTripletLoss

__all__ = [
    "ABELoss",
    "BIERLoss",
    "CapsuleLoss",
    "MINING_STRATEGIES",
    "ClassTree",
    "EpochContext",
    "FashionNetLoss",
    "FeatureRelaxation",
    "HDCLoss",
    "LandmarkLoss",
    "LossOutput",
    "HierarchicalTripletLoss",
    "MethodLoss",
    "OSISLoss",
    "TrainBatch",
    "TripletLoss",
    "VideoTripletLoss",
    "TripletMethod",
    "anchor_neighbour_classes",
    "create_loss",
    "create_miner",
    "list_losses",
    "register_loss",
]
