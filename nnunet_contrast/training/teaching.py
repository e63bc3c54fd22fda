"""The EMA teacher's life in a method trainer (``MethodTrainer`` mixes this in): it starts at the first
stage that reads it (or from the checkpoint), labels the unlabelled batches behind its gate and its
reliable share (``reliability.py``), ranks the unlabelled cases it labelled, is measured on nnU-Net's
validation batches, travels in every checkpoint and, with ``predict_with = teacher``, becomes the final
weights. The stage that reads it and how its labels enter the loss are ``self_training.py``'s.

The trainer it is mixed into provides ``settings``, ``current_stage``, ``term_progress`` and
``labeller`` (``method.py``).
"""
import os
from typing import Dict, List, Optional

import torch
from batchgenerators.utilities.file_and_folder_operations import save_json

from nnunet_contrast.data.batch import Batch, no_labels
from nnunet_contrast.distributed import gather_objects, summed_over_ranks
from nnunet_contrast.losses.masked_segmentation import EXCLUDED
from nnunet_contrast.network.taps import unwrap_network
from nnunet_contrast.training.dice import class_counts, mean_dice
from nnunet_contrast.training.pseudo_labels import EmaTeacher
from nnunet_contrast.training.reliability import CaseReliability, TeacherGate, reliable_share_at
from nnunet_contrast.training.schedule import PSEUDO_LABEL
from nnunet_contrast.training.self_training import (COVERAGE, teacher_curve_keys, teacher_quality,
                                                    teacher_validation_counts)
from nnunet_contrast.training.step import StepInputs, to_device
from nnunet_contrast.training.thresholds import threshold_of

CASE_RELIABILITY_FILE = "unlabeled_case_reliability.json"  # in the fold's output folder


class EmaTeaching:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher: Optional[EmaTeacher] = None  # from the first stage that reads it on
        self.teacher_gate: Optional[TeacherGate] = None  # with the teacher
        self.case_reliability = CaseReliability()  # of this epoch's unlabelled cases, by the teacher's entropy

    def start_teacher(self, state: Optional[dict] = None) -> None:
        """The EMA teacher starts as a copy of the network, or with a checkpoint's ``state`` (kept when it
        exists: a later stage that reads it)."""
        if self.teacher is None or state is not None:
            s = self.settings.selftraining
            self.teacher = EmaTeacher(self.network, s.ema_decay,
                                      threshold_of(s, self.label_manager.num_segmentation_heads))
            self.teacher_gate = TeacherGate(s.teacher_min_dice)
            if state is not None:
                self.teacher.load_state_dict(state["network"])
                self.teacher.threshold.load_state_dict(state["threshold"])
                if "gate" in state:
                    self.teacher_gate.load_state_dict(state["gate"])
            origin = "the checkpoint" if state is not None else f"the network as of epoch {self.current_epoch}"
            self.print_to_log_file(f"EMA teacher (decay {s.ema_decay}) starts from {origin}")

    def reliable_share(self) -> float:
        """The share of each unlabelled batch whose pseudo-labels the teacher keeps now (``reliability.py``)."""
        s = self.settings.selftraining
        term = next((t for t in self.current_stage.terms if t.name == PSEUDO_LABEL), None)
        progress = 1.0 if term is None else self.term_progress(term)
        return reliable_share_at(s.reliable_start, s.reliable_growth, progress)

    def label_unlabeled(self, inputs: StepInputs) -> Optional[torch.Tensor]:
        """The stage's labeller's labels of the unlabelled batch (None without a labeller); logs the share kept."""
        labeller = self.labeller(inputs.stage)
        if labeller is None:
            return None
        if inputs.stage.reads_teacher and not self.teacher_ready(inputs.loader_batch):
            labels = no_labels(inputs.unlabeled)
        else:
            labels = labeller(inputs.unlabeled)
            if inputs.stage.reads_teacher and self.last_unlabeled_keys is not None:
                self.case_reliability.add(self.last_unlabeled_keys, self.teacher.image_entropy)
        inputs.logged[COVERAGE] = (labels != EXCLUDED).float().mean()
        return labels

    def teacher_ready(self, labeled: Batch) -> bool:
        """Whether the teacher's pseudo-labels are used yet (``reliability.TeacherGate``): its foreground Dice
        on this step's labelled batch, summed over ranks, moves the gate until it opens."""
        if self.teacher_gate.open:
            return True
        predicted, _ = self.teacher.predict(labeled.images)
        foreground = [label for label in self.label_manager.all_labels if label != 0]
        counts = summed_over_ranks(torch.from_numpy(class_counts(predicted, labeled.labels, foreground, EXCLUDED))
                                   .to(self.device)).cpu().numpy()
        if self.teacher_gate.update(mean_dice(counts)):
            self.print_to_log_file(f"The EMA teacher's Dice on the labelled batches reached "
                                   f"{round(self.teacher_gate.dice, 4)} at epoch {self.current_epoch}: its "
                                   f"pseudo-labels are used from now on")
        return self.teacher_gate.open

    def log_case_reliability(self) -> None:
        """The unlabelled cases the teacher labelled this epoch, ranked by its mean entropy (every rank's):
        the extremes in the log, the whole ranking in ``unlabeled_case_reliability.json``."""
        merged = CaseReliability()
        for part in gather_objects(self.case_reliability):
            merged.merge(part)
        self.case_reliability = CaseReliability()
        ranking = merged.ranking()
        if not ranking:
            return
        if self.local_rank == 0:
            save_json({"epoch": self.current_epoch, "cases": [{"case": case, "mean_entropy": entropy, "images": n}
                                                              for case, entropy, n in ranking]},
                      os.path.join(self.output_folder, CASE_RELIABILITY_FILE), sort_keys=False)
        ends = lambda rows: ", ".join(f"{case} ({entropy:.3f})" for case, entropy, _ in rows)
        self.print_to_log_file(f"Unlabelled cases by the teacher's mean entropy ({len(ranking)} cases): most reliable "
                               f"{ends(ranking[:3])}; least reliable {ends(ranking[-3:])}")

    def validation_step(self, batch: dict) -> dict:
        result = super().validation_step(batch)
        if self.teacher is not None:
            images = batch["data"].to(self.device, non_blocking=True)
            target = self.labels_of_target(to_device(batch["target"], self.device))
            result.update(teacher_validation_counts(self.teacher, images, target, self.label_manager.all_labels))
        return result

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        self.log_teacher_quality(val_outputs)
        super().on_validation_epoch_end(val_outputs)

    def log_teacher_quality(self, outputs: List[dict]) -> None:
        """The teacher's quality on this epoch's validation batches, overall and per class (NaN without one)."""
        labels = self.label_manager.all_labels
        if not outputs or "teacher_counts" not in outputs[0]:
            for key in teacher_curve_keys(labels):
                self.logger.log(key, float("nan"), self.current_epoch)
            return
        outputs = [o for rank in gather_objects(outputs) for o in rank]  # under DDP every rank validates its own
        quality = teacher_quality(outputs, labels)
        for key, value in {"teacher_dice": quality.mean_dice, **quality.curves()}.items():
            self.logger.log(key, value, self.current_epoch)
        per_class = lambda values: " / ".join(f"{v:.3f}" for v in values)
        self.print_to_log_file(
            f"EMA teacher on the validation batches: Dice {round(quality.mean_dice, 4)}; confident pixels "
            f"{round(100 * quality.overall_coverage, 1)}%, their Dice {round(quality.mean_confident_dice, 4)}; "
            f"per class {' / '.join(map(str, labels))}: Dice {per_class(quality.dice)}, confident Dice "
            f"{per_class(quality.confident_dice)}, confident share {per_class(quality.coverage)}")

    def teacher_state(self) -> Optional[Dict]:
        """The checkpoint's ``teacher`` entry (``start_teacher`` takes it back)."""
        if self.teacher is None:
            return None
        return {"network": self.teacher.state_dict(), "threshold": self.teacher.threshold.state_dict(),
                "gate": self.teacher_gate.state_dict()}

    def on_train_end(self):
        if self.teacher is not None and self.settings.selftraining.predict_with == "teacher":
            # before nnU-Net writes the final checkpoint
            unwrap_network(self.network).load_state_dict(self.teacher.state_dict())
            self.print_to_log_file("The final checkpoint holds the EMA teacher's weights (predict_with teacher)")
        super().on_train_end()
