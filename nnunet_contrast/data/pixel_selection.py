"""Which pixels or regions of dense feature maps enter a local contrastive loss.

Separated from the losses (as in pytorch-metric-learning):
* Hu et al. 2021 (Sec. 2.3): ``flatten_valid``, ``stride_pixels`` and ``block_pixels`` turn
  (V, C, *spatial) features and (V, *spatial) labels, 2D or 3D, into flat (N, C) features and (N,) labels;
* Chaitanya et al. 2023: ``sample_class_pixels`` draws anchor pixels per class and image;
* Chaitanya et al. 2020: ``region_corners`` and ``region_vectors`` cut the 13 local regions (35 in 3D);
* Basak et al. 2023: ``sample_positions`` draws the positions of the dense loss.
"""
import itertools
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

Pixels = Tuple[torch.Tensor, torch.Tensor]
Anchors = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def flatten_valid(features: torch.Tensor, labels: torch.Tensor, ignore_label: Optional[int] = None) -> Pixels:
    """All pixels (voxels) of the maps, minus negative labels (nnU-Net's padding) and ``ignore_label``."""
    feats = features.movedim(1, -1).reshape(-1, features.shape[1])
    labs = labels.reshape(-1).long()
    keep = labs >= 0
    if ignore_label is not None:
        keep &= labs != ignore_label
    return feats[keep], labs[keep]


def stride_pixels(features: torch.Tensor, labels: torch.Tensor, stride: int,
                  ignore_label: Optional[int] = None) -> Pixels:
    """Every ``stride``-th pixel along each spatial axis (paper: s = 4), from all views."""
    every = (slice(None, None, stride),) * (labels.ndim - 1)
    return flatten_valid(features[(slice(None), slice(None), *every)], labels[(slice(None), *every)], ignore_label)


def block_pixels(features: torch.Tensor, labels: torch.Tensor, block_size: int,
                 ignore_label: Optional[int] = None) -> Iterator[Pixels]:
    """The pixels of each block position (``block_size`` along every spatial axis: a square in 2D, a cube
    in 3D), across all views, the positions in row-major order.

    Maps whose size is not a multiple of ``block_size`` get smaller blocks at the border.
    """
    for corner in itertools.product(*(range(0, side, block_size) for side in labels.shape[1:])):
        block = tuple(slice(start, start + block_size) for start in corner)
        yield flatten_valid(features[(slice(None), slice(None), *block)], labels[(slice(None), *block)], ignore_label)


def sample_class_pixels(labels: torch.Tensor, classes: Sequence[int], per_class: int,
                        generator: Optional[torch.Generator] = None) -> Anchors:
    """``per_class`` random pixels (with replacement) of each class in ``classes`` in each image
    where it occurs (Chaitanya et al. 2023: |S_c(x)| = 3). Absent classes give no pixel.

    labels: (B, *spatial), 2D or 3D. Returns (image, pixel, label) index tensors of equal length; ``pixel``
    indexes the flattened spatial axes.
    """
    flat = labels.reshape(labels.shape[0], -1).long()
    empty = torch.zeros(0, dtype=torch.long, device=labels.device)
    if per_class < 1:
        raise ValueError(f"sample_class_pixels: per_class must be at least 1, got {per_class}")
    if not len(classes) or flat.shape[1] == 0:
        return empty, empty, empty
    wanted = torch.as_tensor(list(classes), device=labels.device).long()
    masks = flat[:, None, :] == wanted[None, :, None]                     # (B, K, HW)
    image, which = torch.nonzero(masks.any(2), as_tuple=True)
    if len(image) == 0:
        return empty, empty, empty
    pixel = torch.multinomial(masks[image, which].float(), per_class, replacement=True, generator=generator)
    return (image.repeat_interleave(per_class), pixel.reshape(-1), wanted[which].repeat_interleave(per_class))


def region_corners(shape: Sequence[int], size: int) -> List[Tuple[int, ...]]:
    """First corners of the local regions of Chaitanya et al. 2020 on a map of ``shape``: in 2D the 13
    regions, a 3 x 3 grid at 0, 1/2, 1 of the free range plus a 2 x 2 grid at 1/4, 3/4 of it; in 3D the
    same along every axis, 3^3 + 2^3 = 35 regions; each ``size`` along every axis and inside the map.
    Duplicates on small maps are dropped."""
    if any(side < size for side in shape):
        raise ValueError(f"a {'x'.join(map(str, shape))} feature map is smaller than the "
                         f"{'x'.join([str(size)] * len(shape))} local regions: use a smaller region size or a "
                         f"decoder block of higher resolution")
    free = [side - size for side in shape]

    def grid(fractions):
        return [tuple(round(f * a) for f, a in zip(free, at)) for at in itertools.product(fractions, repeat=len(shape))]

    return list(dict.fromkeys(grid((0, .5, 1)) + grid((.25, .75))))


def region_vectors(features: torch.Tensor, size: int) -> torch.Tensor:
    """Each of the ``region_corners`` regions of every map, flattened: (M, C, *spatial) -> (M, A, C*size^d)."""
    corners = region_corners(features.shape[2:], size)
    regions = [features[(slice(None), slice(None), *(slice(c, c + size) for c in corner))].flatten(1)
               for corner in corners]
    return torch.stack(regions, dim=1)


def sample_positions(positions: int, count: int, device=None) -> torch.Tensor:
    """Indices of ``count`` random positions out of ``positions`` (all, in order, when ``count`` is 0
    or not below ``positions``): the same positions for every image of a batch, so that the two views
    of an image stay aligned."""
    if count <= 0 or count >= positions:
        return torch.arange(positions, device=device)
    return torch.randperm(positions, device=device)[:count]
