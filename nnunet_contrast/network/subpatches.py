"""The ``n x n`` sub-patch grid of Zhao et al. 2022 on nnU-Net's planned patch.

An image of the planned patch size ``(H, W)`` is cut into ``n x n`` cells of ``(H/n, W/n)``
pixels. Each cell, run through the network on its own, is zero-padded (centred; nnU-Net's images
are normalised to mean 0, and nnU-Net pads with 0 too) to the next multiple of the network's total
stride (one stride more along one axis where that would leave a 1 x 1 bottleneck, which nnU-Net's
instance normalisation cannot train on), and its outputs are cropped back to the cell.
"""
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


class SubPatchGrid:
    """Args:
        patch_size: (H, W), nnU-Net's planned patch.
        n: cells per side (0: ``auto_grid``).
        total_stride: (sH, sW), the product of the network's pooling strides.
        min_strides: ``auto_grid``'s smallest cell, in total strides per side.
    """

    def __init__(self, patch_size: Sequence[int], n: int, total_stride: Sequence[int], min_strides: int = 1):
        patch_size, total_stride = tuple(int(s) for s in patch_size), tuple(int(s) for s in total_stride)
        if len(patch_size) != 2 or len(total_stride) != 2:
            raise ValueError(f"SubPatchGrid is 2D: got patch size {patch_size} and total stride {total_stride}")
        n = auto_grid(patch_size, total_stride, min_strides=min_strides) if n == 0 else n
        if n not in valid_grids(patch_size):
            raise ValueError(f"a grid of {n} x {n} sub-patches does not fit the patch size {list(patch_size)}: n must "
                             f"be at least 2 and divide both sides; valid here: {valid_grids(patch_size) or 'none'}")
        self.n, self.patch_size, self.total_stride = n, patch_size, total_stride
        self.cell = tuple(side // n for side in patch_size)
        padded = [math.ceil(c / s) * s for c, s in zip(self.cell, total_stride)]
        if all(p == s for p, s in zip(padded, total_stride)):
            # a 1 x 1 bottleneck: instance normalisation needs more than one value per channel, so the
            # sub-patch grows by one stride along the axis of the smaller stride (the cheaper one)
            axis = 0 if total_stride[0] <= total_stride[1] else 1
            padded[axis] += total_stride[axis]
        self.padded = tuple(padded)
        # (before, after) padding per axis, centred
        self.padding = tuple(((p - c) // 2, p - c - (p - c) // 2) for p, c in zip(self.padded, self.cell))

    @property
    def cells(self) -> int:
        return self.n * self.n

    def cut(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, n*n, C, H/n, W/n), cells in row-major order."""
        b, c, height, width = maps.shape
        if (height, width) != self.patch_size:
            raise ValueError(f"SubPatchGrid: maps of {height} x {width}, but the grid is for {list(self.patch_size)}")
        (ch, cw), n = self.cell, self.n
        return maps.reshape(b, c, n, ch, n, cw).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, ch, cw)

    def sub_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B*n*n, C, pH, pW) sub-patches, padded to a multiple of the stride."""
        cells = self.cut(images).flatten(0, 1)
        (top, bottom), (left, right) = self.padding
        return F.pad(cells, (left, right, top, bottom))

    def crop(self, outputs: torch.Tensor) -> torch.Tensor:
        """(B*n*n, C, pH, pW) outputs of the padded sub-patches -> (B, n*n, C, H/n, W/n)."""
        (top, _), (left, _) = self.padding
        (ch, cw) = self.cell
        cropped = outputs[:, :, top:top + ch, left:left + cw]
        return cropped.reshape(-1, self.cells, *cropped.shape[1:])

    def describe(self) -> str:
        return (f"{self.n} x {self.n} sub-patches of {self.cell[0]} x {self.cell[1]} pixels (padded to "
                f"{self.padded[0]} x {self.padded[1]}) on the {self.patch_size[0]} x {self.patch_size[1]} patch")


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
