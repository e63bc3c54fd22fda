"""Projection heads. They are trained with the contrastive losses and are never part of the
inference network (nnU-Net's checkpoint keeps only the segmentation network's weights)."""
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_contrast.network.subpatches import stride_factors


def convolution(dims: int):
    """nn.Conv2d or nn.Conv3d, for maps of ``dims`` spatial axes."""
    if dims not in (2, 3):
        raise ValueError(f"a projection head has a 2D or 3D form, not {dims}D")
    return nn.Conv3d if dims == 3 else nn.Conv2d


class GlobalProjectionHead(nn.Module):
    """h1 of Hu et al.: global average pool -> Linear -> ReLU -> Linear -> L2 norm.

    Shapes: (B, C, *spatial) encoder features -> (B, out_dim) unit vectors.
    """

    def __init__(self, in_channels: int, hidden_dim: int = 512, out_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.flatten(2).mean(2)
        return F.normalize(self.mlp(pooled), dim=1)


class DenseProjectionHead(nn.Module):
    """h2 of Hu et al. (g2 of Chaitanya et al. 2020, h_phi of Chaitanya et al. 2023): two point-wise
    (1x1) convolutions with a ReLU between, then an L2 norm per pixel unless ``normalize=False``
    (the class-mean and region losses normalise means and flattened regions themselves). ``dims``: 2 or 3,
    the maps' spatial axes.

    Shapes: (B, C, *spatial) -> (B, out_dim, *spatial).
    """

    def __init__(self, in_channels: int, hidden_dim: int = 256, out_dim: int = 128, normalize: bool = True,
                 dims: int = 2):
        super().__init__()
        conv = convolution(dims)
        self.net = nn.Sequential(conv(in_channels, hidden_dim, 1), nn.ReLU(inplace=True), conv(hidden_dim, out_dim, 1))
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.net(features)
        return F.normalize(out, dim=1) if self.normalize else out


class CellProjectionHead(nn.Module):
    """p of Zhao et al. 2022: three strided convolutions whose kernels equal their strides, with
    ReLUs between, then an L2 norm per output pixel. Their strides multiply to ``cell_size``, so each
    output pixel sees exactly one ``cell_size`` cell of the input (non-overlapping receptive fields):
    a full patch of n x n cells gives the n x n x D grid p(Z), a cell on its own the 1 x 1 x D p(z_i).
    A 3D ``cell_size`` gives 3D convolutions and the n x n x n grid.

    Shapes: (B, C, n*cH, n*cW) -> (B, out_dim, n, n); in 3D (B, C, n*cD, n*cH, n*cW) -> (B, out_dim, n, n, n).
    """

    def __init__(self, in_channels: int, cell_size, hidden_dim: int = 128, out_dim: int = 128):
        super().__init__()
        strides = list(zip(*(stride_factors(int(side)) for side in cell_size)))
        channels = [in_channels, hidden_dim, hidden_dim, out_dim]
        layers = []
        for i, stride in enumerate(strides):
            layers.append(convolution(len(cell_size))(channels[i], channels[i + 1], stride, stride))
            if i < len(strides) - 1:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=1)
