"""Dense InfoNCE: one contrastive term per spatial position (or grid cell) of an image.

Used by Zhao et al. 2022 (cross-level contrast, Eq. 1) and Basak et al. 2023 (IDEAL, ``L_loc``).
For image ``b`` and position ``i``, with ``q`` the queries, ``k`` the keys (the positives) and
``g`` the negatives of the same image, all L2-normalised::

    l(b, i) = -log( exp(q_bi . k_bi / tau) / (exp(q_bi . k_bi / tau) + sum_{n != i} exp(q_bi . g_bn / tau)) )

and the loss is the mean of ``l`` over all ``(b, i)``. Which tensor gives the negatives is the
caller's choice (pair selection stays outside the loss):

* Zhao Eq. 1: ``q`` = cells of the full-image projection ``p(Z)``, ``k`` = the matching sub-patch
  projections ``p(z_i)`` (detached), negatives = the other cells of ``p(Z)`` itself (``negatives=q``);
* IDEAL ``L_loc``: ``q`` = the query view's dense projection, ``k`` = the key view's at the same
  position (no gradient), negatives = the key view's other positions (``negatives=None``: ``k``).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class DenseInfoNCELoss(nn.Module):
    """Args:
        temperature: ``tau`` (Zhao et al.: 0.07).

    Shapes:
        q, k: (B, N, D) queries and positives at N positions of B images.
        negatives: optional (B, N, D); position ``n`` of image ``b`` is a negative for every other
            position of image ``b``. Default: ``k``.
        Returns a float32 scalar; 0 (with a graph) when N = 1 (no negatives: -log 1).
    """

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"DenseInfoNCELoss: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, q: torch.Tensor, k: torch.Tensor, negatives: Optional[torch.Tensor] = None) -> torch.Tensor:
        negatives = k if negatives is None else negatives
        if q.ndim != 3 or q.shape != k.shape or q.shape != negatives.shape or q.numel() == 0:
            raise ValueError(f"DenseInfoNCELoss: expected non-empty (B, N, D) queries, keys and negatives of equal "
                             f"shape, got {tuple(q.shape)}, {tuple(k.shape)} and {tuple(negatives.shape)}")
        with torch.autocast(device_type=q.device.type, enabled=False):  # float32 under AMP
            return self._loss(q.float(), k.float(), negatives.float())

    def _loss(self, q, k, negatives) -> torch.Tensor:
        q, k, negatives = (F.normalize(t, dim=2) for t in (q, k, negatives))
        positions = q.shape[1]
        positive = (q * k).sum(2) / self.temperature                                  # (B, N)
        if positions < 2:
            return positive.sum() * 0.0
        logits = torch.bmm(q, negatives.transpose(1, 2)) / self.temperature           # (B, N, N)
        own = torch.eye(positions, dtype=torch.bool, device=q.device)
        log_negatives = logits.masked_fill(own, float("-inf")).logsumexp(2)           # (B, N)
        return (torch.logaddexp(positive, log_negatives) - positive).mean()
