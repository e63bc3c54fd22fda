"""Supervised local (pixel-level) contrastive loss of Hu et al. 2021, Eq. 2-3.

For an anchor pixel ``i`` with a non-background label ``y_i``, positives ``P(i)`` are all other
selected pixels with label ``y_i``; the denominator runs over every selected pixel except ``i``
(background pixels included). With ``s_ij = f_i . f_j / tau`` on L2-normalised features:

* ``form="supcon"`` (default; the reference code and Khosla et al. 2020):
  ``l_i = -1/|P(i)| sum_{p in P(i)} ( s_ip - log sum_{a != i} exp(s_ia) )``
* ``form="paper"`` (Eq. 2 as printed):
  ``l_i = -1/|P(i)| log( sum_{p in P(i)} exp(s_ip) / sum_{a != i} exp(s_ia) )``

The loss is the mean of ``l_i`` over anchors that have at least one positive. Which pixels are
selected (stride, blocks, all) is decided in ``nnunet_contrast.data.pixel_selection``. Under DDP the
selected pixels of every rank are the pool (anchors stay local, ``nnunet_contrast.distributed``): the
ranks' mean loss is the loss of one process on the global batch.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunet_contrast.data.pixel_selection import block_pixels, stride_pixels
from nnunet_contrast.distributed import (gather, gather_sizes, gather_with_grad, global_mean, is_distributed, own_rows,
                                         summed_over_ranks, world_size)

FORMS = ("supcon", "paper")
MODES = ("block", "stride", "exact", "full")


def _anchor_chunk_loss(anchor_feats, anchor_labels, anchor_index, feats, labels, temperature: float,
                       form: str) -> torch.Tensor:
    """Summed loss of one chunk of anchors against all pixels. (m, C), (m,), (m,), (N, C), (N,)."""
    logits = anchor_feats @ feats.T / temperature                                    # (m, N)
    not_self = torch.ones_like(logits, dtype=torch.bool)
    not_self[torch.arange(len(anchor_index), device=logits.device), anchor_index] = False
    positive = (anchor_labels[:, None] == labels[None, :]) & not_self
    n_pos = positive.sum(1)
    log_denominator = logits.masked_fill(~not_self, float("-inf")).logsumexp(1)
    if form == "supcon":
        mean_positive = logits.masked_fill(~positive, 0.0).sum(1) / n_pos.clamp(min=1)
        per_anchor = log_denominator - mean_positive
    else:
        log_numerator = logits.masked_fill(~positive, float("-inf")).logsumexp(1)
        per_anchor = (log_denominator - log_numerator) / n_pos.clamp(min=1)
    return per_anchor.masked_fill(n_pos == 0, 0.0).sum()


def supcon_pixel_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                      form: str = "supcon", background: int = 0,
                      chunk_size: Optional[int] = None, anchors: Optional[slice] = None) -> Tuple[torch.Tensor, int]:
    """Sum of the per-anchor losses and the number of anchors that have a positive.

    Args:
        features: (N, C) pixel embeddings (normalised here).
        labels: (N,) integer labels, all valid (drop ignored pixels before).
        chunk_size: None computes the (anchors x N) similarity matrix at once; an int computes it
            ``chunk_size`` anchors at a time and recomputes each chunk in the backward pass, so
            peak memory grows linearly with N.
        anchors: the rows that may be anchors (default: all); every row is a candidate.
    Returns:
        (loss_sum, n_anchors): a float32 scalar connected to ``features`` and an int.
    """
    if form not in FORMS:
        raise ValueError(f"supervised local contrast: form must be one of {FORMS}, got {form!r}")
    if not temperature > 0:
        raise ValueError(f"supervised local contrast: temperature must be > 0, got {temperature}")
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"supervised local contrast: expected features (N, C) and labels (N,), got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    with torch.autocast(device_type=features.device.type, enabled=False):  # float32 under AMP
        return _summed_loss(features, labels, temperature, form, background, chunk_size, anchors)


def _summed_loss(features, labels, temperature, form, background, chunk_size, anchors):
    feats = F.normalize(features.float(), dim=1)
    anchor_index = torch.nonzero(labels != background).flatten()
    counts = torch.bincount(labels[anchor_index].long()) if len(anchor_index) else None
    if counts is not None:  # anchors whose class has a single pixel have no positive
        anchor_index = anchor_index[counts[labels[anchor_index].long()] > 1]
    if anchors is not None:
        anchor_index = anchor_index[(anchor_index >= anchors.start) & (anchor_index < anchors.stop)]
    if len(anchor_index) == 0:
        return feats.sum() * 0.0, 0
    step = len(anchor_index) if chunk_size is None else int(chunk_size)
    total = feats.new_zeros(())
    for start in range(0, len(anchor_index), step):
        idx = anchor_index[start:start + step]
        args = (feats[idx], labels[idx], idx, feats, labels, temperature, form)
        if chunk_size is not None and feats.requires_grad:
            total = total + checkpoint(_anchor_chunk_loss, *args, use_reentrant=False)
        else:
            total = total + _anchor_chunk_loss(*args)
    return total, len(anchor_index)


class SupConLocalLoss(nn.Module):
    """Supervised local contrast on dense feature maps (Hu et al. 2021, Eq. 2-3).

    Args:
        temperature: ``tau`` (paper: 0.1).
        mode: which pixels (voxels in 3D) enter the loss:
            ``"block"`` (paper default): the maps are cut into blocks of ``block_size`` along every
            spatial axis; the loss is computed among the pixels of one block position across the whole
            batch and averaged over blocks that hold an anchor;
            ``"stride"``: every ``stride``-th pixel per axis, one loss over the batch;
            ``"exact"``: every pixel, computed in anchor chunks (memory linear in pixels);
            ``"full"``: every pixel in one similarity matrix (memory quadratic; for reference).
        form: ``"supcon"`` or ``"paper"``, see the module docstring.
        background: label of background pixels, never anchors but still negatives.
        ignore_label: pixels with this label (and negative labels, nnU-Net's padding) are dropped.
        chunk_size: anchors per chunk in ``"exact"`` mode.
        gather_distributed: under DDP, every rank's selected pixels are candidates (module docstring).

    Shapes:
        features: (V, C, H, W) or (V, C, D, H, W) embeddings of V views; labels: (V, *spatial) or
        (V, 1, *spatial).
    """

    def __init__(self, temperature: float = 0.1, mode: str = "block", stride: int = 4,
                 block_size: int = 16, form: str = "supcon", background: int = 0,
                 ignore_label: Optional[int] = None, chunk_size: int = 1024, gather_distributed: bool = True):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"SupConLocalLoss: temperature must be > 0, got {temperature}")
        if mode not in MODES:
            raise ValueError(f"SupConLocalLoss: mode must be one of {MODES}, got {mode!r}")
        if form not in FORMS:
            raise ValueError(f"SupConLocalLoss: form must be one of {FORMS}, got {form!r}")
        for name, value in (("stride", stride), ("block_size", block_size), ("chunk_size", chunk_size)):
            if int(value) != value or value < 1:
                raise ValueError(f"SupConLocalLoss: {name} must be a positive integer, got {value}")
        self.temperature, self.mode, self.form = float(temperature), mode, form
        self.stride, self.block_size, self.chunk_size = int(stride), int(block_size), int(chunk_size)
        self.background, self.ignore_label = background, ignore_label
        self.gather_distributed = gather_distributed

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim == features.ndim and labels.shape[1] == 1:
            labels = labels[:, 0]
        if features.ndim not in (4, 5) or labels.shape != (features.shape[0], *features.shape[2:]):
            raise ValueError(f"SupConLocalLoss: expected features (V, C, *spatial) and labels (V, *spatial) of 2 "
                             f"or 3 spatial axes, got {tuple(features.shape)} and {tuple(labels.shape)}")
        if self.mode == "block":
            return self._mean_over_groups(block_pixels(features, labels, self.block_size, self.ignore_label))
        stride = self.stride if self.mode == "stride" else 1
        chunk = self.chunk_size if self.mode == "exact" else None
        feats, labs, anchors = self._pooled(*stride_pixels(features, labels, stride, self.ignore_label))
        loss_sum, n = supcon_pixel_loss(feats, labs, self.temperature, self.form, self.background, chunk, anchors)
        return global_mean(loss_sum, n) if self.distributed else loss_sum / max(n, 1)

    @property
    def distributed(self) -> bool:
        return self.gather_distributed and is_distributed()

    def _pooled(self, feats: torch.Tensor, labs: torch.Tensor):
        """(candidates, their labels, the rows of this rank's anchors): every rank's pixels under DDP."""
        if not self.distributed:
            return feats, labs, None
        sizes = gather_sizes(len(feats), feats.device)
        return gather_with_grad(feats, sizes), gather(labs, sizes), own_rows(sizes)

    def _mean_over_groups(self, groups) -> torch.Tensor:
        """The mean over block positions that hold an anchor (on any rank) of each position's loss."""
        sums, counts = [], []
        for feats, labs in groups:
            pool, pool_labels, anchors = self._pooled(feats, labs)
            loss_sum, n = supcon_pixel_loss(pool, pool_labels, self.temperature, self.form, self.background,
                                            anchors=anchors)
            sums.append(loss_sum)
            counts.append(n)
        counts = torch.tensor(counts, dtype=torch.float32, device=sums[0].device)
        ranks = world_size() if self.distributed else 1
        counts = summed_over_ranks(counts) if ranks > 1 else counts
        has_anchor = counts > 0
        sums = torch.stack(sums)
        if not has_anchor.any():
            return sums.sum() * 0.0
        return (sums * ranks / counts.clamp(min=1))[has_anchor].mean()
