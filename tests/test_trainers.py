"""Trainers in process, on the prepared sample: labels of unlabelled cases never reach a loss,
mid-stage resume, and the empty-pool check."""
import json
from pathlib import Path

import pytest
import torch

from conftest import (TEST_PLANS, assert_resume_matches_uninterrupted, corrupt_labels, losses_with_hidden_labels_corrupted,
                      make_plans, make_trainer,
                      ready_trainer, seed_everything, split_of_fold0, stage_terms, train_then_resume)
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from nnunet_contrast.errors import UserInputError
from nnunet_contrast.training.method import PRETRAINED_CHECKPOINT
from nnunet_contrast.training.schedule import Data
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


def test_a_pretraining_run_leaves_the_weights_it_fine_tunes_from_for_nnunets_pretrained_weights(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_pretrained", "nnunet_contrast.budget.num_epochs=1",
                       "nnunet_contrast.budget.num_iterations_per_epoch=1")
    pretrained, finetuned = train_then_resume("nnUNetTrainerGlobalContrast", plans, stop_after_epochs=1)
    path = Path(pretrained.output_folder) / PRETRAINED_CHECKPOINT
    assert not path.exists()  # the first trainer stopped at the end of the pretraining
    finetuned.run_training()
    saved = torch.load(path, weights_only=False)["network_weights"]
    after_pretraining = pretrained.network.state_dict()
    assert saved.keys() == after_pretraining.keys()
    for key, value in after_pretraining.items():
        torch.testing.assert_close(saved[key], value)
    assert any(not torch.equal(saved[k], v) for k, v in finetuned.network.state_dict().items())  # then fine-tuned
    # Chaitanya et al. 2023, Table III: another method started from the pretrained weights, as nnUNetv2_train's
    # -pretrained_weights loads them (all but the segmentation layers)
    joint_plans = make_plans(hippocampus, "nnUNetPlans_pretrained_joint", "nnunet_contrast.budget.num_epochs=4")
    other = make_trainer("nnUNetTrainerPseudoLabelContrast", joint_plans)
    other.initialize()
    load_pretrained_weights(other.network, str(path))
    loaded = other.network.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in loaded.items() if ".seg_layers." not in key)
    assert not all(torch.equal(value, saved[key]) for key, value in loaded.items() if ".seg_layers." in key)


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


# ----------------------------------------------------------------------------- resume, one per stage kind
RESUME_CASES = {
    # Adam pretraining on labelled + unlabelled images, two views: stop inside the global stage
    "pretraining": ("nnUNetTrainerSupConLocal", ["nnunet_contrast.supconlocal.global_epochs=2",
                                                 "nnunet_contrast.supconlocal.local_epochs=0",
                                                 "nnunet_contrast.budget.num_epochs=1"], 1),
    # nnU-Net's SGD with a contrastive term and a pseudo-labeller snapshot: stop inside the round
    "joint round": ("nnUNetTrainerPseudoLabelContrast", ["nnunet_contrast.budget.num_epochs=3",
                                                         "nnunet_contrast.pseudolabel.warmup_fraction=0.3",
                                                         "nnunet_contrast.pseudolabel.pseudo_label_rounds=1"], 2),
    # the joint phases of CrossLevel: stop inside the contrast phase
    "joint phase": ("nnUNetTrainerCrossLevel", ["nnunet_contrast.budget.num_epochs=3",
                                                "nnunet_contrast.crosslevel.contrast_fraction=0.6"], 1),
    # dense pretraining of the dual-decoder network
    "dense pretraining": ("nnUNetTrainerIDEAL", ["nnunet_contrast.ideal.pretrain_epochs=2",
                                                 "nnunet_contrast.budget.num_epochs=1"], 1),
    # partition batches of all images from the trainer's own loader
    "own loader": ("nnUNetTrainerGlobalLocalContrast", ["nnunet_contrast.globallocal.global_epochs=2",
                                                        "nnunet_contrast.budget.num_epochs=1"], 1),
    # self-training with copy-paste: stop mid-ramp, with the EMA teacher and the ramp's progress to resume
    "self-training": ("nnUNetTrainerCopyPaste", ["nnunet_contrast.budget.num_epochs=4",
                                                 "nnunet_contrast.selftraining.warmup_fraction=0.25",
                                                 "nnunet_contrast.selftraining.rampup_fraction=1.0"], 2),
    # nnU-Net's own fine-tuning step
    "fine-tuning": ("nnUNetTrainerLabeledOnly", ["nnunet_contrast.budget.num_epochs=2"], 1),
}


@pytest.mark.parametrize("kind", list(RESUME_CASES))
def test_a_resumed_run_ends_as_the_uninterrupted_one(hippocampus, kind):
    trainer, settings, stop = RESUME_CASES[kind]
    plans = make_plans(hippocampus, f"nnUNetPlans_same_{kind.replace(' ', '_')}", *settings,
                       "nnunet_contrast.budget.num_iterations_per_epoch=1")
    assert_resume_matches_uninterrupted(trainer, plans, stop)


# ----------------------------------------------------------------------------- the fine-tuning setting
def test_finetune_setting_replaces_the_methods_last_stages_by_nnunets(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_nnunet_finetune", "nnunet_contrast.run.finetune=nnunet")
    ideal = make_trainer("nnUNetTrainerIDEAL", plans)
    assert [s.name for s in ideal.schedule.stages] == ["dense", "finetune"]
    assert ideal.schedule.stages[-1].is_nnunet_step  # not the cross pseudo-supervision of two decoders
    pseudo = make_trainer("nnUNetTrainerPseudoLabelContrast", plans)  # all its stages are fine-tuning
    assert [(s.name, s.epochs, s.is_nnunet_step) for s in pseudo.schedule.stages] == [("finetune", 2, True)]
    as_published = make_trainer("nnUNetTrainerIDEAL", TEST_PLANS)
    assert not as_published.schedule.stages[-1].is_nnunet_step
    assert [s.terms for s in make_trainer("nnUNetTrainerSupConLocal", plans).schedule.stages] == \
        [s.terms for s in make_trainer("nnUNetTrainerSupConLocal", TEST_PLANS).schedule.stages]


# ----------------------------------------------------------------------------- the training seed
def first_draws(plans, monkeypatch):
    """Initial weights and the first batches of every loader of a SupConLocal run, with worker processes."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    trainer = make_trainer("nnUNetTrainerSupConLocal", plans)
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    try:
        weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        batches = [next(loader)["data"] for loader in (trainer.dataloader_train, trainer.dataloader_val)
                   for _ in range(3)] + [trainer.next_unlabeled_images() for _ in range(3)]
    finally:
        finish_loaders(trainer)
    return weights, batches


def finish_loaders(trainer) -> None:
    """Stop the worker processes of nnU-Net's loaders and of ours."""
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        loader._finish()
    for loader in trainer.extra_loaders() + [trainer.dataloader_unlabeled]:
        if loader is not None:
            loader.finish()


def same_draws(a, b) -> bool:
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_a_seeded_run_draws_the_same_weights_and_batches_twice(hippocampus, monkeypatch):
    seeded = make_plans(hippocampus, "nnUNetPlans_seeded", "nnunet_contrast.run.seed=3")
    assert same_draws(first_draws(seeded, monkeypatch), first_draws(seeded, monkeypatch))
    unseeded = make_plans(hippocampus, "nnUNetPlans_unseeded", "nnunet_contrast.run.seed=-1")
    assert not same_draws(first_draws(unseeded, monkeypatch), first_draws(unseeded, monkeypatch))  # control


def first_pretraining_batches(trainer_name, plans, monkeypatch, stages_done: int = 0):
    """The first batch of each pretraining stage's own loader, with worker processes; ``stages_done``: those of
    the first stages are not built, as in a run resumed after them."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    trainer = ready_trainer(trainer_name, plans)  # the self-training variant builds its unlabelled loader here
    try:
        own = [s for s in trainer.schedule.stages if s.data in (Data.ALL_IMAGES, Data.PARTITIONS)]
        return [next(trainer.stage_loader(stage))["data"] for stage in own[stages_done:]]
    finally:
        finish_loaders(trainer)


def test_a_method_and_its_self_training_variant_and_a_resumed_run_draw_the_same_pretraining_batches(
        hippocampus, monkeypatch):
    seeded = make_plans(hippocampus, "nnUNetPlans_seeded_pretraining", "nnunet_contrast.run.seed=3")
    plain = first_pretraining_batches("nnUNetTrainerGlobalLocalContrast", seeded, monkeypatch)
    assert len(plain) == 2  # G^D's partition batches, then L^R's random slices
    variant = first_pretraining_batches("nnUNetTrainerGlobalLocalContrastSelfTraining", seeded, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(plain, variant, strict=True))
    resumed_in_local_stage = first_pretraining_batches("nnUNetTrainerGlobalLocalContrast", seeded, monkeypatch, 1)
    assert torch.equal(resumed_in_local_stage[0], plain[1])
    other_seed = make_plans(hippocampus, "nnUNetPlans_seeded_pretraining4", "nnunet_contrast.run.seed=4")
    assert not torch.equal(first_pretraining_batches("nnUNetTrainerGlobalLocalContrast", other_seed, monkeypatch,
                                                     1)[0], plain[1])  # a control: the batches follow the seed


# ----------------------------------------------------------------------------- bad split files
def split_file_trainer(hippocampus, content: str, name: str):
    (hippocampus.preprocessed / name).write_text(content)
    plans = make_plans(hippocampus, f"nnUNetPlans_{name.split('.')[0]}", f"nnunet_contrast.semisup.split_file={name}")
    return plans, make_trainer("nnUNetTrainerLabeledOnly", plans)


def test_a_split_file_that_is_not_json_gets_one_line(hippocampus):
    plans, trainer = split_file_trainer(hippocampus, '{"format": "nnunet-contrast semisup split v1", "folds": [',
                                        "split_broken.json")
    with pytest.raises(UserInputError, match=r"split_broken.json is not valid JSON .*: fix it or recreate it"):
        trainer.do_split()
    # inside nnUNetv2_train the same error ends the command with that one line, no traceback
    result = hippocampus.run("nnUNetv2_train", "4", "2d", "0", "-tr", "nnUNetTrainerLabeledOnly", "-p", plans,
                             "-device", "cpu", check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert last.startswith("nnUNetv2_train: error: ") and "split_broken.json is not valid JSON" in last


def test_a_case_both_labelled_and_unlabelled_is_refused(hippocampus):
    split = json.loads((hippocampus.preprocessed / "splits_semisup.json").read_text())
    split["folds"][0]["unlabeled"].append(split["folds"][0]["labeled"][0])
    _, trainer = split_file_trainer(hippocampus, json.dumps(split), "split_overlap.json")
    with pytest.raises(UserInputError, match="fold 0 of .*split_overlap.json lists 1 case.s. as both labelled and "
                                             "unlabelled"):
        trainer.do_split()


def test_a_run_without_epochs_is_refused_before_nnunet_writes_anything(hippocampus):
    plans = make_plans(hippocampus, "nnUNetPlans_no_epochs", "nnunet_contrast.budget.num_epochs=0")
    with pytest.raises(UserInputError, match="nnUNetTrainerCrossLevel: no stage has any epochs: raise "
                                             "nnunet_contrast.budget.num_epochs"):
        make_trainer("nnUNetTrainerCrossLevel", plans)
    assert not hippocampus.model_folder("nnUNetTrainerCrossLevel", plans).exists()


def test_labeled_only_trains_the_same_whatever_the_self_training_and_method_settings(hippocampus):
    """What lets the benchmark train one LabeledOnly per budget (``runs.Budget.for_baseline``): the settings of
    the self-training and method sections change nothing it does."""
    other = make_plans(hippocampus, "nnUNetPlans_lo_ignores", "nnunet_contrast.selftraining.ema_decay=0.5",
                       "nnunet_contrast.selftraining.warmup_fraction=0.6", "nnunet_contrast.selftraining.mixing=none",
                       "nnunet_contrast.crosslevel.alpha=7", "nnunet_contrast.pseudolabel.warmup_fraction=0.9")
    control = make_plans(hippocampus, "nnUNetPlans_lo_reads", "nnunet_contrast.run.seed=5")  # a setting it reads
    runs = []
    for plans in (TEST_PLANS, other, control):
        trainer = ready_trainer("nnUNetTrainerLabeledOnly", plans)
        trainer.on_train_epoch_start()
        losses = [float(trainer.train_step(next(trainer.dataloader_train))["loss"]) for _ in range(2)]
        runs.append((losses, {k: v.clone() for k, v in trainer.network.state_dict().items()}))
    (losses, weights), (other_losses, other_weights), (control_losses, _) = runs
    assert losses == other_losses and all(torch.equal(weights[k], other_weights[k]) for k in weights)
    assert control_losses != losses
