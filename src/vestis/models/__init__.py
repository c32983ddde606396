"""Encoders behind a registry: ``create_model(name)`` is the one way in."""

from vestis.artifacts import artifacts as _artifacts
from vestis.defaults import DEFAULT_MODEL
from vestis.models import retrieval_net as _retrieval_net  # noqa: F401  (registers lite0/1/2)
from vestis.models.abe import ABENet, MHeadsNet  # registers "abe_net", "m_heads_net"
from vestis.models.adapted import AdaptedNet  # registers "adapted"
from vestis.models.bier import BIERNet  # registers "bier_net"
from vestis.models.capsnet import CapsNet  # registers "capsnet"
from vestis.models.cascade import HDCNet  # registers "hdc_net"
from vestis.models.checkpoint import load_checkpoint, save_checkpoint
from vestis.models.efficientnet_lite import EfficientNetLite, efficientnet_lite
from vestis.models.encoder import EncodedBatch, Encoder
from vestis.models.fashionnet import FashionNet  # registers "fashionnet"
from vestis.models.imagenet import imagenet_classes
from vestis.models.impdrop import ImpdropNet  # registers "impdrop_net"
from vestis.models.registry import create_model, list_models, register_checkpoint, register_model
from vestis.models.retrieval_net import RetrievalNet

# The shipped retrieval models of vestis.artifacts (the default: configs/vestis-lite0.yaml).
for _artifact in _artifacts("retrieval"):
    register_checkpoint(_artifact.name, _artifact.path)

__all__ = [
    "ABENet",
    "AdaptedNet",
    "BIERNet",
    "CapsNet",
    "DEFAULT_MODEL",
    "EfficientNetLite",
    "EncodedBatch",
    "Encoder",
    "FashionNet",
    "HDCNet",
    "ImpdropNet",
    "MHeadsNet",
    "RetrievalNet",
    "create_model",
    "efficientnet_lite",
    "imagenet_classes",
    "list_models",
    "load_checkpoint",
    "register_checkpoint",
    "register_model",
    "save_checkpoint",
]
