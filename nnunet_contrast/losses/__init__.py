"""Contrastive losses. One loss per module; pixel selection lives in ``nnunet_contrast.pixel_selection``."""
from nnunet_contrast.losses.ntxent import NTXentLoss
from nnunet_contrast.losses.supcon_local import SupConLocalLoss, supcon_pixel_loss

__all__ = ["NTXentLoss", "SupConLocalLoss", "supcon_pixel_loss"]
