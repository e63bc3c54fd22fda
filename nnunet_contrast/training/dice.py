"""Dice of label maps, counted by nnU-Net's ``get_tp_fp_fn_tn``: the EMA teacher's quality on validation
batches (``self_training.py``) and the flip agreement of the pseudo-labeller (``pseudo_labels.py``)."""
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn


def label_counts(predicted: torch.Tensor, target: torch.Tensor, num_classes: int, per_image: bool,
                 valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True positives, false positives and false negatives of every class of two label maps (B, ...), over
    the ``valid`` pixels (all when None): each (C,), or (B, C) ``per_image``."""
    one_hot = torch.nn.functional.one_hot(predicted.clamp(min=0).long(), num_classes).movedim(-1, 1).float()
    spatial = tuple(range(2, one_hot.ndim))
    mask = None if valid is None else valid[:, None].float()
    tp, fp, fn, _ = get_tp_fp_fn_tn(one_hot, target.clamp(min=0)[:, None].long(), spatial if per_image else (0,) + spatial,
                                    mask)
    return tp, fp, fn


def foreground_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int, background: int = 0) -> torch.Tensor:
    """Per-image Dice of two label maps (B, *spatial), averaged over the foreground classes present in
    either; 1 where neither has foreground."""
    tp, fp, fn = label_counts(a, b, num_classes, per_image=True)
    foreground = [c for c in range(num_classes) if c != background]
    if not foreground:
        return torch.ones(a.shape[0], device=a.device)
    tp, denominator = tp[:, foreground], (2 * tp + fp + fn)[:, foreground]
    present = denominator > 0
    scores = torch.where(present, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))
    mean = (scores * present).sum(1) / present.sum(1).clamp(min=1)
    return torch.where(present.any(1), mean, torch.ones_like(mean))


def class_counts(predicted: torch.Tensor, target: torch.Tensor, classes: Sequence[int], excluded: int) -> np.ndarray:
    """(3, K): true positives, false positives, false negatives per class in ``classes``, over the pixels
    where neither map is ``excluded``."""
    num_classes = max(int(predicted.max()), int(target.max()), *classes) + 1
    valid = (predicted != excluded) & (target != excluded)
    counts = label_counts(predicted, target, num_classes, per_image=False, valid=valid)
    return np.stack([c[list(classes)].cpu().numpy() for c in counts]).astype(float)


def class_dice(counts: np.ndarray) -> np.ndarray:
    """2 tp / (2 tp + fp + fn) per class of summed counts (3, K); NaN for a class in neither map."""
    tp, fp, fn = counts
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)


def mean_dice(counts: np.ndarray) -> float:
    """nnU-Net's pseudo Dice from summed counts: the mean of ``class_dice`` over the classes that occur in
    the target or the prediction (NaN when none does)."""
    scores = class_dice(counts)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")
