"""nnU-Net's segmentation loss on the pixels that have a target (self-training, docs/methods.md)::

    L = sum_k w_k [ CE_k + (-SoftDice_k) ],   over the pixels p with y_p != EXCLUDED only

    CE_k       = mean over kept pixels p of  -log softmax(z_k)_p[y_p]
    SoftDice_k = mean over foreground classes c of
                 (2 sum_p m_p s_pc t_pc + eps) / (sum_p m_p t_pc + sum_p m_p s_pc + eps)

with z_k the network's output at deep-supervision resolution k, y at resolution k the full-resolution
target downsampled by nearest neighbour (as nnU-Net's ``DownsampleSegForDSTransform``), s = softmax(z_k),
t the one-hot target, m_p = [y_p != EXCLUDED], eps = 1e-5 and w_k nnU-Net's deep-supervision weights.
The sums run over the batch when nnU-Net plans batch Dice, else per image and then averaged. This is
nnU-Net's own ``DC_and_CE_loss`` with an ignore label: self-training leaves the teacher's unconfident
pixels out (or, in a mixed batch, the pixels whose target belongs to the other term).
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

EXCLUDED = -1  # target of a pixel that no loss reads (unconfident pseudo-label, or another term's pixel)


def deep_supervision_targets(labels: torch.Tensor, outputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """(B, *spatial) long labels -> one (B, 1, *spatial_k) float target per output, by nearest neighbour."""
    full = labels[:, None].float()
    return [full if o.shape[2:] == full.shape[2:] else F.interpolate(full, size=o.shape[2:], mode="nearest-exact")
            for o in outputs]


class MaskedSegmentationLoss(nn.Module):
    """Args:
        batch_dice: nnU-Net's plan for the configuration (``configuration_manager.batch_dice``).
        deep_supervision_weights: nnU-Net's weights per output resolution, or None without deep supervision.
        ddp: batch Dice gathered across processes, as nnU-Net's loss under DDP.

    Shapes:
        outputs: (B, K, *spatial) logits (2d or 3d), or a list over deep-supervision resolutions of them.
        labels: (B, *spatial) long class indices at full resolution, ``EXCLUDED`` where no target exists.
        Returns a float32 scalar; an exact 0 (with gradient) when no pixel has a target (under DDP with
        batch Dice: nnU-Net's Dice of an empty mask, the constant -1 with zero gradient, since every rank
        must take part in the gathering).
    """

    def __init__(self, batch_dice: bool, deep_supervision_weights: Optional[Sequence[float]] = None,
                 ddp: bool = False):
        super().__init__()
        dice = {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": ddp}
        loss = DC_and_CE_loss(dice, {}, weight_ce=1, weight_dice=1, ignore_label=EXCLUDED,
                              dice_class=MemoryEfficientSoftDiceLoss)
        self.batch_dice = batch_dice
        self.gathers = ddp and batch_dice  # nnU-Net's batch Dice all-gathers its sums across ranks
        self.deep_supervision = deep_supervision_weights is not None
        self.loss = DeepSupervisionWrapper(loss, deep_supervision_weights) if self.deep_supervision else loss

    def forward(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        if labels.shape != (outputs[0].shape[0], *outputs[0].shape[2:]):
            raise ValueError(f"MaskedSegmentationLoss: labels must be (B, *spatial) matching the outputs' "
                             f"{tuple(outputs[0].shape)}, got {tuple(labels.shape)}")
        with torch.autocast(device_type=labels.device.type, enabled=False):  # float32 under AMP
            outputs = [o.float() for o in outputs]
            if not (labels != EXCLUDED).any() and not self.gathers:  # under DDP every rank gathers its sums
                return sum(o.sum() for o in outputs) * 0.0
            targets = deep_supervision_targets(labels, outputs)
            if self.deep_supervision:
                return self.loss(outputs, targets)
            return self.loss(outputs[0], targets[0])
