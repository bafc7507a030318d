"""Tests for kernel_lib.models: tiny inputs, big architectures only built on the meta device."""

import hashlib
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernel_lib import models

TV_ARCHS = [a for a in models.SUPPORTED_ARCHS if a != "base_cnn"]


def _first_rgb_like_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


# ---------------------------------------------------------------- adapt_input_conv

def test_adapt_repeat_tiles_and_preserves_response_to_a_flat_input():
    rgb = torch.randn(8, 3, 7, 7)
    six = models.adapt_input_conv(rgb, 6, "repeat")
    assert six.shape == (8, 6, 7, 7)
    assert torch.equal(six[:, 3], six[:, 0]) and torch.equal(six[:, 5], six[:, 2])
    torch.testing.assert_close(six[:, 0], rgb[:, 0] * 0.5)
    torch.testing.assert_close(six.sum(1), rgb.sum(1))
    torch.testing.assert_close(models.adapt_input_conv(rgb, 3, "repeat"), rgb)
    torch.testing.assert_close(models.adapt_input_conv(rgb, 1, "repeat")[:, 0], rgb.sum(1))


def test_adapt_mean_puts_the_rgb_mean_in_every_channel():
    rgb = torch.randn(4, 3, 3, 3)
    six = models.adapt_input_conv(rgb, 6, "mean")
    assert six.shape == (4, 6, 3, 3)
    expected = (rgb[:, 0] + rgb[:, 1] + rgb[:, 2]) / 3
    for c in range(6):
        torch.testing.assert_close(six[:, c], expected)


def test_adapt_random_is_fresh_kaiming_and_seeded():
    rgb = torch.ones(64, 3, 7, 7)
    torch.manual_seed(0)
    a = models.adapt_input_conv(rgb, 6, "random")
    torch.manual_seed(0)
    b = models.adapt_input_conv(rgb, 6, "random")
    assert a.shape == (64, 6, 7, 7) and torch.equal(a, b)
    assert not torch.equal(a, models.adapt_input_conv(rgb, 6, "random"))
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (64 * 7 * 7)) = 0.0286
    assert abs(a.std().item() - math.sqrt(2 / (64 * 49))) < 0.002


def test_adapt_rejects_unknown_mode_and_non_rgb_weights():
    with pytest.raises(ValueError, match="'tile'"):
        models.adapt_input_conv(torch.randn(2, 3, 3, 3), 6, "tile")
    with pytest.raises(ValueError, match=r"\(O,3,k,k\)"):
        models.adapt_input_conv(torch.randn(2, 4, 3, 3), 6, "mean")


# ---------------------------------------------------------------- BaseCNN

def test_base_cnn_matches_the_seed_at_512():
    with torch.device("meta"):
        model = models.BaseCNN(1108)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {
        "backbone.conv1.weight": (16, 6, 7, 7),
        "backbone.conv2.weight": (64, 16, 7, 7),
        "backbone.fc.weight": (2216, 65536),
        "head.weight": (1108, 2216),
    }
    conv1 = model.backbone.conv1
    assert (conv1.stride, conv1.padding) == ((2, 2), (3, 3))


@pytest.mark.parametrize("size,flat", [(64, 1024), (128, 4096)])
def test_base_cnn_linear_follows_image_size(size, flat):
    model = models.build_model("base_cnn", 5, image_size=size).eval()
    assert model.backbone.fc.in_features == flat
    assert model(torch.rand(2, 6, size, size)).shape == (2, 5)


def test_base_cnn_convolutions_are_followed_by_relu():
    # all-negative first filters on a positive image: after a ReLU nothing gets through
    model = models.BaseCNN(3, image_size=32)
    with torch.no_grad():
        model.backbone.conv1.weight.copy_(-model.backbone.conv1.weight.abs())
        logits = model(torch.rand(2, 6, 32, 32) + 0.1)
    assert torch.equal(logits, torch.zeros(2, 3))


def test_base_cnn_rejects_bad_sizes():
    with pytest.raises(ValueError, match="image_size=100"):
        models.BaseCNN(5, image_size=100)
    model = models.BaseCNN(5, image_size=64)
    with pytest.raises(ValueError, match="image_size=64"):
        model(torch.rand(1, 6, 128, 128))


# ---------------------------------------------------------------- torchvision surgery

@pytest.mark.slow  # builds every architecture
@pytest.mark.parametrize("arch", TV_ARCHS)
def test_every_arch_gets_a_six_channel_stem_and_an_n_class_head(arch):
    with torch.device("meta"):
        model = models.build_model(arch, 7)
    conv = _first_rgb_like_conv(model.backbone)
    assert conv.in_channels == 6
    assert not any(isinstance(m, nn.Conv2d) and m.in_channels == 3 for m in model.modules())
    assert model.head.out_features == 7
    head_slot = {"resnet": "fc", "densenet": "classifier", "efficientnet": "classifier.1"}
    slot = next(s for f, s in head_slot.items() if arch.startswith(f))
    assert isinstance(model.backbone.get_submodule(slot), nn.Identity)
    assert not any(isinstance(m, nn.Linear) for m in model.backbone.modules())


def test_stem_keeps_geometry_and_bias_flag():
    model = models.build_model("efficientnet_b0", 3)
    conv = model.backbone.features[0][0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
        6, 32, (3, 3), (2, 2), (1, 1))
    assert conv.bias is None


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("efficientnet_b0", marks=pytest.mark.slow),
                                  pytest.param("densenet121", marks=pytest.mark.slow)])
def test_forward_shape(arch):
    model = models.build_model(arch, 11).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 6, 64, 64)).shape == (2, 11)


def test_in_chans_other_than_six():
    model = models.build_model("resnet18", 4, in_chans=5).eval()
    assert model.backbone.conv1.in_channels == 5
    with torch.no_grad():
        assert model(torch.rand(1, 5, 32, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match=r"\(B,5,H,W\)"):
        model(torch.rand(1, 6, 32, 32))


def test_build_model_rejects_bad_options():
    for kwargs, word in [(dict(arch="vgg16"), "vgg16"), (dict(conv1_init="zeros"), "zeros"),
                         (dict(head="cosface"), "cosface"), (dict(cell_type_dim=4), "n_cell_types"),
                         (dict(dropout=1.0), "dropout"), (dict(n_classes=0), "n_classes")]:
        args = dict(arch="resnet18", n_classes=3) | kwargs
        with pytest.raises(ValueError, match=word):
            models.build_model(**args)


# ---------------------------------------------------------------- pretrained weights

def _save_with_hash_name(state: dict, directory, stem: str):
    tmp = directory / "weights.tmp"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = directory / f"{stem}-{digest[:8]}.pth"
    tmp.rename(path)
    return path


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[nn.Module, Path]:
    """(a random RGB ResNet-18, its weights saved under a torchvision-style hashed name). One 45 MB
    file for the module; each test hard-links it under the name it needs."""
    from torchvision.models import resnet18

    torch.manual_seed(1)
    rgb = resnet18(weights=None)
    return rgb, _save_with_hash_name(rgb.state_dict(), tmp_path_factory.mktemp("weights"), "resnet18")


def _link(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(source, target)
    return target


def test_pretrained_file_loads_before_surgery(tmp_path, resnet18_file):
    rgb, path = resnet18_file
    for mode in ("mean", "repeat"):
        model = models.build_model("resnet18", 5, pretrained=str(path), conv1_init=mode)
        torch.testing.assert_close(model.backbone.conv1.weight,
                                   models.adapt_input_conv(rgb.conv1.weight, 6, mode))
        torch.testing.assert_close(model.backbone.layer3[1].conv2.weight, rgb.layer3[1].conv2.weight)
        torch.testing.assert_close(model.backbone.bn1.running_var, rgb.bn1.running_var)
    # a directory is searched for torchvision's own file names only, not for any *.pth
    _link(path, tmp_path / path.name)
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth"):
        models.build_model("resnet18", 5, pretrained=str(tmp_path))


def test_old_style_densenet_keys_are_renamed(tmp_path):
    from torchvision.models import densenet121

    rgb = densenet121(weights=None)
    old_style = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
                 for k, v in rgb.state_dict().items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_style
    path = _save_with_hash_name(old_style, tmp_path, "densenet121")
    model = models.build_model("densenet121", 3, pretrained=str(path))
    torch.testing.assert_close(model.backbone.features.denseblock2.denselayer3.conv2.weight,
                               rgb.features.denseblock2.denselayer3.conv2.weight)


def test_wrong_hash_and_wrong_arch_are_refused(tmp_path, resnet18_file):
    _, good = resnet18_file
    bad = _link(good, tmp_path / "resnet18-00000000.pth")
    with pytest.raises(ValueError, match="does not match the 00000000"):
        models.build_model("resnet18", 5, pretrained=str(bad))
    with pytest.raises(ValueError, match="does not hold resnet34 weights"):
        models.build_model("resnet34", 5, pretrained=str(good))


def test_file_without_hash_loads_with_a_warning(tmp_path, resnet18_file):
    rgb, saved = resnet18_file
    path = _link(saved, tmp_path / "my_resnet18.pth")
    with pytest.warns(UserWarning, match="without an integrity check"):
        model = models.build_model("resnet18", 2, pretrained=str(path))
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight, rgb.layer1[0].conv1.weight)


def test_missing_file_names_the_file_to_attach(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"attach a Kaggle dataset holding resnet50-11ad3fa6\.pth"):
        models.build_model("resnet50", 5, pretrained=str(tmp_path / "nope.pth"))


def test_hub_cache_lookup_follows_torch_home(tmp_path, monkeypatch, resnet18_file):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"hub/checkpoints.*resnet18-f37072fd\.pth"):
        models.build_model("resnet18", 5, pretrained="hub")
    # torchvision's real name, but our (random) bytes: found, then refused by the hash check
    fake = _link(resnet18_file[1], tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert models.resolve_pretrained_path("resnet18", "hub") == fake
    with pytest.raises(ValueError, match="f37072fd"):
        models.build_model("resnet18", 5, pretrained="hub")


def test_expected_weight_files_put_the_default_first():
    assert models.expected_weight_files("resnet50") == ["resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth"]
    assert models.expected_weight_files("efficientnet_b0") == ["efficientnet_b0_rwightman-7f5810bc.pth"]


# ---------------------------------------------------------------- heads, cell types, loss

def test_cell_type_embedding_changes_the_logits():
    torch.manual_seed(0)
    model = models.build_model("resnet18", 4, n_cell_types=4, cell_type_dim=3).eval()
    x = torch.rand(1, 6, 32, 32).expand(2, -1, -1, -1)
    with torch.no_grad():
        same = model(x, torch.tensor([2, 2]))
        different = model(x, torch.tensor([0, 3]))
    torch.testing.assert_close(same[0], same[1])
    assert not torch.allclose(different[0], different[1])
    assert model.head.in_features == 512 + 3
    with pytest.raises(ValueError, match="cell_type"):
        model(x)


def test_arcface_head_is_a_scaled_cosine():
    torch.manual_seed(0)
    model = models.build_model("resnet18", 6, head="arcface", arcface_scale=16.0).eval()
    x = torch.rand(3, 6, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = model.backbone(x)
    assert logits.abs().max() <= 16.0 + 1e-4
    expected = 16.0 * F.cosine_similarity(features[:, None, :], model.head.weight[None], dim=2)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model.head(features * 10), logits, rtol=1e-4, atol=1e-4)


def test_margin_cross_entropy():
    torch.manual_seed(0)
    scale = 30.0
    logits = scale * (torch.rand(8, 10) * 1.6 - 0.8)
    target = torch.randint(0, 10, (8,))
    plain = F.cross_entropy(logits, target)
    torch.testing.assert_close(models.margin_cross_entropy(logits, target, 0.0, scale), plain)
    torch.testing.assert_close(models.margin_cross_entropy(logits, target, 0.0, scale, label_smoothing=0.1),
                               F.cross_entropy(logits, target, label_smoothing=0.1))
    assert models.margin_cross_entropy(logits, target, 0.5, scale) > plain
    # one sample worked by hand: cos 0.5 (60 degrees) on the target, 0.2 elsewhere
    one = torch.tensor([[0.5, 0.2]]) * scale
    expected = F.cross_entropy(torch.tensor([[math.cos(math.acos(0.5) + 0.5), 0.2]]) * scale, torch.tensor([0]))
    torch.testing.assert_close(models.margin_cross_entropy(one, torch.tensor([0]), 0.5, scale), expected)
    # past pi - m the margin must still lower the target logit, never raise it
    far = torch.tensor([[-0.99, 0.0]]) * scale
    assert models.margin_cross_entropy(far, torch.tensor([0]), 0.5, scale) > F.cross_entropy(far, torch.tensor([0]))


# ---------------------------------------------------------------- head-only training

def test_frozen_backbone_leaves_only_head_and_embedding_trainable():
    model = models.build_model("resnet18", 3, n_cell_types=2, cell_type_dim=4)
    models.set_backbone_trainable(model, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias", "cell_type_embedding.weight"}
    assert {id(p) for p in models.head_parameters(model)} == {
        id(p) for n, p in model.named_parameters() if n in trainable}
    loss = model(torch.rand(2, 6, 32, 32), torch.tensor([0, 1])).sum()
    loss.backward()
    assert model.backbone.conv1.weight.grad is None and model.head.weight.grad is not None
    models.set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


def test_describe_model():
    model = models.build_model("base_cnn", 9, image_size=64, head="arcface")
    info = models.describe_model(model)
    n_expected = 16 * 6 * 49 + 64 * 16 * 49 + 2216 * 1024 + 9 * 2216
    assert info == {"arch": "base_cnn", "in_chans": 6, "n_classes": 9, "head": "arcface", "cell_type_dim": 0,
                    "pretrained": "none (base_cnn has no ImageNet weights)",
                    "n_params": n_expected, "n_trainable_params": n_expected}


def test_resnets_from_scratch_start_with_zero_residual_branches():
    # from scratch the last BN of every residual block starts at gamma 0 (fast early training);
    # the other BNs keep gamma 1
    model = models.build_model("resnet18", n_classes=5)
    blocks = [m for m in model.modules() if m.__class__.__name__ == "BasicBlock"]
    assert len(blocks) == 8
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    assert all(torch.all(b.bn1.weight == 1) for b in blocks)
