"""The basic embedding network: backbone, pooling of one or more levels, and a trainable head.

``extract`` is the backbone part (frozen when only a head is trained, so its output can be
cached); ``head`` is the trainable part: an optional shared ``adapter`` layer followed by a
linear projection to the embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vestis.images import Preprocess
from vestis.models.efficientnet_lite import VARIANTS, efficientnet_lite
from vestis.models.hooks import ModelHooks
from vestis.models.pooling import create_pooling
from vestis.models.registry import register_model

HEAD_LEVEL = "head"


class RetrievalNet(ModelHooks):
    """Backbone → pooled levels → (adapter) → (linear projection) → embedding.

    ``levels`` lists the backbone outputs to pool: stage indices 0-6 (lower stages keep more
    colour and texture) and/or ``"head"`` (the 1280-channel map). With several levels each
    pooled vector is L2-normalised before concatenation so no level drowns the others.
    ``forward`` returns raw embeddings; :class:`vestis.models.Encoder` L2-normalises them.
    ``config`` holds the keyword arguments that rebuild the same architecture.
    """

    architecture = "retrieval_net"

    def __init__(
        self,
        backbone: str = "lite0",
        pooling: str = "avg",
        embed_dim: int | None = None,
        gem_p: float = 3.0,
        levels: Sequence[int | str] = (HEAD_LEVEL,),
        adapter_dim: int | None = None,
        category_classes: int = 0,
        category_weight: float = 0.0,
        imagenet_weight: float = 0.0,
        imagenet_from_stage: int = 0,
        pretrained: bool = True,
    ):
        super().__init__()
        levels = tuple(levels)
        self.config = {
            "backbone": backbone,
            "pooling": pooling,
            "embed_dim": embed_dim,
            "gem_p": gem_p,
            "levels": list(levels),
            "adapter_dim": adapter_dim,
            "category_classes": category_classes,
            "category_weight": category_weight,
        }
        self.backbone = efficientnet_lite(backbone, pretrained=pretrained)
        self.levels = _check_levels(levels, len(self.backbone.stage_channels))
        self.pool = create_pooling(pooling, **({"p": gem_p} if pooling == "gem" else {}))
        self.category_weight = float(category_weight)
        self._build_head(sum(self._level_channels(level) for level in self.levels),
                         adapter_dim, embed_dim, category_classes)
        self.preprocess = Preprocess(size=VARIANTS[backbone].resolution)
        self.imagenet: nn.Module | None = None
        self.imagenet_weight, self.imagenet_from_stage = 0.0, 0
        if imagenet_weight:
            self.blend_imagenet(imagenet_weight, imagenet_from_stage)

    def _build_head(self, feature_dim: int, adapter_dim: int | None, embed_dim: int | None,
                    category_classes: int) -> None:
        """The trainable head over ``feature_dim`` extracted features."""
        self.feature_dim = feature_dim
        self.adapter = _adapter(feature_dim, adapter_dim)
        adapted = adapter_dim or feature_dim
        self.adapter_output_dim = adapted
        self.projection = nn.Linear(adapted, embed_dim) if embed_dim else None
        self.embed_dim = embed_dim or adapted
        self.classifier = nn.Linear(adapted, category_classes) if category_classes else None
        blend = self.classifier is not None and self.category_weight > 0
        self.output_dim = self.embed_dim + (category_classes if blend else 0)

    def _level_channels(self, level: int | str) -> int:
        if level == HEAD_LEVEL:
            return self.backbone.num_features
        return self.backbone.stage_channels[level]

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, feature_dim): the part a frozen backbone caches."""
        if self.levels == (HEAD_LEVEL,):
            return self.pool(self.backbone.forward_features(x))
        return self._pool_levels(self.backbone.stage_features(x), {})

    def extract_lower(self, x: torch.Tensor, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen part when stages ``cut`` and up are fine-tuned: the output map of stage
        ``cut - 1`` and the normalised pooled levels below ``cut`` (B, 0 when none)."""
        stages = self.backbone.run_stages(x, 0, cut)
        lower = [F.normalize(self.pool(stages[level]), dim=1)
                 for level in self.levels if level != HEAD_LEVEL and level < cut]
        return stages[-1], torch.cat(lower, dim=1) if lower else stages[-1].new_zeros(len(x), 0)

    def extract_upper(self, entry: torch.Tensor, lower: torch.Tensor, cut: int) -> torch.Tensor:
        """The rest of :meth:`extract` from :meth:`extract_lower`'s output."""
        upper = self.backbone.run_stages(entry, cut) if cut < len(self.backbone.stage_ends) \
            else []
        stages: list[torch.Tensor | None] = [None] * cut + upper
        stages[cut - 1] = entry
        if self.levels == (HEAD_LEVEL,):
            return self.pool(self.backbone.head(stages[-1]))
        sizes = [self._level_channels(level) for level in self.levels
                 if level != HEAD_LEVEL and level < cut]
        pooled_lower = dict(zip(
            [level for level in self.levels if level != HEAD_LEVEL and level < cut],
            lower.split(sizes, dim=1) if sizes else [], strict=True))
        return self._pool_levels(stages, pooled_lower)

    def _pool_levels(self, stages: list, pooled: dict) -> torch.Tensor:
        vectors = []
        for level in self.levels:
            if level in pooled:
                vectors.append(pooled[level])
                continue
            if level == HEAD_LEVEL:
                vectors.append(F.normalize(self.pool(self.backbone.head(stages[-1])), dim=1))
            else:
                vectors.append(F.normalize(self.pool(stages[level]), dim=1))
        return torch.cat(vectors, dim=1)

    def head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapted features, raw embedding) from extracted features."""
        adapted = self.adapter(features)
        embedding = self.projection(adapted) if self.projection is not None else adapted
        return adapted, embedding

    def category_logits(self, adapted: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise ValueError("this model has no category classifier (category_classes=0)")
        return self.classifier(adapted)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """The retrieval vector from extracted features.

        With a category classifier and ``category_weight`` w > 0, the L2-normalised instance
        embedding is concatenated with w times the normalised category probabilities, so
        images of one predicted category rank together, ordered by instance similarity.
        """
        adapted, embedding = self.head(features)
        if self.classifier is None or self.category_weight <= 0:
            return embedding
        probabilities = F.normalize(self.category_logits(adapted).softmax(dim=1), dim=1)
        return torch.cat([F.normalize(embedding, dim=1),
                          self.category_weight * probabilities], dim=1)

    def blend_imagenet(self, weight: float, from_stage: int = 0) -> None:
        """Concatenate the backbone's own ImageNet features (average-pooled head map) to the
        vector, so that cosine similarity is ``weight`` times theirs plus ``1 - weight`` times
        the trained vector's. The ImageNet network is a frozen copy from the weight package,
        never trained or saved; it shares the stages below ``from_stage`` with this model,
        which must be the ImageNet ones (a backbone fine-tuned from ``from_stage`` or above).
        ``weight`` 0 removes it."""
        weight, from_stage = float(weight), int(from_stage)
        if not 0.0 <= weight < 1.0:
            raise ValueError(f"imagenet_weight must be in [0, 1), got {weight}")
        if not 0 <= from_stage < len(self.backbone.stage_ends):
            raise ValueError(f"imagenet_from_stage must be a stage index 0-"
                             f"{len(self.backbone.stage_ends) - 1}, got {from_stage}")
        own = [name for name in ("forward", "extract", "extract_lower", "extract_upper")
               if getattr(type(self), name) is not getattr(RetrievalNet, name)]
        if weight and own:
            raise ValueError(f"{self.architecture} has its own feature extraction ({own[0]}): "
                             "no ImageNet blend")
        trained_dim = self.output_dim - (self.imagenet.num_features if self.imagenet else 0)
        self.imagenet_weight, self.imagenet_from_stage = weight, from_stage
        self.config.pop("imagenet_weight", None)
        self.config.pop("imagenet_from_stage", None)
        self.imagenet = None
        self.output_dim = trained_dim
        if weight:
            self.config.update(imagenet_weight=weight, imagenet_from_stage=from_stage)
            imagenet = efficientnet_lite(self.config["backbone"], pretrained=True)
            self.imagenet = imagenet.eval().requires_grad_(False)
            self.output_dim = trained_dim + imagenet.num_features

    def vector_parts(self) -> list[tuple[str, int, float]]:
        if self.imagenet is None:
            return super().vector_parts()
        width = self.imagenet.num_features
        return [("imagenet", width, self.imagenet_weight),
                ("trained", self.output_dim - width, 1.0 - self.imagenet_weight)]

    def train(self, mode: bool = True) -> RetrievalNet:
        super().train(mode)
        if self.imagenet is not None:
            self.imagenet.eval()  # a frozen ImageNet network keeps its running statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.imagenet is None:
            return self.embed_features(self.extract(x))
        cut = self.imagenet_from_stage
        if cut == 0:
            trained, shared = self.embed_features(self.extract(x)), x
        else:
            shared, lower = self.extract_lower(x, cut)
            trained = self.embed_features(self.extract_upper(shared, lower, cut))
        generic = self.imagenet.head(self.imagenet.run_stages(shared, cut)[-1]).mean(dim=(2, 3))
        return torch.cat([self.imagenet_weight ** 0.5 * F.normalize(generic, dim=1),
                          (1 - self.imagenet_weight) ** 0.5 * F.normalize(trained, dim=1)],
                         dim=1)


def _check_levels(levels: tuple, n_stages: int) -> tuple:
    if not levels:
        raise ValueError("levels must name at least one backbone output")
    for level in levels:
        if level != HEAD_LEVEL and not (isinstance(level, int) and 0 <= level < n_stages):
            raise ValueError(f"level {level!r} is not 'head' or a stage index 0-{n_stages - 1}")
    return levels


def _adapter(features: int, adapter_dim: int | None) -> nn.Module:
    if not adapter_dim:
        return nn.Identity()
    return nn.Sequential(nn.Linear(features, adapter_dim), nn.BatchNorm1d(adapter_dim), nn.ReLU())


def _retrieval_net_factory(backbone: str):
    def factory(pretrained: bool = True, **kwargs) -> RetrievalNet:
        kwargs.setdefault("backbone", backbone)
        return RetrievalNet(pretrained=pretrained, **kwargs)

    factory.__doc__ = f"EfficientNet-{backbone.capitalize()} ImageNet features, pooled."
    return factory


for _variant in VARIANTS:
    register_model(_variant)(_retrieval_net_factory(_variant))
register_model(RetrievalNet.architecture)(
    lambda pretrained=True, **kw: RetrievalNet(pretrained=pretrained, **kw)
)
