"""Which pixels of dense feature maps enter a local contrastive loss (Hu et al. 2021, Sec. 2.3).

Separated from the losses (as in pytorch-metric-learning): each function turns (V, C, H, W)
features and (V, H, W) labels into flat (N, C) features and (N,) labels of valid pixels.
"""
from typing import Iterator, Optional, Tuple

import torch

Pixels = Tuple[torch.Tensor, torch.Tensor]


def flatten_valid(features: torch.Tensor, labels: torch.Tensor, ignore_label: Optional[int] = None) -> Pixels:
    """All pixels of the maps, minus negative labels (nnU-Net's padding) and ``ignore_label``."""
    feats = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    labs = labels.reshape(-1).long()
    keep = labs >= 0
    if ignore_label is not None:
        keep &= labs != ignore_label
    return feats[keep], labs[keep]


def stride_pixels(features: torch.Tensor, labels: torch.Tensor, stride: int,
                  ignore_label: Optional[int] = None) -> Pixels:
    """Every ``stride``-th pixel along each spatial axis (paper: s = 4), from all views."""
    return flatten_valid(features[:, :, ::stride, ::stride], labels[:, ::stride, ::stride], ignore_label)


def block_pixels(features: torch.Tensor, labels: torch.Tensor, block_size: int,
                 ignore_label: Optional[int] = None) -> Iterator[Pixels]:
    """The pixels of each ``block_size`` x ``block_size`` block position, across all views.

    Maps whose size is not a multiple of ``block_size`` get smaller blocks at the border.
    """
    height, width = labels.shape[-2:]
    for top in range(0, height, block_size):
        for left in range(0, width, block_size):
            rows, cols = slice(top, top + block_size), slice(left, left + block_size)
            yield flatten_valid(features[:, :, rows, cols], labels[:, rows, cols], ignore_label)
