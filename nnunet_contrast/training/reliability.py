"""How reliable the teacher's labels of each unlabelled image are, and which images self-training keeps
while the teacher is young (``selftraining.reliable_start``, ``reliable_growth``).

nnFilterMatch (Ordi117/nnFilterMatch) ranks the unlabelled cases by the entropy of the prediction and
filters the pool by it; UniMatch-style curricula start from the easiest images and grow the set. Here the
ranking is per unlabelled batch, so that it needs no pass over the pool: an image's reliability is the
mean normalised entropy of the teacher's softmax over its pixels,

    H(image) = mean_p ( -sum_c q_p(c) log q_p(c) ) / log C      in [0, 1], 0: certain everywhere,

and the ``share`` of the batch's images with the lowest H keep their pseudo-labels, the others none.
The share starts at ``reliable_start`` and grows linearly to 1 over the first ``reliable_growth`` of the
pseudo-label term's iterations. ``TeacherGate`` holds all pseudo-labels back until the teacher itself is
good enough on the labelled batches (``selftraining.teacher_min_dice``). ``CaseReliability`` ranks the
unlabelled cases by the same entropy, for the log and the output folder.
"""
import math
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch


def mean_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) softmax -> (B,) float32: each image's mean normalised entropy, in [0, 1] (0 with one class)."""
    classes = probabilities.shape[1]
    if classes < 2:
        return torch.zeros(len(probabilities), device=probabilities.device)
    p = probabilities.float()
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1)  # p log p -> 0 as p -> 0
    return entropy.flatten(1).mean(1) / math.log(classes)


def most_reliable(entropy: torch.Tensor, share: float) -> torch.Tensor:
    """(B,) bool: the ceil(share B) images of lowest ``entropy`` (ties: the earlier image), at least one."""
    if not 0 < share <= 1:
        raise ValueError(f"most_reliable: the share must be in (0, 1], got {share}")
    keep = max(1, math.ceil(share * len(entropy) - 1e-9))
    order = torch.sort(entropy, stable=True).indices
    kept = torch.zeros(len(entropy), dtype=torch.bool, device=entropy.device)
    kept[order[:keep]] = True
    return kept


def reliable_share_at(start: float, growth: float, progress: float) -> float:
    """The share of each unlabelled batch kept at ``progress`` in [0, 1) of the pseudo-label term: ``start``,
    rising linearly to 1 at ``growth``; ``start`` throughout when ``growth`` is 0."""
    if growth <= 0:
        return start
    if progress >= growth:
        return 1.0
    return start + (1.0 - start) * progress / growth


class TeacherGate:
    """``selftraining.teacher_min_dice``: the warm-up ends when the teacher is good enough, not after a fixed
    share of the epochs. Until the teacher's foreground Dice on the labelled training batches (a running
    mean, ``momentum`` 0.9: about the last ten steps; summed over ranks under DDP) reaches ``min_dice``, its
    pseudo-labels are not used, so the self-training stage trains the student on the labelled pixels only;
    once reached, the gate stays open. The validation cases are never read for it. 0: open from the start.
    """

    def __init__(self, min_dice: float, momentum: float = 0.9):
        if not 0 <= min_dice <= 1 or not 0 <= momentum < 1:
            raise ValueError(f"TeacherGate: needs a Dice in [0, 1] and a momentum in [0, 1), got {min_dice} and {momentum}")
        self.min_dice, self.momentum = min_dice, momentum
        self.dice: Optional[float] = None
        self.open = min_dice <= 0

    def update(self, dice: float) -> bool:
        """Takes in one step's Dice (NaN: no foreground in the batch, ignored); returns whether the gate is
        open now (it opens at most once)."""
        if self.open or math.isnan(dice):
            return self.open
        self.dice = dice if self.dice is None else self.momentum * self.dice + (1 - self.momentum) * dice
        self.open = self.dice >= self.min_dice
        return self.open

    def state_dict(self) -> dict:
        return {"dice": self.dice, "open": self.open}

    def load_state_dict(self, state: dict) -> None:
        self.dice, self.open = state["dice"], state["open"]


class CaseReliability:
    """Each unlabelled case's reliability over an epoch: the mean ``mean_entropy`` of the teacher on the
    images drawn from it (nnFilterMatch ranks its unlabelled cases by entropy). ``ranking`` lists the cases
    from the most reliable (lowest entropy) on; the trainer writes it after every self-training epoch."""

    def __init__(self):
        self.sums: Dict[str, float] = defaultdict(float)
        self.counts: Dict[str, int] = defaultdict(int)

    def add(self, keys: Sequence[str], entropy: torch.Tensor) -> None:
        """One batch: the case key and the teacher's mean entropy of each image."""
        if len(keys) != len(entropy):
            raise ValueError(f"CaseReliability: {len(keys)} keys for {len(entropy)} images")
        for key, value in zip(keys, entropy.tolist()):
            self.sums[str(key)] += value
            self.counts[str(key)] += 1

    def merge(self, other: "CaseReliability") -> None:
        for key, value in other.sums.items():
            self.sums[key] += value
            self.counts[key] += other.counts[key]

    def ranking(self) -> List[Tuple[str, float, int]]:
        """(case, mean entropy, images seen), the most reliable first (ties: by case)."""
        return sorted(((key, self.sums[key] / self.counts[key], self.counts[key]) for key in self.sums),
                      key=lambda row: (row[1], row[0]))
