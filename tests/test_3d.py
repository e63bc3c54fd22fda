"""nnU-Net's 3d_fullres configuration on the embedded sample: the trainers with a 3D form (docs/methods.md,
"Configurations") train and predict through nnU-Net's commands on the 3D PlainConvUNet nnU-Net plans; the methods
without one refuse in one line before writing anything."""
import pytest

from conftest import (ALL_PIXELS_3D, PLANS_3D, corrupt_images, losses_with_hidden_labels_corrupted, make_trainer,
                      self_training_losses, split_of_fold0)
from nnunet_contrast.training.schedule import PSEUDO_LABEL


def test_self_training_trains_and_predicts_3d_fullres(preprocessed_3d):
    data = preprocessed_3d
    trained = data.run("nnUNetv2_train", "4", "3d_fullres", "0", "-tr", "nnUNetTrainerSelfTraining", "-p", PLANS_3D,
                       "-device", "cpu")
    assert "Entering stage 'selftrain'" in trained.stdout and "pseudo-labels kept (selftrain)" in trained.stdout
    predictions = data.root / "pred_3d"
    data.run("nnUNetv2_predict", "-i", data.heldout, "-o", predictions, "-d", "4", "-c", "3d_fullres",
             "-tr", "nnUNetTrainerSelfTraining", "-p", PLANS_3D, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1")
    assert sorted(p.name for p in predictions.glob("*.nii.gz")) == ["hippocampus_065.nii.gz", "hippocampus_067.nii.gz"]


@pytest.mark.parametrize("trainer", ["nnUNetTrainerLabeledOnly", "nnUNetTrainerLabeledOnlyTwiceIterations",
                                     "nnUNetTrainerSelfTraining", "nnUNetTrainerCopyPaste",
                                     "nnUNetTrainerGlobalContrast", "nnUNetTrainerGlobalContrastSelfTraining"])
def test_trainers_with_a_3d_form_build_nnunets_3d_network(preprocessed_3d, trainer):
    built = make_trainer(trainer, PLANS_3D, configuration="3d_fullres")
    built.initialize()
    assert type(built.network).__name__ == "PlainConvUNet" and built.network.encoder.conv_op.__name__ == "Conv3d"


@pytest.mark.parametrize("trainer", ["nnUNetTrainerSelfTraining", "nnUNetTrainerCopyPaste"])
def test_labels_of_unlabelled_cases_never_reach_a_3d_self_training_loss(preprocessed_3d, tmp_path, trainer):
    split = split_of_fold0(preprocessed_3d)
    reference, hidden, changed = losses_with_hidden_labels_corrupted(
        preprocessed_3d, tmp_path, lambda: self_training_losses(trainer, ALL_PIXELS_3D, "selftrain", "3d_fullres"),
        split["unlabeled"], lambda folder, saved: corrupt_images(folder, split["unlabeled"], saved), "3d_fullres")
    assert hidden == reference
    assert reference[PSEUDO_LABEL] > 0 and changed[PSEUDO_LABEL] != reference[PSEUDO_LABEL]


def test_a_method_without_a_3d_form_refuses_3d_fullres_in_one_line(preprocessed_3d):
    result = preprocessed_3d.run("nnUNetv2_train", "4", "3d_fullres", "0", "-tr", "nnUNetTrainerSupConLocal",
                                 "-p", PLANS_3D, "-device", "cpu", check=False)
    assert result.returncode != 0
    assert "nnUNetTrainerSupConLocal has no 3D form yet" in result.stderr and "train the 2d configuration" in result.stderr
    assert not (preprocessed_3d.results / f"nnUNetTrainerSupConLocal__{PLANS_3D}__3d_fullres").exists()
