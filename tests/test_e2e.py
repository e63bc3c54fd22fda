"""End to end through the real commands: nnU-Net's (train, predict, evaluate) and ours, on the
embedded Hippocampus sample prepared in conftest.py."""
import json

import pytest
import SimpleITK as sitk
import torch
from nnunetv2.run.run_training import maybe_load_checkpoint

from conftest import TEST_PLANS, assert_summary_is_the_dice_of_the_files, make_trainer, run_cmd

TRAINERS = ["nnUNetTrainerSupConLocal", "nnUNetTrainerLabeledOnly", "nnUNetTrainerPseudoLabelContrast",
            "nnUNetTrainerGlobalLocalContrast", "nnUNetTrainerIDEAL", "nnUNetTrainerSelfTraining"]
# (CrossLevel runs nnUNetv2_train on RGB images in test_natural_images.py; CopyPaste is SelfTraining with another mixing, PseudoLabelContrastInter PseudoLabelContrast with another matching,
# GlobalContrast GlobalLocalContrast without its local stage: their steps, schedules, settings, hidden labels and
# 3D forms are tested in-process)
# --c, nnUNetv2_predict and nnUNetv2_evaluate_folder for self-training (heads, the EMA teacher and the random
# states in the checkpoint); IDEAL's two decoders through nnU-Net's predictor: test_resenc.py
PREDICTED = ["nnUNetTrainerSelfTraining"]


@pytest.fixture(scope="module")
def trained(hippocampus):
    """Each trainer trained once with the test budget (shared by the tests below)."""
    logs = {}
    for trainer in TRAINERS:
        result = hippocampus.run("nnUNetv2_train", "4", "2d", "0", "-tr", trainer, "-p", TEST_PLANS,
                                 "-device", "cpu")
        logs[trainer] = result.stdout
    return logs


@pytest.mark.parametrize("trainer", TRAINERS)
def test_training_writes_nnunet_outputs(hippocampus, trained, trainer):
    fold = hippocampus.model_folder(trainer) / "fold_0"
    for name in ["checkpoint_final.pth", "progress.png", "nnunet_contrast_settings.json", "validation/summary.json"]:
        assert (fold / name).exists(), name
    settings = json.loads((fold / "nnunet_contrast_settings.json").read_text())
    assert settings["budget"]["num_iterations_per_epoch"] == 2
    log = trained[trainer]
    assert "Semi-supervised split splits_semisup.json: 8 labelled and 24 unlabelled" in log
    assert "Using trainer" in log  # found through nnUNet_extTrainer, set by the start-up hook


def test_supconlocal_runs_its_three_stages(hippocampus, trained):
    log = trained["nnUNetTrainerSupConLocal"]
    for stage in ["global", "local", "finetune"]:
        assert f"Entering stage '{stage}'" in log
    assert "global_contrast_loss (global)" in log and "local_contrast_loss (local)" in log
    checkpoint = torch.load(hippocampus.model_folder("nnUNetTrainerSupConLocal") / "fold_0" / "checkpoint_final.pth",
                            map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 4  # 1 global + 1 local + 2 fine-tuning epochs
    assert checkpoint["nnunet_contrast"]["optimizer_stage"] == "finetune"
    assert set(checkpoint["nnunet_contrast"]["heads"]) and not any(
        k.startswith(("global", "local")) for k in checkpoint["network_weights"])
    stages = checkpoint["logging"]["stage"]
    assert stages == [0, 1, 2, 2]
    assert checkpoint["logging"]["supervised"] == [0, 0, 1, 1]  # where the report reads fine-tuning's start


def checkpoint_curve(hippocampus, trainer, key):
    return final_checkpoint(hippocampus, trainer)["logging"][key]


def final_checkpoint(hippocampus, trainer):
    return torch.load(hippocampus.model_folder(trainer) / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)


@pytest.mark.parametrize("trainer, matching", [("nnUNetTrainerPseudoLabelContrast", "intra")])
def test_pseudolabel_warms_up_then_trains_jointly(hippocampus, trained, trainer, matching):
    log = trained[trainer]
    assert "Stage: warmup" in log and "Stage: joint" in log
    assert "Pseudo-labelling round 1/1: labels from the network as of epoch 1" in log
    assert "contrast_loss (joint)" in log and "segmentation_loss (joint)" in log and "(warmup): " not in log
    assert all(value == value for value in checkpoint_curve(hippocampus, trainer, "contrast_loss")[1:])
    checkpoint = final_checkpoint(hippocampus, trainer)
    assert checkpoint["current_epoch"] == 2 and checkpoint["logging"]["stage"] == [0, 1]
    extras = checkpoint["nnunet_contrast"]
    assert extras["settings"]["pseudolabel"]["matching"] == matching and extras["stage_index"] == 1  # the first round
    assert extras["pseudo_labeler"].keys() == checkpoint["network_weights"].keys()


@pytest.mark.parametrize("trainer, stages", [("nnUNetTrainerGlobalLocalContrast", ["global", "local", "finetune"])])
def test_globallocal_runs_its_stages(hippocampus, trained, trainer, stages):
    log = trained[trainer]
    for stage in stages:
        assert f"Entering stage '{stage}'" in log
    assert ("Entering stage 'local'" in log) == ("local" in stages)
    checkpoint = final_checkpoint(hippocampus, trainer)
    assert checkpoint["current_epoch"] == len(stages) + 1  # one epoch per pretraining stage, 2 fine-tuning
    assert checkpoint["logging"]["stage"] == list(range(len(stages))) + [len(stages) - 1]
    assert checkpoint["nnunet_contrast"]["optimizer_stage"] == "finetune"


def test_ideal_pretrains_then_finetunes_two_decoders(hippocampus, trained):
    log = trained["nnUNetTrainerIDEAL"]
    assert "Entering stage 'dense'" in log and "Entering stage 'finetune'" in log
    checkpoint = final_checkpoint(hippocampus, "nnUNetTrainerIDEAL")
    assert checkpoint["current_epoch"] == 3 and checkpoint["logging"]["stage"] == [0, 1, 1]
    weights = checkpoint["network_weights"]
    assert any(k.startswith("decoder_bilinear.transpconvs") for k in weights)  # what nnUNetv2_predict loads
    assert not any(k.startswith("dense") for k in weights)


def test_the_final_checkpoint_holds_the_student_by_default(hippocampus, trained):
    checkpoint = final_checkpoint(hippocampus, "nnUNetTrainerSelfTraining")
    weights, teacher = checkpoint["network_weights"], checkpoint["nnunet_contrast"]["teacher"]["network"]
    assert weights.keys() == teacher.keys() and not all(torch.equal(weights[k], teacher[k]) for k in weights)
    assert "EMA teacher on the validation batches: Dice" in trained["nnUNetTrainerSelfTraining"]


@pytest.mark.parametrize("trainer", PREDICTED)
def test_continue_predict_evaluate(hippocampus, trained, trainer):
    resumed = hippocampus.run("nnUNetv2_train", "4", "2d", "0", "-tr", trainer, "-p", TEST_PLANS, "-device", "cpu",
                              "--c")
    assert "Training done" in resumed.stdout
    predictions = hippocampus.root / f"pred_{trainer}"
    hippocampus.run("nnUNetv2_predict", "-i", hippocampus.heldout, "-o", predictions, "-d", "4", "-c", "2d",
                    "-tr", trainer, "-p", TEST_PLANS, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1")
    assert sorted(p.name for p in predictions.glob("*.nii.gz")) == ["hippocampus_065.nii.gz",
                                                                   "hippocampus_067.nii.gz"]
    model = hippocampus.model_folder(trainer)
    hippocampus.run("nnUNetv2_evaluate_folder", hippocampus.heldout_labels, predictions,
                    "-djfile", model / "dataset.json", "-pfile", model / "plans.json")
    summary = json.loads((predictions / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2
    assert_summary_is_the_dice_of_the_files(summary, lambda path: sitk.GetArrayFromImage(sitk.ReadImage(path)))


def test_stock_trainer_takes_a_supconlocal_checkpoint_as_pretrained_weights(hippocampus, trained):
    """``nnUNetv2_train ... -tr nnUNetTrainer -pretrained_weights CHECKPOINT``, as its ``maybe_load_checkpoint``
    does it (nnU-Net's own trainer and loader, in-process: the training after it is nnU-Net's)."""
    checkpoint = hippocampus.model_folder("nnUNetTrainerSupConLocal") / "fold_0" / "checkpoint_final.pth"
    stock = make_trainer("nnUNetTrainer", TEST_PLANS)
    maybe_load_checkpoint(stock, False, False, str(checkpoint))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    loaded = {k: v for k, v in stock.network.state_dict().items() if ".seg_layers." not in k}
    assert len(loaded) > 0 and all(torch.equal(value, saved[key]) for key, value in loaded.items())


def test_a_trainer_starts_from_another_trainers_pretraining_with_nnunets_pretrained_weights(hippocampus, trained,
                                                                                             tmp_path):
    """Chaitanya et al. 2023's "pretrained initialisation + proposed method" as the README and the benchmark's
    rows TARGET@SOURCE run it: nnUNetv2_train ... -pretrained_weights GlobalLocalContrast's checkpoint_pretrained.pth
    (into another results folder: the shared PseudoLabelContrast model stays)."""
    pretrained = hippocampus.model_folder("nnUNetTrainerGlobalLocalContrast") / "fold_0" / "checkpoint_pretrained.pth"
    result = run_cmd(["nnUNetv2_train", "4", "2d", "0", "-tr", "nnUNetTrainerPseudoLabelContrast", "-p", TEST_PLANS,
                      "-device", "cpu", "-pretrained_weights", pretrained],
                     {**hippocampus.env, "nnUNet_results": str(tmp_path)})
    assert "Below is the list of overlapping blocks in pretrained model and nnUNet architecture" in result.stdout
    assert "Training done" in result.stdout
    assert (tmp_path / hippocampus.model_folder("nnUNetTrainerPseudoLabelContrast").relative_to(
        hippocampus.env["nnUNet_results"]) / "fold_0" / "checkpoint_final.pth").is_file()


@pytest.mark.parametrize("trainer", ["nnUNetTrainerLabeledOnly", "nnUNetTrainerIDEAL"])
def test_embed_draws_the_pixel_embeddings_of_a_trained_model(hippocampus, trained, trainer, tmp_path):
    picture = tmp_path / f"{trainer}.png"
    result = hippocampus.run("nnunet-contrast", "embed", "-d", "4", "-tr", trainer, "-p", TEST_PLANS, "-f", "0",
                             "-i", hippocampus.heldout, "-l", hippocampus.heldout_labels, "-o", picture,
                             "--pixels", "40")
    assert picture.read_bytes()[:4] == b"\x89PNG" and "silhouette of the classes" in result.stdout


def test_embed_without_a_model_or_labels_is_a_one_line_error(hippocampus, trained, tmp_path):
    missing_model = hippocampus.run("nnunet-contrast", "embed", "-d", "4", "-tr", "nnUNetTrainerNope", "-p",
                                    TEST_PLANS, "-i", hippocampus.heldout, "-l", hippocampus.heldout_labels, "-o",
                                    tmp_path / "x.png", check=False)
    assert_one_line_error(missing_model, "no trained model")
    no_labels = hippocampus.run("nnunet-contrast", "embed", "-d", "4", "-tr", "nnUNetTrainerLabeledOnly", "-p",
                                TEST_PLANS, "-i", hippocampus.heldout, "-l", tmp_path, "-o", tmp_path / "x.png",
                                check=False)
    assert_one_line_error(no_labels, "no label for")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- bad input
def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("labeled, message", [("1.5", "outside (0, 1]"), ("0.0", "outside (0, 1]"),
                                              ("-2", "at least 1")])
def test_split_rejects_fraction_outside_range(hippocampus, labeled, message):
    before = (hippocampus.preprocessed / "splits_semisup.json").read_text()
    result = hippocampus.run("nnunet-contrast", "split", "-d", "4", "--labeled", labeled, "--force",
                             "--name", "other.json", check=False)
    assert_one_line_error(result, message)
    assert not (hippocampus.preprocessed / "other.json").exists()
    assert (hippocampus.preprocessed / "splits_semisup.json").read_text() == before


def test_split_refuses_zero_labelled_fold(hippocampus):
    result = hippocampus.run("nnunet-contrast", "split", "-d", "4", "--labeled", "0.01", "--name", "z.json",
                             check=False)
    assert_one_line_error(result, "zero labelled cases")
    assert not (hippocampus.preprocessed / "z.json").exists()


def test_commands_need_nnunet_paths(hippocampus):
    env = {k: v for k, v in hippocampus.env.items() if k != "nnUNet_preprocessed"}
    from conftest import run_cmd
    result = run_cmd(["nnunet-contrast", "split", "-d", "4", "--labeled", "0.1"], env, check=False)
    assert_one_line_error(result, "nnUNet_preprocessed", "export")


def test_unknown_dataset(hippocampus):
    result = hippocampus.run("nnunet-contrast", "split", "-d", "7", "--labeled", "0.1", check=False)
    assert_one_line_error(result, "dataset '7' not found")


def test_plans_without_2d(hippocampus):
    plans = json.loads((hippocampus.preprocessed / "nnUNetPlans.json").read_text())
    del plans["configurations"]["2d"]
    (hippocampus.preprocessed / "No2dPlans.json").write_text(json.dumps(plans))
    result = hippocampus.run("nnunet-contrast", "split", "-d", "4", "--labeled", "0.1", "-p", "No2dPlans",
                             "--name", "n.json", check=False)
    assert_one_line_error(result, "no '2d' configuration", "nnUNetv2_plan_and_preprocess")
    assert not (hippocampus.preprocessed / "n.json").exists()


def test_add_unlabeled_rejects_wrong_channels_and_endings(hippocampus, tmp_path):
    pool = hippocampus.preprocessed / "nnUNetPlans_2d_unlabeled"
    before = sorted(p.name for p in pool.iterdir())
    source = next(hippocampus.unlabeled_input.iterdir())
    two_channels = tmp_path / "two"
    two_channels.mkdir()
    for channel in ("0000", "0001"):
        (two_channels / f"extra_{channel}.nii.gz").write_bytes(source.read_bytes())
    assert_one_line_error(hippocampus.run("nnunet-contrast", "add-unlabeled", "-d", "4", "-i", two_channels,
                                          check=False), "1 channel(s)")
    wrong_ending = tmp_path / "ending"
    wrong_ending.mkdir()
    (wrong_ending / "extra_0000.nrrd").write_bytes(b"x")
    assert_one_line_error(hippocampus.run("nnunet-contrast", "add-unlabeled", "-d", "4", "-i", wrong_ending,
                                          check=False), "file ending .nii.gz")
    assert sorted(p.name for p in pool.iterdir()) == before


def test_trainer_rejects_split_with_unknown_cases(hippocampus):
    split = json.loads((hippocampus.preprocessed / "splits_semisup.json").read_text())
    split["folds"][1]["labeled"].append("hippocampus_999")
    (hippocampus.preprocessed / "bad_split.json").write_text(json.dumps(split))
    hippocampus.run("nnunet-contrast", "plans", "-d", "4", "-p", TEST_PLANS, "-o", "BadSplitPlans",
                    "--set", "nnunet_contrast.semisup.split_file=bad_split.json")
    result = hippocampus.run("nnUNetv2_train", "4", "2d", "1", "-tr", "nnUNetTrainerLabeledOnly", "-p",
                             "BadSplitPlans", "-device", "cpu", check=False)
    assert result.returncode != 0
    assert "not training cases of fold 1 (e.g. hippocampus_999)" in result.stderr


def test_plans_output_is_not_replaced_without_force(hippocampus):
    path = hippocampus.preprocessed / f"{TEST_PLANS}.json"
    before = path.read_text()
    result = hippocampus.run("nnunet-contrast", "plans", "-d", "4", "-o", TEST_PLANS, "--preset", "cpu_budget",
                             check=False)
    assert_one_line_error(result, "--force")
    assert path.read_text() == before
