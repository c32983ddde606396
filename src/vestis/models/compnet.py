"""Comp-Net: semantic compositional networks for outfit compatibility (Dan et al., IJCNN 2018).

An item image and its semantic labels (occasion/style and season: ``style_*`` and ``climate``)
are composed into one vector of a compatibility space, where items that go together lie
close. The two parts the paper names:

- **conditional normalisation**: the label head's softmax takes the labels' co-occurrence
  into account. Each family's logits get ``gamma * log(C @ p)`` added before the softmax,
  where ``C[i, j] = P(label i | label j)`` counted on the training products and ``p`` the
  first-pass probabilities of the *other* families: a "Hoodie" style raises "Cool" and
  lowers "Hot";
- **cost-sensitive minimisation** lives in :mod:`vestis.losses.compnet`.

The composition is the semantic-compositional layer: the image features gate through the
label vector, ``W_c (tanh(W_a x) * sigmoid(W_b s)) + W_x x``, so each label mix gets its own
effective projection. Known labels (a catalog item's ``climate``/``style_*`` metadata) are
used when given, predicted ones otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vestis.defaults import DEFAULT_OUTFIT_MODEL
from vestis.models.attributes import (
    FEATURE_MODEL,
    LabelSpace,
    read_head,
    resolve_head_path,
    save_head,
)

#: The semantic label families Comp-Net composes with (products.csv columns).
SEMANTIC_COLUMNS = ("climate", "style_general", "style_bottom")


def cooccurrence(rows: np.ndarray) -> np.ndarray:
    """``C[i, j] = P(i | j)`` over multi-hot rows, with a zero diagonal."""
    rows = np.asarray(rows, dtype=np.float64)
    counts = rows.T @ rows
    conditional = counts / np.maximum(counts.diagonal()[None, :], 1.0)
    np.fill_diagonal(conditional, 0.0)
    return conditional.astype(np.float32)


def family_softmax(logits: torch.Tensor, slices: Sequence[slice]) -> torch.Tensor:
    return torch.cat([logits[:, part].softmax(1) for part in slices], dim=1)


def known_distribution(multi_hot: torch.Tensor, slices: Sequence[slice]) -> torch.Tensor:
    """Known labels as per-family distributions (uniform over a family's given values)."""
    parts = []
    for part in slices:
        block = multi_hot[:, part]
        parts.append(block / block.sum(1, keepdim=True).clamp(min=1.0))
    return torch.cat(parts, dim=1)


class ConditionalNormalization(nn.Module):
    """Label co-occurrence in the softmax: ``softmax(z + gamma * log(C_other @ p + eps))``."""

    def __init__(self, cooccur: np.ndarray, slices: Sequence[slice], eps: float = 1e-3):
        super().__init__()
        mask = np.ones_like(cooccur)
        for part in slices:  # a family informs the others, not itself
            mask[part, part] = 0.0
        self.register_buffer("cooccur", torch.as_tensor(cooccur * mask, dtype=torch.float32))
        self.gamma = nn.Parameter(torch.tensor(1.0))
        self.slices = list(slices)
        self.eps = eps

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = family_softmax(logits, self.slices)
        support = first @ self.cooccur.T
        adjusted = logits + self.gamma * torch.log(support + self.eps)
        return adjusted, family_softmax(adjusted, self.slices)


class CompNet(nn.Module):
    """Image features + semantic labels → a unit vector in the compatibility space."""

    def __init__(self, in_dim: int, labels: LabelSpace, cooccur: np.ndarray | None,
                 embed_dim: int = 64, hidden_dim: int = 128, dropout: float = 0.3,
                 conditional: bool = True, semantic_weight: float = 0.0):
        super().__init__()
        self.semantic_weight = semantic_weight
        self.slices = list(labels.slices().values())
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.dropout = nn.Dropout(dropout)
        self.label_head = nn.Linear(in_dim, len(labels))
        self.conditional = (ConditionalNormalization(cooccur, self.slices)
                            if conditional and cooccur is not None else None)
        self.image_gate = nn.Linear(in_dim, hidden_dim)
        self.label_gate = nn.Linear(len(labels), hidden_dim)
        self.compose = nn.Linear(hidden_dim, embed_dim)
        self.direct = nn.Linear(in_dim, embed_dim)

    def set_statistics(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp(min=1e-6))

    def label_logits(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, per-family probabilities), conditionally normalised when enabled."""
        logits = self.label_head(self.dropout(self._standard(features)))
        if self.conditional is not None:
            return self.conditional(logits)
        return logits, family_softmax(logits, self.slices)

    def forward(self, features: torch.Tensor, known: torch.Tensor | None = None,
                known_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(compatibility vectors, label logits). ``known`` multi-hot labels replace the
        predicted distribution on rows where ``known_mask`` is true."""
        logits, semantic = self.label_logits(features)
        if known is not None:
            given = known_distribution(known, self.slices)
            use = known_mask if known_mask is not None else known.sum(1) > 0
            semantic = torch.where(use[:, None], given, semantic)
        x = self.dropout(self._standard(features))
        gated = torch.tanh(self.image_gate(x)) * torch.sigmoid(self.label_gate(semantic))
        vectors = F.normalize(self.compose(gated) + self.direct(x), dim=1)
        if self.semantic_weight:
            labels = F.normalize(semantic, dim=1) * self.semantic_weight
            vectors = torch.cat([vectors, labels], dim=1)
        return F.normalize(vectors, dim=1), logits

    def _standard(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


class OutfitModel:
    """A trained :class:`CompNet` with its label space and feature model."""

    def __init__(self, net: CompNet, labels: LabelSpace, config: dict,
                 feature_model: str = FEATURE_MODEL, meta: dict | None = None):
        self.net = net.eval()
        self.labels = labels
        self.config = dict(config)
        self.feature_model = feature_model
        self.meta = meta or {}

    @torch.no_grad()
    def embed_features(self, features: np.ndarray,
                       known: Sequence[Mapping[str, Sequence[str]] | None] | None = None,
                       ) -> np.ndarray:
        """Compatibility vectors; ``known[i]`` (``{family: values}`` or None) are row i's
        given labels, used instead of predicted ones where present."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        given = None
        if known is not None:
            given = torch.as_tensor(np.stack([
                self.labels.encode(values or {}) for values in known]))
        vectors, _ = self.net(x, given)
        return vectors.numpy()

    def save(self, path: str | Path) -> Path:
        return save_head(path, "vestis-compnet", self.net, labels=self.labels,
                         feature_model=self.feature_model, meta=self.meta, config=self.config)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> OutfitModel:
        blob, state, labels = read_head(path, "vestis-compnet", "Comp-Net")
        config = blob["config"]
        cooccur = state.get("conditional.cooccur")
        net = CompNet(state["mean"].numel(), labels,
                      None if cooccur is None else cooccur.numpy(),
                      embed_dim=config["embed_dim"], hidden_dim=config["hidden_dim"],
                      conditional=cooccur is not None,
                      semantic_weight=config.get("semantic_weight", 0.0))
        net.load_state_dict(state)
        return cls(net, labels, config, blob["feature_model"], blob.get("meta"))


def load_outfit_model(name: str | Path = DEFAULT_OUTFIT_MODEL) -> OutfitModel:
    return OutfitModel.from_checkpoint(resolve_head_path(name, "outfits"))
