"""Local contrastive loss of Chaitanya et al. 2020 (NeurIPS), strategies L^R and L^D.

Each feature map (a decoder block's output through the head g2) is cut into ``A`` local regions
(``nnunet_contrast.data.pixel_selection.region_vectors``; region vector = the flattened K x K patch).
For an anchor region ``u`` of map ``m`` and a positive map ``n`` (``m != n`` of the same group),
with ``s(.,.)`` the cosine similarity over ``tau``::

    l(m, n, u) = -log( exp(s(m_u, n_u)) /
                       (exp(s(m_u, n_u)) + sum_{u' != u} exp(s(m_u, m_u')) + sum_{u' != u} exp(s(m_u, n_u'))) )

and the loss is the mean of ``l`` over all (m, n, u).

* L^R (groups = one per image, the default): the positive is the same region of the other
  intensity-only view of the same slice; the negatives are the other regions of both views.
* L^D (groups = slice partitions): same-partition slices of other volumes are positive maps too.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class RegionLocalLoss(nn.Module):
    """Args:
        temperature: ``tau`` (paper: 0.1).

    Shapes:
        r0, r1: (B, A, D) region vectors of the first and second view of B images (normalised here).
        groups: optional (B,) integers; maps of images of one group are positives of each other.
        Returns a float32 scalar; 0 (with a graph) when there is a single region.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"RegionLocalLoss: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, r0: torch.Tensor, r1: torch.Tensor, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        if r0.ndim != 3 or r0.shape != r1.shape or r0.shape[0] == 0:
            raise ValueError(f"RegionLocalLoss: expected two non-empty (B, A, D) tensors of equal shape, got "
                             f"{tuple(r0.shape)} and {tuple(r1.shape)}")
        if groups is not None and tuple(groups.shape) != (r0.shape[0],):
            raise ValueError(f"RegionLocalLoss: groups must have shape ({r0.shape[0]},), got {tuple(groups.shape)}")
        with torch.autocast(device_type=r0.device.type, enabled=False):  # float32 under AMP
            return self._loss(r0, r1, groups)

    def _loss(self, r0, r1, groups) -> torch.Tensor:
        batch, regions = r0.shape[:2]
        maps = F.normalize(torch.cat([r0, r1]).float(), dim=2)                 # (M, A, D)
        sim = torch.einsum("mud,nvd->munv", maps, maps) / self.temperature     # (M, A, M, A)
        other_region = ~torch.eye(regions, dtype=torch.bool, device=maps.device)
        not_u = other_region[None, :, None, :]                                  # u' != u
        cross_negatives = sim.masked_fill(~not_u, float("-inf")).logsumexp(3)  # (M, A, M): sum over n_u'
        own = torch.arange(len(maps), device=maps.device)
        own_negatives = cross_negatives[own, :, own]                           # (M, A): sum over m_u'
        positive = torch.diagonal(sim, dim1=1, dim2=3).permute(0, 2, 1)       # (M, A, M): s(m_u, n_u)
        denominator = torch.stack([positive, own_negatives[:, :, None].expand_as(positive), cross_negatives])
        per_pair = denominator.logsumexp(0) - positive
        if groups is None:
            groups = torch.arange(batch, device=maps.device)
        groups = torch.cat([groups, groups]).to(maps.device)
        pairs = (groups[:, None] == groups[None, :]) & ~torch.eye(len(maps), dtype=torch.bool, device=maps.device)
        if regions < 2 or not pairs.any():
            return sim.sum() * 0.0
        return per_pair.permute(0, 2, 1)[pairs].mean()
