"""The student's batch in self-training: a stronger view than the teacher's, optionally mixed.

The teacher labels the unlabelled images as nnU-Net's loader augmented them; the student sees
them with further intensity perturbation and, by setting:

* ``none``: as they are;
* ``cutmix`` (Yun et al. 2019, as UniMatch for medical images): with probability 0.5 a box of
  another unlabelled image of the batch is pasted in, box area ~ U(0.02, 0.4) of the patch, aspect
  ratio ~ U(0.3, 1/0.3) (in 3D: the box's volume and two such ratios, see ``cutmix_boxes``);
* ``copypaste`` (bidirectional copy-paste, Bai et al. 2023, BCP): a box of ``box_fraction`` of each
  side is pasted from an unlabelled image into each labelled one, and from a labelled image into
  each unlabelled one, at a random position.

Every pixel keeps the target of the image it came from: its true label from a labelled image, the
teacher's pseudo-label (``EXCLUDED`` where unconfident) from an unlabelled one.

Before the teacher starts, ``labeled_copy_paste`` is BCP's supervised warm-up (Bai et al. 2023, Sec. 3.2;
``pre_train`` of their code): a box of ``box_fraction`` of each side from another labelled image pasted
into each labelled image, with its labels.
"""
import math
from typing import Sequence

import torch

from nnunet_contrast.data.batch import Batch
from nnunet_contrast.data.views import intensity_view

MIXINGS = ("none", "cutmix", "copypaste")
WARMUP_MIXINGS = ("none", "copypaste")  # the warm-up's mixing of labelled images
CUTMIX_PROBABILITY, CUTMIX_AREA, CUTMIX_ASPECT = 0.5, (0.02, 0.4), (0.3, 1 / 0.3)


def box_masks(n: int, shape: Sequence[int], sides: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(n, *shape) bool: one box per image, of ``sides`` (n, d) pixels along each of the d axes of ``shape``, at a
    random position inside."""
    per_image = (-1,) + (1,) * len(shape)  # an image's value against the positions of every axis
    inside = torch.ones((n,) + per_image[1:], dtype=torch.bool, device=device)
    for axis, length in enumerate(shape):
        side = sides[:, axis]
        start = (torch.rand(n, device=device) * (length - side + 1)).floor()
        along_axis = [1] * (len(shape) + 1)
        along_axis[axis + 1] = length
        positions = torch.arange(length, device=device).view(along_axis)
        inside = inside & (positions >= start.view(per_image)) & (positions < (start + side).view(per_image))
    return inside


def fixed_boxes(n: int, shape: Sequence[int], side_fraction: float, device: torch.device) -> torch.Tensor:
    """(n, *shape) bool: boxes of ``side_fraction`` of each side (BCP: 2/3, in 2D and 3D), at random positions."""
    sides = torch.tensor([float(int(length * side_fraction)) for length in shape], device=device).expand(n, -1)
    return box_masks(n, shape, sides, device)


def cutmix_boxes(n: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """(n, *shape) bool: with probability ``CUTMIX_PROBABILITY`` a box of random size and shape, else none.

    The box fills a share ~ U(``CUTMIX_AREA``) of the patch; the ratio of each side to the last axis's side is
    log-uniform in ``CUTMIX_ASPECT`` (in 2D: CutMix's aspect ratio height / width; in 3D two such ratios)."""
    volume = torch.empty(n, device=device).uniform_(*CUTMIX_AREA)
    for length in shape:
        volume = volume * length  # in pixels
    dims = len(shape)
    log_aspects = torch.empty(n, dims - 1, device=device).uniform_(math.log(CUTMIX_ASPECT[0]),
                                                                    math.log(CUTMIX_ASPECT[1]))
    log_ratios = torch.cat([log_aspects, torch.zeros(n, 1, device=device)], 1)
    log_ratios = log_ratios - log_ratios.mean(1, keepdim=True)  # sides of product ``volume``
    sides = (volume.log()[:, None] / dims + log_ratios).exp().round()
    sides = torch.minimum(sides.clamp(min=1), torch.tensor(shape, dtype=sides.dtype, device=device))
    boxes = box_masks(n, shape, sides, device)
    return boxes & (torch.rand(n, device=device) < CUTMIX_PROBABILITY).view((-1,) + (1,) * dims)


def paste(base: torch.Tensor, source: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``source`` inside the boxes (n, *spatial), ``base`` elsewhere; images (n, C, *spatial) or labels (n, *spatial)."""
    return torch.where(boxes[:, None] if base.ndim == boxes.ndim + 1 else boxes, source, base)


def labeled_copy_paste(batch: Batch, box_fraction: float) -> Batch:
    """BCP's warm-up view of a batch of labelled images: into each, a box of ``box_fraction`` of each side
    from the next image of the batch (the last from the first), labels and flags with it. BCP mixes the
    two halves of its labelled batch into half as many images; this keeps the batch size."""
    if batch.n_labeled != len(batch.images):
        raise ValueError("labeled_copy_paste mixes labelled images only")
    n, device = len(batch.images), batch.images.device
    partner = torch.roll(torch.arange(n, device=device), -1)
    boxes = fixed_boxes(n, batch.images.shape[2:], box_fraction, device)
    return Batch(paste(batch.images, batch.images[partner], boxes), paste(batch.labels, batch.labels[partner], boxes),
                 paste(batch.true, batch.true[partner], boxes), n)


def student_batch(batch: Batch, mixing: str, box_fraction: float, strong_intensity: bool = True) -> Batch:
    """The student's view of ``batch``: its labelled images (true labels) followed by its unlabelled ones
    (the teacher's pseudo-labels), mixed as ``mixing`` says; every pixel keeps its source's target and flag."""
    if mixing not in MIXINGS:
        raise ValueError(f"mixing must be one of {list(MIXINGS)}, got {mixing!r}")
    labeled, unlabeled = batch.images[batch.labeled_part], batch.images[batch.unlabeled_part]
    true_labels, pseudo_labels = batch.labels[batch.labeled_part], batch.labels[batch.unlabeled_part]
    from_l, from_u = batch.true[batch.labeled_part], batch.true[batch.unlabeled_part]
    strong = intensity_view(unlabeled).to(unlabeled.dtype) if strong_intensity else unlabeled
    n_l, n_u = len(labeled), len(unlabeled)
    if mixing == "cutmix":
        partner = torch.roll(torch.arange(n_u, device=unlabeled.device), 1)  # another image of the batch
        boxes = cutmix_boxes(n_u, unlabeled.shape[2:], unlabeled.device)
        strong, pseudo_labels = paste(strong, strong[partner], boxes), paste(pseudo_labels, pseudo_labels[partner], boxes)
    elif mixing == "copypaste":
        into_l = fixed_boxes(n_l, labeled.shape[2:], box_fraction, labeled.device)  # unlabelled content
        into_u = fixed_boxes(n_u, labeled.shape[2:], box_fraction, labeled.device)  # labelled content
        u_of_l, l_of_u = (torch.arange(n_l, device=labeled.device) % n_u,
                          torch.arange(n_u, device=labeled.device) % n_l)
        # both directions from the unmixed images
        labeled, strong = paste(labeled, strong[u_of_l], into_l), paste(strong, labeled[l_of_u], into_u)
        true_labels, pseudo_labels = (paste(true_labels, pseudo_labels[u_of_l], into_l),
                                      paste(pseudo_labels, true_labels[l_of_u], into_u))
        from_l, from_u = paste(from_l, from_u[u_of_l], into_l), paste(from_u, from_l[l_of_u], into_u)
    return Batch(torch.cat([labeled, strong]), torch.cat([true_labels, pseudo_labels]), torch.cat([from_l, from_u]),
                 n_l)
