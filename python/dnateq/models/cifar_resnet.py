"""CIFAR-10 ResNets of He et al. (2016): 6n+2 layers, option-A shortcuts.

A 3x3 conv (16 channels) + BN + ReLU, three stages of ``n`` BasicBlocks (16,
32, 64 channels; stride 2 at the start of stages 2 and 3), global average
pooling and ``Linear(64, 10)``. Where a block changes shape its shortcut is
"option A": ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))``
(no parameters). State-dict names: ``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv1/bn1/conv2/bn2``, ``linear``.

Inputs: scaled to [0, 1], then normalized per channel with
:data:`CIFAR_MEAN` and :data:`CIFAR_STD`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet", "resnet20", "resnet32",
           "load_cifar_resnet", "CIFAR_MEAN", "CIFAR_STD", "normalize_images",
           "shared_data_dir", "pretrained_cifar_resnet"]

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images -> float32 normalized inputs."""
    x = images.float() / 255.0
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is None:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks, num_classes: int = 10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1)
        self.layer2 = self._make_layer(32, num_blocks[1], 2)
        self.layer3 = self._make_layer(64, num_blocks[2], 2)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int = 20, num_classes: int = 10) -> CifarResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet([n, n, n], num_classes)


def resnet20() -> CifarResNet:
    return cifar_resnet(20)


def resnet32() -> CifarResNet:
    return cifar_resnet(32)


def load_cifar_resnet(path: str, depth: Optional[int] = None) -> CifarResNet:
    """Build the network and load a checkpoint (``["state_dict"]`` with keys
    prefixed ``module.``, as in ../shared/data)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    if depth is None:
        blocks = {k.split(".")[1] for k in sd if k.startswith("layer1.")}
        depth = 6 * len(blocks) + 2
    model = cifar_resnet(depth)
    model.load_state_dict(sd)
    return model.eval()


# ---------------------------------------------------------------------------
# the pretrained weights in ../shared/data
# ---------------------------------------------------------------------------

def shared_data_dir() -> str:
    """The real evaluation assets: ``$DNATEQ_SHARED_DATA`` if set, else
    ``../shared/data`` beside the project checkout (they are never part of the
    project itself). The directory may not exist (a fresh clone)."""
    import os
    env = os.environ.get("DNATEQ_SHARED_DATA")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))   # <root>/python/dnateq/models
    return os.path.normpath(os.path.join(here, "..", "..", "..", "..", "shared", "data"))


def pretrained_cifar_resnet(depth: int = 20, data_dir: Optional[str] = None) -> CifarResNet:
    """ResNet-20 or ResNet-32 with the trained CIFAR-10 weights
    ``resnet{depth}_cifar10.th`` of :func:`shared_data_dir` (or ``data_dir``),
    in eval mode. Float32 top-1 on the 761 shared test images: 91.72 %
    (ResNet-20), 93.17 % (ResNet-32)."""
    import os
    d = data_dir or shared_data_dir()
    path = os.path.join(d, f"resnet{depth}_cifar10.th")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"dnateq.models.pretrained_cifar_resnet: {path!r} not found; the CIFAR weights "
            "live in ../shared/data beside the project (set DNATEQ_SHARED_DATA or pass "
            "data_dir=)")
    from ._checkpoint import load_into, read_state_dict
    what = "dnateq.models.pretrained_cifar_resnet"
    # weights_only: a trusted location still should not run code from a file
    sd = read_state_dict(path, what=what)
    return load_into(cifar_resnet(depth), sd, what=what, source=path).eval()
