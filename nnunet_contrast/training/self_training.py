"""Self-training: the stage any trainer can fine-tune with (``run.finetune = selftraining``), settings in
``nnunet_contrast.selftraining`` of the plans (docs/methods.md, Self-training).

1. ``warmup`` (the first ``warmup_fraction`` of ``budget.num_epochs``): nnU-Net's own training on labelled cases,
   or with ``warmup_mixing = copypaste`` nnU-Net's loss on BCP's copy-paste of the labelled images (``data/mixing.py``);
2. ``selftrain``: an EMA teacher, a copy of the student at the stage's start, labels each unlabelled batch
   as nnU-Net's loader augmented it; pixels with softmax confidence >= ``confidence_threshold`` keep
   their pseudo-label. The student sees the stronger view of ``data/mixing.py`` and learns nnU-Net's
   loss (Dice + CE, deep supervision) on two complementary sets of its pixels:
   ``segmentation``: the pixels that came from a labelled image, with their true labels;
   ``pseudo_label``: the pixels that came from an unlabelled image, with the teacher's confident labels,
   times ``unlabeled_weight`` after a sigmoid ramp over the first ``rampup_fraction`` of the stage.
   The teacher follows the student after every step. Without mixing, ``segmentation`` is nnU-Net's loss
   on its labelled batch (to float rounding).

A method whose fine-tuning already reads unlabelled batches (a joint method) keeps its stages and
gains the ``pseudo_label`` term in them instead.
"""
import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch

from nnunet_contrast.losses.masked_segmentation import EXCLUDED
from nnunet_contrast.training.dice import class_counts, class_dice, mean_dice
from nnunet_contrast.training.pseudo_labels import EmaTeacher
from nnunet_contrast.training.schedule import (NETWORK, PSEUDO_LABEL, SEGMENTATION, Data, Labeller, NnUNetSGD,
                                               Stage, Term, epochs_of, ramped, replace_finetuning)

WARMUP, SELF_TRAIN = "warmup", "selftrain"
SELF_TRAINING_VARIANT = {"run": {"finetune": "selftraining"}}  # what every "...SelfTraining" trainer variant fixes
COVERAGE = "pseudo_label_coverage"  # logged: share of unlabelled pixels whose pseudo-label the labeller keeps


def pseudo_label_term(settings) -> Term:
    return Term(PSEUDO_LABEL, ramped(settings.unlabeled_weight, settings.rampup_fraction))


def self_training_stages(budget, settings) -> List[Stage]:
    """nnU-Net's supervised warm-up, then self-training; one SGD and poly schedule over both."""
    warmup = epochs_of(settings.warmup_fraction, budget.num_epochs)
    iterations = budget.num_iterations_per_epoch
    warmup_data = Data.LABELED_MIXED if settings.warmup_mixing == "copypaste" else Data.LABELED
    return [Stage(WARMUP, warmup, iterations, (NETWORK,), NnUNetSGD(), (Term(SEGMENTATION),), warmup_data),
            Stage(SELF_TRAIN, budget.num_epochs - warmup, iterations, (NETWORK,), NnUNetSGD(),
                  (Term(SEGMENTATION), pseudo_label_term(settings)), Data.STUDENT, labeller=Labeller.EMA_TEACHER)]


def with_pseudo_label_term(stage: Stage, settings) -> Stage:
    """A joint stage of a method on the student's batch, with the self-training term added."""
    return dataclasses.replace(stage, terms=stage.terms + (pseudo_label_term(settings),), data=Data.STUDENT,
                               labeller=Labeller.EMA_TEACHER)


def self_training_schedule(stages: List[Stage], budget, settings) -> List[Stage]:
    """``run.finetune = selftraining``: a joint method's fine-tuning stages gain the pseudo-label term; any
    other method's fine-tuning stages are replaced by the self-training stages."""
    finetune = [s for s in stages if s.supervised]
    if any(s.reads_unlabeled for s in finetune):
        return [with_pseudo_label_term(s, settings) if s in finetune and s.reads_unlabeled else s
                for s in stages]
    return replace_finetuning(stages, self_training_stages(budget, settings))


def teacher_validation_counts(teacher: EmaTeacher, images: torch.Tensor, target: torch.Tensor,
                              labels: Sequence[int]) -> Dict[str, np.ndarray]:
    """The teacher on a validation batch (images, (B, *spatial) true labels, ``EXCLUDED`` where none): true
    and false positives and false negatives per class in ``labels`` (background included), of all its
    labels and of its confident ones (3, K each)."""
    predicted, confident = teacher.predict(images)
    return {"teacher_counts": class_counts(predicted, target, labels, EXCLUDED),
            "teacher_confident_counts": class_counts(torch.where(confident, predicted, EXCLUDED),
                                                     torch.where(confident, target, EXCLUDED), labels, EXCLUDED)}


@dataclass
class TeacherQuality:
    """The EMA teacher on an epoch's validation batches, per class of ``labels`` (background first):
    ``dice`` of all its labels, ``confident_dice`` of its confident labels (against the truth of those
    pixels), ``coverage``: the share of the pixels it labels as the class that are confident (NaN for a
    class it never predicts); and over the foreground (``mean_dice``, ``mean_confident_dice``) or every
    pixel with a target (``overall_coverage``). Pixels without a target (nnU-Net's ignore label) count nowhere."""
    labels: List[int]
    dice: np.ndarray
    confident_dice: np.ndarray
    coverage: np.ndarray
    mean_dice: float
    mean_confident_dice: float
    overall_coverage: float

    def curves(self) -> Dict[str, float]:
        """The per-class values under their log keys (``teacher_<quantity>_<label>``)."""
        return {f"teacher_{name}_{label}": float(values[i]) for name, values in
                (("dice", self.dice), ("confident_dice", self.confident_dice), ("coverage", self.coverage))
                for i, label in enumerate(self.labels)}


def teacher_quality(outputs: List[dict], labels: Sequence[int]) -> TeacherQuality:
    """``TeacherQuality`` from the summed ``teacher_validation_counts`` of an epoch's validation batches."""
    counts = sum(o["teacher_counts"] for o in outputs)
    confident = sum(o["teacher_confident_counts"] for o in outputs)
    predicted, predicted_confident = counts[0] + counts[1], confident[0] + confident[1]  # tp + fp per class
    coverage = np.where(predicted > 0, predicted_confident / np.maximum(predicted, 1), np.nan)
    foreground = [i for i, label in enumerate(labels) if label != 0]
    return TeacherQuality(list(labels), class_dice(counts), class_dice(confident), coverage,
                          mean_dice(counts[:, foreground]), mean_dice(confident[:, foreground]),
                          float(predicted_confident.sum() / max(predicted.sum(), 1)))


def teacher_curve_keys(labels: Sequence[int]) -> List[str]:
    """The log keys of the teacher's quality: foreground Dice, and each per-class curve."""
    return ["teacher_dice"] + [f"teacher_{name}_{label}" for name in ("dice", "confident_dice", "coverage")
                               for label in labels]
