"""FashionNet's landmark loss: location regression on visible landmarks + visibility.

Liu et al. (CVPR 2016) train the pose branch with an L2 regression of the landmark
locations and a cross-entropy on their visibility. Here:

- location: the mean squared distance (in the ``[-1, 1]`` input coordinates) between the
  predicted and the target point, over the landmarks the *target* marks visible only (an
  invisible landmark has no location to learn); 0 when a batch has none;
- visibility: binary cross-entropy of the predicted visibility logits against the target's
  0/1 visibility, over every landmark.

Both are means over a batch, so the loss does not grow with the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LandmarkLoss(nn.Module):
    """``location_weight * location + visibility_weight * visibility`` (see the module)."""

    def __init__(self, location_weight: float = 1.0, visibility_weight: float = 1.0):
        super().__init__()
        if location_weight < 0 or visibility_weight < 0:
            raise ValueError("landmark loss weights must be non-negative")
        self.location_weight, self.visibility_weight = location_weight, visibility_weight

    def forward(self, prediction: tuple[torch.Tensor, torch.Tensor],
                target: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """(total, parts ``landmark_location`` and ``landmark_visibility``)."""
        points, logits = prediction
        true_points, true_visible = target
        visible = true_visible > 0.5
        squared = ((points - true_points) ** 2).sum(dim=-1)
        location = squared[visible].mean() if visible.any() else points.sum() * 0.0
        visibility = F.binary_cross_entropy_with_logits(logits, true_visible.float())
        total = self.location_weight * location + self.visibility_weight * visibility
        return total, {"landmark_location": float(location.detach()),
                       "landmark_visibility": float(visibility.detach())}
