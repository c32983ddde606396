"""``create_loss(config)``: the one way the trainer builds a method's loss from YAML."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from vestis.losses.base import MethodLoss

_LOSSES: dict[str, Callable[..., MethodLoss]] = {}


def register_loss(name: str) -> Callable:
    """Register ``factory(num_labels, num_categories, feature_dim, embed_dim, **params)``."""

    def decorate(factory: Callable[..., MethodLoss]) -> Callable[..., MethodLoss]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[name] = factory
        return factory

    return decorate


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def create_loss(
    config: dict[str, Any],
    *,
    num_labels: int,
    num_categories: int,
    feature_dim: int,
    embed_dim: int,
) -> MethodLoss:
    """Build the loss named by ``config["name"]``; the other keys are its parameters."""
    params = dict(config)
    name = params.pop("name", None)
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; one of {', '.join(list_losses())}")
    check_parameters(name, params)
    return _LOSSES[name](
        num_labels=num_labels,
        num_categories=num_categories,
        feature_dim=feature_dim,
        embed_dim=embed_dim,
        **params,
    )


#: What the trainer passes to every loss; recipes never set these.
_DIMENSIONS = frozenset({"num_labels", "num_categories", "feature_dim", "embed_dim"})


def loss_parameters(name: str) -> list[str]:
    """The recipe keys loss ``name`` takes (its constructor's named parameters)."""
    signature = inspect.signature(_LOSSES[name])
    return [parameter.name for parameter in signature.parameters.values()
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
            and parameter.name not in _DIMENSIONS]


def check_parameters(name: str, params: dict[str, Any]) -> None:
    """Refuse an unknown loss, or a recipe key the loss does not take (``margn: 0.3`` would
    otherwise be ignored)."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; one of {', '.join(list_losses())}")
    known = loss_parameters(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"it takes: {', '.join(known) or 'none'}")
