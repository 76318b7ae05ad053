"""UniMatch: the feature-perturbation stream of the engine (a hook on nnU-Net's encoder) and each of UniMatch's three
unsupervised terms reaching the student. Training, --c and prediction through the real CLIs are in
tests/test_engine_e2e.py (its shared trainings)."""
from __future__ import annotations

import pytest
import torch

from conftest import preprocess_unlabeled_cli
from nnunet_foundation.training.views import feature_dropout_stream, strong_views

UNIMATCH = "nnUNetTrainerUniMatch_smoke"


def test_each_unimatch_term_is_positive_and_reaches_the_student(trainer_factory):
    preprocess_unlabeled_cli(trainer_factory.env, ("2d",))
    t = trainer_factory(UNIMATCH, configuration="2d")
    t.on_train_start()
    # an untrained network is rarely 95% sure: accept every voxel so no term is empty; always CutMix
    t.confidence_rule.value = 0.0
    t.ssl_settings.update(cutmix_probability=1.0)
    batch = next(t.dataloader_train)
    labeled = {"data": batch["data"], "target": batch["target"]}
    weak = next(t.dataloader_unlabeled)["data"]
    torch.manual_seed(0)
    views = strong_views(weak, t.num_strong_views)

    # the feature stream: one encoder pass, the unlabeled samples decoded again from dropped-out features
    out_l, out_weak, out_feature = t.forward_with_feature_dropout(labeled["data"], weak, 0.5)
    assert out_l[0].shape[0] == labeled["data"].shape[0] and out_feature[0].shape == out_weak[0].shape
    assert not torch.allclose(out_feature[0], out_weak[0]), "dropout on the encoder features changed nothing"
    with torch.no_grad():  # the clean stream is the network's ordinary output, and the hook is gone afterwards
        plain = t.as_list(t.network(torch.cat((labeled["data"], weak))))[0]
    torch.testing.assert_close(torch.cat((out_l[0], out_weak[0])).detach(), plain, rtol=1e-4, atol=1e-4)
    assert not t.network.encoder._forward_hooks

    terms, confident = t.unsupervised_terms(out_weak, out_feature, views)
    assert set(terms) == {"strong_1", "strong_2", "feature"} and bool(confident.all())
    params = [p for p in t.network.parameters() if p.requires_grad]
    for name, term in terms.items():
        assert term.item() > 0, name
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, f"{name} does not reach the student"

    # the paper's weights: 0.25 per image-level strong view, 0.5 for the feature stream, unsup weight 1
    torch.manual_seed(1)
    parts = t.compute_losses(labeled, {"data": weak, "strong": views})
    logs = parts.logs
    assert logs["unsup_weight"] == 1.0 and float(logs["confident_fraction"]) == 1.0
    assert parts.unsupervised.item() == pytest.approx(
        0.5 * float(logs["strong_view_loss"]) + 0.5 * float(logs["feature_stream_loss"]), rel=1e-5)
    t.dataloader_unlabeled = None


def test_feature_dropout_stream_leaves_the_first_samples_out_and_drops_whole_channels():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv2d, 3, (1, 2, 2), 2, 3, (2, 2), False,
                        torch.nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                        deep_supervision=True)
    x = torch.randn(3, 1, 16, 16)
    seen = []
    net.encoder.register_forward_hook(lambda m, i, o: seen.append([f.shape[0] for f in o]))
    clean, perturbed = feature_dropout_stream(net, x, p=0.5, first=1)
    # the hook above ran before ours: the encoder computed 3 samples once; the decoder got 3 + 2
    assert seen == [[3, 3, 3]] and clean[0].shape[0] == 3 and perturbed[0].shape[0] == 2
    assert len(clean) == len(perturbed) == 2  # every deep-supervision scale
    assert not torch.allclose(perturbed[0], clean[0][1:])
