"""Data parallelism for the paper tasks: one process per GPU under ``accelerate launch`` (or
``torchrun``), the identity in a single process (a plain ``python -m ...`` or a notebook).

    accelerate launch --multi_gpu --num_processes 4 -m adjoint_lib.tasks.stylize --profile sd

Process ``r`` of ``W`` takes items ``r, r+W, r+2W, ...`` of every list of prompt/noise pairs
(:func:`shard`), and per-pair results come back in the original order (:func:`gather_rows`).
Each pair's noise is drawn from its own seed, so a run does not depend on ``W`` beyond the
floating-point effect of smaller batches. Training on a global batch ``B``: each process
backpropagates ``sum_{i in its share} loss_i / B`` and :func:`all_reduce_grads` sums the
gradients, so every process holds ``grad (1/B) sum_i loss_i``, the one-process gradient, and the
same optimizer step keeps the weights identical everywhere; one process writes files
(:func:`is_main_process`). Against one process, smaller batches round differently (float32, ~1e-5
relative on a gradient), and Adam, dividing each element's gradient by its own size, turns that into
a visible fraction of ``lr`` on the few elements whose gradient is near its epsilon: the LoRA update
agrees to ~1e-4 in norm, not to 1e-5 per element. Every function here except :func:`rank`, :func:`world_size`,
:func:`is_main_process` and :func:`shard` is a collective: all processes must call it, in the
same order.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def setup() -> int:
    """Join the process group a launcher prepared (``WORLD_SIZE`` > 1 in the environment):
    accelerate's ``PartialState`` (NCCL with process ``LOCAL_RANK`` on GPU ``LOCAL_RANK``, so that
    ``"cuda"`` means its own GPU; gloo without CUDA or under ``ACCELERATE_USE_CPU``). Nothing
    without a launcher. Returns the number of processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _active():
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
        if not _active():
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but no process group could be started: "
                               "launch with `accelerate launch --multi_gpu --num_processes N` or `torchrun`")
    return world_size()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's index, 0 .. ``world_size() - 1``."""
    return dist.get_rank() if _active() else 0


def is_main_process() -> bool:
    """Whether this process writes files and prints results (rank 0)."""
    return rank() == 0


def shard(n: int) -> list[int]:
    """This process's share of ``n`` items: indices ``rank, rank + W, rank + 2W, ...``."""
    return list(range(rank(), n, world_size()))


def barrier() -> None:
    """Wait until every process gets here (e.g. until the main process has written a file)."""
    if world_size() > 1:
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable; tensors on the CPU), in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Process ``src``'s ``obj`` on every process (picklable; tensors on the CPU)."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_rows(local: Tensor | None, n: int, device: torch.device | str | None = None) -> Tensor:
    """The rows of all ``n`` items, in order, from each process's rows for :func:`shard` ``(n)``
    (``None`` for an empty share), on ``device`` (default: ``local``'s). One process: ``local``."""
    if world_size() == 1:
        if local is None or local.shape[0] != n:
            raise ValueError(f"one process must hold all {n} rows, got {None if local is None else local.shape[0]}")
        return local
    device = device if device is not None else (local.device if local is not None else "cpu")
    parts = gather_objects(None if local is None else local.detach().cpu())
    first = next((p for p in parts if p is not None), None)
    if first is None:
        raise ValueError(f"no process holds any of the {n} rows")
    out = first.new_empty((n, *first.shape[1:]))
    for r, part in enumerate(parts):
        want = len(range(r, n, len(parts)))
        if want and (part is None or part.shape[0] != want):
            raise ValueError(f"process {r} holds {None if part is None else part.shape[0]} rows, its share of {n} "
                             f"is {want}")
        if want:
            out[r::len(parts)] = part
    return out.to(device)


def map_rows(fn: Callable[[list[int]], Tensor], n: int, device: torch.device | str | None = None) -> Tensor:
    """``fn(indices) -> rows`` for all ``n`` items, each process computing its :func:`shard`;
    equals ``fn(list(range(n)))`` in one process."""
    mine = shard(n)
    return gather_rows(fn(mine) if mine else None, n, device)


def all_reduce_grads(params: Sequence[Tensor]) -> None:
    """Sum ``p.grad`` over the processes, in place (one flat buffer; a missing gradient counts
    as zero). With per-process losses ``sum_{i in share} loss_i / B`` the sum is the gradient
    of the global mean loss."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
        offset += g.numel()


def all_max(value: float) -> float:
    """The largest of the processes' ``value``."""
    return max(gather_objects(float(value)))


__all__ = ["setup", "world_size", "rank", "is_main_process", "shard", "barrier", "gather_objects",
           "broadcast_object", "gather_rows", "map_rows", "all_reduce_grads", "all_max"]
