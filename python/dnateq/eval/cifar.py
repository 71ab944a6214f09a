"""The 761-image CIFAR-10 subsets in ../shared/data, as datasets and loaders
(for the pretrained CIFAR ResNets of :mod:`dnateq.models.cifar_resnet`)."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils.data import TensorDataset

from . import distributed as D

__all__ = ["cifar10_dataset", "cifar10_loader"]


def cifar10_dataset(split: str = "test", data_dir: Optional[str] = None,
                    limit: Optional[int] = None) -> TensorDataset:
    """``TensorDataset(images, labels)`` of ``cifar10_{split}_761.npz``:
    images normalized as the CIFAR ResNets expect (float32 NCHW), labels int64.
    ``split`` is ``"test"`` (evaluation) or ``"train"`` (calibration only).
    ``limit`` keeps the first ``limit`` images."""
    import numpy as np
    from ..models.cifar_resnet import normalize_images, shared_data_dir
    if split not in ("test", "train"):
        raise ValueError(f"dnateq.eval.cifar10_dataset: split must be 'test' or 'train', "
                         f"got {split!r}")
    d = data_dir or shared_data_dir()
    path = os.path.join(d, f"cifar10_{split}_761.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dnateq.eval.cifar10_dataset: {path!r} not found; the CIFAR "
                                "subsets live in ../shared/data beside the project (set "
                                "DNATEQ_SHARED_DATA or pass data_dir=)")
    with np.load(path) as z:
        x = normalize_images(torch.from_numpy(z["images"]))
        y = torch.from_numpy(z["labels"]).long()
    if limit is not None:
        D._check_positive_int("cifar10_dataset", "limit", limit)
        x, y = x[:limit], y[:limit]
    return TensorDataset(x, y)


def cifar10_loader(split: str = "test", batch_size: int = 128, workers: int = 0, *,
                   data_dir: Optional[str] = None, limit: Optional[int] = None,
                   distributed: Optional[bool] = None):
    """A deterministic (sharded under torchrun) loader of ``(images, labels)``
    over :func:`cifar10_dataset`."""
    D._check_positive_int("cifar10_loader", "batch_size", batch_size)
    return D.sharded_dataloader(cifar10_dataset(split, data_dir, limit), batch_size, workers,
                                distributed=distributed, pin_memory=False)
