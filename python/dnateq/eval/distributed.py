"""torch.distributed helpers for evaluation and calibration under ``torchrun``.

Every function here works unchanged in a single process (no process group, or
a group of size 1): ranks are then ``0`` of ``1``, reductions return their
input and gathers return a one-element list. So the evaluators call them
unconditionally and give the same numbers either way.

Sharding is deterministic and exact: rank ``r`` of ``W`` takes the dataset
indices ``r, r + W, r + 2W, ...`` in order, *without* the padding duplicates
that :class:`torch.utils.data.DistributedSampler` adds to even out the shards.
Padding would count some samples twice and make a sharded metric differ from
the single-process one; evaluation has no collective inside the forward pass,
so uneven shards are harmless. Metrics are integer counts summed with
``all_reduce`` (exact in any order), and translations are gathered with their
dataset index and put back in order before BLEU is computed once.

Launch, e.g. on 8 GPUs (``init_distributed`` reads torchrun's environment)::

    torchrun --nproc_per_node=8 my_eval.py

Calibration (``dnateq.quantize``) under torchrun, sharded: give each rank
``sharded_dataloader(dataset, ...)`` as its loader so each traces its own
shard; :func:`merge_traces` then combines the per-layer traces of all ranks
into the trace one process would have collected over the union (exact
minimum/maximum magnitudes, the "any negative input" flag, counts, and a
uniform sample of the union, because priority samples merge by keeping the
smallest keys). The tracing step of ``dnateq.calibration`` calls it right after
tracing (with per-rank sampling seeds ``seed + rank``, and the proxy metric
summed over ranks), so every rank fits the same parameters, chooses the same
bits and returns the same model. With an ``eval_fn``, make it
distributed-aware (e.g. :func:`dnateq.eval.topk_eval_fn` over a sharded
loader: its counts are all-reduced), so every rank sees the same quality.

Replicated calibration needs none of that: the same (unsharded) loader and
``seed`` on every rank give every rank the same quantized model, since
calibration is deterministic; only the evaluation is then sharded.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "is_distributed", "rank", "world_size", "is_main_process", "init_distributed",
    "default_device",
    "ShardSampler", "shard_indices", "sharded_dataloader", "all_reduce_sum",
    "all_gather_objects", "broadcast_object", "barrier", "gather_in_order",
    "merge_traces", "raise_if_any_failed", "assert_same_across_ranks",
]


# ---------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------

def is_distributed() -> bool:
    """True when a torch.distributed process group is initialized (with any
    world size, including 1)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0: the process that prints, writes files and shows progress bars."""
    return rank() == 0


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> bool:
    """Initialize the default process group from torchrun's environment.

    Does nothing (returns False) when ``WORLD_SIZE`` is unset or 1 and no group
    exists, so a script can call it unconditionally and also run as a plain
    ``python`` process. ``backend`` defaults to ``"nccl"`` when CUDA is
    available, else ``"gloo"``; with CUDA the process's device is set to
    ``LOCAL_RANK``. Returns whether a process group is active.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("dnateq.eval.init_distributed: WORLD_SIZE > 1 but this PyTorch "
                           "build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return True


def default_device() -> torch.device:
    """The device this process should run on: ``cuda:LOCAL_RANK`` (torchrun's
    local rank, 0 in a single process) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _reduce_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo (and single process) CPU ones.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------

def shard_indices(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> range:
    """Dataset indices of one rank: ``range(rank, n, world)`` (no padding, no
    shuffling). The shards of all ranks partition ``range(n)``."""
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"dnateq.eval.shard_indices: need 0 <= rank < world, got rank={r}, "
                         f"world={w}")
    return range(r, int(n), w)


class ShardSampler(Sampler):
    """Deterministic, non-padding sampler: rank ``r`` of ``W`` yields indices
    ``r, r + W, ...`` of a dataset of ``n`` items (in a single process: all of
    them, in order). Unlike ``DistributedSampler`` no index is repeated, so
    metrics summed over ranks equal the single-process ones exactly."""

    def __init__(self, n: int, rank: Optional[int] = None, world_size: Optional[int] = None):
        self.n = int(n)
        self.indices = shard_indices(self.n, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def sharded_dataloader(dataset: Dataset, batch_size: int, workers: int = 0, *,
                       distributed: Optional[bool] = None,
                       collate_fn: Optional[Callable] = None,
                       pin_memory: Optional[bool] = None,
                       drop_last: bool = False) -> DataLoader:
    """A deterministic ``DataLoader`` over this rank's shard of ``dataset``.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``).
        batch_size: samples per batch (> 0).
        workers: ``DataLoader`` worker processes (>= 0; 0 loads in this process).
        distributed: shard across ranks; ``None`` (default) shards exactly when a
            process group is initialized. ``False`` gives every rank the whole
            dataset.
        collate_fn: as in ``DataLoader``.
        pin_memory: defaults to ``torch.cuda.is_available()``.
        drop_last: drop this rank's last incomplete batch (default False; keep
            it False for evaluation, or samples go uncounted).

    The order is fixed (no shuffling), so a run is reproducible; usable both
    as an evaluation loader and as the calibration loader of
    ``dnateq.quantize`` under torchrun (see :func:`merge_traces`).
    """
    _check_positive_int("sharded_dataloader", "batch_size", batch_size)
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"dnateq.eval.sharded_dataloader: workers must be an int >= 0, "
                         f"got {workers!r}")
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("dnateq.eval.sharded_dataloader: dataset must be map-style (have "
                        "__len__); shard an iterable dataset yourself") from None
    if distributed is None:
        distributed = is_distributed()
    sampler = ShardSampler(n) if distributed else ShardSampler(n, 0, 1)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler,
                      num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory,
                      drop_last=drop_last, persistent_workers=False)


def _check_positive_int(fn: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"dnateq.eval.{fn}: {name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------
# collectives (identity in a single process)
# ---------------------------------------------------------------------------

def all_reduce_sum(values: Union[Sequence[float], torch.Tensor],
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sum ``values`` over ranks; returns a CPU tensor of ``dtype`` on every rank.

    Use ``dtype=torch.int64`` for counts (exact whatever the reduction order).
    """
    t = torch.as_tensor(values, dtype=dtype).reshape(-1).clone()
    if not is_distributed() or world_size() == 1:
        return t
    dev = _reduce_device()
    t = t.to(dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_distributed() or world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed() or world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed() and world_size() > 1:
        dist.barrier()


def gather_in_order(indices: Sequence[int], items: Sequence[Any], n: int) -> List[Any]:
    """Gather ``(index, item)`` pairs from all ranks and return the ``n`` items
    in dataset order, on every rank. Raises if an index is missing or repeated
    (the shards did not partition ``range(n)``)."""
    if len(indices) != len(items):
        raise ValueError("dnateq.eval.gather_in_order: indices and items differ in length")
    parts = all_gather_objects((list(indices), list(items)))
    out: List[Any] = [None] * n
    seen = [False] * n
    for idx, its in parts:
        for i, it in zip(idx, its):
            if not 0 <= i < n or seen[i]:
                raise RuntimeError(f"dnateq.eval.gather_in_order: index {i} is out of range "
                                   f"or produced by two ranks (n={n})")
            seen[i] = True
            out[i] = it
    missing = [i for i, s in enumerate(seen) if not s]
    if missing:
        raise RuntimeError(f"dnateq.eval.gather_in_order: {len(missing)} of {n} items were "
                           f"produced by no rank (first: {missing[:5]})")
    return out


def assert_same_across_ranks(model: torch.nn.Module, what: str = "model") -> str:
    """Check that every rank holds the same ``model`` (a SHA-256 of its state
    dict, extra state included); raises on every rank if not. Returns the
    digest. Use it after calibrating under torchrun: ranks that traced
    different shards without merging would otherwise evaluate different
    quantized models silently."""
    import hashlib
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            h.update(str((v.dtype, tuple(v.shape))).encode())
            h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
                     .numpy().tobytes())
        else:
            h.update(repr(v).encode())
    digest = h.hexdigest()
    digests = all_gather_objects(digest)
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"dnateq: the {what} differs between ranks (state digests "
            f"{[d[:12] for d in digests]}): calibrate with the same loader and seed on every "
            "rank, or with sharded loaders and merged traces (dnateq.eval.distributed)")
    return digest


def raise_if_any_failed(error: Optional[BaseException], what: str) -> None:
    """Collective error check: every rank calls it after its local work; if any
    rank failed, all raise (the failing rank its own exception), instead of the
    healthy ranks hanging in the next collective."""
    if not is_distributed() or world_size() == 1:
        if error is not None:
            raise error
        return
    flags = all_reduce_sum([1 if error is not None else 0], dtype=torch.int64)
    if int(flags[0]) == 0:
        return
    if error is not None:
        raise error
    raise RuntimeError(f"dnateq.eval: {what} failed on {int(flags[0])} other rank(s); see "
                       "their error messages")


# ---------------------------------------------------------------------------
# calibration traces
# ---------------------------------------------------------------------------

def merge_traces(traces: Dict[str, Any]) -> None:
    """Combine the per-layer calibration traces of all ranks, in place: see
    :func:`dnateq.calibration.trace.merge_traces` (where it lives now)."""
    from ..calibration.trace import merge_traces as merge
    merge(traces)
