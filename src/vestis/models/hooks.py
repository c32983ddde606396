"""The hooks the registry, trainer, encoder and ``vestis explain`` read off a model, declared
once with their defaults (as :class:`vestis.losses.base.MethodLoss` declares a loss's).

Every model :func:`vestis.models.create_model` builds (:class:`RetrievalNet` and its method
subclasses, :class:`AdaptedNet`) derives from :class:`ModelHooks`; a subclass overrides only
what differs from the default, and nothing probes a model with ``getattr``.
"""

from __future__ import annotations

import torch
from torch import nn


class ModelHooks(nn.Module):
    """Base class of vestis models: identity plus training, caching and export hooks.

    Invariants: a model built by the registry has ``model_name`` (its registered name or
    checkpoint path) and ``model_id`` (what catalogs record: the name, ``NAME-random``
    without pretrained weights, or ``STEM@DIGEST`` of a checkpoint), set by
    :meth:`identify`; a model built by hand keeps ``None`` for both.
    """

    #: The registered name or checkpoint path (``None`` until :meth:`identify`).
    model_name: str | None = None
    #: The id catalogs record and refuse to mix (``None`` until :meth:`identify`).
    model_id: str | None = None
    #: The backbone stage whose entering map the trainable head reads (capsnet, ABE's and
    #: Impdrop's attention): with a frozen backbone the recipe's ``finetune_from_stage``
    #: must be this stage. ``None``: any cut.
    head_from_stage: int | None = None
    #: Part of the feature-cache key when the model's cached views differ from the plain
    #: backbone's for the same recipe (e.g. FashionNet's predicted landmarks). ``None``: none.
    cache_tag: str | None = None
    #: Whether the forward pass traces to ONNX (False: the torch backend always).
    onnx_exportable: bool = True
    #: The constructor settings a checkpoint records to rebuild the model (part of the ONNX
    #: export's fingerprint). ``None``: none.
    config: dict | None = None
    #: Width of the embedding head (every model sets it; 0 on a bare ``ModelHooks``).
    embed_dim: int = 0
    _output_dim: int | None = None

    @property
    def output_dim(self) -> int:
        """Width of the vectors the forward pass returns (what catalogs and ONNX files record
        as the dimension). Default: ``embed_dim``; a model that appends more (blended
        category scores) sets it."""
        return self.embed_dim if self._output_dim is None else self._output_dim

    @output_dim.setter
    def output_dim(self, value: int) -> None:
        self._output_dim = value

    def identify(self, name: str, model_id: str | None = None) -> ModelHooks:
        """Set the model's identity (``model_id`` defaults to ``name``); returns the model."""
        self.model_name = name
        self.model_id = name if model_id is None else model_id
        return self

    @property
    def display_name(self) -> str:
        """``model_name``, or the class name of a model built by hand (for messages)."""
        return self.model_name or type(self).__name__

    def finetuned_backbone_modules(self, cut: int) -> list[nn.Module]:
        """The backbone modules fine-tuned at ``backbone_lr_scale`` when the recipe sets
        ``finetune_from_stage: cut``. Default: the backbone's stages ``cut`` and up; a model
        with its own copies of stages (ABE's learners, Impdrop) names those instead."""
        return self.backbone.stage_modules(cut)

    def init_head(self, features: torch.Tensor) -> None:
        """A data-dependent initialisation from the plain training features, called once
        before the first epoch (BIER's independent learners). Default: nothing."""
        return None

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K, h, w) attention maps of a batch, for ``vestis explain``; only models with
        :meth:`has_attention_maps` implement it."""
        raise ValueError(f"model {self.display_name!r} has no attention map to show")

    def vector_parts(self) -> list[tuple[str, int, float]]:
        """The blocks the output vector concatenates, in order: ``(name, width, share)``.
        Each block is L2-normalised and scaled so that its squared norm is its share of 1,
        so re-weighting blocks (what ``vestis adapt`` may learn) is a diagonal map of the
        vector. Default: one block."""
        return [("vector", self.output_dim, 1.0)]

    def has_attention_maps(self) -> bool:
        """Whether the class overrides :meth:`attention_maps`."""
        return type(self).attention_maps is not ModelHooks.attention_maps
