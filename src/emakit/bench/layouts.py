"""The benchmark's models: DESIGN.md's ``convnet`` and ``many_small`` layouts, a ResNet-18-shaped module."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LAYOUTS", "ResNet18", "TensorBag", "convnet_sizes", "many_small_sizes"]


class TensorBag(nn.Module):
    """Plain 1-D parameters of the given sizes, so peers that walk ``model.parameters()`` see them.

    Example::

        >>> TensorBag([3, 5])(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(n)) for n in sizes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Per-channel means of ``images`` times the mean of the first tensor: logits, so that a Trainer runs it."""
        return F.adaptive_avg_pool2d(images, 1).flatten(1) * self.tensors[0].mean()


def convnet_sizes(count: int = 300, shrink: int = 1) -> list[int]:
    """``convnet``: per tensor ``r.choice([64, ..., 2048]) * r.choice([1, ..., 512])``, ``r = Random(0)``.

    39,368,704 elements in 300 tensors; ``count`` and ``shrink`` make the tiny variant for tests.
    """
    r = random.Random(0)
    return [
        max(1, r.choice([64, 256, 512, 1024, 2048]) * r.choice([1, 9, 64, 256, 512]) // shrink) for _ in range(count)
    ]


def many_small_sizes(count: int = 2000, shrink: int = 1) -> list[int]:
    """``many_small``: per tensor ``r.choice([64, 128, 256, 1024, 4096])``, ``r = Random(1)``.

    2,416,448 elements in 2000 tensors; ``count`` and ``shrink`` make the tiny variant for tests.
    """
    r = random.Random(1)
    return [max(1, r.choice([64, 128, 256, 1024, 4096]) // shrink) for _ in range(count)]


class _BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with BatchNorm and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18's shape from plain layers (no torchvision, no download).

    At ``width=64``: 11,689,512 parameters in 62 tensors, plus 60 BatchNorm buffers.

    Example::

        >>> ResNet18(width=8, num_classes=10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        blocks, cin = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**stage
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(x), 1), 1))


# name -> build(quick): quick gives a tiny model of the same shape, for tests
LAYOUTS: dict[str, Callable[[bool], nn.Module]] = {
    "convnet": lambda quick: TensorBag(convnet_sizes(30, 64) if quick else convnet_sizes()),
    "many_small": lambda quick: TensorBag(many_small_sizes(200, 16) if quick else many_small_sizes()),
    "resnet18": lambda quick: ResNet18(width=8 if quick else 64),
}
