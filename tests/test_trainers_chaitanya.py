"""The Chaitanya et al. trainers in process, on the prepared sample: pseudo-labels enter the
contrastive loss only, labels of unlabelled cases never reach a loss, mid-stage resume, partition
batches on volumes of different slice counts, what the variants fix, and bad settings."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (TEST_PLANS, assert_same_optimizer_moments, corrupt_images, corrupt_labels, losses_with_hidden_labels_corrupted, make_plans,
                      make_trainer, ready_trainer, seed_everything, split_of_fold0, stage_terms, train_then_resume)
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.training.pseudo_labels import PseudoLabeler
from nnunet_contrast.training.schedule import Data, Part
from nnunet_contrast.data.slices import PartitionDataLoader, SliceInfoDataLoader, partition_of, slice_counts

PSEUDO = "nnUNetTrainerPseudoLabelContrast"
GLOBALLOCAL = "nnUNetTrainerGlobalLocalContrast"


class FixedLabels:
    """Stands in for the pseudo-labeller: returns the labels it was given."""

    def __init__(self, labels):
        self.labels = labels

    def __call__(self, images):
        return self.labels


# ----------------------------------------------------------------------------- pseudo-label contrast
def test_pseudo_labels_enter_only_the_contrastive_loss(hippocampus):
    trainer = ready_trainer(PSEUDO, TEST_PLANS)
    seed_everything(1)
    batch, unlabeled = next(trainer.dataloader_train), trainer.next_unlabeled_images()
    shape = (unlabeled.shape[0], *unlabeled.shape[2:])
    pseudo_labels = [torch.zeros(shape, dtype=torch.long),
                     torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(0))]
    parameters = list(trainer.network.parameters())
    seg_values, seg_grads, contrasts = [], [], []
    for labels in pseudo_labels:
        trainer.pseudo_labeler = FixedLabels(labels)
        torch.manual_seed(2)
        terms = stage_terms(trainer, "joint", batch, unlabeled=unlabeled)
        seg, contrast = terms["segmentation"], terms["contrast"]
        seg_values.append(seg.item())
        seg_grads.append(torch.autograd.grad(seg, parameters, allow_unused=True))
        contrasts.append(contrast.item())
    assert seg_values[0] == seg_values[1]
    for a, b in zip(*seg_grads):
        assert (a is None and b is None) or torch.equal(a, b)
    assert contrasts[0] != contrasts[1]  # control: the pseudo-labels do reach the contrastive term
    # and the segmentation loss is nnU-Net's loss of the labelled batch alone
    with torch.no_grad():
        alone = trainer.loss(trainer.network(batch["data"]), batch["target"]).item()
    assert seg_values[0] == pytest.approx(alone, rel=1e-5)


def pseudolabel_losses(plans):
    trainer = ready_trainer(PSEUDO, plans)
    trainer.pseudo_labeler = PseudoLabeler(trainer.network)
    seed_everything(1)
    batch, unlabeled = next(trainer.dataloader_train), trainer.next_unlabeled_images()
    with torch.no_grad():
        terms = stage_terms(trainer, "joint", batch, unlabeled=unlabeled)
    return {"seg": terms["segmentation"].item(), "contrast": terms["contrast"].item()}


def test_pseudolabel_labels_of_unlabelled_cases_never_reach_a_loss(hippocampus, tmp_path):
    split = split_of_fold0(hippocampus)
    reference, hidden, changed = losses_with_hidden_labels_corrupted(
        hippocampus, tmp_path, lambda: pseudolabel_losses(TEST_PLANS), split["unlabeled"],
        lambda folder, backup: corrupt_labels(folder, split["labeled"], backup))  # control
    assert hidden == reference
    assert changed["seg"] != reference["seg"] and changed["contrast"] != reference["contrast"]


def test_pseudolabel_resumes_mid_round_with_that_rounds_labeller(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_resume_pl", "nnunet_contrast.budget.num_epochs=3",
                       "nnunet_contrast.budget.num_iterations_per_epoch=1",
                       "nnunet_contrast.pseudolabel.warmup_fraction=0.3",
                       "nnunet_contrast.pseudolabel.pseudo_label_rounds=1")
    # stop after epoch 1, in the middle of the only round (epochs 1 and 2)
    first, resumed = train_then_resume(PSEUDO, plans, stop_after_epochs=2)
    assert [(s.name, start) for s, start in zip(first.schedule.stages, first.schedule.starts)] == \
        [("warmup", 0), ("joint", 1)]
    snapshot = {k: v.clone() for k, v in first.pseudo_labeler.state_dict().items()}
    assert resumed.current_epoch == 2 and resumed.stage_index == 1  # the first round
    for key, value in snapshot.items():
        torch.testing.assert_close(resumed.pseudo_labeler.state_dict()[key], value)
    network = resumed.network.state_dict()
    assert any(not torch.equal(network[k], v) for k, v in snapshot.items())  # trained past the snapshot
    resumed.run_training()
    assert resumed.logger.local_logger.my_fantastic_logging["stage"] == [0, 1, 1]
    for key, value in snapshot.items():  # no new round: the labeller was not refreshed
        torch.testing.assert_close(resumed.pseudo_labeler.state_dict()[key], value)


def test_pseudolabel_resumed_at_a_round_boundary_starts_the_new_round(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_boundary_pl", "nnunet_contrast.budget.num_epochs=4",
                       "nnunet_contrast.budget.num_iterations_per_epoch=1",
                       "nnunet_contrast.pseudolabel.warmup_fraction=0.25",
                       "nnunet_contrast.pseudolabel.pseudo_label_rounds=2")
    # rounds start at epochs 1 and 2; stop after epoch 1, the whole first round
    first, resumed = train_then_resume(PSEUDO, plans, stop_after_epochs=2)
    assert [(s.name, start) for s, start in zip(first.schedule.stages, first.schedule.starts)] == \
        [("warmup", 0), ("joint", 1), ("joint", 2)]
    assert resumed.stage_index == 1  # the first round
    old_labeller = {k: v.clone() for k, v in resumed.pseudo_labeler.state_dict().items()}
    resumed.run_training()
    assert resumed.stage_index == 2  # the second round
    log = (Path(resumed.log_file)).read_text()
    assert "Pseudo-labelling round 2/2: labels from the network as of epoch 2" in log
    new_labeller = resumed.pseudo_labeler.state_dict()
    assert any(not torch.equal(new_labeller[k], v) for k, v in old_labeller.items())


def test_pseudolabel_refuses_a_run_without_joint_epochs(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_nojoint", "nnunet_contrast.budget.num_epochs=1",
                       "nnunet_contrast.pseudolabel.warmup_fraction=0.5")
    with pytest.raises(UserInputError, match="leaving none for the contrastive joint training"):
        make_trainer(PSEUDO, plans)


# ----------------------------------------------------------------------------- global + local contrast
def globallocal_losses(plans):
    trainer = ready_trainer(GLOBALLOCAL, plans)
    seed_everything(1)
    losses = {}
    with torch.no_grad():
        for stage in ("global", "local"):
            loader = trainer.stage_loader(trainer.schedule.stage(stage))
            losses[stage] = [stage_terms(trainer, stage, next(loader))[f"{stage}_contrast"].item() for _ in range(3)]
    return losses


def test_globallocal_pretraining_reads_no_label(hippocampus, tmp_path):
    split = split_of_fold0(hippocampus)
    reference, hidden, changed = losses_with_hidden_labels_corrupted(
        hippocampus, tmp_path, lambda: globallocal_losses(TEST_PLANS),
        split["labeled"] + split["unlabeled"],  # every label of the pretraining pool, labelled cases too
        lambda folder, backup: corrupt_images(folder, split["unlabeled"], backup))  # control: their images count
    assert hidden == reference
    assert changed["global"] != reference["global"] and changed["local"] != reference["local"]


def test_globallocal_resumes_mid_stage(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_resume_gl", "nnunet_contrast.globallocal.global_epochs=2",
                       "nnunet_contrast.budget.num_epochs=1", "nnunet_contrast.budget.num_iterations_per_epoch=1")
    # stop after the first of two global epochs
    first, resumed = train_then_resume(GLOBALLOCAL, plans, stop_after_epochs=1)
    assert resumed.current_epoch == 1 and resumed.current_stage.name == "global"
    assert isinstance(resumed.optimizer, torch.optim.Adam)
    for key, value in first.heads.state_dict().items():
        torch.testing.assert_close(resumed.heads.state_dict()[key], value)
    assert_same_optimizer_moments(first, resumed)
    resumed.run_training()
    log = resumed.logger.local_logger.my_fantastic_logging
    assert log["stage"] == [0, 0, 1, 2]  # global, global, local, finetune
    assert log["lrs"][:3] == [1e-3] * 3 and log["lrs"][3] == pytest.approx(1e-2)
    assert resumed.dataloader_train is resumed.dataloader_labeled and not resumed.stage_loaders


def check_samples_are_their_slices(batch, dataset, patch) -> int:
    """Each sample of an unaugmented batch against the slice it reports; returns how many samples
    could be compared (those whose whole slice fits into the zero-padded patch)."""
    compared = 0
    for j, key in enumerate(batch["keys"]):
        image = batch["data"][j, 0].numpy()
        assert image.std() > 0  # a real slice, never an empty image
        volume = dataset.load_case(key)[0][0]
        assert batch["slice_count"][j] == volume.shape[0]
        if all(s <= p for s, p in zip(volume.shape[1:], patch)):
            assert np.isclose(image.sum(), volume[batch["slice_index"][j]].sum(), rtol=1e-4, atol=1e-2)
            compared += 1
    return compared


def test_partition_batches_on_volumes_of_different_slice_counts(hippocampus):
    trainer = ready_trainer(GLOBALLOCAL, TEST_PLANS)
    dataset = trainer.all_images_dataset()
    assert len(set(slice_counts(dataset).values())) >= 5  # the sample's volumes differ in slice count
    patch = tuple(trainer.configuration_manager.patch_size)
    # no augmentation, so that each sample can be compared with the slice it claims to be
    loader = PartitionDataLoader(dataset, 12, patch, patch, trainer.label_manager, partitions=4,
                                 oversample_foreground_percent=0.0, transforms=None)
    seen_counts, compared = set(), 0
    np.random.seed(0)
    for _ in range(15):
        batch = loader.generate_train_batch()
        keys, index, count = batch["keys"], batch["slice_index"], batch["slice_count"]
        assert len(keys) == 12 and len(set(keys)) == 3  # 3 volumes x 4 partitions
        for j, key in enumerate(keys):
            assert keys[j - j % 4] == key  # sample v * 4 + p comes from volume v
            assert partition_of(index[j], count[j], 4) == j % 4
        compared += check_samples_are_their_slices(batch, dataset, patch)
        seen_counts.update(count.tolist())
    assert len(seen_counts) >= 5 and compared >= 30


def test_random_slice_batches_report_their_slices(hippocampus):
    trainer = ready_trainer(GLOBALLOCAL, TEST_PLANS)
    dataset = trainer.all_images_dataset()
    patch = tuple(trainer.configuration_manager.patch_size)
    loader = SliceInfoDataLoader(dataset, 16, patch, patch, trainer.label_manager, oversample_foreground_percent=0.0,
                                 transforms=None)
    np.random.seed(0)
    assert sum(check_samples_are_their_slices(loader.generate_train_batch(), dataset, patch) for _ in range(3)) >= 30
    batch = next(trainer.build_stage_loader(Data.ALL_IMAGES))  # the trainer's own G^R loader: augmented, images only
    assert set(batch) == {"data", "keys", "slice_index", "slice_count"}
    assert len(batch["keys"]) == trainer.method_settings.pretrain_batch_size


@pytest.mark.parametrize("settings, message", [
    (["nnunet_contrast.globallocal.pretrain_batch_size=10"], "batch_size 10 is not a positive multiple of partitions 4"),
    (["nnunet_contrast.globallocal.pretrain_batch_size=4"], "at least 8"),
    (["nnunet_contrast.globallocal.partitions=100", "nnunet_contrast.globallocal.pretrain_batch_size=200"],
     "fewer slices than the 100 partitions"),
    (["nnunet_contrast.globallocal.pretrain_batch_size=400"], "needs as many cases"),
])
def test_globallocal_rejects_impossible_partition_batches(hippocampus, settings, message):
    plans = make_plans(hippocampus, f"nnUNetPlans_badpartition{len(message)}", *settings)
    trainer = ready_trainer(GLOBALLOCAL, plans)
    with pytest.raises(UserInputError, match=re.escape(message)):
        trainer.stage_loader(trainer.schedule.stage("global"))


def test_globallocal_rejects_a_decoder_block_the_network_lacks(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_badblock", "nnunet_contrast.globallocal.decoder_blocks=4")
    with pytest.raises(UserInputError, match="has 3 decoder stages"):
        make_trainer(GLOBALLOCAL, plans).initialize()
    global_only = make_trainer("nnUNetTrainerGlobalContrast", plans)  # no local stage: the setting is unused
    global_only.initialize()
    assert set(global_only.heads) == {"global"} and list(global_only.schedule.names) == ["global", "finetune"]


def test_globallocal_keeps_the_last_decoder_stages_out_of_the_local_stage(hippocampus):
    kept = make_trainer(GLOBALLOCAL, make_plans(hippocampus, "nnUNetPlans_keepblock",
                                                "nnunet_contrast.globallocal.keep_output_blocks=1"))
    kept.initialize()
    assert kept.local_blocks == 2  # 3 decoder stages, the last kept for the segmentation loss
    local = {id(p) for p in kept.parameters_of(Part("decoder_blocks"))}
    last_stage = {id(p) for p in kept.network.decoder.stages[-1].parameters()}
    assert local and not local & last_stage
    paper = make_trainer(GLOBALLOCAL, TEST_PLANS)
    paper.initialize()
    assert paper.local_blocks == 3  # the paper's l = 3: here the whole decoder
    paper_last = {id(p) for p in paper.network.decoder.stages[-1].parameters()}
    assert paper_last <= {id(p) for p in paper.parameters_of(Part("decoder_blocks"))}
    too_many = make_trainer(GLOBALLOCAL, make_plans(hippocampus, "nnUNetPlans_keepall",
                                                    "nnunet_contrast.globallocal.keep_output_blocks=3"))
    with pytest.raises(UserInputError, match="keep_output_blocks is 3 but this network has 3 decoder stages"):
        too_many.initialize()


def test_variants_fix_what_their_name_says(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_variants", "nnunet_contrast.pseudolabel.matching=intra",
                       "nnunet_contrast.globallocal.global_strategy=GD", "nnunet_contrast.globallocal.local_epochs=3")
    assert make_trainer(PSEUDO, plans).method_settings.matching == "intra"
    assert make_trainer("nnUNetTrainerPseudoLabelContrastInter", plans).method_settings.matching == "inter"
    inter_self_training = make_trainer("nnUNetTrainerPseudoLabelContrastInterSelfTraining", plans)
    assert inter_self_training.method_settings.matching == "inter"
    assert inter_self_training.settings.run.finetune == "selftraining"
    full = make_trainer(GLOBALLOCAL, plans)
    assert [(s.name, s.epochs) for s in full.schedule.stages] == [("global", 1), ("local", 3), ("finetune", 2)]
    global_only = make_trainer("nnUNetTrainerGlobalContrast", plans)
    assert [s.name for s in global_only.schedule.stages] == ["global", "finetune"]
    assert global_only.method_settings.global_strategy == "GR"
