"""Cross pseudo-supervision of two decoders (Basak et al. 2023, IDEAL ``L_SSF``, unlabelled part)::

    L = CE(p1, y2) + CE(p2, y1),   y1 = argmax p1, y2 = argmax p2 (no gradient through y)

Each decoder learns from the other's hard prediction; the CE is the mean over pixels.
"""
import torch
import torch.nn.functional as F
from torch import nn


class CrossPseudoSupervisionLoss(nn.Module):
    """Shapes:
        logits1, logits2: (B, K, *spatial) logits of the two decoders for the same images.
        Returns a float32 scalar.
    Usable inside nnU-Net's ``DeepSupervisionWrapper``, which calls it once per resolution.
    """

    def forward(self, logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
        if logits1.ndim < 3 or logits1.shape != logits2.shape or logits1.numel() == 0:
            raise ValueError(f"CrossPseudoSupervisionLoss: expected two non-empty (B, K, ...) logits of equal shape, "
                             f"got {tuple(logits1.shape)} and {tuple(logits2.shape)}")
        with torch.autocast(device_type=logits1.device.type, enabled=False):  # float32 under AMP
            logits1, logits2 = logits1.float(), logits2.float()
            label1, label2 = logits1.detach().argmax(1), logits2.detach().argmax(1)
            return F.cross_entropy(logits1, label2) + F.cross_entropy(logits2, label1)
