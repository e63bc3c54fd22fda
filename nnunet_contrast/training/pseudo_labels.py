"""Pseudo-labels for self-training.

Both are callables, images -> labels with ``EXCLUDED`` where the labeller does not trust its label.

* ``PseudoLabeler`` (Chaitanya et al. 2023, Sec. 3 and Table VII) holds a frozen copy of the
  segmentation network taken at the start of a pseudo-labelling round; it labels each augmented
  unlabelled batch, so that pseudo-labels follow their image's spatial augmentation. Refreshing the
  copy every P iterations is the paper's re-estimation of pseudo-labels every P iterations.
* ``EmaTeacher`` (mean teacher, Tarvainen & Valpola 2017) is a copy that follows the student,
  theta_t <- d theta_t + (1 - d) theta_s after every student step; it labels by argmax and leaves
  out the pixels whose softmax confidence is below their class's threshold (``thresholds.py``), and
  early on the images it is least sure of (``reliability.py``).
"""
import copy
import itertools
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from nnunet_contrast.losses.masked_segmentation import EXCLUDED
from nnunet_contrast.network.taps import unwrap_network
from nnunet_contrast.training.dice import foreground_dice
from nnunet_contrast.training.reliability import mean_entropy, most_reliable
from nnunet_contrast.training.thresholds import Threshold
from nnunet_contrast.training.step import full_resolution


def round_start_epochs(warmup_epochs: int, total_epochs: int, rounds: int) -> List[int]:
    """First epoch of each of ``rounds`` pseudo-labelling rounds splitting the epochs after the
    warm-up as evenly as possible (no round is empty when there are at least as many epochs)."""
    if rounds < 1:
        raise ValueError(f"pseudo-labelling needs at least one round, got {rounds}")
    joint = total_epochs - warmup_epochs
    starts = [warmup_epochs + (r * joint) // rounds for r in range(rounds)]
    return sorted(set(starts)) if joint > 0 else []


def tensors_of(network: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) of each distinct parameter and buffer of ``network``, under its first name."""
    return itertools.chain(network.named_parameters(), network.named_buffers())


class FrozenNetwork:
    """A copy of the trainer's network (DDP / compile wrappers removed) in eval mode, without gradients."""

    def __init__(self, network: nn.Module):
        self.network = copy.deepcopy(unwrap_network(network)).eval()
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)

    def state_dict(self) -> dict:
        return self.network.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return full_resolution(self.network(images))


class PseudoLabeler(FrozenNetwork):
    """Frozen snapshot of a segmentation network that labels images by argmax.

    Args:
        network: the trainer's network; it is copied.
        min_flip_agreement: 0 keeps every pseudo-label; above 0, an image whose prediction
            and the prediction of its flipped copy (flipped back) agree with a foreground Dice
            below the threshold is excluded (all pixels ``EXCLUDED``). The paper's consistency
            filter uses rotation, translation and scaling; flips are exactly invertible.
    """

    def __init__(self, network: nn.Module, min_flip_agreement: float = 0.0):
        super().__init__(network)
        self.min_flip_agreement = min_flip_agreement

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) images (2D or 3D) -> (B, *spatial) long pseudo-labels."""
        logits = self.logits(images)
        labels = logits.argmax(1)
        if self.min_flip_agreement > 0:
            spatial = tuple(range(2, images.ndim))
            flipped = self.logits(images.flip(spatial)).flip(spatial).argmax(1)
            agree = foreground_dice(labels, flipped, logits.shape[1])
            labels[agree < self.min_flip_agreement] = EXCLUDED
        return labels


class EmaTeacher(FrozenNetwork):
    """Exponential moving average of the student's weights.

    Args:
        network: the student (the trainer's network); the teacher starts as its copy.
        decay: d in theta_t <- d theta_t + (1 - d) theta_s, in [0, 1); buffers that are no floats are copied.
        threshold: which labels to keep (``training/thresholds.py``): pixels whose softmax maximum is below
            their class's threshold get ``EXCLUDED``.
    """

    def __init__(self, network: nn.Module, decay: float, threshold: Threshold):
        if not 0 <= decay < 1:
            raise ValueError(f"EmaTeacher: decay must be in [0, 1), got {decay}")
        super().__init__(network)
        self.decay, self.threshold = decay, threshold
        self.image_entropy: Optional[torch.Tensor] = None  # (B,) of the last batch it labelled (reliability.py)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One step of the average, over each parameter and buffer once. nnU-Net's U-Nets list one tensor
        under several ``state_dict`` names (``.conv`` and ``.all_modules.N``, the encoder again as
        ``decoder.encoder``); ``named_parameters`` and ``named_buffers`` name each tensor once."""
        current = dict(tensors_of(unwrap_network(student)))
        for name, value in tensors_of(self.network):
            if value.is_floating_point():
                value.mul_(self.decay).add_(current[name].detach().to(value.dtype), alpha=1 - self.decay)
            else:
                value.copy_(current[name])

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *spatial) images -> (B, C, *spatial) float32 softmax."""
        return torch.softmax(self.logits(images).float(), 1)

    def kept(self, probabilities: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """((B, *spatial) long argmax labels, (B, *spatial) bool: the label passes its threshold)."""
        confidence, labels = probabilities.max(1)
        return labels, confidence >= self.threshold.of(labels)

    def predict(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``kept`` at the current thresholds, which it leaves as they are (validation)."""
        return self.kept(self.probabilities(images))

    def __call__(self, images: torch.Tensor, reliable_share: float = 1.0) -> torch.Tensor:
        """Labels a training batch: (B, C_in, *spatial) images -> (B, *spatial) long argmax labels,
        ``EXCLUDED`` where below the threshold, and in all but the ``reliable_share`` most reliable images
        (``reliability.py``); an adaptive threshold first takes in the batch."""
        probabilities = self.probabilities(images)
        self.threshold.update(probabilities)
        labels, kept = self.kept(probabilities)
        self.image_entropy = mean_entropy(probabilities)
        if reliable_share < 1:
            reliable = most_reliable(self.image_entropy, reliable_share)
            kept &= reliable.view(-1, *([1] * (kept.ndim - 1)))
        return torch.where(kept, labels, EXCLUDED)
