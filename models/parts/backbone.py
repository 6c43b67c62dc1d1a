"""ResNet backbone (torchvision blocks, built without downloading) returning the image and C2..C5.

Behaviour of MaSS13K's ``ResNet_m`` (its output 0 is the input image): plain 7x7 stem, pytorch style, and BN
layers with frozen affines (``requires_grad=False`` on weight and bias) whose running statistics still update
in train mode (``norm_eval=False``). Plain ``BatchNorm2d``, not SyncBN. Parameter names match torchvision's,
so an ImageNet ``resnet50-0676ba61.pth`` loads with `models.weights.load_backbone_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


class ResNetBackbone(nn.Module):
    """ResNet feature extractor: (image, C2 s4, C3 s8, C4 s16, C5 s32)."""

    def __init__(
        self,
        *,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        freeze_bn_affine: bool = True,
    ) -> None:
        """Builds the backbone with torchvision's default (random) init.

        Args:
            block: torchvision ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50+).
            layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
            freeze_bn_affine: set ``requires_grad=False`` on every BN weight and bias, as the reference does.
        """
        super().__init__()
        net = ResNet(block, list(layers))
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = [64 * block.expansion * 2**i for i in range(4)]
        if freeze_bn_affine:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Extracts features.

        Args:
            image: B x 3 x H x W normalized image.

        Returns:
            (image, C2 B x c1 x H/4 x W/4, C3 at H/8, C4 at H/16, C5 at H/32), channels ``out_channels``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(image))))  # B x 64 x H/4 x W/4
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return image, c2, c3, c4, c5
