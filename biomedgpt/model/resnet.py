"""ResNet stages 1-3 image backbone (BiomedGPT models/ofa/resnet.py): stride 16, 1024 channels, no layer4/pooling."""

from __future__ import annotations

import torch
from torch import nn

from biomedgpt.model.layers import DropPath


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine terms, stored as buffers under BatchNorm's key names.

    Used to fine-tune on few devices, where per-device batch statistics are too noisy (OFA issue #229).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Checkpoints written with trainable BatchNorm carry a counter this module does not need.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def make_batch_norm(kind: str, num_features: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(num_features)
    if kind == "frozen":
        return FrozenBatchNorm2d(num_features)
    if kind == "sync":
        return nn.SyncBatchNorm(num_features, eps=1e-3)
    raise ValueError(f"unknown resnet_norm {kind!r}")


class Bottleneck(nn.Module):
    """torchvision-style bottleneck ("ResNet v1.5": stride on the 3x3 conv), drop-path on the residual branch."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        norm: str,
        downsample: nn.Module | None,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = make_batch_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = make_batch_norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, width, kernel_size=1, bias=False)
        self.bn3 = make_batch_norm(norm, width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + self.drop_path(out))


class ResNetBackbone(nn.Module):
    """Stem + layer1..3 of a ResNet; ``layers`` gives the block count per stage ([3,4,6] for resnet50)."""

    out_channels = 1024

    def __init__(self, layers: tuple[int, int, int], norm: str = "batch", drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.norm = norm
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_batch_norm(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], stride=1, drop_path_rate=drop_path_rate)
        self.layer2 = self._make_layer(128, layers[1], stride=2, drop_path_rate=drop_path_rate)
        self.layer3 = self._make_layer(256, layers[2], stride=2, drop_path_rate=drop_path_rate)

    def _make_layer(self, planes: int, blocks: int, stride: int, drop_path_rate: float) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
            make_batch_norm(self.norm, planes * Bottleneck.expansion),
        )
        rates = torch.linspace(0, drop_path_rate, blocks, device="cpu").tolist()
        modules = [Bottleneck(self.inplanes, planes, stride, self.norm, downsample, 0.0)]
        self.inplanes = planes * Bottleneck.expansion
        modules += [Bottleneck(self.inplanes, planes, 1, self.norm, None, rates[i]) for i in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer3(self.layer2(self.layer1(x)))
