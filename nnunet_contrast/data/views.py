"""Two-view augmentation on batches of 2D images or 3D volumes, in torch (any device).

nnU-Net's data loader already augments each sample once; contrastive methods need two views of
the same image. ``intensity_view`` changes intensities only (pixel labels stay aligned, as the
local losses need); ``spatial_view`` adds a random flip, rotation, scale and crop, as SimCLR's
global loss wants (Hu et al.'s code: brightness, gamma, noise, crop, elastic, rotation, scale).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewAugmentation:
    brightness: float = 0.2          # multiplicative factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2            # contrast factor drawn from [1 - c, 1 + c]
    gamma: float = 0.3               # gamma drawn from [1 - g, 1 + g] (on min-max scaled values)
    noise_std: float = 0.1           # Gaussian noise std, relative to each image's std
    rotation_degrees: float = 20.0
    scale: float = 0.2               # zoom factor drawn from [1 - s, 1 + s]
    translate: float = 0.1           # shift as a fraction of the image size
    flip_p: float = 0.5

    def __post_init__(self):
        for name in ("brightness", "contrast", "gamma", "scale"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"ViewAugmentation.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.noise_std < 0 or self.rotation_degrees < 0 or not 0 <= self.flip_p <= 1:
            raise ValueError("ViewAugmentation: noise_std and rotation_degrees must be >= 0 and flip_p in [0, 1]")


def _uniform(n: int, spread: float, like: torch.Tensor) -> torch.Tensor:
    return 1 + (torch.rand(n, device=like.device, dtype=like.dtype) * 2 - 1) * spread


def intensity_view(x: torch.Tensor, aug: ViewAugmentation = ViewAugmentation()) -> torch.Tensor:
    """Random brightness, contrast, gamma and noise per image. x: (B, C, *spatial) -> same shape."""
    x = x.float()
    b = x.shape[0]
    dims = tuple(range(1, x.ndim))
    shape = (b,) + (1,) * (x.ndim - 1)
    mean = x.mean(dims, keepdim=True)
    x = (x - mean) * _uniform(b, aug.contrast, x).view(shape) + mean
    x = x * _uniform(b, aug.brightness, x).view(shape)
    low, high = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    span = (high - low).clamp(min=1e-6)
    x = ((x - low) / span).clamp(0, 1) ** _uniform(b, aug.gamma, x).view(shape) * span + low
    std = x.std(dims, keepdim=True).clamp(min=1e-6)
    return x + torch.randn_like(x) * std * aug.noise_std


def affine_theta(angle, zoom, flip, shift, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) matrices for ``F.affine_grid``: flip, rotation by ``angle`` (radians), zoom, shift.

    affine_grid works in coordinates normalised per axis; the off-diagonal terms are rescaled so
    that non-square images are rotated rigidly in pixel space instead of sheared.
    """
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    return torch.stack([torch.stack([cos * flip, -sin * height / width, shift[:, 0]], 1),
                        torch.stack([sin * flip * width / height, cos, shift[:, 1]], 1)], 1)


def rotation_3d(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotations: about the x, then y, then z axis by ``angles`` (B, 3) radians."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def matrix(rows):
        return torch.stack([torch.stack(row, 1) for row in rows], 1)
    rx = matrix([[one, zero, zero], [zero, cos[:, 0], -sin[:, 0]], [zero, sin[:, 0], cos[:, 0]]])
    ry = matrix([[cos[:, 1], zero, sin[:, 1]], [zero, one, zero], [-sin[:, 1], zero, cos[:, 1]]])
    rz = matrix([[cos[:, 2], -sin[:, 2], zero], [sin[:, 2], cos[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


def affine_theta_3d(angles, zoom, flip, shift, depth: int, height: int, width: int) -> torch.Tensor:
    """(B, 3, 4) matrices for ``F.affine_grid`` on (D, H, W) volumes: a flip of the x (width) axis, rotations
    ``angles`` (B, 3) about x, y and z, zoom and shift; rigid in voxel space as ``affine_theta`` in 2D
    (S^-1 R F S / zoom, S the half sizes in affine_grid's x, y, z order)."""
    sizes = torch.tensor([width, height, depth], dtype=angles.dtype, device=angles.device)
    flips = torch.stack([flip, torch.ones_like(flip), torch.ones_like(flip)], 1)
    linear = rotation_3d(angles) * flips[:, None, :] * sizes[None, None, :] / sizes[None, :, None] / zoom[:, None, None]
    return torch.cat([linear, shift[:, :, None]], 2)


def random_affine_grid(x: torch.Tensor, aug: ViewAugmentation) -> torch.Tensor:
    """Sampling grid of a random flip + rotation + scale + shift per image of x: (B, C, H, W), or (B, C, D, H, W)
    with a rotation about each axis."""
    b, dims = x.shape[0], x.ndim - 2
    angle = (torch.rand(b, *([3] if dims == 3 else []), device=x.device) * 2 - 1) * math.radians(aug.rotation_degrees)
    zoom = _uniform(b, aug.scale, angle)
    flip = torch.where(torch.rand(b, device=x.device) < aug.flip_p, -1.0, 1.0)
    shift = (torch.rand(b, dims, device=x.device) * 2 - 1) * aug.translate * 2
    theta = affine_theta(angle, zoom, flip, shift, *x.shape[-2:]) if dims == 2 else \
        affine_theta_3d(angle, zoom, flip, shift, *x.shape[-3:])
    return F.affine_grid(theta, list(x.shape), align_corners=False)


def spatial_view(x: torch.Tensor, aug: ViewAugmentation = ViewAugmentation()) -> torch.Tensor:
    """Random flip, rotation, zoom and shift, then intensity changes. x: (B, C, H, W) or (B, C, D, H, W)."""
    grid = random_affine_grid(x.float(), aug)
    warped = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return intensity_view(warped, aug)


def two_views(x: torch.Tensor, spatial: bool, aug: ViewAugmentation = ViewAugmentation()):
    """Two independently augmented views of the batch x: (B, C, *spatial)."""
    view = spatial_view if spatial else intensity_view
    return view(x, aug), view(x, aug)
