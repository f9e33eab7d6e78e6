"""Model registry: architectures by name, written here without torchvision.

Each architecture module registers its constructors with :func:`register_model`; a constructor takes
``num_classes`` (and optional keyword arguments) and returns an ``nn.Module``.
"""

from __future__ import annotations

# Importing the architecture modules fills the registry.
from hpcgraft.models import cifar_resnet, digits, imagenet_resnet, mobilenetv2, vgg  # noqa: F401
from hpcgraft.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
