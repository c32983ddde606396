"""The model registry: ``create_model(name)`` is the one way to get a model.

A name is either a registered architecture (``lite0``), a registered trained model
(a name bound to a shipped checkpoint), or the path of a checkpoint file written by
:func:`vestis.models.save_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
_TRAINED: dict[str, Path] = {}


def register_model(name: str) -> Callable:
    """Decorator that registers a function ``(pretrained=True, **kwargs) -> nn.Module``."""

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ARCHITECTURES or name in _TRAINED:
            raise ValueError(f"model name {name!r} is already registered")
        _ARCHITECTURES[name] = factory
        return factory

    return decorate


def register_checkpoint(name: str, path: str | Path) -> None:
    """Bind ``name`` to a checkpoint file, so ``create_model(name)`` loads it."""
    if name in _ARCHITECTURES:
        raise ValueError(f"model name {name!r} is already an architecture")
    _TRAINED[name] = Path(path)


def list_models() -> list[str]:
    available = [name for name, path in _TRAINED.items() if path.exists()]
    return sorted(_ARCHITECTURES) + sorted(available)


def needs_category_count(name: str) -> bool:
    """Whether architecture ``name`` is built with ``num_categories``, the number of training
    categories (its factory has a true ``needs_category_count``, e.g. capsnet's class capsules).
    """
    return bool(getattr(_ARCHITECTURES.get(name), "needs_category_count", False))


def create_model(name: str | Path, *, pretrained: bool = True, **kwargs) -> nn.Module:
    """Build the model ``name`` in eval mode.

    ``name`` may be a registered architecture, a registered trained model or a path to a
    checkpoint. Keyword arguments go to the architecture's factory.
    """
    from vestis.models.checkpoint import load_checkpoint

    key = str(name)
    if key in _ARCHITECTURES:
        model = _ARCHITECTURES[key](pretrained=pretrained, **kwargs)
        return model.identify(key, key if pretrained else f"{key}-random").eval()
    if key in _TRAINED:
        if not _TRAINED[key].exists():
            raise FileNotFoundError(f"the weights of model {key!r} are missing: {_TRAINED[key]}")
        model = load_checkpoint(_TRAINED[key])
        return model.identify(key, model.model_id)
    path = Path(key).expanduser()
    if path.is_file():
        return load_checkpoint(path)
    raise ValueError(
        f"unknown model {key!r}: not a registered model ({', '.join(list_models())}) "
        "and not a checkpoint file"
    )


def build_architecture(name: str, *, pretrained: bool, **kwargs) -> nn.Module:
    """Build a registered architecture by name (used when restoring checkpoints)."""
    if name not in _ARCHITECTURES:
        raise ValueError(f"checkpoint needs architecture {name!r}, which is not registered")
    return _ARCHITECTURES[name](pretrained=pretrained, **kwargs)
