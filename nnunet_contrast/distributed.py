"""What training under nnU-Net's DDP (``nnUNetv2_train ... -num_gpus N``) needs beyond nnU-Net's own wrapper.

nnU-Net wraps the network in ``DistributedDataParallel``, which synchronises gradients only of what runs
through its ``forward``. Our stages also call sub-modules, projection heads, a second decoder and cell
heads, so a custom step runs under ``no_sync`` and ``average_gradients`` then averages the gradient of
every parameter the stage's optimizer trains, as DDP would have: each rank's loss is its share of the
global batch's loss, scaled so that the mean over ranks is the loss of the global batch.

Losses that contrast over the batch gather their candidates with ``gather_with_grad`` (anchors stay
local, gradients flow back to the rank that computed each candidate, as lightly's
``gather_distributed``), and normalise with ``global_mean``. Without an initialised process group every
helper is the identity of one process.
"""
from typing import Iterable, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' (n_r, ...) tensors concatenated along dim 0 (sizes may differ); backward: each rank
    receives the sum over ranks of the gradient of its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        ctx.rows = own_rows(sizes)
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # autograd may own the incoming buffer (a slice of cat's)
        dist.all_reduce(grad)  # every rank's loss reads every rank's rows
        return grad[ctx.rows], None


def gather_sizes(size: int, device: torch.device) -> List[int]:
    """Every rank's number of rows, in rank order (``[size]`` on one process): gather them once for the
    tensors of one batch, and pass them to ``gather_with_grad``, ``gather`` and ``own_rows``."""
    if not is_distributed():
        return [size]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([size], dtype=torch.long, device=device))
    return [int(s) for s in sizes]


def own_rows(sizes: List[int]) -> slice:
    """This rank's rows in a tensor gathered with ``sizes``."""
    start = sum(sizes[:rank()])
    return slice(start, start + sizes[rank()])


def _gather_padded(x: torch.Tensor, sizes: List[int]) -> torch.Tensor:
    """all_gather needs equal shapes: pad to the largest rank's rows, gather, cut the padding off."""
    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))]) if x.shape[0] < longest else x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def gather_with_grad(x: torch.Tensor, sizes: Optional[List[int]] = None) -> torch.Tensor:
    """(n, ...) -> (sum of every rank's n, ...), in rank order, differentiable; ``x`` itself on one process.
    ``sizes``: every rank's n (``gather_sizes``), gathered here when not given."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x, sizes or gather_sizes(x.shape[0], x.device))


def gather(x: torch.Tensor, sizes: Optional[List[int]] = None) -> torch.Tensor:
    """As ``gather_with_grad``, without gradient (labels, indices)."""
    if not is_distributed():
        return x
    return _gather_padded(x.detach(), sizes or gather_sizes(x.shape[0], x.device))


def summed_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (a copy; ``tensor`` itself on one process)."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def global_mean(local_sum: torch.Tensor, local_count) -> torch.Tensor:
    """This rank's share of the mean over all ranks' terms, times the world size, so that the ranks'
    mean is ``(sum of all sums) / (sum of all counts)``: a mean over the global batch, whatever each rank
    counts. One process: ``local_sum / local_count``. Zero count: an exact 0 with a graph."""
    count = summed_over_ranks(torch.as_tensor(float(local_count), device=local_sum.device))
    return local_sum * world_size() / count.clamp(min=1)


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Every rank's gradients replaced by their mean over ranks, in one all-reduce. A parameter without
    a gradient on this rank counts as zero there, so that all ranks reduce the same tensors; one without
    a gradient on every rank keeps none, as on one process (weight decay then leaves it alone)."""
    if not is_distributed():
        return
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        return
    reached = summed_over_ranks(torch.tensor([float(p.grad is not None) for p in parameters],
                                             device=parameters[0].device))
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    flat /= world_size()
    for p, part, anywhere in zip(parameters, flat.split([p.numel() for p in parameters]), reached):
        p.grad = part.view_as(p).clone() if anywhere > 0 else None


def broadcast_module(module: nn.Module) -> nn.Module:
    """Rank 0's parameters and buffers on every rank (a module built after DDP's own broadcast)."""
    if is_distributed():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)
    return module


def gather_objects(value) -> list:
    """Every rank's picklable ``value``, in rank order (``[value]`` on one process)."""
    if not is_distributed():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def rank_sizes(global_size: int) -> List[int]:
    """Every rank's part of a global batch size, split as nnU-Net splits its own (the first ranks take one
    more when it does not divide); ``[global_size]`` on one process."""
    ranks = world_size()
    if global_size < ranks:
        raise ValueError(f"a batch of {global_size} cannot be split over {ranks} processes")
    return [global_size // ranks + (1 if r < global_size % ranks else 0) for r in range(ranks)]


def rank_share(global_size: int) -> int:
    """This rank's part of a global batch size (``rank_sizes``)."""
    return rank_sizes(global_size)[rank()]


def rank_tail(global_size: int, count: int) -> int:
    """How many of the last ``count`` items of a global batch (the ranks' parts in rank order, as nnU-Net
    lays out its foreground-oversampled crops) are this rank's: the last ones of its part, maybe none."""
    sizes = rank_sizes(global_size)
    end = sum(sizes[:rank() + 1])
    return max(0, min(sizes[rank()], end - (global_size - count)))


def rank_seed(seed: int) -> int:
    """A seed of this rank's own, derived from the run's seed (``seed`` itself on one process)."""
    if not is_distributed():
        return seed
    return int(np.random.SeedSequence([seed, rank()]).generate_state(1)[0])
