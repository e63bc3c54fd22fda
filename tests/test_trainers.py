"""Trainers in process, on the prepared sample: labels of unlabelled cases never reach a loss,
mid-stage resume, and the empty-pool check."""
import json
from pathlib import Path

import pytest
import torch

from conftest import (TEST_PLANS, corrupt_labels, losses_with_hidden_labels_corrupted, make_plans, make_trainer,
                      ready_trainer, seed_everything, split_of_fold0, stage_terms, train_then_resume)
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.training.semisup import SemiSupervisedTrainer


def losses_of_one_step(plans):
    """The loss of each stage of nnUNetTrainerSupConLocal on the same batches, all seeds fixed."""
    trainer = ready_trainer("nnUNetTrainerSupConLocal", plans)
    seed_everything(1)
    batch = next(trainer.dataloader_train)
    unlabeled_batch = next(trainer.dataloader_unlabeled)
    assert set(unlabeled_batch) == {"data", "keys"}  # no label leaves the unlabelled loader
    with torch.no_grad():
        return {"global": stage_terms(trainer, "global", batch)["global_contrast"].item(),
                "local": stage_terms(trainer, "local", batch)["local_contrast"].item(),
                "finetune": trainer.loss(trainer.network(batch["data"]), batch["target"]).item()}


def test_labels_of_unlabelled_cases_never_reach_a_loss(hippocampus, tmp_path):
    plans = make_plans(hippocampus, "nnUNetPlans_leak", "batch_size=6",
                       "nnunet_contrast.supconlocal.local_mode=stride")
    split = split_of_fold0(hippocampus)
    reference, hidden, changed = losses_with_hidden_labels_corrupted(
        hippocampus, tmp_path, lambda: losses_of_one_step(plans), split["unlabeled"],
        # control: the same corruption on labelled cases does change the supervised losses
        lambda folder, backup: corrupt_labels(folder, split["labeled"], backup))
    assert hidden == reference
    assert changed["local"] != reference["local"] and changed["finetune"] != reference["finetune"]


def test_continue_mid_stage_resumes_as_uninterrupted(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_resume", "nnunet_contrast.supconlocal.global_epochs=2",
                       "nnunet_contrast.budget.num_epochs=1", "nnunet_contrast.budget.num_iterations_per_epoch=1")
    # stop after the first of two global epochs, i.e. mid-stage
    first, resumed = train_then_resume("nnUNetTrainerSupConLocal", plans, stop_after_epochs=1)
    assert resumed.current_epoch == 1 and resumed.current_stage.name == "global"
    assert resumed.schedule.stage("global").iterations == 3 and resumed.schedule.stage("finetune").iterations == 1
    assert isinstance(resumed.optimizer, torch.optim.Adam)
    for key, value in first.heads.state_dict().items():
        torch.testing.assert_close(resumed.heads.state_dict()[key], value)
    first_state = first.optimizer.state_dict()["state"]
    resumed_state = resumed.optimizer.state_dict()["state"]
    assert first_state.keys() == resumed_state.keys() and len(first_state) > 0
    for index in first_state:
        torch.testing.assert_close(resumed_state[index]["exp_avg"], first_state[index]["exp_avg"])
    resumed.run_training()
    log = resumed.logger.local_logger.my_fantastic_logging
    assert log["stage"] == [0, 0, 1, 2]  # global, global, local, finetune: as an uninterrupted run
    assert log["lrs"][:3] == [1e-4] * 3 and log["lrs"][3] == pytest.approx(1e-2)
    assert resumed.current_epoch == 4


def test_checkpoint_network_weights_are_a_plain_nnunet(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_plain", "nnunet_contrast.budget.num_epochs=1",
                       "nnunet_contrast.budget.num_iterations_per_epoch=1")
    trainer = make_trainer("nnUNetTrainerSupConLocal", plans)
    trainer.run_training()
    checkpoint = torch.load(Path(trainer.output_folder) / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["network_weights"].keys() == trainer.network.state_dict().keys()
    assert set(checkpoint["nnunet_contrast"]["heads"]) == set(trainer.heads.state_dict())
    assert not list(Path(trainer.output_folder).glob("*.tmp*"))  # atomic saves leave no temporaries


class _NeedsUnlabeled(SemiSupervisedTrainer):
    requires_unlabeled = True


def test_trainer_that_needs_unlabelled_images_finding_none(hippocampus, monkeypatch):
    plans = json.loads((hippocampus.preprocessed / f"{TEST_PLANS}.json").read_text())
    plans["configurations"]["2d"]["nnunet_contrast"]["semisup"] = {"split_file": "missing.json"}
    plans["continue_training"] = False
    dataset_json = json.loads((hippocampus.preprocessed / "dataset.json").read_text())
    trainer = _NeedsUnlabeled(plans, "2d", 0, dataset_json, torch.device("cpu"))
    monkeypatch.setattr(trainer, "added_unlabeled_dataset", lambda: None)
    with pytest.raises(UserInputError, match="needs unlabelled images but found none"):
        trainer.do_split()
