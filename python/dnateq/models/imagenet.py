"""The paper's ImageNet CNNs: torchvision AlexNet and ResNet-50.

``weights`` selects what the network is initialized with:

- ``None``: random initialization (no file needed);
- a torchvision weights enum member, its name (``"IMAGENET1K_V1"``,
  ``"AlexNet_Weights.IMAGENET1K_V1"``) or ``"DEFAULT"``: the published
  weights, read from torch hub's cache (``torch.hub.get_dir()/checkpoints/``)
  and downloaded there when missing. Offline, a missing file raises a
  ``RuntimeError`` that says where to put it (or to pass a local path);
- a local file path: a state dict (also inside ``{"state_dict": ...}`` /
  ``{"model": ...}`` wrappers, ``module.`` prefixes removed), loaded with
  ``torch.load(weights_only=True)``; a whole pickled model only with
  ``trust_checkpoint=True``. The number of classes follows the checkpoint.

The paper evaluates the ILSVRC-2012 ``IMAGENET1K_V1`` models (AlexNet 56.5 %,
ResNet-50 76.1 % top-1 in torchvision's tables). Use
``dnateq.eval.imagenet_transforms(weights)`` for the matching preprocessing.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn as nn

from ._checkpoint import load_into, looks_like_path, read_state_dict

__all__ = ["alexnet", "resnet50", "torchvision_model", "hub_checkpoint_path"]

# Where each architecture keeps its classifier, to size it from a checkpoint.
_HEADS = {"alexnet": "classifier.6.weight", "resnet50": "fc.weight"}


def hub_checkpoint_path(weights) -> str:
    """Where torchvision looks for (and downloads) the file of a weights enum:
    ``torch.hub.get_dir()/checkpoints/<file name of its URL>``."""
    from urllib.parse import urlparse
    name = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def torchvision_model(arch: str, weights: Any = None, *, progress: bool = True,
                      trust_checkpoint: bool = False, **kwargs) -> nn.Module:
    """A torchvision classification model ``arch`` (``"alexnet"``, ``"resnet50"``,
    or any name ``torchvision.models.get_model`` knows) with ``weights`` as in
    this module's docstring; returned in eval mode on the CPU. ``kwargs`` go to
    the torchvision builder (e.g. ``num_classes`` with ``weights=None``)."""
    import torchvision
    from ..eval import distributed as D
    from ..eval.imagenet import resolve_weights
    what = f"dnateq.models.{arch}"
    if isinstance(weights, (str, os.PathLike)) and looks_like_path(weights) \
            and not _is_enum_name(weights):
        sd = read_state_dict(weights, what=what, trust_checkpoint=trust_checkpoint)
        head = _HEADS.get(arch)
        if head in sd and "num_classes" not in kwargs:
            kwargs["num_classes"] = int(sd[head].shape[0])
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        load_into(model, sd, what=what, source=os.fspath(weights))
        return model.eval()
    try:
        w = resolve_weights(weights, arch)
    except ValueError as e:
        msg = str(e)[len("dnateq: "):] if str(e).startswith("dnateq: ") else str(e)
        raise ValueError(f"{what}: {msg}; or pass a local checkpoint path") from None
    if w is None:
        return torchvision.models.get_model(arch, weights=None, **kwargs).eval()
    path = hub_checkpoint_path(w)
    # Under torchrun only rank 0 downloads; the others wait and read its file.
    err: Optional[BaseException] = None
    if D.is_main_process() and not os.path.exists(path):
        try:
            w.get_state_dict(progress=progress, check_hash=True)
        except Exception as e:  # offline: URLError/OSError/HTTP errors
            err = _missing_weights_error(what, w, path, e)
    D.raise_if_any_failed(err, f"downloading {w}")
    try:
        model = torchvision.models.get_model(arch, weights=w, progress=progress, **kwargs)
    except Exception as e:
        if not os.path.exists(path):
            raise _missing_weights_error(what, w, path, e) from None
        raise RuntimeError(f"{what}: the cached weights file {path!r} of {w} cannot be "
                           f"loaded ({type(e).__name__}: {e}); it may be a partial download: "
                           "delete it and retry, or pass a local checkpoint path") from None
    return model.eval()


def _is_enum_name(s) -> bool:
    # "AlexNet_Weights.IMAGENET1K_V1" contains no separator but a dot; it is a
    # file only if it exists.
    return isinstance(s, str) and "_Weights." in s and not os.path.exists(s)


def _missing_weights_error(what: str, w, path: str, e: BaseException) -> RuntimeError:
    return RuntimeError(
        f"{what}: the weights {w} are not in the local cache and could not be downloaded "
        f"({type(e).__name__}: {e}). Offline, download {w.url} elsewhere and place it at "
        f"{path!r} (torch.hub.get_dir()/checkpoints/; set TORCH_HOME to move it), or pass "
        f"the file's path as weights='/path/to/{os.path.basename(path)}'.")


def alexnet(weights: Any = None, *, progress: bool = True, trust_checkpoint: bool = False,
            **kwargs) -> nn.Module:
    """torchvision AlexNet (5 conv + 3 FC layers): ``weights`` is ``None``,
    ``"DEFAULT"``/``"IMAGENET1K_V1"``/an ``AlexNet_Weights`` member, or a local
    checkpoint path (see the module docstring). Eval mode, CPU."""
    return torchvision_model("alexnet", weights, progress=progress,
                             trust_checkpoint=trust_checkpoint, **kwargs)


def resnet50(weights: Any = None, *, progress: bool = True, trust_checkpoint: bool = False,
             **kwargs) -> nn.Module:
    """torchvision ResNet-50 (53 conv + 1 FC layers): ``weights`` is ``None``,
    ``"DEFAULT"`` (= ``IMAGENET1K_V2``), ``"IMAGENET1K_V1"`` (the paper's
    era), a ``ResNet50_Weights`` member, or a local checkpoint path. Eval mode,
    CPU."""
    return torchvision_model("resnet50", weights, progress=progress,
                             trust_checkpoint=trust_checkpoint, **kwargs)
