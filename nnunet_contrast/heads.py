"""Projection heads. They are trained with the contrastive losses and are never part of the
inference network (nnU-Net's checkpoint keeps only the segmentation network's weights)."""
import torch
import torch.nn.functional as F
from torch import nn


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
    (the class-mean and region losses normalise means and flattened regions themselves).

    Shapes: (B, C, H, W) -> (B, out_dim, H, W).
    """

    def __init__(self, in_channels: int, hidden_dim: int = 256, out_dim: int = 128, normalize: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden_dim, out_dim, 1))
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.net(features)
        return F.normalize(out, dim=1) if self.normalize else out
