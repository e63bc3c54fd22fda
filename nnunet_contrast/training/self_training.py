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
   The teacher follows the student after every step. Without mixing, ``segmentation`` is exactly
   nnU-Net's loss on its labelled batch.

A method whose fine-tuning already reads unlabelled batches (a joint method) keeps its stages and
gains the ``pseudo_label`` term in them instead.
"""
import dataclasses
from typing import Dict, List, Optional

import numpy as np
import torch

from nnunet_contrast.data.mixing import StudentBatch, student_batch
from nnunet_contrast.distributed import gather_objects
from nnunet_contrast.losses.masked_segmentation import EXCLUDED, MaskedSegmentationLoss
from nnunet_contrast.network.taps import unwrap_network
from nnunet_contrast.training.dice import class_counts, mean_dice
from nnunet_contrast.training.pseudo_labels import EmaTeacher
from nnunet_contrast.training.schedule import (NETWORK, PSEUDO_LABEL, SEGMENTATION, Data, Labeller, NnUNetSGD,
                                               Stage, Term, epochs_of, ramped, replace_finetuning)
from nnunet_contrast.training.step import batch_part, full_resolution

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


class SelfTraining:
    """The teacher, the student's batch and the loss of the self-training terms, for one trainer."""

    def __init__(self, trainer):
        self.trainer, self.settings = trainer, trainer.settings.selftraining
        self.teacher: Optional[EmaTeacher] = None
        self._loss: Optional[MaskedSegmentationLoss] = None

    # ------------------------------------------------------------ the teacher
    def start(self) -> None:
        """The teacher starts as a copy of the student (kept when it exists: resumed, or a later stage)."""
        if self.teacher is None:
            self.teacher = EmaTeacher(self.trainer.network, self.settings.ema_decay, self.settings.confidence_threshold)
            self.trainer.print_to_log_file(f"EMA teacher (decay {self.settings.ema_decay}) starts from the network "
                                           f"as of epoch {self.trainer.current_epoch}")
            if self.settings.mixing == "cutmix" and self.trainer.unlabeled_batch_size < 2:
                self.trainer.print_to_log_file("WARNING: CutMix pairs the unlabelled images of a batch (of each GPU "
                                               "under -num_gpus); with one per batch it pastes an image into itself: "
                                               "raise semisup.unlabeled_batch_ratio or the batch size")

    def update(self) -> None:
        self.teacher.update(self.trainer.network)

    def state_dict(self) -> Optional[dict]:
        return None if self.teacher is None else self.teacher.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is not None:
            self.teacher = None
            self.start()
            self.teacher.load_state_dict(state)

    def teacher_into_network(self) -> None:
        """``predict_with = teacher``: the network takes the teacher's weights (end of training)."""
        if self.teacher is not None and self.settings.predict_with == "teacher":
            unwrap_network(self.trainer.network).load_state_dict(self.teacher.state_dict())
            self.trainer.print_to_log_file("The final checkpoint holds the EMA teacher's weights (predict_with teacher)")

    # ------------------------------------------------------------ the student's batch
    def student_batch(self, inputs) -> StudentBatch:
        """The labelled batch and the unlabelled one (teacher's pseudo-labels), as the student sees them."""
        images, true_labels = inputs.batch_images, full_resolution(inputs.target)[:, 0].long()
        unlabeled = inputs.unlabeled
        if unlabeled is None:  # no unlabelled pool: the labelled batch alone
            return student_batch(images, true_labels, images[:0], true_labels[:0], "none", 1.0, False)
        pseudo_labels, confidence = self.teacher(unlabeled)
        inputs.logged[COVERAGE] = (confidence >= self.settings.confidence_threshold).float().mean()
        return student_batch(images, true_labels, unlabeled, pseudo_labels, self.settings.mixing,
                             self.settings.box_fraction, self.settings.strong_intensity)

    # ------------------------------------------------------------ the two terms
    @property
    def loss(self) -> MaskedSegmentationLoss:
        if self._loss is None:
            weights = getattr(self.trainer.loss, "weight_factors", None)  # nnU-Net's deep-supervision weights
            self._loss = MaskedSegmentationLoss(self.trainer.configuration_manager.batch_dice, weights,
                                                self.trainer.is_ddp)
        return self._loss

    def true_label_loss(self, inputs) -> torch.Tensor:
        """nnU-Net's loss of each decoder on the student's pixels that came from labelled images."""
        return self._loss_where(inputs, inputs.student.from_labeled)

    def pseudo_label_loss(self, inputs) -> torch.Tensor:
        """nnU-Net's loss of each decoder on the student's pixels that came from unlabelled images."""
        return self._loss_where(inputs, ~inputs.student.from_labeled)

    def _loss_where(self, inputs, pixels: torch.Tensor) -> torch.Tensor:
        """Without batch Dice, over the images with a kept pixel only: nnU-Net then averages Dice over
        images, and an image without target would add a constant to that mean and shrink the others'
        weight. Batch Dice sums over the batch, where such an image adds nothing, and under DDP gathers
        its sums from every rank: all images stay, so that every rank gathers the same shapes."""
        labels = torch.where(pixels, inputs.student.labels, EXCLUDED)
        if self.loss.batch_dice:
            return sum(self.loss(output, labels) for output in inputs.joint.outputs)
        images = (labels != EXCLUDED).flatten(1).any(1)
        return sum(self.loss(batch_part(output, images), labels[images]) for output in inputs.joint.outputs)

    # ------------------------------------------------------------ what the logs show
    @torch.no_grad()
    def validation_counts(self, batch: dict) -> Dict[str, np.ndarray]:
        """The teacher on a validation batch: per foreground class, true/false positives and false
        negatives of all its labels and of its confident ones, and the confident pixels."""
        images = batch["data"].to(self.trainer.device, non_blocking=True)
        target = full_resolution(batch["target"])[:, 0].long().to(self.trainer.device)
        labels, confidence = self.teacher.predict(images)
        confident = confidence >= self.settings.confidence_threshold
        classes = self.trainer.label_manager.foreground_labels
        return {"teacher_counts": class_counts(labels, target, classes, EXCLUDED),
                "teacher_confident_counts": class_counts(torch.where(confident, labels, EXCLUDED),
                                                         torch.where(confident, target, EXCLUDED), classes, EXCLUDED),
                "teacher_confident": np.array([float(confident.float().mean())])}

    def log_validation(self, outputs: List[dict]) -> None:
        if not outputs or "teacher_counts" not in outputs[0]:
            self.trainer.logger.log("teacher_dice", float("nan"), self.trainer.current_epoch)
            return
        ranks = gather_objects(outputs)  # under DDP every rank validates its own batches, as in nnU-Net
        outputs = [o for rank_outputs in ranks for o in rank_outputs]
        dice_all = mean_dice(sum(o["teacher_counts"] for o in outputs))
        dice_confident = mean_dice(sum(o["teacher_confident_counts"] for o in outputs))
        coverage = float(np.mean([o["teacher_confident"] for o in outputs]))
        self.trainer.logger.log("teacher_dice", dice_all, self.trainer.current_epoch)
        self.trainer.print_to_log_file(f"EMA teacher on the validation batches: Dice {round(dice_all, 4)}; "
                                       f"confident pixels {round(100 * coverage, 1)}%, their Dice "
                                       f"{round(dice_confident, 4)}")
