"""The hooks a model declares (vestis.models.hooks.ModelHooks) and their defaults."""

import pytest
import torch

from vestis.models import create_model
from vestis.models.hooks import ModelHooks
from vestis.models.retrieval_net import RetrievalNet


def test_a_plain_model_has_every_default():
    model = create_model("lite0")
    assert isinstance(model, ModelHooks)
    assert (model.model_name, model.model_id) == ("lite0", "lite0")
    assert model.head_from_stage is None and model.cache_tag is None and model.onnx_exportable
    assert model.finetuned_backbone_modules(5) == model.backbone.stage_modules(5)
    assert model.init_head(torch.zeros(2, model.feature_dim)) is None
    assert not model.has_attention_maps()
    with pytest.raises(ValueError, match="'lite0' has no attention map"):
        model.attention_maps(torch.zeros(1, 3, 224, 224))


def test_identity_is_none_until_the_registry_sets_it():
    model = RetrievalNet(backbone="lite0")
    assert model.model_name is None and model.model_id is None
    assert model.display_name == "RetrievalNet"
    assert create_model("lite0", pretrained=False).model_id == "lite0-random"


@pytest.mark.parametrize("name, hooks", [
    ("impdrop_net", {"attention": True, "cache_tag": "impdrop"}),
    ("abe_net", {"attention": True}),
    ("m_heads_net", {"attention": False}),
    ("fashionnet", {"attention": False, "onnx": False,
                    "cache_tag": "fashionnet-predicted-landmarks"}),
])
def test_method_models_override_only_what_differs(name, hooks):
    model = create_model(name, pretrained=False)
    assert model.has_attention_maps() == hooks["attention"]
    assert model.onnx_exportable == hooks.get("onnx", True)
    assert model.cache_tag == hooks.get("cache_tag")


def test_output_dim_defaults_to_the_embedding_width_and_a_model_can_widen_it():
    class Bare(ModelHooks):
        embed_dim = 8

    bare = Bare()
    assert bare.output_dim == 8 and bare.config is None
    bare.output_dim = 11
    assert bare.output_dim == 11
    model = create_model("lite0")
    assert model.output_dim >= model.embed_dim > 0
    assert model.config is not None


def test_losses_declare_neighbours():
    from vestis.losses import create_loss

    dims = {"num_labels": 4, "num_categories": 2, "feature_dim": 16, "embed_dim": 8}
    assert create_loss({"name": "triplet"}, **dims).neighbours is None
    assert callable(create_loss({"name": "htl"}, **dims).neighbours)
