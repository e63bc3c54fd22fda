"""NT-Xent, the global contrastive loss of SimCLR (Chen et al. 2020) as used by Hu et al. 2021
(Eq. 1) and Chaitanya et al. 2020 (G^R), with the partition positives of Chaitanya et al.'s G^D.

Each of the 2B views ``i`` is an anchor; ``P(i)`` are the other views whose image shares the
anchor's group, ``N(i)`` the views of images of other groups. With ``s_ij = z_i . z_j / tau``::

    L = 1/|pairs| sum_i sum_{j in P(i)} -log( exp(s_ij) / (exp(s_ij) + sum_{k in N(i)} exp(s_ik)) )

* groups = one per image (the default): ``P(i)`` is the other view of the same image and the
  denominator runs over every view but ``i``: SimCLR's NT-Xent (Hu Eq. 1, G^R).
* groups = slice partitions (G^D): same-partition slices of other volumes are positives too,
  and no same-partition view is a negative.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_contrast.distributed import gather, gather_sizes, gather_with_grad, global_mean, is_distributed, own_rows


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy over two views, optionally with groups.

    Args:
        temperature: ``tau``; must be > 0 (Hu et al.'s code: 0.5; Chaitanya et al.: 0.1).
        gather_distributed: when torch.distributed is initialised, the views of every process are
            candidates (anchors stay local, ``nnunet_contrast.distributed``), as in lightly's NTXentLoss;
            the ranks' mean loss (and gradient) is then the loss of one process on the global batch.

    Shapes:
        z0, z1: (B, D) embeddings of the first and second view; row b of both comes from image b.
        They are L2-normalised here.
        groups: optional (B,) integers; images of one group are positives of each other.
        Returns a float32 scalar; 0 (with a graph) when no anchor has a negative.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = True):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"NTXentLoss: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, z0: torch.Tensor, z1: torch.Tensor, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        if z0.ndim != 2 or z0.shape != z1.shape:
            raise ValueError(f"NTXentLoss: expected two (B, D) tensors of equal shape, got "
                             f"{tuple(z0.shape)} and {tuple(z1.shape)}")
        if z0.shape[0] == 0:
            raise ValueError("NTXentLoss: the batch is empty")
        if groups is not None and tuple(groups.shape) != (z0.shape[0],):
            raise ValueError(f"NTXentLoss: groups must have shape ({z0.shape[0]},), got {tuple(groups.shape)}")
        with torch.autocast(device_type=z0.device.type, enabled=False):  # float32 under AMP
            return self._loss(z0, z1, groups)

    def _loss(self, z0: torch.Tensor, z1: torch.Tensor, groups: Optional[torch.Tensor]) -> torch.Tensor:
        z0 = F.normalize(z0.float(), dim=1)
        z1 = F.normalize(z1.float(), dim=1)
        batch = z0.shape[0]
        distributed = self.gather_distributed and is_distributed()
        sizes = gather_sizes(batch, z0.device) if distributed else [batch]
        offset = own_rows(sizes).start if distributed else 0
        # default: one group per image, numbered across processes; given groups are global ids
        groups = torch.arange(batch, device=z0.device) + offset if groups is None else groups.to(z0.device)
        groups = groups.long()
        all0, all1, all_groups = z0, z1, groups
        if distributed:
            all0, all1, all_groups = gather_with_grad(z0, sizes), gather_with_grad(z1, sizes), gather(groups, sizes)
        total = all0.shape[0]
        anchors = torch.cat([z0, z1], dim=0)                            # (2B, D)
        candidates = torch.cat([all0, all1], dim=0)                     # (2BW, D)
        logits = anchors @ candidates.T / self.temperature              # (2B, 2BW)
        local = torch.arange(batch, device=z0.device) + offset
        self_index = torch.cat([local, local + total])
        rows = torch.arange(2 * batch, device=z0.device)
        same = torch.cat([groups, groups])[:, None] == torch.cat([all_groups, all_groups])[None, :]
        positive = same.clone()
        positive[rows, self_index] = False
        log_negatives = logits.masked_fill(same, float("-inf")).logsumexp(1, keepdim=True)   # (2B, 1)
        per_pair = torch.logaddexp(logits, log_negatives) - logits      # -log(e^s / (e^s + sum_neg))
        valid = positive & torch.isfinite(log_negatives)
        if distributed:  # every rank takes part in the collectives, with or without a valid pair
            return global_mean(per_pair.masked_fill(~valid, 0.0).sum(), valid.sum())
        if not valid.any():
            return logits.sum() * 0.0
        return per_pair[valid].mean()
