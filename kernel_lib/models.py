"""Models: the seed's base CNN and torchvision backbones adapted to 6-channel sites.

Every model is a `Classifier`: ``forward(x (B,C,H,W) float, cell_type (B,) int64 | None)
-> logits (B, n_classes)``. A torchvision backbone keeps torchvision's module names under
``backbone.``; only its first convolution (now ``in_chans`` wide) and its head (moved to
``head.``) differ, so ImageNet weights load into the RGB network before the surgery.

Pretrained weights never come from the network: ``pretrained`` is "" (none), a local file,
a directory holding torchvision's file, "hub" (the torch hub cache), or "auto": torchvision's file
wherever it is found (the hub cache, else anywhere under the Kaggle inputs, `find_pretrained`),
and from scratch with a warning when it is nowhere; the model's ``pretrained_source`` says which
file was used or why none was. A file named ``<name>-<hex>.pth``, as torchvision names them, must
have a SHA-256 starting with <hex>.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.hub import get_dir
from torchvision.models import get_model, get_model_weights

# Families differ only in where torchvision puts the classification layer.
_HEAD_SLOT_BY_FAMILY = {"resnet": "fc", "densenet": "classifier", "efficientnet": "classifier.1"}
SUPPORTED_ARCHS: tuple[str, ...] = (
    "base_cnn",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
)
CONV1_INITS = ("repeat", "mean", "random")
HEADS = ("linear", "arcface", "combined")
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})$")
# torchvision's DenseNet files predate its module names: "norm.1" is now "norm1".
_OLD_DENSENET_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


# ---------------------------------------------------------------- first convolution

def adapt_input_conv(weight: Tensor, in_chans: int, mode: str) -> Tensor:
    """Turn RGB filters (O,3,k,k) into filters (O,in_chans,k,k).

    "repeat": tile the RGB filters and scale by 3/in_chans, so an input equal in every
    channel gives the same response as before (exactly so when in_chans is a multiple of 3;
    in_chans=1 sums the RGB filters). "mean": the RGB mean in every channel (the seed's way).
    "random": a fresh Kaiming-normal init, as torchvision initialises its convolutions.
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"adapt_input_conv: expected RGB filters (O,3,k,k), got shape {tuple(weight.shape)}")
    if in_chans < 1:
        raise ValueError(f"adapt_input_conv: in_chans must be >= 1, got {in_chans}")
    out_chans, _, kh, kw = weight.shape
    w = weight.detach().float()
    if mode == "repeat":
        if in_chans == 1:
            adapted = w.sum(dim=1, keepdim=True)
        else:
            adapted = w.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3 / in_chans)
    elif mode == "mean":
        adapted = w.mean(dim=1, keepdim=True).expand(-1, in_chans, -1, -1).clone()
    elif mode == "random":
        adapted = torch.empty(out_chans, in_chans, kh, kw, device=w.device)
        nn.init.kaiming_normal_(adapted, mode="fan_out", nonlinearity="relu")
    else:
        raise ValueError(f"adapt_input_conv: unknown mode {mode!r}; expected one of {CONV1_INITS}")
    return adapted.to(weight.dtype)


def replace_first_conv(net: nn.Module, in_chans: int, mode: str) -> str:
    """Swap the first 3-channel nn.Conv2d (module order) for an in_chans one; return its name.

    Kernel, stride, padding, dilation and bias are kept; the weights are adapted from the
    current (possibly pretrained) RGB weights by `adapt_input_conv`.
    """
    name, old = next(((n, m) for n, m in net.named_modules()
                      if isinstance(m, nn.Conv2d) and m.in_channels == 3), (None, None))
    if old is None:
        raise ValueError(f"{type(net).__name__} has no nn.Conv2d with 3 input channels to adapt")
    if old.groups != 1:
        raise ValueError(f"first convolution {name} is grouped (groups={old.groups}); cannot adapt it")
    new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None, padding_mode=old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(old.weight, in_chans, mode))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    _set_submodule(net, name, new)
    return name


def _set_submodule(net: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, child, module)


# ---------------------------------------------------------------- heads and the classifier

class CosineHead(nn.Module):
    """ArcFace-style head: scale * cos(angle between features and each class weight).

    (B,F) -> (B,n_classes) in [-scale, scale]; `margin_cross_entropy` adds the margin.
    """

    def __init__(self, n_features: int, n_classes: int, scale: float = 30.0):
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(n_classes, n_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, features: Tensor) -> Tensor:
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1)) * self.scale


class CombinedHead(nn.Module):
    """The 1st place's head: a linear (softmax) head and a `CosineHead` (ArcFace) on the same features.

    ``forward`` gives the softmax logits (B,n_classes): what predicts. ``both`` gives (B, 2*n_classes),
    the softmax logits then the cosine logits, for the combined loss (train.py).
    """

    def __init__(self, n_features: int, n_classes: int, scale: float = 30.0, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(n_features, n_classes, bias=bias)
        self.cosine = CosineHead(n_features, n_classes, scale)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)

    def both(self, features: Tensor) -> Tensor:
        return torch.cat([self.linear(features), self.cosine(features)], dim=1)


class Classifier(nn.Module):
    """backbone (B,C,H,W) -> pooled features (B,F); [+ cell-type embedding]; [dropout]; head.

    The cell-type embedding (the 2019 winners' trick) is concatenated to the pooled features
    and counts as part of the head for `head_parameters`. With head="combined",
    ``forward(x, cell_type, all_heads=True)`` returns both heads' logits (`CombinedHead.both`).
    """

    def __init__(self, backbone: nn.Module, n_features: int, n_classes: int, *, arch: str, in_chans: int,
                 head: str = "linear", head_bias: bool = True, n_cell_types: int = 0, cell_type_dim: int = 0,
                 dropout: float = 0.0, arcface_scale: float = 30.0):
        super().__init__()
        _check_head_options(n_classes, head, n_cell_types, cell_type_dim, dropout)
        self.arch, self.in_chans, self.n_classes, self.head_kind = arch, in_chans, n_classes, head
        self.backbone = backbone
        self.cell_type_embedding = nn.Embedding(n_cell_types, cell_type_dim) if cell_type_dim > 0 else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        n_in = n_features + cell_type_dim
        if head == "linear":
            self.head = nn.Linear(n_in, n_classes, bias=head_bias)
        elif head == "arcface":
            self.head = CosineHead(n_in, n_classes, arcface_scale)
        else:
            self.head = CombinedHead(n_in, n_classes, arcface_scale, bias=head_bias)

    def forward(self, x: Tensor, cell_type: Tensor | None = None, all_heads: bool = False) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"{self.arch}: expected input (B,{self.in_chans},H,W), got {tuple(x.shape)}")
        features = self.backbone(x)
        if self.cell_type_embedding is not None:
            if cell_type is None or cell_type.shape != (x.shape[0],):
                got = None if cell_type is None else tuple(cell_type.shape)
                raise ValueError(f"{self.arch} has a cell-type embedding: pass cell_type of shape "
                                 f"({x.shape[0]},) int64, got {got}")
            features = torch.cat([features, self.cell_type_embedding(cell_type)], dim=1)
        features = self.dropout(features)
        if all_heads and isinstance(self.head, CombinedHead):
            return self.head.both(features)
        return self.head(features)


def _check_head_options(n_classes: int, head: str, n_cell_types: int, cell_type_dim: int, dropout: float) -> None:
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    if cell_type_dim < 0 or (cell_type_dim > 0 and n_cell_types < 1):
        raise ValueError(f"cell_type_dim={cell_type_dim} needs n_cell_types >= 1, got n_cell_types={n_cell_types}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


# ---------------------------------------------------------------- the seed's base CNN

class SeedConvFeatures(nn.Module):
    """The seed's feature extractor: (B,C,s,s) -> (B,2216), s divisible by 16.

    The seed describes no nonlinearity; without one its two convolutions and two linear
    layers would collapse into one linear map, so a ReLU follows each convolution.
    """

    def __init__(self, image_size: int = 512, in_chans: int = 6, n_features: int = 2216):
        super().__init__()
        if image_size < 16 or image_size % 16:
            raise ValueError(f"base_cnn needs image_size divisible by 16 (two stride-2 convs and two "
                             f"2x2 max-pools), got image_size={image_size}")
        self.image_size = image_size
        self.conv1 = nn.Conv2d(in_chans, 16, kernel_size=7, stride=2, padding=3, bias=False)
        self.conv2 = nn.Conv2d(16, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.fc = nn.Linear(64 * (image_size // 16) ** 2, n_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"base_cnn was built for image_size={self.image_size}, got input {tuple(x.shape)}")
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class BaseCNN(Classifier):
    """The seed's base CNN: Conv(6->16,k7,s2) + pool, Conv(16->64,k7,s2) + pool,
    Linear(64*(s/16)^2 -> 2216) -> Linear(2216 -> n_classes), no biases.
    (B,in_chans,s,s) -> (B,n_classes)."""

    def __init__(self, n_classes: int, image_size: int = 512, in_chans: int = 6, **head_options):
        super().__init__(SeedConvFeatures(image_size, in_chans), 2216, n_classes, arch="base_cnn",
                         in_chans=in_chans, head_bias=False, **head_options)


# ---------------------------------------------------------------- pretrained weights, offline

def expected_weight_files(arch: str) -> list[str]:
    """torchvision's ImageNet file names for arch, its default first (read from the weights enum)."""

    weights = get_model_weights(arch)
    ordered = [weights.DEFAULT] + [w for w in weights if w is not weights.DEFAULT]
    return [w.url.rsplit("/", 1)[-1] for w in ordered]


def _attach_hint(arch: str) -> str:
    name = expected_weight_files(arch)[0]
    return f"attach a Kaggle dataset holding {name} and pass pretrained=/kaggle/input/.../{name}"


def resolve_pretrained_path(arch: str, pretrained: str) -> Path:
    """The weight file that `pretrained` ("hub", a file or a directory) names for arch."""
    if pretrained == "hub":
        directory = Path(get_dir()) / "checkpoints"
    else:
        path = Path(pretrained).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            raise FileNotFoundError(f"pretrained weights {path} not found; {_attach_hint(arch)}")
        directory = path
    names = expected_weight_files(arch)
    found = next((directory / n for n in names if (directory / n).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"no {arch} ImageNet weights in {directory} (looked for {', '.join(names)}); "
                                f"{_attach_hint(arch)}")
    return found


def check_file_hash(path: Path) -> None:
    """Check that the file's SHA-256 starts with the hex digits after the last '-' of its stem.

    Names without such digits are loaded unchecked, with a warning.
    """
    match = _HASH_IN_NAME.search(path.stem)
    if match is None:
        warnings.warn(f"{path}: no -<sha256 prefix> in the file name; loading without an integrity check")
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(match.group(1)):
        raise ValueError(f"{path}: SHA-256 {digest.hexdigest()[:len(match.group(1))]} does not match the "
                         f"{match.group(1)} in its name; the file is corrupt or not the one its name claims")


def load_pretrained_backbone(net: nn.Module, arch: str, pretrained: str) -> Path:
    """Load ImageNet weights into the unmodified (RGB, 1000-class) torchvision net, in place.

    Returns the file used. Raises FileNotFoundError naming the file to attach, ValueError on
    a hash mismatch or weights of another architecture.
    """
    path = resolve_pretrained_path(arch, pretrained)
    check_file_hash(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a plain state dict of tensors (as torchvision saves them)")
    state = {_OLD_DENSENET_KEY.sub(r"\1\2.", k): v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not hold {arch} weights:\n{err}") from err
    return path


def find_pretrained(arch: str, search_dirs: list[str] | tuple[str, ...] = ()) -> Path | None:
    """torchvision's ImageNet file for arch in the torch hub cache, ``search_dirs`` or the Kaggle
    inputs ($KAGGLE_ROOT/input, default /kaggle/input), searched 6 folders deep; None if nowhere."""

    names = expected_weight_files(arch)
    kaggle_input = Path(os.environ.get("KAGGLE_ROOT", "/kaggle")) / "input"
    for root in [Path(get_dir()) / "checkpoints", *map(Path, search_dirs), kaggle_input]:
        if not root.is_dir():
            continue
        for depth in range(7):
            for name in names:
                found = sorted(root.glob("/".join(["*"] * depth + [name])))
                if found:
                    return found[0]
    return None


# ---------------------------------------------------------------- building

def _head_slot(arch: str) -> str:
    return next(slot for family, slot in _HEAD_SLOT_BY_FAMILY.items() if arch.startswith(family))


def build_model(arch: str, n_classes: int, in_chans: int = 6, pretrained: str = "", conv1_init: str = "mean",
                head: str = "linear", n_cell_types: int = 0, cell_type_dim: int = 0, image_size: int = 512,
                dropout: float = 0.0, arcface_scale: float = 30.0,
                search_dirs: list[str] | tuple[str, ...] = ()) -> Classifier:
    """A `Classifier` for arch (see SUPPORTED_ARCHS): (B,in_chans,H,W) -> logits (B,n_classes).

    image_size matters only for base_cnn (torchvision backbones pool adaptively); pretrained
    and conv1_init only for torchvision backbones. ``search_dirs``: where pretrained="auto" also
    looks. The model's ``pretrained_source`` records the weights file or "none (...)".
    """
    head_options = dict(head=head, n_cell_types=n_cell_types, cell_type_dim=cell_type_dim,
                        dropout=dropout, arcface_scale=arcface_scale)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {SUPPORTED_ARCHS}")
    if conv1_init not in CONV1_INITS:
        raise ValueError(f"unknown conv1_init {conv1_init!r}; expected one of {CONV1_INITS}")
    _check_head_options(n_classes, head, n_cell_types, cell_type_dim, dropout)  # before any backbone is built
    if arch == "base_cnn":
        if pretrained not in ("", "auto"):
            raise ValueError("base_cnn has no pretrained weights; pass pretrained=''")
        model = BaseCNN(n_classes, image_size, in_chans, **head_options)
        model.pretrained_source = "none (base_cnn has no ImageNet weights)"
        return model

    source = ""
    if pretrained == "auto":
        found = find_pretrained(arch, search_dirs)
        if found is None:
            source = (f"none (pretrained='auto': no {arch} ImageNet weights file found; trained from scratch; "
                      f"{_attach_hint(arch)})")
            warnings.warn(f"ImageNet weights: {source}")
            pretrained = ""
        else:
            pretrained = str(found)
    if pretrained:  # a missing file is named before anything is built
        pretrained = str(resolve_pretrained_path(arch, pretrained))
    # From scratch, a ResNet whose residual branches start at zero (the last BN of each block has
    # gamma 0) trains much faster (Goyal et al. 2017): measured here, ResNet-50 on the synthetic
    # set reached 0.97 validation accuracy in 6 epochs instead of 0.18.
    options = {"zero_init_residual": True} if arch.startswith("resnet") and not pretrained else {}
    net = get_model(arch, weights=None, **options)
    if pretrained:
        source = str(load_pretrained_backbone(net, arch, pretrained))
    replace_first_conv(net, in_chans, conv1_init)
    slot = _head_slot(arch)
    n_features = net.get_submodule(slot).in_features
    _set_submodule(net, slot, nn.Identity())
    model = Classifier(net, n_features, n_classes, arch=arch, in_chans=in_chans, **head_options)
    model.pretrained_source = source or "none (pretrained='': trained from scratch)"
    return model


# ---------------------------------------------------------------- training helpers

def margin_cross_entropy(logits: Tensor, target: Tensor, margin: float, scale: float,
                         label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """ArcFace loss for a `CosineHead`: logits (B,C) = scale*cos, target (B,) int64 -> scalar.

    The target class's angle gets the additive margin, cos(theta + m); beyond theta = pi - m,
    where cos(theta + m) would rise again, it falls back to cos(theta) - m*sin(m) to stay
    monotonic. margin=0 is plain cross-entropy. ``reduction`` as in F.cross_entropy.
    """
    if margin == 0:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)
    cos = (logits.float() / scale).clamp(-1 + 1e-7, 1 - 1e-7)
    cos_target = cos.gather(1, target[:, None])
    sin_target = (1 - cos_target ** 2).sqrt()
    with_margin = cos_target * math.cos(margin) - sin_target * math.sin(margin)
    with_margin = torch.where(cos_target > math.cos(math.pi - margin), with_margin,
                              cos_target - margin * math.sin(margin))
    cos = cos.scatter(1, target[:, None], with_margin)
    return F.cross_entropy(cos * scale, target, label_smoothing=label_smoothing, reduction=reduction)


def head_parameters(model: Classifier) -> list[nn.Parameter]:
    """The head's parameters, the cell-type embedding included."""
    extra = [] if model.cell_type_embedding is None else list(model.cell_type_embedding.parameters())
    return list(model.head.parameters()) + extra


def set_backbone_trainable(model: Classifier, trainable: bool) -> None:
    """Freeze or unfreeze the backbone (the seed trained only the head for 2 epochs).

    Only requires_grad changes: BatchNorm statistics still update in train mode.
    """
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)


def describe_model(model: Classifier) -> dict:
    """Flat facts about a model, for metrics files."""
    return {
        "arch": model.arch,
        "in_chans": model.in_chans,
        "n_classes": model.n_classes,
        "head": model.head_kind,
        "pretrained": getattr(model, "pretrained_source", ""),
        "cell_type_dim": 0 if model.cell_type_embedding is None else model.cell_type_embedding.embedding_dim,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
