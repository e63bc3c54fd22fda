"""Dense patch-image consistency of Zhao et al. 2022 (Eq. 2).

For each grid cell ``i`` of an image, the prediction of the sub-patch ``x_i`` run on its own,
``h(z_i)``, is pulled towards region ``i`` of the full-image prediction ``h(Z)_i``::

    L = sum_i MSE(h(z_i), h(Z)_i)

on probabilities (softmax over the classes; the reference code uses a sigmoid for its one class),
the full-image side detached (as in the reference code). Each MSE is the mean over the images of
the batch, the classes and the cell's pixels (voxels in 3D); the cells are summed, as Eq. 2 and the
reference do.
"""
import torch
from torch import nn


class PatchImageConsistencyLoss(nn.Module):
    """Shapes:
        patch_logits: (B, A, K, h, w) logits of the A sub-patches of B images (cropped to their cells);
            (B, A, K, d, h, w) in 3D.
        image_logits: the full-image logits cut into the same A cells, of the same shape.
        Returns a float32 scalar (0 when both agree).
    """

    def forward(self, patch_logits: torch.Tensor, image_logits: torch.Tensor) -> torch.Tensor:
        if patch_logits.ndim not in (5, 6) or patch_logits.shape != image_logits.shape or patch_logits.numel() == 0:
            raise ValueError(f"PatchImageConsistencyLoss: expected two non-empty (B, A, K, *cell) tensors of equal "
                             f"shape, 2D or 3D cells, got {tuple(patch_logits.shape)} and {tuple(image_logits.shape)}")
        with torch.autocast(device_type=patch_logits.device.type, enabled=False):  # float32 under AMP
            patch = patch_logits.float().softmax(2)
            image = image_logits.detach().float().softmax(2)
            return ((patch - image) ** 2).mean(dim=(0, *range(2, patch.ndim))).sum()
