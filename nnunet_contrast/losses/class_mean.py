"""Pixel-to-class-mean contrastive loss of Chaitanya et al. 2023 (MedIA), Eq. 3-4.

Each anchor is a pixel ``i`` of foreground class ``c`` in image ``x`` (a few sampled per class and
image: ``nnunet_contrast.data.pixel_selection.sample_class_pixels``). Its candidates are the class means
``z_bar_k`` (mean of the raw embeddings of class ``k``'s pixels, then normalised) of the classes
present in the reference images: the positives ``P_i`` (class ``c``) and the negatives ``N_i``
(the other classes). With ``s(.,.)`` the cosine similarity over ``tau``, Eq. 4 for each positive::

    l_i = -1/|P_i| sum_{p in P_i} log( exp(s(z_i, p)) / (exp(s(z_i, p)) + sum_{n in N_i} exp(s(z_i, n))) )

* ``matching="intra"``: the candidates are the means of ``x`` itself; ``P_i = {z_bar_c(x)}``.
* ``matching="inter"``: the candidates are the means of ``x`` and of a partner image ``x'``;
  ``P_i`` holds ``z_bar_c(x)`` and, where class c is present in ``x'``, ``z_bar_c(x')`` (the
  paper: positives and negatives "from within the same image as well as from different images").

Eq. 3 averages over anchors per class, then over classes, per image; the loss is the mean over
images with at least one anchor. Background is never an anchor and, unless
``background_negative``, never a candidate (as in the paper). An anchor without a negative
candidate (no other class in its reference images) is skipped; pixels labelled < 0 belong to no class.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

MATCHINGS = ("intra", "inter")


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, D, *spatial) embeddings, (B, *spatial) labels -> (B, K, D) mean embedding per image and class,
    and (B, K) whether the class occurs. Labels < 0 or >= K are ignored."""
    flat = embeddings.flatten(2).float()                                   # (B, D, HW)
    labs = labels.reshape(labels.shape[0], -1).long()
    onehot = (labs[:, None, :] == torch.arange(num_classes, device=labs.device)[None, :, None]).float()
    counts = onehot.sum(2)                                                 # (B, K)
    sums = torch.einsum("bkp,bdp->bkd", onehot, flat)
    return sums / counts.clamp(min=1)[..., None], counts > 0


class ClassMeanContrastLoss(nn.Module):
    """Args:
        temperature: ``tau`` (paper: 0.1).
        matching: ``"intra"`` or ``"inter"`` (see the module docstring).
        background_negative: let the background class mean be a negative candidate.
        background: the background label.

    Shapes:
        embeddings: (B, D, H, W), or (B, D, Z, H, W) in 3D (pixels are voxels); labels: (B, *spatial)
        integers (true labels or pseudo-labels).
        anchors: (image, pixel, label) index tensors of equal length; pixel indexes the flattened spatial axes.
        partners: (B,) partner image of each image, required for ``"inter"``.
        Returns a float32 scalar; 0 (with a graph) when no anchor has a negative.
    """

    def __init__(self, temperature: float = 0.1, matching: str = "intra", background_negative: bool = False,
                 background: int = 0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"ClassMeanContrastLoss: temperature must be > 0, got {temperature}")
        if matching not in MATCHINGS:
            raise ValueError(f"ClassMeanContrastLoss: matching must be one of {MATCHINGS}, got {matching!r}")
        self.temperature, self.matching = float(temperature), matching
        self.background_negative, self.background = background_negative, background

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, anchors, num_classes: int,
                partners: Optional[torch.Tensor] = None) -> torch.Tensor:
        if embeddings.ndim not in (4, 5) or labels.shape != (embeddings.shape[0], *embeddings.shape[2:]):
            raise ValueError(f"ClassMeanContrastLoss: expected embeddings (B, D, *spatial) and labels (B, *spatial) "
                             f"of 2 or 3 spatial axes, got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
        if self.matching == "inter" and (partners is None or tuple(partners.shape) != (embeddings.shape[0],)):
            raise ValueError("ClassMeanContrastLoss: inter-image matching needs partners of shape (B,)")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):  # float32 under AMP
            return self._loss(embeddings, labels, anchors, num_classes, partners)

    def _loss(self, embeddings, labels, anchors, num_classes, partners) -> torch.Tensor:
        image, pixel, label = (a.to(embeddings.device).long() for a in anchors)
        zero = embeddings.sum() * 0.0
        if len(image) == 0:
            return zero
        means, present = class_means(embeddings, labels, num_classes)
        means = F.normalize(means, dim=2)
        allowed = torch.ones(num_classes, dtype=torch.bool, device=means.device)
        if not self.background_negative:
            allowed[self.background] = False
        candidates, available = means[image], present[image] & allowed        # (n, K, D), (n, K)
        is_positive = F.one_hot(label, num_classes).bool() & available        # (n, K)
        if self.matching == "inter":
            partner = partners.to(means.device).long()[image]
            candidates = torch.cat([candidates, means[partner]], 1)            # (n, 2K, D)
            partner_available = present[partner] & allowed
            is_positive = torch.cat([is_positive, F.one_hot(label, num_classes).bool() & partner_available], 1)
            available = torch.cat([available, partner_available], 1)
        z = F.normalize(embeddings.flatten(2).float()[image, :, pixel], dim=1)  # (n, D)
        logits = torch.einsum("nd,nkd->nk", z, candidates) / self.temperature
        negative = available & ~is_positive
        valid = is_positive.any(1) & negative.any(1)
        if not valid.any():
            return zero
        # Eq. 4: each positive against the negatives only (the other positive is no negative)
        log_negatives = logits.masked_fill(~negative, float("-inf")).logsumexp(1, keepdim=True)
        per_positive = torch.logaddexp(logits, log_negatives) - logits          # -log(e^s / (e^s + sum_neg))
        per_anchor = per_positive.masked_fill(~is_positive, 0.0).sum(1) / is_positive.sum(1).clamp(min=1)
        return _mean_per_class_then_image(per_anchor[valid], image[valid], label[valid], num_classes)


def _mean_per_class_then_image(values, image, label, num_classes) -> torch.Tensor:
    """Eq. 3's averaging: over anchors of one (image, class), then over classes, then images."""
    group = image * num_classes + label
    _, group_index = torch.unique(group, return_inverse=True)
    group_sum = values.new_zeros(int(group_index.max()) + 1).index_add(0, group_index, values)
    group_count = values.new_zeros(len(group_sum)).index_add(0, group_index, torch.ones_like(values))
    group_image = torch.zeros_like(group_index[:len(group_sum)]).scatter(0, group_index, image)
    per_group = group_sum / group_count
    _, image_index = torch.unique(group_image, return_inverse=True)
    image_sum = values.new_zeros(int(image_index.max()) + 1).index_add(0, image_index, per_group)
    image_count = values.new_zeros(len(image_sum)).index_add(0, image_index, torch.ones_like(per_group))
    return (image_sum / image_count).mean()
