"""The ``n x n`` sub-patch grid of Zhao et al. 2022 on nnU-Net's planned patch (``n x n x n`` in 3D).

An image of the planned patch size ``(H, W)`` is cut into ``n x n`` cells of ``(H/n, W/n)``
pixels; a 3D patch ``(D, H, W)`` into ``n^3`` cells of ``(D/n, H/n, W/n)`` voxels. Each cell, run through
the network on its own, is zero-padded (centred; nnU-Net's images are normalised to mean 0, and nnU-Net
pads with 0 too) to the next multiple of the network's total stride (one stride more along one axis where
that would leave a bottleneck of a single value, which nnU-Net's instance normalisation cannot train on),
and its outputs are cropped back to the cell. Cells are numbered in row-major order.
"""
import itertools
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

PAPER_GRID = 5  # 5 x 5 cells of 64 x 64 pixels on the paper's 320 x 320 images


def valid_grids(patch_size: Sequence[int]) -> List[int]:
    """Every ``n >= 2`` that divides each side of the patch."""
    return [n for n in range(2, min(patch_size) + 1) if all(side % n == 0 for side in patch_size)]


def auto_grid(patch_size: Sequence[int], total_stride: Sequence[int] = (1, 1), preferred: int = PAPER_GRID,
              min_strides: int = 1) -> int:
    """The largest valid ``n`` not above ``preferred`` whose cells are at least ``min_strides`` times the
    network's total stride per side (with 1: 5 on the paper's 320 x 320 with a stride of 64; 4 on nnU-Net's
    56 x 40 Hippocampus patch with a stride of 8; with 2: 2 there, cells of 28 x 20); without such an
    ``n``, the largest valid one not above ``preferred``, then the smallest valid one. 0 when no ``n``
    divides both sides."""
    grids = valid_grids(patch_size)
    below = [n for n in grids if n <= preferred] or grids[:1]
    roomy = [n for n in below if all(side // n >= s * min_strides for side, s in zip(patch_size, total_stride))]
    return max(roomy or below) if below else 0


def times(sides: Sequence[int]) -> str:
    return " x ".join(map(str, sides))


class SubPatchGrid:
    """Args:
        patch_size: (H, W) or (D, H, W), nnU-Net's planned patch.
        n: cells per side (0: ``auto_grid``).
        total_stride: the product of the network's pooling strides, one per axis of the patch.
        min_strides: ``auto_grid``'s smallest cell, in total strides per side.
    """

    def __init__(self, patch_size: Sequence[int], n: int, total_stride: Sequence[int], min_strides: int = 1):
        patch_size, total_stride = tuple(int(s) for s in patch_size), tuple(int(s) for s in total_stride)
        if len(patch_size) not in (2, 3) or len(total_stride) != len(patch_size):
            raise ValueError(f"SubPatchGrid is 2D or 3D, with one stride per axis: got patch size {patch_size} and "
                             f"total stride {total_stride}")
        n = auto_grid(patch_size, total_stride, min_strides=min_strides) if n == 0 else n
        if n not in valid_grids(patch_size):
            raise ValueError(f"a grid of {times([n] * len(patch_size))} sub-patches does not fit the patch size "
                             f"{list(patch_size)}: n must be at least 2 and divide every side; valid here: "
                             f"{valid_grids(patch_size) or 'none'}")
        self.n, self.patch_size, self.total_stride = n, patch_size, total_stride
        self.cell = tuple(side // n for side in patch_size)
        padded = [math.ceil(c / s) * s for c, s in zip(self.cell, total_stride)]
        if all(p == s for p, s in zip(padded, total_stride)):
            # a bottleneck of one value: instance normalisation needs more than one value per channel, so
            # the sub-patch grows by one stride along the axis of the smallest stride (the cheapest one)
            axis = total_stride.index(min(total_stride))
            padded[axis] += total_stride[axis]
        self.padded = tuple(padded)
        # (before, after) padding per axis, centred
        self.padding = tuple(((p - c) // 2, p - c - (p - c) // 2) for p, c in zip(self.padded, self.cell))

    @property
    def cells(self) -> int:
        return self.n ** len(self.patch_size)

    def cut(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, C, *patch) -> (B, cells, C, *cell), cells in row-major order."""
        if tuple(maps.shape[2:]) != self.patch_size:
            raise ValueError(f"SubPatchGrid: maps of {times(maps.shape[2:])}, but the grid is for "
                             f"{list(self.patch_size)}")
        b, c, dims = maps.shape[0], maps.shape[1], len(self.patch_size)
        split = maps.reshape(b, c, *itertools.chain.from_iterable((self.n, side) for side in self.cell))
        # (B, C, n, c1, n, c2[, n, c3]) -> (B, n, n[, n], C, c1, c2[, c3])
        order = [0, *range(2, 2 + 2 * dims, 2), 1, *range(3, 3 + 2 * dims, 2)]
        return split.permute(order).reshape(b, self.cells, c, *self.cell)

    def sub_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, *patch) images -> (B*cells, C, *padded) sub-patches, padded to a multiple of the stride."""
        cells = self.cut(images).flatten(0, 1)
        return F.pad(cells, [side for axis in reversed(self.padding) for side in axis])  # last axis first

    def crop(self, outputs: torch.Tensor) -> torch.Tensor:
        """(B*cells, C, *padded) outputs of the padded sub-patches -> (B, cells, C, *cell)."""
        window = tuple(slice(before, before + side) for (before, _), side in zip(self.padding, self.cell))
        cropped = outputs[(slice(None), slice(None), *window)]
        return cropped.reshape(-1, self.cells, *cropped.shape[1:])

    def describe(self) -> str:
        unit = "voxels" if len(self.cell) == 3 else "pixels"
        return (f"{times([self.n] * len(self.cell))} sub-patches of {times(self.cell)} {unit} (padded to "
                f"{times(self.padded)}) on the {times(self.patch_size)} patch")


def stride_factors(size: int, parts: int = 3) -> Tuple[int, ...]:
    """``size`` as a product of ``parts`` factors, largest first, as even as the primes allow
    (64 -> (4, 4, 4) as in the reference code; 14 -> (7, 2, 1))."""
    primes, rest, p = [], size, 2
    while rest > 1:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    factors = [1] * parts
    for prime in sorted(primes, reverse=True):  # each prime to the smallest product so far
        factors[factors.index(min(factors))] *= prime
    return tuple(sorted(factors, reverse=True))
