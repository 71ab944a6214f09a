"""Small model definitions used by tests and examples."""
from .cifar_resnet import cifar_resnet, load_cifar_resnet, resnet20, resnet32

__all__ = ["cifar_resnet", "resnet20", "resnet32", "load_cifar_resnet"]
