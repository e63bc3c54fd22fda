"""``Batch``: images and the target of each of their pixels, the one type a training step's terms read
(``training/step.py``), whatever the stage's data: nnU-Net's labelled batch, an unlabelled batch with or
without a pseudo-labeller's labels, or the student's mixed batch of self-training (``mixing.py``)."""
from dataclasses import dataclass
from typing import Optional

import torch

from nnunet_contrast.losses.masked_segmentation import EXCLUDED


def no_labels(images: torch.Tensor) -> torch.Tensor:
    """(B, *spatial) long, ``EXCLUDED`` everywhere: the labels of images (B, C, *spatial) that have none."""
    return torch.full((len(images), *images.shape[2:]), EXCLUDED, dtype=torch.long, device=images.device)


@dataclass
class Batch:
    """images: (B, C, *spatial);
    labels: (B, *spatial) long, each pixel's class, ``EXCLUDED`` where no loss reads it (an image without
    labels, a pseudo-label the labeller does not trust, nnU-Net's ignore label);
    true: (B, *spatial) bool, whether the label is a labelled image's ground truth (else a pseudo-label);
    n_labeled: the first ``n_labeled`` images come from (in a mixed batch: are based on) labelled images,
    the others from unlabelled ones.
    """
    images: torch.Tensor
    labels: torch.Tensor
    true: torch.Tensor
    n_labeled: int

    @classmethod
    def labeled(cls, images: torch.Tensor, labels: torch.Tensor) -> "Batch":
        """Labelled images with their ground truth."""
        return cls(images, labels, torch.ones_like(labels, dtype=torch.bool), len(images))

    @classmethod
    def unlabeled(cls, images: torch.Tensor, pseudo_labels: Optional[torch.Tensor] = None) -> "Batch":
        """Images without labels: a pseudo-labeller's labels, or none (every pixel ``EXCLUDED``)."""
        if pseudo_labels is None:
            pseudo_labels = no_labels(images)
        return cls(images, pseudo_labels, torch.zeros_like(pseudo_labels, dtype=torch.bool), 0)

    def __add__(self, other: "Batch") -> "Batch":
        """This batch's images followed by ``other``'s (labelled images first: ``other`` has none)."""
        if other.n_labeled:
            raise ValueError("Batch: a batch that holds labelled images comes first")
        return Batch(torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]),
                     torch.cat([self.true, other.true]), self.n_labeled)

    def only(self, pixels: torch.Tensor) -> torch.Tensor:
        """The labels of ``pixels`` (a bool mask like ``labels``), ``EXCLUDED`` elsewhere."""
        return torch.where(pixels, self.labels, EXCLUDED)

    @property
    def true_labels(self) -> torch.Tensor:
        return self.only(self.true)

    @property
    def pseudo_labels(self) -> torch.Tensor:
        return self.only(~self.true)

    @property
    def labeled_part(self) -> slice:
        return slice(0, self.n_labeled)

    @property
    def unlabeled_part(self) -> slice:
        return slice(self.n_labeled, None)
