"""ABE-M and M-heads: the attention masks, the divergence loss, the cut and the recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.smoke import CONFIGS, smoke, smoke_log_rows
from vestis.losses import TrainBatch, create_loss
from vestis.losses.abe import ABELoss, learner_similarity
from vestis.models import Encoder, create_model
from vestis.train import load_config
from vestis.train.trainer import Trainer

SMOKE = smoke(max_images=48, batches_per_epoch=4)


@pytest.fixture(scope="module")
def abe():
    torch.manual_seed(0)
    return create_model("abe_net", learners=3, embed_dim=48).eval()


def entry_maps(count: int = 6, seed: int = 0) -> torch.Tensor:
    """Stand-ins for the cached map entering stage 7 (320x7x7, non-negative like ReLU6)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 320, 7, 7, generator=generator) * 3


def learners_of(model, entry: torch.Tensor) -> list[torch.Tensor]:
    features = model.extract_upper(entry, entry.new_zeros(len(entry), 0), 7)
    return [F.normalize(e, dim=1) for e in model.learner_embeddings(features)]


# -- the divergence loss -------------------------------------------------------------------
def test_the_divergence_loss_is_a_hinge_on_the_learners_squared_distance():
    loss = ABELoss(learners=3, divergence_margin=1.0)
    e = torch.eye(4)
    same = [e[:1], e[:1], e[:1]]  # three identical learners: every pair costs m_div
    assert loss.divergence(same).item() == pytest.approx(1.0)
    apart = [e[:1], e[1:2], e[2:3]]  # orthogonal: ‖a - b‖² = 2 > m_div, nothing to push
    assert loss.divergence(apart).item() == 0.0
    close = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=1)  # cos 0.707: d² = 0.586
    two = ABELoss(learners=2, divergence_margin=1.0)
    assert two.divergence([close[:1], close[1:]]).item() == pytest.approx(1 - (2 - 2 ** 0.5))
    assert learner_similarity(same) == pytest.approx(1.0)


def test_the_divergence_loss_decreases_the_similarity_between_learners(abe):
    """Trained on the divergence loss alone, the attention modules make the learners'
    embeddings of the same images diverge, through the shared G and embedding layer."""
    model = create_model("abe_net", learners=3, embed_dim=48).eval()
    model.load_state_dict(abe.state_dict())
    entry, loss = entry_maps(), ABELoss(learners=3)
    with torch.no_grad():
        before = learner_similarity(learners_of(model, entry))
    optimiser = torch.optim.Adam(model.attention.parameters(), lr=0.01)
    model.train()
    for _ in range(12):
        divergence = loss.divergence(learners_of(model, entry))
        optimiser.zero_grad()
        divergence.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        after = learner_similarity(learners_of(model, entry))
        unseen = learner_similarity(learners_of(model, entry_maps(seed=1)))
    assert before > 0.9  # masks of random 1x1 convolutions around 0.5: near-identical learners
    assert after < 0.5 and unseen < 0.6


def test_the_loss_adds_a_contrastive_loss_per_learner_and_the_weighted_divergence():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    embeddings = torch.randn(6, 12, requires_grad=True)
    batch = TrainBatch(embeddings, embeddings, labels, torch.full_like(labels, -1))
    loss = create_loss({"name": "abe", "learners": 3, "divergence_weight": 0.5}, num_labels=3,
                       num_categories=0, feature_dim=12, embed_dim=12)
    output = loss(batch)
    learners = loss.learner_embeddings(embeddings)
    metric = sum(loss.contrastive(e, labels) for e in learners) / 3
    expected = metric + 0.5 * loss.divergence(learners)
    assert output.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(output.parts) == {"contrastive", "divergence", "learner_similarity"}
    (gradient,) = torch.autograd.grad(output.total, embeddings)
    assert all(part.abs().sum() > 0 for part in gradient.chunk(3, dim=1))
    with pytest.raises(ValueError, match="split"):
        create_loss({"name": "abe", "learners": 3}, num_labels=3, num_categories=0,
                    feature_dim=8, embed_dim=256)


# -- the networks ----------------------------------------------------------------------------
def test_each_attention_mask_multiplies_the_shared_map_before_the_shared_g(abe):
    entry = entry_maps(4)
    inputs = []
    hook = abe.backbone._conv_head.register_forward_pre_hook(lambda _, args: inputs.append(args))
    with torch.no_grad():
        masks = abe.attention_masks(entry)  # (M, B, C, H, W)
        features = abe.extract_upper(entry, entry.new_zeros(4, 0), 7)
    hook.remove()
    assert masks.shape == (3, 4, 320, 7, 7) and 0 < masks.min() and masks.max() < 1
    assert torch.allclose(inputs[-1][0], (masks * entry).flatten(0, 1), atol=1e-6)
    with torch.no_grad():
        for m, chunk in enumerate(features.chunk(3, dim=1)):  # G is shared by the learners
            assert torch.allclose(chunk, abe.global_embedding(masks[m] * entry), atol=1e-5)
    learner_weights = [mask.weight for mask in abe.attention.masks]
    assert not torch.equal(learner_weights[0], learner_weights[1])


def test_a_closed_mask_blinds_its_learner_to_the_image():
    torch.manual_seed(0)
    model = create_model("abe_net", learners=2, embed_dim=32).eval()
    with torch.no_grad():
        model.attention.masks[0].weight.zero_()
        model.attention.masks[0].bias.fill_(-30.0)  # learner 1 sees nothing of the map
        features = model.extract_upper(entry_maps(4), torch.zeros(4, 0), 7)
    blind, seeing = features.chunk(2, dim=1)
    assert torch.allclose(blind, blind[:1].expand_as(blind), atol=1e-5)  # same for every image
    assert not torch.allclose(seeing, seeing[:1].expand_as(seeing), atol=1e-3)


def test_m_heads_has_no_attention_and_one_g_per_learner():
    torch.manual_seed(0)
    model = create_model("m_heads_net", learners=3, embed_dim=48).eval()
    assert not any("attention" in name for name, _ in model.named_parameters())
    assert not model.has_attention_maps()
    entry = entry_maps(4)
    with torch.no_grad():
        features = model.extract_upper(entry, entry.new_zeros(4, 0), 7).chunk(3, dim=1)
        assert torch.allclose(features[0], model.global_embedding(entry), atol=1e-5)
        for head, chunk in zip(model.extra_heads, features[1:], strict=True):
            assert torch.allclose(chunk, model.pool(head(entry)), atol=1e-5)  # unmodified map
    weights = [model.backbone._conv_head.weight] + [h.conv.weight for h in model.extra_heads]
    assert len({w.data_ptr() for w in weights}) == 3  # copies, not one shared G
    assert len({id(p) for p in model.projections}) == 3


@pytest.mark.parametrize("name", ["abe_net", "m_heads_net"])
def test_extract_is_the_upper_part_on_the_lower_part(name):
    torch.manual_seed(0)
    model = create_model(name, learners=2, embed_dim=32).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        whole = model.extract(images)
        parts = model.extract_upper(*model.extract_lower(images, 7), 7)
        vectors = model(images)
    assert whole.shape == (2, 2 * 1280) and torch.allclose(whole, parts, atol=1e-5)
    assert vectors.shape == (2, 32)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="finetune_from_stage: 7"):
        model.extract_lower(images, 6)


def test_the_recipe_must_cache_the_attended_map(tmp_path, data_dir):
    overrides = {**SMOKE, "model": {"finetune_from_stage": 6}}
    with pytest.raises(ValueError, match="finetune_from_stage: 7"):
        Trainer(load_config(CONFIGS / "abe_m.yaml", overrides), tmp_path, torch.device("cpu"),
                progress=False)
    with pytest.raises(ValueError, match="levels"):
        create_model("abe_net", pretrained=False, levels=[4, "head"])
    with pytest.raises(ValueError, match="split evenly"):
        create_model("m_heads_net", pretrained=False, learners=3, embed_dim=256)


def rates(recipe: str, tmp_path) -> dict[str, float]:
    """The learning-rate scale the trainer gives each trainable parameter, by name."""
    tiny = {"data": {"max_images": 8}, "cache": {"views": 1, "dir": None},
            "sampler": {"p": 2, "k": 2}, "epochs": 1}
    trainer = Trainer(load_config(CONFIGS / f"{recipe}.yaml", tiny), tmp_path,
                      torch.device("cpu"), progress=False)
    scale = {id(p): group["lr_scale"] for group in trainer.optimizer.param_groups
             for p in group["params"]}
    return {name: scale[id(p)] for name, p in trainer.model.named_parameters() if id(p) in scale}


def test_every_learners_g_is_fine_tuned_at_the_backbone_rate(tmp_path, data_dir):
    abe, heads = rates("abe_m", tmp_path / "abe"), rates("m_heads", tmp_path / "heads")
    for named in (abe, heads):
        assert all(scale == 0.2 for name, scale in named.items()
                   if name.startswith(("backbone.", "extra_heads.")))
        assert all(scale == 1.0 for name, scale in named.items()
                   if name.startswith(("attention.", "projection")))
    assert {name.split(".")[0] for name in heads} == {"backbone", "extra_heads", "projections"}
    assert {name.split(".")[0] for name in abe} == {"backbone", "attention", "projection"}
    assert {n for n in abe if n.startswith("backbone.")} == {
        "backbone._conv_head.weight", "backbone._bn1.weight", "backbone._bn1.bias"}


# -- the recipes -----------------------------------------------------------------------------
@pytest.mark.train
@pytest.mark.parametrize("recipe", ["abe_m", "m_heads"])
def test_the_recipe_trains_end_to_end_on_a_smoke_budget(recipe, tmp_path, data_dir):
    rows = smoke_log_rows(recipe, tmp_path, SMOKE)
    assert all(np.isfinite(float(row["divergence"])) for row in rows)
    assert {"contrastive", "learner_similarity", "luma_R@1", "clothing_R@1"} <= set(rows[0])

    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    backbone = {k for k in payload["state_dict"] if k.startswith("backbone.")}
    assert backbone and all(k.startswith(("backbone._conv_head", "backbone._bn1"))
                            for k in backbone)
    assert (tmp_path / "best.pt").stat().st_size < 10 * 2**20
    encoder = Encoder.from_name(str(tmp_path / "best.pt"))
    vector = encoder.embed_one(data_dir / "luma" / "images" / "mh06-blue_main.jpg")
    assert vector.shape == (256,) and np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
