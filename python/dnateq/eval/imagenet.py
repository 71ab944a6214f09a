"""Image-classification accuracy: top-1/top-5 over an ImageFolder (ImageNet
ILSVRC-2012 val laid out one folder per class, as torchvision expects), or over
any loader of ``(images, labels)`` batches.

The preprocessing is either the standard ImageNet pipeline (resize the short
side to 256, center-crop 224, scale to [0, 1], normalize with the ImageNet
mean/std) or exactly the transforms a torchvision weights enum specifies
(e.g. ``ResNet50_Weights.IMAGENET1K_V2`` resizes to 232), since the published
accuracies of those weights are measured with their own transforms.

Top-k convention: a sample counts as correct at ``k`` when fewer than ``k``
*other* classes have a logit ``>=`` the true class's logit. For distinct
logits this is the usual "true label among the ``k`` largest"; on ties it is
pessimistic and, unlike ``torch.topk``'s tie-breaking, identical on CPU and
GPU, so results are deterministic. Non-finite logits are an error.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._common import model_device
from . import distributed as D

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "imagenet_transforms", "resolve_weights",
           "imagefolder_dataset", "imagefolder_loader", "evaluate_topk", "evaluate_imagenet",
           "topk_eval_fn"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Keys tried, in order, for the labels of a dict batch.
LABEL_KEYS = ("label", "labels", "target", "targets", "y")
#: Keys tried, in order, for the input of a dict batch (as ``dnateq.quantize``).
INPUT_KEYS = ("input", "inputs", "x", "pixel_values", "image", "images")


def resolve_weights(weights: Any, arch: Optional[str] = None):
    """A torchvision ``WeightsEnum`` member from a member, ``"Enum.MEMBER"``
    (e.g. ``"ResNet50_Weights.IMAGENET1K_V2"``), or, given ``arch`` (a
    torchvision model name such as ``"resnet50"``), a bare member name
    (``"IMAGENET1K_V1"``) or ``"DEFAULT"``. ``None`` stays ``None``."""
    if weights is None:
        return None
    from torchvision.models import get_model_weights, get_weight
    from torchvision.models._api import WeightsEnum
    if isinstance(weights, WeightsEnum):
        return weights
    if not isinstance(weights, str):
        raise TypeError(f"dnateq: weights must be None, a torchvision weights enum or its "
                        f"name, got {type(weights).__name__}")
    if "." in weights:
        try:
            return get_weight(weights)
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"dnateq: unknown torchvision weights {weights!r} ({e})") from None
    if arch is None:
        raise ValueError(f"dnateq: weights={weights!r} needs the enum name too, e.g. "
                         f"'ResNet50_Weights.{weights}'")
    enum = get_model_weights(arch)
    try:
        return enum[weights]   # DEFAULT is an enum alias
    except KeyError:
        raise ValueError(f"dnateq: weights={weights!r} is not one of {enum.__name__}: "
                         f"{['DEFAULT'] + [m.name for m in enum]}") from None


def imagenet_transforms(weights: Any = None, resize_size: int = 256, crop_size: int = 224):
    """The evaluation transform of a PIL image into a normalized float tensor.

    Args:
        weights: ``None`` for the standard pipeline ``Resize(resize_size)`` (short
            side, bilinear, antialiased), ``CenterCrop(crop_size)``, ``ToTensor``,
            ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``; or a torchvision weights
            enum (member or ``"Enum.MEMBER"`` string) whose own ``transforms()``
            are returned (no download needed).
        resize_size, crop_size: of the standard pipeline (ignored with weights).
    """
    w = resolve_weights(weights)
    if w is not None:
        return w.transforms()
    from torchvision import transforms as T
    return T.Compose([
        T.Resize(resize_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(crop_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def imagefolder_dataset(root: Union[str, os.PathLike], transform: Optional[Callable] = None,
                        weights: Any = None, limit: Optional[int] = None):
    """A torchvision ``ImageFolder`` over ``root`` (one sub-folder per class,
    classes indexed in sorted folder-name order, as for the ImageNet val set
    prepared for torchvision).

    ``transform`` defaults to :func:`imagenet_transforms` ``(weights)``.
    ``limit`` keeps ``limit`` samples spread evenly over the (class-sorted)
    dataset, ``i * N // limit`` for ``i < limit``, so a quick run still covers
    all classes proportionally; deterministic.
    """
    from torchvision.datasets import ImageFolder
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dnateq.eval: root={root!r} is not a directory (expected an "
                                "ImageFolder: one sub-folder of images per class)")
    if transform is None:
        transform = imagenet_transforms(weights)
    try:
        ds = ImageFolder(root, transform=transform)
    except FileNotFoundError as e:
        raise ValueError(f"dnateq.eval: root={root!r} holds no class folder with images "
                         f"({e})") from None
    if len(ds) == 0:
        raise ValueError(f"dnateq.eval: root={root!r} holds no images")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"dnateq.eval: limit must be a positive int or None, got {limit!r}")
        if limit < len(ds):
            n = len(ds)
            sub = torch.utils.data.Subset(ds, [i * n // limit for i in range(limit)])
            sub.classes, sub.class_to_idx = ds.classes, ds.class_to_idx  # type: ignore[attr-defined]
            return sub
    return ds


def imagefolder_loader(root: Union[str, os.PathLike], batch_size: int = 64, workers: int = 4,
                       weights: Any = None, *, transform: Optional[Callable] = None,
                       limit: Optional[int] = None, distributed: Optional[bool] = None,
                       pin_memory: Optional[bool] = None):
    """A deterministic loader of ``(images, labels)`` batches over an ImageFolder.

    No shuffling; under torch.distributed (``distributed=None`` detects it)
    each rank gets its exact shard (:func:`dnateq.eval.distributed.sharded_dataloader`).
    See :func:`imagefolder_dataset` for ``transform``, ``weights``, ``limit``.
    """
    D._check_positive_int("imagefolder_loader", "batch_size", batch_size)
    ds = imagefolder_dataset(root, transform=transform, weights=weights, limit=limit)
    return D.sharded_dataloader(ds, batch_size, workers, distributed=distributed,
                                pin_memory=pin_memory)


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------

def _split_batch(batch: Any) -> Tuple[Any, torch.Tensor]:
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError("dnateq.eval.evaluate_topk: a tuple/list batch needs (inputs, "
                             f"labels), got {len(batch)} item(s)")
        return batch[0], batch[1]
    if isinstance(batch, dict):
        x = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        if x is None or y is None:
            raise ValueError(f"dnateq.eval.evaluate_topk: a dict batch needs an input key "
                             f"{INPUT_KEYS} and a label key {LABEL_KEYS}, got {list(batch)}")
        return x, y
    raise TypeError("dnateq.eval.evaluate_topk: batches must be (inputs, labels) tuples or "
                    f"dicts, got {type(batch).__name__}")


def _to(x: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(t, device, non_blocking) for t in x)
    if isinstance(x, dict):
        return {k: _to(v, device, non_blocking) for k, v in x.items()}
    return x


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"dnateq.eval.evaluate_topk: the model returned {type(out).__name__}; "
                    "expected logits [batch, classes]")


def _progress(total: Optional[int], enabled: bool, desc: str):
    # Only rank 0 draws a bar: W bars on one terminal are unreadable.
    if not enabled or not D.is_main_process():
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


class _Deterministic:
    """cuDNN in its deterministic, non-benchmarking mode for the duration (its
    autotuner may pick different algorithms per run); restores the flags."""

    def __enter__(self):
        b = torch.backends.cudnn
        self.saved = (b.deterministic, b.benchmark)
        b.deterministic, b.benchmark = True, False

    def __exit__(self, *exc):
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = self.saved


def evaluate_topk(model: nn.Module, loader: Iterable, topk: Sequence[int] = (1, 5),
                  device: Union[None, str, torch.device] = None, progress: bool = True,
                  desc: str = "dnateq: top-k", distributed: Optional[bool] = None
                  ) -> Dict[str, Any]:
    """Top-k accuracy of a classifier over ``loader``.

    Args:
        model: returns logits ``[B, C]`` (or an object with ``.logits``). It is
            put in eval mode for the run and its train/eval state restored.
        loader: batches ``(inputs, labels)`` (tuple/list) or dicts with an input
            key and a ``label``/``labels``/``target`` key. Under
            torch.distributed it must be this rank's shard (e.g.
            :func:`imagefolder_loader`); counts are then summed over ranks.
        topk: the ``k`` values (each 1 <= k <= number of classes).
        device: where to run; ``None`` uses the model's device. When given, the
            model is moved there (``model.to(device)``, in place).
        progress: a tqdm bar on rank 0 (``False`` silences it).
        desc: the bar's label.
        distributed: sum the counts over ranks; ``None`` (default) does so when a
            process group is initialized, ``False`` returns this rank's own
            counts (for a loader that is not sharded).

    Returns:
        ``{"top1": %, "top5": %, ..., "correct": {k: count}, "n": samples}`` with
        the percentages over all ranks' samples; identical on every rank.
    """
    ks = _check_topk(topk)
    if device is not None:
        model.to(device)
    dev = model_device(model)
    nb = dev.type == "cuda"
    correct = [0] * len(ks)
    n = 0
    err: Optional[BaseException] = None
    was_training = model.training
    model.eval()
    bar = _progress(_num_samples(loader), progress, desc)
    try:
        with torch.no_grad(), _Deterministic():
            for batch in loader:
                x, y = _split_batch(batch)
                y = torch.as_tensor(y)
                logits = _logits(model(_to(x, dev, nb))).float()
                if logits.dim() != 2:
                    raise ValueError("dnateq.eval.evaluate_topk: expected logits [batch, "
                                     f"classes], got shape {list(logits.shape)}")
                if max(ks) > logits.shape[1]:
                    raise ValueError(f"dnateq.eval.evaluate_topk: topk={tuple(ks)} asks for k="
                                     f"{max(ks)} but the model has {logits.shape[1]} classes")
                if y.shape != (logits.shape[0],):
                    raise ValueError(f"dnateq.eval.evaluate_topk: labels of shape "
                                     f"{list(y.shape)} for {logits.shape[0]} samples")
                if not bool(torch.isfinite(logits).all()):
                    raise ValueError("dnateq.eval.evaluate_topk: the model produced "
                                     "non-finite logits")
                y = y.to(logits.device).long()
                if bool(((y < 0) | (y >= logits.shape[1])).any()):
                    raise ValueError(f"dnateq.eval.evaluate_topk: labels outside [0, "
                                     f"{logits.shape[1]})")
                # rank of the true class = number of other classes scoring >= it
                true = logits.gather(1, y[:, None])
                rank_ = (logits >= true).sum(1) - 1
                for i, k in enumerate(ks):
                    correct[i] += int((rank_ < k).sum())
                n += logits.shape[0]
                if bar is not None:
                    bar.update(logits.shape[0])
                    bar.set_postfix({f"top{ks[0]}": f"{100.0 * correct[0] / n:.2f}"},
                                    refresh=False)
    except Exception as e:  # re-raised below, once the other ranks know (no hang)
        err = e
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if distributed is None:
        distributed = D.is_distributed()
    if distributed:
        D.raise_if_any_failed(err, "evaluate_topk")
        tot = D.all_reduce_sum(correct + [n], dtype=torch.int64).tolist()
        correct, n = tot[:-1], tot[-1]
    elif err is not None:
        raise err
    if n == 0:
        raise ValueError("dnateq.eval.evaluate_topk: the loader yielded no sample")
    res: Dict[str, Any] = {f"top{k}": 100.0 * c / n for k, c in zip(ks, correct)}
    res["correct"] = {k: int(c) for k, c in zip(ks, correct)}
    res["n"] = int(n)
    return res


def _num_samples(loader: Any) -> Optional[int]:
    """Samples this rank will see, for the progress bar (None if unknown)."""
    sampler = getattr(loader, "sampler", None)
    try:
        return len(sampler) if sampler is not None else None
    except TypeError:
        return None


def _check_topk(topk: Sequence[int]) -> list:
    if isinstance(topk, int):
        topk = (topk,)
    ks = list(topk)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"dnateq.eval: topk must be positive ints, got {topk!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"dnateq.eval: topk has repeated values: {topk!r}")
    return ks


def evaluate_imagenet(model: nn.Module, root: Union[str, os.PathLike], *,
                      weights: Any = None, batch_size: int = 64, workers: int = 4,
                      device: Union[None, str, torch.device] = None,
                      topk: Sequence[int] = (1, 5), limit: Optional[int] = None,
                      transform: Optional[Callable] = None, progress: bool = True,
                      distributed: Optional[bool] = None) -> Dict[str, Any]:
    """Top-1/top-5 of ``model`` on the ImageFolder ``root`` (e.g. ImageNet val).

    ``weights`` selects the transforms of a torchvision weights enum (else the
    standard 256/224 pipeline); see :func:`imagefolder_loader` and
    :func:`evaluate_topk` for the other arguments. Under torchrun every rank
    evaluates its shard and all return the totals.
    """
    loader = imagefolder_loader(root, batch_size, workers, weights, transform=transform,
                                limit=limit, distributed=distributed)
    return evaluate_topk(model, loader, topk=topk, device=device, progress=progress,
                         desc="dnateq: ImageNet", distributed=distributed)


def topk_eval_fn(loader: Iterable, k: int = 1, device=None) -> Callable[[nn.Module], float]:
    """``eval_fn(model) -> top-k %`` over ``loader``, for ``dnateq.quantize``
    (its ``max_loss`` is then in accuracy points). Distributed-aware like
    :func:`evaluate_topk`, so all ranks take the same decisions."""
    def eval_fn(model: nn.Module) -> float:
        return evaluate_topk(model, loader, topk=(k,), device=device, progress=False)[f"top{k}"]
    return eval_fn
