"""The self-training trainers and every method's self-training variant in process, on the prepared
sample: labels of unlabelled cases never reach a loss (with and without mixing), what each variant's
schedule is, the teacher in the checkpoint and the final weights (student or teacher), and the logs."""
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import (TEST_PLANS, corrupt_images, corrupt_labels, losses_with_hidden_labels_corrupted, make_plans,
                      make_trainer, ready_trainer, seed_everything, self_training_losses, split_of_fold0, stage_terms)
from nnunet_contrast.data.batch import Batch
from nnunet_contrast.losses.masked_segmentation import EXCLUDED
from nnunet_contrast.training.teaching import CASE_RELIABILITY_FILE
from nnunet_contrast.training.reliability import TeacherGate
from nnunet_contrast.training.step import StepInputs
from nnunet_contrast.training.schedule import PSEUDO_LABEL, SEGMENTATION, Data

SELF_TRAINED = {  # trainer -> the stage in which it learns from the teacher
    "nnUNetTrainerSelfTraining": "selftrain",
    "nnUNetTrainerCopyPaste": "selftrain",
    "nnUNetTrainerPseudoLabelContrastSelfTraining": "joint",
    "nnUNetTrainerPseudoLabelContrastInterSelfTraining": "joint",
    "nnUNetTrainerCrossLevelSelfTraining": "contrast",
    "nnUNetTrainerIDEALSelfTraining": "finetune",
}
VARIANTS = {  # each method's self-training variant -> its stages
    "nnUNetTrainerSupConLocalSelfTraining": ["global", "local", "warmup", "selftrain"],
    "nnUNetTrainerGlobalLocalContrastSelfTraining": ["global", "local", "warmup", "selftrain"],
    "nnUNetTrainerGlobalContrastSelfTraining": ["global", "warmup", "selftrain"],
    "nnUNetTrainerPseudoLabelContrastSelfTraining": ["warmup", "joint"],
    "nnUNetTrainerPseudoLabelContrastInterSelfTraining": ["warmup", "joint"],
    "nnUNetTrainerCrossLevelSelfTraining": ["contrast", "consistency"],
    "nnUNetTrainerIDEALSelfTraining": ["dense", "finetune"],
}


@pytest.fixture(scope="module")
def every_pixel_plans(hippocampus):
    """Every pseudo-label kept (threshold 0), so that the pseudo-label term reads every unlabelled pixel."""
    return make_plans(hippocampus, "nnUNetPlans_selftrain_all", "nnunet_contrast.selftraining.confidence_threshold=0",
                      "nnunet_contrast.pseudolabel.labeller=teacher")


@pytest.mark.parametrize("trainer", list(SELF_TRAINED))
def test_labels_of_unlabelled_cases_never_reach_a_self_training_loss(hippocampus, tmp_path, every_pixel_plans, trainer):
    split = split_of_fold0(hippocampus)
    reference, hidden, changed = losses_with_hidden_labels_corrupted(
        hippocampus, tmp_path, lambda: self_training_losses(trainer, every_pixel_plans, SELF_TRAINED[trainer]),
        split["unlabeled"],
        lambda folder, saved: corrupt_images(folder, split["unlabeled"], saved))  # control: their images count
    assert hidden == reference
    assert reference[PSEUDO_LABEL] > 0 and changed[PSEUDO_LABEL] != reference[PSEUDO_LABEL]


def test_true_labels_of_labelled_cases_do_reach_the_segmentation_term(hippocampus, tmp_path, every_pixel_plans):
    split = split_of_fold0(hippocampus)
    reference, hidden, changed = losses_with_hidden_labels_corrupted(
        hippocampus, tmp_path, lambda: self_training_losses("nnUNetTrainerCopyPaste", every_pixel_plans, "selftrain"),
        split["unlabeled"], lambda folder, saved: corrupt_labels(folder, split["labeled"], saved))
    assert hidden == reference  # deterministic, so the changes below come from the labelled cases' labels
    # both terms change: the segmentation term reads the true labels (in copy-paste also of the labelled boxes
    # pasted into unlabelled images); the pseudo-label term through the changed labelled crops those images hold
    assert changed[SEGMENTATION] != reference[SEGMENTATION] and changed[PSEUDO_LABEL] != reference[PSEUDO_LABEL]


@pytest.mark.parametrize("batch_dice", ["true", "false"])
def test_without_mixing_the_segmentation_term_is_nnunets_loss(hippocampus, batch_dice):
    plans = make_plans(hippocampus, f"nnUNetPlans_selftrain_nomix_{batch_dice}", "nnunet_contrast.selftraining.mixing=none",
                       f"batch_dice={batch_dice}")
    trainer = ready_trainer("nnUNetTrainerSelfTraining", plans)
    trainer.start_teacher()
    seed_everything(1)
    batch = next(trainer.dataloader_train)
    with torch.no_grad():
        terms = stage_terms(trainer, "selftrain", batch)
        nnunet = trainer.loss(trainer.network(batch["data"]), batch["target"])
    torch.testing.assert_close(terms[SEGMENTATION], nnunet.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trainer", list(VARIANTS))
def test_each_methods_variant_fine_tunes_with_self_training(hippocampus, trainer):
    schedule = make_trainer(trainer, TEST_PLANS).schedule
    assert [s.name for s in schedule.stages] == VARIANTS[trainer]
    finetune = [s for s in schedule.stages if s.supervised]
    published = make_trainer(trainer[:-len("SelfTraining")], TEST_PLANS).schedule
    assert [s for s in schedule.stages if not s.supervised] == \
        [s for s in published.stages if not s.supervised]  # its pretraining as published
    learning_from_teacher = [s for s in finetune if s.data == Data.STUDENT]
    assert learning_from_teacher and all(s.supervised for s in learning_from_teacher)


@pytest.mark.parametrize("trainer", ["nnUNetTrainerSupConLocalSelfTraining", "nnUNetTrainerIDEALSelfTraining",
                                     "nnUNetTrainerPseudoLabelContrastSelfTraining",
                                     "nnUNetTrainerPseudoLabelContrastInterSelfTraining"])
def test_a_variants_self_training_step_trains(hippocampus, trainer):
    t = ready_trainer(trainer, TEST_PLANS)
    index = next(i for i, s in enumerate(t.schedule.stages) if s.data == Data.STUDENT)
    t.current_epoch = t.schedule.starts[index]
    t.start_stage_epoch(index)
    assert t.teacher is not None
    before = {k: v.clone() for k, v in t.teacher.state_dict().items()}
    output = t.train_step(next(t.dataloader_train))
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in output.values())
    after = t.teacher.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the teacher followed the student


def test_a_self_adaptive_threshold_moves_with_training_and_travels_in_the_checkpoint(hippocampus):
    from nnunet_contrast.training.thresholds import SelfAdaptiveThreshold
    plans = make_plans(hippocampus, "nnUNetPlans_selftrain_adaptive", "nnunet_contrast.selftraining.threshold=self_adaptive",
                       "nnunet_contrast.selftraining.threshold_momentum=0.5")
    t = ready_trainer("nnUNetTrainerSelfTraining", plans)
    index = t.schedule.index_of("selftrain")
    t.current_epoch = t.schedule.starts[index]
    t.start_stage_epoch(index)
    assert isinstance(t.teacher.threshold, SelfAdaptiveThreshold)
    t.train_step(next(t.dataloader_train))
    thresholds = t.teacher.threshold.thresholds()
    assert not torch.allclose(thresholds, torch.full_like(thresholds, 1 / len(thresholds)))
    resumed = ready_trainer("nnUNetTrainerSelfTraining", plans)
    resumed.restore_extras(t.checkpoint_extras(), t.current_epoch + 1)
    assert torch.equal(resumed.teacher.threshold.thresholds(), thresholds)


# predict_with=student, the default: test_e2e.py's nnUNetv2_train run
@pytest.mark.parametrize("predict_with", ["teacher"])
def test_final_checkpoint_holds_the_network_predict_with_names(hippocampus, predict_with):
    plans = make_plans(hippocampus, f"nnUNetPlans_predict_{predict_with}",
                       f"nnunet_contrast.selftraining.predict_with={predict_with}")
    trainer = make_trainer("nnUNetTrainerSelfTraining", plans)
    trainer.run_training()
    checkpoint = torch.load(Path(trainer.output_folder) / "checkpoint_final.pth", weights_only=False)
    teacher = checkpoint["nnunet_contrast"]["teacher"]["network"]
    weights = checkpoint["network_weights"]
    assert weights.keys() == teacher.keys()
    same = all(torch.equal(weights[k].cpu(), teacher[k].cpu()) for k in weights)
    assert same == (predict_with == "teacher")
    log = Path(trainer.log_file).read_text()
    assert "EMA teacher on the validation batches: Dice" in log and "pseudo-labels kept (selftrain)" in log


def test_pseudolabel_contrast_can_label_with_the_ema_teacher(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_pl_teacher", "nnunet_contrast.pseudolabel.labeller=teacher")
    trainer = make_trainer("nnUNetTrainerPseudoLabelContrast", plans)
    trainer.run_training()
    assert trainer.pseudo_labeler is None and trainer.teacher is not None
    assert "EMA teacher (decay 0.96) starts" in Path(trainer.log_file).read_text()


def test_a_checkpoint_without_teacher_resumes_into_a_stage_that_needs_one(hippocampus):
    """``restore_extras`` allows changed settings: a joint stage that now reads the teacher gets one."""
    plans = make_plans(hippocampus, "nnUNetPlans_pl_teacher_resume", "nnunet_contrast.pseudolabel.labeller=teacher")
    trainer = ready_trainer("nnUNetTrainerPseudoLabelContrast", plans)
    joint = trainer.schedule.index_of("joint")
    extras = {"stage_index": joint, "optimizer_stage": "joint", "rank_random_states": []}
    trainer.restore_extras(extras, trainer.schedule.starts[joint] + 1)
    assert trainer.teacher is not None


def test_the_compute_matched_twin_runs_and_reports_twice_the_iterations(hippocampus):
    twin = make_trainer("nnUNetTrainerLabeledOnlyTwiceIterations", TEST_PLANS)
    single = make_trainer("nnUNetTrainerLabeledOnly", TEST_PLANS)
    assert twin.num_iterations_per_epoch == 2 * single.num_iterations_per_epoch
    assert twin.settings.budget.num_iterations_per_epoch == twin.num_iterations_per_epoch  # what its settings file says
    assert twin.num_epochs == single.num_epochs


def test_the_weak_teacher_settings_bcp_warm_up_reliable_images_and_the_gate(hippocampus):
    """BCP's warm-up trains nnU-Net's loss on copy-pasted labelled images; self-training then keeps the
    pseudo-labels of the most reliable half of each unlabelled batch at its start, and none while the
    teacher's gate is shut."""
    plans = make_plans(hippocampus, "nnUNetPlans_selftrain_weak_teacher", "nnunet_contrast.selftraining.warmup_mixing=copypaste",
                       "nnunet_contrast.selftraining.reliable_start=0.5", "nnunet_contrast.selftraining.confidence_threshold=0")
    t = ready_trainer("nnUNetTrainerSelfTraining", plans)
    next_unlabeled_images = t.next_unlabeled_images
    t.next_unlabeled_images = lambda: pytest.fail("the warm-up reads no unlabelled batch")
    seed_everything(1)
    batch = next(t.dataloader_train)
    seed_everything(2)
    with torch.no_grad():
        segmentation = stage_terms(t, "warmup", batch)[SEGMENTATION]
        seed_everything(2)  # the same boxes
        mixed = t.mixed_labeled_view(Batch.labeled(batch["data"], t.labels_of_target(batch["target"])))
        expected = t.target_loss(t.network(mixed.images), mixed.labels)
        unmixed = t.loss(t.network(batch["data"]), batch["target"])
    torch.testing.assert_close(segmentation, expected, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(segmentation, unmixed.float(), rtol=1e-3)
    t.start_stage_epoch(t.schedule.index_of("warmup"))
    output = t.train_step(batch)
    assert torch.isfinite(torch.as_tensor(output["loss"])) and t.teacher is None

    t.next_unlabeled_images = next_unlabeled_images
    t.current_epoch = t.schedule.starts[t.schedule.index_of("selftrain")]
    t.start_stage_epoch(t.schedule.index_of("selftrain"))
    assert t.reliable_share() == 0.5
    inputs = StepInputs(t, t.current_stage, next(t.dataloader_train))
    pseudo = t.label_unlabeled(inputs)
    images_kept = (pseudo != EXCLUDED).flatten(1).any(1)
    assert images_kept.sum() == math.ceil(len(pseudo) / 2)  # threshold 0: every pixel of the kept images
    assert (pseudo[images_kept] != EXCLUDED).all()
    drawn = [str(key) for key in t.last_unlabeled_keys]  # the case ranking saw this batch's cases
    assert sorted(t.case_reliability.counts) == sorted(set(drawn)) and sum(t.case_reliability.counts.values()) == len(drawn)
    t.log_case_reliability()
    ranking = json.loads((Path(t.output_folder) / CASE_RELIABILITY_FILE).read_text())["cases"]
    assert sorted(row["case"] for row in ranking) == sorted(set(drawn)) and not t.case_reliability.counts
    assert [row["mean_entropy"] for row in ranking] == sorted(row["mean_entropy"] for row in ranking)

    t.teacher_gate = TeacherGate(1.0)  # a teacher that must be perfect on the labelled batch first
    t.teacher = Unused(t.teacher)  # while the gate is shut the unlabelled batch is not labelled
    inputs = StepInputs(t, t.current_stage, next(t.dataloader_train))
    assert (t.label_unlabeled(inputs) == EXCLUDED).all() and not t.teacher_gate.open
    assert 0 <= t.teacher_gate.dice < 1
    assert t.checkpoint_extras()["teacher"]["gate"] == {"dice": t.teacher_gate.dice, "open": False}


class Unused:
    """A teacher whose labelling of unlabelled images fails the test (its other methods pass through)."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, *args, **kwargs):
        pytest.fail("the teacher labelled the unlabelled batch while its gate was shut")

    def __getattr__(self, name):
        return getattr(self.teacher, name)
