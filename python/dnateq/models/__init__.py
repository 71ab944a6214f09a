"""Model definitions: the paper's networks and the small ones used by tests.

- :func:`alexnet`, :func:`resnet50`: torchvision ImageNet CNNs (``weights=``
  None, a weights enum / its name, or a local checkpoint path).
- :class:`TransformerTranslator`, :func:`transformer_base`: Transformer-base
  on ``nn.Transformer`` with separate Q/K/V projections (the paper's 96 FC
  layers).
- CIFAR-10 ResNets (:func:`resnet20`, :func:`resnet32`,
  :func:`pretrained_cifar_resnet` for the trained weights in ../shared/data).
"""
from .cifar_resnet import (cifar_resnet, load_cifar_resnet, pretrained_cifar_resnet, resnet20,
                           resnet32, shared_data_dir)
from .imagenet import alexnet, hub_checkpoint_path, resnet50, torchvision_model
from .transformer import (PAPER_FC_LAYERS, PAPER_SKIP, TransformerTranslator, Vocab,
                          paper_fc_layers, split_qkv, transformer_base, translation_batches)

__all__ = ["cifar_resnet", "resnet20", "resnet32", "load_cifar_resnet",
           "pretrained_cifar_resnet", "shared_data_dir",
           "alexnet", "resnet50", "torchvision_model", "hub_checkpoint_path",
           "TransformerTranslator", "transformer_base", "split_qkv", "paper_fc_layers",
           "PAPER_FC_LAYERS", "PAPER_SKIP", "Vocab", "translation_batches"]
