"""Contrastive losses. One loss per module; pixel and region selection live in
``nnunet_contrast.data.pixel_selection``."""
from nnunet_contrast.losses.class_mean import ClassMeanContrastLoss, class_means
from nnunet_contrast.losses.cross_pseudo import CrossPseudoSupervisionLoss
from nnunet_contrast.losses.dense_infonce import DenseInfoNCELoss
from nnunet_contrast.losses.ntxent import NTXentLoss
from nnunet_contrast.losses.patch_consistency import PatchImageConsistencyLoss
from nnunet_contrast.losses.region_local import RegionLocalLoss
from nnunet_contrast.losses.supcon_local import SupConLocalLoss, supcon_pixel_loss

__all__ = ["ClassMeanContrastLoss", "CrossPseudoSupervisionLoss", "DenseInfoNCELoss", "NTXentLoss",
           "PatchImageConsistencyLoss", "RegionLocalLoss", "SupConLocalLoss", "class_means", "supcon_pixel_loss"]
