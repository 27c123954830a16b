"""Models of the paper: the two-layer NTK network, CIFAR ResNets (Fixup, GroupNorm, BatchNorm), an MLP."""

from ...nn import ScalarBias, ScalarScale
from . import mlp, resnet, two_layer  # noqa: F401  (registers the builders)
from .mlp import activation
from .registry import get_model, list_models, register_model
from .resnet import ResNet
from .two_layer import TwoLayerNet

__all__ = [
    "ResNet",
    "ScalarBias",
    "ScalarScale",
    "TwoLayerNet",
    "activation",
    "get_model",
    "list_models",
    "register_model",
]
