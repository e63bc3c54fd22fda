"""The CrossLevel (Zhao et al. 2022) and IDEAL (Basak et al. 2023) trainers in process, on the
prepared sample: labels of unlabelled cases never reach a loss, mid-stage resume, what each stage
trains, and bad settings."""
import re

import pytest
import torch
from conftest import (TEST_PLANS, assert_same_optimizer_moments, corrupt_images, losses_with_hidden_labels_corrupted,
                      make_plans, make_trainer, ready_trainer, seed_everything, split_of_fold0, stage_terms,
                      train_then_resume)
from nnunet_contrast.data.batch import Batch
from nnunet_contrast.network.dual_decoder import DualDecoderUNet
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.network.taps import forward_with_decoder_features
from nnunet_contrast.training.step import JointPass

CROSSLEVEL = "nnUNetTrainerCrossLevel"
IDEAL = "nnUNetTrainerIDEAL"


# ----------------------------------------------------------------------------- cross-level
def crosslevel_losses(plans):
    """nnU-Net's loss and the cross-level term of the same batches in each stage."""
    trainer = ready_trainer(CROSSLEVEL, plans)
    seed_everything(1)
    batch, unlabeled = next(trainer.dataloader_train), trainer.next_unlabeled_images()
    losses = {}
    with torch.no_grad():
        for epoch, (stage, term) in enumerate([("contrast", "cross_level_contrast"), ("consistency", "patch_consistency")]):
            assert trainer.schedule.stages[trainer.schedule.index_at(epoch)].name == stage
            terms = stage_terms(trainer, stage, batch, unlabeled=unlabeled)
            losses[stage], losses[f"seg_{stage}"] = terms[term].item(), terms["segmentation"].item()
    return losses


def losses_when_hidden_labels_or_unlabelled_images_change(hippocampus, backup, losses):
    """(reference, with the labels of unlabelled cases corrupted, with their images corrupted)."""
    split = split_of_fold0(hippocampus)
    return losses_with_hidden_labels_corrupted(
        hippocampus, backup, losses, split["unlabeled"],
        lambda folder, saved: corrupt_images(folder, split["unlabeled"], saved))  # control: their images count


def test_crosslevel_labels_of_unlabelled_cases_never_reach_a_loss(hippocampus, tmp_path):
    reference, hidden, changed = losses_when_hidden_labels_or_unlabelled_images_change(
        hippocampus, tmp_path, lambda: crosslevel_losses(TEST_PLANS))
    assert hidden == reference
    assert reference["seg_contrast"] == pytest.approx(reference["seg_consistency"])  # the same supervised loss
    assert changed["contrast"] != reference["contrast"] and changed["consistency"] != reference["consistency"]


def test_crosslevel_trains_the_head_with_nnunets_sgd_and_resumes_mid_run(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_resume_cl", "nnunet_contrast.budget.num_epochs=3",
                       "nnunet_contrast.budget.num_iterations_per_epoch=1")
    first, resumed = train_then_resume(CROSSLEVEL, plans, stop_after_epochs=1)  # contrast epoch 0 of 0..2
    assert first.schedule.starts == [0, 1] and resumed.current_epoch == 1  # one contrast epoch of three
    assert isinstance(resumed.optimizer, torch.optim.SGD)
    head_parameters = {id(p) for p in resumed.heads.parameters()}
    assert head_parameters == {id(p) for p in resumed.optimizer.param_groups[-1]["params"]}
    for key, value in first.heads.state_dict().items():
        torch.testing.assert_close(resumed.heads.state_dict()[key], value)
    resumed.run_training()
    log = resumed.logger.local_logger.my_fantastic_logging
    assert log["stage"] == [0, 1, 1]
    assert all(v == v for v in log["cross_level_contrast_loss"][:1] + log["patch_consistency_loss"][1:])


def test_crosslevel_contrast_reaches_network_and_head_but_not_through_the_key(hippocampus):
    trainer = ready_trainer(CROSSLEVEL, TEST_PLANS)
    seed_everything(1)
    batch = next(trainer.dataloader_train)
    output, features = forward_with_decoder_features(trainer.network, batch["data"])
    labeled_only = Batch.labeled(batch["data"], trainer.labels_of_target(batch["target"]))
    loss = stage_terms(trainer, "contrast", batch, trained=labeled_only,
                       joint=JointPass([output], features))["cross_level_contrast"]
    grads = torch.autograd.grad(loss, list(trainer.heads.parameters()) + [features])
    assert all(g.abs().sum() > 0 for g in grads)
    assert loss.item() > 0 and torch.isfinite(loss)


@pytest.mark.parametrize("grid, message", [(3, "valid here: [2, 4, 8]"), (1, "at least 2")])
def test_crosslevel_rejects_a_grid_that_does_not_fit_the_patch(hippocampus, grid, message):
    plans = make_plans(hippocampus, f"nnUNetPlans_badgrid{grid}", f"nnunet_contrast.crosslevel.grid={grid}")
    with pytest.raises(UserInputError, match=re.escape(message)):
        make_trainer(CROSSLEVEL, plans)


# ----------------------------------------------------------------------------- IDEAL
def ideal_losses(plans):
    trainer = ready_trainer(IDEAL, plans)
    seed_everything(1)
    losses = {}
    with torch.no_grad():
        batch = next(trainer.dataloader_train)
        losses["dense"] = stage_terms(trainer, "dense", batch)["dense_contrast"].item()
        batch, unlabeled = next(trainer.dataloader_train), trainer.next_unlabeled_images()
        terms = stage_terms(trainer, "finetune", batch, unlabeled=unlabeled)
        losses["supervised"], losses["cps"] = terms["segmentation"].item(), terms["cross_pseudo_supervision"].item()
    return losses


def test_ideal_labels_of_unlabelled_cases_never_reach_a_loss(hippocampus, tmp_path):
    reference, hidden, changed = losses_when_hidden_labels_or_unlabelled_images_change(
        hippocampus, tmp_path, lambda: ideal_losses(TEST_PLANS))
    assert hidden == reference
    assert changed["dense"] != reference["dense"] and changed["cps"] != reference["cps"]
    assert changed["supervised"] == reference["supervised"]  # labelled images only


def test_ideal_network_is_the_dual_decoder_and_predicts_one_segmentation(hippocampus):
    trainer = ready_trainer(IDEAL, TEST_PLANS)
    assert isinstance(trainer.network, DualDecoderUNet)
    trainer.network.eval()
    trainer.set_deep_supervision_enabled(False)  # as nnUNetv2_predict builds it
    images = next(trainer.dataloader_train)["data"][:2]
    with torch.no_grad():
        output = trainer.network(images)
        first, second = trainer.network.forward_both(images)
    assert output.shape == first.shape == (2, 3, *images.shape[2:])
    torch.testing.assert_close(output.softmax(1), (first.softmax(1) + second.softmax(1)) / 2)


def test_ideal_pretraining_leaves_the_second_decoder_alone(hippocampus):
    trainer = ready_trainer(IDEAL, TEST_PLANS)
    trained = {id(p) for p in trainer.stage_parameters(trainer.schedule.stage("dense"))}
    net = trainer.network
    shared = {id(p) for p in net.encoder.parameters()}
    assert shared <= trained and {id(p) for p in net.decoder.stages.parameters()} <= trained
    bilinear = {id(p) for p in net.decoder_bilinear.parameters()} - shared
    seg_layers = {id(p) for p in net.decoder.seg_layers.parameters()}
    assert not trained & (bilinear | seg_layers)
    assert isinstance(trainer.optimizer, torch.optim.Adam) and trainer.optimizer.param_groups[0]["lr"] == 1e-3


def test_ideal_resumes_mid_pretraining(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_resume_ideal", "nnunet_contrast.ideal.pretrain_epochs=2",
                       "nnunet_contrast.budget.num_epochs=1", "nnunet_contrast.budget.num_iterations_per_epoch=1")
    first, resumed = train_then_resume(IDEAL, plans, stop_after_epochs=1)
    assert resumed.current_epoch == 1 and resumed.current_stage.name == "dense"
    assert_same_optimizer_moments(first, resumed)
    resumed.run_training()
    log = resumed.logger.local_logger.my_fantastic_logging
    assert log["stage"] == [0, 0, 1]
    assert isinstance(resumed.optimizer, torch.optim.SGD)
