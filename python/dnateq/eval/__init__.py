"""Evaluation of float and quantized models, single-process or under torchrun.

- Image classification: :func:`evaluate_imagenet` (top-1/top-5 over an
  ImageFolder with the standard 256/224 pipeline or a torchvision weights
  enum's transforms), :func:`evaluate_topk` over any ``(images, labels)``
  loader, :func:`topk_eval_fn` as ``dnateq.quantize``'s ``eval_fn``.
- Translation: :func:`evaluate_bleu` (sacrebleu corpus BLEU over WMT
  newstest plain-text or .sgm files) for a ``translate(sentences)`` function,
  e.g. :func:`make_translator` with :func:`greedy_decode` / :func:`beam_search`.
- Many processes: :mod:`dnateq.eval.distributed` (exact, padding-free
  sharding, all-reduced counts, gathered hypotheses, calibration-trace merge).

Example::

    import dnateq, dnateq.eval as E, dnateq.models as M
    E.init_distributed()                        # no-op without torchrun
    model = M.resnet50("IMAGENET1K_V1")
    res = E.evaluate_imagenet(model, "/data/imagenet/val",
                              weights="ResNet50_Weights.IMAGENET1K_V1",
                              batch_size=128, workers=8, device="cuda")
    print(res["top1"], res["top5"], res["n"])
"""
from . import distributed
from .bleu import (beam_search, corpus_bleu, evaluate_bleu, evaluate_bleu_texts,
                   greedy_decode, make_translator, read_parallel, read_text)
from .cifar import cifar10_dataset, cifar10_loader
from .distributed import (ShardSampler, default_device, init_distributed, is_distributed,
                          is_main_process, merge_traces, rank, sharded_dataloader, world_size)
from .imagenet import (IMAGENET_MEAN, IMAGENET_STD, evaluate_imagenet, evaluate_topk,
                       imagefolder_dataset, imagefolder_loader, imagenet_transforms,
                       resolve_weights, topk_eval_fn)

__all__ = [
    "distributed", "evaluate_topk", "evaluate_imagenet", "imagenet_transforms",
    "imagefolder_dataset", "imagefolder_loader", "resolve_weights", "topk_eval_fn",
    "IMAGENET_MEAN", "IMAGENET_STD", "read_text", "read_parallel", "greedy_decode",
    "beam_search", "make_translator", "corpus_bleu", "evaluate_bleu", "evaluate_bleu_texts",
    "cifar10_dataset", "cifar10_loader", "init_distributed", "is_distributed",
    "is_main_process", "rank", "world_size", "sharded_dataloader", "ShardSampler",
    "merge_traces", "default_device",
]
