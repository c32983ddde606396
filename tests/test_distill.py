"""Relational distillation toward ImageNet features (model.imagenet_distill)."""

from __future__ import annotations

import pytest
import torch

from vestis.losses.distill import RelationalDistillation


def test_same_relations_cost_nothing_whatever_the_rotation_and_scale():
    torch.manual_seed(0)
    teacher = torch.randn(12, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    student = 3.0 * teacher @ rotation
    assert RelationalDistillation()(student, teacher).item() == pytest.approx(0, abs=1e-10)


def test_other_relations_cost_and_pull_only_the_student():
    torch.manual_seed(1)
    teacher = torch.randn(12, 16, requires_grad=True)
    student = torch.randn(12, 8, requires_grad=True)
    loss = RelationalDistillation()(student, teacher)
    assert loss.item() > 0.05
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    # a step along the gradient brings the relations closer
    with torch.no_grad():
        moved = student - 5.0 * student.grad
    assert RelationalDistillation()(moved, teacher).item() < loss.item()


def test_batches_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="differ"):
        RelationalDistillation()(torch.randn(4, 8), torch.randn(5, 8))
