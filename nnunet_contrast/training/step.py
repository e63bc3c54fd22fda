"""What one training step of a stage reads, computed on first use and at most once per step."""
from dataclasses import dataclass
from functools import cached_property
from typing import Dict, List, Optional, Tuple

import torch

from nnunet_contrast.data.views import two_views
from nnunet_contrast.training.schedule import Data, Stage, Views


def batch_part(output, part):
    """Images ``part`` (a slice or a boolean mask) of a network output (a tensor, or a list over
    deep-supervision resolutions)."""
    return [o[part] for o in output] if isinstance(output, (list, tuple)) else output[part]


def full_resolution(output):
    """nnU-Net's output (or target) at the patch's resolution: the first of the deep-supervision ones."""
    return output[0] if isinstance(output, (list, tuple)) else output


def to_device(value, device: torch.device):
    """A tensor, or a list of tensors (deep-supervision targets), on ``device``."""
    if isinstance(value, (list, tuple)):
        return [v.to(device, non_blocking=True) for v in value]
    return value.to(device, non_blocking=True)


@dataclass
class JointPass:
    """One forward pass over the labelled images followed by the unlabelled ones.

    ``outputs``: one network output per decoder (nnU-Net's U-Net has one, IDEAL's two), each a list
    over the deep-supervision resolutions or a tensor; ``features``: the last decoder stage (B, C, H, W),
    or None. nnU-Net's networks normalise per instance, so the labelled part of each output is what
    the labelled batch alone would give.
    """
    outputs: List
    features: Optional[torch.Tensor]


class StepInputs:
    """The batch of nnU-Net's loop for this step (the stage's loader), and what the stage's terms
    derive from it: the labelled images and targets, an unlabelled batch, the joint forward pass.
    The unlabelled batch is drawn only for stages that read it; no label of it exists here."""

    def __init__(self, trainer, stage: Stage, batch: dict):
        self.trainer, self.stage, self.batch = trainer, stage, batch
        self.logged: Dict[str, torch.Tensor] = {}  # what terms note for the log (e.g. pseudo-label coverage)

    @cached_property
    def batch_images(self) -> torch.Tensor:
        """The images of the stage's batch (the labelled batch, or the stage's own loader's) on the device."""
        return to_device(self.batch["data"], self.trainer.device)

    @property
    def labeled(self) -> Tuple[torch.Tensor, object]:
        """(images, target) of the labelled batch on the device; target as nnU-Net gives it."""
        return self.batch_images, self.target

    @cached_property
    def target(self):
        return to_device(self.batch["target"], self.trainer.device)

    @property
    def n_labeled(self) -> int:
        return self.batch["data"].shape[0]

    @cached_property
    def unlabeled(self) -> Optional[torch.Tensor]:
        """An unlabelled batch (images only) on the device, or None without an unlabelled pool."""
        if not self.stage.reads_unlabeled:
            raise RuntimeError(f"stage '{self.stage.name}' reads no unlabelled batch (its data: {self.stage.data})")
        images = self.trainer.next_unlabeled_images()
        return None if images is None else to_device(images, self.trainer.device)

    @cached_property
    def student(self):
        """Self-training: the student's view of the labelled and unlabelled batch, and each pixel's target
        (``data/mixing.py``)."""
        return self.trainer.self_training.student_batch(self)

    @cached_property
    def images(self) -> torch.Tensor:
        """The labelled images, followed by the unlabelled ones when the stage reads them (in a
        self-training stage: as the student sees them)."""
        if self.stage.self_training:
            return self.student.images
        if self.stage.data != Data.LABELED_AND_UNLABELED or self.unlabeled is None:
            return self.batch_images
        return torch.cat([self.batch_images, self.unlabeled])

    @property
    def labeled_part(self) -> slice:
        return slice(0, self.n_labeled)

    @property
    def unlabeled_part(self) -> slice:
        return slice(self.n_labeled, None)

    @cached_property
    def joint(self) -> JointPass:
        return self.trainer.joint_forward(self.images, features=any(t.features for t in self.stage.terms))

    def views(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Two augmented views of ``images``, as the stage's ``views`` says."""
        if self.stage.views == Views.NONE:
            raise RuntimeError(f"stage '{self.stage.name}' has no two-view augmentation")
        return two_views(images, spatial=self.stage.views == Views.SPATIAL)
