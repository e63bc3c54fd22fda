"""Self-training: the stage any trainer can fine-tune with (``run.finetune = selftraining``), settings in
``nnunet_contrast.selftraining`` of the plans (docs/methods.md, Self-training).

1. ``warmup`` (the first ``warmup_fraction`` of ``budget.num_epochs``): nnU-Net's own training on labelled cases;
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
from typing import Dict, List, Tuple

import numpy as np
import torch

from nnunet_contrast.losses.masked_segmentation import EXCLUDED
from nnunet_contrast.training.dice import class_counts, mean_dice
from nnunet_contrast.training.pseudo_labels import EmaTeacher
from nnunet_contrast.training.schedule import (NETWORK, PSEUDO_LABEL, SEGMENTATION, Data, Labeller, NnUNetSGD,
                                               Stage, Term, epochs_of, ramped, replace_finetuning)

WARMUP, SELF_TRAIN = "warmup", "selftrain"
SELF_TRAINING_VARIANT = {"run": {"finetune": "selftraining"}}  # what every "...SelfTraining" trainer variant fixes
COVERAGE = "pseudo_label_coverage"  # logged: share of unlabelled pixels whose pseudo-label is confident


def pseudo_label_term(settings) -> Term:
    return Term(PSEUDO_LABEL, ramped(settings.unlabeled_weight, settings.rampup_fraction))


def self_training_stages(budget, settings) -> List[Stage]:
    """nnU-Net's supervised warm-up, then self-training; one SGD and poly schedule over both."""
    warmup = epochs_of(settings.warmup_fraction, budget.num_epochs)
    iterations = budget.num_iterations_per_epoch
    return [Stage(WARMUP, warmup, iterations, (NETWORK,), NnUNetSGD(), (Term(SEGMENTATION),), Data.LABELED),
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
                              classes) -> Dict[str, np.ndarray]:
    """The teacher on a validation batch (images, (B, H, W) true labels): per foreground class in ``classes``,
    true/false positives and false negatives of all its labels and of its confident ones, and the share of
    confident pixels."""
    labels, confidence = teacher.predict(images)
    confident = confidence >= teacher.confidence_threshold
    return {"teacher_counts": class_counts(labels, target, classes, EXCLUDED),
            "teacher_confident_counts": class_counts(torch.where(confident, labels, EXCLUDED),
                                                     torch.where(confident, target, EXCLUDED), classes, EXCLUDED),
            "teacher_confident": np.array([float(confident.float().mean())])}


def teacher_quality(outputs: List[dict]) -> Tuple[float, float, float]:
    """(Dice of all the teacher's labels, Dice of its confident ones, share of confident pixels) over the
    validation outputs of ``teacher_validation_counts``."""
    dice_all = mean_dice(sum(o["teacher_counts"] for o in outputs))
    dice_confident = mean_dice(sum(o["teacher_confident_counts"] for o in outputs))
    return dice_all, dice_confident, float(np.mean([o["teacher_confident"] for o in outputs]))
