"""What one training step of a stage reads, computed on first use and at most once per step."""
from dataclasses import dataclass
from functools import cached_property
from typing import Dict, List, Optional, Tuple

import torch

from nnunet_contrast.data.batch import Batch
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
    """The batch of nnU-Net's loop for this step (the stage's loader), and what the stage's terms derive
    from it: the images the stage trains on with each pixel's target (one ``Batch``), the unlabelled batch
    and the joint forward pass. The unlabelled batch is drawn only for stages that read it, and no label of
    it exists here: its targets are the stage's labeller's, or none."""

    def __init__(self, trainer, stage: Stage, batch: dict):
        self.trainer, self.stage, self.batch = trainer, stage, batch
        self.logged: Dict[str, torch.Tensor] = {}  # what the step notes for the log (e.g. pseudo-label coverage)

    @cached_property
    def loader_batch(self) -> Batch:
        """The stage's loader's batch on the device: nnU-Net's labelled images with their true labels, or
        images without labels (a loader over all images)."""
        images = to_device(self.batch["data"], self.trainer.device)
        if "target" not in self.batch:
            return Batch.unlabeled(images)
        return Batch.labeled(images, self.trainer.labels_of_target(to_device(self.batch["target"], self.trainer.device)))

    @cached_property
    def unlabeled(self) -> Optional[torch.Tensor]:
        """An unlabelled batch (images only) on the device, or None without an unlabelled pool."""
        if not self.stage.reads_unlabeled:
            raise RuntimeError(f"stage '{self.stage.name}' reads no unlabelled batch (its data: {self.stage.data})")
        images = self.trainer.next_unlabeled_images()
        return None if images is None else to_device(images, self.trainer.device)

    @cached_property
    def trained(self) -> Batch:
        """What the stage trains on: the loader's batch, followed by the unlabelled batch (with the stage's
        labeller's pseudo-labels) when the stage reads one; the student's view of both in self-training."""
        if self.stage.data == Data.LABELED_MIXED:
            return self.trainer.mixed_labeled_view(self.loader_batch)
        if not self.stage.reads_unlabeled or self.unlabeled is None:
            return self.loader_batch
        joined = self.loader_batch + Batch.unlabeled(self.unlabeled, self.trainer.label_unlabeled(self))
        return self.trainer.student_view(joined) if self.stage.data == Data.STUDENT else joined

    @property
    def images(self) -> torch.Tensor:
        return self.trained.images

    @property
    def labels(self) -> torch.Tensor:
        """Each pixel's target (true label or pseudo-label), ``EXCLUDED`` where none."""
        return self.trained.labels

    @cached_property
    def joint(self) -> JointPass:
        return self.trainer.joint_forward(self.images, features=any(t.features for t in self.stage.terms))

    def views(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Two augmented views of ``images``, as the stage's ``views`` says."""
        if self.stage.views == Views.NONE:
            raise RuntimeError(f"stage '{self.stage.name}' has no two-view augmentation")
        return two_views(images, spatial=self.stage.views == Views.SPATIAL)
